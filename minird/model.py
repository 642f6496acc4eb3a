"""
A recurrent-depth ("latent reasoning") language model, in one file.

Geiping et al. 2025, "Scaling up Test-Time Compute with Latent Reasoning: A Recurrent Depth
Approach" (arXiv 2502.05171); the official model is `recpre/raven_modeling_minimal.py` in
seal-rg/recurrent-pretraining. Read top to bottom: norm -> attention -> MLP -> sandwich block ->
config -> model. The one new idea compared with nanoGPT is the loop in `RecurrentDepthLM.iterate`:

    ids -> wte*sqrt(h) -> prelude -> e ---------------------------.  (e is re-injected every step)
                                                                    v
    s0 ~ noise -> [ adapter(cat[s, e]) -> core blocks ] x r -> ln_f -> coda -> ln_f -> lm_head

Deliberate differences from Huginn-0125 (3.5B) are sizes (tiny defaults, no prelude or coda
layers: see RecurrentDepthConfig), a character vocabulary, two switches that Huginn's settings can be
restored with (`token_shift=False`, `init="takase"`), and an optional per-step loss in training
(`forward(..., target_lookups=...)`). Each was measured at this tiny size to decide whether the
model learns its lookups, and uses its steps, at all (docs/TRAINING_LOG.md); each is commented
where it happens. docs/ARCHITECTURE.md lists the facts of the official model that minird follows
and where each lives in the code.

Generation (the KV cache, adaptive exit, sampling, speculative decoding) is in minird/generate.py
and minird/kv_cache.py; this file only lets a cache through (attention writes its keys there).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from minird import ops  # the fused C++/CUDA step (csrc/); the code below stays the reference


# -----------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back (as Huginn), then scaled by a weight (init 1)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def precompute_rope(head_dim, max_len, base):
    """cos/sin tables for rotary embeddings, each (max_len, head_dim // 2)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate pairs (x[2i], x[2i+1]) of x (B, nh, T, hs) by the angles in cos/sin (T, hs/2)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, nh, T, hs/2, 2)
    return rotated.flatten(-2).type_as(x)


class CausalSelfAttention(nn.Module):
    """Fused Wqkv (no bias); a learned bias on q and k added before RoPE; causal SDPA."""

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.Wqkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.qk_bias = nn.Parameter(torch.zeros(2, 1, config.n_head, 1, self.head_dim))  # init 0
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, kv_cache=None, cache_key=None, mask=None):
        B, T, C = x.size()
        q, k, v = self.Wqkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        q = apply_rope(q + self.qk_bias[0], cos, sin)
        k = apply_rope(k + self.qk_bias[1], cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(cache_key, k, v)  # (B, nh, T_past + T, hs)
        if mask is None:  # causal; one token (T = 1) attends to every key, cached ones included
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): re-assemble the heads
        return self.proj(y)


class MLP(nn.Module):
    """SwiGLU: one fc to 2*I (gate and up), silu(gate) * up, proj back to h."""

    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=False)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        gate, up = self.fc(x).chunk(2, dim=-1)  # (B, T, I) each
        return self.proj(F.silu(gate) * up)


class SandwichBlock(nn.Module):
    """Four norms: the residual stream is re-normalised after every sub-layer, which is what keeps
    a state that is looped r times from growing without bound."""

    def __init__(self, config):
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.norm_3 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)
        self.norm_4 = RMSNorm(config.n_embd, config.norm_eps)

    def forward(self, x, cos, sin, kv_cache=None, cache_key=None, mask=None):
        x = self.norm_2(x + self.attn(self.norm_1(x), cos, sin, kv_cache, cache_key, mask))
        x = self.norm_4(x + self.mlp(self.norm_3(x)))
        return x


# -----------------------------------------------------------------------------
# the model


