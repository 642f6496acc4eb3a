// decode_steps on CUDA: num_steps whole recurrent steps for ONE new token (B = 1, T = 1) in ONE
// cooperative kernel launch. The reference it must match is recurrent_steps in csrc/ops.cpp (its
// loop over steps and core blocks; the math is RecurrentDepthLM.core_step / SandwichBlock /
// CausalSelfAttention in minird/model.py); tests/test_decode.py compares the two.
//
// What one step is, for one token (h = n_embd, R core blocks, nh heads of hs, SwiGLU inner I):
//     s = W_s s + e_proj                                        (the adapter; e_proj = W_e e, fixed)
//     for each core block j:
//         q, k, v = Wqkv norm_1(s);  q, k += qk_bias;  rotate q, k (RoPE at position pos)
//         write k, v into this (step, block)'s KV cache at pos
//         y = attn.proj softmax(q K^T / sqrt(hs)) V          (per head, over positions 0 .. pos)
//         s = norm_2(s + y)
//         s = norm_4(s + mlp.proj(silu(gate) * up)),  [gate; up] = mlp.fc norm_3(s)
//
// Why launches bound decode. At h = 256, R = 4, bf16 a step reads 8.6 MB of weights -- they fit in
// the H100's 50 MB L2 and stay there from step to step, so the floor is ~3 us. The unfused chain
// is 47 dependent kernels per step; even replayed from a CUDA graph each costs ~2.5 us of launch
// and tail, so a step took 117 us (csrc/README.md). Every op is a GEMV of a few hundred rows: the
// work of each kernel is tiny, the wait between kernels is not.
//
// version 1 (recurrent_steps, csrc/ops.cpp): one launch per op, ~47 per step.
// version 2 (this file): one launch for all num_steps steps. Its blocks stay resident (a
//   cooperative launch with at most one block per SM guarantees they all run at once) and wait for
//   each other at grid-wide barriers (cooperative_groups grid.sync(), ~1 us) wherever one phase
//   needs what the whole grid produced in the previous one. The phases of a step:
//     A  adapter: a warp per row of W_s                        -> s_adapted (h)          barrier
//     per core block j:
//     B  norm_1, then the qkv GEMV: a warp per rotation pair (rows 2i, 2i+1), so that the bias
//        and the rotation happen in registers; q -> scratch, k and v straight into the cache
//                                                                                        barrier
//     C  attention + attn.proj: a block per (head, slice of proj rows). The block computes its
//        head's attention (scores, softmax, P V) in shared memory and multiplies it by that head's
//        hs columns of attn.proj for its rows: y_heads[head] (h). y = sum over heads comes next.
//        The head's keys and values before pos do not change during the launch, so the block
//        copies them into its shared memory with cp.async while phase B runs (where they fit and
//        the block has one head: MINIRD_DECODE_KV_IN_SMEM=0 reads them from L2 instead); after
//        the barrier it waits for q and the new key and value only.
//                                                                                        barrier
//     D  y = sum of y_heads; s = norm_2(s + y); norm_3; the fc GEMV, a warp per (gate row i,
//        up row I + i) so that silu(gate) * up happens in registers  -> u (I)          barrier
//     E  mlp.proj GEMV: a warp per row                         -> y_mlp (h)             barrier
//        then s = norm_4(s + y_mlp), and the next block's norm_1 (or the next step's adapter).
//   4R + 1 barriers per step (17 at R = 4), where the op chain had 47 launches.
//   Without an adapter (e_proj and adapter_weight None) there is no phase A: a step is the blocks
//   alone, on s itself. One such launch of one step runs the prelude's (or the coda's) blocks of a
//   decoding token, where the fused ops take ~10 launches per block (ops.sandwich_blocks).
// What each block computes redundantly, and why: the norms. A norm needs the whole h-wide vector
// (one sum of squares), and h <= a few thousand is tiny, so instead of one more phase and one more
// barrier per norm, EVERY block reads the few KB it needs (y_heads, y_mlp: a few KB from L2) and
// recomputes the same state s in its own shared memory, bit for bit the same in every block (same
// code, same order). So the state never goes through global memory except after the adapter
// (whose rows are spread over the grid) and at the end.
// Attention is the other redundancy: the blocks that share a head all recompute its softmax (the
// launcher bounds how many, so that at most ~2 MB of keys and values are re-read per phase). That
// saves the barrier an attention phase of its own would need. At long contexts (pos ~ 2k) one
// head's keys and values are ~0.5 MB and the phase becomes one SM's bandwidth; a split over keys
// (flash-decoding) with one more barrier would be the next version.
// Weights never change during the kernel, so their loads could be issued before each barrier: an
// L1 prefetch of each warp's next rows was tried and measured no faster on an H100 (71.0 vs 69.3
// us/step at h = 256); the 4R norm weights are kept in shared memory instead (when they fit).
// The GEMV rows can be kept there too, opt-in (MINIRD_DECODE_WEIGHTS_IN_SMEM=n: the first n core
// blocks', as many as fit; not yet measured, csrc/README.md): a warp's rows are the same in every
// step, so each warp copies its own once at the start of the launch (WeightSlots) and no phase
// waits for an L2 load of a weight after its barrier. At h = 256 in bf16 all four core blocks fit.
// MINIRD_DECODE_VERBOSE=1 prints what the launcher put in shared memory.
//
// Numerics: as the other kernels here, fp32 accumulation, and round_to<scalar_t> wherever eager
// stores a tensor (each GEMV output, q/k after the bias and after each product of the rotation,
// the attention output, silu(gate), s + y, the norm before its weight and after it).
// Scratch that one phase hands to the next is fp32 in global memory, holding those rounded values.
// Memory ordering: grid.sync() makes every write before it visible to every read after it. Values
// written during the launch (scratch, the KV cache) are read with __ldcg (through L2, never a
// stale L1 line); only the weights use the read-only path (__ldg).
//
// Measured (H100, bf16, R = 4, a 128-token cache, the 4 steps of one call replayed from a CUDA
// graph), before the staging of phase C: h = 256 69 us/step (the 47-launch chain: 117), h = 1024
// 198-216 us/step (231). Fewer blocks were slower (16: 94 us/step).
// Where it goes (tools/decode_phase_timing.py, H200, h = 256, 2026-12-03): without the staging
// 68.7 us/step, the phases 54.8 us and the 17 barriers 12.5 us; per core block the critical path
// of B 1.8-2.6 us, C 6.9-7.2 (q, the keys, the values, attn.proj's rows: five dependent L2 round
// trips and two block reductions), D 2.3-2.6, E 1.5-1.8. With it 62.9 us/step: C 3.8-4.1 us, but B
// 3.6-4.1 (the copies it issues delay its own loads); h = 1024 (instrumented) 217.6 -> 187.2.
// Version 3, tried (commit 3544af2, not kept): one thread block cluster of 16
// blocks x 1024 threads handing vectors over through distributed shared memory, D and E merged by
// split-K over 16 slices of I (13 barriers). Right on all 375 cases of tests/test_decode.py, but
// slower: 83 us/step at h = 256, 444 at 1024. Its cluster barriers took 0.5-0.8 us in the stamps; a
// norm at 1024 threads cost ~1 us (block_sum adds 32 warp partials one after the other); and 16 SMs
// stream ~100 KB of weights each per phase at ~64 bytes a cycle (its merged D: 6.4 us). Hence the
// staging instead, with the weights kept spread over every SM.
// What a barrier costs alone (tools/decode_bounds.py, H200, 2026-12-04): grid.sync() at 132 blocks
// 0.98 us, an empty cluster.sync() of 16 blocks 0.20 us. So version 3's barriers were mostly the
// wait for late blocks; and this kernel's 4R + 1 grid barriers, empty, are 16.7 us a step: a step
// of <= 15 us needs the cluster's hardware barrier, with its weight streaming (16 SMs read a step's
// 8.5 MB from L2 in 4.6 us, the same tool) overlapped with the hand-overs.
// Version 4 (decode_cluster.cu) is that design, built: right, and slower so far; decode_steps runs
// it only when MINIRD_DECODE_VERSION=4 asks (=2, the default: this kernel). Its header says why.
// Phases D and E merged (split-K over slices of I, 13 barriers a step; branch decode-merged-mlp,
// 2026-12-07): right, and not faster (64.1 against 63.6 us/step on an H100): the barrier saved came
// back as the merged phase's longer chain on fewer SMs (csrc/README.md).
//
// Limits: float32 and bfloat16; B = T = 1; R <= 16 core blocks; one launch takes at most 96
// (step, block) cache entries, so more steps run as several launches (24 steps each at R = 4).
// The grid size does not change the result (every row's dot product is one warp's, every head's
// sum one block's, in a fixed order): MINIRD_DECODE_BLOCKS=n forces n blocks, to measure the
// barrier cost against the bandwidth of more SMs (the test checks the result is the same), and
// MINIRD_DECODE_NORMS_IN_SMEM=0 reads the norm weights from L2 (h = 256: +1 us/step; 1024: +12).
#include <cooperative_groups.h>
#include <torch/library.h>

