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
  // qk_bias_rope at inference with a KV cache: k and v are written into k_cache, v_cache (B, nh, L, hs)
  // at positions pos .. pos + T - 1 (no copy of the cache); returns q (B, nh, T, hs)
  m.def(
      "qk_bias_rope_cache(Tensor qkv, Tensor qk_bias, Tensor cos, Tensor sin, int n_head, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, int pos) -> Tensor");
  // num_steps recurrent steps (adapter + R blocks) without returning to Python; inference only.
  // block_weights: R * 9 tensors, per block in BlockWeight order. mask: None (causal), or the
  // attention mask model.forward passes to SDPA (bool, True = may attend; e.g. padded batches).
  // Returns the final state.
  m.def(
      "recurrent_steps(Tensor s, Tensor e_proj, Tensor adapter_weight, Tensor[] block_weights, Tensor cos, "
      "Tensor sin, Tensor? mask, int num_steps, int n_head, float eps) -> Tensor");
  // The same with a KV cache: k_cache/v_cache hold num_steps * R buffers (B, nh, L, hs), one per
  // (step, block) in that order (the same buffer may serve several: KV-cache sharing); this call's
  // tokens are written at positions pos .. pos + T - 1 and attend to positions 0 .. pos + T - 1
  // (mask None: all cached ones and causally among themselves). A separate op because a mutated list of tensors is only for generation, never traced by
  // torch.compile (which cannot functionalize one).
  m.def(
      "recurrent_steps_cached(Tensor s, Tensor e_proj, Tensor adapter_weight, Tensor[] block_weights, Tensor cos, "
      "Tensor sin, Tensor? mask, Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, int pos, int num_steps, int n_head, "
      "float eps) -> Tensor");
  // recurrent_steps_cached for one new token (B = 1, T = 1) in one persistent CUDA
  // kernel launch: the decode case, where a step is otherwise dozens of dependent launches.
  // pos_on_device: None, or a (1,) int64 tensor on s's device that the kernel reads the position
  // from when it runs (pos is then only its upper bound): a CUDA graph captures one launch and
  // replays it at every position (minird/graphed.py). e_proj and adapter_weight None: the blocks
  // alone, without the adapter (the prelude's or the coda's blocks of one decoding token).
  m.def(
      "decode_steps(Tensor s, Tensor? e_proj, Tensor? adapter_weight, Tensor[] block_weights, Tensor cos, "
      "Tensor sin, Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, int pos, int num_steps, int n_head, float eps, "
      "Tensor? pos_on_device=None) -> Tensor");
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

