"""speculative: completes the first --spec_lines in-distribution lines' prompts (the program and the
first query) with --new_tokens tokens, greedy at r = --cap, plainly and with self-speculative
decoding (generate's draft_steps, for every --draft_steps and --lookahead_for_draft), one line at a
time and as one left-padded batch; checks that both write the same tokens (ValueError if not), and
reports the acceptance rate, the forwards at r, and tokens/s and speed-ups from the median wall
time (and CPU time) of 5 timed runs of each, taken in turn after a warm-up round (the machine may
be shared: turns spread its load over all alike; --threads sets torch's CPU threads). The model
was trained on answers only: after the answer it writes what it writes, not program text; the
check is equality with plain decoding."""

import functools
import statistics
import time
from dataclasses import asdict

import torch

from minird.data import CharTokenizer
from minird.evaluate import save_figure
from minird.generate import DraftStats, generate, left_pad


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
        out = generate(model, idx, new_tokens, num_steps=r, attention_mask=attention_mask, **drafting)
        outputs.append(out.ids)
        total = DraftStats(**{k: getattr(total, k) + v for k, v in asdict(out.stats).items()})
    return outputs, total


def run(model, corpus, sets, args, repeats=5):
    r, draft_steps, lookaheads, n_lines, new_tokens = (args.cap, args.draft_steps, args.lookahead_for_draft,
                                                       args.spec_lines, args.new_tokens)
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


def show(report):
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


def plot(report, path, plt):
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
