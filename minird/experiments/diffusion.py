"""diffusion: completes the first --spec_lines in-distribution lines' prompts with --new_tokens tokens,
plain greedy at r = --cap and with diffusion forcing (generate's diffusion_forcing: the prompt at
r = --cap, then a wave of positions iterated --inner_recurrence steps a round, each token frozen once
its state settles), one prompt at a time; reports tokens/s (medians of 3 runs taken in turn after a
warm-up, as the speculative experiment), forwards, core steps per written token, and how many of
diffusion's tokens are greedy's (the share of positions, and the tokens before the first that
differs). The model was trained on answers only: the first written token is the answer (both
samplers take it from the prompt's forward); what follows is what the model writes."""

import functools

import torch

from minird.data import CharTokenizer
from minird.evaluate import save_figure
from minird.experiments.speculative import timed_in_turn
from minird.generate import generate


def complete(model, prompts, new_tokens, r, **options):
    """generate() on each prompt (1, T): [(written tokens (n,), steps of the fed tokens, forwards)]."""
    outputs = []
    for idx in prompts:
        out = generate(model, idx, new_tokens, num_steps=r, **options)
        outputs.append((out.ids[0, idx.size(1):], out.steps[0, idx.size(1):], out.stats.forwards))
    return outputs


def run(model, corpus, sets, args, repeats=3):
    r, new_tokens = args.cap, args.new_tokens
    tokenizer = CharTokenizer()
    lines = sets["in-distribution"][:args.spec_lines]
    prompts = [torch.tensor([tokenizer.encode(line.prompt)]) for line in lines]
    runs = {"greedy": functools.partial(complete, model, prompts, new_tokens, r)}
    for inner in args.inner_recurrence:
        runs[f"diffusion, inner_recurrence {inner}"] = functools.partial(
            complete, model, prompts, new_tokens, r, diffusion_forcing=True, inner_recurrence=inner)
    rows = {}
    for name, (outputs, seconds, _) in timed_in_turn(runs, repeats).items():
        written = sum(len(ids) for ids, _, _ in outputs)
        rows[name] = {"tokens": written, "seconds": seconds, "tokens_per_s": written / seconds,
                      "forwards": sum(f for _, _, f in outputs),
                      "core_steps_per_token": sum(s.sum().item() for _, s, _ in outputs) / written}
        if name == "greedy":
            greedy = outputs
            continue
        same = [(ids == g[:len(ids)]) for (ids, _, _), (g, _, _) in zip(outputs, greedy)]
        rows[name].update({
            "inner_recurrence": int(name.rsplit(" ", 1)[1]),
            "agreement": sum(s.sum().item() for s in same) / written,
            "prefix_agreement": sum(int(s.int().cumprod(0).sum()) for s in same) / written,
            "speedup": rows["greedy"]["seconds"] / seconds})
    example = runs["greedy"]()[0][0], complete(model, prompts[:1], new_tokens, r, diffusion_forcing=True)[0][0]
    return {"r": r, "lines": len(prompts), "new_tokens": new_tokens, "threads": torch.get_num_threads(),
            "repeats": repeats, "results": rows,
            "example": {"prompt": lines[0].prompt, "greedy": tokenizer.decode(example[0].tolist()),
                        "diffusion": tokenizer.decode(example[1].tolist())}}


def show(report):
    print(f"completion of {report['lines']} prompts, {report['new_tokens']} tokens each, greedy at r={report['r']} "
          f"vs diffusion forcing (prompt at r={report['r']}); medians of {report['repeats']} runs taken in turn, "
          f"{report['threads']} thread(s)")
    print(f"{'sampler':<30} | {'tokens/s':>8} {'speed-up':>8} | {'forwards':>8} {'steps/token':>11} | "
          f"{'as greedy':>9} {'prefix':>7}")
    for name, row in report["results"].items():
        agree = (f"{100 * row['agreement']:8.1f}% {100 * row['prefix_agreement']:6.1f}%" if "agreement" in row
                 else f"{'-':>9} {'-':>7}")
        print(f"{name:<30} | {row['tokens_per_s']:8.1f} {row.get('speedup', 1.0):7.2f}x | {row['forwards']:>8} "
              f"{row['core_steps_per_token']:11.1f} | {agree}")
    example = report["example"]
    print(f"after {example['prompt']!r}: greedy {example['greedy']!r}, diffusion {example['diffusion']!r}")


def plot(report, path, plt):
    rows = [row for row in report["results"].values() if "inner_recurrence" in row]
    inner = [row["inner_recurrence"] for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(inner, [row["speedup"] for row in rows], marker="o")
    left.axhline(1, color="k", ls="--", lw=0.8)
    left.set_ylabel(f"speed-up over greedy at r = {report['r']} (x)")
    right.plot(inner, [100 * row["agreement"] for row in rows], marker="o", label="positions as greedy")
    right.plot(inner, [100 * row["prefix_agreement"] for row in rows], marker="o", label="before the first difference")
    right.set_ylabel("written tokens (%)")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xlabel("inner_recurrence (steps a round)")
        ax.set_xticks(inner)
        ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=80)
