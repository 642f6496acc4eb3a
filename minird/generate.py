"""
Generation with a recurrent-depth model: feed tokens through a KV cache, choose the next one.

    from minird.generate import generate
    out = generate(model, idx, max_new_tokens=16, num_steps=32)             # greedy at r = 32
    out = generate(model, idx, 16, num_steps=32, criterion="kl")             # adaptive exit, r <= 32
    out = generate(model, idx, 16, num_steps=32, draft_steps=4)              # self-speculative, same output
    out.ids, out.steps, out.stats                                            # tokens, steps used, drafting

Read top to bottom: adaptive exit (when a token's steps have converged) -> feed (one forward of
new tokens, after a cache or not) -> the options, checked in one place -> generate (the plain
loop) -> the self-speculative loop. The policies keep the official code's option names:
`num_steps`, `criterion`, `exit_threshold`, `cache_lookup_strategy`, `continuous_compute`,
`draft_steps`, `lookahead_for_draft`.
"""

import math
import weakref
from dataclasses import dataclass, field, replace

import torch
from torch.nn import functional as F

from minird import ops
from minird.graphed import AdaptiveTokenGraph, TokenGraph, VerifyGraph
from minird.kv_cache import KVCache, parse_lookup_strategy

# -----------------------------------------------------------------------------
# adaptive exit: when a token's steps have converged (the official code's `criterion` names)

# exit_threshold="auto" picks these (the official defaults). kl: KL(p_{t-1} || p_t) of the read-out
# distributions (p_0 uniform); latent-diff: |s_t - s_{t-1}| / |s_t|; entropy-diff: |H(p_t) -
# H(p_{t-1})|; argmax-stability: steps in a row with the same top token; cosine: 1 - cos(s_t, s_{t-1}).
EXIT_THRESHOLDS = {"kl": 1e-3, "latent-diff": 0.03, "entropy-diff": 1e-3, "argmax-stability": 5, "cosine": 1e-3}


class ExitCriterion:
    """Tracks, per token, the quantity its criterion compares with the threshold, step by step.
    Its state is updated in place, so that a CUDA graph of a step reads and writes the same buffers
    at every replay (minird.graphed.AdaptiveTokenGraph)."""

    def __init__(self, criterion, threshold, shape, vocab_size, device):
        if criterion not in EXIT_THRESHOLDS:
            raise ValueError(f"criterion must be one of none, {', '.join(EXIT_THRESHOLDS)}; got {criterion!r}")
        self.criterion = criterion
        self.threshold = EXIT_THRESHOLDS[criterion] if threshold == "auto" else float(threshold)
        self.needs_logits = criterion in ("kl", "entropy-diff", "argmax-stability")
        self.log_p = torch.empty((*shape, vocab_size), device=device)  # log p_(t-1)
        self.top = torch.empty(shape, dtype=torch.long, device=device)  # the top token at t - 1
        self.same_top = torch.empty(shape, dtype=torch.long, device=device)  # steps it has stayed on top
        self.reset()

    def reset(self):
        """Back to before step 1, for the next token: p_0 uniform, no top token."""
        self.log_p.fill_(-math.log(self.log_p.size(-1)))
        self.top.fill_(-1)
        self.same_top.zero_()

    def converged(self, s_prev, s, logits=None):
        """(B, T) bool: has each token converged at this step?"""
        if self.criterion == "latent-diff":
            return (s - s_prev).norm(dim=-1) / s.norm(dim=-1).clamp_min(1e-12) < self.threshold
        if self.criterion == "cosine":
            return 1 - F.cosine_similarity(s, s_prev, dim=-1) < self.threshold
        log_p, log_p_prev = logits.float().log_softmax(-1), self.log_p
        if self.criterion == "kl":
            converged = (log_p_prev.exp() * (log_p_prev - log_p)).sum(-1) < self.threshold
        elif self.criterion == "entropy-diff":
            entropy = lambda lp: -(lp.exp() * lp).sum(-1)  # noqa: E731
            converged = (entropy(log_p) - entropy(log_p_prev)).abs() < self.threshold
        else:  # argmax-stability
            top = log_p.argmax(-1)
            self.same_top.copy_(torch.where(top == self.top, self.same_top + 1, 0))
            self.top.copy_(top)
            converged = self.same_top >= self.threshold
        self.log_p.copy_(log_p)
        return converged


