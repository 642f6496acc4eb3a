// The device pieces that both decode kernels are built from (decode.cu: version 2, one cooperative
// grid; decode_cluster.cu: version 4, one thread block cluster): loads, the warp's GEMV, one head's
// attention, the layout constants they share, and on the host the arguments both take (StepArgs)
// with their filling and the split into launches. See decode.cu for what a decode step is.
#pragma once

#include <cmath>
#include <cstdlib>
#include <optional>
#include <type_traits>

#include "common.cuh"

namespace minird {

// The order of one core block's tensors in block_weights: BlockWeight in csrc/ops.cpp.
namespace bw {
enum { NORM_1, WQKV, QK_BIAS, ATTN_PROJ, NORM_2, NORM_3, FC, MLP_PROJ, NORM_4, COUNT };
}
constexpr int kMaxCoreBlocks = 16;  // R that one launch takes (the pointers travel as kernel arguments)
constexpr int kMaxEntries = 96;     // (step, block) KV-cache entries that one launch takes

// n floats rounded up to a multiple of 4, so that every piece of shared memory is 16-byte aligned
__host__ __device__ inline int round4(int n) { return (n + 3) / 4 * 4; }
__host__ __device__ inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Phase C's copy of one head's keys and values (rows 0 .. pos): elements between rows, hs + 16
// bytes (rows t are read by threads t: without the pad every 8th thread would hit the same
// shared-memory banks), and its size in floats.
template <typename scalar_t>
__host__ __device__ inline int kv_row_stride(int hs) {
  return hs + 16 / (int)sizeof(scalar_t);
}
template <typename scalar_t>
__host__ __device__ inline int kv_smem_floats(int hs, int pos) {
  return 2 * (pos + 1) * kv_row_stride<scalar_t>(hs) * (int)sizeof(scalar_t) / (int)sizeof(float);
}
constexpr int kNormsPerBlock = 4;  // norm_1 .. norm_4: the h-wide weights of a core block
__host__ __device__ inline int norm_slot(int which) {  // BlockWeight index -> slot in the shared copy
  return which == bw::NORM_1 ? 0 : which == bw::NORM_2 ? 1 : which == bw::NORM_3 ? 2 : 3;
}

inline int env_int(const char* name, int fallback) {  // read at every call: a benchmark may change it
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}

// --- loads: weights through the read-only path, values written during the launch through L2 ---

// 16 bytes (8 bf16 or 4 fp32) unpacked to float. A bf16 is the top half of a float.
template <typename scalar_t>
__device__ inline void unpack16(uint4 raw, float* f) {
  const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
  if constexpr (std::is_same_v<scalar_t, float>) {
#pragma unroll
    for (int k = 0; k < 4; k++) f[k] = __uint_as_float(words[k]);
  } else {
    static_assert(std::is_same_v<scalar_t, at::BFloat16>, "decode_steps: float32 or bfloat16");
#pragma unroll
    for (int k = 0; k < 4; k++) {  // little endian: element 2k is the low half of word k
      f[2 * k] = __uint_as_float(words[k] << 16);
      f[2 * k + 1] = __uint_as_float(words[k] & 0xffff0000u);
    }
  }
}

// kGeneric: p may point into shared memory (the cluster kernel's staged copy of the weights) or
// global memory, so a plain load; otherwise global memory, through the read-only path.
template <typename scalar_t, bool kGeneric = false>
__device__ inline void load_weights16(const scalar_t* p, float* f) {
  const uint4* p4 = reinterpret_cast<const uint4*>(p);
  unpack16<scalar_t>(kGeneric ? *p4 : __ldg(p4), f);
}

// kShared: p points into this block's shared memory (phase C's copy of the keys and values)
template <typename scalar_t, bool kShared = false>
__device__ inline void load_data16(const scalar_t* p, float* f) {
  const uint4* p4 = reinterpret_cast<const uint4*>(p);
  unpack16<scalar_t>(kShared ? *p4 : __ldcg(p4), f);
}

template <typename scalar_t, bool kGeneric = false>
__device__ inline float load_weight(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    const float* pf = reinterpret_cast<const float*>(p);
    return kGeneric ? *pf : __ldg(pf);
  } else {
    const unsigned short* ph = reinterpret_cast<const unsigned short*>(p);
    return __uint_as_float((unsigned)(kGeneric ? *ph : __ldg(ph)) << 16);
  }
}

template <typename scalar_t, bool kShared = false>
__device__ inline float load_data(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    const float* pf = reinterpret_cast<const float*>(p);
    return kShared ? *pf : __ldcg(pf);
  } else {
    const unsigned short* ph = reinterpret_cast<const unsigned short*>(p);
    return __uint_as_float((unsigned)(kShared ? *ph : __ldcg(ph)) << 16);
  }
}

