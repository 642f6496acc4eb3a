"""
Test-time compute experiments on the checkpoint that train_tiny.py writes (SPEC section 3):

    python -m minird.experiments adaptive    # steps each answer uses with adaptive exit, by hops
    python -m minird.experiments depth       # accuracy vs r = 1 ... 64, by hops (the depth-scaling table)
    python -m minird.experiments ccot        # steps per token decoded one at a time, with and without
                                             # continuous compute (s0 = the previous token's state)
    python -m minird.experiments latent      # the states s_1 ... s_r of answer tokens: PCA, convergence
    python -m minird.experiments baselines   # non-recurrent models (1 and 4 layers, r = 1) trained on
                                             # the same corpus, against the recurrent model at every r
    python -m minird.experiments kvshare     # answer accuracy and KV-cache bytes per token, full cache
                                             # vs compress-sN (N slots shared by the steps), at fixed r
    python -m minird.experiments speculative # self-speculative decoding: acceptance rate and tokens/s
                                             # against plain greedy decoding, same output
    python -m minird.experiments depth --ckpt out-tiny/ckpt.pt --steps 1,4,16 --lines 128

Each prints a table and saves NAME.json (and NAME.png with matplotlib) next to the checkpoint.
docs/EXPERIMENTS.md has what each measured on the default checkpoint.

Every experiment reads the same held-out lines (held_out_sets): --lines lines of the training
distribution (hops 0 .. max_hops) and --lines lines with one query of max_hops + 1 ... max_hops +
--beyond hops (extrapolation). With --seed = train_tiny's seed + 10000 (11337 by default) they are
the lines of train_tiny's own final table.

adaptive: each position, teacher-forced in one forward, stops when its criterion says it has
converged (at most --cap steps), for every criterion at its default threshold; mean steps used
by the answer tokens and their accuracy per hop count, beside fixed r = cap (the paper's Fig. 10).
depth: teacher-forced answer accuracy at each r of --steps, per hop count, both sets.
ccot: every line is fed one token at a time through a KV cache, the way generate() feeds the
tokens it writes, with adaptive exit (--criterion, at most --cap steps); the next token is the
line's own (teacher-forced: the model was trained on the answers only, so it cannot write the
queries itself). Mean steps per token by token kind, and answer accuracy, with each token's s0
fresh or the previous token's final state.
latent: the states after steps 1 ... --cap of every answer token; per hop count, when the relative
step |s_t - s_(t-1)| / |s_t| falls below 0.03 and where the trajectory ends (a point, an orbit or a
slider); a PNG of a few trajectories on their top-3 principal components.
baselines: trains, with train_tiny.py in a subprocess, one non-recurrent model per --layers (r fixed
to 1, last-step loss, same corpus, curriculum and settings as the checkpoint) for --iters
iterations, into baseline-<L>-layers/ next to the checkpoint, and compares their accuracy by hops
with the recurrent model's at every r of --steps.
kvshare: every line is fed one token at a time (as in ccot) at a fixed r of --kv_steps, through a
KV cache that keeps every (step, core layer)'s keys ("full") or shares N slots among them
("compress-sN", step i / core layer j writing slot (i * R + j) mod N, N of --kv_slots; default R,
2R and 4R); answer accuracy by hops on both sets, and the cache's bytes per token.
speculative: completes the first --spec_lines in-distribution lines' prompts (the program and the
first query) with --new_tokens tokens, greedy at r = --cap, plainly and with self-speculative
decoding (generate's draft_steps, for every --draft_steps and --lookahead_for_draft), one line at a
time and as one left-padded batch; checks that both write the same tokens (ValueError if not), and
reports the acceptance rate, the forwards at r, and tokens/s and speed-ups from the median wall
time (and CPU time) of 5 timed runs of each, taken in turn after a warm-up round (the machine may
be shared: turns spread its load over all alike; --threads sets torch's CPU threads). The model
was trained on answers only: after the answer it writes what it writes, not program text; the
check is equality with plain decoding.
"""

import argparse
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict

import torch

from minird.data import CharTokenizer, CorpusConfig, encode_batch, sample_extrapolation_problems, sample_problems
from minird.model import EXIT_THRESHOLDS, DraftStats, ExitCriterion, KVCache, left_pad
from minird.utils import (accuracy_by_hops, load_checkpoint, load_model, positive_ints, print_depth_table,
                          save_depth_plot)

TRAIN_TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_tiny.py")


# -----------------------------------------------------------------------------
# shared by the experiments


def held_out_sets(corpus, n_lines, seed, beyond):
    """{"in-distribution": lines with every hop count 0 .. max_hops, "extrapolation": lines with one
    query of max_hops + 1 ... max_hops + beyond hops (and short other queries)}, n_lines each."""
    rng = random.Random(seed)
    return {
        "in-distribution": sample_problems(rng, n_lines, CorpusConfig(**{**asdict(corpus), "min_hops": 0})),
        "extrapolation": sample_extrapolation_problems(rng, n_lines, corpus,
                                                       (corpus.max_hops + 1, corpus.max_hops + beyond)),
    }


