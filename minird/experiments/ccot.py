"""ccot: continuous chain of thought. Every line is fed one token at a time through a KV cache, the
way generate feeds the tokens it writes, with adaptive exit (--criterion, at most --cap steps);
the next token is the line's own (teacher-forced: the model was trained on the answers only, so
it cannot write the queries itself). Mean steps per token by token kind, and answer accuracy,
with each token's s0 fresh or the previous token's final state (continuous_compute)."""

import time

import torch

from minird.evaluate import decode_token_by_token, encode_answers, save_figure


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


def run(model, corpus, sets, args):
    cap, criterion, max_hops = args.cap, args.criterion, corpus.max_hops
    lines = sets["in-distribution"] + sets["extrapolation"]
    x, y, _ = encode_answers(lines, model.config.block_size)
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


def show(report):
    fresh, cont = (report["results"][m]["by_kind"] for m in ("fresh", "continuous"))
    print(f"tokens fed one at a time, adaptive exit ({report['criterion']}, cap {report['cap']}): mean steps "
          "per token and answer accuracy, s0 fresh vs the previous token's state (* = beyond training)")
    print(f"{'token kind':<18}{'tokens':>7} | {'steps fresh':>11} {'continuous':>10} | "
          f"{'acc fresh':>9} {'continuous':>10}")
    for kind, f in fresh.items():
        c = cont[kind]
        acc = f"{100 * f['accuracy']:8.1f}% {100 * c['accuracy']:9.1f}%" if f["accuracy"] is not None else ""
        print(f"{kind:<18}{f['tokens']:>7} | {f['steps']:11.2f} {c['steps']:10.2f} | {acc}")


def plot(report, path, plt):
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