#include <cstdio>
#include <string>

#include "decode.h"
#include "decode_parts.cuh"

namespace minird {

namespace cg = cooperative_groups;

// --- argument checks (each names the op, the argument and what was expected) ----------------

inline void check_decode_steps_args(const at::Tensor& s, const std::optional<at::Tensor>& e_proj,
                                    const std::optional<at::Tensor>& adapter_weight,
                                    at::TensorList block_weights, const at::Tensor& cos, const at::Tensor& sin,
                                    at::TensorList k_cache, at::TensorList v_cache, int64_t pos, int64_t num_steps,
                                    int64_t n_head, const std::optional<at::Tensor>& pos_on_device) {
  const char* op = "decode_steps";
  TORCH_CHECK(s.is_cuda(), op, ": s must be a CUDA tensor, got ", s.device());
  TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kBFloat16, op,
              ": s must have dtype float32 or bfloat16, got ", s.scalar_type());
  TORCH_CHECK(s.dim() == 3 && s.size(0) == 1 && s.size(1) == 1 && s.size(2) > 0, op,
              ": s must have shape (1, 1, h) (one new token of batch 1), got ", s.sizes());
  TORCH_CHECK(s.is_contiguous(), op, ": s must be contiguous");
  const int64_t h = s.size(2);
  TORCH_CHECK(n_head > 0 && h % n_head == 0 && (h / n_head) % 2 == 0, op, ": n_head=", n_head, " must divide h=", h,
              " into heads of even size");
  const int64_t hs = h / n_head;
  TORCH_CHECK(num_steps >= 0, op, ": num_steps must be >= 0, got ", num_steps);
  TORCH_CHECK(e_proj.has_value() == adapter_weight.has_value(), op,
              ": e_proj and adapter_weight must be given together (or neither: the blocks without the adapter)");
  if (adapter_weight) {
    check_like(*e_proj, op, "e_proj", s);
    check_shape(*e_proj, op, "e_proj", s.sizes());
    check_like(*adapter_weight, op, "adapter_weight", s);
    check_shape(*adapter_weight, op, "adapter_weight", {h, 2 * h});
  }
  check_like(cos, op, "cos", s);
  check_shape(cos, op, "cos", {1, hs / 2});
  check_like(sin, op, "sin", s);
  check_shape(sin, op, "sin", {1, hs / 2});

