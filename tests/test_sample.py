"""sample.py: its answers are the model's greedy answers at each r, its verdicts are right, and
bad input is a one-line error."""

import re

import pytest
import torch

from helpers import assert_one_line_error, reference_answers, run_script
from minird.data import CharTokenizer
from minird.checkpoint import load_checkpoint, save_checkpoint
from minird.generate import generate
from minird.model import RecurrentDepthConfig, RecurrentDepthLM


def run_sample(ckpt, *args):
    return run_script("sample.py", f"--ckpt={ckpt}", *args)


def table_rows(stdout):
    """[(hops label, wanted answer, [(answer, verdict) per r], prompt)] from sample.py's table."""
    rows = []
    for line in stdout.splitlines():
        parts = line.split(" | ")
        if len(parts) == 3 and parts[0].split() and parts[0].split()[-1] not in ("want", "right"):
            *hops, want = parts[0].split()
            rows.append((hops[0] if hops else "", want, re.findall(r"(\S+) (ok|x)\b", parts[1]), parts[2]))
    return rows


def greedy_answer(model, prompt, r):
    """What the checkpoint's model answers itself, for comparison with what sample.py prints."""
    idx = torch.tensor([CharTokenizer().encode(prompt)])
    with torch.no_grad():
        logits, _ = model(idx, num_steps=r)
    return CharTokenizer().decode([logits[0, -1].argmax().item()])


@pytest.fixture(scope="module")
def checkpoint(trained_run):
    path = trained_run[0] / "ckpt.pt"
    ckpt = load_checkpoint(path)
    model = RecurrentDepthLM(RecurrentDepthConfig(**ckpt["model_args"])).eval()
    model.load_state_dict(ckpt["model"])
    assert model.config.init_scale == 0  # s0 = 0: the answers are deterministic
    return path, model, ckpt["corpus"]


def check_rows(rows, model, steps):
    """Every printed answer is the model's own at that r, every verdict and wanted answer is right."""
    for hops, want, cells, prompt in rows:
        want_ref, hops_ref = reference_answers(prompt + "0")[-1]  # the last query, answer left blank
        assert want == want_ref and hops.rstrip("*") in ("", str(hops_ref))
        assert [answer for answer, _ in cells] == [repr(greedy_answer(model, prompt, r))[1:-1] for r in steps]
        assert [verdict for _, verdict in cells] == ["ok" if answer == want else "x" for answer, _ in cells]


def test_default_prompts_side_by_side(checkpoint):
    path, model, corpus = checkpoint
    single = run_sample(path, "--steps", "2")
    table = run_sample(path, "--steps", "1,2,4")
    assert single.returncode == 0 and table.returncode == 0, single.stderr + table.stderr
    assert re.search(r"\| r=1 +r=2 +r=4 +\| prompt", table.stdout)
    rows = table_rows(table.stdout)
    check_rows(rows, model, [1, 2, 4])
    check_rows(table_rows(single.stdout), model, [2])
    assert [row[3] for row in table_rows(single.stdout)] == [row[3] for row in rows]  # the same problems
    hops = [int(row[0].rstrip("*")) for row in rows]
    assert len(rows) >= 3 and hops == sorted(set(hops))  # rising difficulty
    assert hops[-1] > corpus["max_hops"] and rows[-1][0].endswith("*")  # and one beyond training
    right = re.search(r"right \| (.*)", table.stdout).group(1).split()
    assert right == [f"{sum(row[2][i][1] == 'ok' for row in rows)}/{len(rows)}" for i in range(3)]


def test_own_prompts(checkpoint):
    path, model, _ = checkpoint
    result = run_sample(path, "--steps", "1,4", "--prompt", "k5;bk;xb;?x", "--prompt", "a1;b2;cb;?c2?a")
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert [(row[1], row[3]) for row in rows] == [("5", "k5;bk;xb;?x"), ("1", "a1;b2;cb;?c2?a")]
    check_rows(rows, model, [1, 4])