@dataclass
class RecurrentDepthConfig:
    vocab_size: int = 16  # character vocabulary of the toy corpus (Huginn: 65536 BPE tokens)
    block_size: int = 128  # longest sequence (RoPE table size)
    n_embd: int = 64  # h (Huginn: 5280)
    n_head: int = 4  # heads of size h / n_head (Huginn: 55 x 96)
    intermediate_size: int = 128  # SwiGLU inner size I (Huginn: 17920)
    # P = 0, R = 1, C = 0: every layer is in the loop. With a prelude or coda that can attend, the
    # tiny model learned its first lookups there (one per layer, feed-forward) and never learned
    # to repeat one in the loop: accuracy was flat in r. With one looped layer, a depth-d answer
    # can only come from d steps (docs/TRAINING_LOG.md, session 2). Huginn: P=2, R=4, C=2.
    n_layers_in_prelude: int = 0  # P
    n_layers_in_recurrent_block: int = 1  # R, the core looped r times
    n_layers_in_coda: int = 0  # C
    mean_recurrence: int = 4  # mean r of training; also r at eval (Huginn: 32)
    mean_backprop_depth: int = 2  # k: steps with gradient (Huginn: 8)
    rope_base: float = 50000.0
    norm_eps: float = 1e-6
    init_scale: float = 1.0  # scale of the random initial state s0; 0 gives s0 = 0
    # "takase" is Huginn's init: std sqrt(2/5h), output projections further scaled down by the
    # unrolled depth. "normal" is nanoGPT's N(0, 0.02) for every weight. At this tiny size the
    # takase init keeps each sub-layer's output so small next to the re-normalised residual
    # stream that lookups were not learned in 5,000 steps; "normal" learns them in hundreds.
    init: str = "normal"
    # Huginn multiplies the embedding by sqrt(h). With no prelude the embedding is the injected
    # input itself: unscaled, W_e e starts 3.5x smaller than the first attention output (RMS 0.003
    # vs 0.011 at init), so the re-normalised state is mostly attention output, not token; scaled,
    # 2x larger. Measured (docs/TRAINING_LOG.md): unscaled, the loop's first lookup stalled at ~50%
    # for 4,000 steps; scaled, it formed and was then repeated. With a prelude (session 1) the
    # scale slowed learning instead, because the prelude's norms already set the size.
    scale_embedding: bool = True
    # Add a learned linear map of the previous token's embedding to each token's embedding (a
    # width-2 causal convolution, as RWKV's token shift). A lookup "find the value of name x"
    # then needs one attention layer instead of two composed ones (the induction-head plateau).
    # Not in Huginn, whose prelude has the depth to learn it; measured on a one-hop task: no
    # lookup in 5,000 steps without it, 93-99% after 200-600 steps with it (docs/TRAINING_LOG.md).
    token_shift: bool = True

    @property
    def effective_layers(self):
        """L_eff = P + C + R * mean_r: the depth the takase init scales output projections by."""
        return (self.n_layers_in_prelude + self.n_layers_in_coda
                + self.n_layers_in_recurrent_block * self.mean_recurrence)


