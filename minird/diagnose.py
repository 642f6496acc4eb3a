"""
What the first lookup looks like from inside, for train.py's --diag_interval (docs/TRAINING_LOG.md,
section 17): the attention of the first core block at step 1 from the positions that need one
lookup (0-hop queries, depth-1 statements) to the slot that holds their answer, and the gradient
norms of the weights that make the lookup. A healthy run first spreads its attention over the
line's root digits (p_right ~0.3: the guess), then the name match takes over (p_right -> 1); a
run in the plateau's trap puts it on the ';' after each digit (p_right ~0, on_separator ~1).
A model with a prelude (--preset=huginn) can make its first lookup there, before the loop: the
same numbers for prelude block 0 (prelude_p_right, ...): healthy runs make the lookup there, and
stuck ones park that attention on the separators (training log, section 23).
"""

import math
import random
from dataclasses import asdict

import torch
from torch.nn import functional as F

from minird.data import CharTokenizer, CorpusConfig, encode_batch, sample_problems
from minird.model import apply_rope


def lookup_pairs(problem):
    """[(query position, key position)] of the targets one lookup reaches: a 0-hop query (the
    queried name -> the value slot of its definition) and a depth-1 statement (its value slot, a
    name -> the value slot of that name's definition, a root digit)."""
    text, defined_at = problem.text, {}
    for i, c in enumerate(text):
        defined_at.setdefault(c, i)
    pairs = [(pos - 1, defined_at[text[pos - 1]] + 1)
             for pos, h in zip(problem.answer_positions, problem.hops) if h == 0]
    pairs += [(slot, defined_at[text[slot]] + 1)
              for slot, d in zip(problem.value_slots, problem.value_depths) if d == 1]
    return pairs


class LookupProbe:
    """64 fixed lines of the curriculum's first level, and the one-lookup accuracy of the training
    batches since the last measurement."""

    def __init__(self, corpus, seed, block_size, n_lines=64):
        self.lines = sample_problems(random.Random(seed), n_lines, CorpusConfig(**{**asdict(corpus), "max_hops": 1}))
        self.x = encode_batch(self.lines, CharTokenizer(), block_size)[0]
        self.one_lookup = torch.zeros(2)  # [correct, total]

    @torch.no_grad()
    def add_batch(self, logits, y, lookups):
        one = lookups == 1
        self.one_lookup += torch.tensor([(logits.argmax(-1)[one] == y[one]).sum().item(), one.sum().item()])

    def measure(self, model, iteration):
        """{iter, acc_1_lookup, p_right, on_separator, entropy, entropy_uniform, (with a prelude:
        prelude_p_right, prelude_on_separator, prelude_entropy,) g_q, g_k, g_v, g_shift, g_total}."""
        correct, total = self.one_lookup.tolist()
        self.one_lookup.zero_()
        return {"iter": iteration, "acc_1_lookup": round(correct / max(total, 1), 4),
                **{k: round(v, 4) for k, v in {**self.attention(model), **gradient_norms(model)}.items()}}

    @torch.no_grad()
    def attention(self, model):
        """Core block 0's attention at step 1 from s0 = 0 (as trained) and, with a prelude, prelude
        block 0's on the token embeddings: averaged over heads at the one-lookup positions, the
        mean probability on the right key, on the ';' separators, the mean entropy (nats) and the
        entropy of a uniform attention over the visible keys."""
        x = self.x.to(model.wte.weight.device)
        cos, sin, _ = model.positions(x)
        tokens = model.embed_tokens(x)  # the prelude's input; model.embed is this, then the prelude
        e = model.outer_blocks(model.prelude, "prelude", tokens, cos, sin)
        s = model.adapter(torch.cat([torch.zeros_like(e), e], dim=-1))
        stats = self.lookup_attention(model.core[0], s, cos, sin)
        if len(model.prelude):
            prelude = self.lookup_attention(model.prelude[0], tokens, cos, sin)
            stats.update({f"prelude_{k}": v for k, v in prelude.items() if k != "entropy_uniform"})
        return stats

    def lookup_attention(self, block, x, cos, sin):
        """The statistics of attention() for one block whose input is x (B, T, h)."""
        attn, xn = block.attn, block.norm_1(x)
        B, T, C = xn.shape
        q, k, _ = attn.Wqkv(xn).split(C, dim=2)
        q = apply_rope(q.view(B, T, attn.n_head, attn.head_dim).transpose(1, 2) + attn.qk_bias[0], cos, sin)
        k = apply_rope(k.view(B, T, attn.n_head, attn.head_dim).transpose(1, 2) + attn.qk_bias[1], cos, sin)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(attn.head_dim)  # (B, nh, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        p = F.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1).mean(1)  # (B, T, T)
        right, separator, entropy, uniform = [], [], [], []
        for b, line in enumerate(self.lines):
            is_separator = torch.tensor([c == ";" for c in line.text], device=p.device)
            for query, key in lookup_pairs(line):
                row = p[b, query, :query + 1]
                right.append(row[key].item())
                separator.append(row[is_separator[:query + 1]].sum().item())
                entropy.append(-(row * row.clamp_min(1e-12).log()).sum().item())
                uniform.append(math.log(query + 1))
        n = max(len(right), 1)
        return {"p_right": sum(right) / n, "on_separator": sum(separator) / n, "entropy": sum(entropy) / n,
                "entropy_uniform": sum(uniform) / n}


def gradient_norms(model):
    """Norms of the gradients of the q, k and v rows of core block 0's Wqkv, the token shift, and all."""
    norms, g = {}, model.core[0].attn.Wqkv.weight.grad
    if g is not None:
        C = g.size(1)
        norms.update(g_q=g[:C].norm().item(), g_k=g[C:2 * C].norm().item(), g_v=g[2 * C:].norm().item())
    if model.token_shift is not None and model.token_shift.weight.grad is not None:
        norms["g_shift"] = model.token_shift.weight.grad.norm().item()
    squares = [p.grad.norm() ** 2 for p in model.parameters() if p.grad is not None]
    norms["g_total"] = math.sqrt(sum(squares).item()) if squares else 0.0
    return norms
