"""
A recurrent-depth ("latent reasoning") language model, in one file.

Geiping et al. 2025, "Scaling up Test-Time Compute with Latent Reasoning: A Recurrent Depth
Approach" (arXiv 2502.05171); the official model is `recpre/raven_modeling_minimal.py` in
seal-rg/recurrent-pretraining. Read top to bottom: norm -> attention -> MLP -> sandwich block ->
KV cache -> adaptive exit -> generation helpers -> config -> model. The one new idea compared with
nanoGPT is the loop in `RecurrentDepthLM.iterate`:

    ids -> wte*sqrt(h) -> prelude -> e ---------------------------.  (e is re-injected every step)
                                                                    v
    s0 ~ noise -> [ adapter(cat[s, e]) -> core blocks ] x r -> ln_f -> coda -> ln_f -> lm_head

Deliberate differences from Huginn-0125 (3.5B) are sizes (tiny defaults, no prelude or coda
layers: see RecurrentDepthConfig), a character vocabulary, two switches that Huginn's settings can be
restored with (`token_shift=False`, `init="takase"`), and an optional per-step loss in training
(`forward(..., target_lookups=...)`). Each was measured at this tiny size to decide whether the
model learns its lookups, and uses its steps, at all (docs/TRAINING_LOG.md); each is commented
where it happens.
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
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
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
# KV cache: one entry per (stage, step, layer)


def parse_lookup_strategy(strategy):
    """cache_lookup_strategy -> the number of shared core slots N, or None for "full"."""
    if strategy == "full":
        return None
    if strategy.startswith("compress-s") and strategy[len("compress-s"):].isdigit():
        n = int(strategy[len("compress-s"):])
        if n >= 1:
            return n
    raise ValueError(f"cache_lookup_strategy must be 'full' or 'compress-sN' with N >= 1, got {strategy!r}")


class KVCache:
    """Keys and values of past tokens, one entry per key: ("prelude", j), ("coda", j) and, for the
    recurrent core, ("core", step, j) -- every (step, core layer) pair sees different states, so
    the full cache grows with r. A token at step i reads the step-i keys of earlier tokens.

    Each entry is a pair of buffers (B, nh, max_len, hs), allocated on first use and written in
    place at positions seq_len, seq_len + 1, ...: appending copies nothing (the fused kernels
    write there directly), and rolling back (speculative decoding) is setting seq_len back: what
    is stored past it -- keys, values, token embeddings, padding -- is rewritten by the next tokens.

    lookup_strategy (the official `cache_lookup_strategy`): "full" keeps one entry per (step, core
    layer); "compress-sN" shares N slots among them, step i / core layer j writing slot
    (i * R + j) mod N. With N = R a token at step i reads, from each earlier token, the keys of
    the last step that token ran (the paper's KV-cache sharing: memory no longer grows with r)."""

    def __init__(self, max_len, lookup_strategy="full", n_core_layers=1):
        self.max_len = max_len
        self.num_slots = parse_lookup_strategy(lookup_strategy)
        self.n_core_layers = n_core_layers
        self.entries = {}
        self.seq_len = 0  # tokens stored so far; sets the RoPE position of the next token
        self.embeddings = None  # (B, max_len, h) token embeddings, for token_shift
        self.tokens = None  # (B, max_len) bool, False at left padding; None while there is none

    def slot(self, key):
        """The entry that key is stored in: itself, or its shared core slot under compress-sN."""
        if self.num_slots is None or key[0] != "core":
            return key
        _, step, j = key
        return ("core", (step * self.n_core_layers + j) % self.num_slots)

    def buffers(self, key, batch, n_head, head_dim, dtype, device):
        """The (k, v) buffers (B, nh, max_len, hs) of key's entry, allocated (zeros) on first use."""
        key = self.slot(key)
        if key not in self.entries:
            shape = (batch, n_head, self.max_len, head_dim)
            self.entries[key] = (torch.zeros(shape, dtype=dtype, device=device),
                                 torch.zeros(shape, dtype=dtype, device=device))
        return self.entries[key]

    def update(self, key, k, v):
        """Write k, v (B, nh, T, hs) at positions seq_len .. seq_len + T - 1 of key's entry; return
        its keys and values of positions 0 .. seq_len + T - 1."""
        B, nh, T, hs = k.shape
        k_buf, v_buf = self.buffers(key, B, nh, hs, k.dtype, k.device)
        end = self.seq_len + T
        k_buf[:, :, self.seq_len:end] = k
        v_buf[:, :, self.seq_len:end] = v
        return k_buf[:, :, :end], v_buf[:, :, :end]

    def core_entries(self, step, n_new, rows):
        """Copies of the core keys and values that the n_new tokens being added wrote at step, in
        rows ((B,) bool): one (k, v) per core layer, each (rows, nh, n_new, hs)."""
        new = slice(self.seq_len, self.seq_len + n_new)
        return [tuple(t[rows, :, new].clone() for t in self.entries[self.slot(("core", step, j))])
                for j in range(self.n_core_layers)]

    def repeat_step(self, entries, last_step, num_steps, n_new, rows):
        """The n_new tokens being added, in rows ((B,) bool), all stopped after last_step (adaptive
        exit): the core entries of the steps they did not run get entries, their last_step keys
        and values from core_entries ("latest entry"), for later tokens to read at those steps.
        last_step's own slot is written too: under compress-sN a later step may share it."""
        new = slice(self.seq_len, self.seq_len + n_new)
        for j, (k, v) in enumerate(entries):
            B, nh, _, hs = self.entries[self.slot(("core", last_step, j))][0].shape
            for step in range(last_step, num_steps):
                k_buf, v_buf = self.buffers(("core", step, j), B, nh, hs, k.dtype, k.device)
                k_buf[rows, :, new] = k
                v_buf[rows, :, new] = v

    def add_tokens(self, attention_mask, n_new):
        """Record which of the n_new tokens being added are tokens and which left padding
        (attention_mask (B, n_new): 1 = token, 0 = padding; None: all tokens). Returns which keys
        exist, (B, seq_len + n_new) bool, or None while no position is padding."""
        if attention_mask is None and self.tokens is None:
            return None
        if self.tokens is None:
            self.tokens = torch.ones(attention_mask.size(0), self.max_len, dtype=torch.bool,
                                     device=attention_mask.device)
        end = self.seq_len + n_new
        self.tokens[:, self.seq_len:end] = True if attention_mask is None else attention_mask.bool()
        return self.tokens[:, :end]

    def shift_in(self, x):
        """Store token embeddings x (B, T, h) at seq_len ..; return the embedding of the token
        before x's first (B, 1, h), zeros at the start: what token_shift mixes in."""
        B, T, h = x.shape
        if self.embeddings is None:
            self.embeddings = x.new_zeros(B, self.max_len, h)
        self.embeddings[:, self.seq_len:self.seq_len + T] = x
        if self.seq_len == 0:
            return torch.zeros_like(x[:, :1])
        return self.embeddings[:, self.seq_len - 1:self.seq_len]

    def nbytes(self):
        """Bytes of the keys and values held for the seq_len tokens stored (the buffers are
        allocated up to max_len)."""
        return sum(k[:, :, :self.seq_len].nbytes + v[:, :, :self.seq_len].nbytes for k, v in self.entries.values())


# -----------------------------------------------------------------------------
# adaptive exit: when a token's steps have converged (the official code's `criterion` names)

# exit_threshold="auto" picks these (the official defaults). kl: KL(p_{t-1} || p_t) of the decoded
# distributions (p_0 uniform); latent-diff: |s_t - s_{t-1}| / |s_t|; entropy-diff: |H(p_t) -
# H(p_{t-1})|; argmax-stability: steps in a row with the same top token; cosine: 1 - cos(s_t, s_{t-1}).
EXIT_THRESHOLDS = {"kl": 1e-3, "latent-diff": 0.03, "entropy-diff": 1e-3, "argmax-stability": 5, "cosine": 1e-3}


class ExitCriterion:
    """Tracks, per token, the quantity its criterion compares with the threshold, step by step."""

    def __init__(self, criterion, threshold, shape, vocab_size, device):
        if criterion not in EXIT_THRESHOLDS:
            raise ValueError(f"criterion must be one of none, {', '.join(EXIT_THRESHOLDS)}; got {criterion!r}")
        self.criterion = criterion
        self.threshold = EXIT_THRESHOLDS[criterion] if threshold == "auto" else float(threshold)
        self.needs_logits = criterion in ("kl", "entropy-diff", "argmax-stability")
        self.log_p = torch.full((*shape, vocab_size), -math.log(vocab_size), device=device)  # p_0 uniform
        self.top = torch.full(shape, -1, dtype=torch.long, device=device)  # no top token before step 1
        self.same_top = torch.zeros(shape, dtype=torch.long, device=device)

    def converged(self, s_prev, s, logits=None):
        """(B, T) bool: has each token converged at this step?"""
        if self.criterion == "latent-diff":
            return (s - s_prev).norm(dim=-1) / s.norm(dim=-1).clamp_min(1e-12) < self.threshold
        if self.criterion == "cosine":
            return 1 - F.cosine_similarity(s, s_prev, dim=-1) < self.threshold
        log_p, log_p_prev = logits.float().log_softmax(-1), self.log_p
        self.log_p = log_p
        if self.criterion == "kl":
            return (log_p_prev.exp() * (log_p_prev - log_p)).sum(-1) < self.threshold
        if self.criterion == "entropy-diff":
            entropy = lambda lp: -(lp.exp() * lp).sum(-1)
            return (entropy(log_p) - entropy(log_p_prev)).abs() < self.threshold
        top = log_p.argmax(-1)
        self.same_top = torch.where(top == self.top, self.same_top + 1, 0)
        self.top = top
        return self.same_top >= self.threshold


# -----------------------------------------------------------------------------
# generation: prompts of different lengths, and what self-speculative decoding did


def left_pad(prompts, pad_id=0):
    """Token id lists of different lengths -> idx (B, T) padded on the left with pad_id, and the
    attention_mask (B, T) (1 = token, 0 = padding) that generate takes with it."""
    T = max(len(p) for p in prompts)
    idx = torch.tensor([[pad_id] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    return idx, attention_mask


@dataclass
class DraftStats:
    """What generate did (return_stats=True); with draft_steps, how many drafted tokens were kept."""
    forwards: int = 0  # model forwards: the prompt, then each drafted token and each verify (or each token)
    rounds: int = 0  # verifies of drafted tokens
    drafted: int = 0  # drafted tokens verified (a batch drafts as many in every row)
    accepted: int = 0  # drafted tokens kept: the verifier at num_steps agreed (in every row of a batch)

    @property
    def acceptance_rate(self):
        return self.accepted / self.drafted if self.drafted else 0.0


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
    use_kernels: bool = True  # run iterate on minird.ops when built (MINIRD_KERNELS=0 also turns off)

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
        """Training step counts (n, k): n steps without gradient, then k with (SPEC section 2).
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

    def iterate(self, e, num_steps, cos, sin, kv_cache=None, mask=None, init_scale=None, keep_states=False, s0=None):
        """Run the core num_steps = (n, k) times from s0 (default: a fresh one): n steps without
        gradient (truncated backprop), then k with gradient. e gets gradient at every grad step.
        Returns the final state, or with keep_states the list of states after each grad step."""
        if self.config.use_kernels and ops.kernels_available(e.device.type):  # same math, fused
            return ops.iterate(self, e, num_steps, cos, sin, kv_cache, mask, init_scale, keep_states, s0)
        n_no_grad, n_grad = num_steps
        s = self.initialize_state(e, init_scale) if s0 is None else s0
        with torch.no_grad():
            for step in range(n_no_grad):
                s = self.core_step(s, e, cos, sin, step, kv_cache, mask)
        states = []
        for step in range(n_no_grad, n_no_grad + n_grad):
            s = self.core_step(s, e, cos, sin, step, kv_cache, mask)
            states.append(s)
        return states if keep_states else s

    @torch.no_grad()
    def iterate_adaptive(self, e, num_steps, cos, sin, exit_rule, min_steps=1, kv_cache=None, mask=None, s0=None,
                         tokens=None):
        """Up to num_steps steps, with per-token adaptive exit (SPEC section 3): a token whose
        exit_rule (an ExitCriterion) is met at step >= min_steps keeps its state from then
        on. Frozen tokens still serve keys and values (from their frozen state) to the others of
        this forward. Once all of a row's tokens have stopped, the cache entries of the steps it
        did not run repeat each token's last ones ("latest entry"), for later tokens to read --
        whether or not other rows go on, so a row gets what it would get alone. The loop ends when
        every token has stopped. tokens (B, T) bool: False at left padding, which never runs.
        Returns the final state (B, T, h) and the steps each token used (B, T), 0 for padding."""
        B, T, _ = e.shape
        s = self.initialize_state(e) if s0 is None else s0
        used = torch.full((B, T), num_steps, dtype=torch.long, device=e.device)
        stopped = torch.zeros(B, T, dtype=torch.bool, device=e.device)
        if tokens is not None:
            used[~tokens], stopped = 0, ~tokens
        rows_done = torch.zeros(B, dtype=torch.bool, device=e.device)
        repeats = []  # (step, rows, their core entries at that step) for the rows that stopped early
        for step in range(num_steps):
            s_next = torch.where(stopped[..., None], s, self.core_step(s, e, cos, sin, step, kv_cache, mask))
            logits = None
            if exit_rule.needs_logits:  # the coda's cache entries it writes are rewritten by the last decode
                logits = self.decode(s_next, cos, sin, kv_cache, mask)
            newly = exit_rule.converged(s, s_next, logits) & ~stopped & (step + 1 >= min_steps)
            used[newly] = step + 1
            stopped |= newly
            s = s_next
            rows = stopped.all(dim=1) & ~rows_done
            if kv_cache is not None and rows.any() and step + 1 < num_steps:
                # copied now: the steps that go on for other rows overwrite these rows' entries
                repeats.append((step, rows, kv_cache.core_entries(step, T, rows)))
            rows_done |= rows
            if rows_done.all():
                break
        for step, rows, entries in repeats:
            kv_cache.repeat_step(entries, step, num_steps, T, rows)
        return s, used

    # --- the three stages -----------------------------------------------------------------

    def _resolve_num_steps(self, num_steps):
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
        x = self.wte(idx)  # (B, T, h)
        if self.config.scale_embedding:
            x = x * math.sqrt(self.config.n_embd)
        if attention_mask is not None:  # so a row's first token gets zeros shifted in, as at the start
            x = x * attention_mask[..., None].to(x.dtype)
        if self.token_shift is not None:
            # the token before the first one is the last cached token, or nothing (zeros)
            first = kv_cache.shift_in(x) if kv_cache is not None else torch.zeros_like(x[:, :1])
            x = x + self.token_shift(torch.cat([first, x[:, :-1]], dim=1))  # (B, T, h)
        for j, block in enumerate(self.prelude):
            x = block(x, cos, sin, kv_cache, ("prelude", j), mask)
        return x

    def decode(self, s, cos, sin, kv_cache=None, mask=None):
        """Final state s (B, T, h) -> logits (B, T, vocab), fp32: ln_f, coda, ln_f, tied head."""
        x = self.ln_f(s)
        for j, block in enumerate(self.coda):
            x = block(x, cos, sin, kv_cache, ("coda", j), mask)
        return self.lm_head(self.ln_f(x)).float()

    def forward(self, idx, targets=None, num_steps=None, kv_cache=None, init_scale=None, target_lookups=None,
                attention_mask=None):
        """idx (B, T) -> (logits (B, T, vocab), loss or None). targets (B, T) with -1 = ignored.
        With a kv_cache, idx holds the tokens that follow the cached ones. target_lookups (B, T):
        how many lookups each target needs; given with targets, the loss is the per-step loss below.
        attention_mask (B, T): 1 = token, 0 = left padding, which no token attends to."""
        T = idx.size(1)
        cos, sin, mask = self._positions(idx, kv_cache, attention_mask)
        e = self.embed(idx, cos, sin, kv_cache, mask, attention_mask)
        n, k = self._resolve_num_steps(num_steps)
        if targets is not None and target_lookups is not None and k > 0 and kv_cache is None:
            return self._per_step_loss(e, (n, k), cos, sin, targets, target_lookups, init_scale, mask)
        s = self.iterate(e, (n, k), cos, sin, kv_cache, mask, init_scale)
        logits = self.decode(s, cos, sin, kv_cache, mask)
        if kv_cache is not None:
            kv_cache.seq_len += T
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _positions(self, idx, kv_cache=None, attention_mask=None):
        """RoPE tables and attention mask for idx (B, T), the tokens after those in kv_cache.
        attention_mask (B, T): 1 = token, 0 = left padding (None: no padding); the cache keeps it
        for the tokens that follow. Mask: None (causal), (T, T_k) or, with padding, (B, 1, T, T_k)."""
        T = idx.size(1)
        start = kv_cache.seq_len if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        # New tokens attend to all cached tokens and causally among themselves.
        causal = torch.ones(T, start + T, dtype=torch.bool, device=idx.device).tril(diagonal=start)
        mask = causal if start > 0 else None
        keys = kv_cache.add_tokens(attention_mask, T) if kv_cache is not None else attention_mask  # (B, start + T)
        if keys is not None:
            # Padding: no token attends to it. Rows share positions, which changes no score: RoPE
            # is relative. A padding query attends to itself only: a row of False would make SDPA
            # return NaN, and NaN values poison the output even under a zero weight.
            pos = torch.arange(start + T, device=idx.device)
            itself = pos[start:, None] == pos  # (T, start + T)
            mask = causal & (keys.bool()[:, None, None, :] | itself)  # (B, 1, T, start + T)
        return cos, sin, mask

    def _per_step_loss(self, e, num_steps, cos, sin, targets, target_lookups, init_scale, mask=None):
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
            logits = self.decode(s, cos, sin, mask=mask)
            reachable = torch.where(target_lookups <= t, targets, -1)
            if (reachable >= 0).any():
                losses.append(F.cross_entropy(logits.view(-1, logits.size(-1)), reachable.reshape(-1), ignore_index=-1))
        if not losses:  # nothing reachable in this few steps: fall back to the last step on every target
            losses.append(F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1))
        return logits, torch.stack(losses).mean()

    @torch.no_grad()
    def trace(self, idx, num_steps):
        """Watch the model think: the logits (B, T, vocab) decoded from the state after every step
        1 ... num_steps, as a list (users of the official code asked for intermediate latents).
        The last entry equals forward(idx, num_steps=num_steps) from the same s0."""
        cos, sin, _ = self._positions(idx)
        e = self.embed(idx, cos, sin)
        return [self.decode(s, cos, sin) for s in self.iterate(e, (0, num_steps), cos, sin, keep_states=True)]

    @torch.no_grad()
    def feed(self, new_ids, kv_cache, num_steps, criterion="none", exit_threshold="auto", min_steps=1, s0=None,
             attention_mask=None):
        """One forward of new_ids (B, T) after the tokens already in kv_cache, the way generate
        feeds every prompt, drafted or written token: num_steps steps (criterion "none") or per-token
        adaptive exit capped at num_steps. Returns logits (B, T, vocab), the steps each token used
        (B, T; 0 at padding) and the final state s (B, T, h); kv_cache then holds new_ids too."""
        cos, sin, mask = self._positions(new_ids, kv_cache, attention_mask)
        e = self.embed(new_ids, cos, sin, kv_cache, mask, attention_mask)
        if criterion == "none":
            s = self.iterate(e, (num_steps, 0), cos, sin, kv_cache, mask, s0=s0)
            used = torch.full(new_ids.shape, num_steps, device=new_ids.device)
            if attention_mask is not None:
                used = used * attention_mask
        else:
            rule = ExitCriterion(criterion, exit_threshold, new_ids.shape, self.config.vocab_size, new_ids.device)
            s, used = self.iterate_adaptive(e, num_steps, cos, sin, rule, min_steps, kv_cache, mask, s0,
                                            attention_mask)
        logits = self.decode(s, cos, sin, kv_cache, mask)
        kv_cache.seq_len += new_ids.size(1)
        return logits, used, s

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, num_steps=None, temperature=0.0, top_k=None, stop_token=None,
                 criterion="none", exit_threshold="auto", min_steps=1, continuous_compute=False,
                 cache_lookup_strategy="full", attention_mask=None, draft_steps=None, lookahead_for_draft=8,
                 return_steps=False, return_stats=False):
        """Complete idx (B, T) with max_new_tokens tokens, each run at num_steps (default mean_r).
        The prompt is processed once into a KV cache; then one token at a time. temperature=0
        is greedy. Stops early when every row has produced stop_token. The policies:
        criterion (not "none"): per-token adaptive exit, num_steps is then the cap (iterate_adaptive).
        continuous_compute: each generated token starts its steps from the previous token's final
        state instead of a fresh s0 (the prompt's tokens, run in parallel, start fresh).
        cache_lookup_strategy: "full" or "compress-sN", KV-cache sharing across steps (KVCache).
        attention_mask (B, T): prompts of different lengths padded on the left (1 = token, 0 =
        padding, whatever its id; left_pad builds both). No token attends to padding, so each row
        gets the tokens it would get alone (up to float rounding: rows share positions). With
        adaptive exit padding never runs (steps 0) and each row's tokens stop by their own
        criterion, as alone; the batch's forward runs until its slowest row has stopped.
        draft_steps (self-speculative decoding, greedy only): each round drafts lookahead_for_draft
        tokens one at a time at draft_steps, then runs them in ONE forward at num_steps (the verify)
        and keeps the drafted tokens the verifier agrees with, then the verifier's own next token:
        plain greedy decoding's output in fewer forwards at num_steps. A batch keeps the shortest
        agreeing prefix of its rows.
        Returns idx (B, T + new tokens); with return_steps also the steps each token fed to the
        model used (all but the last generated one; 0 at padding), (B, idx.size(1) - 1); with
        return_stats also a DraftStats."""
        num_steps = self.config.mean_recurrence if num_steps is None else num_steps
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if draft_steps is not None:
            if not isinstance(draft_steps, int) or not 1 <= draft_steps <= num_steps:
                raise ValueError(f"draft_steps must be an integer from 1 to num_steps = {num_steps} "
                                 f"(the verify depth), got {draft_steps!r}")
            if not isinstance(lookahead_for_draft, int) or lookahead_for_draft < 1:
                raise ValueError(f"lookahead_for_draft must be an integer >= 1, got {lookahead_for_draft!r}")
            if temperature != 0:
                raise ValueError("draft_steps needs temperature=0: keeping the drafted tokens the verifier "
                                 "agrees with reproduces greedy decoding only")
            if criterion != "none":
                raise ValueError("draft_steps needs criterion='none': with adaptive exit, tokens verified in "
                                 "one forward read each other's keys from other steps than when decoded one by one")
            if continuous_compute:
                raise ValueError("draft_steps does not go with continuous_compute: a verified token would start "
                                 "from the final state of the token before it, computed in the same forward")
        kv_cache = KVCache(self.config.block_size, cache_lookup_strategy, len(self.core))
        shared = kv_cache.num_slots is not None and kv_cache.num_slots < len(self.core) * num_steps
        if draft_steps is not None and shared:
            raise ValueError("draft_steps needs cache_lookup_strategy='full' (or compress-sN, N >= R * num_steps): "
                             "with shared slots, tokens verified in one forward read each other's keys from other "
                             "steps than when decoded one by one")
        pad_columns = idx[:, :0]
        if attention_mask is not None:
            attention_mask = attention_mask.to(idx.device) != 0
            if (attention_mask.shape != idx.shape or not attention_mask[:, -1].all()
                    or (attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
                raise ValueError("attention_mask must have idx's shape (B, T) and pad on the left: "
                                 "0s then 1s in every row, at least one 1")
            # Columns that are padding in every row are dropped here and put back at the end: a
            # row alone then has no padding at all (and the CUDA decode kernel takes no mask).
            n_pad = int((~attention_mask).sum(dim=1).min())
            pad_columns, idx, attention_mask = idx[:, :n_pad], idx[:, n_pad:], attention_mask[:, n_pad:]
            if attention_mask.all():
                attention_mask = None
        stats = DraftStats()

        def step_tokens(new_ids, steps, s0=None, attention_mask=None):
            """feed() with this call's cache and exit policy, counted in stats."""
            stats.forwards += 1
            return self.feed(new_ids, kv_cache, steps, criterion, exit_threshold, min_steps, s0, attention_mask)

        def choose(logits):
            """The next token (B, 1) from logits (B, vocab): greedy, or sampled at temperature among the top_k."""
            if temperature == 0:
                return logits.argmax(dim=-1, keepdim=True)
            logits = logits / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)

        def draft(last_id, n):
            """n tokens (B, n) drafted greedily at draft_steps after last_id, fed one at a time. The
            cache is then rolled back: the verify writes the same positions again at num_steps."""
            start, drafted = kv_cache.seq_len, [idx[:, :0]]
            for _ in range(n):
                logits, _, _ = step_tokens(last_id, draft_steps)
                last_id = logits[:, -1].argmax(dim=-1, keepdim=True)
                drafted.append(last_id)
            kv_cache.seq_len = start
            return torch.cat(drafted, dim=1)

        logits, steps, s = step_tokens(idx, num_steps, attention_mask=attention_mask)  # the prompt, in parallel
        new_ids = choose(logits[:, -1])  # (B, 1); later rounds may add several tokens at once
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        n_generated = 0
        while True:
            if stop_token is not None:  # cut after the token where the last row has stopped
                stopped = done[:, None] | ((new_ids == stop_token).cumsum(dim=1) > 0)  # (B, n)
                if stopped.all(dim=0).any():
                    new_ids = new_ids[:, :int(stopped.all(dim=0).int().argmax()) + 1]
                done = stopped[:, new_ids.size(1) - 1]
            idx = torch.cat([idx, new_ids], dim=1)
            n_generated += new_ids.size(1)
            if done.all() or n_generated >= max_new_tokens or idx.size(1) >= self.config.block_size:
                break  # no forward for logits that would not be used
            # Feed the last token at num_steps; with drafting, the tokens drafted after it too,
            # as many as can still be kept (the verifier's next token comes on top).
            lookahead = 0 if draft_steps is None else min(lookahead_for_draft, max_new_tokens - n_generated - 1,
                                                          self.config.block_size - 1 - idx.size(1))
            drafted = draft(idx[:, -1:], lookahead)  # (B, lookahead)
            start = kv_cache.seq_len
            logits, used, s = step_tokens(torch.cat([idx[:, -1:], drafted], dim=1), num_steps,
                                          s[:, -1:] if continuous_compute else None)
            # logits[:, i] predicts what follows drafted token i - 1: keep the drafted tokens up to
            # the first the verifier would not have picked itself, then add the one it picks there
            agree = (logits[:, :-1].argmax(dim=-1) == drafted).cumprod(dim=1).sum(dim=1)  # (B,)
            n = int(agree.min())  # a batch keeps the shortest agreeing prefix of its rows
            kv_cache.seq_len = start + n + 1  # roll back past the drafted tokens not kept
            steps = torch.cat([steps, used[:, :n + 1]], dim=1)
            new_ids = torch.cat([drafted[:, :n], choose(logits[:, n])], dim=1)
            stats.rounds += lookahead > 0
            stats.drafted += lookahead
            stats.accepted += n
        idx = torch.cat([pad_columns, idx], dim=1)
        steps = torch.cat([torch.zeros_like(pad_columns), steps], dim=1)[:, :idx.size(1) - 1]
        out = (idx,) + ((steps,) if return_steps else ()) + ((stats,) if return_stats else ())
        return out if len(out) > 1 else idx
