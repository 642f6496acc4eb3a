"""train_tiny.py end to end: a short run learns, writes its table, JSON and plot; --resume; DDP;
bad settings are one-line errors."""

import importlib.util
import json
import math
import os
import shutil

import pytest
import torch

from helpers import TINY_ITERS, TINY_TRAIN, assert_one_line_error, run_script
from minird.utils import load_checkpoint


def test_short_run_learns_and_reports(trained_run):
    out_dir, stdout = trained_run
    report = json.loads((out_dir / "depth_scaling.json").read_text())
    assert report["iters"] == TINY_ITERS
    assert [e["iter"] for e in report["log"]] == list(range(10, TINY_ITERS + 1, 10))
    losses = [e["loss"] for e in report["log"]]
    # The first logged loss is still near a uniform guess over the vocabulary; by the end the
    # answer distribution beats a uniform guess among the ten digits (ln 10): the model has
    # learnt that an answer is one of the digits of its line. (Beating 1/n_chains needs the
    # lookup itself, thousands of steps away: too long for a test.)
    assert losses[0] > math.log(10) > sum(losses[-3:]) / 3
    acc = report["results"]["in-distribution"]["2"]  # r = the training mean
    assert sum(acc.values()) / len(acc) > 0.13  # uniform digit guess: 0.10
    # the depth table: every r of --depth_steps, every hop count of both held-out sets
    assert set(report["results"]) == {"in-distribution", "extrapolation"}
    for by_r in report["results"].values():
        assert set(by_r) == {"1", "2", "4"} and all(0 <= a <= 1 for acc in by_r.values() for a in acc.values())
    assert "r=1" in stdout and "r=4" in stdout and "extrapolation" in stdout
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert (out_dir / "depth_scaling.png").exists() == has_matplotlib
    assert load_checkpoint(out_dir / "ckpt.pt")["iter_num"] == TINY_ITERS


def test_resume_continues_from_the_saved_iteration(trained_run, tmp_path):
    out_dir = tmp_path / "out"
    shutil.copytree(trained_run[0], out_dir)
    first_loss = json.loads((out_dir / "depth_scaling.json").read_text())["log"][0]["loss"]
    result = run_script("train_tiny.py", f"--out_dir={out_dir}", "--resume=True", f"--max_iters={TINY_ITERS + 20}",
                        *TINY_TRAIN)
    assert result.returncode == 0, result.stderr
    report = json.loads((out_dir / "depth_scaling.json").read_text())
    assert report["iters"] == TINY_ITERS + 20
    assert [e["iter"] for e in report["log"]] == [TINY_ITERS + 10, TINY_ITERS + 20]  # not from 0
    assert report["log"][0]["loss"] < first_loss  # the trained weights were loaded, not a fresh init
    assert load_checkpoint(out_dir / "ckpt.pt")["iter_num"] == TINY_ITERS + 20


def test_ddp_two_gloo_processes_stay_in_lockstep(tmp_path):
    iters = 3
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",  # = torchrun
                        "tests/ddp_probe.py", tmp_path, "train_tiny.py", f"--out_dir={tmp_path / 'out'}",
                        f"--max_iters={iters}", *TINY_TRAIN)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert len(ranks[0]["steps"]) == iters
    assert ranks[0]["steps"] == ranks[1]["steps"]  # the same (n, k) on both ranks at every step
    # Each rank trains on its own lines; identical weights after the steps mean DDP averaged the gradients.
    weights = [r["weights"] for r in ranks]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert (tmp_path / "out" / "depth_scaling.json").exists()  # only rank 0 writes the report


@pytest.mark.parametrize("args, fragment", [
    (["--no_such_setting=1"], "unknown setting 'no_such_setting'"),
    (["--max_iters=many"], "--max_iters must be of type int"),
    (["--learning_rate=fast"], "--learning_rate must be of type float"),
    (["--progress=maybe"], "--progress must be of type bool"),
    (["max_iters=5"], "expected --key=value"),
])
def test_bad_settings_are_one_line_errors(args, fragment):
    assert_one_line_error(run_script("train_tiny.py", *args), "train_tiny.py", fragment)


def test_resume_without_checkpoint_is_a_one_line_error(tmp_path):
    result = run_script("train_tiny.py", f"--out_dir={tmp_path}", "--resume=True", *TINY_TRAIN)
    assert_one_line_error(result, "no checkpoint at")


@pytest.mark.skipif(os.environ.get("MINIRD_SLOW") != "1", reason="the full default run: ~5 min (MINIRD_SLOW=1)")
def test_default_run_shows_depth_scaling(tmp_path):
    """The README's claim on the fixed seed, with the default settings: an answer of h hops is
    wrong with fewer than h + 1 steps and right from there on, also past the training depth."""
    result = run_script("train_tiny.py", f"--out_dir={tmp_path}", "--progress=False", timeout=1200)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "depth_scaling.json").read_text())
    mean_r = report["settings"]["mean_recurrence"]
    ind, ext = report["results"]["in-distribution"], report["results"]["extrapolation"]
    for r in (1, mean_r):
        for h, acc in ind[str(r)].items():  # right when h + 1 <= r steps, near the guess or below when not
            assert acc > 0.85 if int(h) + 1 <= r else acc < 0.4, (r, h, acc)
    assert sum(ind[str(mean_r)].values()) / len(ind[str(mean_r)]) >= 0.9  # the bar at r = mean
    for h, acc in ext["32"].items():  # beyond training: right with enough steps, not with 8
        assert acc > 0.7 and (int(h) + 1 <= 8 or ext["8"][h] < 0.5) and ext["64"][h] >= acc - 0.02, (h, acc)