def test_trace_decodes_every_step(checkpoint):
    path, model, _ = checkpoint
    prompt = "k5;a2;bk;xb;?x"
    result = run_sample(path, "--steps", "1,3", "--trace", "--prompt", prompt)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split(f"{prompt}  (want 5)\n")[1].splitlines()
    assert lines[0].split() == ["step", "1", "2", "3"]  # up to the largest --steps
    answers, p_answer, p_want = (line.split()[1:] for line in lines[1:4])
    assert answers == [greedy_answer(model, prompt, r) for r in (1, 2, 3)]  # step t: the model at r = t
    for top, p_top, p_5 in zip(answers, map(float, p_answer), map(float, p_want)):
        assert 0 <= p_5 <= p_top <= 1 and (top != "5" or p_5 == p_top)


def test_adaptive_exit_shows_the_steps_used(checkpoint):
    path, model, _ = checkpoint
    prompt = "k5;a2;bk;xb;?x"
    result = run_sample(path, "--steps", "3,6", "--criterion", "kl", "--min_steps", "2", "--prompt", prompt)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.endswith(f"| {prompt}"))
    cells = re.findall(r"(\S+) (ok|x) (\d+)\b", row.split(" | ")[1])
    assert len(cells) == 2
    idx = torch.tensor([CharTokenizer().encode(prompt)])
    for (answer, _, used), cap in zip(cells, (3, 6)):
        run = generate(model, idx, 1, num_steps=cap, criterion="kl", min_steps=2)
        out, steps = run.ids, run.steps
        assert answer == CharTokenizer().decode(out[0, -1:].tolist()) and int(used) == steps[0, -1] <= cap
        assert int(used) >= 2


def test_prompts_of_different_lengths_go_in_one_batch(checkpoint):
    """The prompts are padded on the left into one batch: every answer, and the steps it used with
    adaptive exit, is the prompt's own alone."""
    path, model, _ = checkpoint
    prompts = ["a1;?a", "k5;a2;bk;xb;?x", "a1;b2;cb;?c2?a"]
    result = run_sample(path, "--steps", "2,5", "--criterion", "kl", *(arg for p in prompts for arg in ("--prompt", p)))
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.count(" | ") == 2 and "prompt" not in line]
    assert [row.split(" | ")[2] for row in rows] == prompts
    for row, prompt in zip(rows, prompts):
        idx = torch.tensor([CharTokenizer().encode(prompt)])
        cells = re.findall(r"(\S+) (ok|x) (\d+)\b", row.split(" | ")[1])
        for (answer, _, used), r in zip(cells, (2, 5)):
            run = generate(model, idx, 1, num_steps=r, criterion="kl")
            out, steps = run.ids, run.steps
            assert answer == CharTokenizer().decode(out[0, -1:].tolist()) and int(used) == steps[0, -1]


def test_speculative_decoding_and_cache_sharing_flags(checkpoint):
    """--draft_steps writes what plain greedy decoding writes, and says how many drafted tokens it kept;
    --cache_lookup_strategy reaches generate."""
    path, model, _ = checkpoint
    prompts = ["k5;a2;bk;xb;?x", "a1;?a"]
    args = ["--steps", "2,4", "--new_tokens", "6", *(arg for p in prompts for arg in ("--prompt", p))]
    plain = run_sample(path, *args)
    drafted = run_sample(path, *args, "--draft_steps", "1", "--lookahead_for_draft", "3")
    shared = run_sample(path, *args, "--cache_lookup_strategy", "compress-s2")
    for result in (plain, drafted, shared):
        assert result.returncode == 0, result.stderr
    written = [line for line in plain.stdout.splitlines() if " -> " in line]
    assert len(written) == 2 * len(prompts)
    for line, (r, prompt) in zip(written, [(r, p) for r in (2, 4) for p in prompts]):
        out = generate(model, torch.tensor([CharTokenizer().encode(prompt)]), 6, num_steps=r).ids
        assert line == f"  {prompt} -> {CharTokenizer().decode(out[0, len(prompt):].tolist())!r}"
    assert drafted.stdout.startswith(plain.stdout)  # the same table and tokens, then the acceptance lines
    stats = re.findall(r"self-speculative decoding at r=(\d+): drafts of 3 tokens at 1 steps, (\d+)/(\d+) drafted",
                       drafted.stdout)
    assert [r for r, _, _ in stats] == ["2", "4"] and all(int(a) <= int(d) for _, a, d in stats)
    for line, (r, prompt) in zip([line for line in shared.stdout.splitlines() if " -> " in line],
                                 [(r, p) for r in (2, 4) for p in prompts]):
        out = generate(model, torch.tensor([CharTokenizer().encode(prompt)]), 6, num_steps=r,
                       cache_lookup_strategy="compress-s2").ids
        assert line.endswith(f" -> {CharTokenizer().decode(out[0, len(prompt):].tolist())!r}")


