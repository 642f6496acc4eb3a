// decode_steps, version 4: the steps of one new token in ONE thread block cluster (16 blocks, or 8
// where 16 cannot be scheduled) instead of a cooperative grid of 132. The math, the phases and the
// roundings are those of version 2 (decode.cu, whose header says what a step is); the same tests
// (tests/test_decode.py) compare both with recurrent_steps in csrc/ops.cpp.
//
// OPT-IN (MINIRD_DECODE_VERSION=4): it is right on every test case and SLOWER than version 2, so
// decode_steps runs version 2 unless asked. Measured (H200, bf16, h = 256, R = 4, 16 steps from a
// CUDA graph, 2026-12-04): 65.2 us/step at pos 5 and 67.8 at pos 127, against version 2's 55.8 and
// 62.6; 60.9 / 63.3 with the weights read from L2 instead of staged; a cluster of 8: 71.5 / 73.9.
// Where it goes (tools/decode_phase_timing.py --version 4 stamps its barriers; a scratch copy with a
// stamp between the pieces of every phase said the rest): issuing a phase's copies takes 1.3-2.0
// us (24-64 KB per block: per-thread 16-byte cp.async moves only ~35 GB/s per SM, and a thread
// stalls until its copies are queued), and the phases themselves are 2-4x slower than their
// arithmetic (a norm 0.5-1 us, the fc pairs ~2 us) while those copies land. The next step is the copy engine: one cp.async.bulk per contiguous
// slice (B, D, E are one or two), completed on an mbarrier, issued by one thread.
//
// Why a cluster. Version 2 waits at 4R + 1 grid-wide barriers a step, ~1 us each even when empty
// (tools/decode_bounds.py): 16.7 us a step at R = 4 before any work. A cluster's hardware barrier
// costs 0.2 us. But 16 SMs cannot hold a step's weights (8.5 MB at h = 256, bf16) the way 132 SMs'
// caches do, so each block streams its slice of them from L2 every step (16 SMs: 4.6 us per 8.5 MB).
// Version 3 (commit 3544af2, not kept) loaded each phase's weights after its barrier and was
// slower than version 2. Here that wait is meant to leave the critical path:
//   - Weights never change, so each block copies its slice of the weights of phase k + 3 into its
//     shared memory (cp.async) at the end of phase k: two whole phases in flight before they are
//     read. A buffer per phase kind (A, B, C, D, E) holds one core block's slice (136 KB at h = 256,
//     bf16); the cycle B C D E means that buffer was last read in phase k - 1, behind the barrier.
//     Phase C's keys and values before pos are copied the same way (they do not change during a
//     launch either).
//   - Hand-overs are pushed, not pulled: a block that computes a GEMV output writes it straight into
//     the shared memory of every block that needs it (distributed shared memory), then arrives at
//     the cluster barrier; after the barrier each block reads only its own shared memory.
//   - The state s lives in registers, the same copy in every warp (lane l holds elements
//     (32 k + l) VEC .. + VEC - 1): each warp computes every norm itself (a warp shuffle sum, no block
//     barrier) and multiplies its GEMV rows by the norm's output straight from registers.
//
// Work of block `rank` (of CL): contiguous slices, so that its staged weights are contiguous rows.
//   A  rows split(h) of W_s                          -> s_adapted, pushed to every block
//   B  rotation pairs split(3h/2) of Wqkv            -> q pushed to every block; k, v written into
//                                                       the cache at pos and pushed into row pos of
//                                                       the staged copies of the blocks of that head
//   C  item `rank`: head rank % nh, slice rank / nh of attn.proj's rows (as version 2's items)
//                                                    -> y_heads, pushed to every block
//   D  y = sum of heads (the block's threads, then a block barrier), norm_2, norm_3, fc pairs split(I)
//                                                    -> u, pushed to every block
//   E  rows split(h) of mlp.proj                     -> y_mlp, pushed to every block; then every warp
//                                                       computes s = norm_4(s + y_mlp)
// The result does not depend on CL or on where the weights are read from (every dot product is one
// warp's in a fixed order); it may differ from version 2 in the last bits (its norms sum over a
// block of threads). It applies where h is 1, 2, 4 (fp32: or 8) times 32 x 16 bytes of elements
// (256, 512, 1024 in bf16) on a GPU with clusters (sm_90), and fails with the reason elsewhere.
// MINIRD_DECODE_CLUSTER=8 asks for 8 blocks, MINIRD_DECODE_WEIGHTS_IN_SMEM=0 reads the weights from
// L2: the test checks that neither changes a bit.
#include <cooperative_groups.h>

