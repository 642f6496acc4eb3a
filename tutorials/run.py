"""
Run a tutorial chapter the way a reader would: its ```python blocks in order, in one namespace,
from the repository root. tests/test_tutorials.py runs every chapter with it.

    python tutorials/run.py 02                     # one chapter, by number or by path
    python tutorials/run.py --ci 04                # skip the blocks marked no-ci, as CI does
    python tutorials/run.py --all                  # every chapter, in reading order
    python tutorials/run.py --times 05             # also each block's wall-clock time

The info string after the opening ``` decides what happens to a block. Anything not listed here
is an error, so a typo (```pyhton, ```python no_ci) cannot silently skip a block:

    python              run
    python no-ci        run, except with --ci (minutes of training, a GPU); the text says so
    LANG quote PATH     an excerpt of the file PATH, shown and never run; every line of it must
                        still be in PATH, in order (a line "..." skips any number of lines), so a
                        quote cannot drift from the code it shows. LANG: one of SHOWN below.
    text, bash, cpp, cuda, or nothing      shown, never run

A failing block stops the chapter with its file, block number and line, then the traceback,
whose line numbers are the Markdown file's own.
"""

import argparse
import os
import re
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
SHOWN = ("", "text", "bash", "cpp", "cuda")
FENCE = re.compile(r"^(\s*)```(.*)$")


class TutorialError(Exception):
    pass


def chapters():
    """The chapter files in reading order: tutorials/NN_name.md."""
    return sorted(TUTORIALS.glob("[0-9][0-9]_*.md"))


def parse(path):
    """[(kind, info, first line number, code)] for every fenced block; kind is "run", "no-ci",
    "quote" or "shown". Raises TutorialError on an unknown info string or an unclosed fence."""
    lines = Path(path).read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, info = m.group(1), m.group(2).strip()
        start = i + 1  # 0-based index of the first code line
        end = start
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise TutorialError(f"{path}:{i + 1}: the fence opened here is never closed")
        code = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[start:end])
        words = info.split()
        if info == "python":
            kind = "run"
        elif info == "python no-ci":
            kind = "no-ci"
        elif len(words) == 3 and words[1] == "quote" and (words[0] in SHOWN or words[0] == "python"):
            kind = "quote"
        elif info in SHOWN:
            kind = "shown"
        else:
            raise TutorialError(f"{path}:{i + 1}: unknown fence info string {info!r} (known: python, "
                                f"'python no-ci', 'LANG quote PATH', {', '.join(repr(s) for s in SHOWN)})")
        blocks.append((kind, info, start + 1, code))
        i = end + 1
    return blocks


def check_quote(path, line_no, info, code):
    """The quoted lines must appear in the quoted file, in order (whitespace at the ends ignored)."""
    source_path = ROOT / info.split()[2]
    if not source_path.exists():
        raise TutorialError(f"{path}:{line_no}: quotes {source_path.relative_to(ROOT)}, which does not exist")
    source = [line.strip() for line in source_path.read_text().splitlines()]
    at = 0
    for quoted in (line.strip() for line in code.splitlines()):
        if quoted in ("", "..."):
            continue
        try:
            at = source.index(quoted, at) + 1
        except ValueError:
            raise TutorialError(f"{path}:{line_no}: this quote of {info.split()[2]} no longer matches it "
                                f"(not found, in order: {quoted!r})") from None


def run_chapter(path, ci=False, times=False):
    """Execute the chapter's python blocks in order in one fresh namespace; print each block's
    output under a header. Raises TutorialError naming the block that failed."""
    path = Path(path).resolve()
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    blocks = parse(path)
    for kind, info, line_no, code in blocks:  # all quotes first: a stale quote fails fast
        if kind == "quote":
            check_quote(rel, line_no, info, code)
    os.chdir(ROOT)
    namespace = {"__name__": "__main__"}
    runnable = [b for b in blocks if b[0] in ("run", "no-ci")]
    for number, (kind, info, line_no, code) in enumerate(runnable, start=1):
        if kind == "no-ci" and ci:
            print(f"--- {rel} block {number} (line {line_no}): no-ci, skipped", flush=True)
            continue
        print(f"--- {rel} block {number} (line {line_no})", flush=True)
        # pad with blank lines so that the traceback's line numbers are the Markdown file's
        compiled = compile("\n" * (line_no - 1) + code, str(path), "exec")
        t0 = time.perf_counter()
        try:
            exec(compiled, namespace)
        except BaseException as err:
            if isinstance(err, KeyboardInterrupt):
                raise
            tb = "".join(traceback.format_exception(type(err), err, err.__traceback__.tb_next))  # from the block on
            raise TutorialError(f"{rel}: block {number} (line {line_no}) failed: "
                                f"{type(err).__name__}: {err}\n{tb}") from None
        if times:
            print(f"--- block {number}: {time.perf_counter() - t0:.1f} s", flush=True)
        sys.stdout.flush()


def resolve(name):
    """'02', '02_sandwich_blocks' or a path -> the chapter's path."""
    if Path(name).exists():
        return Path(name)
    matches = [p for p in chapters() if p.name.startswith(name)]
    if len(matches) != 1:
        raise TutorialError(f"no single chapter matches {name!r} (chapters: {', '.join(p.name for p in chapters())})")
    return matches[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("chapters", nargs="*", help="chapter numbers or paths")
    parser.add_argument("--all", action="store_true", help="every chapter, in reading order")
    parser.add_argument("--ci", action="store_true", help="skip the blocks marked no-ci")
    parser.add_argument("--times", action="store_true", help="print each block's wall-clock time")
    parser.add_argument("--without-extension", action="store_true",
                        help="run as if minird._C were not built (what a reader without a compiler sees)")
    args = parser.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")  # plots go to files, never to a window
    sys.path.insert(0, str(ROOT))
    if args.without_extension:
        sys.modules["minird._C"] = None  # `from minird import _C` then raises ImportError
    try:
        paths = chapters() if args.all else [resolve(c) for c in args.chapters]
        if not paths:
            parser.error("name a chapter, or --all")
        for path in paths:
            run_chapter(path, ci=args.ci, times=args.times)
    except TutorialError as err:
        print(f"run.py: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
