"""
One generated token without Python in the loop: embed, prelude, the r recurrent steps, coda, head
and the choice of the next token, captured once in a CUDA graph and replayed for every token.

Why: at decode a token is hundreds of small kernels (at r = 32 and h = 256, ~40 per step); launched
one by one from Python, the GPU waits for the host between them (generate at r = 4 spent 4.5 ms a
token of which the core's kernels were ~0.3 ms). A CUDA graph records the kernels of one token
with their arguments and replays them with one launch. What changes from token to token is then
not allowed in any argument the host passes: the position. So the token's position lives in a
device tensor `pos` that the kernels read (kv_cache.DecodeView): the keys and values are written
at pos with index_copy_, attention reads every position of the cache under a mask (those up to
pos), the RoPE angles are index_select-ed at pos, the decode kernel reads pos when it starts
(csrc/cuda/decode.cu), and the graph ends by adding 1 to pos and writing the chosen token where
the next replay reads it. The host only replays, and reads the tokens back every few tokens (to
see stop tokens) or at the end.

Self-speculative decoding replays two graphs on one cache: a TokenGraph at draft_steps for each
drafted token, and a VerifyGraph that feeds the last token and the drafts in one forward at
num_steps, at positions the host sets once a round, and writes the argmax of every position.
Adaptive exit (one row) cannot be one graph, since whether to run step i + 1 is decided on the
host after step i: an AdaptiveTokenGraph replays a graph per step and reads one flag after each.

A graph is bound to its buffers (the KV cache, the tokens, the state, the positions), so it is
captured once per (batch, r, cache length bucket, options) and kept by minird.generate for the next
call of the same shape. On the CPU the same static-position step runs uncaptured, token by token:
it is the code the graph replays, and tests/test_graphed.py checks it against the plain loop.
"""

import weakref

import torch

from minird.kv_cache import DecodeView


def record(fn, inputs):
    """fn() recorded in a CUDA graph (returned, not run). One warm-up run first, on a side stream
    (as torch's docs ask), so that lazy set-up (cuBLAS handles, kernel attributes) is not recorded;
    it writes at the current positions only, which the first replay rewrites, and the buffers in
    inputs, which fn() reads and changes, are put back after it."""
    saved = [t.clone() for t in inputs]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    for t, value in zip(inputs, saved):
        t.copy_(value)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


class Replayed:
    """owner.method(*args) as a CUDA graph on CUDA, recorded at the first replay() (record(...,
    inputs)) and replayed after; elsewhere replay() runs it as it is. The owner (the graph object
    whose attribute this is) is held weakly: a strong reference would be a cycle, and a dropped
    graph's KV cache, gigabytes at Huginn's size, would then wait for the garbage collector
    instead of being freed before generate allocates the next one."""

    def __init__(self, owner, method, device, inputs=(), args=()):
        self.owner, self.method, self.args = weakref.ref(owner), method, args
        self.inputs, self.on_cuda = inputs, device.type == "cuda"
        self.graph = None

    def run(self):
        getattr(self.owner(), self.method)(*self.args)

    def replay(self):
        if not self.on_cuda:
            return self.run()
        if self.graph is None:
            self.graph = record(self.run, self.inputs)
        self.graph.replay()


class DecodingPosition:
    """What decoding one token per row at a device position keeps from token to token: pos, the
    token fed next, its s0 (continuous compute: the state of the token before), the tokens written
    (ids[:, p]: the token at p), and the host's copy of pos."""

    def __init__(self, model, kv_cache, batch):
        self.model = weakref.ref(model)  # minird.generate keeps graphs per model; no cycle keeps it alive
        self.kv_cache = kv_cache
        device, dtype = model.wte.weight.device, model.wte.weight.dtype
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # the position of the token fed next
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)  # the token fed next
        self.state = torch.zeros(batch, 1, model.config.n_embd, dtype=dtype, device=device)  # its s0 if continuous
        self.ids = torch.zeros(batch, kv_cache.max_len + 1, dtype=torch.long, device=device)
        self.view = DecodeView(kv_cache, self.pos)
        self.position = 0

    def start(self, token, position, state=None):
        """Decode from token (B, 1) at position (the cache holds the positions before it); state
        (B, 1, h): the final state of the token before, which continuous_compute starts from."""
        self.token.copy_(token)
        self.pos.fill_(position)
        self.position = position
        if state is not None:
            self.state.copy_(state)

    def check_room(self, n):
        """ValueError unless n more tokens fit in the cache."""
        if self.position + n > self.kv_cache.max_len:
            raise ValueError(f"{self.position + n} tokens do not fit a KV cache of {self.kv_cache.max_len}")

    def written(self, n):
        """The tokens (B, n) that the last n tokens fed chose; the host's position moves past them."""
        first = self.position + 1
        self.position += n
        return self.ids[:, first:first + n].clone()


