"""train_tiny.py end to end: a short run learns, writes its table, JSON and plot; --resume goes on
bit for bit (also after Ctrl-C); DDP; every bad setting is a one-line error before any work; no
run replaces a checkpoint it was not asked to."""

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, TINY_ITERS, TINY_TRAIN, assert_one_line_error, run_script
from minird.checkpoint import load_checkpoint


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
    # the log goes on from the checkpoint's: not from 0, and not a new log
    assert [e["iter"] for e in report["log"]] == list(range(10, TINY_ITERS + 21, 10))
    assert report["log"][-2]["loss"] < first_loss  # the trained weights were loaded, not a fresh init
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


def tiny_args(out_dir, iters, *extra, noisy_s0=False):
    """TINY_TRAIN into out_dir for iters iterations; noisy_s0 draws s0 at random (one more random
    stream for resume to restore, beside the lines and the step counts)."""
    return [f"--out_dir={out_dir}", f"--max_iters={iters}", *TINY_TRAIN, *(["--init_scale=1.0"] if noisy_s0 else []),
            *extra]


def final_weights(out_dir):
    return load_checkpoint(out_dir / "ckpt.pt")["model"]


def test_resume_after_ctrl_c_is_the_uninterrupted_run_bit_for_bit(tmp_path):
    """Ctrl-C stops at the end of an iteration and saves; --resume=True then restores the weights,
    the optimizer, the curriculum and every random stream (lines, step counts, s0), so the split
    run ends with the uninterrupted run's weights and log, whichever iteration it stopped at."""
    iters = 60
    whole = run_script("train_tiny.py", *tiny_args(tmp_path / "whole", iters, noisy_s0=True))
    assert whole.returncode == 0, whole.stderr
    # unbuffered: the line that says iteration 10 is done must reach us while the run goes on
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    split = tmp_path / "split"
    run = subprocess.Popen([sys.executable, "train_tiny.py", *tiny_args(split, iters, noisy_s0=True)], cwd=ROOT,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in run.stdout:  # interrupt once the first evaluation is out: mid-run, not before it starts
        if line.startswith("iter 10:"):
            run.send_signal(signal.SIGINT)
            break
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert "stopped at iteration" in out and "--resume=True" in out
    stopped_at = load_checkpoint(split / "ckpt.pt")["iter_num"]
    assert 10 <= stopped_at < iters
    resumed = run_script("train_tiny.py", *tiny_args(split, iters, "--resume=True", noisy_s0=True))
    assert resumed.returncode == 0, resumed.stderr
    a, b = final_weights(tmp_path / "whole"), final_weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = lambda d: json.loads((d / "depth_scaling.json").read_text())  # noqa: E731
    assert report(split)["results"] == report(tmp_path / "whole")["results"]
    assert [e["loss"] for e in report(split)["log"] if e["iter"] % 10 == 0] == \
           [e["loss"] for e in report(tmp_path / "whole")["log"]]


def test_no_run_replaces_a_checkpoint_it_was_not_asked_to(trained_run, tmp_path):
    out_dir = tmp_path / "out"
    shutil.copytree(trained_run[0], out_dir)
    before = (out_dir / "ckpt.pt").read_bytes()
    (out_dir / ".ckpt-killed.tmp").write_bytes(b"half a checkpoint")  # what a kill -9 mid-save leaves
    fresh = run_script("train_tiny.py", *tiny_args(out_dir, 20))
    assert_one_line_error(fresh, "ckpt.pt exists", "--resume=True", "--overwrite=True")
    done = run_script("train_tiny.py", *tiny_args(out_dir, TINY_ITERS - 20, "--resume=True"))
    assert_one_line_error(done, f"has trained {TINY_ITERS} iterations already", "--max_iters above")
    changed = run_script("train_tiny.py", *tiny_args(out_dir, TINY_ITERS + 10, "--resume=True", "--n_embd=64",
                                                     "--max_hops=2"))
    assert_one_line_error(changed, "--resume=True keeps the checkpoint's max_hops, n_embd")
    assert (out_dir / "ckpt.pt").read_bytes() == before and (out_dir / ".ckpt-killed.tmp").exists()
    replaced = run_script("train_tiny.py", *tiny_args(out_dir, 20, "--overwrite=True"))
    assert replaced.returncode == 0, replaced.stderr
    assert load_checkpoint(out_dir / "ckpt.pt")["iter_num"] == 20
    assert not (out_dir / ".ckpt-killed.tmp").exists()  # a killed save's leftovers are cleaned up


@pytest.mark.parametrize("setting, fragment", [
    ("--device=tpu", "--device must be auto, cpu, cuda or cuda:N"),
    ("--batch_size=0", "--batch_size must be >= 1"),
    ("--n_embd=-8", "--n_embd must be >= 1"),
    ("--n_head=3", "--n_head must be a divisor of n_embd = 32"),
    ("--n_head=0", "--n_head must be >= 1"),
    ("--block_size=4", "--block_size must be >= "),
    ("--mean_recurrence=0", "--mean_recurrence must be >= 1"),
    ("--mean_backprop_depth=0", "--mean_backprop_depth must be >= 1"),
    ("--threads=-2", "--threads must be >= 0"),
    ("--max_hops=60", "--max_hops must be small enough"),
    ("--n_distractors=100", "--n_distractors must be <= 7"),
    ("--eval_interval=0", "--eval_interval must be >= 1"),
    ("--init=bogus", "--init must be normal or takase"),
    ("--learning_rate=nan", "--learning_rate must be a number > 0"),
    ("--eval_problems=0", "--eval_problems must be >= 1"),
    ("--max_iters=-1", "--max_iters must be >= 1"),
    ("--n_queries=0", "--n_queries must be >= 1"),
    ("--extrapolation_hops=2-5", "--extrapolation_hops must be lo-hi with max_hops = 3 < lo <= hi"),
    ("--extrapolation_hops=far", "--extrapolation_hops must look like 4-10"),
    ("--depth_steps=1,0", "--depth_steps must be positive integers"),
    ("--curriculum_threshold=1.5", "--curriculum_threshold must be in (0, 1]"),
    ("--preset=giant", "--preset must be one of tiny, huginn"),
    ("--plateau_check=-5", "--plateau_check must be >= 0"),
    ("--separator_mask_iters=-1", "--separator_mask_iters must be >= 0"),
])
def test_every_bad_setting_is_a_one_line_error_before_any_work(tmp_path, setting, fragment):
    result = run_script("train_tiny.py", *tiny_args(tmp_path / "out", 10), setting)
    assert_one_line_error(result, "train_tiny.py:", fragment)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_out_dir_that_is_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    result = run_script("train_tiny.py", *tiny_args(tmp_path / "file", 10))
    assert_one_line_error(result, "train_tiny.py:", "is a file, not a directory")


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


def test_plateau_detector_restarts_a_stuck_run_and_says_so(tmp_path):
    """A run that cannot learn (a learning rate of ~0) is still at the curriculum's first level at
    plateau_check: one line says so, the run restarts from iteration 0 with seed + 1000, and the
    report records the run it gave up."""
    result = run_script("train_tiny.py", *tiny_args(tmp_path / "out", 60, "--learning_rate=1e-9", "--min_lr=0",
                                                    "--plateau_check=40", "--plateau_restarts=1"))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("plateau:")]
    assert lines == [f"plateau: at iteration 40 the curriculum is still at level 1 (one-lookup accuracy "
                     f"{lines[0].split('accuracy ')[1].split(' <')[0]} < 0.8); restarting from iteration 0 with "
                     f"seed 2337 (restart 1 of 1)"]
    report = json.loads((tmp_path / "out" / "depth_scaling.json").read_text())
    assert [(r["seed"], r["stopped_at"]) for r in report["restarts"]] == [(1337, 40)]
    assert report["iters"] == 60 and [e["iter"] for e in report["log"]] == [10, 20, 30, 40, 50, 60]
    assert "(seed 2337; restarted after 40 iterations of seed 1337 on the plateau)" in result.stdout