#include <algorithm>
#include <vector>

#include "decode.h"
#include "decode_parts.cuh"

namespace minird {

namespace cg = cooperative_groups;

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

template <typename scalar_t>
struct ClusterParams : StepArgs<scalar_t> {
  int chunks;           // phase C: slices of attn.proj's rows per head
  int weights_in_smem;  // each phase's weight slice copied ahead into shared memory
  int kv_in_smem;       // phase C's keys and values copied ahead into shared memory
  int norms_in_smem;    // the 4R norm weights copied into shared memory once
};
static_assert(sizeof(ClusterParams<float>) <= 4096, "decode_steps: kernel arguments over 4 KB");

// [begin, end) of n items for block rank of cl: contiguous, sizes differ by at most one
__host__ __device__ inline int split_begin(int n, int rank, int cl) { return (int)((int64_t)n * rank / cl); }

// Everything the kernel and the launcher must agree on: the slices and the shared-memory layout.
template <typename scalar_t>
struct ClusterLayout {
  int a_rows, b_pairs, c_rows, d_pairs, e_rows;  // the most of each phase's work any block has
  // offsets in floats into the dynamic shared memory
  int s_adapted, q, y_heads, y_sum, u, y_mlp, att, part, prob, norms, kv, weights;
  int wa, wb, wc, wd, we;  // offsets in elements of scalar_t from `weights`, one buffer per phase kind
  int floats;              // the whole, in floats

