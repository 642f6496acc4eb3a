// qk_bias_rope: split the fused qkv projection into heads, add the learned q/k bias, rotate q and k.
//
// Eager (CausalSelfAttention.forward in minird/model.py):
//     q, k, v = Wqkv(x).split(C, dim=2); view + transpose each to (B, nh, T, hs)
//     q = apply_rope(q + qk_bias[0], cos, sin); k = apply_rope(k + qk_bias[1], cos, sin)
// apply_rope slices the even/odd lanes, does four multiplies, two adds, a stack and a flatten:
// about 20 kernels and as many (B, nh, T, hs) temporaries for q and k together. Here one pass
// reads each qkv row once and writes q, k, v already in the (B, nh, T, hs) layout that attention
// wants (contiguous, so no transpose copy later either).
//
// Reference it must match: apply_rope(x + bias, cos, sin) from minird/model.py, rotating pairs
// (x[2i], x[2i+1]) by angle i:  (x1*cos - x2*sin, x1*sin + x2*cos), rounding each product in bf16
// as eager does. Backward is the inverse rotation (rotation matrices are orthogonal):
//     grad_x1 = g1*cos + g2*sin        grad_x2 = -g1*sin + g2*cos
// written into a (B, T, 3h) grad of qkv; v's grad is just transposed back. The bias grad is the sum
// of grad_x over (B, T), which the Python backward takes from that tensor with one torch.sum.
//
// qk_bias_rope_cache is the same pass at inference with a KV cache: k and v are written straight
// into the cache buffers (B, nh, L, hs) at positions pos .. pos + T - 1 instead of into new
// tensors, so appending to the cache costs no copy (eager: KVCache.update's slice assignment).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "minird.h"

