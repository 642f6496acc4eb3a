"""
Test-time compute experiments on the checkpoint that train_tiny.py writes (SPEC section 3):

    python -m minird.experiments adaptive            # steps used per token vs difficulty
    python -m minird.experiments adaptive --ckpt out-tiny/ckpt.pt --cap 32

Each prints a table and saves JSON (and a PNG with matplotlib) next to the checkpoint.

adaptive: held-out lines (the training difficulties, then --beyond hop counts past them) run
teacher-forced with per-token adaptive exit (each position stops when its criterion says it has
converged, at most --cap steps), for every criterion at its default threshold. Reported per hop count: the mean steps the answer tokens used and their
accuracy, beside fixed r = cap. The paper's Fig. 10 in miniature: harder problems should stop later.
"""

import argparse
import json
import os
import random
import sys
from dataclasses import asdict

import torch

from minird.data import CharTokenizer, CorpusConfig, encode_batch, sample_extrapolation_problems, sample_problems
from minird.model import EXIT_THRESHOLDS, ExitCriterion
from minird.utils import load_model


@torch.no_grad()
def steps_and_accuracy(model, x, y, hops, cap, criterion):
    """{hops: (mean steps used, accuracy)} of the answer tokens, teacher-forced, one forward."""
    T = x.size(1)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    e = model.embed(x, cos, sin)
    if criterion == "none":
        s, used = model.iterate(e, (cap, 0), cos, sin), torch.full_like(x, cap)
    else:
        rule = ExitCriterion(criterion, "auto", x.shape, model.config.vocab_size, x.device)
        s, used = model.iterate_adaptive(e, cap, cos, sin, rule)
    right = model.decode(s, cos, sin).argmax(-1) == y
    return {h: (used[hops == h].float().mean().item(), right[hops == h].float().mean().item())
            for h in sorted(set(hops[hops >= 0].tolist()))}


def adaptive(model, corpus, cap, n_lines, seed, beyond):
    rng = random.Random(seed)
    lines = sample_problems(rng, n_lines, CorpusConfig(**{**asdict(corpus), "min_hops": 0}))
    lines += sample_extrapolation_problems(rng, n_lines, corpus, (corpus.max_hops + 1, corpus.max_hops + beyond))
    x, y, hops, _ = encode_batch(lines, CharTokenizer(), model.config.block_size)
    return {c: steps_and_accuracy(model, x, y, hops, cap, c) for c in ["none", *EXIT_THRESHOLDS]}


def print_adaptive(results, cap):
    criteria = list(results)
    print(f"mean steps used / accuracy (%) of the answers, by hops (cap {cap}; 'none' = fixed r = {cap})")
    print(f"{'hops':>4} | " + " | ".join(f"{c:>16}" for c in criteria))
    for h in results["none"]:
        print(f"{h:>4} | " + " | ".join(f"{results[c][h][0]:6.1f} / {100 * results[c][h][1]:5.1f}%" for c in criteria))


def save_adaptive_plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for c, by_h in results.items():
        if c != "none":
            ax.plot(list(by_h), [steps for steps, _ in by_h.values()], marker="o", label=c)
    ax.set_xlabel("hops of the answer (> training max: extrapolation)")
    ax.set_ylabel("mean steps used before exit")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="minird test-time compute experiments")
    parser.add_argument("name", choices=["adaptive"])
    parser.add_argument("--ckpt", default="out-tiny/ckpt.pt")
    parser.add_argument("--cap", type=int, default=32, help="most steps a token may run")
    parser.add_argument("--lines", type=int, default=256, help="held-out lines per set")
    parser.add_argument("--beyond", type=int, default=7, help="hop counts past training in the second set")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    if min(args.cap, args.lines, args.beyond) < 1:
        sys.exit("minird.experiments: --cap, --lines and --beyond must be positive")
    try:
        model, _, corpus = load_model(args.ckpt)
    except ValueError as err:
        sys.exit(f"minird.experiments: {err}")
    torch.manual_seed(args.seed)
    results = adaptive(model, corpus, args.cap, args.lines, args.seed, args.beyond)
    print_adaptive(results, args.cap)
    out = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "adaptive")
    with open(out + ".json", "w") as f:
        json.dump({"cap": args.cap, "results": results}, f, indent=1)
    plot = save_adaptive_plot(results, out + ".png")
    print(f"saved {out}.json" + (f" and {plot}" if plot else " (install matplotlib for the plot)"))


if __name__ == "__main__":
    main()