// Two neighbouring values (d, d + 1) written during the launch; d is even, so the pair is aligned.
template <typename scalar_t, bool kShared = false>
__device__ inline void load_data_pair(const scalar_t* p, float* f) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    const float2* p2 = reinterpret_cast<const float2*>(p);
    const float2 v = kShared ? *p2 : __ldcg(p2);
    f[0] = v.x;
    f[1] = v.y;
  } else {
    const unsigned* pw = reinterpret_cast<const unsigned*>(p);
    const unsigned word = kShared ? *pw : __ldcg(pw);
    f[0] = __uint_as_float(word << 16);
    f[1] = __uint_as_float(word & 0xffff0000u);
  }
}

__host__ __device__ inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16 bytes from global to shared memory without passing through registers (cp.async, sm_80 and
// later: the copy runs while the block goes on, until cp_async_wait_all); a plain copy before sm_80.
__device__ inline void copy16_async(void* dst_shared, const void* src_global) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(dst_shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src_global));
#else
  *reinterpret_cast<uint4*>(dst_shared) = __ldcg(reinterpret_cast<const uint4*>(src_global));
#endif
}

// n rows of `row` elements (a multiple of 16 bytes) from global memory, src_stride apart, into shared
// memory, dst_stride apart, in 16-byte cp.async's by the threads me, me + n_threads, ... (a block:
// threadIdx.x, blockDim.x; one warp: its lane, 32). They have landed after cp_async_wait_*.
template <typename scalar_t>
__device__ inline void copy_rows_async(scalar_t* dst, int dst_stride, const scalar_t* src, int64_t src_stride, int n,
                                       int row, int me, int n_threads) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int per_row = row / kVec;
  for (int c = me; c < n * per_row; c += n_threads) {
    const int r = c / per_row, offset = c % per_row * kVec;
    copy16_async(dst + r * dst_stride + offset, src + r * src_stride + offset);
  }
}

__device__ inline void cp_async_wait_all() {  // this thread's copies have landed (then __syncthreads for all)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// --- the pieces of a phase ---------------------------------------------------------------------

__device__ inline float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
  return v;
}

template <typename T>
__device__ inline T block_max(T v, T* shared) {  // as block_sum (common.cuh), with max
  for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(0xffffffff, v, offset));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = v;
  __syncthreads();
  T total = shared[0];
  for (int w = 1; w < (int)((blockDim.x + 31) >> 5); w++) total = max(total, shared[w]);
  return total;
}

// The GEMV step of one warp: out[r] = rows[r] . x for NR rows of n weights at once (their loads
// interleave), x (n floats) in shared memory; the result in every lane. The plain loop is the
// fallback for rows that are not 16-byte aligned (e.g. odd head sizes): same sum, slower.
// kGeneric: the rows may lie in shared memory (load_weights16).
template <typename scalar_t, int NR, bool kGeneric = false>
__device__ inline void warp_dot(const scalar_t* const (&rows)[NR], const float* x, int n, float (&out)[NR]) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const int lane = threadIdx.x % 32;
  float acc[NR];
  bool vectorized = n % VEC == 0;
#pragma unroll
  for (int r = 0; r < NR; r++) {
    acc[r] = 0.f;
    vectorized = vectorized && aligned16(rows[r]);
  }
  if (vectorized) {
#pragma unroll 4
    for (int c = lane * VEC; c < n; c += 32 * VEC) {
      float xv[VEC];
#pragma unroll
      for (int k = 0; k < VEC; k += 4) *reinterpret_cast<float4*>(xv + k) = *reinterpret_cast<const float4*>(x + c + k);
#pragma unroll
      for (int r = 0; r < NR; r++) {
        float wv[VEC];
        load_weights16<scalar_t, kGeneric>(rows[r] + c, wv);
#pragma unroll
        for (int k = 0; k < VEC; k++) acc[r] = fmaf(wv[k], xv[k], acc[r]);
      }
    }
  } else {
    for (int c = lane; c < n; c += 32) {
#pragma unroll
      for (int r = 0; r < NR; r++) acc[r] = fmaf(load_weight<scalar_t, kGeneric>(rows[r] + c), x[c], acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < NR; r++) out[r] = warp_sum(acc[r]);
}

// One thread's dot product of a cached key row (n values written during the launch, or their
// shared copy) with x (shared).
template <typename scalar_t, bool kShared>
__device__ inline float thread_dot(const scalar_t* row, const float* x, int n) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  float acc = 0.f;
  if (n % VEC == 0 && aligned16(row)) {
#pragma unroll 8
    for (int c = 0; c < n; c += VEC) {  // (unrolled: the row's loads are issued together, one L2 wait)
      float f[VEC];
      load_data16<scalar_t, kShared>(row + c, f);
#pragma unroll
      for (int k = 0; k < VEC; k++) acc = fmaf(f[k], x[c + k], acc);
    }
  } else {
    for (int c = 0; c < n; c++) acc = fmaf(load_data<scalar_t, kShared>(row + c), x[c], acc);
  }
  return acc;
}