  __host__ __device__ ClusterLayout(int h, int I, int nh, int hs, int R, int pos_bound, int cl, int chunks,
                                    bool norms_in_smem, bool kv_in_smem, bool weights_in_smem) {
    a_rows = ceil_div(h, cl);
    b_pairs = ceil_div(3 * h / 2, cl);
    c_rows = ceil_div(h, chunks);
    d_pairs = ceil_div(I, cl);
    e_rows = ceil_div(h, cl);
    int at = 0;
    auto take = [&](int n) { const int off = at; at += round4(n); return off; };
    s_adapted = take(h);
    q = take(h);
    y_heads = take(nh * h);
    y_sum = take(h);
    u = take(I);
    y_mlp = take(h);
    att = take(hs);
    part = take(std::max(2 * kThreads, hs));
    prob = take(pos_bound + 1);
    norms = take(norms_in_smem ? kNormsPerBlock * R * h : 0);
    kv = take(kv_in_smem ? kv_smem_floats<scalar_t>(hs, pos_bound) : 0);
    weights = at;
    int el = 0;  // each buffer 16-byte aligned
    constexpr int kVec = 16 / sizeof(scalar_t);
    auto take_el = [&](int n) { const int off = el; el += ceil_div(n, kVec) * kVec; return off; };
    wa = take_el(weights_in_smem ? a_rows * h : 0);
    wb = take_el(weights_in_smem ? 2 * b_pairs * h : 0);
    wc = take_el(weights_in_smem ? c_rows * hs : 0);
    wd = take_el(weights_in_smem ? 2 * d_pairs * h : 0);
    we = take_el(weights_in_smem ? e_rows * I : 0);
    floats = weights + el * (int)sizeof(scalar_t) / (int)sizeof(float);
  }
};

// --- the cluster's barrier and cp.async groups ---------------------------------------------------

// barrier.cluster with release/acquire: every write of the cluster's threads before the arrive
// (to their own or a remote block's shared memory, or to global memory) is seen after the wait.
__device__ inline void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory"); }
__device__ inline void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory"); }
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ inline void cp_async_wait_group() {  // all but this thread's N most recent groups landed
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// --- a lane's share of an h-vector: elements (32 k + lane) VEC + e, k < h / (32 VEC) --------------

// kChunks = h / (32 VEC) is a template parameter, so that the lane's share is an array of registers
template <typename scalar_t, int kChunks>
struct Lane {
  static constexpr int VEC = 16 / sizeof(scalar_t);
  static constexpr int N = kChunks * VEC;  // floats per lane
  __device__ static int index(int k, int e) { return (k * 32 + (int)threadIdx.x % 32) * VEC + e; }
};

// v = buf[the lane's elements] (buf: floats in shared memory)
template <typename scalar_t, int kChunks>
__device__ inline void lane_load(const float* buf, float (&v)[Lane<scalar_t, kChunks>::N]) {
  using LN = Lane<scalar_t, kChunks>;
#pragma unroll
  for (int k = 0; k < kChunks; k++) {
#pragma unroll
    for (int e = 0; e < LN::VEC; e += 4) {
      *reinterpret_cast<float4*>(v + k * LN::VEC + e) = *reinterpret_cast<const float4*>(buf + LN::index(k, e));
    }
  }
}

// out = rmsnorm(v) * w, as rmsnorm_block in version 2 (out may be v), within one warp: every lane
// ends with the same sum (a butterfly of commutative adds), so every warp and block the same bits.
template <typename scalar_t, int kChunks>
__device__ inline void lane_rmsnorm(const float (&v)[Lane<scalar_t, kChunks>::N], float (&out)[Lane<scalar_t, kChunks>::N],
                                    const scalar_t* w, const float* w_shared, int h, float eps) {
  using LN = Lane<scalar_t, kChunks>;
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < LN::N; i++) ss = fmaf(v[i], v[i], ss);
  const float r = 1.f / sqrtf(warp_sum(ss) / h + eps);
#pragma unroll
  for (int k = 0; k < kChunks; k++) {
#pragma unroll
    for (int e = 0; e < LN::VEC; e++) {
      const int i = LN::index(k, e);
      const float wi = w_shared != nullptr ? w_shared[i] : load_weight(w + i);
      out[k * LN::VEC + e] = round_to<scalar_t>(round_to<scalar_t>(v[k * LN::VEC + e] * r) * wi);
    }
  }
}

// out[r] = rows[r] . x for NR rows of h weights (in shared or global memory), x the lane's share in
// registers; the result in every lane.
template <typename scalar_t, int kChunks, int NR>
__device__ inline void lane_dot(const scalar_t* const (&rows)[NR], const float (&x)[Lane<scalar_t, kChunks>::N],
                                float (&out)[NR]) {
  using LN = Lane<scalar_t, kChunks>;
  float acc[NR];
#pragma unroll
  for (int r = 0; r < NR; r++) acc[r] = 0.f;
#pragma unroll
  for (int k = 0; k < kChunks; k++) {
#pragma unroll
    for (int r = 0; r < NR; r++) {
      float wv[LN::VEC];
      load_weights16<scalar_t, true>(rows[r] + LN::index(k, 0), wv);
#pragma unroll
      for (int e = 0; e < LN::VEC; e++) acc[r] = fmaf(wv[e], x[k * LN::VEC + e], acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < NR; r++) out[r] = warp_sum(acc[r]);
}

// v, known to every lane, into buf[i] of every block of the cluster (lane b writes block b's)
__device__ inline void push_to_all(cg::cluster_group& cluster, float* buf, int i, float v, int cl) {
  const int lane = threadIdx.x % 32;
  if (lane < cl) *cluster.map_shared_rank(buf + i, lane) = v;
}

// --- the kernel ------------------------------------------------------------------------------------

enum Phase { A, B, C, D, E };

template <typename scalar_t, int kChunks>
__global__ void __launch_bounds__(kThreads) decode_cluster_kernel(const __grid_constant__ ClusterParams<scalar_t> p) {
  cg::cluster_group cluster = cg::this_cluster();
  const int cl = (int)cluster.num_blocks(), rank = (int)cluster.block_rank();
  const int h = p.h, I = p.I, hs = p.hs, nh = p.n_head, L = p.L, R = p.R;
  const int pos = p.pos_on_device ? min(max((int)*p.pos_on_device, 0), p.pos) : p.pos;
  const float eps = p.eps;
  const ClusterLayout<scalar_t> lay(h, I, nh, hs, R, p.pos, cl, p.chunks, p.norms_in_smem, p.kv_in_smem,
                                    p.weights_in_smem);
  extern __shared__ float4 smem4[];
  __shared__ float red[32];
  float* smem = reinterpret_cast<float*>(smem4);
  float* s_adapted = smem + lay.s_adapted;
  float* qbuf = smem + lay.q;
  float* y_heads = smem + lay.y_heads;
  float* y_sum = smem + lay.y_sum;
  float* ubuf = smem + lay.u;
  float* y_mlp = smem + lay.y_mlp;
  float* norms = smem + lay.norms;
  const int kv_stride = kv_row_stride<scalar_t>(hs);
  scalar_t* kv_rows[2] = {reinterpret_cast<scalar_t*>(smem + lay.kv), nullptr};
  kv_rows[1] = kv_rows[0] + (p.pos + 1) * kv_stride;
  scalar_t* wbuf = reinterpret_cast<scalar_t*>(smem + lay.weights);
  scalar_t *Wa = wbuf + lay.wa, *Wb = wbuf + lay.wb, *Wc = wbuf + lay.wc, *Wd = wbuf + lay.wd, *We = wbuf + lay.we;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  using LN = Lane<scalar_t, kChunks>;

  // this block's slices
  const int a0 = split_begin(h, rank, cl), a1 = split_begin(h, rank + 1, cl);
  const int b0 = split_begin(3 * h / 2, rank, cl), b1 = split_begin(3 * h / 2, rank + 1, cl);
  const int d0 = split_begin(I, rank, cl), d1 = split_begin(I, rank + 1, cl);
  const int e0 = a0, e1 = a1;
  const int items = nh * p.chunks;  // phase C: (head, slice of attn.proj rows); one per block when staged
  const bool has_item = rank < items, one_item = items <= cl;  // (staging needs one item per block)
  const int my_head = rank % nh, my_chunk = rank / nh;
  const int c0 = min(h, my_chunk * lay.c_rows), c1 = min(h, c0 + lay.c_rows);

  const bool adapter = p.adapter != nullptr;
  const int phases_per_step = (adapter ? 1 : 0) + 4 * R;
  const int total_phases = phases_per_step * p.num_steps;
  auto kind_of = [&](int k, int& step, int& j) {  // global phase index -> kind, its step and core block
    step = k / phases_per_step;
    int r = k % phases_per_step;
    if (adapter) {
      if (r == 0) {
        j = 0;
        return A;
      }
      r--;
    }
    j = r / 4;
    return (Phase)(B + r % 4);
  };
  // The copies for phase k into its kind's buffer, as one cp.async group of this thread (empty if
  // there is nothing to copy, so that the groups stay one per phase).
  auto issue_copies = [&](int k) {
    if (k < total_phases) {
      int step, j;
      const Phase kind = kind_of(k, step, j);
      const scalar_t* const* w = p.w[j];
      // a buffer that holds the same weights as last time is not copied again
      const bool copy_weights = p.weights_in_smem && (step == 0 || (kind != A && R > 1));
      if (kind == A && copy_weights) {
        copy_rows_async(Wa, h, p.adapter + (int64_t)a0 * 2 * h, 2 * h, a1 - a0, h, threadIdx.x, blockDim.x);
      } else if (kind == B && copy_weights) {
        copy_rows_async(Wb, h, w[bw::WQKV] + (int64_t)2 * b0 * h, h, 2 * (b1 - b0), h, threadIdx.x, blockDim.x);
      } else if (kind == C) {
        if (copy_weights && one_item && has_item) {
          copy_rows_async(Wc, hs, w[bw::ATTN_PROJ] + (int64_t)c0 * h + my_head * hs, h, c1 - c0, hs, threadIdx.x,
                          blockDim.x);
        }
        // rows 0 .. pos - 1 (row pos is pushed in phase B); kv_in_smem means one item per block
        if (p.kv_in_smem && has_item && pos > 0) {
          const int e = step * R + j;
          for (int which = 0; which < 2; which++) {
            const scalar_t* src = (which == 0 ? p.k_cache[e] : p.v_cache[e]) + (int64_t)my_head * L * hs;
            copy_rows_async(kv_rows[which], kv_stride, src, hs, pos, hs, threadIdx.x, blockDim.x);
          }
        }
      } else if (kind == D && copy_weights) {
        copy_rows_async(Wd, h, w[bw::FC] + (int64_t)d0 * h, h, d1 - d0, h, threadIdx.x, blockDim.x);
        copy_rows_async(Wd + (d1 - d0) * h, h, w[bw::FC] + (int64_t)(I + d0) * h, h, d1 - d0, h, threadIdx.x,
                        blockDim.x);
      } else if (kind == E && copy_weights) {
        copy_rows_async(We, I, w[bw::MLP_PROJ] + (int64_t)e0 * I, I, e1 - e0, I, threadIdx.x, blockDim.x);
      }
    }
    cp_async_commit();
  };
  // The end of phase k: this thread's copies for phase k + 1 have landed (issued at the end of
  // phase k - 2; only the group for k + 2 may still be in flight), the barrier, and behind it the
  // copies for phase k + 3, whose buffer was last read in phase k - 1.
  auto end_phase = [&](int k) {
    cp_async_wait_group<1>();
    cluster_arrive();
    issue_copies(k + 3);
    cluster_wait();
  };

  float s[LN::N], x[LN::N];  // the state, and the input of the current GEMV (the lane's share)
#pragma unroll
  for (int k = 0; k < kChunks; k++) {
#pragma unroll
    for (int e = 0; e < LN::VEC; e++) s[k * LN::VEC + e] = static_cast<float>(p.s_in[LN::index(k, e)]);
  }
  if (p.norms_in_smem) {
    for (int j = 0; j < R; j++) {
      for (int which : {bw::NORM_1, bw::NORM_2, bw::NORM_3, bw::NORM_4}) {
        float* dst = norms + (j * kNormsPerBlock + norm_slot(which)) * h;
        for (int i = threadIdx.x; i < h; i += blockDim.x) dst[i] = load_weight(p.w[j][which] + i);
      }
    }
  }
  auto norm_w = [&](int j, int which) {
    return p.norms_in_smem ? norms + (j * kNormsPerBlock + norm_slot(which)) * h : nullptr;
  };
  for (int k = 0; k < 3; k++) issue_copies(k);
  cp_async_wait_group<2>();  // phase 0's copies
  // every block has started (its shared memory may be written by the others) and sees its copies
  cluster_arrive();
  cluster_wait();

  int k = 0;  // the global phase index
  for (int step = 0; step < p.num_steps; step++) {
    // ---- A: s_adapted = W_s s + e_proj, rows a0 .. a1 ----
    if (adapter) {
      for (int r = a0 + warp; r < a1; r += kWarps) {
        const float e = load_weight(p.e_proj + r);
        const scalar_t* rows[1] = {p.weights_in_smem ? Wa + (r - a0) * h : p.adapter + (int64_t)r * 2 * h};
        float dot[1];
        lane_dot<scalar_t, kChunks, 1>(rows, s, dot);
        push_to_all(cluster, s_adapted, r, round_to<scalar_t>(dot[0] + e), cl);
      }
      end_phase(k++);
      lane_load<scalar_t, kChunks>(s_adapted, s);
    }

    for (int j = 0; j < R; j++) {
      const scalar_t* const* w = p.w[j];
      scalar_t* k_cache = p.k_cache[step * R + j];
      scalar_t* v_cache = p.v_cache[step * R + j];

      // ---- B: x = norm_1(s); qkv pairs b0 .. b1: bias + RoPE; q pushed, k and v to the cache ----
      lane_rmsnorm<scalar_t, kChunks>(s, x, w[bw::NORM_1], norm_w(j, bw::NORM_1), h, eps);
      constexpr int kPairsB = 2;  // pairs per warp at once (their loads interleave)
      for (int base = b0 + warp; base < b1; base += kPairsB * kWarps) {
        const scalar_t* rows[2 * kPairsB];
#pragma unroll
        for (int m = 0; m < kPairsB; m++) {  // (past b1: repeat the last pair, and drop its result)
          const int pair = min(base + m * kWarps, b1 - 1);
          for (int half = 0; half < 2; half++) {
            const int row = 2 * pair + half;
            rows[2 * m + half] = p.weights_in_smem ? Wb + (row - 2 * b0) * h : w[bw::WQKV] + (int64_t)row * h;
          }
        }
        float dot[2 * kPairsB];
        lane_dot<scalar_t, kChunks, 2 * kPairsB>(rows, x, dot);
#pragma unroll
        for (int m = 0; m < kPairsB; m++) {
          const int pair = base + m * kWarps;
          if (pair >= b1) break;
          const int row = 2 * pair;  // rows (row, row + 1): one rotation pair
          const int part = row / h, c = row % h, head = c / hs, d = c % hs;  // part 0, 1, 2 = q, k, v
          float a = round_to<scalar_t>(dot[2 * m]), b = round_to<scalar_t>(dot[2 * m + 1]);
          if (part < 2) {  // q, k: + qk_bias[part], then rotate (as version 2)
            const float cs = load_weight(p.cos + d / 2), sn = load_weight(p.sin + d / 2);
            a = round_to<scalar_t>(a + load_weight(w[bw::QK_BIAS] + row));
            b = round_to<scalar_t>(b + load_weight(w[bw::QK_BIAS] + row + 1));
            const float a_rot = round_to<scalar_t>(round_to<scalar_t>(a * cs) - round_to<scalar_t>(b * sn));
            const float b_rot = round_to<scalar_t>(round_to<scalar_t>(a * sn) + round_to<scalar_t>(b * cs));
            a = a_rot;
            b = b_rot;
          }
          if (part == 0) {
            push_to_all(cluster, qbuf, c, a, cl);
            push_to_all(cluster, qbuf, c + 1, b, cl);
          } else {
            scalar_t* cache = part == 1 ? k_cache : v_cache;
            if (lane == 0) {
              scalar_t* dst = cache + ((int64_t)head * L + pos) * hs + d;
              dst[0] = static_cast<scalar_t>(a);
              dst[1] = static_cast<scalar_t>(b);
            }
            // into row pos of the staged copy of each block whose item has this head
            if (p.kv_in_smem && lane < p.chunks) {
              scalar_t* dst = cluster.map_shared_rank(kv_rows[part - 1], head + nh * lane) + pos * kv_stride + d;
              dst[0] = static_cast<scalar_t>(a);
              dst[1] = static_cast<scalar_t>(b);
            }
          }
        }
      }
      end_phase(k++);

      // ---- C: the item's head attention, times its slice of attn.proj's rows ----
      for (int item = rank; item < items; item += cl) {
        const int head = item % nh, chunk = item / nh;
        const int r0 = min(h, chunk * lay.c_rows), r1 = min(h, r0 + lay.c_rows);
        __syncthreads();  // the previous item's readers of prob, part, att are done
        float* att = smem + lay.att;
        if (p.kv_in_smem) {
          head_attention<scalar_t, true>(kv_rows[0], kv_rows[1], kv_stride, qbuf + head * hs, hs, pos, p.attn_scale,
                                         smem + lay.prob, smem + lay.part, att, red);
        } else {
          head_attention<scalar_t, false>(k_cache + (int64_t)head * L * hs, v_cache + (int64_t)head * L * hs, hs,
                                          qbuf + head * hs, hs, pos, p.attn_scale, smem + lay.prob, smem + lay.part,
                                          att, red);
        }
        const bool staged = p.weights_in_smem && one_item;
        for (int r = r0 + warp; r < r1; r += 4 * kWarps) {
          const scalar_t* rows[4];
#pragma unroll
          for (int m = 0; m < 4; m++) {  // (past r1: repeat the last row, and drop its result)
            const int row = min(r + m * kWarps, r1 - 1);
            rows[m] = staged ? Wc + (row - r0) * hs : w[bw::ATTN_PROJ] + (int64_t)row * h + head * hs;
          }
          float dot[4];
          warp_dot<scalar_t, 4, true>(rows, att, hs, dot);
#pragma unroll
          for (int m = 0; m < 4; m++) {
            if (r + m * kWarps < r1) push_to_all(cluster, y_heads, head * h + r + m * kWarps, dot[m], cl);
          }
        }
      }
      end_phase(k++);

      // ---- D: s = norm_2(s + attn.proj y); x = norm_3(s); u = silu(gate) * up, pairs d0 .. d1 ----
      for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float y = 0.f;
        for (int head = 0; head < nh; head++) y += y_heads[head * h + i];
        y_sum[i] = round_to<scalar_t>(y);  // attn.proj's output, as stored
      }
      __syncthreads();
      {
        float y[LN::N];
        lane_load<scalar_t, kChunks>(y_sum, y);
#pragma unroll
        for (int i = 0; i < LN::N; i++) s[i] = round_to<scalar_t>(s[i] + y[i]);
      }
      lane_rmsnorm<scalar_t, kChunks>(s, s, w[bw::NORM_2], norm_w(j, bw::NORM_2), h, eps);
      lane_rmsnorm<scalar_t, kChunks>(s, x, w[bw::NORM_3], norm_w(j, bw::NORM_3), h, eps);
      constexpr int kPairsD = 4;
      for (int base = d0 + warp; base < d1; base += kPairsD * kWarps) {
        const scalar_t* rows[2 * kPairsD];
#pragma unroll
        for (int m = 0; m < kPairsD; m++) {
          const int i = min(base + m * kWarps, d1 - 1);
          rows[2 * m] = p.weights_in_smem ? Wd + (i - d0) * h : w[bw::FC] + (int64_t)i * h;
          rows[2 * m + 1] = p.weights_in_smem ? Wd + (d1 - d0 + i - d0) * h : w[bw::FC] + (int64_t)(I + i) * h;
        }
        float dot[2 * kPairsD];
        lane_dot<scalar_t, kChunks, 2 * kPairsD>(rows, x, dot);
#pragma unroll
        for (int m = 0; m < kPairsD; m++) {
          const int i = base + m * kWarps;
          if (i >= d1) break;
          push_to_all(cluster, ubuf, i, swiglu_of_sums<scalar_t>(dot[2 * m], dot[2 * m + 1]), cl);
        }
      }
      end_phase(k++);

      // ---- E: y_mlp = mlp.proj u, rows e0 .. e1 ----
      for (int r = e0 + warp; r < e1; r += kWarps) {
        const scalar_t* rows[1] = {p.weights_in_smem ? We + (r - e0) * I : w[bw::MLP_PROJ] + (int64_t)r * I};
        float dot[1];
        warp_dot<scalar_t, 1, true>(rows, ubuf, I, dot);
        push_to_all(cluster, y_mlp, r, round_to<scalar_t>(dot[0]), cl);
      }
      end_phase(k++);
      {  // s = norm_4(s + y_mlp): the state after core block j, in every warp
        float y[LN::N];
        lane_load<scalar_t, kChunks>(y_mlp, y);
#pragma unroll
        for (int i = 0; i < LN::N; i++) s[i] = round_to<scalar_t>(s[i] + y[i]);
      }
      lane_rmsnorm<scalar_t, kChunks>(s, s, w[bw::NORM_4], norm_w(j, bw::NORM_4), h, eps);
    }
  }
  cp_async_wait_group<0>();
  if (rank == 0 && warp == 0) {  // (s_out may be s_in: every block read s_in before the first barrier)
#pragma unroll
    for (int k = 0; k < kChunks; k++) {
#pragma unroll
      for (int e = 0; e < LN::VEC; e++) p.s_out[LN::index(k, e)] = static_cast<scalar_t>(s[k * LN::VEC + e]);
    }
  }
}

// --- the launcher ------------------------------------------------------------------------------------

template <typename scalar_t>
using ClusterKernel = void (*)(const ClusterParams<scalar_t>);

// The kernel for h = 32 x 16 bytes x chunks elements, or nullptr
template <typename scalar_t>
ClusterKernel<scalar_t> cluster_kernel_for(int chunks) {
  switch (chunks) {
    case 1: return decode_cluster_kernel<scalar_t, 1>;
    case 2: return decode_cluster_kernel<scalar_t, 2>;
    case 4: return decode_cluster_kernel<scalar_t, 4>;
    case 8: if constexpr (std::is_same_v<scalar_t, float>) return decode_cluster_kernel<scalar_t, 8>;  // h = 1024
  }
  return nullptr;
}

// Why version 4 does not apply to this call, or nullptr.
template <typename scalar_t>
const char* cluster_refusal(int device, int h, int I, int hs) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major < 9) return "thread block clusters need compute capability 9.0 or later";
  if (h % (32 * kVec) != 0 || cluster_kernel_for<scalar_t>(h / (32 * kVec)) == nullptr) {
    return "h must be 1, 2, 4 (or in fp32 8) times 32 x 16 bytes of elements: 256, 512, 1024 in bf16";
  }
  if (I % kVec != 0 || hs % kVec != 0) return "I and the head size must be multiples of 16 bytes of elements";
  return nullptr;
}