def encode(lines, model):
    """x, y, hops (B, T) of held-out lines: answers are the only targets."""
    x, y, hops, _ = encode_batch(lines, CharTokenizer(), model.config.block_size)
    return x, y, hops


def depth_results(model, sets, r_values, max_hops):
    """{set: {r: {hops: accuracy}}}, teacher-forced, as train_tiny.py's final table: the
    extrapolation set reports only its hop counts past max_hops (its other queries are short)."""
    results = {}
    for name, lines in sets.items():
        lowest = max_hops + 1 if name == "extrapolation" else 0
        x, y, hops = encode(lines, model)
        results[name] = {r: {h: a for h, a in accuracy_by_hops(model, x, y, hops, r).items() if h >= lowest}
                         for r in r_values}
    return results


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


# -----------------------------------------------------------------------------
# adaptive: steps used per answer vs difficulty


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


def adaptive(model, sets, cap):
    x, y, hops = encode(sets["in-distribution"] + sets["extrapolation"], model)
    return {"cap": cap, "results": {c: steps_and_accuracy(model, x, y, hops, cap, c)
                                    for c in ["none", *EXIT_THRESHOLDS]}}


def print_adaptive(report):
    results, cap = report["results"], report["cap"]
    criteria = list(results)
    print(f"mean steps used / accuracy (%) of the answers, by hops (cap {cap}; 'none' = fixed r = {cap})")
    print(f"{'hops':>4} | " + " | ".join(f"{c:>16}" for c in criteria))
    for h in results["none"]:
        print(f"{h:>4} | " + " | ".join(f"{results[c][h][0]:6.1f} / {100 * results[c][h][1]:5.1f}%" for c in criteria))


def save_adaptive_plot(report, path, plt):
    fig, ax = plt.subplots(figsize=(6, 4))
    for c, by_h in report["results"].items():
        if c != "none":
            ax.plot(list(by_h), [steps for steps, _ in by_h.values()], marker="o", label=c)
    ax.set_xlabel("hops of the answer (> training max: extrapolation)")
    ax.set_ylabel("mean steps used before exit")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


# -----------------------------------------------------------------------------
# depth: accuracy vs r


def depth(model, sets, r_values, max_hops):
    return {"r_values": r_values, "results": depth_results(model, sets, r_values, max_hops)}


def print_depth(report):
    print("held-out answer accuracy (%) by hops (rows) and test-time steps r (columns)")
    print_depth_table(report["results"], report["r_values"])


def save_depth_figure(report, path, plt):
    return save_depth_plot(report["results"], report["r_values"], path)


# -----------------------------------------------------------------------------
# ccot: continuous chain of thought (s0 = the previous token's final state)


@torch.no_grad()
def decode_token_by_token(model, x, cap, criterion, continuous_compute=False, threshold="auto", kv_cache=None):
    """Feed x (B, T) one token at a time through a KV cache with adaptive exit (at most cap steps;
    criterion "none": exactly cap steps) with model.feed, as model.generate feeds the tokens it
    writes (tests/test_experiments.py checks that), except that the next token is x's and not the model's.
    kv_cache: an empty KVCache to fill (kvshare passes compress-sN ones and reads their size
    after); default a full one. Returns logits (B, T, vocab) and steps used (B, T)."""
    if kv_cache is None:
        kv_cache = KVCache(model.config.block_size, "full", len(model.core))
    s, logits, steps = None, [], []
    for t in range(x.size(1)):
        token_logits, used, s = model.feed(x[:, t:t + 1], kv_cache, cap, criterion, threshold,
                                           s0=s if continuous_compute else None)
        logits.append(token_logits)
        steps.append(used)
    return torch.cat(logits, dim=1), torch.cat(steps, dim=1)


TOKEN_KINDS = ["name", "value", ";", "?", "answer digit"]


def answer_kind(hops, max_hops):
    return f"answer, {hops} hop{'' if hops == 1 else 's'}" + (" *" if hops > max_hops else "")


def token_kinds(line, max_hops):
    """The kind of each input position of a line (its last character is never an input): in the
    program name / value / ';', in the queries '?' / the queried name, where the answer is
    predicted ('answer, h hops') / the answer digit."""
    first_query = line.text.index("?")
    answer_hops = {pos - 1: h for pos, h in zip(line.answer_positions, line.hops)}
    kinds = []
    for t in range(len(line.text) - 1):
        if t < first_query:
            kinds.append(TOKEN_KINDS[t % 3])
        elif t in answer_hops:
            kinds.append(answer_kind(answer_hops[t], max_hops))
        else:
            kinds.append("?" if line.text[t] == "?" else "answer digit")
    return kinds


