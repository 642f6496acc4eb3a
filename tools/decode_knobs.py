"""
decode_steps alone under each of its kernel choices and shared-memory knobs (CUDA only): us per
recurrent step, replayed from a CUDA graph, on the bench's decode case (one token after 128 cached
ones, 4 steps per call, the bench model's weights; `python -m minird.bench` times the default choice
in its "decode kernel + graph" column). Each variant's output is checked against its version's
first variant: within a version every knob keeps the same sums in the same order, so the bits must
not change (the two versions sum in other orders: close, not the same bits).

    python tools/decode_knobs.py                        # h = 256, bf16
    python tools/decode_knobs.py --h 1024 --dtype float32

The knobs are environment variables that the launchers read at every call (csrc/README.md,
"Targets"); a variant that does not apply (version 4 at a width it does not take) prints its reason.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from decode_phase_timing import decode_inputs, replay_time_per_step  # noqa: E402  (the same case and timing)
from minird import bench, ops  # noqa: E402
from minird.cli import Parser, positive_int  # noqa: E402

VARIANTS = {
    "version 2 (the default)": {},
    "version 2, weights in shared memory": {"MINIRD_DECODE_WEIGHTS_IN_SMEM": "16"},
    "version 2, keys and values from L2": {"MINIRD_DECODE_KV_IN_SMEM": "0"},
    "version 4": {"MINIRD_DECODE_VERSION": "4"},
    "version 4, weights from L2": {"MINIRD_DECODE_VERSION": "4", "MINIRD_DECODE_WEIGHTS_IN_SMEM": "0"},
    "version 4, cluster of 8": {"MINIRD_DECODE_VERSION": "4", "MINIRD_DECODE_CLUSTER": "8"},
}
KNOBS = sorted({key for env in VARIANTS.values() for key in env})


def main(argv):
    parser = Parser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--h", type=positive_int, default=256, help="model width (heads of 64)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not ops._HAS_DECODE_KERNEL:
        parser.error("needs a GPU and minird._C built with its CUDA kernels")
    if args.h % 64:
        parser.error(f"--h must be a multiple of 64 (heads of 64), got {args.h}")
    if any(key in os.environ for key in KNOBS):
        parser.error(f"unset {', '.join(k for k in KNOBS if k in os.environ)} first: each variant sets its own")

    dtype = getattr(torch, args.dtype)
    inputs = decode_inputs(args.h, dtype)

    def call():
        return ops.decode_steps(*inputs)

    print(f"decode_steps alone: h={args.h} {args.dtype}, {bench.R} core blocks, {bench.STEPS} steps per call, "
          f"{bench.CACHE} cached tokens; {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| variant | environment | us per step |")
    print("|---|---|---|")
    first_of_version = {}  # version -> its first variant's output
    for name, env in VARIANTS.items():
        os.environ.update(env)
        try:
            with torch.no_grad():
                out = call().clone()  # (the one call that may fail: the launcher checks the choice)
                reference = first_of_version.setdefault(env.get("MINIRD_DECODE_VERSION", "2"), out)
                same = torch.equal(out, reference)
                us = replay_time_per_step(call)
            result = f"{us:.1f}" + ("" if same else " (NOT the bits of its version's first variant)")
        except RuntimeError as exc:
            result = f"n/a: {str(exc).splitlines()[0]}"
        finally:
            for key in env:
                del os.environ[key]
        print(f"| {name} | {' '.join(f'{k}={v}' for k, v in env.items()) or '-'} | {result} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
