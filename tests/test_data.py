"""The toy corpus, checked against an interpreter written in the tests independently of minird.data.solve."""

import random
import re

import pytest

from helpers import reference_answers
from minird.data import (CharTokenizer, CorpusConfig, encode_batch, sample_extrapolation_problems,
                         sample_problems, solve)


def test_reference_checker_on_a_hand_worked_line():
    # k = 5, a = 2, b = k, q = a, x = b: x -> b -> k -> 5 is 2 hops, q -> a -> 2 is 1 hop
    assert reference_answers("k5;a2;bk;qa;xb;?x5?q2\n") == [("5", 2), ("2", 1)]
    with pytest.raises(AssertionError):
        reference_answers("bk;k5;?b5\n")  # k used before it is defined


@pytest.mark.parametrize("seed", range(3))
def test_generator_agrees_with_both_checkers(seed):
    cfg = CorpusConfig()
    rng = random.Random(seed)
    beyond = (cfg.max_hops + 1, cfg.max_hops + 4)
    problems = sample_problems(rng, 300, cfg) + sample_extrapolation_problems(rng, 100, cfg, beyond)
    for p in problems:
        answers = reference_answers(p.text)
        assert [p.text[i] for i in p.answer_positions] == [a for a, _ in answers]
        assert p.hops == [h for _, h in answers]
        assert solve(p.text) == [a for a, _ in answers]
        assert p.text.endswith("\n") and p.prompt == p.text[:p.answer_positions[0]]
        # every chain has its own root digit, so a guess among the line's digits is worth 1/n_chains
        roots = re.findall(r"\w(\d);", p.text)
        assert len(roots) == len(set(roots)) == cfg.n_queries + cfg.n_distractors


def test_difficulty_is_controlled():
    cfg = CorpusConfig(min_hops=1, max_hops=4)
    rng = random.Random(0)
    train = sample_problems(rng, 500, cfg)
    hops = [h for p in train for h in p.hops]
    assert set(hops) == {1, 2, 3, 4} and all(len(p.hops) == cfg.n_queries for p in train)
    extra = sample_extrapolation_problems(rng, 200, cfg, (7, 9))
    for p in extra:  # one long queried chain, the others no longer than in training
        assert sorted(p.hops)[-1] in (7, 8, 9) and sorted(p.hops)[-2] <= cfg.max_hops
    assert {max(p.hops) for p in extra} == {7, 8, 9}


def test_generation_is_seeded():
    cfg = CorpusConfig()
    first, again, other = ([p.text for p in sample_problems(random.Random(seed), 20, cfg)] for seed in (1, 1, 2))
    assert first == again and first != other


def test_tokenizer_round_trip_and_unknown_characters():
    tok = CharTokenizer()
    line = sample_problems(random.Random(0), 1, CorpusConfig())[0].text
    assert tok.decode(tok.encode(line)) == line
    with pytest.raises(ValueError, match="not in the vocabulary") as err:
        tok.encode("a3;b#;?b")
    assert "\n" not in str(err.value)


def test_encode_batch_targets_only_the_answers():
    tok = CharTokenizer()
    problems = sample_problems(random.Random(0), 8, CorpusConfig())
    x, y, hops, lookups = encode_batch(problems, tok, block_size=128)
    assert x.shape == y.shape == hops.shape == lookups.shape == (8, max(len(p.text) for p in problems) - 1)
    for b, p in enumerate(problems):
        assert tok.decode(x[b, :len(p.text) - 1].tolist()) == p.text[:-1]
        scored = (y[b] >= 0).nonzero().flatten().tolist()
        assert scored == [i - 1 for i in p.answer_positions]  # position i - 1 predicts the answer at i
        assert tok.decode(y[b, scored].tolist()) == "".join(a for a, _ in reference_answers(p.text))
        assert hops[b, scored].tolist() == [h for _, h in reference_answers(p.text)]
        assert lookups[b, scored].tolist() == [h + 1 for _, h in reference_answers(p.text)]
    assert ((y >= 0) == (lookups >= 0)).all()
    with pytest.raises(ValueError, match="block_size"):
        encode_batch(problems, tok, block_size=10)


def test_dense_targets_ask_every_statement_for_its_root():
    tok = CharTokenizer()
    problems = sample_problems(random.Random(0), 8, CorpusConfig())
    x, y, hops, lookups = encode_batch(problems, tok, block_size=128, dense_targets=True)
    for b, p in enumerate(problems):
        for i, stmt in enumerate(re.findall(r"\w\w;", p.text)):
            value_slot = 3 * i + 1
            root, depth = reference_answers(f"{p.text[:3 * i + 3]}?{stmt[0]}0")[-1]
            assert tok.decode([y[b, value_slot].item()]) == root
            assert lookups[b, value_slot] == depth  # a statement d hops from its root: d lookups
        assert (hops[b] >= 0).sum() == len(p.answer_positions)  # hops still marks only the answers
