"""
The toy corpus: variable-binding programs whose answers need a number of sequential hops we choose.

A line is a program of interleaved assignment chains, then queries:

    k5;a2;bk;qa;xb;?x5?q2
    ^^ ^^ ^^ ^^ ^^  ^^^
    |  |  |  |  |   query "x", answer 5: x -> b -> k -> 5 is 2 hops past the root
    |  |  |  |  x = b
    root: k = 5

Each statement is two characters, the name and then its value (a digit, for a root) or the name
it copies; every definition comes before its uses. A query `?x` is answered with the digit at
the root of x's chain, and the number of hops from x to its root is the query's difficulty:
hop 0 is a single lookup, hop d needs d + 1 chained lookups.

What keeps the answer from being guessed (docs/TRAINING_LOG.md, "Where the recipe started"):
every chain has its own root digit, so the answer is one of the line's roots; chains are
interleaved at random, so neither position nor recency tells which root is whose; a distractor
chain is never asked, so elimination of the roots already answered in the line does not give the
last answer away. That guess is still worth something: with 3 queried chains and 1 distractor it
scores (1/4 + 1/3 + 1/2) / 3 = 36%, which is the level to beat (docs/TRAINING_LOG.md).
"""

from dataclasses import dataclass

import torch

NAMES = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
DIGITS = "0123456789"
END = "\n"  # ends a line; also pads a batch (padding is never a target)
VOCAB = END + ";?" + DIGITS + NAMES


class CharTokenizer:
    def __init__(self, chars=VOCAB):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, text):
        unknown = sorted(set(text) - set(self.stoi))
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {''.join(unknown)!r} (allowed: {self.chars!r})")
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


@dataclass
class Problem:
    text: str  # the whole line, program and answered queries, ending in END
    answer_positions: list  # index in text of each answer digit
    hops: list  # the hop count of each answer, aligned with answer_positions
    value_slots: list  # index in text of each statement's second character (its value)
    value_roots: list  # the root digit of the variable each statement defines
    value_depths: list  # each statement's depth in its chain (0 for a root): lookups to its root

    @property
    def prompt(self):
        """The line up to and including the first query's name: what the model must complete."""
        return self.text[: self.answer_positions[0]]


def make_problem(rng, query_hops, n_distractors, max_distractor_hops):
    """One line whose queried chains have exactly the hop counts in query_hops (queried at their
    last variable), plus n_distractors chains that are never queried."""
    chain_hops = list(query_hops) + [rng.randint(0, max_distractor_hops) for _ in range(n_distractors)]
    n_vars = sum(h + 1 for h in chain_hops)
    if n_vars > len(NAMES) or len(chain_hops) > len(DIGITS):
        raise ValueError(f"a line with chains of {chain_hops} hops needs more names or digits than exist")
    names = rng.sample(NAMES, n_vars)
    roots = rng.sample(DIGITS, len(chain_hops))
    chains = []  # chains[c] = [(name, value)] from the root down
    for c, h in enumerate(chain_hops):
        chain_names = [names.pop() for _ in range(h + 1)]
        values = [roots[c]] + chain_names[:-1]
        chains.append(list(zip(chain_names, values)))
    # Interleave: draw the next statement from a random chain; within a chain, order is kept.
    pending = [list(ch) for ch in chains]
    text, value_slots, value_roots, value_depths = "", [], [], []
    while any(pending):
        c = rng.choice([i for i, p in enumerate(pending) if p])
        value_slots.append(len(text) + 1)
        value_roots.append(roots[c])
        value_depths.append(len(chains[c]) - len(pending[c]))
        name, value = pending[c].pop(0)
        text += name + value + ";"
    answer_positions, hops = [], []
    query_order = list(range(len(query_hops)))
    rng.shuffle(query_order)
    for c in query_order:
        text += "?" + chains[c][-1][0]
        answer_positions.append(len(text))
        hops.append(query_hops[c])
        text += roots[c]
    return Problem(text + END, answer_positions, hops, value_slots, value_roots, value_depths)


