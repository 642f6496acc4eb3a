// qk_bias_rope on CUDA: split qkv into heads, add the q/k bias, rotate q and k; and its backward.
// What it fuses and why, and the reference to match: see csrc/rope.cpp (same op, CPU); the
// reference is CausalSelfAttention.forward / apply_rope in minird/model.py.
//
// One thread per pair (x[2i], x[2i+1]) of q, k or v: it reads the pair from the (B, T, 3h) row
// (neighbouring threads read neighbouring pairs: coalesced) and writes it to (B, nh, T, hs), or,
// for k and v in qk_bias_rope_cache, straight into the KV cache (B, nh, L, hs) at position pos + t.
#include <torch/library.h>

#include "common.cuh"

namespace minird {

constexpr int kThreads = 256;

// pair index p over (B*T, 3, nh, hs/2) -> its pieces, and where the pair lives in the two layouts
struct PairIndex {
  int64_t t, part, head, i;
  int64_t packed;  // offset of the pair's first element in the (B, T, 3h) qkv row layout
  int64_t split;   // offset of the same pair in q (B, nh, T, hs), or in k, v (B, nh, L, hs) at pos + t
  __device__ PairIndex(int64_t p, int64_t T, int64_t n_head, int64_t half, int64_t L, int64_t pos) {
    const int64_t hs = 2 * half, h = n_head * hs;
    i = p % half;
    p /= half;
    head = p % n_head;
    p /= n_head;
    part = p % 3;
    const int64_t bt = p / 3, b = bt / T;
    t = bt % T;
    packed = bt * 3 * h + part * h + head * hs + 2 * i;
    split = (part == 0 ? (b * n_head + head) * T + t : (b * n_head + head) * L + pos + t) * hs + 2 * i;
  }
};

template <typename scalar_t>
__global__ void qk_bias_rope_kernel(const scalar_t* __restrict__ qkv, const scalar_t* __restrict__ bias,
                                    const scalar_t* __restrict__ cos, const scalar_t* __restrict__ sin,
                                    scalar_t* __restrict__ q, scalar_t* __restrict__ k, scalar_t* __restrict__ v,
                                    int64_t pairs, int64_t T, int64_t n_head, int64_t half, int64_t L,
                                    int64_t pos) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t hs = 2 * half;
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < pairs; p += (int64_t)gridDim.x * blockDim.x) {
    const PairIndex ix(p, T, n_head, half, L, pos);
    const int64_t t = ix.t;
    const scalar_t* x = qkv + ix.packed;
    scalar_t* o = (ix.part == 0 ? q : ix.part == 1 ? k : v) + ix.split;
    if (ix.part == 2) {
      o[0] = x[0];
      o[1] = x[1];
      continue;
    }
    const scalar_t* bh = bias + (ix.part * n_head + ix.head) * hs + 2 * ix.i;
    const acc_t x1 = round_to<scalar_t>(acc_t(x[0]) + acc_t(bh[0]));
    const acc_t x2 = round_to<scalar_t>(acc_t(x[1]) + acc_t(bh[1]));
    const acc_t c = cos[t * half + ix.i], s = sin[t * half + ix.i];
    o[0] = static_cast<scalar_t>(round_to<scalar_t>(x1 * c) - round_to<scalar_t>(x2 * s));
    o[1] = static_cast<scalar_t>(round_to<scalar_t>(x1 * s) + round_to<scalar_t>(x2 * c));
  }
}

template <typename scalar_t>
__global__ void qk_bias_rope_backward_kernel(const scalar_t* __restrict__ gq, const scalar_t* __restrict__ gk,
                                             const scalar_t* __restrict__ gv, const scalar_t* __restrict__ cos,
                                             const scalar_t* __restrict__ sin, scalar_t* __restrict__ grad_qkv,
                                             int64_t pairs, int64_t T, int64_t n_head, int64_t half) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < pairs; p += (int64_t)gridDim.x * blockDim.x) {
    const PairIndex ix(p, T, n_head, half, T, 0);
    const int64_t t = ix.t;
    const scalar_t* g = (ix.part == 0 ? gq : ix.part == 1 ? gk : gv) + ix.split;
    scalar_t* o = grad_qkv + ix.packed;
    if (ix.part == 2) {
      o[0] = g[0];
      o[1] = g[1];
      continue;
    }
    const acc_t g1 = g[0], g2 = g[1], c = cos[t * half + ix.i], s = sin[t * half + ix.i];
    o[0] = static_cast<scalar_t>(g1 * c + g2 * s);
    o[1] = static_cast<scalar_t>(g2 * c - g1 * s);
  }
}

