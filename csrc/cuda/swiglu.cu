// swiglu on CUDA: out = silu(gate) * up, forward and backward, one thread per output element.
// What it fuses and why, and the reference to match: see csrc/swiglu.cpp (same op, CPU); the
// reference is MLP.forward in minird/model.py, F.silu(gate) * up.
#include <torch/library.h>

#include "common.cuh"

namespace minird {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void swiglu_kernel(const scalar_t* __restrict__ gate_up, scalar_t* __restrict__ out, int64_t n,
                              int64_t I) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n; k += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = k / I, i = k % I;
    const acc_t g = gate_up[row * 2 * I + i], u = gate_up[row * 2 * I + I + i];
    out[k] = static_cast<scalar_t>(round_to<scalar_t>(g / (acc_t(1) + exp(-g))) * u);
  }
}

template <typename scalar_t>
__global__ void swiglu_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ gate_up,
                                       scalar_t* __restrict__ grad_in, int64_t n, int64_t I) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n; k += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = k / I, i = k % I;
    const acc_t g = gate_up[row * 2 * I + i], u = gate_up[row * 2 * I + I + i], d = grad[k];
    const acc_t s = acc_t(1) / (acc_t(1) + exp(-g));
    grad_in[row * 2 * I + i] = static_cast<scalar_t>(d * u * s * (acc_t(1) + g * (acc_t(1) - s)));
    grad_in[row * 2 * I + I + i] = static_cast<scalar_t>(d * round_to<scalar_t>(g * s));
  }
}

at::Tensor swiglu_cuda(const at::Tensor& gate_up) {
  check_swiglu_args("swiglu", gate_up, nullptr);
  const c10::cuda::OptionalCUDAGuard guard(gate_up.device());
  const int64_t I = gate_up.size(-1) / 2, n = gate_up.numel() / 2;
  auto out_shape = gate_up.sizes().vec();
  out_shape.back() = I;
  at::Tensor out = at::empty(out_shape, gate_up.options());
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "swiglu_cuda", [&] {
    swiglu_kernel<scalar_t><<<grid_for(n, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, I);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor swiglu_backward_cuda(const at::Tensor& grad, const at::Tensor& gate_up) {
  check_swiglu_args("swiglu_backward", gate_up, &grad);
  const c10::cuda::OptionalCUDAGuard guard(gate_up.device());
  const int64_t I = gate_up.size(-1) / 2, n = gate_up.numel() / 2;
  at::Tensor grad_in = at::empty_like(gate_up);
  if (n == 0) return grad_in;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "swiglu_backward_cuda", [&] {
    swiglu_backward_kernel<scalar_t><<<grid_for(n, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad.data_ptr<scalar_t>(), gate_up.data_ptr<scalar_t>(), grad_in.data_ptr<scalar_t>(), n, I);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_in;
}

TORCH_LIBRARY_IMPL(minird, CUDA, m) {
  m.impl("swiglu", &swiglu_cuda);
  m.impl("swiglu_backward", &swiglu_backward_cuda);
}

}  // namespace minird
