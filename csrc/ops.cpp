// The minird ops: their schemas (the contract every backend implements), and the two ops that are
// compositions of other ops and so are written once for every device -- the adapter and the
// whole recurrent step. Kernels live beside this file: rmsnorm.cpp, swiglu.cpp, rope.cpp (CPU) and
// cuda/*.cu (CUDA). The Python side (fake tensors for torch.compile, autograd) is minird/ops.py.
//
// The reference for the whole step is RecurrentDepthLM.core_step / iterate in minird/model.py:
//     s = adapter(cat[s, e]);  for each core block: sandwich block       (repeated num_steps times)
// Two ideas make this faster than eager beyond the fused kernels:
//  * W [s; e] = W_s s + W_e e, and W_e e does not change across steps, so the caller computes
//    e_proj = W_e e once per forward and each step is one GEMM whose epilogue adds e_proj
//    (at::addmm with beta = 1) instead of a cat, a GEMM twice as wide, and the cat's copy.
//  * recurrent_steps runs all num_steps steps in one C++ call: Python is not in the loop, and
//    each step is ~11 dispatcher calls per block instead of ~40 Python-level ops.
#include <Python.h>
#include <torch/library.h>

#include "minird.h"

extern "C" {
// `import minird._C` loads this library, which runs the TORCH_LIBRARY registrations below. The
// module itself is empty: the ops are reached through torch.ops.minird.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace minird {

TORCH_LIBRARY(minird, m) {
  // out = norm(x [+ y]) * weight; out_next = norm(out) * weight_next (empty when weight_next is None)
  m.def("add_rmsnorm(Tensor x, Tensor? y, Tensor weight, Tensor? weight_next, float eps) -> (Tensor, Tensor)");
  // -> (grad of x (= grad of y), grad_weight, grad_weight_next (empty when weight_next is None))
  m.def(
      "add_rmsnorm_backward(Tensor grad_out, Tensor? grad_next, Tensor x, Tensor? y, Tensor weight, "
      "Tensor? weight_next, float eps) -> (Tensor, Tensor, Tensor)");
  // gate_up (..., 2I) -> silu(gate) * up (..., I)
  m.def("swiglu(Tensor gate_up) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor gate_up) -> Tensor");
  // qkv (B, T, 3h) -> q, k, v (B, nh, T, hs), q and k biased and rotated
  m.def("qk_bias_rope(Tensor qkv, Tensor qk_bias, Tensor cos, Tensor sin, int n_head) -> (Tensor, Tensor, Tensor)");
  // -> grad of qkv (B, T, 3h) (the q/k part is also the grad of the biased, unrotated q/k)
  m.def("qk_bias_rope_backward(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor cos, Tensor sin) -> Tensor");
  // s (..., h), e_proj = W_e e (..., h), weight = [W_s W_e] (h, 2h) -> W_s s + e_proj
  m.def("adapter(Tensor s, Tensor e_proj, Tensor weight) -> Tensor");
  // num_steps recurrent steps (adapter + R blocks) without returning to Python; inference only.
  // block_weights: R * 9 tensors, per block in BlockWeight order. past_k/past_v: empty (no KV
  // cache), or num_steps * R tensors (B, nh, T_past, hs) for (step, block) in that order; then
  // the returned lists hold the caches with this call's tokens appended.
  m.def(
      "recurrent_steps(Tensor s, Tensor e_proj, Tensor adapter_weight, Tensor[] block_weights, Tensor cos, "
      "Tensor sin, Tensor[] past_k, Tensor[] past_v, int num_steps, int n_head, float eps) "
      "-> (Tensor, Tensor[], Tensor[])");
}

at::Tensor adapter(const at::Tensor& s, const at::Tensor& e_proj, const at::Tensor& weight) {
  const char* op = "adapter";
  check_floating(s, op, "s");
  const int64_t h = s.size(-1);
  check_like(e_proj, op, "e_proj", s);
  check_shape(e_proj, op, "e_proj", s.sizes());
  check_like(weight, op, "weight", s);
  check_shape(weight, op, "weight", {h, 2 * h});
  // one GEMM, e_proj added in its epilogue; W_s is a strided view of the first h columns
  return at::addmm(e_proj.reshape({-1, h}), s.reshape({-1, h}), weight.narrow(1, 0, h).t()).view(s.sizes());
}

// The order of one block's tensors in recurrent_steps' block_weights (minird/ops.py builds it).
enum BlockWeight { NORM_1, WQKV, QK_BIAS, ATTN_PROJ, NORM_2, NORM_3, FC, MLP_PROJ, NORM_4, N_BLOCK_WEIGHTS };

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> recurrent_steps(
    const at::Tensor& s0, const at::Tensor& e_proj, const at::Tensor& adapter_weight, at::TensorList block_weights,
    const at::Tensor& cos, const at::Tensor& sin, at::TensorList past_k, at::TensorList past_v, int64_t num_steps,
    int64_t n_head, double eps) {
  const char* op = "recurrent_steps";
  check_floating(s0, op, "s");
  TORCH_CHECK(s0.dim() == 3, op, ": s must have shape (B, T, h), got ", s0.sizes());
  TORCH_CHECK(num_steps >= 0, op, ": num_steps must be >= 0, got ", num_steps);
  const int64_t B = s0.size(0), T = s0.size(1), h = s0.size(2);
  TORCH_CHECK(!block_weights.empty() && block_weights.size() % N_BLOCK_WEIGHTS == 0, op,
              ": block_weights must hold 9 tensors per core block, got ", block_weights.size());
  const int64_t R = block_weights.size() / N_BLOCK_WEIGHTS;
  const bool cached = !past_k.empty();
  TORCH_CHECK(past_k.size() == past_v.size() && (!cached || (int64_t)past_k.size() == num_steps * R), op,
              ": past_k and past_v must be empty or hold num_steps * R = ", num_steps * R, " tensors, got ",
              past_k.size(), " and ", past_v.size());
  // The kernels check their own arguments; the caches and GEMM weights are checked here, by name.
  const int64_t T_past = cached ? past_k[0].size(2) : 0;
  TORCH_CHECK(n_head > 0 && h % n_head == 0, op, ": n_head=", n_head, " must divide h=", h);
  for (size_t i = 0; i < past_k.size(); i++) {  // one length for all: the mask below assumes it
    for (const auto& [t, name] : {std::pair{past_k[i], "past_k[i]"}, std::pair{past_v[i], "past_v[i]"}}) {
      // (any strides: they only go through at::cat)
      TORCH_CHECK(t.device() == s0.device() && t.scalar_type() == s0.scalar_type(), op, ": ", name,
                  " must be on ", s0.device(), " with dtype ", s0.scalar_type(), " like s");
      check_shape(t, op, name, {B, n_head, T_past, h / n_head});
    }
  }
  const int64_t I = block_weights[FC].size(0) / 2;
  for (int64_t j = 0; j < R; j++) {
    const at::Tensor* w = block_weights.data() + j * N_BLOCK_WEIGHTS;
    check_like(w[WQKV], op, "Wqkv.weight", s0);
    check_shape(w[WQKV], op, "Wqkv.weight", {3 * h, h});
    check_like(w[ATTN_PROJ], op, "attn.proj.weight", s0);
    check_shape(w[ATTN_PROJ], op, "attn.proj.weight", {h, h});
    check_like(w[FC], op, "mlp.fc.weight", s0);
    check_shape(w[FC], op, "mlp.fc.weight", {2 * I, h});
    check_like(w[MLP_PROJ], op, "mlp.proj.weight", s0);
    check_shape(w[MLP_PROJ], op, "mlp.proj.weight", {h, I});
  }

  static auto add_rmsnorm_op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("minird::add_rmsnorm", "")
      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&,
                                                const at::Tensor&, const std::optional<at::Tensor>&, double)>();
  static auto swiglu_op =
      c10::Dispatcher::singleton().findSchemaOrThrow("minird::swiglu", "").typed<at::Tensor(const at::Tensor&)>();
  static auto rope_op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("minird::qk_bias_rope", "")
      .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                            const at::Tensor&, const at::Tensor&, int64_t)>();

  // New tokens see all cached ones and are causal among themselves: the mask model.forward builds.
  std::optional<at::Tensor> mask;
  if (T_past > 0 && T > 1) {
    mask = at::ones({T, T_past + T}, s0.options().dtype(at::kBool)).tril(T_past);
  }

  std::vector<at::Tensor> new_k, new_v;
  at::Tensor s = s0;
  for (int64_t step = 0; step < num_steps; step++) {
    s = adapter(s, e_proj, adapter_weight);
    at::Tensor xn = std::get<0>(add_rmsnorm_op.call(s, std::nullopt, block_weights[NORM_1], std::nullopt, eps));
    for (int64_t j = 0; j < R; j++) {
      const at::Tensor* w = block_weights.data() + j * N_BLOCK_WEIGHTS;
      auto [q, k, v] = rope_op.call(at::linear(xn, w[WQKV]), w[QK_BIAS], cos, sin, n_head);  // (B, nh, T, hs)
      if (cached) {
        k = at::cat({past_k[step * R + j], k}, 2);  // (B, nh, T_past + T, hs)
        v = at::cat({past_v[step * R + j], v}, 2);
        new_k.push_back(k);
        new_v.push_back(v);
      }
      at::Tensor y = at::scaled_dot_product_attention(q, k, v, mask, 0.0, /*is_causal=*/T_past == 0);
      y = at::linear(y.transpose(1, 2).reshape({B, T, h}), w[ATTN_PROJ]);
      std::tie(s, xn) = add_rmsnorm_op.call(s, y, w[NORM_2], w[NORM_3], eps);  // norm_2, and norm_3 of it
      y = at::linear(swiglu_op.call(at::linear(xn, w[FC])), w[MLP_PROJ]);
      // norm_4, and the next block's norm_1 from the same pass
      std::optional<at::Tensor> next_norm_1;
      if (j + 1 < R) next_norm_1 = block_weights[(j + 1) * N_BLOCK_WEIGHTS + NORM_1];
      std::tie(s, xn) = add_rmsnorm_op.call(s, y, w[NORM_4], next_norm_1, eps);
    }
  }
  return {s, new_k, new_v};
}

TORCH_LIBRARY_IMPL(minird, CompositeExplicitAutograd, m) {
  m.impl("adapter", &adapter);
  m.impl("recurrent_steps", &recurrent_steps);
}

}  // namespace minird
