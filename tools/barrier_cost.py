"""
What one barrier costs on this GPU, with no work between barriers (CUDA only): the grid-wide
barrier that the decode kernel pays 4R + 1 times a step (cooperative_groups grid.sync(), and a
plain release/acquire counter for comparison) against the hardware barrier of one thread block
cluster (cluster.sync(), sm_90 and later), at the decode kernel's 256 threads a block.

    python tools/barrier_cost.py

Each cell is (time of a launch of 2,000 barriers - time of a launch of none) / 2,000, the median of
20 launches: the barrier's latency alone, without the wait for a late block that a real phase
adds. csrc/README.md ("Targets") reads the step's floor from it.
"""

import torch
from torch.utils.cpp_extension import load_inline

CUDA = r"""
#include <cooperative_groups.h>
#include <c10/cuda/CUDAStream.h>
namespace cg = cooperative_groups;

__global__ void grid_sync_kernel(int n, float* done, unsigned*) {
  cg::grid_group grid = cg::this_grid();
  for (int i = 0; i < n; i++) grid.sync();
  if (threadIdx.x == 0 && blockIdx.x == 0) done[0] = n;
}

// Every block's thread 0 adds 1 with release semantics and waits (acquire) until all gridDim.x
// blocks have added theirs; __syncthreads on both sides orders the rest of the block.
__global__ void counter_kernel(int n, float* done, unsigned* counter) {
  unsigned target = 0;
  for (int i = 0; i < n; i++) {
    __syncthreads();
    target += gridDim.x;
    if (threadIdx.x == 0) {
      asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(counter), "r"(1u) : "memory");
      unsigned v;
      do {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(counter) : "memory");
      } while ((int)(v - target) < 0);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0 && blockIdx.x == 0) done[0] = n;
}

__global__ void cluster_sync_kernel(int n, float* done) {
  cg::cluster_group cluster = cg::this_cluster();
  for (int i = 0; i < n; i++) cluster.sync();
  if (threadIdx.x == 0 && blockIdx.x == 0) done[0] = n;
}

// which: 0 grid.sync(), 1 the counter (both a cooperative launch), 2 one cluster of `blocks`
void run(int64_t which, int64_t n, int64_t blocks, torch::Tensor done, torch::Tensor counter) {
  int count = (int)n;
  float* d = done.data_ptr<float>();
  unsigned* c = reinterpret_cast<unsigned*>(counter.data_ptr<int>());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (which == 2) {  // clusters above 8 blocks are "non-portable": allowed on sm_90 when asked for
    C10_CUDA_CHECK(cudaFuncSetAttribute(cluster_sync_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    cudaLaunchAttribute cluster_dim[1];
    cluster_dim[0].id = cudaLaunchAttributeClusterDimension;
    cluster_dim[0].val.clusterDim.x = (unsigned)blocks;
    cluster_dim[0].val.clusterDim.y = cluster_dim[0].val.clusterDim.z = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(blocks);
    config.blockDim = dim3(256);
    config.stream = stream;
    config.attrs = cluster_dim;
    config.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, cluster_sync_kernel, count, d));
    return;
  }
  C10_CUDA_CHECK(cudaMemsetAsync(c, 0, sizeof(unsigned), stream));
  void* args[] = {&count, &d, &c};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(which == 0 ? (void*)grid_sync_kernel : (void*)counter_kernel,
                                             dim3(blocks), dim3(256), args, 0, stream));
}
"""

BARRIERS = 2000
KINDS = ["grid.sync()", "release/acquire counter", "cluster.sync() (one cluster)"]
MAX_CLUSTER = 16  # blocks of the largest cluster sm_90 allows


def launch_us(module, which, n, blocks, done, counter):
    """Median us of 20 launches of n barriers (after one warm-up), each checked to have run."""
    times = []
    for rep in range(21):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        module.run(which, n, blocks, done, counter)
        end.record()
        torch.cuda.synchronize()
        if done.item() != n:
            raise SystemExit(f"barrier_cost: the {KINDS[which]} kernel did not run {n} barriers")
        if rep:
            times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def main():
    if not torch.cuda.is_available():
        raise SystemExit("barrier_cost: needs a CUDA GPU")
    if torch.cuda.get_device_capability() < (9, 0):
        raise SystemExit("barrier_cost: thread block clusters need sm_90 or later")
    cpp = "void run(int64_t which, int64_t n, int64_t blocks, torch::Tensor done, torch::Tensor counter);"
    module = load_inline("barrier_cost", cpp, cuda_sources=CUDA, functions=["run"], extra_cuda_cflags=["-O3"])
    done = torch.zeros(1, device="cuda")
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: us per barrier, 256 threads a block "
          f"(a launch of {BARRIERS} barriers less a launch of none, / {BARRIERS}; median of 20)")
    print("| blocks | " + " | ".join(KINDS) + " |")
    print("|---" * (len(KINDS) + 1) + "|")
    for blocks in (8, 16, 64, sms):
        cells = []
        for which in range(len(KINDS)):
            if which == 2 and blocks > MAX_CLUSTER:
                cells.append("n/a")
                continue
            cost = (launch_us(module, which, BARRIERS, blocks, done, counter)
                    - launch_us(module, which, 0, blocks, done, counter)) / BARRIERS
            cells.append(f"{cost:.3f}")
        print(f"| {blocks} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
