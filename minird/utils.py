"""Helpers shared by train_tiny.py, sample.py and minird.experiments: settings, checkpoints, evaluation,
the depth table."""

import argparse
import os
import tempfile

import torch

from minird.data import CharTokenizer, CorpusConfig
from minird.model import RecurrentDepthConfig, RecurrentDepthLM


class ConfigError(ValueError):
    pass


def apply_overrides(settings, argv):
    """Apply --key=value arguments to the dict of settings, in place. Values are parsed to the
    type of the default (bool accepts true/false/1/0); unknown keys and bad values raise."""
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"expected --key=value, got {arg!r}")
        key, value = arg[2:].split("=", 1)
        if key not in settings:
            raise ConfigError(f"unknown setting {key!r} (known: {', '.join(sorted(settings))})")
        default = settings[key]
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                settings[key] = value.lower() in ("true", "1")
            else:
                settings[key] = type(default)(value)
        except ValueError:
            raise ConfigError(f"--{key} must be of type {type(default).__name__}, got {value!r}") from None


def positive_ints(text, example="4 or 1,4,16"):
    """'8' or '1,4,16' -> [8] or [1, 4, 16], for argparse's type=: every value must be a positive
    integer, or argparse.ArgumentTypeError (its message shows example)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers such as {example}, got {text!r}")
    return values


def save_checkpoint(path, state):
    """Write to a temporary file in the same directory, then rename: a crash mid-write never
    leaves a truncated checkpoint in place of the last good one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ckpt-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


CHECKPOINT_KEYS = ("model", "model_args", "corpus", "tokenizer")


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by train_tiny.py; a missing or unreadable file raises ValueError
    with a one-line reason."""
    if not os.path.exists(path):
        raise ValueError(f"no checkpoint at {path} (run train_tiny.py first, or pass --ckpt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        raise ValueError(f"{path} is not a readable checkpoint ({type(err).__name__})") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a minird checkpoint (missing {', '.join(missing)})")
    return ckpt


def load_model(path):
    """The model, tokenizer and corpus settings of a checkpoint; ValueError with a one-line reason
    if it does not load."""
    ckpt = load_checkpoint(path)
    try:
        model = RecurrentDepthLM(RecurrentDepthConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError) as err:  # written by another version of minird
        raise ValueError(f"{path} does not fit this version of minird ({type(err).__name__})") from None
    return model.eval(), CharTokenizer(ckpt["tokenizer"]), CorpusConfig(**ckpt["corpus"])


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


def print_depth_table(results, r_values):
    """results: {set name: {r: {hops: acc}}} -> one table, rows = hops, columns = r."""
    header = f"{'set':<16}{'hops':>5} | " + " ".join(f"r={r:<5}" for r in r_values)
    print(header)
    print("-" * len(header))
    for name, by_r in results.items():
        for h in sorted(by_r[r_values[0]]):
            print(f"{name:<16}{h:>5} | " + " ".join(f"{100 * by_r[r][h]:6.1f}%" for r in r_values))


def save_depth_plot(results, r_values, path):
    """Accuracy vs r, one line per hop count; returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