def test_default_steps_is_the_training_mean(checkpoint):
    path, model, _ = checkpoint
    result = run_sample(path, "--prompt", "k5;bk;?b")
    assert result.returncode == 0, result.stderr
    assert f"r={model.config.mean_recurrence} " in result.stdout


@pytest.mark.parametrize("args, fragment", [
    (["--steps", "0"], "positive integers"),
    (["--steps", "-1"], "positive integers"),
    (["--steps=-4"], "positive integers"),
    (["--steps", "abc"], "positive integers"),
    (["--steps", "1,,4"], "positive integers"),
    (["--steps", "2.5"], "positive integers"),
    (["--temprature", "1"], "unrecognized arguments"),
    (["--criterion", "entropy"], "invalid choice"),
    (["--exit_threshold", "-1"], "non-negative number"),
    (["--min_steps", "0"], "positive integer"),
    (["--prompt", "a3;b#;?b"], "not in the vocabulary"),
    (["--prompt", "a3;ba;" * 40 + "?b"], "context"),
    (["--prompt", "a3;ba;"], "query"),
    (["--prompt", "a3;b;?b"], "statements"),
    (["--prompt", "a3;?z"], "'z' before defining it"),
    (["--draft_steps", "0"], "positive integer"),
    (["--lookahead_for_draft", "-2"], "positive integer"),
    (["--new_tokens", "0"], "positive integer"),
    (["--cache_lookup_strategy", "compress-s0"], "or 'compress-sN'"),
    (["--cache_lookup_strategy", "latest"], "or 'compress-sN'"),
    (["--cache_lookup_strategy", "skip"], "or 'compress-sN'"),
    (["--prompt", "a3;ba;" * 15 + "?b", "--new_tokens", "8"], "--new_tokens 8 does not fit after the longest prompt"),
    (["--criterion", "kl", "--steps", "4", "--min_steps", "6"], "min_steps must be an integer from 1 to num_steps = 4"),
    (["--steps", "100000000"], "needs a KV cache of"),
    (["--steps", "2,8", "--draft_steps", "4"], "draft_steps must be an integer from 1 to num_steps = 2"),
    (["--draft_steps", "1", "--criterion", "kl"], "criterion='none'"),
    (["--draft_steps", "1", "--cache_lookup_strategy", "compress-s1"], "cache_lookup_strategy='full'"),
])
def test_bad_arguments_are_one_line_errors(checkpoint, args, fragment):
    result = run_sample(checkpoint[0], *args)
    assert_one_line_error(result, "sample.py:", fragment)
    assert result.stdout == ""


@pytest.mark.parametrize("damage, fragment", [
    ("missing", "no checkpoint at"),
    ("truncated", "not a readable checkpoint"),
    ("not minird", "not a minird checkpoint"),
    ("wrong weights", "does not fit this version of minird"),
])
def test_bad_checkpoints_are_one_line_errors(checkpoint, tmp_path, damage, fragment):
    path = tmp_path / "ckpt.pt"
    good = checkpoint[0].read_bytes()
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "not minird":
        torch.save({"weights": torch.zeros(3)}, path)
    elif damage == "wrong weights":
        ckpt = load_checkpoint(checkpoint[0])
        save_checkpoint(path, {**ckpt, "model": {"wte.weight": torch.zeros(3)}})
    result = run_sample(path, "--steps", "2")
    assert_one_line_error(result, "sample.py:", fragment)
    assert result.stdout == ""


