"""kvshare: every line is fed one token at a time (as in ccot) at a fixed r of --kv_steps, through a
KV cache that keeps every (step, core layer)'s keys ("full") or shares N slots among them
("compress-sN", step i / core layer j writing slot (i * R + j) mod N, N of --kv_slots; default R,
2R and 4R); answer accuracy by hops on both sets, and the cache's bytes per token."""

from minird.evaluate import decode_token_by_token, encode_answers, save_figure
from minird.kv_cache import KVCache


def answer_accuracy(logits, y, hops, lowest=0):
    """{hops: accuracy} of the answers with at least `lowest` hops, and their accuracy all together."""
    right = logits.argmax(-1) == y
    answers = hops >= lowest
    return ({h: right[hops == h].float().mean().item() for h in sorted(set(hops[answers].tolist()))},
            right[answers].float().mean().item())


def run(model, corpus, sets, args):
    """Accuracy (both sets, by hops and all answers) and KV-cache bytes per token of each strategy
    at each r, every line fed one token at a time: the way generate() decodes, the only place the
    cache is used. The extrapolation set reports only its hop counts past max_hops (as depth)."""
    R, max_hops, r_values = model.config.n_layers_in_recurrent_block, corpus.max_hops, args.kv_steps
    slots = args.kv_slots or [R, 2 * R, 4 * R]
    strategies = ["full", *(f"compress-s{n}" for n in sorted(set(slots)))]
    results = {name: {st: {} for st in strategies} for name in sets}
    overall = {name: {st: {} for st in strategies} for name in sets}
    bytes_per_token = {st: {} for st in strategies}
    for name, lines in sets.items():
        x, y, hops = encode_answers(lines, model.config.block_size)
        lowest = max_hops + 1 if name == "extrapolation" else 0
        for strategy in strategies:
            for r in r_values:
                kv_cache = KVCache(x.size(1), strategy, R, r)
                logits, _ = decode_token_by_token(model, x, r, "none", kv_cache=kv_cache)
                results[name][strategy][r], overall[name][strategy][r] = answer_accuracy(logits, y, hops, lowest)
                bytes_per_token[strategy][r] = kv_cache.nbytes() / (x.size(0) * kv_cache.seq_len)
    return {"R": R, "r_values": r_values, "strategies": strategies,
            "bytes_per_token": bytes_per_token, "overall": overall, "results": results}


def short_strategy(strategy):
    return strategy.replace("compress-", "")


def show(report):
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


def plot(report, path, plt):
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
