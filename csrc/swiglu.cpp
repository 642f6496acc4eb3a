// swiglu: the MLP's gate, out = silu(gate) * up, where gate and up are the two halves of fc(x).
//
// Eager (MLP.forward in minird/model.py): `gate, up = fc(x).chunk(2, dim=-1)` then
// `F.silu(gate) * up`: two kernels and a (B, T, I) temporary between them; backward is four more
// (silu's backward, two muls, and a cat of the two halves' grads). The CUDA kernel
// (cuda/swiglu.cu) reads each pair (gate, up) once and writes one number; its backward writes the
// pair of grads straight into a (..., 2I) tensor, so no cat.
//
// On the CPU this file does NOT fuse the forward into one loop: a plain loop calls std::exp once per
// element, which the compiler cannot vectorise, and it measured 3-7x slower than eager's two ops
// (ATen's silu runs a vectorised exp, AVX-512 where the CPU has it, picked at run time; this
// extension is built without such flags). At these sizes (a row of I numbers stays in cache) the
// temporary costs less than the exp. So the forward is eager's own ops, and the backward is eager's
// autograd formulas written straight into the two halves of the grad (still no cat):
//     grad_gate = silu_backward(grad * up, gate)        grad_up = grad * silu(gate)
// with s = sigmoid(gate), silu_backward(d, g) = d * s * (1 + g * (1 - s)). Same ops, same
// roundings: bit for bit eager's (tests/test_ops.py checks it against F.silu(gate) * up).
#include <torch/library.h>

#include "minird.h"

namespace minird {

at::Tensor swiglu_cpu(const at::Tensor& gate_up) {
  check_swiglu_args("swiglu", gate_up, nullptr);
  const int64_t I = gate_up.size(-1) / 2;
  const at::Tensor gate = gate_up.narrow(-1, 0, I), up = gate_up.narrow(-1, I, I);
  return at::silu(gate).mul_(up);
}

at::Tensor swiglu_backward_cpu(const at::Tensor& grad, const at::Tensor& gate_up) {
  check_swiglu_args("swiglu_backward", gate_up, &grad);
  const int64_t I = gate_up.size(-1) / 2;
  const at::Tensor gate = gate_up.narrow(-1, 0, I), up = gate_up.narrow(-1, I, I);
  at::Tensor grad_in = at::empty_like(gate_up);
  at::Tensor grad_gate = grad_in.narrow(-1, 0, I), grad_up = grad_in.narrow(-1, I, I);
  at::silu_backward_out(grad_gate, grad * up, gate);
  at::mul_out(grad_up, grad, at::silu(gate));
  return grad_in;
}

TORCH_LIBRARY_IMPL(minird, CPU, m) {
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
}

}  // namespace minird
