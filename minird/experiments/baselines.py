"""baselines: trains, with minird.train, one non-recurrent model per --layers (r fixed to 1,
last-step loss, same corpus, curriculum and settings as the checkpoint) for --iters iterations, into
baseline-<L>-layers/ next to the checkpoint, and compares their accuracy by hops with the recurrent
model's at every r of --steps."""

import json
import os
from dataclasses import fields

from minird.checkpoint import load_checkpoint
from minird.evaluate import depth_results, save_figure
from minird.train import TrainConfig, train


def default_baseline_layers(model):
    """[R, R * mean_r]: the recurrent model's parameters, and its compute at the training mean r
    (which is also r at eval; the sampled training depth averages mean_r + 1)."""
    R = model.config.n_layers_in_recurrent_block
    return sorted({R, R * model.config.mean_recurrence})


def train_baseline(settings, out_dir, layers, iters):
    """Train a non-recurrent model the way train_tiny.py does: the recurrent run's settings, but
    `layers` unshared blocks run exactly once (r = 1) with the ordinary last-step loss, into
    out_dir (replaced). Returns minird.train.train's result (the model, time, accuracy log)."""
    # plateau_check 0: a baseline that stays at a curriculum level is the finding, not a run to restart
    known = {f.name for f in fields(TrainConfig)}  # a checkpoint of an older minird may have others
    overrides = {**{k: v for k, v in settings.items() if k in known}, "out_dir": out_dir, "resume": False,
                 "overwrite": True, "max_iters": iters, "n_layers_in_recurrent_block": layers, "mean_recurrence": 1,
                 "mean_backprop_depth": 1, "fixed_steps": 1, "step_loss": False, "depth_steps": "1",
                 "progress": False, "threads": 1, "plateau_check": 0}
    try:
        return train(TrainConfig(**overrides), log_line=lambda line: None)
    except ValueError as err:
        raise ValueError(f"training the {layers}-layer baseline failed: {err}") from None


def read_training_log(ckpt_path):
    """The accuracy log train_tiny.py wrote beside a checkpoint (depth_scaling.json), or []."""
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "depth_scaling.json")) as f:
            return json.load(f)["log"]
    except (OSError, ValueError, KeyError):
        return []


def run(model, corpus, sets, args):
    ckpt_path, r_values, max_hops = args.ckpt, args.steps, corpus.max_hops
    layers, iters = args.layers or default_baseline_layers(model), args.iters
    ckpt = load_checkpoint(ckpt_path)
    settings = ckpt.get("settings")
    if not settings:
        raise ValueError(f"{ckpt_path} has no training settings to repeat (written by an older train_tiny.py)")
    models = {"recurrent": {"layers": model.config.n_layers_in_recurrent_block, "params": model.num_params(),
                            "iters": ckpt["iter_num"], "r_values": r_values, "log": read_training_log(ckpt_path),
                            "results": depth_results(model, sets, r_values, max_hops + 1)}}
    for n in layers:
        out_dir = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), f"baseline-{n}-layers")
        trained = train_baseline(settings, out_dir, n, iters)
        baseline = trained["model"]
        models[f"{n} layer{'s' if n > 1 else ''}, r=1"] = {
            "layers": n, "params": baseline.num_params(), "iters": trained["iters"],
            "train_s": round(trained["train_time_s"], 1), "r_values": [1], "log": trained["log"],
            "results": depth_results(baseline, sets, [1], max_hops + 1)}
    return {"batch_size": settings["batch_size"], "models": models}


def baseline_columns(report):
    """{column label: {set: {hops: accuracy}}}: the recurrent model at each r, then each baseline."""
    columns = {}
    for name, m in report["models"].items():
        for r in m["r_values"]:
            label = f"rec r={r}" if name == "recurrent" else name.replace(", r=1", "")
            columns[label] = {s: by_r[r] for s, by_r in m["results"].items()}
    return columns


def show(report):
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


def plot(report, path, plt):
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