@torch.no_grad()
def iterate_adaptive(model, e, num_steps, cos, sin, exit_rule, min_steps=1, kv_cache=None, mask=None, s0=None,
                     tokens=None, init_scale=None):
    """model.iterate for up to num_steps steps, with per-token adaptive exit: a token whose
    exit_rule (an ExitCriterion) is met at step >= min_steps keeps its state from then on.
    Frozen tokens still serve keys and values (from their frozen state) to the others of this
    forward. Once all of a row's tokens have stopped, the cache entries of the steps it did not
    run repeat each token's last ones ("latest entry"), for later tokens to read -- whether or
    not other rows go on, so a row gets what it would get alone. The loop ends when every token
    has stopped. (The official code's prefill stops all tokens of a prompt together, on the last
    token's criterion: for one-token forwards the two agree, tests/test_pretrained.py.)
    tokens (B, T) bool: False at left padding, which never runs. s0: the initial state (default:
    a fresh one at init_scale, as model.iterate).
    Returns the final state (B, T, h) and the steps each token used (B, T), 0 for padding."""
    B, T, _ = e.shape
    s = model.initialize_state(e, init_scale) if s0 is None else s0
    used = torch.full((B, T), num_steps, dtype=torch.long, device=e.device)
    stopped = torch.zeros(B, T, dtype=torch.bool, device=e.device)
    if tokens is not None:
        used[~tokens], stopped = 0, ~tokens
    rows_done = torch.zeros(B, dtype=torch.bool, device=e.device)
    repeats = []  # (step, rows, their core entries at that step) for the rows that stopped early
    for step in range(num_steps):
        # one step, on the kernels where they run (model.iterate), writing the cache entries of `step`
        s_next = model.iterate(e, (1, 0), cos, sin, kv_cache, mask, s0=s, first_step=step)
        s_next = torch.where(stopped[..., None], s, s_next)
        logits = None
        if exit_rule.needs_logits:  # the coda's cache entries it writes are rewritten by the last readout
            logits = model.readout(s_next, cos, sin, kv_cache, mask)
        newly = exit_rule.converged(s, s_next, logits) & ~stopped & (step + 1 >= min_steps)
        used = torch.where(newly, step + 1, used)
        stopped |= newly
        s = s_next
        rows = stopped.all(dim=1) & ~rows_done
        rows_done |= rows
        # the one wait for the device a step: whether rows stopped now, all of them, and all so far
        some_now, all_now, all_done = torch.stack([rows.any(), rows.all(), rows_done.all()]).tolist()
        if kv_cache is not None and some_now and step + 1 < num_steps:
            # these rows' entries are copied now: the steps that go on for other rows overwrite
            # them. When every row (one row alone: always) stops here, no step follows, and
            # repeat_step reads them from the cache.
            repeats.append((step, None, None) if all_now else (step, rows, kv_cache.core_entries(step, T, rows)))
        if all_done:
            break
    for step, rows, entries in repeats:
        kv_cache.repeat_step(step, num_steps, T, rows, entries)
    return s, used


# -----------------------------------------------------------------------------
# feed: one forward of new tokens


@torch.no_grad()
def feed(model, new_ids, kv_cache=None, num_steps=None, criterion="none", exit_threshold="auto", min_steps=1,
         s0=None, attention_mask=None, init_scale=None):
    """One forward of new_ids (B, T), after the tokens already in kv_cache (None: none, and no
    cache is kept): num_steps steps (default mean_r; criterion "none"), or per-token adaptive
    exit capped at num_steps. generate feeds every prompt, drafted and written token through it.
    s0 (B, T, h): the initial state (default: fresh, at init_scale or the model's). attention_mask
    (B, T): 0 at left padding.
    Returns logits (B, T, vocab), the steps each token used (B, T; 0 at padding) and the final
    state s (B, T, h); kv_cache then holds new_ids too."""
    num_steps = model.config.mean_recurrence if num_steps is None else num_steps
    cos, sin, mask = model.positions(new_ids, kv_cache, attention_mask)
    e = model.embed(new_ids, cos, sin, kv_cache, mask, attention_mask)
    if criterion == "none":
        s = model.iterate(e, (num_steps, 0), cos, sin, kv_cache, mask, init_scale, s0=s0)
        used = torch.full(new_ids.shape, num_steps, device=new_ids.device)
        if attention_mask is not None:
            used = used * attention_mask
    else:
        rule = ExitCriterion(criterion, exit_threshold, new_ids.shape, model.config.vocab_size, new_ids.device)
        s, used = iterate_adaptive(model, e, num_steps, cos, sin, rule, min_steps, kv_cache, mask, s0, attention_mask,
                                   init_scale)
    logits = model.readout(s, cos, sin, kv_cache, mask)
    if kv_cache is not None:
        kv_cache.seq_len += new_ids.size(1)
    return logits, used, s


