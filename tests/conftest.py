"""Shared fixtures: a tiny model config and one short train_tiny.py run reused by several tests."""

import pytest

from helpers import TINY_ITERS, TINY_TRAIN, run_script
from minird.model import RecurrentDepthConfig


@pytest.fixture
def tiny_config():
    """A model config for unit tests of the reference code in minird/model.py (helpers.make_model
    builds it with the kernels off)."""
    return RecurrentDepthConfig(vocab_size=16, block_size=32, n_embd=32, n_head=2, intermediate_size=48,
                     n_layers_in_prelude=1, n_layers_in_recurrent_block=2, n_layers_in_coda=1,
                     mean_recurrence=3, mean_backprop_depth=2)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """(out_dir, stdout) of one short train_tiny.py run, shared by the training, resume and
    sample.py tests (read it, copy it before changing it)."""
    out_dir = tmp_path_factory.mktemp("trained")
    result = run_script("train_tiny.py", f"--out_dir={out_dir}", f"--max_iters={TINY_ITERS}", *TINY_TRAIN)
    assert result.returncode == 0, result.stderr
    return out_dir, result.stdout
