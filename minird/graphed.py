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

A graph is bound to its buffers (the KV cache, the tokens, the state, the positions), so it is
captured once per (batch, r, cache length bucket, options) and kept by minird.generate for the next
call of the same shape. On the CPU the same static-position step runs uncaptured, token by token:
it is the code the graph replays, and tests/test_graphed.py checks it against the plain loop.
"""

import weakref

import torch

from minird.kv_cache import DecodeView


class CapturedStep:
    """A forward over static buffers (step(), in a subclass), recorded once in a CUDA graph on
    CUDA and replayed; elsewhere step() runs as it is. inputs: the buffers step() reads and
    changes, put back after the warm-up run."""

    def __init__(self, model, kv_cache, num_steps, init_scale):
        self.model = weakref.ref(model)  # minird.generate keeps graphs per model; no cycle keeps it alive
        self.kv_cache = kv_cache
        self.num_steps = num_steps
        self.init_scale = init_scale
        self.graph = None

    def capture(self, inputs):
        """Record step() in a CUDA graph. One warm-up run first, on a side stream (as torch's
        docs ask), so that lazy set-up (cuBLAS handles, kernel attributes) is not recorded; it
        writes at the current positions only, which the first replay rewrites."""
        saved = [t.clone() for t in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step()
        torch.cuda.current_stream().wait_stream(side)
        for t, value in zip(inputs, saved):
            t.copy_(value)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()

    def replay(self):
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()


class TokenGraph(CapturedStep):
    """The forward of one new token per row at the device position pos, then argmax, for a model
    and a KVCache already holding the prompt. start() sets where decoding begins; run(n) replays n
    tokens (captured on CUDA, step by step elsewhere) and returns them."""

    def __init__(self, model, kv_cache, batch, num_steps, continuous_compute=False, init_scale=None):
        super().__init__(model, kv_cache, num_steps, init_scale)
        device, dtype = model.wte.weight.device, model.wte.weight.dtype
        self.continuous_compute = continuous_compute
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # the position of the token fed next
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)  # the token fed next
        self.state = torch.zeros(batch, 1, model.config.n_embd, dtype=dtype, device=device)  # its s0 if continuous
        self.ids = torch.zeros(batch, kv_cache.max_len + 1, dtype=torch.long, device=device)  # ids[:, p]: token at p
        self.view = DecodeView(kv_cache, self.pos)
        self.position = 0  # the host's copy of pos

    def start(self, token, position, state=None):
        """Decode from token (B, 1) at position (the cache holds the positions before it); state
        (B, 1, h): the final state of the token before, which continuous_compute starts from."""
        self.token.copy_(token)
        self.pos.fill_(position)
        self.position = position
        if state is not None:
            self.state.copy_(state)

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
        if self.position + n > self.kv_cache.max_len:
            raise ValueError(f"{self.position + n} tokens do not fit a KV cache of {self.kv_cache.max_len}")
        if self.pos.is_cuda and self.graph is None and n > 0:
            self.capture((self.pos, self.token, self.state))
        for _ in range(n):
            self.replay()
        first = self.position + 1
        self.position += n
        return self.ids[:, first:first + n].clone()


class VerifyGraph(CapturedStep):
    """The forward of `width` new tokens per row at consecutive device positions, at num_steps
    (self-speculative decoding's verify: the last token and the drafts), writing the argmax of
    every position. run(tokens, position) feeds tokens (B, width) there and returns what each
    position's logits pick (B, width); the cache's seq_len is not moved."""

    def __init__(self, model, kv_cache, batch, num_steps, width, init_scale=None):
        super().__init__(model, kv_cache, num_steps, init_scale)
        device = model.wte.weight.device
        self.width = width
        self.positions = torch.zeros(width, dtype=torch.long, device=device)  # of the tokens fed
        self.tokens = torch.zeros(batch, width, dtype=torch.long, device=device)
        self.chosen = torch.zeros(batch, width, dtype=torch.long, device=device)  # the argmax at each
        self.view = DecodeView(kv_cache, self.positions)

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
        if self.positions.is_cuda and self.graph is None:
            self.capture((self.positions, self.tokens))
        self.replay()
        return self.chosen.clone()