  TORCH_CHECK(!block_weights.empty() && block_weights.size() % bw::COUNT == 0, op,
              ": block_weights must hold 9 tensors per core block, got ", block_weights.size());
  const int64_t R = block_weights.size() / bw::COUNT;
  TORCH_CHECK(R <= kMaxCoreBlocks, op, ": at most ", kMaxCoreBlocks, " core blocks, got ", R);
  const at::Tensor& fc0 = block_weights[bw::FC];
  TORCH_CHECK(fc0.dim() == 2 && fc0.size(0) > 0 && fc0.size(0) % 2 == 0, op,
              ": block_weights[6] (mlp.fc of core block 0) must have shape (2*I, h), got ", fc0.sizes());
  const int64_t I = fc0.size(0) / 2;
  static const char* names[bw::COUNT] = {"norm_1",      "attn.Wqkv", "attn.qk_bias", "attn.proj", "norm_2",
                                         "norm_3",      "mlp.fc",    "mlp.proj",     "norm_4"};
  for (int64_t j = 0; j < R; j++) {
    const std::vector<std::vector<int64_t>> shapes = {{h}, {3 * h, h}, {2, 1, n_head, 1, hs}, {h, h}, {h},
                                                      {h}, {2 * I, h}, {h, I},                {h}};
    for (int k = 0; k < bw::COUNT; k++) {
      const std::string name = "block_weights[" + std::to_string(j * bw::COUNT + k) + "] (" + names[k] +
                               " of core block " + std::to_string(j) + ")";
      check_like(block_weights[j * bw::COUNT + k], op, name.c_str(), s);
      check_shape(block_weights[j * bw::COUNT + k], op, name.c_str(), shapes[k]);
    }
  }

  TORCH_CHECK((int64_t)k_cache.size() == num_steps * R && (int64_t)v_cache.size() == num_steps * R, op,
              ": k_cache and v_cache must hold num_steps * R = ", num_steps * R, " tensors, got ", k_cache.size(),
              " and ", v_cache.size());
  if (num_steps == 0) return;
  TORCH_CHECK(k_cache[0].dim() == 4, op, ": k_cache[0] must have shape (1, nh, L, hs), got ", k_cache[0].sizes());
  const int64_t L = k_cache[0].size(2);  // one length for all entries, as recurrent_steps
  TORCH_CHECK(pos >= 0 && pos < L, op, ": pos=", pos, " must lie in the caches' length L = ", L);
  if (pos_on_device) {
    const at::Tensor& t = *pos_on_device;
    TORCH_CHECK(t.device() == s.device() && t.scalar_type() == at::kLong && t.numel() == 1 && t.is_contiguous(),
                op, ": pos_on_device must be a (1,) int64 tensor on ", s.device(), ", got ", t.scalar_type(), " ",
                t.sizes(), " on ", t.device());
  }
  for (size_t i = 0; i < k_cache.size(); i++) {
    for (const auto& [t, list] : {std::pair{k_cache[i], "k_cache"}, std::pair{v_cache[i], "v_cache"}}) {
      const std::string name = std::string(list) + "[" + std::to_string(i) + "]";
      check_like(t, op, name.c_str(), s);
      check_shape(t, op, name.c_str(), {1, n_head, L, hs});
      TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", name,
                  " must start at a 16-byte aligned address (a buffer of its own, not an odd view)");
    }
  }
}

