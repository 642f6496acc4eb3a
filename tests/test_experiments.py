"""python -m minird.experiments: runs on a checkpoint, reports what it measured, errors in one line."""

import json
import shutil

from helpers import assert_one_line_error, run_script


def test_adaptive_reports_steps_and_accuracy_by_hops(trained_run, tmp_path):
    shutil.copy(trained_run[0] / "ckpt.pt", tmp_path / "ckpt.pt")
    result = run_script("-m", "minird.experiments", "adaptive", f"--ckpt={tmp_path / 'ckpt.pt'}", "--cap=4",
                        "--lines=16")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "adaptive.json").read_text())
    assert report["cap"] == 4
    results = report["results"]
    assert set(results) == {"none", "kl", "latent-diff", "entropy-diff", "argmax-stability", "cosine"}
    for criterion, by_hops in results.items():
        assert by_hops.keys() == results["none"].keys() and len(by_hops) > 3  # training and beyond
        for steps, accuracy in by_hops.values():
            assert (steps == 4) if criterion == "none" else (1 <= steps <= 4)
            assert 0 <= accuracy <= 1
    assert "mean steps used" in result.stdout


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    result = run_script("-m", "minird.experiments", "adaptive", f"--ckpt={tmp_path / 'none.pt'}")
    assert_one_line_error(result, "no checkpoint")
