"""
Held-out evaluation on the toy corpus, shared by train_tiny.py and minird.experiments: the
held-out lines, teacher-forced answer accuracy by hops at a chosen r (in one forward, or token by
token through a KV cache), the depth-scaling table and its plot.
"""

import random
from dataclasses import asdict

import torch

from minird.data import CharTokenizer, CorpusConfig, encode_batch, sample_extrapolation_problems, sample_problems
from minird.generate import feed
from minird.kv_cache import KVCache


def held_out_sets(corpus, n_lines, seed, extrapolation_hops):
    """{"in-distribution": lines with every hop count 0 .. max_hops, "extrapolation": lines with
    one query of extrapolation_hops = (lo, hi) hops (and short other queries)}, n_lines each,
    drawn from random.Random(seed): with train_tiny's seed + 10000 they are its held-out lines."""
    rng = random.Random(seed)
    return {
        "in-distribution": sample_problems(rng, n_lines, CorpusConfig(**{**asdict(corpus), "min_hops": 0})),
        "extrapolation": sample_extrapolation_problems(rng, n_lines, corpus, extrapolation_hops),
    }


def encode_answers(lines, block_size, device="cpu"):
    """x, y, hops (B, T) of held-out lines: the answers are the only targets."""
    x, y, hops, _ = encode_batch(lines, CharTokenizer(), block_size)
    return x.to(device), y.to(device), hops.to(device)


@torch.no_grad()
def accuracy_by_hops(model, x, y, hops, num_steps, batch_size=256):
    """Teacher-forced accuracy of the answer digits at num_steps, grouped by hop count: {hops: acc}."""
    correct = torch.zeros(int(hops.max()) + 1)
    total = torch.zeros_like(correct)
    for i in range(0, x.size(0), batch_size):
        logits, _ = model(x[i:i + batch_size], num_steps=num_steps)
        target, h = y[i:i + batch_size], hops[i:i + batch_size]
        scored = target >= 0
        right = (logits.argmax(-1) == target)[scored].float().cpu()
        correct.index_add_(0, h[scored].cpu(), right)
        total.index_add_(0, h[scored].cpu(), torch.ones_like(right))
    return {h: (correct[h] / total[h]).item() for h in range(len(total)) if total[h] > 0}


@torch.no_grad()
def decode_token_by_token(model, x, cap, criterion, continuous_compute=False, threshold="auto", kv_cache=None):
    """Feed x (B, T) one token at a time through a KV cache with adaptive exit (at most cap steps;
    criterion "none": exactly cap steps) with feed, as generate feeds the tokens it writes
    (tests/test_experiments.py checks that), except that the next token is x's and not the model's:
    teacher-forced decoding. kv_cache: an empty KVCache of x.size(1) positions or more, to fill
    (kvshare passes compress-sN ones and reads their size after); default a full one. Returns
    logits (B, T, vocab) and steps used (B, T)."""
    if kv_cache is None:
        kv_cache = KVCache(x.size(1), "full", model.config.n_layers_in_recurrent_block, cap)
    s, logits, steps = None, [], []
    for t in range(x.size(1)):
        token_logits, used, s = feed(model, x[:, t:t + 1], kv_cache, cap, criterion, threshold,
                                     s0=s if continuous_compute else None)
        logits.append(token_logits)
        steps.append(used)
    return torch.cat(logits, dim=1), torch.cat(steps, dim=1)


def depth_results(model, sets, r_values, lowest_extrapolation_hops):
    """{set: {r: {hops: accuracy}}} at every r of r_values. The extrapolation set reports only its
    hop counts from lowest_extrapolation_hops on (its other queries are short, in-distribution).
    Evaluation draws s0 under a forked RNG: it never changes what training draws next."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for name, lines in sets.items():
            lowest = lowest_extrapolation_hops if name == "extrapolation" else 0
            x, y, hops = encode_answers(lines, model.config.block_size, device)
            results[name] = {r: {h: a for h, a in accuracy_by_hops(model, x, y, hops, r).items() if h >= lowest}
                             for r in r_values}
    model.train(was_training)
    return results


def print_depth_table(results, r_values):
    """results: {set name: {r: {hops: acc}}} -> one table, rows = hops, columns = r."""
    header = f"{'set':<16}{'hops':>5} | " + " ".join(f"r={r:<5}" for r in r_values)
    print(header)
    print("-" * len(header))
    for name, by_r in results.items():
        for h in sorted(by_r[r_values[0]]):
            print(f"{name:<16}{h:>5} | " + " ".join(f"{100 * by_r[r][h]:6.1f}%" for r in r_values))


def pyplot():
    """matplotlib.pyplot on a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path, dpi=100):
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def save_depth_plot(results, r_values, path):
    """Accuracy vs r, one line per hop count; returns the path, or None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), sharey=True, squeeze=False)
    for ax, (name, by_r) in zip(axes[0], results.items()):
        for h in sorted(by_r[r_values[0]]):
            ax.plot(r_values, [100 * by_r[r][h] for r in r_values], marker="o", label=f"{h} hops")
        ax.set_xscale("log", base=2)
        ax.set_xticks(r_values, [str(r) for r in r_values])
        ax.set_xlabel("recurrent steps r at test time")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("answer accuracy (%)")
    return save_figure(fig, path)