def ccot(model, sets, cap, criterion, max_hops):
    lines = sets["in-distribution"] + sets["extrapolation"]
    x, y, _ = encode(lines, model)
    hop_counts = sorted({h for line in lines for h in line.hops})
    names = [answer_kind(h, max_hops) for h in hop_counts] + TOKEN_KINDS
    kind = torch.full_like(x, -1)  # (B, T): index in names, -1 = padding
    for b, line in enumerate(lines):
        kind[b, :len(line.text) - 1] = torch.tensor([names.index(k) for k in token_kinds(line, max_hops)])
    results = {}
    for mode, continuous in (("fresh", False), ("continuous", True)):
        t0 = time.time()
        logits, steps = decode_token_by_token(model, x, cap, criterion, continuous)
        right = (logits.argmax(-1) == y).float()
        by_kind = {}
        for i, name in enumerate(names + ["all tokens"]):
            sel = kind == i if i < len(names) else kind >= 0
            by_kind[name] = {"tokens": int(sel.sum()), "steps": steps[sel].float().mean().item(),
                             "accuracy": right[sel].mean().item() if name.startswith("answer,") else None}
        results[mode] = {"seconds": round(time.time() - t0, 1), "by_kind": by_kind}
    return {"cap": cap, "criterion": criterion, "lines": len(lines), "results": results}


def print_ccot(report):
    fresh, cont = (report["results"][m]["by_kind"] for m in ("fresh", "continuous"))
    print(f"tokens fed one at a time, adaptive exit ({report['criterion']}, cap {report['cap']}): mean steps "
          "per token and answer accuracy, s0 fresh vs the previous token's state (* = beyond training)")
    print(f"{'token kind':<18}{'tokens':>7} | {'steps fresh':>11} {'continuous':>10} | "
          f"{'acc fresh':>9} {'continuous':>10}")
    for kind, f in fresh.items():
        c = cont[kind]
        acc = f"{100 * f['accuracy']:8.1f}% {100 * c['accuracy']:9.1f}%" if f["accuracy"] is not None else ""
        print(f"{kind:<18}{f['tokens']:>7} | {f['steps']:11.2f} {c['steps']:10.2f} | {acc}")