// Both recurrent_steps ops: without a KV cache (cached = false: k_cache, v_cache empty) or with one.
static at::Tensor run_steps(bool cached, const at::Tensor& s0, const at::Tensor& e_proj,
                            const at::Tensor& adapter_weight, at::TensorList block_weights, const at::Tensor& cos,
                            const at::Tensor& sin, const std::optional<at::Tensor>& attn_mask,
                            at::TensorList k_cache, at::TensorList v_cache, int64_t pos, int64_t num_steps,
                            int64_t n_head, double eps) {
  const char* op = cached ? "recurrent_steps_cached" : "recurrent_steps";
  check_floating(s0, op, "s");
  TORCH_CHECK(s0.dim() == 3, op, ": s must have shape (B, T, h), got ", s0.sizes());
  TORCH_CHECK(num_steps >= 0, op, ": num_steps must be >= 0, got ", num_steps);
  const int64_t B = s0.size(0), T = s0.size(1), h = s0.size(2);
  TORCH_CHECK(!block_weights.empty() && block_weights.size() % N_BLOCK_WEIGHTS == 0, op,
              ": block_weights must hold 9 tensors per core block, got ", block_weights.size());
  const int64_t R = block_weights.size() / N_BLOCK_WEIGHTS;
  TORCH_CHECK(!cached || ((int64_t)k_cache.size() == num_steps * R && v_cache.size() == k_cache.size()), op,
              ": k_cache and v_cache must hold num_steps * R = ", num_steps * R, " tensors, got ",
              k_cache.size(), " and ", v_cache.size());
  TORCH_CHECK(n_head > 0 && h % n_head == 0, op, ": n_head=", n_head, " must divide h=", h);
  // The kernels check their own arguments; the caches and GEMM weights are checked here, by name.
  if (cached && num_steps > 0) {
    const int64_t L = k_cache[0].dim() == 4 ? k_cache[0].size(2) : -1;
    TORCH_CHECK(pos >= 0 && pos + T <= L, op, ": positions pos .. pos + T - 1 = ", pos, " .. ", pos + T - 1,
                " must lie in the caches' length L = ", L);
    for (size_t i = 0; i < k_cache.size(); i++) {  // one length for all: the mask below assumes it
      for (const auto& [t, name] : {std::pair{k_cache[i], "k_cache[i]"}, std::pair{v_cache[i], "v_cache[i]"}}) {
        check_like(t, op, name, s0);
        check_shape(t, op, name, {B, n_head, L, h / n_head});
      }
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
  static auto rope_cache_op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("minird::qk_bias_rope_cache", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                        at::Tensor&, at::Tensor&, int64_t)>();

  // By default new tokens see all cached ones and are causal among themselves: the mask
  // model.forward builds when it has no other (padding) to add.
  std::optional<at::Tensor> mask = attn_mask;
  if (!mask && pos > 0 && T > 1) {
    mask = at::ones({T, pos + T}, s0.options().dtype(at::kBool)).tril(pos);
  }

  at::Tensor s = s0;
  for (int64_t step = 0; step < num_steps; step++) {
    s = adapter(s, e_proj, adapter_weight);
    at::Tensor xn = std::get<0>(add_rmsnorm_op.call(s, std::nullopt, block_weights[NORM_1], std::nullopt, eps));
    for (int64_t j = 0; j < R; j++) {
      const at::Tensor* w = block_weights.data() + j * N_BLOCK_WEIGHTS;
      at::Tensor q, k, v;  // (B, nh, T, hs); with a cache k, v are (B, nh, pos + T, hs) views of it
      if (cached) {
        at::Tensor k_buf = k_cache[step * R + j], v_buf = v_cache[step * R + j];
        q = rope_cache_op.call(at::linear(xn, w[WQKV]), w[QK_BIAS], cos, sin, n_head, k_buf, v_buf, pos);
        k = k_buf.narrow(2, 0, pos + T);
        v = v_buf.narrow(2, 0, pos + T);
      } else {
        std::tie(q, k, v) = rope_op.call(at::linear(xn, w[WQKV]), w[QK_BIAS], cos, sin, n_head);
      }
      at::Tensor y = at::scaled_dot_product_attention(q, k, v, mask, 0.0, /*is_causal=*/!mask && pos == 0);
      y = at::linear(y.transpose(1, 2).reshape({B, T, h}), w[ATTN_PROJ]);
      std::tie(s, xn) = add_rmsnorm_op.call(s, y, w[NORM_2], w[NORM_3], eps);  // norm_2, and norm_3 of it
      y = at::linear(swiglu_op.call(at::linear(xn, w[FC])), w[MLP_PROJ]);
      // norm_4, and the next block's norm_1 from the same pass
      std::optional<at::Tensor> next_norm_1;
      if (j + 1 < R) next_norm_1 = block_weights[(j + 1) * N_BLOCK_WEIGHTS + NORM_1];
      std::tie(s, xn) = add_rmsnorm_op.call(s, y, w[NORM_4], next_norm_1, eps);
    }
  }
  return s;
}

at::Tensor recurrent_steps(const at::Tensor& s0, const at::Tensor& e_proj, const at::Tensor& adapter_weight,
                           at::TensorList block_weights, const at::Tensor& cos, const at::Tensor& sin,
                           const std::optional<at::Tensor>& mask, int64_t num_steps, int64_t n_head, double eps) {
  return run_steps(false, s0, e_proj, adapter_weight, block_weights, cos, sin, mask, {}, {}, 0, num_steps, n_head,
                   eps);
}

at::Tensor recurrent_steps_cached(const at::Tensor& s0, const at::Tensor& e_proj, const at::Tensor& adapter_weight,
                                  at::TensorList block_weights, const at::Tensor& cos, const at::Tensor& sin,
                                  const std::optional<at::Tensor>& mask, at::TensorList k_cache,
                                  at::TensorList v_cache, int64_t pos, int64_t num_steps, int64_t n_head,
                                  double eps) {
  return run_steps(true, s0, e_proj, adapter_weight, block_weights, cos, sin, mask, k_cache, v_cache, pos,
                   num_steps, n_head, eps);
}

TORCH_LIBRARY_IMPL(minird, CompositeExplicitAutograd, m) {
  m.impl("adapter", &adapter);
  m.impl("recurrent_steps", &recurrent_steps);
  m.impl("recurrent_steps_cached", &recurrent_steps_cached);
}

}  // namespace minird
