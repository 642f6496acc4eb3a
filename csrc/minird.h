// Shared by the CPU (csrc/*.cpp) and CUDA (csrc/cuda/*.cu) implementations of the minird ops:
// the argument checks (so a bad call fails with the same message on every device) and the
// rounding helper that lets a fused kernel round where the eager reference rounds.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

namespace minird {

// The eager reference (minird/model.py) computes e.g. `x + y` in the tensor's dtype, so in bf16
// the sum is rounded before the norm reads it. A fused kernel keeps values in float ("opmath")
// and calls round_to<scalar_t> at exactly the points where eager would have stored a tensor.
// For float and double it is the identity.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t round_to(acc_t v) {
  return static_cast<acc_t>(static_cast<scalar_t>(v));
}

// --- argument checks: each names the op, the argument and what was expected ---------------

inline void check_like(const at::Tensor& t, const char* op, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(), " like x, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have dtype ",
              ref.scalar_type(), " like x, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_shape(const at::Tensor& t, const char* op, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
}

inline void check_floating(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": ", name,
              " must be a floating tensor (float64/32/16, bfloat16), got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": ", name, " must have a non-empty last dimension, got shape ",
              x.sizes());
}

// add_rmsnorm / add_rmsnorm_backward take the same optional pieces; one check for both.
inline void check_add_rmsnorm_args(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& y,
                                   const at::Tensor& weight, const c10::optional<at::Tensor>& weight_next) {
  check_floating(x, op, "x");
  const int64_t h = x.size(-1);
  if (y.has_value()) {
    check_like(*y, op, "y", x);
    check_shape(*y, op, "y", x.sizes());
  }
  check_like(weight, op, "weight", x);
  check_shape(weight, op, "weight", {h});
  if (weight_next.has_value()) {
    check_like(*weight_next, op, "weight_next", x);
    check_shape(*weight_next, op, "weight_next", {h});
  }
}

// The backward takes the forward's arguments plus the gradients of its one or two outputs.
inline void check_add_rmsnorm_backward_args(const char* op, const at::Tensor& grad_out,
                                            const c10::optional<at::Tensor>& grad_next, const at::Tensor& x,
                                            const c10::optional<at::Tensor>& y, const at::Tensor& weight,
                                            const c10::optional<at::Tensor>& weight_next) {
  check_add_rmsnorm_args(op, x, y, weight, weight_next);
  check_like(grad_out, op, "grad_out", x);
  check_shape(grad_out, op, "grad_out", x.sizes());
  TORCH_CHECK(grad_next.has_value() == weight_next.has_value(), op,
              ": grad_next must be given exactly when weight_next is");
  if (grad_next) {
    check_like(*grad_next, op, "grad_next", x);
    check_shape(*grad_next, op, "grad_next", x.sizes());
  }
}

// qkv (B, T, 3h) -> q, k, v (B, nh, T, hs); qk_bias (2, 1, nh, 1, hs); cos, sin (T, hs/2).
inline void check_rope_tables(const char* op, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                              int64_t T, int64_t head_dim) {
  check_like(cos, op, "cos", x);
  check_shape(cos, op, "cos", {T, head_dim / 2});
  check_like(sin, op, "sin", x);
  check_shape(sin, op, "sin", {T, head_dim / 2});
}

inline void check_qk_bias_rope_args(const at::Tensor& qkv, const at::Tensor& qk_bias, const at::Tensor& cos,
                                    const at::Tensor& sin, int64_t n_head) {
  const char* op = "qk_bias_rope";
  check_floating(qkv, op, "qkv");
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(2) % 3 == 0, op, ": qkv must have shape (B, T, 3*h), got ",
              qkv.sizes());
  const int64_t h = qkv.size(2) / 3;
  TORCH_CHECK(n_head > 0 && h % n_head == 0 && (h / n_head) % 2 == 0, op, ": n_head=", n_head,
              " must divide h=", h, " into heads of even size");
  const int64_t hs = h / n_head;
  check_like(qk_bias, op, "qk_bias", qkv);
  check_shape(qk_bias, op, "qk_bias", {2, 1, n_head, 1, hs});
  check_rope_tables(op, qkv, cos, sin, qkv.size(1), hs);
}

// A KV cache pair (B, nh, L, hs) that T new tokens are written into at positions pos .. pos + T - 1.
inline void check_kv_cache_args(const char* op, const at::Tensor& qkv, int64_t n_head, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, int64_t pos) {
  const int64_t B = qkv.size(0), T = qkv.size(1), hs = qkv.size(2) / 3 / n_head;
  check_like(k_cache, op, "k_cache", qkv);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == B && k_cache.size(1) == n_head && k_cache.size(3) == hs, op,
              ": k_cache must have shape (B, nh, L, hs) = (", B, ", ", n_head, ", L, ", hs, "), got ",
              k_cache.sizes());
  check_like(v_cache, op, "v_cache", qkv);
  check_shape(v_cache, op, "v_cache", k_cache.sizes());
  TORCH_CHECK(pos >= 0 && pos + T <= k_cache.size(2), op, ": positions pos .. pos + T - 1 = ", pos, " .. ",
              pos + T - 1, " must lie in the cache's length L = ", k_cache.size(2));
}

inline void check_qk_rope_grads(const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v,
                                const at::Tensor& cos, const at::Tensor& sin) {
  const char* op = "qk_bias_rope_backward";
  check_floating(grad_q, op, "grad_q");
  TORCH_CHECK(grad_q.dim() == 4, op, ": grad_q must have shape (B, nh, T, hs), got ", grad_q.sizes());
  check_like(grad_k, op, "grad_k", grad_q);
  check_shape(grad_k, op, "grad_k", grad_q.sizes());
  check_like(grad_v, op, "grad_v", grad_q);
  check_shape(grad_v, op, "grad_v", grad_q.sizes());
  check_rope_tables(op, grad_q, cos, sin, grad_q.size(2), grad_q.size(3));
}

inline void check_swiglu_args(const char* op, const at::Tensor& gate_up, const at::Tensor* grad) {
  check_floating(gate_up, op, "gate_up");
  TORCH_CHECK(gate_up.size(-1) % 2 == 0, op, ": gate_up must have shape (..., 2*I), got ", gate_up.sizes());
  if (grad != nullptr) {
    auto expected = gate_up.sizes().vec();
    expected.back() /= 2;
    check_like(*grad, op, "grad", gate_up);
    check_shape(*grad, op, "grad", expected);
  }
}

}  // namespace minird
