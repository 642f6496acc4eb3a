// add_rmsnorm on CUDA: residual add + RMSNorm (+ the next pre-norm), forward and backward.
// What it fuses and why, and the reference to match: see csrc/rmsnorm.cpp (same op, CPU); the
// reference is RMSNorm.forward in minird/model.py.
//
// version 1 (eager PyTorch): ~16 kernels per sandwich sub-layer, each a full pass over (B, T, h).
// version 2 (this file): one thread block per row. The row is small (h <= a few thousand), so it is
//   read from global memory once and kept in registers (up to h = 8192; wider rows are re-read
//   from L1 for the second and third pass); two block reductions (sum of squares of x + y, then
//   of the normalised output) in the forward.
//   Backward: a persistent grid of blocks, each walking rows and keeping its partial weight grads
//   in shared memory (no atomics, deterministic); the partials are summed by one torch.sum.
// At decode (one row) each launch is one block: the time is the launch, which is why the op also
// folds in the next norm -- one launch instead of two. And the time of that one block is a chain of
// dependent loads: with 256 threads a row of h = 5280 is 21 loads per thread per pass, which an
// H200 profile measured at 24.6 us a call, ~20% of Huginn's batch-1 decode step (README.md, "fast
// generation"). So wide rows get more threads (up to 1024, at most kPerThread elements each) and
// each thread issues its loads together: up to h = 8192 the row and both weights are read in one
// round and kept in registers. Rows up to 256 * kPerThread = 2048 keep 256 threads, and so their
// bits: the thread count sets the order of the block's sums.
#include <torch/library.h>

#include "common.cuh"

namespace minird {

constexpr int kThreads = 256;   // threads per row, at least (the backward's block)
constexpr int kPerThread = 8;   // elements per thread the forward aims at, for rows wider than 2048

// The forward's block for rows of h: enough threads for kPerThread elements each, 256 to 1024.
inline int forward_threads(int64_t h) {
  const int64_t wanted = (h + kPerThread - 1) / kPerThread;
  return (int)std::min<int64_t>(1024, std::max<int64_t>(kThreads, (wanted + 31) / 32 * 32));
}

template <typename scalar_t>
__global__ void add_rmsnorm_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                                   const scalar_t* __restrict__ w, const scalar_t* __restrict__ w_next,
                                   scalar_t* __restrict__ out, scalar_t* __restrict__ out_next, int h, float eps) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t shared[32];
  const int64_t o = (int64_t)blockIdx.x * h;
  // A thread's elements are i = threadIdx.x + k * blockDim.x. Past the row's end u is 0, which adds
  // nothing to the sums: the register path's sums are the plain passes', in their order.
  auto u_at = [&](int i) {
    if (i >= h) return acc_t(0);
    return y ? round_to<scalar_t>(acc_t(x[o + i]) + acc_t(y[o + i])) : acc_t(x[o + i]);
  };
  // 1 / rms from a thread's share of the sum of squares, and one element normalised and scaled
  auto inv_rms = [&](acc_t ss) { return acc_t(1) / sqrt(block_sum(ss, shared) / h + acc_t(eps)); };
  auto scaled = [](acc_t v, acc_t r, acc_t weight) {
    return static_cast<scalar_t>(round_to<scalar_t>(v * r) * weight);
  };
  const int stride = blockDim.x;
  if (h <= kPerThread * stride) {  // (every row up to 8192) the row in registers: one round of loads
    acc_t u[kPerThread], wk[kPerThread], wn[kPerThread], a[kPerThread];
#pragma unroll
    for (int k = 0; k < kPerThread; k++) {
      const int i = threadIdx.x + k * stride;
      u[k] = u_at(i);
      wk[k] = i < h ? acc_t(w[i]) : acc_t(0);
      wn[k] = w_next && i < h ? acc_t(w_next[i]) : acc_t(0);
    }
    acc_t ss = 0;
#pragma unroll
    for (int k = 0; k < kPerThread; k++) ss += u[k] * u[k];
    const acc_t r = inv_rms(ss);
    acc_t ss_next = 0;
#pragma unroll
    for (int k = 0; k < kPerThread; k++) {
      const int i = threadIdx.x + k * stride;
      const scalar_t rounded = scaled(u[k], r, wk[k]);
      a[k] = acc_t(rounded);
      if (i < h) out[o + i] = rounded;
      ss_next += a[k] * a[k];
    }
    if (!w_next) return;
    const acc_t r_next = inv_rms(ss_next);
#pragma unroll
    for (int k = 0; k < kPerThread; k++) {
      const int i = threadIdx.x + k * stride;
      if (i < h) out_next[o + i] = scaled(a[k], r_next, wn[k]);
    }
    return;
  }
  // wider rows: the same sums in three plain passes over the row
  acc_t ss = 0;
  for (int i = threadIdx.x; i < h; i += stride) {
    const acc_t u = u_at(i);
    ss += u * u;
  }
  const acc_t r = inv_rms(ss);
  acc_t ss_next = 0;
  for (int i = threadIdx.x; i < h; i += stride) {
    const scalar_t a = scaled(u_at(i), r, acc_t(w[i]));
    out[o + i] = a;
    ss_next += acc_t(a) * acc_t(a);
  }
  if (!w_next) return;
  const acc_t r_next = inv_rms(ss_next);
  // each thread re-reads only the elements it wrote itself: no barrier needed
  for (int i = threadIdx.x; i < h; i += stride) {
    out_next[o + i] = scaled(acc_t(out[o + i]), r_next, acc_t(w_next[i]));
  }
}