# -----------------------------------------------------------------------------
# --init_from: a Huginn checkpoint in the official layout (the tiny fixture of tests/test_pretrained.py)

HUGINN_FIXTURE = "tests/fixtures/huginn_tiny"


def test_pretrained_text_is_generate_with_the_checkpoints_stop_tokens():
    from minird.pretrained import from_pretrained
    from minird.tokenizer import HuginnTokenizer

    result = run_script("sample.py", "--init_from", HUGINN_FIXTURE, "--prompt", "Hello there", "--steps", "1,4",
                        "--new_tokens", "6", "--seed", "3",
                        "--device", "cpu")  # the CPU model below: the same random stream
    assert result.returncode == 0, result.stderr
    model = from_pretrained(HUGINN_FIXTURE).eval()
    tokenizer = HuginnTokenizer.from_pretrained(HUGINN_FIXTURE)
    ids = tokenizer.encode("Hello there")[:-1]  # without the end-of-text mark: the text goes on
    for r in (1, 4):
        torch.manual_seed(3)
        out = generate(model, torch.tensor([ids]), 6, num_steps=r, stop_tokens=tokenizer.stop_token_ids)
        assert f"{tokenizer.decode(out.ids[0, len(ids):].tolist())!r}" in \
            [line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith(f"  r={r} ")]


def test_pretrained_diffusion_forcing_is_generate_with_it():
    from minird.pretrained import from_pretrained
    from minird.tokenizer import HuginnTokenizer

    result = run_script("sample.py", "--init_from", HUGINN_FIXTURE, "--prompt", "Hello there", "--steps", "4",
                        "--new_tokens", "6", "--seed", "3", "--diffusion_forcing", "--inner_recurrence", "2",
                        "--device", "cpu")  # the CPU model below: the same random stream
    assert result.returncode == 0, result.stderr
    model = from_pretrained(HUGINN_FIXTURE).eval()
    tokenizer = HuginnTokenizer.from_pretrained(HUGINN_FIXTURE)
    ids = tokenizer.encode("Hello there")[:-1]
    torch.manual_seed(3)
    out = generate(model, torch.tensor([ids]), 6, num_steps=4, stop_tokens=tokenizer.stop_token_ids,
                   diffusion_forcing=True, inner_recurrence=2)
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("  r=4 ")]
    assert line.endswith(f"{tokenizer.decode(out.ids[0, len(ids):].tolist())!r}")
    assert f"diffusion forcing: {out.stats.forwards} forwards" in line


def test_pretrained_chat_wraps_the_prompt_in_the_chat_format():
    result = run_script("sample.py", "--init_from", HUGINN_FIXTURE, "--chat", "--prompt", "Hi", "--steps", "2",
                        "--new_tokens", "3", "--criterion", "kl")
    assert result.returncode == 0, result.stderr
    from minird.tokenizer import HuginnTokenizer
    tokenizer = HuginnTokenizer.from_pretrained(HUGINN_FIXTURE)
    n = len(tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], True),
                             add_special_tokens=False))
    assert f"'Hi' ({n} tokens, chat format)" in result.stdout and "mean steps" in result.stdout


@pytest.mark.parametrize("args, fragment", [
    (["--init_from", "tests/fixtures/no_such_folder", "--prompt", "x"], "no such folder"),
    (["--init_from", HUGINN_FIXTURE], "--init_from needs at least one --prompt"),
    (["--chat"], "--chat, --dtype and --device go with --init_from"),
    (["--diffusion_forcing"], "--diffusion_forcing goes with --init_from"),
    (["--init_from", HUGINN_FIXTURE, "--prompt", "x", "--diffusion_forcing", "--criterion", "kl"],
     "diffusion_forcing is greedy"),
    (["--init_from", HUGINN_FIXTURE, "--prompt", "x", "--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
    (["--init_from", HUGINN_FIXTURE, "--prompt", "x", "--steps", "2", "--min_steps", "3", "--criterion", "kl"],
     "min_steps must be an integer from 1 to num_steps = 2"),
])
def test_pretrained_bad_arguments_are_one_line_errors(args, fragment):
    assert_one_line_error(run_script("sample.py", *args), "sample.py:", fragment)
