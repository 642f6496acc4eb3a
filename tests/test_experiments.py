"""python -m minird.experiments: runs on a checkpoint, reports what it measured, errors in one line."""

import json
import shutil

import pytest
import torch

from helpers import assert_one_line_error, run_script
from minird.checkpoint import load_model
from minird.data import CharTokenizer
from minird.evaluate import decode_token_by_token, encode_answers, held_out_sets
from minird.generate import generate
from minird.kv_cache import KVCache


def run_experiment(trained_run, tmp_path, name, *args):
    """Run one experiment on a copy of the trained checkpoint; returns (its JSON report, stdout)."""
    shutil.copy(trained_run[0] / "ckpt.pt", tmp_path / "ckpt.pt")
    result = run_script("-m", "minird.experiments", name, f"--ckpt={tmp_path / 'ckpt.pt'}", *args)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / f"{name}.json").exists()
    return json.loads((tmp_path / f"{name}.json").read_text()), result.stdout


def test_adaptive_reports_steps_and_accuracy_by_hops(trained_run, tmp_path):
    report, stdout = run_experiment(trained_run, tmp_path, "adaptive", "--cap=4", "--lines=16")
    assert report["cap"] == 4
    results = report["results"]
    assert set(results) == {"none", "kl", "latent-diff", "entropy-diff", "argmax-stability", "cosine"}
    for criterion, by_hops in results.items():
        assert by_hops.keys() == results["none"].keys() and len(by_hops) > 3  # training and beyond
        for steps, accuracy in by_hops.values():
            assert (steps == 4) if criterion == "none" else (1 <= steps <= 4)
            assert 0 <= accuracy <= 1
    assert "mean steps used" in stdout


def test_depth_is_train_tiny_table_on_the_same_lines(trained_run, tmp_path):
    # train_tiny.py evaluates on lines drawn with seed + 10000 (1337 in TINY_TRAIN), 64 per set,
    # 4-10 hops beyond training: the same lines give the same table
    report, stdout = run_experiment(trained_run, tmp_path, "depth", "--seed=11337", "--lines=64", "--steps=1,2,4")
    assert report["r_values"] == [1, 2, 4]
    results = report["results"]
    assert set(results) == {"in-distribution", "extrapolation"}
    for name, by_r in results.items():
        assert set(by_r) == {"1", "2", "4"}
        for by_hops in by_r.values():
            assert by_hops.keys() == by_r["1"].keys()
            assert all(0 <= a <= 1 for a in by_hops.values())
    assert set(results["in-distribution"]["1"]) == {"0", "1", "2", "3"}
    assert {int(h) for h in results["extrapolation"]["1"]} <= set(range(4, 11))
    trained = json.loads((trained_run[0] / "depth_scaling.json").read_text())["results"]
    assert trained.keys() == results.keys()
    for name in results:
        for r, by_hops in results[name].items():
            assert by_hops == pytest.approx(trained[name][r], abs=1e-6)
    assert "r=4" in stdout


def test_ccot_reports_both_ways_on_the_same_tokens(trained_run, tmp_path):
    report, stdout = run_experiment(trained_run, tmp_path, "ccot", "--cap=4", "--lines=8")
    assert (report["cap"], report["criterion"], report["lines"]) == (4, "kl", 16)
    fresh, continuous = (report["results"][m]["by_kind"] for m in ("fresh", "continuous"))
    assert list(fresh) == list(continuous)
    assert {"name", "value", ";", "?", "answer digit", "all tokens"} <= set(fresh)
    answers = [k for k in fresh if k.startswith("answer,")]
    assert sum(fresh[k]["tokens"] for k in answers) == 16 * 3  # every query of every line
    assert fresh["all tokens"]["tokens"] == sum(row["tokens"] for k, row in fresh.items() if k != "all tokens")
    for kind in fresh:
        for row in (fresh[kind], continuous[kind]):
            assert row["tokens"] == fresh[kind]["tokens"]
            assert 1 <= row["steps"] <= 4
            assert (0 <= row["accuracy"] <= 1) if kind in answers else row["accuracy"] is None
    assert "continuous" in stdout


