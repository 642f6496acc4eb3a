"""adaptive: each position, teacher-forced in one forward, stops when its criterion says it has
converged (at most --cap steps), for every criterion at its default threshold; mean steps used
by the answer tokens and their accuracy per hop count, beside fixed r = cap (the paper's Fig. 10)."""

from minird.evaluate import encode_answers, save_figure
from minird.generate import EXIT_THRESHOLDS, feed


def steps_and_accuracy(model, x, y, hops, cap, criterion):
    """{hops: (mean steps used, accuracy)} of the answer tokens, teacher-forced, one forward."""
    logits, used, _ = feed(model, x, None, cap, criterion)
    right = logits.argmax(-1) == y
    return {h: (used[hops == h].float().mean().item(), right[hops == h].float().mean().item())
            for h in sorted(set(hops[hops >= 0].tolist()))}


def run(model, corpus, sets, args):
    cap = args.cap
    x, y, hops = encode_answers(sets["in-distribution"] + sets["extrapolation"], model.config.block_size)
    return {"cap": cap, "results": {c: steps_and_accuracy(model, x, y, hops, cap, c)
                                    for c in ["none", *EXIT_THRESHOLDS]}}


def show(report):
    results, cap = report["results"], report["cap"]
    criteria = list(results)
    print(f"mean steps used / accuracy (%) of the answers, by hops (cap {cap}; 'none' = fixed r = {cap})")
    print(f"{'hops':>4} | " + " | ".join(f"{c:>16}" for c in criteria))
    for h in results["none"]:
        print(f"{h:>4} | " + " | ".join(f"{results[c][h][0]:6.1f} / {100 * results[c][h][1]:5.1f}%" for c in criteria))


def plot(report, path, plt):
    fig, ax = plt.subplots(figsize=(6, 4))
    for c, by_h in report["results"].items():
        if c != "none":
            ax.plot(list(by_h), [steps for steps, _ in by_h.values()], marker="o", label=c)
    ax.set_xlabel("hops of the answer (> training max: extrapolation)")
    ax.set_ylabel("mean steps used before exit")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