class TokenGraph(DecodingPosition):
    """The forward of one new token per row at the device position pos, then argmax, for a model
    and a KVCache already holding the prompt. start() sets where decoding begins; run(n) replays n
    tokens (captured on CUDA, step by step elsewhere) and returns them."""

    def __init__(self, model, kv_cache, batch, num_steps, continuous_compute=False, init_scale=None):
        super().__init__(model, kv_cache, batch)
        self.num_steps, self.continuous_compute, self.init_scale = num_steps, continuous_compute, init_scale
        self.token_forward = Replayed(self, "step", self.pos.device, (self.pos, self.token, self.state))

    def step(self):
        """One token: its logits at num_steps, the argmax fed next and written to ids; pos + 1."""
        model, view, pos = self.model(), self.view, self.pos
        cos, sin = model.rope_cos.index_select(0, pos), model.rope_sin.index_select(0, pos)  # (1, hs/2)
        mask = view.mask()  # (B or 1, 1, 1, max_len)
        e = model.embed(self.token, cos, sin, view, mask)  # (B, 1, h)
        s0 = self.state if self.continuous_compute else None
        s = model.iterate(e, (self.num_steps, 0), cos, sin, view, mask, self.init_scale, s0=s0)
        logits = model.readout(s, cos, sin, view, mask)  # (B, 1, vocab)
        next_id = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        if self.continuous_compute:
            self.state.copy_(s)
        self.token.copy_(next_id)
        pos.add_(1)
        self.ids.index_copy_(1, pos, next_id)

    def run(self, n):
        """Feed n tokens, one after the other; returns the n tokens they chose (B, n)."""
        self.check_room(n)
        for _ in range(n):
            self.token_forward.replay()
        return self.written(n)

    def fed_steps(self, position, n):
        """The steps the n tokens fed from position on used (B, n): num_steps each."""
        return torch.full((self.ids.size(0), n), self.num_steps, dtype=torch.long, device=self.ids.device)


