"""
Where the time of one decode_steps call goes, phase by phase (CUDA only). Builds an instrumented
copy of a decode kernel source as an extension of its own: thread 0 of every block stamps the
GPU's global timer (%globaltimer) before and after every grid-wide barrier. Then it times the
instrumented kernel replayed from a CUDA graph on the bench's decode case (one token after 128
cached ones, 4 steps, bf16), and prints, per barrier of the second step: the phase before it (from
the earliest departure from the previous barrier to the last block's arrival: the critical path)
and the barrier itself (from the last arrival to the median departure).

    python tools/decode_phase_timing.py                    # csrc/cuda/decode.cu at h = 256
    python tools/decode_phase_timing.py --version 4        # csrc/cuda/decode_cluster.cu
    python tools/decode_phase_timing.py --h 1024 --source path/to/another/decode.cu

Version 4 (the cluster kernel) is stamped before its cluster barrier's arrive and after its wait.

The timer ticks in steps of ~0.26 us on an H200, so single phases read to about that. The stamps add a
block barrier (__syncthreads) per grid barrier; the tool prints the instrumented kernel's time per
step next to the table, to compare with the uninstrumented one in `python -m minird.bench`.
"""

import argparse
import re
import sys
import tempfile
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minird import bench, ops  # noqa: E402
from minird.cli import positive_int  # noqa: E402

MAX_BLOCKS, MAX_EVENTS = 160, 96  # stamps kept: blocks x barriers of one launch

STAMPS = f"""
__device__ unsigned long long g_stamps[{MAX_BLOCKS} * {MAX_EVENTS} * 2];
__device__ inline unsigned long long global_time() {{
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}}
#define STAMP(which) if (threadIdx.x == 0 && event < {MAX_EVENTS} && blockIdx.x < {MAX_BLOCKS}) \\
    g_stamps[(blockIdx.x * {MAX_EVENTS} + event) * 2 + which] = global_time()
"""

# how each version's source is entered from Python: its launcher, the arguments made into a call
ENTRY = {
    2: """minird::decode_steps_cuda(s, e_proj, adapter, blocks, cos, sin, k, v, pos, num_steps, n_head, eps,
                                     std::nullopt)""",
    4: """[&] {
      at::Tensor out = at::empty_like(s);
      minird::decode_steps_on_cluster(s, e_proj, adapter, blocks, cos, sin, k, v, pos, num_steps, n_head, eps,
                                      std::nullopt, out);
      return out;
    }()""",
}
# each version's barrier, as a regular expression of its call, and the line after which `event` is declared
BARRIERS = {
    2: (r"\bgrid\.sync\(\);", "__syncthreads(); STAMP(0); grid.sync(); STAMP(1); event++;",
        r"(cg::grid_group grid = cg::this_grid\(\);)"),
    4: (r"\bcluster_arrive\(\);((?:.|\n)*?)\bcluster_wait\(\);",
        r"__syncthreads(); STAMP(0); cluster_arrive();\1cluster_wait(); STAMP(1); event++;",
        r"(cg::cluster_group cluster = cg::this_cluster\(\);)"),
}

BINDINGS = """
namespace minird {{
at::Tensor decode_stamps() {{
  auto t = torch::empty({{{MAX_BLOCKS}, {MAX_EVENTS}, 2}}, torch::dtype(torch::kLong));
  C10_CUDA_CHECK(cudaMemcpyFromSymbol(t.data_ptr(), g_stamps, t.numel() * sizeof(int64_t)));
  return t;
}}
}}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {{
  m.def("decode_steps", [](const at::Tensor& s, const at::Tensor& e_proj, const at::Tensor& adapter,
                           std::vector<at::Tensor> blocks, const at::Tensor& cos, const at::Tensor& sin,
                           std::vector<at::Tensor> k, std::vector<at::Tensor> v, int64_t pos, int64_t num_steps,
                           int64_t n_head, double eps) {{
    return {entry};
  }});
  m.def("stamps", &minird::decode_stamps);
}}
"""


def instrument(source, version):
    """The kernel source with a stamp before and after every barrier, its own Python bindings in
    place of the TORCH_LIBRARY registration (so that it does not clash with minird._C)."""
    barrier, stamped, anchor = BARRIERS[version]
    text, n = re.subn(barrier, stamped, source)
    if n == 0:
        raise SystemExit(f"decode_phase_timing: no barrier of version {version} in the source: nothing to time")
    text, n = re.subn(anchor, r"\1\n  int event = 0;", text, count=1)
    if n == 0:
        raise SystemExit(f"decode_phase_timing: no {anchor!r} in the source to declare the stamps' counter after")
    text = text.replace("namespace cg = cooperative_groups;", "namespace cg = cooperative_groups;\n" + STAMPS, 1)
    text = re.sub(r"TORCH_LIBRARY_IMPL\(minird, CUDA, m\) \{[^}]*\}", "", text)
    return "#include <torch/extension.h>\n" + text + BINDINGS.format(entry=ENTRY[version], MAX_BLOCKS=MAX_BLOCKS, MAX_EVENTS=MAX_EVENTS)


