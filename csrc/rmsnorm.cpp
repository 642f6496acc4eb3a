// add_rmsnorm: the sandwich's "residual add + RMSNorm (+ the next pre-norm)" in one pass.
//
// SandwichBlock (minird/model.py) does, per sub-layer,
//     x = norm_2(x + attn(norm_1(x)))      then      mlp(norm_3(x))
// which in eager PyTorch is: add, float cast, pow, mean, add eps, rsqrt, mul, cast, mul by weight --
// then the same again for norm_3 on the result: ~16 kernels and 8 round trips through memory for
// one row of h numbers. The fused op reads x and y once and writes both
//     out      = norm(x + y) * weight              (the new residual stream, = norm_2's output)
//     out_next = norm(out) * weight_next           (the next sub-layer's input, = norm_3's output)
// y and weight_next are optional, so the same op is also a plain RMSNorm (norm_1 of the first core
// block) and a plain add+norm (norm_4 of the last one).
//
// Reference it must match: RMSNorm.forward in minird/model.py, i.e.
//     xf = x.float(); xf = xf * rsqrt(mean(xf^2) + eps); xf.type_as(x) * weight
// including where it rounds in bf16 (after the add, after the normalisation, after the weight).
//
// Backward, per row (n = u * r the normalised row, r = rsqrt(mean(u^2) + eps), g the output grad):
//     grad_weight += g * n          grad_u = r * (g*w - n * mean(g*w * n))
// and for out_next the same formula first, its grad_u added to grad_out. grad_weight's sum over
// rows runs in row order after the rows are done, so its bits do not depend on the thread count.
// The sum u = x + y is recomputed rather than saved: one add is cheaper than keeping another
// (B, T, h) tensor alive.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "minird.h"

namespace minird {

// One row: naive version, straight from the formula (three passes over h, all in cache).
template <typename scalar_t, typename acc_t>
static void add_rmsnorm_row(const scalar_t* x, const scalar_t* y, const scalar_t* w, const scalar_t* w_next,
                            scalar_t* out, scalar_t* out_next, int64_t h, acc_t eps) {
  acc_t ss = 0;
  for (int64_t i = 0; i < h; i++) {
    acc_t u = y ? round_to<scalar_t>(acc_t(x[i]) + acc_t(y[i])) : acc_t(x[i]);
    ss += u * u;
  }
  const acc_t r = acc_t(1) / std::sqrt(ss / h + eps);
  acc_t ss_next = 0;
  for (int64_t i = 0; i < h; i++) {
    acc_t u = y ? round_to<scalar_t>(acc_t(x[i]) + acc_t(y[i])) : acc_t(x[i]);
    out[i] = static_cast<scalar_t>(round_to<scalar_t>(u * r) * acc_t(w[i]));
    ss_next += acc_t(out[i]) * acc_t(out[i]);
  }
  if (!w_next) return;
  const acc_t r_next = acc_t(1) / std::sqrt(ss_next / h + eps);
  for (int64_t i = 0; i < h; i++) {
    out_next[i] = static_cast<scalar_t>(round_to<scalar_t>(acc_t(out[i]) * r_next) * acc_t(w_next[i]));
  }
}

std::tuple<at::Tensor, at::Tensor> add_rmsnorm_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& y,
                                                   const at::Tensor& weight,
                                                   const c10::optional<at::Tensor>& weight_next, double eps) {
  check_add_rmsnorm_args("add_rmsnorm", x, y, weight, weight_next);
  const int64_t h = x.size(-1), rows = x.numel() / h;
  at::Tensor out = at::empty_like(x);
  at::Tensor out_next = weight_next ? at::empty_like(x) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rmsnorm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* py = y ? y->data_ptr<scalar_t>() : nullptr;
    const scalar_t* pw = weight.data_ptr<scalar_t>();
    const scalar_t* pwn = weight_next ? weight_next->data_ptr<scalar_t>() : nullptr;
    scalar_t* po = out.data_ptr<scalar_t>();
    scalar_t* pon = weight_next ? out_next.data_ptr<scalar_t>() : nullptr;
    // grain: ~4096 numbers a task, a few microseconds of work (decoding a batch of 64 at h = 256: 4 tasks)
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / h), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; row++) {
        const int64_t o = row * h;
        add_rmsnorm_row<scalar_t, acc_t>(px + o, py ? py + o : nullptr, pw, pwn, po + o, pon ? pon + o : nullptr,
                                         h, acc_t(eps));
      }
    });
  });
  return {out, out_next};
}