std::tuple<at::Tensor, at::Tensor> add_rmsnorm_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& y,
                                                    const at::Tensor& weight,
                                                    const c10::optional<at::Tensor>& weight_next, double eps) {
  check_add_rmsnorm_args("add_rmsnorm", x, y, weight, weight_next);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t h = x.size(-1), rows = x.numel() / h;
  at::Tensor out = at::empty_like(x);
  at::Tensor out_next = weight_next ? at::empty_like(x) : at::empty({0}, x.options());
  if (rows == 0) return {out, out_next};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rmsnorm_cuda", [&] {
    add_rmsnorm_kernel<scalar_t><<<rows, forward_threads(h), 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), y ? y->data_ptr<scalar_t>() : nullptr, weight.data_ptr<scalar_t>(),
        weight_next ? weight_next->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
        weight_next ? out_next.data_ptr<scalar_t>() : nullptr, (int)h, (float)eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, out_next};
}

// Per row, with u = x + y, n = u * r and (if w_next) a = out, n2 = a * r2:
//   g   = grad_out + r2 * (grad_next * w_next - n2 * mean(grad_next * w_next * n2))   (grad of out)
//   gx  = r * (g * w - n * mean(g * w * n))
//   gw += g * n,  gw_next += grad_next * n2     (partials in shared memory, one row of h per block)
// Values are recomputed from the inputs in each pass rather than kept: the row sits in L1.
template <typename scalar_t>
__global__ void add_rmsnorm_backward_kernel(const scalar_t* __restrict__ grad_out,
                                            const scalar_t* __restrict__ grad_next, const scalar_t* __restrict__ x,
                                            const scalar_t* __restrict__ y, const scalar_t* __restrict__ w,
                                            const scalar_t* __restrict__ w_next, scalar_t* __restrict__ grad_x,
                                            at::opmath_type<scalar_t>* __restrict__ gw_part,
                                            at::opmath_type<scalar_t>* __restrict__ gwn_part, int64_t rows, int h,
                                            float eps_f) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t shared[32];
  extern __shared__ unsigned char smem_raw[];
  acc_t* gw = reinterpret_cast<acc_t*>(smem_raw);  // (h) this block's partial grad of w
  acc_t* gwn = gw + h;                              // (h) and of w_next
  const acc_t eps = eps_f;
  for (int i = threadIdx.x; i < h; i += blockDim.x) gw[i] = gwn[i] = 0;  // each thread owns its columns
  auto u_at = [&](int64_t k) { return y ? round_to<scalar_t>(acc_t(x[k]) + acc_t(y[k])) : acc_t(x[k]); };

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t o = row * h;
    acc_t ss = 0;
    for (int i = threadIdx.x; i < h; i += blockDim.x) ss += u_at(o + i) * u_at(o + i);
    const acc_t r = acc_t(1) / sqrt(block_sum(ss, shared) / h + eps);
    auto a_at = [&](int i) { return round_to<scalar_t>(round_to<scalar_t>(u_at(o + i) * r) * acc_t(w[i])); };
    acc_t r2 = 0, dot2 = 0;
    if (w_next) {
      acc_t ss2 = 0;
      for (int i = threadIdx.x; i < h; i += blockDim.x) ss2 += a_at(i) * a_at(i);
      r2 = acc_t(1) / sqrt(block_sum(ss2, shared) / h + eps);
      acc_t d = 0;
      for (int i = threadIdx.x; i < h; i += blockDim.x) {
        const acc_t n2 = a_at(i) * r2, gn = acc_t(grad_next[o + i]);
        d += gn * acc_t(w_next[i]) * n2;
        gwn[i] += gn * round_to<scalar_t>(n2);
      }
      dot2 = block_sum(d, shared) / h;
    }
    auto g_at = [&](int i) {
      acc_t g = acc_t(grad_out[o + i]);
      if (w_next) g += r2 * (acc_t(grad_next[o + i]) * acc_t(w_next[i]) - a_at(i) * r2 * dot2);
      return g;
    };
    acc_t d = 0;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
      const acc_t n = u_at(o + i) * r, g = g_at(i);
      d += g * acc_t(w[i]) * n;
      gw[i] += g * round_to<scalar_t>(n);
    }
    const acc_t dot = block_sum(d, shared) / h;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
      const acc_t n = u_at(o + i) * r;
      grad_x[o + i] = static_cast<scalar_t>(r * (g_at(i) * acc_t(w[i]) - n * dot));
    }
  }
  for (int i = threadIdx.x; i < h; i += blockDim.x) {
    gw_part[(int64_t)blockIdx.x * h + i] = gw[i];
    if (w_next) gwn_part[(int64_t)blockIdx.x * h + i] = gwn[i];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rmsnorm_backward_cuda(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_next, const at::Tensor& x,
    const c10::optional<at::Tensor>& y, const at::Tensor& weight, const c10::optional<at::Tensor>& weight_next,
    double eps) {
  const char* op = "add_rmsnorm_backward";
  check_add_rmsnorm_backward_args(op, grad_out, grad_next, x, y, weight, weight_next);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t h = x.size(-1), rows = x.numel() / h;
  const int blocks = (int)std::max<int64_t>(1, std::min<int64_t>(
      rows, 2LL * sm_count()));
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor gw, gwn;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rmsnorm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = 2 * h * sizeof(acc_t);
    TORCH_CHECK(smem <= 48 * 1024, op, ": h=", h, " is too large for this kernel's shared memory (h <= ",
                48 * 1024 / (2 * sizeof(acc_t)), ")");
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    at::Tensor gw_part = at::empty({blocks, h}, x.options().dtype(acc_dtype));
    at::Tensor gwn_part = at::empty({weight_next ? blocks : 0, h}, x.options().dtype(acc_dtype));
    add_rmsnorm_backward_kernel<scalar_t><<<blocks, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
        grad_out.data_ptr<scalar_t>(), grad_next ? grad_next->data_ptr<scalar_t>() : nullptr,
        x.data_ptr<scalar_t>(), y ? y->data_ptr<scalar_t>() : nullptr, weight.data_ptr<scalar_t>(),
        weight_next ? weight_next->data_ptr<scalar_t>() : nullptr, grad_x.data_ptr<scalar_t>(),
        gw_part.data_ptr<acc_t>(), weight_next ? gwn_part.data_ptr<acc_t>() : nullptr, rows, (int)h, (float)eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gw = gw_part.sum(0).to(x.scalar_type());
    gwn = weight_next ? gwn_part.sum(0).to(x.scalar_type()) : at::empty({0}, x.options());
  });
  return {grad_x, gw, gwn};
}

TORCH_LIBRARY_IMPL(minird, CUDA, m) {
  m.impl("add_rmsnorm", &add_rmsnorm_cuda);
  m.impl("add_rmsnorm_backward", &add_rmsnorm_backward_cuda);
}

}  // namespace minird