def save_ccot_plot(report, path, plt):
    fresh, cont = (report["results"][m]["by_kind"] for m in ("fresh", "continuous"))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 2]})
    answers = [k for k in fresh if k.startswith("answer,")]
    for ax, kinds, value in ((left, list(fresh), "steps"), (right, answers, "accuracy")):
        at = torch.arange(len(kinds)).float()
        scale = 100 if value == "accuracy" else 1
        ax.bar(at - 0.2, [scale * fresh[k][value] for k in kinds], width=0.4, label="fresh s0")
        ax.bar(at + 0.2, [scale * cont[k][value] for k in kinds], width=0.4, label="continuous compute")
        ax.set_xticks(at.tolist(), kinds, rotation=60, ha="right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    left.set_ylabel(f"mean steps used ({report['criterion']}, cap {report['cap']})")
    right.set_ylabel("answer accuracy (%)")
    return save_figure(fig, path)


# -----------------------------------------------------------------------------
# latent: the trajectory s_1 ... s_r of answer tokens


@torch.no_grad()
def answer_trajectories(model, x, y, hops, r, batch_size=64):
    """States s_0 ... s_r (r + 1, N, h) of the N answer tokens, their hops (N,) and whether the
    answer decoded from s_r is right (N,)."""
    states, answer_hops, right = [], [], []
    for i in range(0, x.size(0), batch_size):
        xb, yb, hb = x[i:i + batch_size], y[i:i + batch_size], hops[i:i + batch_size]
        cos, sin = model.rope_cos[:xb.size(1)], model.rope_sin[:xb.size(1)]
        e = model.embed(xb, cos, sin)
        s0 = model.initialize_state(e)
        trajectory = torch.stack([s0] + model.iterate(e, (0, r), cos, sin, keep_states=True, s0=s0))  # (r+1, B, T, h)
        answers = hb >= 0
        states.append(trajectory[:, answers])
        answer_hops.append(hb[answers])
        right.append((model.decode(trajectory[-1], cos, sin).argmax(-1) == yb)[answers])
    return torch.cat(states, dim=1), torch.cat(answer_hops), torch.cat(right)


def principal_components(trajectory, k=3):
    """Projection (r, k) of one token's states (r, h) on their top-k principal components, and
    the share of the variance each explains."""
    centered = trajectory - trajectory.mean(0)
    _, S, Vh = torch.linalg.svd(centered, full_matrices=False)
    return centered @ Vh[:k].T, (S[:k] ** 2 / (S ** 2).sum()).tolist()


def latent(model, sets, r, max_hops, threshold=0.03, n_examples=6):
    lines = sets["in-distribution"] + sets["extrapolation"]
    x, y, hops = encode(lines, model)
    states, answer_hops, right = answer_trajectories(model, x, y, hops, r)
    distance = (states[1:] - states[:-1]).norm(dim=-1)  # (r, N): |s_t - s_(t-1)|, t = 1 ... r
    relative = distance / states[1:].norm(dim=-1).clamp_min(1e-12)
    below = relative < threshold
    first_below = torch.where(below.any(0), below.float().argmax(0) + 1, 0)  # step t, 0 = never
    # where the last half goes: no motion (a point), motion that returns (an orbit), or motion
    # along a direction (a slider): net displacement over path length of steps r/2 ... r
    half = r // 2
    path = distance[half:].sum(0)
    net = (states[-1] - states[half]).norm(dim=-1)
    shape = [("point" if relative[-1, n] < threshold else "slider" if net[n] > 0.5 * path[n] else "orbit")
             for n in range(states.size(1))]
    by_hops = {}
    for h in sorted(set(answer_hops.tolist())):
        sel = answer_hops == h
        stopped = first_below[sel][first_below[sel] > 0].float()
        by_hops[h] = {
            "tokens": int(sel.sum()), "accuracy": right[sel].float().mean().item(),
            "first_below": stopped.mean().item() if len(stopped) else None,
            "never_below": (first_below[sel] == 0).float().mean().item(),
            "final_distance": distance[-1, sel].mean().item(), "final_relative": relative[-1, sel].mean().item(),
            "shapes": {k: sum(s == k for s, keep in zip(shape, sel.tolist()) if keep)
                       for k in ("point", "orbit", "slider")},
            "distance": distance[:, sel].mean(1).tolist(), "relative": relative[:, sel].mean(1).tolist(),
        }
    examples = []
    hop_counts = sorted(by_hops)
    for h in sorted({hop_counts[round(i * (len(hop_counts) - 1) / (n_examples - 1))] for i in range(n_examples)}):
        n = int(torch.nonzero(answer_hops == h)[0])  # the first answer with h hops
        projection, explained = principal_components(states[1:, n])
        examples.append({"hops": h, "right": bool(right[n]), "shape": shape[n],
                         "projection": projection.tolist(), "explained": explained})
    return {"r": r, "threshold": threshold, "by_hops": by_hops, "examples": examples}


def print_latent(report):
    r, threshold = report["r"], report["threshold"]
    print(f"answer tokens' states s_1 ... s_{r}: relative step |s_t - s_(t-1)| / |s_t|; first t below {threshold} "
          f"(mean over tokens that get there), final step sizes, and the last half's shape")
    print(f"{'hops':>4} {'tokens':>6} {'acc':>6} | {'first t<thr':>11} {'never':>6} | {'final |ds|':>10} "
          f"{'final rel':>9} | {'point':>5} {'orbit':>5} {'slider':>6}")
    for h, row in report["by_hops"].items():
        first = f"{row['first_below']:11.1f}" if row["first_below"] is not None else f"{'-':>11}"
        shapes = row["shapes"]
        print(f"{h:>4} {row['tokens']:>6} {100 * row['accuracy']:5.1f}% | {first} {100 * row['never_below']:5.1f}% | "
              f"{row['final_distance']:10.1e} {row['final_relative']:9.1e} | "
              f"{shapes['point']:>5} {shapes['orbit']:>5} {shapes['slider']:>6}")


def save_latent_plot(report, path, plt):
    examples = report["examples"]
    fig = plt.figure(figsize=(2.4 * len(examples), 7.8))
    grid = fig.add_gridspec(3, len(examples))
    for col, ex in enumerate(examples):
        p = torch.tensor(ex["projection"])
        for row, (a, b) in enumerate(((0, 1), (0, 2))):
            ax = fig.add_subplot(grid[row, col])
            ax.plot(p[:, a], p[:, b], color="0.7", lw=0.8)
            ax.scatter(p[:, a], p[:, b], c=range(len(p)), cmap="viridis", s=10)
            ax.plot(p[-1, a], p[-1, b], "rx")
            ax.set_xlabel(f"PC{a + 1} ({100 * ex['explained'][a]:.0f}%)", fontsize=7)
            ax.set_ylabel(f"PC{b + 1} ({100 * ex['explained'][b]:.0f}%)", fontsize=7)
            ax.tick_params(labelsize=6)
            if row == 0:
                ax.set_title(f"{ex['hops']} hops, {ex['shape']}, {'right' if ex['right'] else 'wrong'}", fontsize=8)
    ax = fig.add_subplot(grid[2, :])
    for h, row in report["by_hops"].items():
        ax.plot(range(1, report["r"] + 1), row["relative"], label=f"{h} hops")
    ax.axhline(report["threshold"], color="k", ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step t (colour in the projections: early dark, late yellow; x = s_r)")
    ax.set_ylabel("mean |s_t - s_(t-1)| / |s_t|")
    ax.legend(fontsize=7, ncol=4)
    ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=70)


# -----------------------------------------------------------------------------
# baselines: non-recurrent models trained on the same lines


def default_baseline_layers(model):
    """[R, R * mean_r]: the recurrent model's parameters, and its compute at the training mean r
    (which is also r at eval; the sampled training depth averages mean_r + 1)."""
    R = model.config.n_layers_in_recurrent_block
    return sorted({R, R * model.config.mean_recurrence})


def train_baseline(settings, out_dir, layers, iters):
    """Train a non-recurrent model with train_tiny.py: the recurrent run's settings, but `layers`
    unshared blocks run exactly once (r = 1) with the ordinary last-step loss. Returns its
    depth_scaling.json (training time and the accuracy log)."""
    overrides = {**settings, "out_dir": out_dir, "resume": False, "max_iters": iters,
                 "n_layers_in_recurrent_block": layers, "mean_recurrence": 1, "mean_backprop_depth": 1,
                 "fixed_steps": 1, "step_loss": False, "depth_steps": "1", "progress": False, "threads": 1}
    result = subprocess.run([sys.executable, TRAIN_TINY, *(f"--{k}={v}" for k, v in overrides.items())],
                            capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["no message"]
        raise ValueError(f"training the {layers}-layer baseline failed: {lines[-1]}")
    with open(os.path.join(out_dir, "depth_scaling.json")) as f:
        return json.load(f)


def read_training_log(ckpt_path):
    """The accuracy log train_tiny.py wrote beside a checkpoint (depth_scaling.json), or []."""
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "depth_scaling.json")) as f:
            return json.load(f)["log"]
    except (OSError, ValueError, KeyError):
        return []