namespace minird {

// The one forward pass of both ops: q goes to q_out (B, nh, T, hs); k and v to k_out and v_out
// (B, nh, L, hs) at sequence positions pos .. pos + T - 1 (L = T, pos = 0: fresh tensors).
static void qk_bias_rope_into(const at::Tensor& qkv, const at::Tensor& qk_bias, const at::Tensor& cos,
                              const at::Tensor& sin, int64_t n_head, at::Tensor& q_out, at::Tensor& k_out,
                              at::Tensor& v_out, int64_t pos) {
  const int64_t B = qkv.size(0), T = qkv.size(1), h = qkv.size(2) / 3, hs = h / n_head, half = hs / 2;
  const int64_t L = k_out.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "qk_bias_rope_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = qkv.data_ptr<scalar_t>();
    const scalar_t* bias = qk_bias.data_ptr<scalar_t>();  // (2, nh, hs) in memory
    const scalar_t* pc = cos.data_ptr<scalar_t>();
    const scalar_t* ps = sin.data_ptr<scalar_t>();
    scalar_t* outs[3] = {q_out.data_ptr<scalar_t>(), k_out.data_ptr<scalar_t>(), v_out.data_ptr<scalar_t>()};
    at::parallel_for(0, B * T, std::max<int64_t>(1, 8192 / h), [&](int64_t begin, int64_t end) {
      for (int64_t bt = begin; bt < end; bt++) {
        const int64_t b = bt / T, t = bt % T;
        for (int64_t part = 0; part < 3; part++) {
          for (int64_t head = 0; head < n_head; head++) {
            const scalar_t* x = in + bt * 3 * h + part * h + head * hs;
            scalar_t* o = part == 0 ? outs[0] + ((b * n_head + head) * T + t) * hs        // (B, nh, T, hs)
                                    : outs[part] + ((b * n_head + head) * L + pos + t) * hs;  // (B, nh, L, hs)
            if (part == 2) {  // v: only the layout changes
              for (int64_t i = 0; i < hs; i++) o[i] = x[i];
              continue;
            }
            const scalar_t* bh = bias + (part * n_head + head) * hs;
            for (int64_t i = 0; i < half; i++) {
              const acc_t x1 = round_to<scalar_t>(acc_t(x[2 * i]) + acc_t(bh[2 * i]));
              const acc_t x2 = round_to<scalar_t>(acc_t(x[2 * i + 1]) + acc_t(bh[2 * i + 1]));
              const acc_t c = pc[t * half + i], s = ps[t * half + i];
              o[2 * i] = static_cast<scalar_t>(round_to<scalar_t>(x1 * c) - round_to<scalar_t>(x2 * s));
              o[2 * i + 1] = static_cast<scalar_t>(round_to<scalar_t>(x1 * s) + round_to<scalar_t>(x2 * c));
            }
          }
        }
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qk_bias_rope_cpu(const at::Tensor& qkv, const at::Tensor& qk_bias,
                                                                const at::Tensor& cos, const at::Tensor& sin,
                                                                int64_t n_head) {
  check_qk_bias_rope_args(qkv, qk_bias, cos, sin, n_head);
  const int64_t B = qkv.size(0), T = qkv.size(1), hs = qkv.size(2) / 3 / n_head;
  at::Tensor q = at::empty({B, n_head, T, hs}, qkv.options());
  at::Tensor k = at::empty_like(q), v = at::empty_like(q);
  qk_bias_rope_into(qkv, qk_bias, cos, sin, n_head, q, k, v, 0);
  return {q, k, v};
}

at::Tensor qk_bias_rope_cache_cpu(const at::Tensor& qkv, const at::Tensor& qk_bias, const at::Tensor& cos,
                                  const at::Tensor& sin, int64_t n_head, at::Tensor& k_cache, at::Tensor& v_cache,
                                  int64_t pos) {
  check_qk_bias_rope_args(qkv, qk_bias, cos, sin, n_head);
  check_kv_cache_args("qk_bias_rope_cache", qkv, n_head, k_cache, v_cache, pos);
  const int64_t B = qkv.size(0), T = qkv.size(1), hs = qkv.size(2) / 3 / n_head;
  at::Tensor q = at::empty({B, n_head, T, hs}, qkv.options());
  qk_bias_rope_into(qkv, qk_bias, cos, sin, n_head, q, k_cache, v_cache, pos);
  return q;
}

at::Tensor qk_bias_rope_backward_cpu(const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v,
                                     const at::Tensor& cos, const at::Tensor& sin) {
  check_qk_rope_grads(grad_q, grad_k, grad_v, cos, sin);
  const int64_t B = grad_q.size(0), n_head = grad_q.size(1), T = grad_q.size(2), hs = grad_q.size(3);
  const int64_t h = n_head * hs, half = hs / 2;
  at::Tensor grad_qkv = at::empty({B, T, 3 * h}, grad_q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_q.scalar_type(), "qk_bias_rope_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* grads[3] = {grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(),
                                grad_v.data_ptr<scalar_t>()};
    const scalar_t* pc = cos.data_ptr<scalar_t>();
    const scalar_t* ps = sin.data_ptr<scalar_t>();
    scalar_t* out = grad_qkv.data_ptr<scalar_t>();
    at::parallel_for(0, B * T, std::max<int64_t>(1, 8192 / h), [&](int64_t begin, int64_t end) {
      for (int64_t bt = begin; bt < end; bt++) {
        const int64_t b = bt / T, t = bt % T;
        for (int64_t part = 0; part < 3; part++) {
          for (int64_t head = 0; head < n_head; head++) {
            const scalar_t* g = grads[part] + ((b * n_head + head) * T + t) * hs;
            scalar_t* o = out + bt * 3 * h + part * h + head * hs;
            if (part == 2) {
              for (int64_t i = 0; i < hs; i++) o[i] = g[i];
              continue;
            }
            for (int64_t i = 0; i < half; i++) {
              const acc_t g1 = g[2 * i], g2 = g[2 * i + 1];
              const acc_t c = pc[t * half + i], s = ps[t * half + i];
              o[2 * i] = static_cast<scalar_t>(g1 * c + g2 * s);
              o[2 * i + 1] = static_cast<scalar_t>(g2 * c - g1 * s);
            }
          }
        }
      }
    });
  });
  return grad_qkv;
}

TORCH_LIBRARY_IMPL(minird, CPU, m) {
  m.impl("qk_bias_rope", &qk_bias_rope_cpu);
  m.impl("qk_bias_rope_backward", &qk_bias_rope_backward_cpu);
  m.impl("qk_bias_rope_cache", &qk_bias_rope_cache_cpu);
}

}  // namespace minird
