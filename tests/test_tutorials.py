"""The tutorials run: every chapter in tutorials/ is executed by tutorials/run.py in a fresh process
(one thread, matplotlib Agg, cwd = the repository root), skipping the blocks marked no-ci. A new
chapter is a new tutorials/NN_name.md file: it is found and tested without changing this file.
A failure names the chapter, the block number and the line, then the traceback."""

import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT

RUN = ROOT / "tutorials" / "run.py"
CHAPTERS = sorted(p.name for p in (ROOT / "tutorials").glob("[0-9][0-9]_*.md"))
DEFAULT_CKPT = ROOT / "out-tiny" / "ckpt.pt"


def run_tutorial(*args, env=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", **(env or {})}
    return subprocess.run([sys.executable, str(RUN), *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def check(result):
    assert result.returncode == 0, f"\n{result.stderr[-6000:]}\n--- stdout (tail) ---\n{result.stdout[-2000:]}"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter(chapter):
    check(run_tutorial("--ci", f"tutorials/{chapter}"))


# The other side of the chapters that adapt to what exists on the machine: chapter 8 without the
# compiled extension (a reader with no compiler), the chapters on a trained model without its
# checkpoint (CI: they use an untrained stand-in; where out-tiny/ckpt.pt exists, test_chapter ran
# on the real one).
CHECKPOINT_CHAPTERS = ("05_", "06_", "07_", "09_")


def test_kernel_chapter_without_extension():
    (chapter,) = [c for c in CHAPTERS if c.startswith("08_")]
    result = run_tutorial("--ci", "--without-extension", f"tutorials/{chapter}")
    check(result)
    assert "not built" in result.stdout


@pytest.mark.skipif(not DEFAULT_CKPT.exists(), reason="no out-tiny/ckpt.pt: test_chapter already ran the stand-in")
@pytest.mark.parametrize("prefix", CHECKPOINT_CHAPTERS)
def test_chapter_without_checkpoint(prefix, tmp_path):
    (chapter,) = [c for c in CHAPTERS if c.startswith(prefix)]
    result = run_tutorial("--ci", f"tutorials/{chapter}", env={"MINIRD_CKPT": str(tmp_path / "missing.pt")})
    check(result)
    assert "stand-in" in result.stdout


def test_unknown_fence_tag_is_an_error(tmp_path):
    for info in ("pyhton", "python no_ci", "Python"):
        chapter = tmp_path / "01_bad.md"
        chapter.write_text(f"# a chapter\n\n```python\nx = 1\n```\n\ntext\n\n```{info}\nraise SystemExit(3)\n```\n")
        result = run_tutorial(chapter)
        assert result.returncode == 1 and f"01_bad.md:9: unknown fence info string {info!r}" in result.stderr, \
            result.stderr


def test_failure_names_chapter_block_and_line(tmp_path):
    chapter = tmp_path / "01_fails.md"
    chapter.write_text("```python\nx = 1\n```\n\n```text\nshown\n```\n\n```python\ny = x\nz = 1 / 0\n```\n")
    result = run_tutorial(chapter)
    assert result.returncode == 1, result.stderr
    assert "01_fails.md: block 2 (line 10) failed: ZeroDivisionError" in result.stderr, result.stderr
    assert "01_fails.md\", line 11" in result.stderr, result.stderr  # the traceback points into the chapter


def test_stale_quote_is_an_error(tmp_path):
    chapter = tmp_path / "01_quote.md"
    chapter.write_text("```python quote minird/model.py\nclass RMSNorm(nn.Module):\n...\n"
                       "def this_function_does_not_exist():\n```\n")
    result = run_tutorial(chapter)
    assert result.returncode == 1 and "no longer matches" in result.stderr, result.stderr


def test_index_lists_every_chapter():
    index = (ROOT / "tutorials" / "README.md").read_text()
    linked = re.findall(r"\]\((\d\d_[^)]+\.md)\)", index)
    assert linked == CHAPTERS, f"tutorials/README.md links {linked}, the chapters are {CHAPTERS}"


def test_project_readme_lists_every_chapter():
    readme = (ROOT / "README.md").read_text()
    linked = re.findall(r"\]\(tutorials/(\d\d_[^)]+\.md)\)", readme)
    assert linked == CHAPTERS, f"README.md links {linked}, the chapters are {CHAPTERS}"
