// Helpers shared by the CUDA kernels in this folder.
#pragma once

// Only c10's CUDA headers (stream, guard, launch check): ATen/cuda/CUDAContext.h would pull in the
// cuBLAS/cuSPARSE headers, which these kernels do not use.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../minird.h"

namespace minird {

// Sum of v over the whole thread block, returned to every thread. Warp shuffles, then one partial
// per warp in shared memory that every thread adds up in the same order (deterministic).
// `shared` holds 32 values; the first barrier makes back-to-back calls safe.
template <typename T>
__device__ inline T block_sum(T v, T* shared) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = v;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < (int)((blockDim.x + 31) >> 5); w++) total += shared[w];
  return total;
}

// Multiprocessors of the current device, asked once per device.
inline int sm_count() {
  static int counts[64] = {0};
  const int device = c10::cuda::current_device();
  if (counts[device] == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device));
  }
  return counts[device];
}

// Blocks for a grid-stride loop over n items: enough to fill the GPU, never more than needed.
inline int grid_for(int64_t n, int threads) {
  const int64_t max_blocks = 8LL * sm_count();
  return (int)std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, max_blocks));
}

}  // namespace minird
