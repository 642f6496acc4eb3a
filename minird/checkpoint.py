"""Checkpoints of train_tiny.py: written atomically, read back with a one-line reason when they
cannot be."""

import glob
import os
import tempfile

import torch

from minird.data import CharTokenizer, CorpusConfig
from minird.model import RecurrentDepthConfig, RecurrentDepthLM

CHECKPOINT_KEYS = ("model", "model_args", "corpus", "tokenizer")
TEMP_PREFIX, TEMP_SUFFIX = ".ckpt-", ".tmp"


def save_checkpoint(path, state):
    """Write to a temporary file in the same directory, then rename: a crash mid-write never
    leaves a truncated checkpoint in place of the last good one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def remove_stale_temporaries(directory):
    """Delete the temporary files of saves that were killed (kill -9 skips save_checkpoint's
    cleanup); returns how many. Only call it where no other process is saving into directory."""
    stale = glob.glob(os.path.join(directory, f"{TEMP_PREFIX}*{TEMP_SUFFIX}"))
    for path in stale:
        os.unlink(path)
    return len(stale)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by train_tiny.py; a missing or unreadable file raises ValueError
    with a one-line reason."""
    if not os.path.exists(path):
        raise ValueError(f"no checkpoint at {path} (run train_tiny.py first, or pass its path)")
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