template <typename scalar_t>
void launch_decode_cluster(const at::Tensor& s, const std::optional<at::Tensor>& e_proj,
                           const std::optional<at::Tensor>& adapter_weight, at::TensorList block_weights,
                           const at::Tensor& cos, const at::Tensor& sin, at::TensorList k_cache,
                           at::TensorList v_cache, int64_t pos, int64_t num_steps, int64_t n_head, double eps,
                           const std::optional<at::Tensor>& pos_on_device, at::Tensor& out) {
  const int asked = env_int("MINIRD_DECODE_CLUSTER", 16);
  TORCH_CHECK(asked == 8 || asked == 16, "decode_steps: MINIRD_DECODE_CLUSTER must be 8 or 16, got ", asked);
  ClusterParams<scalar_t> p{};
  fill_step_args<scalar_t>(p, s, e_proj, adapter_weight, block_weights, cos, sin, k_cache[0], pos, n_head, eps,
                           pos_on_device);
  const int h = p.h, nh = p.n_head, hs = p.hs, R = p.R, I = p.I;
  const int device = s.get_device();
  const char* why = cluster_refusal<scalar_t>(device, h, I, hs);
  TORCH_CHECK(why == nullptr, "decode_steps: MINIRD_DECODE_VERSION=4 does not apply: ", why);
  const ClusterKernel<scalar_t> kernel = cluster_kernel_for<scalar_t>(h / (32 * (16 / (int)sizeof(scalar_t))));
  const size_t budget = dynamic_smem_budget(kernel, device);
  const bool want_weights = env_int("MINIRD_DECODE_WEIGHTS_IN_SMEM", 1) != 0;

  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  cudaLaunchConfig_t config = {};
  config.blockDim = dim3(kThreads);
  config.stream = c10::cuda::getCurrentCUDAStream();
  config.attrs = attr;
  config.numAttrs = 1;
  // The cluster: 16 blocks where the GPU schedules them (a non-portable size), else 8. What goes
  // into shared memory, in order of what it saves: each phase's weights (an L2 round trip and 16
  // SMs' bandwidth per phase), phase C's keys and values (a round trip), the norm weights.
  int cl = 0, chunks = 0;
  bool weights = false, kv = false, norms = false;
  why = "no cluster of 8 or 16 blocks fits on this GPU";
  for (int candidate : asked == 16 ? std::vector<int>{16, 8} : std::vector<int>{8}) {
    const int c = std::max(1, candidate / nh);
    const bool one_item = nh * c <= candidate;
    auto bytes = [&](bool n, bool k, bool w) {
      return sizeof(float) * (size_t)ClusterLayout<scalar_t>(h, I, nh, hs, R, (int)pos, candidate, c, n, k, w).floats;
    };
    const bool w = want_weights && bytes(false, false, true) <= budget;
    const bool k = one_item && bytes(false, true, w) <= budget;
    const bool n = bytes(true, k, w) <= budget;
    const size_t smem = bytes(n, k, w);
    if (smem > budget) {
      why = "the position needs more shared memory per block than this GPU has";
      continue;
    }
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    config.gridDim = dim3(candidate);
    config.dynamicSmemBytes = smem;
    attr[0].val.clusterDim.x = candidate;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    int clusters = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &config));
    if (clusters >= 1) {
      cl = candidate, chunks = c, weights = w, kv = k, norms = n;
      break;
    }
  }
  TORCH_CHECK(cl > 0, "decode_steps: MINIRD_DECODE_VERSION=4 does not apply at pos=", pos, ": ", why);

  p.chunks = chunks;
  p.weights_in_smem = weights, p.kv_in_smem = kv, p.norms_in_smem = norms;
  launch_in_parts<scalar_t>(p, s, out, k_cache, v_cache, num_steps,
                            [&] { C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p)); });
}

}  // namespace

void decode_steps_on_cluster(const at::Tensor& s, const std::optional<at::Tensor>& e_proj,
                             const std::optional<at::Tensor>& adapter_weight, at::TensorList block_weights,
                             const at::Tensor& cos, const at::Tensor& sin, at::TensorList k_cache,
                             at::TensorList v_cache, int64_t pos, int64_t num_steps, int64_t n_head, double eps,
                             const std::optional<at::Tensor>& pos_on_device, at::Tensor& out) {
  dispatch_float_or_bf16(s, [&](auto type) {
    launch_decode_cluster<decltype(type)>(s, e_proj, adapter_weight, block_weights, cos, sin, k_cache, v_cache, pos,
                                          num_steps, n_head, eps, pos_on_device, out);
  });
}

}  // namespace minird