@pytest.mark.parametrize("continuous_compute", [False, True])
def test_token_by_token_decoding_is_generate_teacher_forced(trained_run, continuous_compute):
    """Fed the tokens generate() wrote, the ccot loop uses the same steps and predicts the same tokens."""
    model, _, corpus = load_model(trained_run[0] / "ckpt.pt")
    lines = held_out_sets(corpus, 4, 0, (corpus.max_hops + 1, corpus.max_hops + 2))["in-distribution"]
    x, _, _ = encode_answers(lines, model.config.block_size)
    out = generate(model, x[:, :1], max_new_tokens=10, num_steps=6, criterion="kl",
                   continuous_compute=continuous_compute)
    idx, steps = out.ids, out.steps
    logits, used = decode_token_by_token(model, idx[:, :-1], 6, "kl", continuous_compute)
    assert torch.equal(used, steps)
    assert torch.equal(logits.argmax(-1), idx[:, 1:])


@pytest.mark.parametrize("strategy", ["full", "compress-s1", "compress-s3"])
def test_token_by_token_decoding_at_fixed_r_is_generate_with_that_cache(trained_run, strategy):
    """criterion "none" (kvshare): fixed r, through the cache it is given, as generate with that strategy."""
    model, _, corpus = load_model(trained_run[0] / "ckpt.pt")
    lines = held_out_sets(corpus, 4, 0, (corpus.max_hops + 1, corpus.max_hops + 2))["in-distribution"]
    x, _, _ = encode_answers(lines, model.config.block_size)
    out = generate(model, x[:, :1], max_new_tokens=10, num_steps=3, cache_lookup_strategy=strategy)
    idx, steps = out.ids, out.steps
    kv_cache = KVCache(idx.size(1), strategy, model.config.n_layers_in_recurrent_block, 3)
    logits, used = decode_token_by_token(model, idx[:, :-1], 3, "none", kv_cache=kv_cache)
    assert torch.equal(used, steps) and (used == 3).all()
    assert torch.equal(logits.argmax(-1), idx[:, 1:])
    assert kv_cache.seq_len == idx.size(1) - 1
    full, _ = decode_token_by_token(model, idx[:, :-1], 3, "none")
    # the fixture loops R = 2 blocks: 3 steps write 6 core entries, which 1 or 3 slots cannot all keep
    assert torch.equal(logits, full) == (strategy == "full")


def test_kvshare_compares_cache_strategies(trained_run, tmp_path):
    report, stdout = run_experiment(trained_run, tmp_path, "kvshare", "--lines=8", "--kv_steps=1,2",
                                    "--kv_slots=1,2,4")
    R, P, C, h = 2, 1, 1, 32  # the fixture's core, prelude and coda layers, and width (helpers.TINY_TRAIN)
    assert (report["R"], report["r_values"]) == (R, [1, 2])
    strategies = report["strategies"]
    assert strategies == ["full", "compress-s1", "compress-s2", "compress-s4"]
    for r in ("1", "2"):
        for st in strategies:
            # float32 keys and values, per token: one entry per prelude and coda layer, and the core
            # entries: R * r for the full cache, at most N slots under compress-sN
            n = R * int(r) if st == "full" else min(int(st[len("compress-s"):]), R * int(r))
            assert report["bytes_per_token"][st][r] == (P + C + n) * 2 * h * 4
    for name, by_strategy in report["results"].items():
        for st in strategies:
            assert set(by_strategy[st]) == {"1", "2"}
            for r, by_hops in by_strategy[st].items():
                assert by_hops.keys() == by_strategy["full"]["1"].keys() and len(by_hops) > 0
                assert all(0 <= a <= 1 for a in by_hops.values())
                assert 0 <= report["overall"][name][st][r] <= 1
                n = int(st[len("compress-s"):]) if st != "full" else None
                if n is not None and n >= R * int(r):  # a slot per (step, layer): the full cache
                    assert by_hops == by_strategy["full"][r]
                    assert report["overall"][name][st][r] == report["overall"][name]["full"][r]
    assert set(report["results"]["in-distribution"]["full"]["1"]) == {"0", "1", "2", "3"}
    assert min(int(h) for h in report["results"]["extrapolation"]["full"]["1"]) >= 4
    assert "KiB per token" in stdout and "s4" in stdout