def baselines(ckpt_path, model, sets, r_values, max_hops, layers, iters):
    ckpt = load_checkpoint(ckpt_path)
    settings = ckpt.get("settings")
    if not settings:
        raise ValueError(f"{ckpt_path} has no training settings to repeat (written by an older train_tiny.py)")
    models = {"recurrent": {"layers": model.config.n_layers_in_recurrent_block, "params": model.num_params(),
                            "iters": ckpt["iter_num"], "r_values": r_values, "log": read_training_log(ckpt_path),
                            "results": depth_results(model, sets, r_values, max_hops)}}
    for n in layers:
        out_dir = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), f"baseline-{n}-layers")
        run = train_baseline(settings, out_dir, n, iters)
        baseline, _, _ = load_model(os.path.join(out_dir, "ckpt.pt"))
        models[f"{n} layer{'s' if n > 1 else ''}, r=1"] = {
            "layers": n, "params": baseline.num_params(), "iters": run["iters"],
            "train_s": round(run["train_time_s"], 1), "r_values": [1], "log": run["log"],
            "results": depth_results(baseline, sets, [1], max_hops)}
    return {"batch_size": settings["batch_size"], "models": models}


def baseline_columns(report):
    """{column label: {set: {hops: accuracy}}}: the recurrent model at each r, then each baseline."""
    columns = {}
    for name, m in report["models"].items():
        for r in m["r_values"]:
            label = f"rec r={r}" if name == "recurrent" else name.replace(", r=1", "")
            columns[label] = {s: by_r[r] for s, by_r in m["results"].items()}
    return columns


def print_baselines(report):
    for name, m in report["models"].items():
        extra = f", {m['train_s']:.0f} s" if "train_s" in m else ""
        print(f"{name}: {m['layers']} unique block(s), {m['params']:,} parameters, "
              f"{m['iters']} iterations x {report['batch_size']} lines{extra}")
    columns = baseline_columns(report)
    print("held-out answer accuracy (%) by hops: the recurrent model at each r, the baselines at r = 1")
    print(f"{'set':<16}{'hops':>5} | " + " ".join(f"{label:>9}" for label in columns))
    first = next(iter(columns.values()))
    for s, by_h in first.items():
        for h in by_h:
            print(f"{s:<16}{h:>5} | " + " ".join(f"{100 * col[s][h]:8.1f}%" for col in columns.values()))


