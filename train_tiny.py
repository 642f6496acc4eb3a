"""
Train a tiny recurrent-depth model on the variable-binding corpus, then show depth scaling:
held-out accuracy by difficulty (hops) for r = 1 ... 64 test-time steps.

    python train_tiny.py                        # CPU, about a minute
    python train_tiny.py --max_iters=500 --out_dir=out-quick
    python train_tiny.py --resume=True          # go on from out-tiny/ckpt.pt (Ctrl-C saves one)
    python train_tiny.py --preset=huginn        # Huginn's three parts: prelude, a looped core of 2, coda
    torchrun --standalone --nproc_per_node=2 train_tiny.py   # DDP (gloo on CPU, nccl on GPU)

Every setting of minird/train.py's TrainConfig (the loop itself lives there) can be overridden as
--key=value (nanoGPT style); each is checked against its allowed range before any work.
"""

import json
import os
import sys

from minird.cli import ConfigError, apply_overrides
from minird.evaluate import print_depth_table, save_depth_plot
from minird.train import TrainConfig, TrainingStopped, settings_of, train, with_preset


def main(argv):
    settings = settings_of(TrainConfig())
    if {"-h", "--help"} & set(argv):
        print(__doc__.strip() + "\n\nsettings (--key=value) and their defaults; minird/train.py says what each means:")
        print("\n".join(f"  --{k}={v}" for k, v in settings.items()))
        return None
    try:
        given = apply_overrides(settings, argv)
        config = TrainConfig(**with_preset(settings, given))
        run = train(config, given)
    except (ConfigError, TrainingStopped, ValueError) as err:
        sys.exit(f"train_tiny.py: {err}")
    if run["results"] is None:  # another DDP rank, or stopped by Ctrl-C
        if run["stopped_early"]:
            print(f"stopped at iteration {run['iters']}: checkpoint saved in {config.out_dir}; "
                  f"go on with --resume=True --out_dir={config.out_dir}")
        return run
    out_dir, r_values = config.out_dir, config.depth_r_values()
    restarted = "".join(f"; restarted after {r['stopped_at']} iterations of seed {r['seed']} on the plateau"
                        for r in run["restarts"])
    print(f"\ntrained {run['iters']} iterations in {run['train_time_s']:.0f} s on {run['device']} "
          f"(seed {run['run_seed']}{restarted})")
    print_depth_table(run["results"], r_values)
    with open(os.path.join(out_dir, "depth_scaling.json"), "w") as f:
        json.dump({k: run[k] for k in ("train_time_s", "iters", "settings", "results", "log", "restarts")}, f, indent=1)
    plot = save_depth_plot(run["results"], r_values, os.path.join(out_dir, "depth_scaling.png"))
    print(f"saved {out_dir}/depth_scaling.json" + (f" and {plot}" if plot else " (install matplotlib for the plot)"))
    return run


if __name__ == "__main__":
    result = main(sys.argv[1:])  # tests/ddp_probe.py reads the trained model from here