def test_plateau_detector_leaves_a_run_that_left_the_first_level_alone(tmp_path):
    """The detector looks at the curriculum only: a run whose gate opened before plateau_check (here
    a threshold low enough to open at the first check, iteration 50) goes on untouched."""
    result = run_script("train_tiny.py", *tiny_args(tmp_path / "out", 60, "--curriculum_threshold=0.01",
                                                    "--plateau_check=55"))
    assert result.returncode == 0, result.stderr
    assert "plateau:" not in result.stdout
    report = json.loads((tmp_path / "out" / "depth_scaling.json").read_text())
    assert report["restarts"] == [] and report["log"][-1]["max_hops"] > 1


def test_huginn_preset_leaves_the_first_level_on_a_seed_that_was_stuck_there(tmp_path):
    """Seed 3 of --preset=huginn stayed at the guess to iteration 2,000 under every setting of
    training log section 23; with the separators hidden from the prelude for its first 300
    iterations (the preset's separator_mask_iters) it opened curriculum level 2 at ~500 here
    (section 24). 700 iterations (~65 s on 2 cores) leave room for another machine's rounding."""
    result = run_script("train_tiny.py", "--preset=huginn", "--seed=3", "--max_iters=700", "--plateau_restarts=0",
                        "--eval_interval=100", "--depth_steps=4", "--eval_problems=32", "--progress=False",
                        f"--out_dir={tmp_path}", timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "depth_scaling.json").read_text())
    assert report["settings"]["separator_mask_iters"] == 300 and report["restarts"] == []
    assert report["log"][-1]["max_hops"] >= 2, [e["max_hops"] for e in report["log"]]


def test_preset_replaces_defaults_but_not_what_is_given():
    from minird.train import PRESETS, TrainConfig, settings_of, with_preset
    defaults = settings_of(TrainConfig())
    huginn = with_preset({**defaults, "preset": "huginn"}, given={"preset", "n_layers_in_coda"})
    assert huginn["n_layers_in_prelude"] == PRESETS["huginn"]["n_layers_in_prelude"] == 1
    assert huginn["n_layers_in_coda"] == defaults["n_layers_in_coda"]  # given on the command line: kept
    assert with_preset(defaults, given=set()) == defaults  # the tiny preset is the defaults


def test_resume_from_an_older_checkpoint_is_a_one_line_error(trained_run, tmp_path):
    """A checkpoint without the random streams (written before resume restored them) cannot go on
    bit for bit: refused in one line, and left as it is."""
    out_dir = tmp_path / "out"
    shutil.copytree(trained_run[0], out_dir)
    ckpt = load_checkpoint(out_dir / "ckpt.pt")
    del ckpt["data_rng"], ckpt["run_seed"]
    torch.save(ckpt, out_dir / "ckpt.pt")
    result = run_script("train_tiny.py", *tiny_args(out_dir, TINY_ITERS + 10, "--resume=True"))
    assert_one_line_error(result, "was written by an older minird (no run_seed, data_rng)", "--overwrite=True")


def test_help_lists_every_setting_with_its_default():
    from minird.train import TrainConfig, settings_of
    result = run_script("train_tiny.py", "--help")
    assert result.returncode == 0, result.stderr
    assert all(f"--{k}={v}" in result.stdout for k, v in settings_of(TrainConfig()).items())