def decode_inputs(h, dtype):
    """The bench's decode case (minird.bench.decode_case): a model of width h on the reference path,
    a KV cache of bench.CACHE tokens, and the arguments of decode_steps for bench.STEPS steps."""
    model = bench.bench_model(h, "cuda", dtype).eval()
    W, nh, eps = model.adapter.weight, model.core[0].attn.n_head, model.core[0].norm_1.eps
    with torch.no_grad():
        _, k_cache, v_cache = bench.decode_cache(model, "cuda")
    s = torch.randn(1, 1, h, device="cuda", dtype=dtype)
    e_proj = F.linear(torch.randn(1, 1, h, device="cuda", dtype=dtype), W[:, h:])
    pos = bench.CACHE
    return (s, e_proj, W, ops.block_weights(model.core), model.rope_cos[pos:pos + 1], model.rope_sin[pos:pos + 1],
            k_cache, v_cache, pos, bench.STEPS, nh, eps)


def replay_time_per_step(fn):
    """Median us per recurrent step of fn() replayed from a CUDA graph (minird.bench's timing)."""
    return bench.median_time(bench.cuda_graph(fn), "cuda") * 1e6 / bench.STEPS


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", type=int, choices=[2, 4], default=2,
                        help="2: the grid kernel (csrc/cuda/decode.cu), 4: the cluster kernel (decode_cluster.cu)")
    parser.add_argument("--source", type=Path, help="the kernel source (default: the version's file)")
    parser.add_argument("--h", type=positive_int, default=256, help="model width, a multiple of 64 (heads of 64)")
    args = parser.parse_args()
    if args.h % 64:
        parser.error(f"--h must be a multiple of 64 (heads of 64), got {args.h}")
    if not torch.cuda.is_available():
        raise SystemExit("decode_phase_timing: needs a CUDA GPU")
    if not ops._HAS_DECODE_KERNEL:
        raise SystemExit("decode_phase_timing: minird._C has no CUDA decode_steps (build with CUDA first)")
    if args.source is None:
        args.source = ROOT / "csrc/cuda" / ("decode.cu" if args.version == 2 else "decode_cluster.cu")
    if not args.source.is_file():
        raise SystemExit(f"decode_phase_timing: no such file: {args.source}")
    from torch.utils.cpp_extension import load

    build = Path(tempfile.mkdtemp(prefix="decode_phase_timing_"))
    (build / "decode_timed.cu").write_text(instrument(args.source.read_text(), args.version))
    # version 2's launcher hands MINIRD_DECODE_VERSION=4 to the cluster kernel: link it, uninstrumented
    sources = [build / "decode_timed.cu"] + ([ROOT / "csrc/cuda/decode_cluster.cu"] if args.version == 2 else [])
    timed = load("decode_timed", [str(path) for path in sources], build_directory=str(build),
                 extra_include_paths=[str(ROOT / "csrc/cuda")], extra_cuda_cflags=["-O3", "-std=c++17"])

    call = decode_inputs(args.h, torch.bfloat16)
    with torch.no_grad():
        diff = (timed.decode_steps(*call).float() - ops.decode_steps(*call).float()).abs().max().item()
        us_per_step = replay_time_per_step(lambda: timed.decode_steps(*call))
        built_us = replay_time_per_step(lambda: ops.decode_steps(*call))
    stamps = timed.stamps().double()
    blocks = int((stamps[:, 0, 0] != 0).sum())
    stamps = stamps[:blocks]
    per_step = int((stamps[0, :, 0] != 0).sum()) // bench.STEPS
    arrive, depart = stamps[:, :, 0], stamps[:, :, 1]
    print(f"{args.source.name}, h={args.h}, bf16, {torch.cuda.get_device_name()}: {blocks} blocks, {per_step} "
          f"barriers per step; instrumented {us_per_step:.1f} us/step, built {built_us:.1f} us/step (graph "
          f"replay); instrumented vs built output, max |diff| {diff:.3g}")
    print("| barrier | phase before it (critical, us) | phase (median block, us) | barrier (us) |")
    print("|---|---|---|---|")
    phases = barriers = 0.0
    for k in range(per_step, 2 * per_step):  # the second step: the first has the launch's start in it
        critical = (arrive[:, k].max() - depart[:, k - 1].min()).item() / 1e3
        median = (arrive[:, k] - depart[:, k - 1]).median().item() / 1e3
        barrier = (depart[:, k].median() - arrive[:, k].max()).item() / 1e3
        phases, barriers = phases + critical, barriers + barrier
        print(f"| {k - per_step} | {critical:.2f} | {median:.2f} | {barrier:.2f} |")
    print(f"one step: phases {phases:.1f} us + barriers {barriers:.1f} us")


if __name__ == "__main__":
    main()
