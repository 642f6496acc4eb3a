"""
The two costs that bound a decode kernel's design on this GPU (CUDA only, sm_90 or later):

1. What one barrier costs, with no work between barriers: the grid-wide barrier that the decode
   kernel pays 4R + 1 times a step (cooperative_groups grid.sync(), and a plain release/acquire
   counter for comparison) against the hardware barrier of one thread block cluster
   (cluster.sync()), at the decode kernel's 256 threads a block. Each cell is (time of a launch of
   2,000 barriers - time of a launch of none) / 2,000, the median of 20 launches: the barrier's
   latency alone, without the wait for a late block that a real phase adds.
2. How fast a few SMs can stream a step's weights out of L2: 8.6 MB (the toy Huginn-shaped
   model's adapter and core, bf16) split over `blocks` blocks of 1024 threads, each block reading
   its slice with 16-byte loads, 8 in flight per thread, 20 times (L2-resident after the first).
   A cluster kernel keeps its weights on its 16 SMs only, so this is its floor per step.

    python tools/decode_bounds.py

csrc/README.md ("Targets") reads the step's floor from both.
"""

import math

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

// Block b reads 16-byte vectors b * n .. (b + 1) * n - 1, reps times, through L2 (not L1: a slice is
// larger than L1, and L2 is where a decode kernel's weights live); the xor keeps the loads.
__global__ void stream_kernel(const uint4* data, int64_t n, int reps, unsigned* sink) {
  const uint4* slice = data + blockIdx.x * n;
  unsigned acc = 0;
  for (int r = 0; r < reps; r++) {
    for (int64_t i = threadIdx.x; i < n; i += 8 * blockDim.x) {
      uint4 v[8];
#pragma unroll
      for (int k = 0; k < 8; k++) {
        const int64_t j = i + k * blockDim.x;
        v[k] = j < n ? __ldcg(slice + j) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int k = 0; k < 8; k++) acc ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
    }
  }
  if (threadIdx.x == 0) atomicXor(sink, acc);
}

void stream(torch::Tensor data, int64_t blocks, int64_t reps, torch::Tensor sink) {
  const int64_t n = data.numel() / 4 / blocks;  // int32 elements -> 16-byte vectors per block
  stream_kernel<<<(unsigned)blocks, 1024, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint4*>(data.data_ptr<int>()), n, (int)reps, reinterpret_cast<unsigned*>(sink.data_ptr<int>()));
  C10_CUDA_CHECK(cudaGetLastError());
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
STEP_BYTES = 2 * (256 * 256 + 4 * (3 * 256 * 256 + 256 * 256 + 2 * 1024 * 256 + 1024 * 256))  # W_s and 4 core blocks
STREAM_REPS = 20


def stream_us(module, data, blocks, sink):
    """Median us of 20 launches that stream data STREAM_REPS times over `blocks` blocks."""
    times = []
    for rep in range(21):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        module.stream(data, blocks, STREAM_REPS, sink)
        end.record()
        torch.cuda.synchronize()
        if rep:
            times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


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
            raise SystemExit(f"decode_bounds: the {KINDS[which]} kernel did not run {n} barriers")
        if rep:
            times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def main():
    if not torch.cuda.is_available():
        raise SystemExit("decode_bounds: needs a CUDA GPU")
    if torch.cuda.get_device_capability() < (9, 0):
        raise SystemExit("decode_bounds: thread block clusters need sm_90 or later")
    cpp = ("void run(int64_t which, int64_t n, int64_t blocks, torch::Tensor done, torch::Tensor counter);\n"
           "void stream(torch::Tensor data, int64_t blocks, int64_t reps, torch::Tensor sink);")
    module = load_inline("decode_bounds", cpp, cuda_sources=CUDA, functions=["run", "stream"],
                         extra_cuda_cflags=["-O3"])
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

    grids = (16, 32, sms)
    unit = 4 * math.lcm(*grids)  # int32s: whole 16-byte vectors, the same count in every block of each grid
    data = torch.randint(0, 2**31 - 1, (STEP_BYTES // 4 // unit * unit,), dtype=torch.int32, device="cuda")
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    print(f"\nstreaming {data.numel() * 4 / 1e6:.1f} MB (a toy step's weights) out of L2, {STREAM_REPS} times, "
          f"over blocks of 1024 threads (median of 20 launches)")
    print("| blocks | us per pass | GB/s | GB/s per block (SM) |")
    print("|---|---|---|---|")
    for blocks in grids:
        us = stream_us(module, data, blocks, sink) / STREAM_REPS
        gbs = data.numel() * 4 / us / 1e3
        print(f"| {blocks} | {us:.2f} | {gbs:.0f} | {gbs / blocks:.0f} |", flush=True)


if __name__ == "__main__":
    main()