namespace {  // this file's helpers and kernel

// --- the kernel ----------------------------------------------------------------------------------

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename scalar_t>
struct DecodeParams : StepArgs<scalar_t> {
  // fp32 scratch in global memory: what one phase hands to the next
  float* s_adapted;  // (h) phase A's output
  float* q;          // (nh, hs) phase B's rotated queries
  float* y_heads;    // (nh, h) phase C's attn.proj output, one partial sum per head
  float* u;          // (I) phase D's silu(gate) * up
  float* y_mlp;      // (h) phase E's mlp.proj output
  int attn_chunks;  // phase C splits attn.proj's h rows into this many slices per head
  int norms_in_smem;  // the 4R norm weights fit in shared memory: copied there once, at the start
  int kv_in_smem;     // phase C reads its head's keys and values from a shared copy made during phase B
  int weight_layers;  // the first weight_layers core blocks' GEMV rows (and the adapter's) are read from
                      // each block's shared copy, made once at the start (WeightSlots); the rest from L2
};

// Which rows of a weight a warp multiplies never changes during a launch: its tasks are gwarp,
// gwarp + n_gwarps, ... in every phase's grid-stride loop. So each warp can keep its own rows in
// shared memory for the whole launch, read from L2 once instead of once per step, and each phase
// then waits for no L2 load of a weight. The slots, in elements: no warp has more than
// ceil(n / n_gwarps) of a phase's n tasks, so every warp gets that many.
struct WeightSlots {
  int a;        // per warp: phase A's rows of the adapter (h each), if there is one
  int b, d, e;  // per warp and core block: B's row pairs of Wqkv, D's (gate, up) pairs of mlp.fc, E's rows of mlp.proj
  int c;        // per block and core block: phase C's slice of attn.proj (its rows, the head's hs columns)
  __host__ __device__ WeightSlots(int h, int I, int hs, int n_gwarps, int rows_per_chunk, bool adapter)
      : a(adapter ? ceil_div(h, n_gwarps) * h : 0),
        b(ceil_div(3 * h / 2, n_gwarps) * 2 * h),
        d(ceil_div(I, n_gwarps) * 2 * h),
        e(ceil_div(h, n_gwarps) * I),
        c(rows_per_chunk * hs) {}
  // elements one warp holds for `layers` core blocks (the adapter's rows come with the first)
  __host__ __device__ int per_warp(int layers) const { return layers > 0 ? a + layers * (b + d + e) : 0; }
  __host__ __device__ int64_t per_block(int layers, int warps) const {
    return (int64_t)warps * per_warp(layers) + (int64_t)layers * c;
  }
};

// The launch passes the struct by value: keep it under the classic 4 KB of kernel arguments.
static_assert(sizeof(DecodeParams<float>) <= 4096, "decode_steps: kernel arguments over 4 KB");

// Dynamic shared memory of one block, in floats (the kernel carves it up in this order); the norm
// weights (4 per core block) come last, when the launcher keeps them there.
inline int decode_smem_floats(int h, int I, int hs, int pos) {
  return round4(h) + round4(std::max(h, I)) + 2 * round4(hs) + round4(std::max(2 * kThreads, hs)) + round4(pos + 1);
}

// warp_dot on rows in this block's shared copy (`shared`) or in global memory (the read-only path)
template <typename scalar_t, int NR>
__device__ inline void dot_rows(bool shared, const scalar_t* const (&rows)[NR], const float* x, int n,
                                float (&out)[NR]) {
  if (shared) {
    warp_dot<scalar_t, NR, true>(rows, x, n, out);
  } else {
    warp_dot<scalar_t, NR>(rows, x, n, out);
  }
}

// At most one block per SM (the launcher's grid): saying so lets ptxas use up to 255 registers a
// thread. Without it, it kept the bf16 kernel at 80, with 192 bytes of spill loads on the stack.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, 1) decode_steps_kernel(const __grid_constant__ DecodeParams<scalar_t> p) {
  cg::grid_group grid = cg::this_grid();
  const int h = p.h, I = p.I, hs = p.hs, nh = p.n_head, L = p.L;
  // Shared memory is laid out for p.pos; a position read from the device is kept within it, so a
  // wrong value cannot write outside the cache (the caller checks that tokens fit before replaying).
  const int pos = p.pos_on_device ? min(max((int)*p.pos_on_device, 0), p.pos) : p.pos;
  const float eps = p.eps;
  extern __shared__ float4 smem4[];
  __shared__ float red[32];  // block reductions
  float* s = reinterpret_cast<float*>(smem4);           // (h) the state: the same in every block
  float* x = s + round4(h);                             // (max(h, I)) the vector the current GEMV multiplies
  float* q = x + round4(max(h, I));                     // (hs) phase C: this head's query
  float* att = q + round4(hs);                          // (hs) phase C: this head's attention output
  float* part = att + round4(hs);                       // (max(2 kThreads, hs)) phase C: partial sums of P V
  float* prob = part + round4(max(2 * kThreads, hs));  // (pos + 1) phase C: scores, then probabilities
  // (2, pos + 1, kv_stride) phase C: the copy of its head's keys and values, if p.kv_in_smem
  const int kv_stride = kv_row_stride<scalar_t>(hs);
  // two pointers, not an array: an array indexed by a runtime value would live in local memory
  scalar_t* const k_rows = reinterpret_cast<scalar_t*>(prob + round4(p.pos + 1));
  scalar_t* const v_rows = k_rows + (p.pos + 1) * kv_stride;
  // (R, 4, h) the norm weights, if p.norms_in_smem
  float* norms = prob + round4(p.pos + 1) + (p.kv_in_smem ? kv_smem_floats<scalar_t>(hs, p.pos) : 0);
  // The launcher stages keys and values only when no block has more than one attention item: this
  // block's is (head blockIdx.x % nh, slice blockIdx.x / nh), if it has one.
  const bool stage_kv = p.kv_in_smem && (int)blockIdx.x < nh * p.attn_chunks;
  constexpr int kVec = 16 / sizeof(scalar_t);  // elements per 16-byte copy
  const int chunks_per_row = hs / kVec;        // (kv_in_smem: hs * sizeof(scalar_t) is a multiple of 16)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gwarp = blockIdx.x * kWarps + warp, n_gwarps = gridDim.x * kWarps;  // warps of the grid
  const int rows_per_chunk = ceil_div(h, p.attn_chunks);  // phase C's slice of attn.proj rows
  // The shared copies of the weights (p.weight_layers > 0): every warp's slots, then phase C's slice
  // per core block. Row r of phase C's slice for core block j is c_rows(j) + (r - r0) * hs.
  const WeightSlots slots(h, I, hs, n_gwarps, rows_per_chunk, p.adapter != nullptr);
  scalar_t* const staged = reinterpret_cast<scalar_t*>(norms + (p.norms_in_smem ? kNormsPerBlock * p.R * h : 0));
  scalar_t* const a_rows = staged + warp * slots.per_warp(p.weight_layers);
  scalar_t* const c_slices = staged + kWarps * slots.per_warp(p.weight_layers);  // after every warp's slots
  auto b_rows = [&](int j) { return a_rows + slots.a + j * (slots.b + slots.d + slots.e); };
  auto d_rows = [&](int j) { return b_rows(j) + slots.b; };
  auto e_rows = [&](int j) { return d_rows(j) + slots.d; };
  auto c_rows = [&](int j) { return c_slices + j * slots.c; };

