"""What the tests share: the repository root, a tiny train_tiny.py configuration, running a
script the way a user does, and an answer checker written independently of minird.data.solve."""

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from minird.model import RecurrentDepthLM

ROOT = Path(__file__).resolve().parents[1]

# A train_tiny.py configuration that runs in seconds on one CPU thread. Values the trainer's
# defaults may change (learning rate, sizes) are pinned so these tests keep meaning the same thing.
TINY_TRAIN = ["--device=cpu", "--threads=1", "--progress=False", "--n_embd=32", "--n_head=2",
              "--intermediate_size=64", "--n_layers_in_prelude=1", "--n_layers_in_recurrent_block=2",
              "--n_layers_in_coda=1", "--init=normal", "--init_scale=0.0", "--mean_recurrence=2",
              "--mean_backprop_depth=1", "--batch_size=16", "--learning_rate=3e-3", "--warmup_iters=10",
              "--eval_interval=10", "--eval_problems=64", "--depth_steps=1,2,4", "--seed=1337"]
TINY_ITERS = 120


def make_model(config, seed=0, use_kernels=False):
    """The model of config from a fixed seed; on the reference path unless use_kernels, so that
    tests see (and can count) every core_step (tests/test_ops.py checks the kernels against it)."""
    torch.manual_seed(seed)
    model = RecurrentDepthLM(config)
    model.use_kernels = use_kernels
    return model


def run_script(*args, timeout=300):
    """Run `python args...` from the repository root on one thread; returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# A Python warning as the warnings module prints it: "file:line: SomeWarning: text", then the
# source line, indented.
PYTHON_WARNING = re.compile(r"^\S+:\d+: \w*Warning: .*\n(?:  .*\n)?", re.MULTILINE)
# minird.ops's own one-line notice (through logging) when the extension was not built.
KERNELS_NOT_BUILT = re.compile(r"^minird: C\+\+/CUDA kernels not built .*\n", re.MULTILINE)


def assert_one_line_error(result, *fragments):
    """A user error: exit code != 0, exactly one line on stderr naming the problem, no traceback.
    Warnings that the environment adds on their own lines (torch installed without numpy, minird
    without its compiled kernels) are not part of the error and are dropped first."""
    lines = KERNELS_NOT_BUILT.sub("", PYTHON_WARNING.sub("", result.stderr)).strip().splitlines()
    assert result.returncode != 0, result.stdout
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def reference_answers(line):
    """[(answer digit, hops)] for every query of a line: parse the statements with a regex, then
    walk each queried name back to its root digit, checking every name is defined exactly once
    and before the statement that uses it."""
    program, queries = re.fullmatch(r"((?:\w\w;)*)((?:\?\w\d)*)\n?", line).groups()
    statements = re.findall(r"(\w)(\w);", program)
    defined_at = {}
    for i, (name, value) in enumerate(statements):
        assert name not in defined_at, f"{name} defined twice in {line!r}"
        assert value.isdigit() or defined_at.get(value, i) < i, f"{value} used before its definition in {line!r}"
        defined_at[name] = i
    answers = []
    for name, _ in re.findall(r"\?(\w)(\d)", queries):
        hops = 0
        value = statements[defined_at[name]][1]
        while not value.isdigit():
            value = statements[defined_at[value]][1]
            hops += 1
        answers.append((value, hops))
    return answers