// silu(gate) * up from the two GEMV sums, rounded where eager stores a tensor (as swiglu.cu): the
// fc output, silu's output, the product.
template <typename scalar_t>
__device__ inline float swiglu_of_sums(float gate_sum, float up_sum) {
  const float gate = round_to<scalar_t>(gate_sum), up = round_to<scalar_t>(up_sum);
  return round_to<scalar_t>(round_to<scalar_t>(gate / (1.f + expf(-gate))) * up);
}

// out = rmsnorm(in) * w over the whole block, as RMSNorm.forward / add_rmsnorm_kernel: the sum of
// squares in fp32, the normalised value rounded to the dtype, then times the weight and rounded.
// out may be in: each thread reads and writes only its own elements i = tid, tid + blockDim, ...
// w_shared: the same weight, copied to shared memory at the start (or nullptr: read w from L2).
template <typename scalar_t>
__device__ inline void rmsnorm_block(const float* in, const scalar_t* w, const float* w_shared, float* out, int h,
                                     float eps, float* red) {
  float ss = 0.f;
  for (int i = threadIdx.x; i < h; i += blockDim.x) ss += in[i] * in[i];
  const float r = 1.f / sqrtf(block_sum(ss, red) / h + eps);
  for (int i = threadIdx.x; i < h; i += blockDim.x) {
    const float wi = w_shared != nullptr ? w_shared[i] : load_weight(w + i);
    out[i] = round_to<scalar_t>(round_to<scalar_t>(in[i] * r) * wi);
  }
  __syncthreads();  // the GEMV that follows reads every element
}

// One head's attention for the token at pos: att = softmax(q K^T * scale) V over keys 0 .. pos,
// whose rows lie `stride` elements apart, in the KV cache or in the block's shared copy (kShared).
// prob (pos + 1) and part (max(2 blockDim, hs)) are shared scratch; att (hs) is rounded as SDPA
// stores it. q and the rows must be visible to the whole block when it starts.
template <typename scalar_t, bool kShared>
__device__ inline void head_attention(const scalar_t* K, const scalar_t* V, int stride, const float* q, int hs,
                                      int pos, float scale, float* prob, float* part, float* att, float* red) {
  // scores, a thread per key; then softmax over the pos + 1 keys
  float m = -INFINITY;
  for (int t = threadIdx.x; t <= pos; t += blockDim.x) {
    prob[t] = thread_dot<scalar_t, kShared>(K + (int64_t)t * stride, q, hs) * scale;
    m = fmaxf(m, prob[t]);
  }
  m = block_max(m, red);
  float l = 0.f;
  for (int t = threadIdx.x; t <= pos; t += blockDim.x) {  // each thread its own keys: no barrier
    prob[t] = expf(prob[t] - m);
    l += prob[t];
  }
  l = block_sum(l, red);  // (its barriers also publish prob[] to the whole block)
  // P V: G groups of keys, a thread per (group, pair of dimensions): neighbouring threads read
  // neighbouring pairs of a row; then the G partial sums of each dimension are added. The key
  // loop is unrolled so that each thread has 8 loads in flight, not one L2 wait per key.
  const int pairs = hs / 2, G = max(1, (int)blockDim.x / pairs);
  for (int idx = threadIdx.x; idx < G * pairs; idx += blockDim.x) {
    const int g = idx / pairs, d = 2 * (idx % pairs);
    float acc0 = 0.f, acc1 = 0.f;
#pragma unroll 8
    for (int t = g; t <= pos; t += G) {
      float v[2];
      load_data_pair<scalar_t, kShared>(V + (int64_t)t * stride + d, v);
      acc0 = fmaf(prob[t], v[0], acc0);
      acc1 = fmaf(prob[t], v[1], acc1);
    }
    part[g * hs + d] = acc0;
    part[g * hs + d + 1] = acc1;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < hs; d += blockDim.x) {
    float acc = 0.f;
    for (int g = 0; g < G; g++) acc += part[g * hs + d];
    att[d] = round_to<scalar_t>(acc / l);  // SDPA's output, as stored
  }
  __syncthreads();
}



// --- what both kernels take, and how the launcher fills it ------------------------------------------

