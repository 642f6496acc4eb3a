"""python -m minird.experiments NAME: run one experiment (minird/experiments/__init__.py lists them)."""

import importlib
import json
import os
import sys
import time

import torch

from minird.checkpoint import load_model
from minird.cli import Parser, positive_int, positive_ints
from minird.evaluate import held_out_sets, pyplot
from minird.generate import EXIT_THRESHOLDS

EXPERIMENTS = ["adaptive", "depth", "ccot", "latent", "baselines", "kvshare", "speculative", "diffusion"]


def main(argv=None):
    parser = Parser(prog="minird.experiments", description="minird test-time compute experiments "
                    "(minird/experiments/__init__.py says what each measures)")
    parser.add_argument("name", choices=EXPERIMENTS)
    parser.add_argument("--ckpt", default="out-tiny/ckpt.pt")
    parser.add_argument("--cap", type=positive_int, default=32,
                        help="most steps a token may run (adaptive, ccot); the trajectory's length (latent); "
                             "r of plain decoding and of the verify (speculative)")
    parser.add_argument("--lines", type=positive_int, default=256, help="held-out lines per set")
    parser.add_argument("--beyond", type=positive_int, default=7, help="hop counts past training in the second set")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--steps", type=positive_ints, default=[1, 2, 4, 8, 16, 32, 64],
                        help="r values (depth, baselines)")
    parser.add_argument("--criterion", default="kl", choices=list(EXIT_THRESHOLDS), help="exit criterion (ccot)")
    parser.add_argument("--layers", type=positive_ints, default=None,
                        help="unshared blocks of each baseline (baselines; default: R, the recurrent model's "
                             "parameters, and R x mean r, its compute at the training mean)")
    parser.add_argument("--iters", type=positive_int, default=2000,
                        help="training iterations of each baseline (baselines)")
    parser.add_argument("--kv_steps", type=positive_ints, default=[4, 8, 16], help="fixed r values (kvshare)")
    parser.add_argument("--kv_slots", type=positive_ints, default=None,
                        help="N of each compress-sN compared with the full cache (kvshare; default R, 2R, 4R)")
    parser.add_argument("--draft_steps", type=positive_ints, default=[1, 2, 4],
                        help="steps of the drafted tokens, at most --cap (speculative)")
    parser.add_argument("--lookahead_for_draft", type=positive_ints, default=[4],
                        help="tokens drafted per round (speculative)")
    parser.add_argument("--spec_lines", type=positive_int, default=16,
                        help="prompts, one per held-out line (speculative, diffusion)")
    parser.add_argument("--new_tokens", type=positive_int, default=48,
                        help="tokens written after each prompt, fewer where the context ends (speculative, diffusion)")
    parser.add_argument("--inner_recurrence", type=positive_ints, default=[4, 8, 16],
                        help="steps a round of the wave (diffusion)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    try:
        model, _, corpus = load_model(args.ckpt)
        torch.manual_seed(args.seed)
        sets = held_out_sets(corpus, args.lines, args.seed, (corpus.max_hops + 1, corpus.max_hops + args.beyond))
        experiment = importlib.import_module(f"minird.experiments.{args.name}")
        report = experiment.run(model, corpus, sets, args)
    except ValueError as err:
        sys.exit(f"minird.experiments: {err}")
    report["seconds"] = round(time.time() - t0, 1)
    experiment.show(report)
    out = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), args.name)
    with open(out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    plt = pyplot()
    saved = f" and {experiment.plot(report, out + '.png', plt)}" if plt else " (install matplotlib for the plot)"
    print(f"saved {out}.json{saved}; {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