  for (int i = threadIdx.x; i < h; i += blockDim.x) s[i] = static_cast<float>(p.s_in[i]);
  if (p.norms_in_smem) {  // read once here instead of once per norm per step from L2
    for (int j = 0; j < p.R; j++) {
      for (int which : {bw::NORM_1, bw::NORM_2, bw::NORM_3, bw::NORM_4}) {
        float* dst = norms + (j * kNormsPerBlock + norm_slot(which)) * h;
        for (int i = threadIdx.x; i < h; i += blockDim.x) dst[i] = load_weight(p.w[j][which] + i);
      }
    }
  }
  // the shared copy of core block j's norm weight `which`, or nullptr
  auto norm_w = [&](int j, int which) {
    return p.norms_in_smem ? norms + (j * kNormsPerBlock + norm_slot(which)) * h : nullptr;
  };
  if (p.weight_layers > 0) {  // each warp copies its own rows; the block its phase C slice (one item)
    for (int r = gwarp, t = 0; p.adapter != nullptr && r < h; r += n_gwarps, t++) {
      copy_rows_async(a_rows + t * h, h, p.adapter + (int64_t)r * 2 * h, 2 * h, 1, h, lane, 32);
    }
    for (int j = 0; j < p.weight_layers; j++) {
      const scalar_t* const* w = p.w[j];
      for (int pair = gwarp, t = 0; pair < 3 * h / 2; pair += n_gwarps, t++) {
        copy_rows_async(b_rows(j) + t * 2 * h, h, w[bw::WQKV] + (int64_t)2 * pair * h, h, 2, h, lane, 32);
      }
      for (int i = gwarp, t = 0; i < I; i += n_gwarps, t++) {
        copy_rows_async(d_rows(j) + t * 2 * h, h, w[bw::FC] + (int64_t)i * h, h, 1, h, lane, 32);
        copy_rows_async(d_rows(j) + t * 2 * h + h, h, w[bw::FC] + (int64_t)(I + i) * h, h, 1, h, lane, 32);
      }
      for (int r = gwarp, t = 0; r < h; r += n_gwarps, t++) {
        copy_rows_async(e_rows(j) + t * I, I, w[bw::MLP_PROJ] + (int64_t)r * I, I, 1, I, lane, 32);
      }
      if ((int)blockIdx.x < nh * p.attn_chunks) {
        const int head = blockIdx.x % nh, r0 = blockIdx.x / nh * rows_per_chunk, r1 = min(h, r0 + rows_per_chunk);
        copy_rows_async(c_rows(j), hs, w[bw::ATTN_PROJ] + (int64_t)r0 * h + head * hs, h, r1 - r0, hs, threadIdx.x,
                        blockDim.x);
      }
    }
    cp_async_wait_all();
  }
  __syncthreads();