def left_pad(prompts, pad_id=0):
    """Token id lists of different lengths -> idx (B, T) padded on the left with pad_id, and the
    attention_mask (B, T) (1 = token, 0 = padding) that generate takes with it."""
    T = max(len(p) for p in prompts)
    idx = torch.tensor([[pad_id] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    return idx, attention_mask


# -----------------------------------------------------------------------------
# the options of generate, checked in one place


@dataclass
class GenerationConfig:
    num_steps: int = None  # r of every token (None: the model's mean_recurrence); with a criterion, the cap
    temperature: float = 0.0  # 0: greedy
    top_k: int = None  # sample among the top_k tokens only
    stop_tokens: tuple = ()  # ids that end a row; generation ends when every row has written one
    criterion: str = "none"  # adaptive exit per token: none, or one of EXIT_THRESHOLDS
    exit_threshold: object = "auto"  # "auto" (EXIT_THRESHOLDS) or a number
    min_steps: int = 1  # adaptive exit: steps every token runs at least
    # Each written token starts its steps from the previous token's final state instead of a fresh
    # s0 (the prompt's tokens, run in parallel, start fresh).
    continuous_compute: bool = False
    cache_lookup_strategy: str = "full"  # "full" or "compress-sN" (KV-cache sharing, minird.kv_cache)
    # Self-speculative decoding (greedy only): each round drafts lookahead_for_draft tokens one at a
    # time at draft_steps, runs them in ONE forward at num_steps (the verify), and keeps the drafted
    # tokens the verifier agrees with, then the verifier's own next token: plain greedy decoding's
    # output in fewer forwards at num_steps. A batch keeps the shortest agreeing prefix of its rows.
    draft_steps: int = None
    lookahead_for_draft: int = 8
    init_scale: float = None  # each token's random s0 scale (None: the model's; 0: zeros), as the official generate
    # The whole token in one CUDA graph replay (minird.graphed): "auto" on CUDA where the options
    # allow it (greedy at a fixed r: temperature 0, criterion none, no diffusion forcing; with
    # draft_steps each drafted token and each verify is a replay); True: required (on the CPU the
    # same static-position step runs uncaptured); False: never.
    cuda_graph: object = "auto"
    # Diffusion forcing (the official generate_diffusion_style, batch 1): a wavefront of up to
    # max_wavefront positions after the frozen tokens is iterated in parallel, inner_recurrence
    # steps a round; each round every position guesses its token, and the tokens up to the last
    # position whose state moved less than freeze_threshold (|s - s_prev| / |s|) are frozen.
    diffusion_forcing: bool = False
    inner_recurrence: int = 4
    max_wavefront: int = 128
    headway: int = 1  # new positions the wave grows by each round
    ema_embeds: float = 0.1  # a position's injected input: this much of last round's, the rest new
    state_noise_mixing: float = 0.5  # fresh noise mixed into each state, divided by 1 + its steps so far
    freeze_threshold: float = 0.03
    max_diffusion_steps: int = 4096  # rounds after which the wave ends, frozen or not (the official name)

    def validated(self, model):
        """A copy with num_steps resolved and stop_tokens a tuple, or ValueError naming the option."""
        num_steps = model.config.mean_recurrence if self.num_steps is None else self.num_steps
        stop_tokens = (self.stop_tokens,) if isinstance(self.stop_tokens, int) else tuple(self.stop_tokens)
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        if self.init_scale is not None and not (math.isfinite(self.init_scale) and self.init_scale >= 0):
            raise ValueError(f"init_scale must be None or a number >= 0, got {self.init_scale!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be None or an integer >= 1, got {self.top_k!r}")
        if not all(isinstance(t, int) and 0 <= t < model.config.vocab_size for t in stop_tokens):
            raise ValueError(f"stop_tokens must be token ids below vocab_size {model.config.vocab_size}, "
                             f"got {self.stop_tokens!r}")
        if self.criterion != "none" and self.criterion not in EXIT_THRESHOLDS:
            raise ValueError(f"criterion must be one of none, {', '.join(EXIT_THRESHOLDS)}; got {self.criterion!r}")
        if self.exit_threshold != "auto" and not (isinstance(self.exit_threshold, (int, float))
                                                  and self.exit_threshold >= 0):
            raise ValueError(f"exit_threshold must be 'auto' or a number >= 0, got {self.exit_threshold!r}")
        if not isinstance(self.min_steps, int) or not 1 <= self.min_steps <= num_steps:
            raise ValueError(f"min_steps must be an integer from 1 to num_steps = {num_steps}, got {self.min_steps!r}")
        slots = parse_lookup_strategy(self.cache_lookup_strategy)
        if self.cuda_graph not in ("auto", True, False):
            raise ValueError(f"cuda_graph must be 'auto', True or False, got {self.cuda_graph!r}")
        if self.cuda_graph is True and not self.graphable:
            raise ValueError("cuda_graph=True needs greedy decoding one token a forward: temperature=0, "
                             "no diffusion_forcing")
        if self.diffusion_forcing:
            for name in ("inner_recurrence", "max_wavefront", "headway", "max_diffusion_steps"):
                if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                    raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
            for name in ("ema_embeds", "state_noise_mixing"):
                if not 0 <= getattr(self, name) <= 1:
                    raise ValueError(f"{name} must be a number from 0 to 1, got {getattr(self, name)!r}")
            if not self.freeze_threshold >= 0:
                raise ValueError(f"freeze_threshold must be a number >= 0, got {self.freeze_threshold!r}")
            if self.temperature != 0 or self.criterion != "none" or self.draft_steps is not None:
                raise ValueError("diffusion_forcing is greedy and freezes tokens by its own rule: it takes no "
                                 "temperature, criterion or draft_steps")
        if self.draft_steps is not None:
            if not isinstance(self.draft_steps, int) or not 1 <= self.draft_steps <= num_steps:
                raise ValueError(f"draft_steps must be an integer from 1 to num_steps = {num_steps} "
                                 f"(the verify depth), got {self.draft_steps!r}")
            if not isinstance(self.lookahead_for_draft, int) or self.lookahead_for_draft < 1:
                raise ValueError(f"lookahead_for_draft must be an integer >= 1, got {self.lookahead_for_draft!r}")
            if self.temperature != 0:
                raise ValueError("draft_steps needs temperature=0: keeping the drafted tokens the verifier "
                                 "agrees with reproduces greedy decoding only")
            if self.criterion != "none":
                raise ValueError("draft_steps needs criterion='none': with adaptive exit, tokens verified in "
                                 "one forward read each other's keys from other steps than when decoded one by one")
            if self.continuous_compute:
                raise ValueError("draft_steps does not go with continuous_compute: a verified token would start "
                                 "from the final state of the token before it, computed in the same forward")
            if slots is not None and slots < model.config.n_layers_in_recurrent_block * num_steps:
                raise ValueError("draft_steps needs cache_lookup_strategy='full' (or compress-sN, N >= R * "
                                 "num_steps): with shared slots, tokens verified in one forward read each other's "
                                 "keys from other steps than when decoded one by one")
        return replace(self, num_steps=num_steps, stop_tokens=stop_tokens)

    @property
    def graphable(self):
        """Can a token be CUDA graph replays: greedy, one token a forward (with draft_steps: each
        drafted token); at a fixed r one replay, with a criterion (one row) one per step."""
        return self.temperature == 0 and not self.diffusion_forcing

    def graphed_on(self, device, batch):
        """Whether generate replays tokens from CUDA graphs on device (the CPU only if required), for
        a batch of that many rows: under adaptive exit the rows of a batch stop at different steps,
        so a graph serves one row. Adaptive exit through graphs is opt-in (cuda_graph=True) until its
        CUDA tests have all run and it has been timed on a GPU (csrc/README.md: two cases so far)."""
        if self.cuda_graph is True and self.criterion != "none" and batch > 1:
            raise ValueError(f"cuda_graph=True with a criterion decodes one row (its tokens stop on their own), "
                             f"got a batch of {batch}")
        return self.cuda_graph is True or (self.cuda_graph == "auto" and self.graphable and device.type == "cuda"
                                           and self.criterion == "none")


@dataclass
class DraftStats:
    """How many model forwards generate ran and, with draft_steps, how many drafted tokens it kept."""
    forwards: int = 0  # model forwards: the prompt, then each drafted token and each verify (or each token)
    rounds: int = 0  # verifies of drafted tokens
    drafted: int = 0  # drafted tokens verified (a batch drafts as many in every row)
    accepted: int = 0  # drafted tokens kept: the verifier at num_steps agreed (in every row of a batch)

    @property
    def acceptance_rate(self):
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class Generation:
    """What generate returns."""
    ids: torch.Tensor  # (B, T + new tokens): the prompt (with its padding), then what was written
    steps: torch.Tensor  # (B, ids.size(1) - 1): steps each token fed to the model used (0 at padding)
    stats: DraftStats = field(default_factory=DraftStats)
    kv_cache_bytes: int = 0  # bytes of the KV cache's buffers, allocated for prompt + new tokens


# -----------------------------------------------------------------------------
# generate


@torch.inference_mode()  # not no_grad: see the end
def generate(model, idx, max_new_tokens, config=None, attention_mask=None, **options):
    """Complete idx (B, T) with up to max_new_tokens tokens (fewer where block_size ends, or once
    every row has written a stop token). The prompt is fed once, in parallel, into a KV cache
    sized to prompt + new tokens; then one token at a time. Options: a GenerationConfig and/or its
    fields as keywords (these win). attention_mask (B, T): prompts of different lengths padded on
    the left (1 = token, 0 = padding, whatever its id; left_pad builds both). No token attends to
    padding, so each row gets the tokens it would get alone (up to float rounding: rows share
    positions); with adaptive exit padding never runs and each row's tokens stop by their own
    criterion, the batch's forward running until its slowest row has stopped. Returns a Generation."""
    config = replace(config or GenerationConfig(), **options).validated(model)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    pad_columns, idx, attention_mask = drop_padding_columns(idx, attention_mask)
    if idx.size(1) > model.config.block_size:
        raise ValueError(f"a prompt of {idx.size(1)} tokens exceeds block_size {model.config.block_size}")
    length = min(idx.size(1) + max_new_tokens, model.config.block_size)
    if config.diffusion_forcing:
        if idx.size(0) != 1:
            raise ValueError(f"diffusion_forcing takes one prompt (batch 1, as the official code), got {idx.size(0)}")
        decode = decode_diffusion
    elif config.draft_steps is not None:
        decode = decode_speculatively
    elif config.graphed_on(idx.device, idx.size(0)):
        decode = decode_graphed
    else:
        decode = decode_plainly
    ids, steps, stats, kv_cache = decode(model, idx, length, config, attention_mask)
    # Inference mode, where no_grad would still pass every minird op through the autograd layer that
    # torch.library.register_autograd installs (a Python call per op: the toy model decoded 57 tok/s
    # on the 2-core CPU at r = 4 under no_grad, 71 here). What it creates are inference tensors,
    # which autograd may not save (a generated batch trained on would fail): the caller gets copies.
    with torch.inference_mode(False):
        ids = torch.cat([pad_columns, ids], dim=1)
        steps = torch.cat([torch.zeros_like(pad_columns), steps], dim=1)[:, :ids.size(1) - 1]
    return Generation(ids, steps, stats, kv_cache.allocated_bytes())


def drop_padding_columns(idx, attention_mask):
    """(the columns that are padding in every row, idx without them, its attention_mask or None if
    no padding is left): a row alone then has no padding at all (and the CUDA decode kernel takes
    no mask). The columns are put back in front of the output."""
    if attention_mask is None:
        return idx[:, :0], idx, None
    attention_mask = attention_mask.to(idx.device) != 0
    if (attention_mask.shape != idx.shape or not attention_mask[:, -1].all()
            or (attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
        raise ValueError("attention_mask must have idx's shape (B, T) and pad on the left: "
                         "0s then 1s in every row, at least one 1")
    n_pad = int((~attention_mask).sum(dim=1).min())
    idx, attention_mask, pad_columns = idx[:, n_pad:], attention_mask[:, n_pad:], idx[:, :n_pad]
    return pad_columns, idx, None if attention_mask.all() else attention_mask


def choose(logits, config):
    """The next token (B, 1) from logits (B, vocab): greedy, or sampled at temperature among the top_k."""
    if config.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / config.temperature
    if config.top_k is not None:
        v, _ = torch.topk(logits, min(config.top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


def until_all_stopped(new_ids, done, stop_tokens):
    """new_ids (B, n) written after rows done (B,) bool -> (new_ids cut after the token where the
    last row writes a stop token (all of them while some row has not), the rows done after them)."""
    if not stop_tokens:
        return new_ids, done
    is_stop = torch.isin(new_ids, torch.tensor(stop_tokens, device=new_ids.device))
    stopped = done[:, None] | (is_stop.cumsum(dim=1) > 0)  # (B, n)
    if stopped.all(dim=0).any():
        new_ids = new_ids[:, :int(stopped.all(dim=0).int().argmax()) + 1]
    return new_ids, stopped[:, new_ids.size(1) - 1]


def new_cache(model, length, config):
    """A KVCache of length positions, with config's cache_lookup_strategy, for the most steps a
    token runs: num_steps (diffusion forcing: inner_recurrence a round, if that is more)."""
    steps = max(config.num_steps, config.inner_recurrence) if config.diffusion_forcing else config.num_steps
    return KVCache(length, config.cache_lookup_strategy, model.config.n_layers_in_recurrent_block, steps)


def decode_plainly(model, idx, length, config, attention_mask):
    """One token per forward until length tokens, or every row has stopped. Returns (ids, steps,
    stats, kv_cache). The reference loop: decode_graphed and decode_speculatively write its tokens."""
    kv_cache, stats = new_cache(model, length, config), DraftStats(forwards=1)
    logits, steps, s = feed(model, idx, kv_cache, config.num_steps, config.criterion, config.exit_threshold,
                            config.min_steps, attention_mask=attention_mask, init_scale=config.init_scale)  # the prompt
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    while True:
        next_id, done = until_all_stopped(choose(logits[:, -1], config), done, config.stop_tokens)  # (B, 1)
        idx = torch.cat([idx, next_id], dim=1)
        if done.all() or idx.size(1) >= length:
            return idx, steps, stats, kv_cache  # no forward for logits that would not be used
        s0 = s[:, -1:] if config.continuous_compute else None
        logits, used, s = feed(model, next_id, kv_cache, config.num_steps, config.criterion, config.exit_threshold,
                               config.min_steps, s0, init_scale=config.init_scale)
        steps = torch.cat([steps, used], dim=1)
        stats.forwards += 1


def decode_speculatively(model, idx, length, config, attention_mask):
    """decode_plainly's output (greedy), from rounds of: draft lookahead_for_draft tokens one at a
    time at draft_steps, then feed the last token and the drafts in one forward at num_steps (the
    verify) and keep the drafts up to the first the verifier would not have picked, then the token
    it picks there. Where generate replays graphs (config.graphed_on), each drafted token is one
    replay of a TokenGraph at draft_steps and each verify of lookahead_for_draft drafts one replay
    of a VerifyGraph (a shorter one, at the end, a plain forward). tests/test_generate.py checks
    the two decoders write the same tokens."""
    B = idx.size(0)
    draft_graph = verify_graph = None
    if config.graphed_on(idx.device, B):
        draft_graph, verify_graph = kept_graphs(model, B, length, config, attention_mask, lambda cache: (
            TokenGraph(model, cache, B, config.draft_steps, init_scale=config.init_scale),
            VerifyGraph(model, cache, B, config.num_steps, config.lookahead_for_draft + 1, config.init_scale)))
    kv_cache = draft_graph.kv_cache if draft_graph else new_cache(model, length, config)
    stats = DraftStats(forwards=1)
    logits, steps, _ = feed(model, idx, kv_cache, config.num_steps, attention_mask=attention_mask,
                            init_scale=config.init_scale)
    new_ids = choose(logits[:, -1], config)  # (B, 1); later rounds add up to lookahead + 1 tokens
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    while True:
        new_ids, done = until_all_stopped(new_ids, done, config.stop_tokens)
        idx = torch.cat([idx, new_ids], dim=1)
        if done.all() or idx.size(1) >= length:
            return idx, steps, stats, kv_cache
        # as many drafts as can still be kept: the verifier's next token comes on top
        lookahead = min(config.lookahead_for_draft, length - 1 - idx.size(1))
        start, last_id = kv_cache.seq_len, idx[:, -1:]
        if draft_graph is not None:  # (the graph writes at its device position: seq_len stays at start)
            draft_graph.start(last_id, start)
            drafted = draft_graph.run(lookahead)  # (B, lookahead)
        else:
            drafted = [idx[:, :0]]
            for _ in range(lookahead):
                draft_logits, _, _ = feed(model, last_id, kv_cache, config.draft_steps, init_scale=config.init_scale)
                last_id = draft_logits[:, -1].argmax(dim=-1, keepdim=True)
                drafted.append(last_id)
            drafted = torch.cat(drafted, dim=1)  # (B, lookahead)
            kv_cache.seq_len = start  # the verify writes the drafts' positions again, at num_steps
        fed = torch.cat([idx[:, -1:], drafted], dim=1)  # (B, lookahead + 1): the last token, the drafts
        if verify_graph is not None and fed.size(1) == verify_graph.width:
            chosen = verify_graph.run(fed, start)  # (seq_len stays at start)
            used = torch.full_like(chosen, config.num_steps)
        else:
            logits, used, _ = feed(model, fed, kv_cache, config.num_steps, init_scale=config.init_scale)
            chosen = logits.argmax(dim=-1)  # (greedy: what choose picks at temperature 0)
        # chosen[:, i]: the verifier's token after fed token i, to compare with drafted token i
        agree = (chosen[:, :-1] == drafted).cumprod(dim=1).sum(dim=1)  # (B,)
        n = int(agree.min())  # a batch keeps the shortest agreeing prefix of its rows
        kv_cache.seq_len = start + n + 1  # roll back past the drafted tokens not kept
        steps = torch.cat([steps, used[:, :n + 1]], dim=1)
        new_ids = torch.cat([drafted[:, :n], chosen[:, n:n + 1]], dim=1)
        stats.forwards += lookahead + 1
        stats.rounds += lookahead > 0
        stats.drafted += lookahead
        stats.accepted += n


# -----------------------------------------------------------------------------
# the whole token as one CUDA graph replay (minird.graphed)

# generate keeps, per model, the graph of the last shape it decoded, with its KV cache: the next
# call of the same shape (batch, r, cache bucket, options) replays it instead of capturing again.
GRAPHS = weakref.WeakKeyDictionary()
CACHE_BUCKET = 64  # a graph's cache length is prompt + new tokens rounded up to this: shapes repeat
READ_BACK_EVERY = 8  # tokens replayed between looks at the output for stop tokens (a host sync each)


def kept_graphs(model, batch, length, config, attention_mask, build):
    """The tuple of graphs build(kv_cache) makes (a TokenGraph; or a draft and a verify graph), on
    one empty KV cache of length positions or more: the ones kept for this shape, or new ones
    (each captured at its first run)."""
    bucket = min(model.config.block_size, -(-length // CACHE_BUCKET) * CACHE_BUCKET)
    # (the drafting fields only where there are drafts: plain decoding ignores lookahead_for_draft)
    drafting = (config.draft_steps, config.lookahead_for_draft) if config.draft_steps is not None else None
    exits = (config.criterion, config.exit_threshold, config.min_steps) if config.criterion != "none" else None
    shape = (batch, bucket, config.num_steps, drafting, exits, attention_mask is not None, config.continuous_compute,
             config.cache_lookup_strategy, config.init_scale, model.use_kernels, ops.DECODE_KERNEL_MAX_WIDTH,
             tuple(p.data_ptr() for p in model.parameters()))  # new weight tensors need a new graph
    kept = GRAPHS.pop(model, None)  # (dropped first when the shape changed: its cache's memory is freed)
    if kept is not None and kept[0] == shape:
        graphs = kept[1]
        graphs[0].kv_cache.reset()
    else:
        del kept
        graphs = build(new_cache(model, bucket, config))
    GRAPHS[model] = (shape, graphs)
    return graphs


def decode_graphed(model, idx, length, config, attention_mask):
    """decode_plainly's tokens (greedy), each token after the first one CUDA graph replay at a fixed
    r, or with a criterion (batch 1) a replay per step (graphed.AdaptiveTokenGraph); on the CPU
    the same static-position code, uncaptured. The prompt's forward runs as usual. With stop
    tokens the output is read back every READ_BACK_EVERY tokens, so up to that many more tokens
    are computed than kept. Returns (ids, steps, stats, kv_cache)."""
    B, T = idx.shape
    if config.criterion == "none":
        build = lambda cache: (TokenGraph(model, cache, B, config.num_steps, config.continuous_compute,  # noqa: E731
                                          config.init_scale),)
    else:
        build = lambda cache: (AdaptiveTokenGraph(model, cache, config, ExitCriterion(  # noqa: E731
            config.criterion, config.exit_threshold, (1, 1), model.config.vocab_size, idx.device)),)
    graph, = kept_graphs(model, B, length, config, attention_mask, build)
    logits, steps, s = feed(model, idx, graph.kv_cache, config.num_steps, config.criterion, config.exit_threshold,
                            config.min_steps, attention_mask=attention_mask, init_scale=config.init_scale)  # the prompt
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    new_ids, done = until_all_stopped(choose(logits[:, -1], config), done, config.stop_tokens)  # (B, 1)
    graph.start(new_ids, T, s[:, -1:])
    while not done.all() and T + new_ids.size(1) < length:
        n = length - T - new_ids.size(1)
        more, done = until_all_stopped(graph.run(min(n, READ_BACK_EVERY) if config.stop_tokens else n), done,
                                       config.stop_tokens)
        new_ids = torch.cat([new_ids, more], dim=1)
    stats = DraftStats(forwards=new_ids.size(1))
    fed = graph.fed_steps(T, new_ids.size(1) - 1).to(steps.dtype)  # the tokens fed after the prompt
    return torch.cat([idx, new_ids], dim=1), torch.cat([steps, fed], dim=1), stats, graph.kv_cache


# -----------------------------------------------------------------------------
# diffusion forcing: a wavefront of positions iterated in parallel


def decode_diffusion(model, idx, length, config, attention_mask):
    """The official generate_diffusion_style with its latent-diff freezing, batch 1. After the
    prompt's forward, positions from the last frozen token on form a wave: each round embeds the
    wave's current tokens (mixing in ema_embeds of last round's input), mixes noise into its states,
    runs inner_recurrence steps on all of them in one forward, and reads out a guess for every
    position after it. The wave then grows by headway fresh positions (up to max_wavefront), and
    every token up to the last position whose state moved less than freeze_threshold since the
    last round is frozen: its keys and values stay in the cache, and the wave restarts at the last
    frozen token. Where a token needs r steps to settle, tokens still settle one by one, but each
    round moves the whole wave, so the r steps of consecutive tokens overlap. Ends, as the official
    code, after max_diffusion_steps rounds even if fewer tokens were frozen. One difference: a
    state is compared with its own position's last round; the official code, after a round that
    froze n tokens, compares position p with last round's p + n (its saved states start at the
    last frozen token, but are indexed from the round's first position).
    Returns (ids, steps, stats, kv_cache); steps: the official count of core steps per position
    (the prompt and the first new token count num_steps from the prompt's forward)."""
    c, T = config, idx.size(1)
    kv_cache = new_cache(model, min(model.config.block_size, length + c.max_wavefront + c.headway), c)
    logits, _, s = feed(model, idx, kv_cache, c.num_steps, init_scale=c.init_scale)  # the prompt
    frozen = torch.cat([idx, logits[:, -1:].argmax(dim=-1)], dim=1)  # (1, n): the prompt, then frozen tokens
    steps = torch.zeros(1, kv_cache.max_len, dtype=torch.long, device=idx.device)
    steps[:, :T + 1] = c.num_steps
    sequence = frozen  # the frozen tokens, then the wave's guesses
    states = model.initialize_state(s[:, -1:], c.init_scale)  # the wave's states, from the last frozen token on
    previous, previous_start = states, kv_cache.seq_len  # last round's states, and the position of the first
    previous_e = previous_e_start = None  # last round's injected input, and its first position
    stats = DraftStats(forwards=1)
    stop_tokens = torch.tensor(c.stop_tokens, dtype=torch.long, device=idx.device)
    while (frozen.size(1) < length and stats.forwards <= c.max_diffusion_steps
           and not torch.isin(frozen[0, T:], stop_tokens).any()):
        start = kv_cache.seq_len  # the wave holds positions start .. start + W - 1; the cache, those before
        wave = sequence[:, start:]
        cos, sin, mask = model.positions(wave, kv_cache)
        e = model.embed(wave, cos, sin, kv_cache, mask)  # (1, W, h)
        if c.ema_embeds > 0 and previous_e is not None:  # as the official: new positions get (1 - ema) of theirs
            matching = previous_e[:, start - previous_e_start:]
            e = e * (1 - c.ema_embeds)
            e[:, :matching.size(1)] += c.ema_embeds * matching
        previous_e, previous_e_start = e, start
        noise = (c.state_noise_mixing / (1 + steps[:, start:start + wave.size(1)]))[..., None].to(states.dtype)
        states = states * (1 - noise) + noise * model.initialize_state(states, c.init_scale)
        states = model.iterate(e, (c.inner_recurrence, 0), cos, sin, kv_cache, mask, s0=states)
        steps[:, start:start + wave.size(1)] += c.inner_recurrence
        guesses = model.readout(states, cos, sin, kv_cache, mask)[:, frozen.size(1) - 1 - start:].argmax(dim=-1)
        stats.forwards += 1
        # the wave grows by headway positions (random tokens after the first guess), up to
        # max_wavefront and the cache's end
        extra = torch.randint(0, model.config.vocab_size, (1, c.headway - 1), device=idx.device)
        sequence = torch.cat([frozen, guesses, extra], dim=1)
        fresh = model.initialize_state(states.new_empty(1, c.headway, states.size(-1)), c.init_scale)
        states = torch.cat([states, fresh], dim=1)
        width = min(c.max_wavefront, kv_cache.max_len - start)
        states, sequence = states[:, :width], sequence[:, :start + width]
        # freeze up to the last position whose state has settled since the last round
        before = previous[:, start - previous_start:]
        now = states[:, :before.size(1)]
        settled = ((now - before).norm(dim=-1) / now.norm(dim=-1).clamp_min(1e-12) < c.freeze_threshold)[0]
        if settled.any():
            k = start + int(settled.nonzero()[-1]) + 1  # positions < k are frozen
            frozen = sequence[:, :k]
            states = states[:, k - 1 - start:]
            kv_cache.seq_len = k - 1  # the wave restarts at the last frozen token, k - 1
        previous, previous_start = states, kv_cache.seq_len
    if c.stop_tokens:
        frozen, _ = until_all_stopped(frozen[:, T:], torch.zeros(1, dtype=torch.bool, device=idx.device),
                                      c.stop_tokens)
        frozen = torch.cat([idx, frozen], dim=1)
    frozen = frozen[:, :length]
    return frozen, steps[:, :frozen.size(1) - 1], stats, kv_cache