def test_speculative_writes_what_plain_decoding_writes(trained_run, tmp_path):
    report, stdout = run_experiment(trained_run, tmp_path, "speculative", "--lines=8", "--cap=4", "--spec_lines=3",
                                    "--new_tokens=8", "--draft_steps=1,4", "--lookahead_for_draft=2,3")
    assert (report["r"], report["lines"], report["new_tokens"]) == (4, 3, 8)
    assert list(report["results"]) == ["one line at a time", "batched (B=3)"]
    for mode, rows in report["results"].items():
        plain = rows.pop("plain")
        assert plain["tokens"] == 3 * 8
        # plain decoding: a forward for the prompt, then one per token but the last, all at r
        assert plain["forwards"] == plain["forwards_at_r"] == (3 if mode == "one line at a time" else 1) * 8
        assert plain["tokens_per_s"] > 0
        assert [(row["draft_steps"], row["lookahead"]) for row in rows.values()] == [(1, 2), (1, 3), (4, 2), (4, 3)]
        for row in rows.values():
            assert row["same_output"] is True and row["tokens"] == plain["tokens"]
            assert 0 <= row["accepted"] <= row["drafted"] and 0 <= row["acceptance_rate"] <= 1
            assert row["acceptance_rate"] == pytest.approx(row["accepted"] / row["drafted"])
            assert row["forwards"] == row["forwards_at_r"] + row["drafted"]  # each drafted token: one forward
            # every kept token saves a forward at r
            assert row["forwards_at_r"] == plain["forwards_at_r"] - row["accepted"]
            assert row["speedup"] == pytest.approx(plain["seconds"] / row["seconds"])
            assert row["cpu_speedup"] == pytest.approx(plain["cpu_seconds"] / row["cpu_seconds"])
    _, _, corpus = load_model(trained_run[0] / "ckpt.pt")
    # --seed and --beyond by default
    first = held_out_sets(corpus, 8, 7, (corpus.max_hops + 1, corpus.max_hops + 7))["in-distribution"][0]
    assert report["example"]["prompt"] == first.prompt and len(report["example"]["written"]) == 8
    assert "speed-up" in stdout and "plain" in stdout


def test_diffusion_compares_with_greedy(trained_run, tmp_path):
    """The report's rows agree with generate run here on the same prompts: greedy's forwards and
    steps, diffusion forcing's tokens as a share of greedy's."""
    report, stdout = run_experiment(trained_run, tmp_path, "diffusion", "--lines=8", "--cap=4", "--spec_lines=2",
                                    "--new_tokens=6", "--inner_recurrence=1,2")
    assert (report["r"], report["lines"], report["new_tokens"]) == (4, 2, 6)
    greedy = report["results"].pop("greedy")
    assert greedy["tokens"] == 2 * 6 and greedy["forwards"] == 2 * 6
    assert greedy["core_steps_per_token"] == pytest.approx(4 * 5 / 6)  # 5 fed tokens at r = 4 of 6 written
    model, _, corpus = load_model(trained_run[0] / "ckpt.pt")
    lines = held_out_sets(corpus, 8, 7, (corpus.max_hops + 1, corpus.max_hops + 7))["in-distribution"][:2]
    prompts = [torch.tensor([CharTokenizer().encode(line.prompt)]) for line in lines]
    assert [row["inner_recurrence"] for row in report["results"].values()] == [1, 2]
    for row in report["results"].values():  # s0 = 0 in this run (TINY_TRAIN): no noise, the same tokens here
        same = written = 0
        for idx in prompts:
            plain = generate(model, idx, 6, num_steps=4).ids[0, idx.size(1):]
            ids = generate(model, idx, 6, num_steps=4, diffusion_forcing=True,
                           inner_recurrence=row["inner_recurrence"]).ids[0, idx.size(1):]
            same, written = same + int((ids == plain[:len(ids)]).sum()), written + len(ids)
        assert row["tokens"] == written and row["agreement"] == pytest.approx(same / written)
        assert 0 <= row["prefix_agreement"] <= row["agreement"]
        assert row["speedup"] == pytest.approx(greedy["seconds"] / row["seconds"])
    assert "diffusion, inner_recurrence 2" in stdout and "as greedy" in stdout