// The arguments of one launch that both versions read, by value (their own fields follow).
template <typename scalar_t>
struct StepArgs {
  const scalar_t* s_in;     // (h) the state entering this launch's first step
  scalar_t* s_out;          // (h) the state after its last step
  const scalar_t* e_proj;   // (h) W_e e
  const scalar_t* adapter;  // (h, 2h) [W_s W_e]: only W_s, the first h columns of each row, is read;
                            // nullptr: no adapter, a step is the blocks alone (the prelude, the coda)
  const scalar_t* cos;      // (hs/2) the angles of position pos
  const scalar_t* sin;
  const scalar_t* w[kMaxCoreBlocks][bw::COUNT];  // each core block's tensors, BlockWeight order
  scalar_t* k_cache[kMaxEntries];                // (nh, L, hs) each; entry step * R + j
  scalar_t* v_cache[kMaxEntries];
  int h, I, n_head, hs, R, num_steps, pos, L;  // pos: the position, or its bound when pos_on_device is set
  const int64_t* pos_on_device;  // (1) the position, read when the kernel starts; nullptr: pos
  float eps, attn_scale;
};

// The fields of StepArgs that do not change from launch to launch (decode_steps' arguments, checked).
template <typename scalar_t>
void fill_step_args(StepArgs<scalar_t>& p, const at::Tensor& s, const std::optional<at::Tensor>& e_proj,
                    const std::optional<at::Tensor>& adapter_weight, at::TensorList block_weights,
                    const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache0, int64_t pos,
                    int64_t n_head, double eps, const std::optional<at::Tensor>& pos_on_device) {
  p.h = (int)s.size(2);
  p.n_head = (int)n_head, p.hs = p.h / p.n_head, p.R = (int)(block_weights.size() / bw::COUNT);
  p.I = (int)block_weights[bw::FC].size(0) / 2, p.pos = (int)pos, p.L = (int)k_cache0.size(2);
  p.e_proj = e_proj ? e_proj->data_ptr<scalar_t>() : nullptr;
  p.adapter = adapter_weight ? adapter_weight->data_ptr<scalar_t>() : nullptr;
  p.cos = cos.data_ptr<scalar_t>();
  p.sin = sin.data_ptr<scalar_t>();
  const int R = p.R;
  for (int j = 0; j < R; j++) {
    for (int k = 0; k < bw::COUNT; k++) p.w[j][k] = block_weights[j * bw::COUNT + k].data_ptr<scalar_t>();
  }
  p.pos_on_device = pos_on_device ? pos_on_device->data_ptr<int64_t>() : nullptr;
  p.eps = (float)eps;
  p.attn_scale = 1.f / std::sqrt((float)p.hs);
}

// The dynamic shared memory one block of `kernel` may ask for on `device`: the opt-in maximum less
// the kernel's static shared memory (a launch asking for more fails with "invalid argument").
template <typename Kernel>
size_t dynamic_smem_budget(Kernel kernel, int device) {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  return (size_t)optin - attributes.sharedSizeBytes;
}

// decode_steps runs in fp32 or bf16 (its arguments are checked): calls f with a value of s's type,
// from which the caller takes its kernel's scalar_t (decltype), so the long argument list is written once.
template <typename F>
void dispatch_float_or_bf16(const at::Tensor& s, F&& f) {
  if (s.scalar_type() == at::kFloat) {
    f(float{});
  } else {
    f(at::BFloat16{});
  }
}

// All steps in one launch, unless there are more (step, block) cache entries than the kernel's
// arguments hold: then a launch per kMaxEntries / R steps, each starting from the last one's state.
// launch() starts the kernel on p as it is filled for that launch.
template <typename scalar_t, typename Launch>
void launch_in_parts(StepArgs<scalar_t>& p, const at::Tensor& s, at::Tensor& out, at::TensorList k_cache,
                     at::TensorList v_cache, int64_t num_steps, Launch&& launch) {
  const int R = p.R, steps_per_launch = kMaxEntries / R;
  for (int64_t first = 0; first < num_steps; first += steps_per_launch) {
    const int n = (int)std::min<int64_t>(steps_per_launch, num_steps - first);
    p.num_steps = n;
    p.s_in = first == 0 ? s.data_ptr<scalar_t>() : out.data_ptr<scalar_t>();
    p.s_out = out.data_ptr<scalar_t>();
    for (int e = 0; e < n * R; e++) {
      p.k_cache[e] = k_cache[first * R + e].data_ptr<scalar_t>();
      p.v_cache[e] = v_cache[first * R + e].data_ptr<scalar_t>();
    }
    launch();
  }
}

}  // namespace minird