// Backward of one norm on one row: given its input u (already rounded like the forward), the
// output grad g, weight w, write this row's terms of grad_w (into gw_terms) and grad_u (in acc_t,
// into gu).
template <typename scalar_t, typename acc_t>
static void rmsnorm_row_backward(const acc_t* u, const acc_t* g, const scalar_t* w, acc_t* gw_terms, acc_t* gu,
                                 int64_t h, acc_t eps) {
  acc_t ss = 0;
  for (int64_t i = 0; i < h; i++) ss += u[i] * u[i];
  const acc_t r = acc_t(1) / std::sqrt(ss / h + eps);
  acc_t dot = 0;  // mean(g*w * n) * h
  for (int64_t i = 0; i < h; i++) {
    const acc_t n = u[i] * r;
    gw_terms[i] = g[i] * round_to<scalar_t>(n);
    dot += g[i] * acc_t(w[i]) * n;
  }
  for (int64_t i = 0; i < h; i++) gu[i] = r * (g[i] * acc_t(w[i]) - u[i] * r * dot / h);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rmsnorm_backward_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_next, const at::Tensor& x,
    const c10::optional<at::Tensor>& y, const at::Tensor& weight, const c10::optional<at::Tensor>& weight_next,
    double eps) {
  const char* op = "add_rmsnorm_backward";
  check_add_rmsnorm_backward_args(op, grad_out, grad_next, x, y, weight, weight_next);
  const int64_t h = x.size(-1), rows = x.numel() / h;
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor gw_out, gwn_out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rmsnorm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    // Weight grads: the rows run in parallel and each leaves its terms, one row of a (rows, h)
    // tensor per weight; then the columns run in parallel, each adding its terms row after row.
    // So a weight grad is summed in row order whatever the thread count: a training run's bits do
    // not depend on it (one partial sum per thread, added at the end, would).
    at::Tensor gw_terms = at::empty({rows, h}, x.options().dtype(acc_dtype));
    at::Tensor gwn_terms = at::empty({weight_next ? rows : 0, h}, x.options().dtype(acc_dtype));
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* py = y ? y->data_ptr<scalar_t>() : nullptr;
    const scalar_t* pw = weight.data_ptr<scalar_t>();
    const scalar_t* pwn = weight_next ? weight_next->data_ptr<scalar_t>() : nullptr;
    const scalar_t* pg = grad_out.data_ptr<scalar_t>();
    const scalar_t* pgn = grad_next ? grad_next->data_ptr<scalar_t>() : nullptr;
    scalar_t* pgx = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / h), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> u(h), a(h), g(h), tmp(h);
      for (int64_t row = begin; row < end; row++) {
        const int64_t o = row * h;
        for (int64_t i = 0; i < h; i++) {
          u[i] = py ? round_to<scalar_t>(acc_t(px[o + i]) + acc_t(py[o + i])) : acc_t(px[o + i]);
          g[i] = acc_t(pg[o + i]);
        }
        if (pwn) {  // out_next = norm(out): its grad flows into out's grad first
          acc_t ss = 0;
          for (int64_t i = 0; i < h; i++) ss += u[i] * u[i];
          const acc_t r = acc_t(1) / std::sqrt(ss / h + acc_t(eps));
          for (int64_t i = 0; i < h; i++) {
            a[i] = round_to<scalar_t>(round_to<scalar_t>(u[i] * r) * acc_t(pw[i]));  // = out, recomputed
            tmp[i] = acc_t(pgn[o + i]);
          }
          rmsnorm_row_backward<scalar_t, acc_t>(a.data(), tmp.data(), pwn, gwn_terms.data_ptr<acc_t>() + o,
                                                tmp.data(), h, acc_t(eps));
          for (int64_t i = 0; i < h; i++) g[i] += tmp[i];
        }
        rmsnorm_row_backward<scalar_t, acc_t>(u.data(), g.data(), pw, gw_terms.data_ptr<acc_t>() + o, tmp.data(), h,
                                              acc_t(eps));
        for (int64_t i = 0; i < h; i++) pgx[o + i] = static_cast<scalar_t>(tmp[i]);
      }
    });
    auto sum_rows = [&](const at::Tensor& terms) {
      at::Tensor total = at::zeros({h}, terms.options());
      const acc_t* pt = terms.data_ptr<acc_t>();
      acc_t* sum = total.data_ptr<acc_t>();
      at::parallel_for(0, h, 16, [&](int64_t begin, int64_t end) {
        for (int64_t row = 0; row < rows; row++) {
          for (int64_t i = begin; i < end; i++) sum[i] += pt[row * h + i];
        }
      });
      return total.to(x.scalar_type());
    };
    gw_out = sum_rows(gw_terms);
    gwn_out = weight_next ? sum_rows(gwn_terms) : at::empty({0}, x.options());
  });
  return {grad_x, gw_out, gwn_out};
}

TORCH_LIBRARY_IMPL(minird, CPU, m) {
  m.impl("add_rmsnorm", &add_rmsnorm_cpu);
  m.impl("add_rmsnorm_backward", &add_rmsnorm_backward_cpu);
}

}  // namespace minird