class AdaptiveTokenGraph(DecodingPosition):
    """TokenGraph's decoding, one row, with per-token adaptive exit (generate's criterion): a token
    stops after the first step at which its criterion is met (from min_steps on), at most num_steps.
    Whether to run step i + 1 is the host's decision, so a token is several replays: the embedding
    and prelude; step i (the step on the kernels, the criterion, whether the token has stopped),
    after which the host reads that one flag (a wait for the device); once it has stopped, the
    copies of its last step's keys and values into the steps it did not run (repeat_step: a graph
    per last step); and the readout (coda, head, argmax). Each is captured at its first replay."""

    def __init__(self, model, kv_cache, config, exit_rule):
        super().__init__(model, kv_cache, 1)
        self.num_steps, self.min_steps = config.num_steps, config.min_steps
        self.continuous_compute, self.init_scale = config.continuous_compute, config.init_scale
        device = self.pos.device
        self.step_counts = torch.zeros(1, kv_cache.max_len, dtype=torch.long, device=device)  # of the token at p
        # what the replays of a token hand each other: its angles, mask, e, state and criterion
        self.cos = torch.zeros(1, model.rope_cos.size(-1), dtype=model.rope_cos.dtype, device=device)
        self.sin = torch.zeros_like(self.cos)
        self.mask = torch.zeros_like(self.view.mask())
        self.e = torch.zeros_like(self.state)
        self.s = torch.zeros_like(self.state)
        self.used = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.stopped = torch.zeros(1, 1, dtype=torch.bool, device=device)
        rule = self.exit_rule = exit_rule  # a generate.ExitCriterion of shape (1, 1): its state changes in place
        changed = (self.s, self.used, self.stopped, rule.log_p, rule.top, rule.same_top)
        self.begin = Replayed(self, "embed", device, (self.pos, self.token, self.state))
        self.steps = [Replayed(self, "core_step", device, changed, (i,)) for i in range(self.num_steps)]
        self.repeats = [Replayed(self, "repeat_step", device, args=(i,)) for i in range(self.num_steps - 1)]
        self.finish = Replayed(self, "readout", device, (self.pos, self.token, self.state))

    def embed(self):
        """The token's RoPE angles, mask, prelude output e and s0; the criterion back to step 0."""
        model, view = self.model(), self.view
        self.cos.copy_(model.rope_cos.index_select(0, self.pos))
        self.sin.copy_(model.rope_sin.index_select(0, self.pos))
        self.mask.copy_(view.mask())
        self.e.copy_(model.embed(self.token, self.cos, self.sin, view, self.mask))
        self.s.copy_(self.state if self.continuous_compute else model.initialize_state(self.e, self.init_scale))
        self.used.fill_(self.num_steps)
        self.stopped.zero_()
        self.exit_rule.reset()

    def core_step(self, i):
        """Step i (0-based) and the criterion on it (iterate_adaptive's loop body for one token)."""
        model, view = self.model(), self.view
        s = model.iterate(self.e, (1, 0), self.cos, self.sin, view, self.mask, s0=self.s, first_step=i)
        logits = model.readout(s, self.cos, self.sin, view, self.mask) if self.exit_rule.needs_logits else None
        newly = self.exit_rule.converged(self.s, s, logits) & (i + 1 >= self.min_steps)
        self.used.copy_(torch.where(newly, i + 1, self.used))
        self.stopped |= newly
        self.s.copy_(s)

    def repeat_step(self, last_step):
        """The token stopped after step last_step (0-based): the core entries of the steps it did
        not run get that step's keys and values at its position."""
        self.view.repeat_step(last_step, self.num_steps)

    def readout(self):
        """The logits of the final state, the argmax fed next and written to ids; pos + 1."""
        model, pos = self.model(), self.pos
        logits = model.readout(self.s, self.cos, self.sin, self.view, self.mask)  # (1, 1, vocab)
        next_id = logits[:, -1].argmax(dim=-1, keepdim=True)  # (1, 1)
        if self.continuous_compute:
            self.state.copy_(self.s)
        self.step_counts.index_copy_(1, pos, self.used)
        self.token.copy_(next_id)
        pos.add_(1)
        self.ids.index_copy_(1, pos, next_id)

    def run(self, n):
        """Feed n tokens, one after the other; returns the n tokens they chose (1, n)."""
        self.check_room(n)
        for _ in range(n):
            self.begin.replay()
            for i in range(self.num_steps):
                self.steps[i].replay()
                if i + 1 >= self.min_steps and (i + 1 == self.num_steps or bool(self.stopped)):
                    break  # (bool(): the one wait for the device a step)
            if i + 1 < self.num_steps:
                self.repeats[i].replay()
            self.finish.replay()
        return self.written(n)

    def fed_steps(self, position, n):
        """The steps the n tokens fed from position on used (1, n)."""
        return self.step_counts[:, position:position + n].clone()


class VerifyGraph:
    """The forward of `width` new tokens per row at consecutive device positions, at num_steps
    (self-speculative decoding's verify: the last token and the drafts), writing the argmax of
    every position. run(tokens, position) feeds tokens (B, width) there and returns what each
    position's logits pick (B, width); the cache's seq_len is not moved."""

    def __init__(self, model, kv_cache, batch, num_steps, width, init_scale=None):
        self.model = weakref.ref(model)
        self.kv_cache, self.num_steps, self.width, self.init_scale = kv_cache, num_steps, width, init_scale
        device = model.wte.weight.device
        self.positions = torch.zeros(width, dtype=torch.long, device=device)  # of the tokens fed
        self.tokens = torch.zeros(batch, width, dtype=torch.long, device=device)
        self.chosen = torch.zeros(batch, width, dtype=torch.long, device=device)  # the argmax at each
        self.view = DecodeView(kv_cache, self.positions)
        self.forward = Replayed(self, "step", device, (self.positions, self.tokens))

    def step(self):
        """The width tokens' logits at num_steps; their argmax to chosen. Moves no position."""
        model, view = self.model(), self.view
        cos, sin = model.rope_cos.index_select(0, self.positions), model.rope_sin.index_select(0, self.positions)
        mask = view.mask()  # (B or 1, 1, width, max_len)
        e = model.embed(self.tokens, cos, sin, view, mask)  # (B, width, h)
        s = model.iterate(e, (self.num_steps, 0), cos, sin, view, mask, self.init_scale)
        self.chosen.copy_(model.readout(s, cos, sin, view, mask).argmax(dim=-1))

    def run(self, tokens, position):
        """Feed tokens (B, width) at positions position ..; returns each position's argmax (B, width)."""
        if position + self.width > self.kv_cache.max_len:
            raise ValueError(f"{position + self.width} tokens do not fit a KV cache of {self.kv_cache.max_len}")
        self.tokens.copy_(tokens)
        torch.arange(position, position + self.width, out=self.positions)
        self.forward.replay()
        return self.chosen.clone()