  for (int step = 0; step < p.num_steps; step++) {
    // ---- A: s_adapted = W_s s + e_proj (one rounding, as addmm) ----
    if (p.adapter != nullptr) {
      for (int r = gwarp, t = 0; r < h; r += n_gwarps, t++) {
        const float e = load_weight(p.e_proj + r);  // (loaded first: its wait overlaps the row's)
        const bool shared = p.weight_layers > 0;
        const scalar_t* rows[1] = {shared ? a_rows + t * h : p.adapter + (int64_t)r * 2 * h};
        float dot[1];
        dot_rows<scalar_t, 1>(shared, rows, s, h, dot);
        if (lane == 0) p.s_adapted[r] = round_to<scalar_t>(dot[0] + e);
      }
      grid.sync();
    }

    for (int j = 0; j < p.R; j++) {
      const scalar_t* const* w = p.w[j];
      const bool shared = j < p.weight_layers;  // this core block's rows are in shared memory
      scalar_t* k_cache = p.k_cache[step * p.R + j];
      scalar_t* v_cache = p.v_cache[step * p.R + j];

      // ---- B: x = norm_1(s); qkv = Wqkv x; bias + RoPE; q -> scratch, k, v -> the cache at pos ----
      if (stage_kv) {  // phase C's keys and values before pos, copied while B runs (B does not read them)
        const int64_t head_rows = (int64_t)(blockIdx.x % nh) * L * hs;
        copy_rows_async(k_rows, kv_stride, k_cache + head_rows, hs, pos, hs, threadIdx.x, blockDim.x);
        copy_rows_async(v_rows, kv_stride, v_cache + head_rows, hs, pos, hs, threadIdx.x, blockDim.x);
      }
      if (j == 0 && p.adapter != nullptr) {
        for (int i = threadIdx.x; i < h; i += blockDim.x) s[i] = __ldcg(p.s_adapted + i);
      }  // (else s is already the input, or norm_4 of the previous block, below)
      rmsnorm_block<scalar_t>(s, w[bw::NORM_1], norm_w(j, bw::NORM_1), x, h, eps, red);
      for (int pair = gwarp, t = 0; pair < 3 * h / 2; pair += n_gwarps, t++) {
        const int row = 2 * pair;  // rows (row, row + 1) of Wqkv: one rotation pair (x[2i], x[2i+1])
        const int part = row / h, c = row % h, head = c / hs, d = c % hs;  // part 0, 1, 2 = q, k, v; d even
        // the bias (flat index part * h + c = row) and the angle, loaded before the rows: one wait for all
        float bias[2] = {0.f, 0.f}, cs = 1.f, sn = 0.f;
        if (part < 2) {
          bias[0] = load_weight(w[bw::QK_BIAS] + row);
          bias[1] = load_weight(w[bw::QK_BIAS] + row + 1);
          cs = load_weight(p.cos + d / 2);
          sn = load_weight(p.sin + d / 2);
        }
        const scalar_t* row0 = shared ? b_rows(j) + t * 2 * h : w[bw::WQKV] + (int64_t)row * h;
        const scalar_t* rows[2] = {row0, row0 + h};
        float dot[2];
        dot_rows<scalar_t, 2>(shared, rows, x, h, dot);
        if (lane == 0) {
          float a = round_to<scalar_t>(dot[0]), b = round_to<scalar_t>(dot[1]);  // the GEMV output, as stored
          if (part < 2) {  // q, k: + qk_bias[part], then rotate (as rope.cu)
            a = round_to<scalar_t>(a + bias[0]);
            b = round_to<scalar_t>(b + bias[1]);
            const float a_rot = round_to<scalar_t>(round_to<scalar_t>(a * cs) - round_to<scalar_t>(b * sn));
            const float b_rot = round_to<scalar_t>(round_to<scalar_t>(a * sn) + round_to<scalar_t>(b * cs));
            a = a_rot;
            b = b_rot;
          }
          if (part == 0) {
            p.q[c] = a;  // (nh, hs): c = head * hs + d
            p.q[c + 1] = b;
          } else {
            scalar_t* dst = (part == 1 ? k_cache : v_cache) + ((int64_t)head * L + pos) * hs + d;
            dst[0] = static_cast<scalar_t>(a);
            dst[1] = static_cast<scalar_t>(b);
          }
        }
      }
      grid.sync();

      // ---- C: per (head, slice of attn.proj rows): attention of the head, times its hs columns ----
      for (int item = blockIdx.x; item < nh * p.attn_chunks; item += gridDim.x) {
        const int head = item % nh, chunk = item / nh;
        const scalar_t* K = k_cache + (int64_t)head * L * hs;  // (L, hs), rows 0 .. pos are read
        const scalar_t* V = v_cache + (int64_t)head * L * hs;
        __syncthreads();  // the previous item's readers of q, prob, att are done
        for (int d = threadIdx.x; d < hs; d += blockDim.x) q[d] = __ldcg(p.q + head * hs + d);
        if (stage_kv) {  // rows 0 .. pos - 1 were copied during phase B; row pos was written there
          for (int c = threadIdx.x; c < 2 * chunks_per_row; c += blockDim.x) {
            const int which = c / chunks_per_row, offset = (c % chunks_per_row) * kVec;
            const scalar_t* src = (which == 0 ? K : V) + (int64_t)pos * hs + offset;
            *reinterpret_cast<uint4*>((which == 0 ? k_rows : v_rows) + pos * kv_stride + offset) =
                __ldcg(reinterpret_cast<const uint4*>(src));
          }
          cp_async_wait_all();
        }
        __syncthreads();
        if (stage_kv) {
          head_attention<scalar_t, true>(k_rows, v_rows, kv_stride, q, hs, pos, p.attn_scale, prob, part,
                                         att, red);
        } else {
          head_attention<scalar_t, false>(K, V, hs, q, hs, pos, p.attn_scale, prob, part, att, red);
        }
        // this head's share of attn.proj for rows r0 .. r1 - 1: y_heads[head][r] = proj[r, head cols] . att,
        // 4 rows per warp at once (a row is only hs long: one L2 wait for 4 of them)
        const int r0 = chunk * rows_per_chunk, r1 = min(h, r0 + rows_per_chunk);
        for (int r = r0 + warp; r < r1; r += 4 * kWarps) {
          const scalar_t* rows[4];
#pragma unroll
          for (int k = 0; k < 4; k++) {  // (past r1: repeat the last row, and drop its result)
            const int row = min(r + k * kWarps, r1 - 1);
            rows[k] = shared ? c_rows(j) + (row - r0) * hs : w[bw::ATTN_PROJ] + (int64_t)row * h + head * hs;
          }
          float dot[4];
          dot_rows<scalar_t, 4>(shared, rows, att, hs, dot);
          if (lane == 0) {
#pragma unroll
            for (int k = 0; k < 4; k++) {
              if (r + k * kWarps < r1) p.y_heads[head * h + r + k * kWarps] = dot[k];
            }
          }
        }
      }
      grid.sync();

      // ---- D: s = norm_2(s + attn.proj y); x = norm_3(s); u = silu(gate) * up, [gate; up] = fc x ----
      for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float y = 0.f;
        for (int head = 0; head < nh; head++) y += __ldcg(p.y_heads + head * h + i);
        s[i] = round_to<scalar_t>(s[i] + round_to<scalar_t>(y));  // attn.proj's output, then s + y, as stored
      }
      rmsnorm_block<scalar_t>(s, w[bw::NORM_2], norm_w(j, bw::NORM_2), s, h, eps, red);
      rmsnorm_block<scalar_t>(s, w[bw::NORM_3], norm_w(j, bw::NORM_3), x, h, eps, red);
      for (int i = gwarp, t = 0; i < I; i += n_gwarps, t++) {
        const scalar_t* rows[2] = {w[bw::FC] + (int64_t)i * h, w[bw::FC] + (int64_t)(I + i) * h};
        if (shared) {  // (gate, up) side by side in the copy
          rows[0] = d_rows(j) + t * 2 * h;
          rows[1] = rows[0] + h;
        }
        float dot[2];
        dot_rows<scalar_t, 2>(shared, rows, x, h, dot);
        if (lane == 0) p.u[i] = swiglu_of_sums<scalar_t>(dot[0], dot[1]);
      }
      grid.sync();

      // ---- E: y_mlp = mlp.proj u ----
      for (int i = threadIdx.x; i < I; i += blockDim.x) x[i] = __ldcg(p.u + i);
      __syncthreads();
      for (int r = gwarp, t = 0; r < h; r += n_gwarps, t++) {
        const scalar_t* rows[1] = {shared ? e_rows(j) + t * I : w[bw::MLP_PROJ] + (int64_t)r * I};
        float dot[1];
        dot_rows<scalar_t, 1>(shared, rows, x, I, dot);
        if (lane == 0) p.y_mlp[r] = round_to<scalar_t>(dot[0]);
      }
      grid.sync();

      // s = norm_4(s + y_mlp): the state after core block j, in every block
      for (int i = threadIdx.x; i < h; i += blockDim.x) s[i] = round_to<scalar_t>(s[i] + __ldcg(p.y_mlp + i));
      rmsnorm_block<scalar_t>(s, w[bw::NORM_4], norm_w(j, bw::NORM_4), s, h, eps, red);
    }
  }
  if (blockIdx.x == 0) {  // (s_out may be s_in: every block read s_in before the first barrier)
    for (int i = threadIdx.x; i < h; i += blockDim.x) p.s_out[i] = static_cast<scalar_t>(s[i]);
  }
}

