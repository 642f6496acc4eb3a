// swiglu: the MLP's gate, out = silu(gate) * up, where gate and up are the two halves of fc(x).
//
// Eager (MLP.forward in minird/model.py): `gate, up = fc(x).chunk(2, dim=-1)` then
// `F.silu(gate) * up`: two kernels and a (B, T, I) temporary between them; backward is four more
// (silu's backward, two muls, and a cat of the two halves' grads). Here one pass reads each pair
// (gate, up) once and writes one number; backward reads (grad, gate, up) and writes the pair of
// grads straight into a (..., 2I) tensor, so no cat.
//
// Reference it must match: F.silu(gate) * up, rounding like eager in bf16 (silu's result is stored
// in the input dtype before the multiply). Backward, with s = sigmoid(gate):
//     grad_gate = grad * up * s * (1 + gate * (1 - s))        grad_up = grad * silu(gate)
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "minird.h"

namespace minird {

template <typename acc_t>
static inline acc_t sigmoid(acc_t v) {
  return acc_t(1) / (acc_t(1) + std::exp(-v));
}

at::Tensor swiglu_cpu(const at::Tensor& gate_up) {
  check_swiglu_args("swiglu", gate_up, nullptr);
  const int64_t I = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * I);
  auto out_shape = gate_up.sizes().vec();
  out_shape.back() = I;
  at::Tensor out = at::empty(out_shape, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "swiglu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = gate_up.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / I), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; row++) {
        const scalar_t* gate = in + row * 2 * I;
        const scalar_t* up = gate + I;
        for (int64_t i = 0; i < I; i++) {
          const acc_t g = gate[i];
          po[row * I + i] = static_cast<scalar_t>(round_to<scalar_t>(g * sigmoid(g)) * acc_t(up[i]));
        }
      }
    });
  });
  return out;
}

at::Tensor swiglu_backward_cpu(const at::Tensor& grad, const at::Tensor& gate_up) {
  check_swiglu_args("swiglu_backward", gate_up, &grad);
  const int64_t I = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * I);
  at::Tensor grad_in = at::empty_like(gate_up);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "swiglu_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = gate_up.data_ptr<scalar_t>();
    const scalar_t* pg = grad.data_ptr<scalar_t>();
    scalar_t* pgi = grad_in.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / I), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; row++) {
        const scalar_t* gate = in + row * 2 * I;
        const scalar_t* up = gate + I;
        for (int64_t i = 0; i < I; i++) {
          const acc_t g = gate[i], u = up[i], d = pg[row * I + i];
          const acc_t s = sigmoid(g);
          pgi[row * 2 * I + i] = static_cast<scalar_t>(d * u * s * (acc_t(1) + g * (acc_t(1) - s)));
          pgi[row * 2 * I + I + i] = static_cast<scalar_t>(d * round_to<scalar_t>(g * s));
        }
      }
    });
  });
  return grad_in;
}

TORCH_LIBRARY_IMPL(minird, CPU, m) {
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
}

}  // namespace minird