@dataclass
class CorpusConfig:
    n_queries: int = 3  # queried chains per line, each with its own hop count
    n_distractors: int = 1  # chains never queried
    min_hops: int = 0
    max_hops: int = 3  # hardest training difficulty (answers need up to max_hops + 1 lookups)
    max_distractor_hops: int = 3


def sample_problems(rng, n, cfg):
    """n training-distribution problems: every query's hop count uniform in [min_hops, max_hops]."""
    return [
        make_problem(rng, [rng.randint(cfg.min_hops, cfg.max_hops) for _ in range(cfg.n_queries)],
                     cfg.n_distractors, cfg.max_distractor_hops)
        for _ in range(n)
    ]


def sample_extrapolation_problems(rng, n, cfg, hops_range):
    """n problems with one query whose hop count is drawn from hops_range (beyond training) and
    the other queried chains kept short, so the line has about a training line's length."""
    lo, hi = hops_range
    short = min(cfg.max_hops, cfg.max_distractor_hops)
    return [
        make_problem(rng, [rng.randint(lo, hi)] + [rng.randint(cfg.min_hops, short) for _ in range(cfg.n_queries - 1)],
                     cfg.n_distractors, cfg.max_distractor_hops)
        for _ in range(n)
    ]


def solve(text):
    """Answer every query of a line by following the program (an interpreter, for checks)."""
    program, *queries = text.rstrip(END).split("?")
    env = {}
    for stmt in filter(None, program.split(";")):
        name, value = stmt[0], stmt[1]
        env[name] = value if value in DIGITS else env[value]
    return [env[q[0]] for q in queries]


def encode_batch(problems, tokenizer, block_size, dense_targets=False):
    """Inputs x, targets y, hop counts and lookups, each (B, T) long tensors with T the longest line.
    y is -1 everywhere but at the positions whose next character is an answer digit: the loss is on
    the answers only (the program's own characters are random and carry nothing to learn). hops
    marks the answers with their hop count (-1 elsewhere). lookups marks every target with the
    number of chained lookups that reach it (-1 elsewhere): h + 1 for an answer of h hops.

    dense_targets: also ask, at every statement's value slot, for the root digit of the variable
    that statement defines (a blank-filling target: the input text is unchanged). A line then
    supervises every depth of every chain, and the target at a depth-d statement (d lookups) is
    reached by repeating one step d times: "find the definition of the name at my position and
    copy what that slot holds by now" -- the algorithm the recurrent core is meant to learn once
    and repeat (docs/TRAINING_LOG.md measures when it does)."""
    encoded = [tokenizer.encode(p.text) for p in problems]
    T = max(len(ids) for ids in encoded) - 1  # pad to the longest line, not to block_size: less work
    if T > block_size:
        raise ValueError(f"a line of {T + 1} characters does not fit block_size {block_size}")
    x = torch.full((len(problems), T), tokenizer.stoi[END], dtype=torch.long)
    y = torch.full((len(problems), T), -1, dtype=torch.long)
    hops = torch.full((len(problems), T), -1, dtype=torch.long)
    lookups = torch.full((len(problems), T), -1, dtype=torch.long)
    for b, (p, ids) in enumerate(zip(problems, encoded)):
        x[b, : len(ids) - 1] = torch.tensor(ids[:-1])
        if dense_targets:
            for pos, root, depth in zip(p.value_slots, p.value_roots, p.value_depths):
                y[b, pos] = tokenizer.stoi[root]
                lookups[b, pos] = depth
        for pos, h in zip(p.answer_positions, p.hops):
            y[b, pos - 1] = ids[pos]  # predicting text[pos] from position pos - 1
            hops[b, pos - 1] = h
            lookups[b, pos - 1] = h + 1
    return x, y, hops, lookups