def save_baselines_plot(report, path, plt):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, col in baseline_columns(report).items():
        if label.startswith("rec") and label not in ("rec r=1", "rec r=4", "rec r=32"):
            continue
        points = sorted((h, a) for by_h in col.values() for h, a in by_h.items())
        left.plot([h for h, _ in points], [100 * a for _, a in points], marker="o",
                  ls="--" if label.startswith("rec") else "-", label=label)
    left.set_xlabel("hops of the answer (past the training max: extrapolation)")
    left.set_ylabel("answer accuracy (%)")
    for name, m in report["models"].items():
        if m["log"]:
            right.plot([e["iter"] for e in m["log"]],
                       [100 * sum(e["acc_by_hops"].values()) / len(e["acc_by_hops"]) for e in m["log"]],
                       marker=".", label=name if name != "recurrent" else "recurrent, r = training mean")
    right.set_xlabel("training iteration")
    right.set_ylabel("in-distribution accuracy, mean over hops (%)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=90)


# -----------------------------------------------------------------------------
# kvshare: KV-cache sharing across steps (compress-sN) vs one entry per step


def answer_accuracy(logits, y, hops, lowest=0):
    """{hops: accuracy} of the answers with at least `lowest` hops, and their accuracy all together."""
    right = logits.argmax(-1) == y
    answers = hops >= lowest
    return ({h: right[hops == h].float().mean().item() for h in sorted(set(hops[answers].tolist()))},
            right[answers].float().mean().item())


def kvshare(model, sets, r_values, slots, max_hops):
    """Accuracy (both sets, by hops and all answers) and KV-cache bytes per token of each strategy
    at each r, every line fed one token at a time: the way generate() decodes, the only place the
    cache is used. The extrapolation set reports only its hop counts past max_hops (as depth)."""
    strategies = ["full", *(f"compress-s{n}" for n in sorted(set(slots)))]
    results = {name: {st: {} for st in strategies} for name in sets}
    overall = {name: {st: {} for st in strategies} for name in sets}
    bytes_per_token = {st: {} for st in strategies}
    for name, lines in sets.items():
        x, y, hops = encode(lines, model)
        lowest = max_hops + 1 if name == "extrapolation" else 0
        for strategy in strategies:
            for r in r_values:
                kv_cache = KVCache(model.config.block_size, strategy, len(model.core))
                logits, _ = decode_token_by_token(model, x, r, "none", kv_cache=kv_cache)
                results[name][strategy][r], overall[name][strategy][r] = answer_accuracy(logits, y, hops, lowest)
                bytes_per_token[strategy][r] = kv_cache.nbytes() / (x.size(0) * kv_cache.seq_len)
    return {"R": model.config.n_layers_in_recurrent_block, "r_values": r_values, "strategies": strategies,
            "bytes_per_token": bytes_per_token, "overall": overall, "results": results}


def short_strategy(strategy):
    return strategy.replace("compress-", "")


def print_kvshare(report):
    r_values, strategies = report["r_values"], report["strategies"]
    width = 7 * len(strategies)
    print(f"answer accuracy (%) by hops, lines fed one token at a time at fixed r, with a full KV cache (one "
          f"entry per step and core layer) or compress-sN (N shared slots; R = {report['R']})")
    print(f"{'':<21} | " + " | ".join(f"{f'r={r}':^{width}}" for r in r_values))
    print(f"{'set':<16}{'hops':>5} | "
          + " | ".join("".join(f"{short_strategy(st):>7}" for st in strategies) for _ in r_values))
    for name, by_strategy in report["results"].items():
        rows = [(h, {st: {r: by_strategy[st][r][h] for r in r_values} for st in strategies})
                for h in by_strategy["full"][r_values[0]]]
        rows.append(("all", {st: report["overall"][name][st] for st in strategies}))
        for h, cells in rows:
            print(f"{name:<16}{h:>5} | " + " | ".join(
                "".join(f"{100 * cells[st][r]:6.1f}%" for st in strategies) for r in r_values))
    print(f"{'KiB per token':<21} | " + " | ".join(
        "".join(f"{report['bytes_per_token'][st][r] / 1024:7.2f}" for st in strategies) for r in r_values))


def save_kvshare_plot(report, path, plt):
    r_values, strategies = report["r_values"], report["strategies"]
    fig, axes = plt.subplots(1, len(r_values) + 1, figsize=(3.6 * (len(r_values) + 1), 3.4))
    for ax, r in zip(axes, r_values):
        ax.set_ylim(0, 102)
        for st in strategies:
            points = sorted((h, a) for by_st in report["results"].values() for h, a in by_st[st][r].items())
            ax.plot([h for h, _ in points], [100 * a for _, a in points], marker=".", label=st)
        ax.set_title(f"r = {r}", fontsize=9)
        ax.set_xlabel("hops (past the training max: extrapolation)", fontsize=8)
    axes[0].set_ylabel("answer accuracy (%)")
    for st in strategies:
        axes[-1].plot(r_values, [report["bytes_per_token"][st][r] / 1024 for r in r_values], marker="o", label=st)
    axes[-1].set_xscale("log", base=2)
    axes[-1].set_xticks(r_values, [str(r) for r in r_values])
    axes[-1].set_xlabel("recurrent steps r")
    axes[-1].set_ylabel("KV cache, KiB per token")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=80)


# -----------------------------------------------------------------------------
# speculative: self-speculative decoding (draft at few steps, verify at r) vs plain greedy decoding


