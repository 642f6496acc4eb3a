"""latent: the states after steps 1 ... --cap of every answer token; per hop count, when the relative
step |s_t - s_(t-1)| / |s_t| falls below 0.03 and where the trajectory ends (a point, an orbit or a
slider); a PNG of a few trajectories on their top-3 principal components."""

import torch

from minird.evaluate import encode_answers, save_figure


@torch.no_grad()
def answer_trajectories(model, x, y, hops, r, batch_size=64):
    """States s_0 ... s_r (r + 1, N, h) of the N answer tokens, their hops (N,) and whether the
    answer read out from s_r is right (N,)."""
    states, answer_hops, right = [], [], []
    for i in range(0, x.size(0), batch_size):
        xb, yb, hb = x[i:i + batch_size], y[i:i + batch_size], hops[i:i + batch_size]
        trajectory = model.trajectory(xb, r)  # (r + 1, B, T, h)
        cos, sin, _ = model.positions(xb)
        answers = hb >= 0
        states.append(trajectory[:, answers])
        answer_hops.append(hb[answers])
        right.append((model.readout(trajectory[-1], cos, sin).argmax(-1) == yb)[answers])
    return torch.cat(states, dim=1), torch.cat(answer_hops), torch.cat(right)


def principal_components(trajectory, k=3):
    """Projection (r, k) of one token's states (r, h) on their top-k principal components, and
    the share of the variance each explains."""
    centered = trajectory - trajectory.mean(0)
    _, S, Vh = torch.linalg.svd(centered, full_matrices=False)
    return centered @ Vh[:k].T, (S[:k] ** 2 / (S ** 2).sum()).tolist()


def run(model, corpus, sets, args, threshold=0.03, n_examples=6):
    r = args.cap
    lines = sets["in-distribution"] + sets["extrapolation"]
    x, y, hops = encode_answers(lines, model.config.block_size)
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


def show(report):
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


def plot(report, path, plt):
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