// --- the launcher ----------------------------------------------------------------------------------

template <typename scalar_t>
void launch_decode_steps(const at::Tensor& s, const std::optional<at::Tensor>& e_proj,
                         const std::optional<at::Tensor>& adapter_weight,
                         at::TensorList block_weights, const at::Tensor& cos, const at::Tensor& sin,
                         at::TensorList k_cache, at::TensorList v_cache, int64_t pos, int64_t num_steps,
                         int64_t n_head, double eps, const std::optional<at::Tensor>& pos_on_device,
                         at::Tensor& out) {
  DecodeParams<scalar_t> p{};
  fill_step_args<scalar_t>(p, s, e_proj, adapter_weight, block_weights, cos, sin, k_cache[0], pos, n_head, eps,
                           pos_on_device);
  const int h = p.h, nh = p.n_head, hs = p.hs, R = p.R, I = p.I;
  const int device = s.get_device();

  // scratch: s_adapted (h, with an adapter), q (h), y_heads (nh * h), u (I), y_mlp (h)
  const int adapted = adapter_weight ? h : 0;
  at::Tensor scratch = at::empty({adapted + 2 * h + nh * h + I}, s.options().dtype(at::kFloat));
  p.s_adapted = scratch.data_ptr<float>();
  p.q = p.s_adapted + adapted;
  p.y_heads = p.q + h;
  p.u = p.y_heads + nh * h;
  p.y_mlp = p.u + I;

  auto kernel = decode_steps_kernel<scalar_t>;
  int coop = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device));
  TORCH_CHECK(coop, "decode_steps: this GPU does not support cooperative launches");
  const size_t budget = dynamic_smem_budget(kernel, device);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)budget));
  // blocks of `smem_bytes` that fit on one SM at once
  auto per_sm = [&](size_t smem_bytes) {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, smem_bytes));
    return n;
  };

  // Shared memory, piece by piece, each where it fits in what the ones before it left.
  size_t smem = sizeof(float) * decode_smem_floats(h, I, hs, (int)pos);
  TORCH_CHECK(smem <= budget, "decode_steps: h=", h, ", I=", I, ", pos=", pos, " need ", smem,
              " bytes of shared memory per block, more than this GPU's ", budget);
  const size_t norms_bytes = sizeof(float) * kNormsPerBlock * R * h;
  p.norms_in_smem = smem + norms_bytes <= 96 * 1024 && env_int("MINIRD_DECODE_NORMS_IN_SMEM", 1) != 0;
  if (p.norms_in_smem) smem += norms_bytes;
  // Phase C's keys and values, copied during phase B: where the rows are whole 16-byte copies and
  // they fit (long contexts read L2), and no block has more than one attention item (below).
  const size_t kv_smem = sizeof(float) * kv_smem_floats<scalar_t>(hs, (int)pos);
  const bool kv_fits = env_int("MINIRD_DECODE_KV_IN_SMEM", 1) != 0 && hs * sizeof(scalar_t) % 16 == 0 &&
                       smem + kv_smem <= budget;

  // The grid: every block resident at once (cooperative launch), at most one per SM (a barrier
  // waits for the slowest block; more blocks on an SM would only share its bandwidth), and no more
  // than the widest phase has warp tasks for. MINIRD_DECODE_BLOCKS forces a count, up to what fits.
  const int resident = sm_count();
  const int widest = std::max({h, 3 * h / 2, I});  // warp tasks of phases A, B, D, E
  const int fit = per_sm(smem + (kv_fits ? kv_smem : 0));
  TORCH_CHECK(fit >= 1, "decode_steps: the kernel does not fit on one SM (shared memory ", smem, " bytes)");
  const int forced = env_int("MINIRD_DECODE_BLOCKS", 0);
  const int blocks = forced > 0 ? std::min(forced, fit * resident) : std::min(resident, ceil_div(widest, kWarps));
  // Phase C: a block per (head, slice of attn.proj rows). More slices use more SMs but re-read the
  // head's keys and values once per slice: at most ~2 MB of them per phase.
  const int64_t kv_bytes = 2LL * (pos + 1) * h * (int64_t)sizeof(scalar_t);  // all heads' keys and values
  int64_t chunks = std::max(1, blocks / nh);
  chunks = std::min<int64_t>(chunks, ceil_div(h, kWarps));  // at least a row per warp
  chunks = std::max<int64_t>(1, std::min<int64_t>(chunks, (2LL << 20) / kv_bytes));
  p.attn_chunks = (int)chunks;
  const bool one_item_per_block = nh * chunks <= blocks;
  p.kv_in_smem = kv_fits && one_item_per_block;
  if (p.kv_in_smem) smem += kv_smem;

  // The weights' rows, opt-in (MINIRD_DECODE_WEIGHTS_IN_SMEM=n: at most n core blocks; 0, the
  // default: none, as it saved only 1-2% on an H100, csrc/README), as many core blocks as fit,
  // where each block has one SM (more would share its shared memory) and one attention item, and
  // every row is whole 16-byte copies.
  constexpr int kVec = 16 / sizeof(scalar_t);
  bool aligned = h % kVec == 0 && hs % kVec == 0 && I % kVec == 0 && aligned16(p.adapter);
  for (int j = 0; j < R; j++) {
    for (int k : {bw::WQKV, bw::ATTN_PROJ, bw::FC, bw::MLP_PROJ}) aligned = aligned && aligned16(p.w[j][k]);
  }
  p.weight_layers = 0;
  if (aligned && one_item_per_block && blocks <= resident) {
    const WeightSlots slots(h, I, hs, blocks * kWarps, ceil_div(h, p.attn_chunks), adapter_weight.has_value());
    const int most = std::min(R, env_int("MINIRD_DECODE_WEIGHTS_IN_SMEM", 0));
    auto fits = [&](int layers) {
      const size_t bytes = smem + sizeof(scalar_t) * slots.per_block(layers, kWarps);
      return bytes <= budget && per_sm(bytes) >= 1;
    };
    while (p.weight_layers < most && fits(p.weight_layers + 1)) p.weight_layers++;
    smem += sizeof(scalar_t) * slots.per_block(p.weight_layers, kWarps);
  }
  // (All blocks fit at once: without the weights smem is at most what `fit` was asked for; with them
  // fits() asked for the final size, and blocks <= resident.)
  if (env_int("MINIRD_DECODE_VERBOSE", 0) != 0) {  // the plan, for a reader or a test (MINIRD_DECODE_VERBOSE=1)
    std::fprintf(stderr,
                 "decode_steps: version 2, %d blocks of %d threads, %zu bytes of shared memory each, holding the "
                 "norm weights: %s, the keys and values: %s, the weights of %d of %d core blocks\n",
                 blocks, kThreads, smem, p.norms_in_smem ? "yes" : "no", p.kv_in_smem ? "yes" : "no",
                 p.weight_layers, R);
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  launch_in_parts<scalar_t>(p, s, out, k_cache, v_cache, num_steps, [&] {
    void* args[] = {&p};
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), dim3(blocks), dim3(kThreads), args,
                                               smem, stream));
  });
}

}  // namespace