def timed_in_turn(runs, repeats):
    """Run each of runs ({name: fn}) in turn, repeats + 1 times (the first round warms up): {name:
    (its last result, the median of its wall-clock seconds, the median of its CPU seconds)}. Taking
    turns spreads changes in the machine's load (it is shared) over all of them alike."""
    results, wall, cpu = {}, {name: [] for name in runs}, {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            results[name] = fn()
            if round_ > 0:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return {name: (results[name], statistics.median(wall[name]), statistics.median(cpu[name])) for name in runs}


def complete(model, batches, new_tokens, r, **drafting):
    """generate() on each (idx, attention_mask) of batches, greedy at r: the outputs and the summed DraftStats."""
    outputs, total = [], DraftStats()
    for idx, attention_mask in batches:
        out, stats = model.generate(idx, new_tokens, num_steps=r, attention_mask=attention_mask,
                                    return_stats=True, **drafting)
        outputs.append(out)
        total = DraftStats(**{k: getattr(total, k) + v for k, v in asdict(stats).items()})
    return outputs, total


def speculative(model, sets, r, draft_steps, lookaheads, n_lines, new_tokens, repeats=5):
    tokenizer = CharTokenizer()
    lines = sets["in-distribution"][:n_lines]
    prompts = [tokenizer.encode(line.prompt) for line in lines]
    modes = {"one line at a time": [(torch.tensor([p]), None) for p in prompts],
             f"batched (B={len(prompts)})": [left_pad(prompts)]}
    configs = {f"draft {d}, lookahead {n}": (d, n) for d in draft_steps for n in lookaheads}
    results = {}
    for mode, batches in modes.items():
        runs = {"plain": functools.partial(complete, model, batches, new_tokens, r)}
        for name, (d, n) in configs.items():
            runs[name] = functools.partial(complete, model, batches, new_tokens, r, draft_steps=d,
                                           lookahead_for_draft=n)
        rows = {}
        for name, ((outputs, stats), seconds, cpu_seconds) in timed_in_turn(runs, repeats).items():
            tokens = sum(out[:, idx.size(1):].numel() for out, (idx, _) in zip(outputs, batches))
            rows[name] = {"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu_seconds,
                          "tokens_per_s": tokens / seconds, "forwards": stats.forwards,
                          "forwards_at_r": stats.forwards - stats.drafted}  # a drafted token: a forward at d
            if name == "plain":
                plain = outputs
                continue
            if not all(torch.equal(a, b) for a, b in zip(outputs, plain)):
                raise ValueError(f"self-speculative decoding ({mode}, {name}) wrote other tokens than plain "
                                 "greedy decoding")
            rows[name].update({
                "draft_steps": configs[name][0], "lookahead": configs[name][1], "same_output": True,
                "speedup": rows["plain"]["seconds"] / seconds,
                "cpu_speedup": rows["plain"]["cpu_seconds"] / cpu_seconds,
                "acceptance_rate": stats.acceptance_rate, "accepted": stats.accepted, "drafted": stats.drafted,
                "rounds": stats.rounds})
        results[mode] = rows
    prompt = modes["one line at a time"][0][0]
    written = complete(model, [(prompt, None)], new_tokens, r)[0][0][0, prompt.size(1):]
    return {"r": r, "lines": len(prompts), "new_tokens": new_tokens, "threads": torch.get_num_threads(),
            "repeats": repeats, "example": {"prompt": lines[0].prompt, "written": tokenizer.decode(written.tolist())},
            "results": results}


def print_speculative(report):
    r = report["r"]
    tokens = next(iter(report["results"].values()))["plain"]["tokens"]
    print(f"greedy completion of {report['lines']} prompts ({tokens} tokens: up to {report['new_tokens']} each, "
          f"fewer where the context ends) at r={r}, plain vs self-speculative (drafts at draft steps, verified "
          f"at r; the same tokens in every run); medians of {report['repeats']} runs taken in turn, "
          f"{report['threads']} thread(s); speed-up in wall-clock and in CPU time")
    print(f"{'mode':<20}{'decoding':<22} | {'tokens/s':>8} {'speed-up':>8} {'CPU':>6} | {'accepted':>9} {'rate':>6} | "
          f"{'forwards':>8} {f'at r={r}':>8}")
    for mode, rows in report["results"].items():
        for name, row in rows.items():
            drafting = (f"{row['accepted']:>4}/{row['drafted']:<4} {100 * row['acceptance_rate']:5.1f}%"
                        if "drafted" in row else f"{'-':>9} {'-':>6}")
            speedups = f"{row.get('speedup', 1.0):7.2f}x {row.get('cpu_speedup', 1.0):5.2f}x"
            print(f"{mode:<20}{name:<22} | {row['tokens_per_s']:8.1f} {speedups} | {drafting} | "
                  f"{row['forwards']:>8} {row['forwards_at_r']:>8}")
            mode = ""
    example = report["example"]
    print(f"written after the first prompt (the model was trained on answers only): "
          f"{example['prompt']} -> {example['written']!r}")


def save_speculative_plot(report, path, plt):
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for mode, rows in report["results"].items():
        for lookahead in sorted({row["lookahead"] for row in rows.values() if "lookahead" in row}):
            drafts = [row for row in rows.values() if row.get("lookahead") == lookahead]
            label = f"{mode}, lookahead {lookahead}"
            steps = [row["draft_steps"] for row in drafts]
            left.plot(steps, [row["speedup"] for row in drafts], marker="o", label=label)
            right.plot(steps, [100 * row["acceptance_rate"] for row in drafts], marker="o", label=label)
    left.axhline(1, color="k", ls="--", lw=0.8)
    left.set_ylabel("speed-up over plain decoding (x)")
    right.set_ylabel("drafted tokens kept (%)")
    draft_steps = sorted({row["draft_steps"] for rows in report["results"].values()
                          for row in rows.values() if "draft_steps" in row})
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(draft_steps, [str(d) for d in draft_steps])
        ax.set_xlabel(f"draft steps (verify and plain decoding at r = {report['r']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=80)


# -----------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, not argparse's usage block
        self.exit(2, f"minird.experiments: {message}\n")


def main(argv=None):
    parser = Parser(description="minird test-time compute experiments (see the module docstring)")
    parser.add_argument("name", choices=["adaptive", "depth", "ccot", "latent", "baselines", "kvshare", "speculative"])
    parser.add_argument("--ckpt", default="out-tiny/ckpt.pt")
    parser.add_argument("--cap", type=int, default=32,
                        help="most steps a token may run (adaptive, ccot); the trajectory's length (latent); "
                             "r of plain decoding and of the verify (speculative)")
    parser.add_argument("--lines", type=int, default=256, help="held-out lines per set")
    parser.add_argument("--beyond", type=int, default=7, help="hop counts past training in the second set")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--steps", type=positive_ints, default=[1, 2, 4, 8, 16, 32, 64],
                        help="r values (depth, baselines)")
    parser.add_argument("--criterion", default="kl", choices=list(EXIT_THRESHOLDS), help="exit criterion (ccot)")
    parser.add_argument("--layers", type=positive_ints, default=None,
                        help="unshared blocks of each baseline (baselines; default: R, the recurrent model's "
                             "parameters, and R x mean r, its compute at the training mean)")
    parser.add_argument("--iters", type=int, default=2000, help="training iterations of each baseline (baselines)")
    parser.add_argument("--kv_steps", type=positive_ints, default=[4, 8, 16], help="fixed r values (kvshare)")
    parser.add_argument("--kv_slots", type=positive_ints, default=None,
                        help="N of each compress-sN compared with the full cache (kvshare; default R, 2R, 4R)")
    parser.add_argument("--draft_steps", type=positive_ints, default=[1, 2, 4],
                        help="steps of the drafted tokens, at most --cap (speculative)")
    parser.add_argument("--lookahead_for_draft", type=positive_ints, default=[4],
                        help="tokens drafted per round (speculative)")
    parser.add_argument("--spec_lines", type=int, default=16, help="prompts, one per held-out line (speculative)")
    parser.add_argument("--new_tokens", type=int, default=48,
                        help="tokens written after each prompt, fewer where the context ends (speculative)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    args = parser.parse_args(argv)
    if min(args.cap, args.lines, args.beyond, args.iters, args.spec_lines, args.new_tokens) < 1 or args.threads < 0:
        sys.exit("minird.experiments: --cap, --lines, --beyond, --iters, --spec_lines and --new_tokens must be "
                 "positive, --threads not negative")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    try:
        model, _, corpus = load_model(args.ckpt)
        R = model.config.n_layers_in_recurrent_block
        torch.manual_seed(args.seed)
        sets = held_out_sets(corpus, args.lines, args.seed, args.beyond)
        run, show, plot = {
            "adaptive": (lambda: adaptive(model, sets, args.cap), print_adaptive, save_adaptive_plot),
            "depth": (lambda: depth(model, sets, args.steps, corpus.max_hops), print_depth, save_depth_figure),
            "ccot": (lambda: ccot(model, sets, args.cap, args.criterion, corpus.max_hops),
                     print_ccot, save_ccot_plot),
            "latent": (lambda: latent(model, sets, args.cap, corpus.max_hops), print_latent, save_latent_plot),
            "baselines": (lambda: baselines(args.ckpt, model, sets, args.steps, corpus.max_hops,
                                            args.layers or default_baseline_layers(model), args.iters),
                          print_baselines, save_baselines_plot),
            "kvshare": (lambda: kvshare(model, sets, args.kv_steps, args.kv_slots or [R, 2 * R, 4 * R],
                                        corpus.max_hops),
                        print_kvshare, save_kvshare_plot),
            "speculative": (lambda: speculative(model, sets, args.cap, args.draft_steps, args.lookahead_for_draft,
                                                args.spec_lines, args.new_tokens),
                            print_speculative, save_speculative_plot),
        }[args.name]
        report = run()
    except ValueError as err:
        sys.exit(f"minird.experiments: {err}")
    report["seconds"] = round(time.time() - t0, 1)
    show(report)
    out = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), args.name)
    with open(out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    plt = pyplot()
    saved = f" and {plot(report, out + '.png', plt)}" if plt else " (install matplotlib for the plot)"
    print(f"saved {out}.json{saved}; {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
