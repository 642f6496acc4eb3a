// Between the two decode kernels: decode.cu (version 2, the op's CUDA kernel) hands a call to the
// cluster version (decode_cluster.cu) when MINIRD_DECODE_VERSION=4 asks for it.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace minird {

// decode_steps on one thread block cluster, into out; fails with the reason where that version
// does not apply. The arguments are already checked.
void decode_steps_on_cluster(const at::Tensor& s, const std::optional<at::Tensor>& e_proj,
                             const std::optional<at::Tensor>& adapter_weight, at::TensorList block_weights,
                             const at::Tensor& cos, const at::Tensor& sin, at::TensorList k_cache,
                             at::TensorList v_cache, int64_t pos, int64_t num_steps, int64_t n_head, double eps,
                             const std::optional<at::Tensor>& pos_on_device, at::Tensor& out);

}  // namespace minird