class RecurrentDepthLM(nn.Module):

    def __init__(self, config):
        super().__init__()
        if config.init not in ("takase", "normal"):
            raise ValueError(f"init must be 'takase' or 'normal', got {config.init!r}")
        self.config = config
        h = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, h)
        self.token_shift = nn.Linear(h, h, bias=False) if config.token_shift else None
        self.prelude = nn.ModuleList(SandwichBlock(config) for _ in range(config.n_layers_in_prelude))
        # input injection: s = W [s; e], state first. No norm: s and e both come out of a norm.
        self.adapter = nn.Linear(2 * h, h, bias=False)
        self.core = nn.ModuleList(SandwichBlock(config) for _ in range(config.n_layers_in_recurrent_block))
        self.coda = nn.ModuleList(SandwichBlock(config) for _ in range(config.n_layers_in_coda))
        self.ln_f = RMSNorm(h, config.norm_eps)
        self.lm_head = nn.Linear(h, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied embeddings
        cos, sin = precompute_rope(h // config.n_head, config.block_size, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Run the steps on the fused minird.ops kernels where they are built (the same function;
        # tests/test_ops.py checks it). A runtime switch, not architecture: set it False to run
        # the reference code below, or set MINIRD_KERNELS=0 before import.
        self.use_kernels = True
        self.apply(self._init_weights)
        if config.init == "takase":
            # Spike-No-More: the output projections that write into the residual stream start
            # small, scaled by the unrolled depth, so a deep unrolled loop starts near identity.
            for name, p in self.named_parameters():
                if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                    std = self.init_std / math.sqrt(2 * config.effective_layers)
                    nn.init.trunc_normal_(p, std=std, a=-3 * std, b=3 * std)

    @property
    def init_std(self):
        if self.config.init == "takase":
            return math.sqrt(2 / (5 * self.config.n_embd))
        return 0.02

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = self.init_std
            nn.init.trunc_normal_(module.weight, std=std, a=-3 * std, b=3 * std)

    def num_params(self):
        """Unique parameters (the tied lm_head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def effective_depth(self, num_steps):
        """Layers of compute at r steps: P + R*r + C (the same weights, unrolled)."""
        c = self.config
        return c.n_layers_in_prelude + c.n_layers_in_recurrent_block * num_steps + c.n_layers_in_coda

    # --- the recurrence -------------------------------------------------------------------

    def initialize_state(self, e, init_scale=None):
        """s0 (B, T, h): truncated normal (+-3 sigma) with sigma = sqrt(2/5) * init_scale, fresh
        noise every call ("like-init": Huginn's sqrt(2/(5h)) * sqrt(h)); init_scale=0 gives zeros."""
        scale = self.config.init_scale if init_scale is None else init_scale
        if scale == 0:
            return torch.zeros_like(e)
        std = math.sqrt(2 / 5) * scale
        return nn.init.trunc_normal_(torch.empty_like(e), std=std, a=-3 * std, b=3 * std)

    def sample_num_steps(self, generator=None):
        """Training step counts (n, k): n steps without gradient, then k with (truncated backprop).
        rate ~ LogNormal(ln(mean_r) - sigma^2/2, sigma) has mean mean_r; p = Poisson(rate) + 1
        so E[n + k] = mean_r + 1 (as in the official code); k = min(p, mean_backprop_depth)."""
        mean_r, k = self.config.mean_recurrence, self.config.mean_backprop_depth
        sigma = 0.5
        mu = math.log(mean_r) - sigma ** 2 / 2
        rate = torch.exp(mu + sigma * torch.randn((), generator=generator))
        p = int(torch.poisson(rate, generator=generator).item()) + 1
        return max(p - k, 0), min(p, k)

    def core_step(self, s, e, cos, sin, step, kv_cache=None, mask=None):
        """One recurrent step: inject e through the adapter, then the R core blocks. s, e: (B, T, h)."""
        s = self.adapter(torch.cat([s, e], dim=-1))  # (B, T, 2h) -> (B, T, h)
        for j, block in enumerate(self.core):
            s = block(s, cos, sin, kv_cache, ("core", step, j), mask)
        return s

    def iterate(self, e, num_steps, cos, sin, kv_cache=None, mask=None, init_scale=None, keep_states=False, s0=None,
                first_step=0):
        """Run the core num_steps = (n, k) times from s0 (default: a fresh one): n steps without
        gradient (truncated backprop), then k with gradient. e gets gradient at every grad step.
        first_step: the index of the first of them (which KV-cache entries they use; adaptive exit
        runs one step at a time). Returns the final state, or with keep_states the list of states
        after each grad step."""
        s = self.initialize_state(e, init_scale) if s0 is None else s0
        if self.use_kernels and ops.kernels_available(e.device.type):  # the same steps, fused
            c = self.config
            return ops.iterate(s, e, num_steps, self.adapter.weight, ops.block_weights(self.core), c.n_head,
                               c.norm_eps, cos, sin, kv_cache, mask, keep_states, first_step)
        n_no_grad, n_grad = num_steps
        with torch.no_grad():
            for step in range(first_step, first_step + n_no_grad):
                s = self.core_step(s, e, cos, sin, step, kv_cache, mask)
        states = []
        for step in range(first_step + n_no_grad, first_step + n_no_grad + n_grad):
            s = self.core_step(s, e, cos, sin, step, kv_cache, mask)
            states.append(s)
        return states if keep_states else s

    # --- the three stages -----------------------------------------------------------------

    def resolve_num_steps(self, num_steps):
        """num_steps: None (training: sampled; eval: mean_r, no grad), an int r, or a pair (n, k)."""
        if num_steps is None:
            if self.training:
                return self.sample_num_steps()
            return (self.config.mean_recurrence, 0)
        if isinstance(num_steps, int):
            if num_steps < 1:
                raise ValueError(f"num_steps must be >= 1, got {num_steps}")
            return (0, num_steps) if torch.is_grad_enabled() else (num_steps, 0)
        n, k = num_steps
        if n < 0 or k < 0 or n + k < 1:
            raise ValueError(f"num_steps (n, k) must be non-negative with n + k >= 1, got {num_steps}")
        return int(n), int(k)

    def embed(self, idx, cos, sin, kv_cache=None, mask=None, attention_mask=None):
        """Token ids (B, T) -> e (B, T, h): embedding (+ token shift), then the prelude.
        attention_mask (B, T): 0 at left padding, whose embedding is zeros."""
        x = self.embed_tokens(idx, kv_cache, attention_mask)
        return self.outer_blocks(self.prelude, "prelude", x, cos, sin, kv_cache, mask)

    def embed_tokens(self, idx, kv_cache=None, attention_mask=None):
        """Token ids (B, T) -> the prelude's input (B, T, h): wte (times sqrt(h)), plus the token shift."""
        x = self.wte(idx)  # (B, T, h)
        if self.config.scale_embedding:
            x = x * math.sqrt(self.config.n_embd)
        if attention_mask is not None:  # so a row's first token gets zeros shifted in, as at the start
            x = x * attention_mask[..., None].to(x.dtype)
        if self.token_shift is not None:
            # the token before the first one is the last cached token, or nothing (zeros)
            first = kv_cache.shift_in(x) if kv_cache is not None else torch.zeros_like(x[:, :1])
            x = x + self.token_shift(torch.cat([first, x[:, :-1]], dim=1))  # (B, T, h)
        return x

    def readout(self, s, cos, sin, kv_cache=None, mask=None):
        """Final state s (B, T, h) -> logits (B, T, vocab), fp32: ln_f, coda, ln_f, tied head."""
        x = self.outer_blocks(self.coda, "coda", self.final_norm(s, kv_cache), cos, sin, kv_cache, mask)
        return self.lm_head(self.final_norm(x, kv_cache)).float()

    def final_norm(self, x, kv_cache=None):
        """ln_f. While decoding on the kernels it is the fused norm: one launch, where
        RMSNorm.forward is six ops in fp32 (eight in bf16)."""
        if self.decodes_on_kernels(x, kv_cache):
            return ops.add_rmsnorm(x, None, self.ln_f.weight, None, self.config.norm_eps)[0]
        return self.ln_f(x)

    def decodes_on_kernels(self, x, kv_cache):
        """Decoding (a KV cache) with the kernels on for x's device: then the prelude, coda and
        ln_f run on the fused ops. Training and evaluation run them on the reference code, so that
        the recorded training runs reproduce bit for bit."""
        return kv_cache is not None and self.use_kernels and ops.kernels_available(x.device.type)

    def outer_blocks(self, blocks, stage, x, cos, sin, kv_cache=None, mask=None):
        """x through the prelude's or the coda's blocks (stage names their cache entries). While
        decoding on the kernels (decodes_on_kernels) they run on the fused ops, one new token of
        one row on CUDA in one decode_steps launch; otherwise on the code below."""
        if len(blocks) and self.decodes_on_kernels(x, kv_cache):
            keys = [(stage, j) for j in range(len(blocks))]
            return ops.sandwich_blocks(x, ops.block_weights(blocks), self.config.n_head, self.config.norm_eps, cos,
                                       sin, kv_cache, keys, mask)
        for j, block in enumerate(blocks):
            x = block(x, cos, sin, kv_cache, (stage, j), mask)
        return x

    def forward(self, idx, targets=None, num_steps=None, init_scale=None, target_lookups=None, attention_mask=None,
                prelude_hidden=None):
        """idx (B, T) -> (logits (B, T, vocab), loss or None). targets (B, T) with -1 = ignored.
        target_lookups (B, T): how many lookups each target needs; given with targets, the loss is
        the per-step loss below. attention_mask (B, T): 1 = token, 0 = left padding, which no token
        attends to. prelude_hidden (B, T): True = a token that the prelude's attention skips (each
        token still sees itself); not in Huginn: a training curriculum (minird/train.py's
        separator_mask_iters). (Tokens after a KV cache: minird.generate.feed.)"""
        cos, sin, mask = self.positions(idx, attention_mask=attention_mask)
        prelude_mask = mask
        if prelude_hidden is not None:  # to the prelude's attention a hidden token is as padding is
            kept = ~prelude_hidden if attention_mask is None else attention_mask.bool() & ~prelude_hidden
            prelude_mask = self.causal_mask(idx.size(1), 0, kept, idx.device)  # (B, 1, T, T)
        e = self.embed(idx, cos, sin, mask=prelude_mask, attention_mask=attention_mask)
        n, k = self.resolve_num_steps(num_steps)
        if targets is not None and target_lookups is not None and k > 0:
            return self.per_step_loss(e, (n, k), cos, sin, targets, target_lookups, init_scale, mask)
        s = self.iterate(e, (n, k), cos, sin, mask=mask, init_scale=init_scale)
        logits = self.readout(s, cos, sin, mask=mask)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def positions(self, idx, kv_cache=None, attention_mask=None):
        """RoPE tables and attention mask for idx (B, T), the tokens after those in kv_cache.
        attention_mask (B, T): 1 = token, 0 = left padding (None: no padding); the cache keeps it
        for the tokens that follow. Mask: None (causal; one new token attends to every key), (T, T_k)
        or, with padding, (B, 1, T, T_k)."""
        T = idx.size(1)
        start = kv_cache.seq_len if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        if kv_cache is not None:
            kv_cache.check_room(T)
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        keys = kv_cache.add_tokens(attention_mask, T) if kv_cache is not None else attention_mask  # (B, start + T)
        return cos, sin, self.causal_mask(T, start, keys, idx.device)

    @staticmethod
    def causal_mask(T, start, keys, device):
        """The mask of T new tokens after `start` cached ones (positions' mask); keys (B, start + T):
        1 = token, 0 = padding, or None."""
        if keys is None and (start == 0 or T == 1):
            # SDPA's is_causal; one token attends to every key (an all-True mask would cost SDPA a
            # conversion per call)
            return None
        # New tokens attend to all cached tokens and causally among themselves.
        mask = torch.ones(T, start + T, dtype=torch.bool, device=device).tril(diagonal=start)
        if keys is not None:
            # Padding: no token attends to it. Rows share positions, which changes no score: RoPE
            # is relative. A padding query attends to itself only: a row of False would make SDPA
            # return NaN, and NaN values poison the output even under a zero weight.
            pos = torch.arange(start + T, device=device)
            itself = pos[start:, None] == pos  # (T, start + T)
            mask = mask & (keys.bool()[:, None, None, :] | itself)  # (B, 1, T, start + T)
        return mask

    def per_step_loss(self, e, num_steps, cos, sin, targets, target_lookups, init_scale, mask=None):
        """Not in Huginn, which supervises only the last step. Decode the state after every step
        with gradient; at step t ask only for the targets that t lookups reach (target_lookups <= t),
        and average over those steps. Each step is then told what one more step should resolve, so
        the core learns one lookup that it repeats, not a different shortcut per depth; and a target
        is never asked for at a depth where it cannot be known (which teaches guessing). Measured in
        docs/TRAINING_LOG.md: with the last-step loss alone the same model did not learn to iterate."""
        n, k = num_steps
        states = self.iterate(e, num_steps, cos, sin, mask=mask, init_scale=init_scale, keep_states=True)
        losses = []
        for t, s in enumerate(states, start=n + 1):
            logits = self.readout(s, cos, sin, mask=mask)
            reachable = torch.where(target_lookups <= t, targets, -1)
            if (reachable >= 0).any():
                losses.append(F.cross_entropy(logits.view(-1, logits.size(-1)), reachable.reshape(-1), ignore_index=-1))
        if not losses:  # nothing reachable in this few steps: fall back to the last step on every target
            losses.append(F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1))
        return logits, torch.stack(losses).mean()

    @torch.no_grad()
    def trajectory(self, idx, num_steps):
        """The latent states s_0 ... s_r of every position of idx (B, T), stacked (r + 1, B, T, h):
        what the model thinks between tokens (users of the official code asked for them)."""
        cos, sin, _ = self.positions(idx)
        e = self.embed(idx, cos, sin)
        s0 = self.initialize_state(e)
        return torch.stack([s0] + self.iterate(e, (0, num_steps), cos, sin, keep_states=True, s0=s0))

    @torch.no_grad()
    def trace(self, idx, num_steps):
        """Watch the model think: the logits (B, T, vocab) read out from the state after every
        step 1 ... num_steps, as a list. The last equals forward(idx, num_steps=num_steps) from
        the same s0."""
        cos, sin, _ = self.positions(idx)
        return [self.readout(s, cos, sin) for s in self.trajectory(idx, num_steps)[1:]]