def test_latent_reports_trajectories_of_the_answers(trained_run, tmp_path):
    report, stdout = run_experiment(trained_run, tmp_path, "latent", "--cap=6", "--lines=8")
    r = report["r"]
    assert r == 6
    by_hops = report["by_hops"]
    assert sum(row["tokens"] for row in by_hops.values()) == 16 * 3
    for row in by_hops.values():
        assert len(row["distance"]) == len(row["relative"]) == r  # |s_t - s_(t-1)|, t = 1 ... r
        assert min(row["distance"]) >= 0 and min(row["relative"]) >= 0
        assert row["final_distance"] == pytest.approx(row["distance"][-1], rel=1e-5)
        assert row["first_below"] is None or 1 <= row["first_below"] <= r
        assert 0 <= row["never_below"] <= 1 and 0 <= row["accuracy"] <= 1
        assert sum(row["shapes"].values()) == row["tokens"]
    assert report["examples"]
    for example in report["examples"]:
        assert str(example["hops"]) in by_hops
        assert len(example["projection"]) == r and all(len(p) == 3 for p in example["projection"])
        assert all(0 <= v <= 1 for v in example["explained"]) and sum(example["explained"]) <= 1 + 1e-6
    assert "first t" in stdout


def test_baselines_train_and_compare_with_the_recurrent_model(trained_run, tmp_path):
    report, stdout = run_experiment(trained_run, tmp_path, "baselines", "--iters=20", "--lines=8", "--steps=1,2")
    models = report["models"]
    # TINY_TRAIN's model loops 2 blocks at a mean of 2 steps: the baselines are 2 and 4 unshared blocks
    assert set(models) == {"recurrent", "2 layers, r=1", "4 layers, r=1"}
    recurrent, same_params = models["recurrent"], models["2 layers, r=1"]
    assert recurrent["r_values"] == [1, 2] and recurrent["iters"] == 120
    assert same_params["params"] == recurrent["params"] < models["4 layers, r=1"]["params"]
    for name, m in models.items():
        assert set(m["results"]) == {"in-distribution", "extrapolation"}
        for by_r in m["results"].values():
            assert set(by_r) == {str(r) for r in m["r_values"]}
            assert all(0 <= a <= 1 for by_hops in by_r.values() for a in by_hops.values())
        if name != "recurrent":
            assert m["r_values"] == [1] and m["iters"] == 20 and m["log"]
            assert (tmp_path / f"baseline-{m['layers']}-layers" / "ckpt.pt").exists()
    assert "rec r=2" in stdout


@pytest.mark.parametrize("args,fragment", [
    (["depth", "--steps=0"], "--steps"),
    (["depth", "--steps=1,x"], "--steps"),
    (["ccot", "--criterion=often"], "--criterion"),
    (["baselines", "--layers=0"], "--layers"),
    (["latent", "--cap=0"], "positive"),
    (["sideways"], "invalid choice"),
    (["kvshare", "--kv_slots=0"], "--kv_slots"),
    (["speculative", "--draft_steps=1,x"], "--draft_steps"),
    (["speculative", "--spec_lines=0"], "positive"),
])
def test_bad_arguments_are_one_line_errors(args, fragment):
    assert_one_line_error(run_script("-m", "minird.experiments", *args), fragment)


def test_drafting_deeper_than_the_verify_is_a_one_line_error(trained_run, tmp_path):
    shutil.copy(trained_run[0] / "ckpt.pt", tmp_path / "ckpt.pt")
    result = run_script("-m", "minird.experiments", "speculative", f"--ckpt={tmp_path / 'ckpt.pt'}", "--cap=2",
                        "--draft_steps=3", "--lines=4", "--spec_lines=2", "--new_tokens=4")
    assert_one_line_error(result, "draft_steps must be an integer from 1 to num_steps = 2")


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    result = run_script("-m", "minird.experiments", "adaptive", f"--ckpt={tmp_path / 'none.pt'}")
    assert_one_line_error(result, "no checkpoint")