at::Tensor decode_steps_cuda(const at::Tensor& s, const std::optional<at::Tensor>& e_proj,
                             const std::optional<at::Tensor>& adapter_weight,
                             at::TensorList block_weights, const at::Tensor& cos, const at::Tensor& sin,
                             at::TensorList k_cache, at::TensorList v_cache, int64_t pos, int64_t num_steps,
                             int64_t n_head, double eps, const std::optional<at::Tensor>& pos_on_device) {
  check_decode_steps_args(s, e_proj, adapter_weight, block_weights, cos, sin, k_cache, v_cache, pos, num_steps,
                          n_head, pos_on_device);
  const c10::cuda::OptionalCUDAGuard guard(s.device());
  at::Tensor out = at::empty_like(s);
  if (num_steps == 0) return out.copy_(s);
  const int version = env_int("MINIRD_DECODE_VERSION", 2);
  TORCH_CHECK(version == 2 || version == 4, "decode_steps: MINIRD_DECODE_VERSION must be 2 or 4, got ", version);
  if (version == 4) {  // the cluster kernel: opt-in, slower than this one so far (decode_cluster.cu)
    decode_steps_on_cluster(s, e_proj, adapter_weight, block_weights, cos, sin, k_cache, v_cache, pos, num_steps,
                            n_head, eps, pos_on_device, out);
    return out;
  }
  dispatch_float_or_bf16(s, [&](auto type) {
    launch_decode_steps<decltype(type)>(s, e_proj, adapter_weight, block_weights, cos, sin, k_cache, v_cache, pos,
                                        num_steps, n_head, eps, pos_on_device, out);
  });
  return out;
}

TORCH_LIBRARY_IMPL(minird, CUDA, m) { m.impl("decode_steps", &decode_steps_cuda); }

}  // namespace minird
