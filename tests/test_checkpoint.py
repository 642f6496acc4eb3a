"""minird.cli's --key=value overrides, and minird.checkpoint's atomic checkpoints that fail with a
one-line reason."""

import os
import random

import pytest
import torch

from minird.checkpoint import load_checkpoint, save_checkpoint
from minird.cli import ConfigError, apply_overrides
from minird.data import CharTokenizer, CorpusConfig
from minird.model import RecurrentDepthConfig, RecurrentDepthLM


def test_overrides_parse_to_the_default_type():
    settings = {"iters": 10, "lr": 1e-3, "flag": False, "name": "a"}
    assert apply_overrides(settings, ["--iters=20", "--lr=3e-4", "--flag=true", "--name=b=c"]) == \
        {"iters", "lr", "flag", "name"}  # the keys given: what resume checks against the checkpoint
    assert settings == {"iters": 20, "lr": 3e-4, "flag": True, "name": "b=c"}
    for bad, fragment in [("--nope=1", "unknown setting 'nope'"), ("--iters=2.5", "int"),
                          ("--flag=maybe", "bool"), ("iters=3", "--key=value")]:
        with pytest.raises(ConfigError, match=fragment):
            apply_overrides(settings, [bad])


def checkpoint_state(config):
    """A checkpoint in the format train_tiny.py writes (the keys load_checkpoint requires)."""
    torch.manual_seed(0)
    model = RecurrentDepthLM(config)
    return model, {"model": model.state_dict(), "model_args": vars(config), "corpus": vars(CorpusConfig()),
                   "tokenizer": CharTokenizer().chars, "iter_num": 7}


def test_checkpoint_round_trip(tmp_path, tiny_config):
    tiny_config.init_scale = 0.0
    model, state = checkpoint_state(tiny_config)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, state)
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the temporary file was renamed, not left behind
    ckpt = load_checkpoint(path)
    loaded = RecurrentDepthLM(RecurrentDepthConfig(**ckpt["model_args"]))
    loaded.load_state_dict(ckpt["model"])
    assert ckpt["iter_num"] == 7 and ckpt["tokenizer"] == CharTokenizer().chars
    idx = torch.randint(0, tiny_config.vocab_size, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(idx, num_steps=3)[0], model.eval()(idx, num_steps=3)[0])


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, tiny_config):
    _, state = checkpoint_state(tiny_config)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, state)
    with pytest.raises(Exception):
        save_checkpoint(path, {**state, "iter_num": lambda: 0})  # a lambda cannot be pickled
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert load_checkpoint(path)["iter_num"] == 7


@pytest.mark.parametrize("damage, fragment", [
    ("missing", "no checkpoint at"),
    ("truncated", "not a readable checkpoint"),
    ("garbage", "not a readable checkpoint"),
    ("empty", "not a readable checkpoint"),
    ("not a dict", "not a minird checkpoint"),
    ("missing keys", "missing corpus, tokenizer"),
])
def test_damaged_checkpoint_is_a_one_line_error(tmp_path, tiny_config, damage, fragment):
    _, state = checkpoint_state(tiny_config)
    path = tmp_path / "ckpt.pt"
    if damage == "truncated":
        save_checkpoint(path, state)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "not a dict":
        torch.save([1, 2, 3], path)
    elif damage == "missing keys":
        torch.save({"model": state["model"], "model_args": state["model_args"]}, path)
    with pytest.raises(ValueError, match=fragment) as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)