// Launches the forward kernel: q to q_out (B, nh, T, hs), k and v to (B, nh, L, hs) at pos + t.
static void launch_qk_bias_rope(const at::Tensor& qkv, const at::Tensor& qk_bias, const at::Tensor& cos,
                                const at::Tensor& sin, int64_t n_head, at::Tensor& q_out, at::Tensor& k_out,
                                at::Tensor& v_out, int64_t pos) {
  const int64_t B = qkv.size(0), T = qkv.size(1), h = qkv.size(2) / 3, hs = h / n_head;
  const int64_t pairs = B * T * 3 * h / 2;
  if (pairs == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "qk_bias_rope_cuda", [&] {
    qk_bias_rope_kernel<scalar_t><<<grid_for(pairs, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        qkv.data_ptr<scalar_t>(), qk_bias.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(),
        q_out.data_ptr<scalar_t>(), k_out.data_ptr<scalar_t>(), v_out.data_ptr<scalar_t>(), pairs, T, n_head,
        hs / 2, k_out.size(2), pos);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qk_bias_rope_cuda(const at::Tensor& qkv, const at::Tensor& qk_bias,
                                                                 const at::Tensor& cos, const at::Tensor& sin,
                                                                 int64_t n_head) {
  check_qk_bias_rope_args(qkv, qk_bias, cos, sin, n_head);
  const c10::cuda::OptionalCUDAGuard guard(qkv.device());
  const int64_t B = qkv.size(0), T = qkv.size(1), hs = qkv.size(2) / 3 / n_head;
  at::Tensor q = at::empty({B, n_head, T, hs}, qkv.options());
  at::Tensor k = at::empty_like(q), v = at::empty_like(q);
  launch_qk_bias_rope(qkv, qk_bias, cos, sin, n_head, q, k, v, 0);
  return {q, k, v};
}

at::Tensor qk_bias_rope_cache_cuda(const at::Tensor& qkv, const at::Tensor& qk_bias, const at::Tensor& cos,
                                   const at::Tensor& sin, int64_t n_head, at::Tensor& k_cache, at::Tensor& v_cache,
                                   int64_t pos) {
  check_qk_bias_rope_args(qkv, qk_bias, cos, sin, n_head);
  check_kv_cache_args("qk_bias_rope_cache", qkv, n_head, k_cache, v_cache, pos);
  const c10::cuda::OptionalCUDAGuard guard(qkv.device());
  const int64_t B = qkv.size(0), T = qkv.size(1), hs = qkv.size(2) / 3 / n_head;
  at::Tensor q = at::empty({B, n_head, T, hs}, qkv.options());
  launch_qk_bias_rope(qkv, qk_bias, cos, sin, n_head, q, k_cache, v_cache, pos);
  return q;
}

at::Tensor qk_bias_rope_backward_cuda(const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v,
                                      const at::Tensor& cos, const at::Tensor& sin) {
  check_qk_rope_grads(grad_q, grad_k, grad_v, cos, sin);
  const c10::cuda::OptionalCUDAGuard guard(grad_q.device());
  const int64_t B = grad_q.size(0), n_head = grad_q.size(1), T = grad_q.size(2), hs = grad_q.size(3);
  at::Tensor grad_qkv = at::empty({B, T, 3 * n_head * hs}, grad_q.options());
  const int64_t pairs = B * T * 3 * n_head * hs / 2;
  if (pairs == 0) return grad_qkv;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_q.scalar_type(), "qk_bias_rope_backward_cuda", [&] {
    qk_bias_rope_backward_kernel<scalar_t><<<grid_for(pairs, kThreads), kThreads, 0,
                                             c10::cuda::getCurrentCUDAStream()>>>(
        grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>(),
        cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(), grad_qkv.data_ptr<scalar_t>(), pairs, T, n_head,
        hs / 2);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_qkv;
}

TORCH_LIBRARY_IMPL(minird, CUDA, m) {
  m.impl("qk_bias_rope", &qk_bias_rope_cuda);
  m.impl("qk_bias_rope_backward", &qk_bias_rope_backward_cuda);
  m.impl("qk_bias_rope_cache", &qk_bias_rope_cache_cuda);
}

}  // namespace minird
