"""
The KV cache of generation: keys and values of past tokens, one entry per (stage, step, layer).

A recurrent-depth model runs its core r times per token, and every (step, core layer) pair sees a
different state, so a plain transformer's one cache entry per layer becomes one per (step, core
layer): the full cache grows with r. A token at step i reads the step-i keys of earlier tokens.
KV-cache sharing ("compress-sN") bounds that by letting N slots serve all of them.
"""

import torch

# cache_lookup_strategy names of the official code that mean what minird's do. Its "full" is not
# among them: under adaptive exit it drops the entries of the steps a token skipped (a later token
# then attends to fewer keys at those steps), where minird's "full" repeats the token's last entry,
# which is the official "latest-m4" (for any R, where "-m4" hard-codes Huginn's R = 4).
OFFICIAL_STRATEGIES = {"latest-m4": "full"}


def parse_lookup_strategy(strategy):
    """cache_lookup_strategy -> the number of shared core slots N, or None for "full". Accepts the
    official names "latest-m4" and "latest-m4-compress-sN" (the same policies); other official
    strategies are refused with what to use instead."""
    name = OFFICIAL_STRATEGIES.get(strategy, strategy)
    if name.startswith("latest-m4-"):
        name = name[len("latest-m4-"):]
    if name == "full":
        return None
    if name.startswith("compress-s") and name[len("compress-s"):].isdigit():
        n = int(name[len("compress-s"):])
        if n >= 1:
            return n
    raise ValueError(f"cache_lookup_strategy must be 'full' (= the official 'latest-m4') or 'compress-sN' "
                     f"(= 'latest-m4-compress-sN') with N >= 1, got {strategy!r}")


def kv_cache_bytes(config, batch, length, num_steps, lookup_strategy="full", dtype=torch.float32):
    """The bytes of the buffers a KVCache of length positions allocates for batch rows of a model
    with config at num_steps: one entry per prelude and coda layer, and R * num_steps core entries
    (full) or at most N (compress-sN); each entry keys and values of (batch, length, h)."""
    slots = parse_lookup_strategy(lookup_strategy)
    core = config.n_layers_in_recurrent_block * num_steps
    entries = config.n_layers_in_prelude + config.n_layers_in_coda + (core if slots is None else min(slots, core))
    return 2 * entries * batch * length * config.n_embd * torch.empty((), dtype=dtype).element_size()


class KVCache:
    """Keys and values of past tokens, one entry per key: ("prelude", j), ("coda", j) and, for the
    recurrent core, ("core", step, j).

    Each entry is a pair of buffers (B, nh, max_len, hs), allocated on first use and written in
    place at positions seq_len, seq_len + 1, ...: appending copies nothing (the fused kernels
    write there directly), and rolling back (speculative decoding) is setting seq_len back: what
    is stored past it -- keys, values, token embeddings, padding -- is rewritten by the next tokens.
    max_len is the work's length (generate: prompt + new tokens), not the model's block_size: at
    Huginn's size the keys and values of one (step, layer) entry of 4,096 positions are 87 MB
    per row in bf16, and r = 32 keeps 128 of them.

    lookup_strategy (the official `cache_lookup_strategy`): "full" keeps one entry per (step, core
    layer); "compress-sN" shares N slots among them, step i / core layer j writing slot
    (i * R + j) mod N. With N = R a token at step i reads, from each earlier token, the keys of
    the last step that token ran (the paper's KV-cache sharing: memory no longer grows with r).
    Under adaptive exit a token that stopped after step i leaves, for the steps it skipped, copies
    of its step-i entries ("latest entry": repeat_step), which is the official "latest-m4".

    The core entries are slots of one tensor `core` (2, slots, B, nh, max_len, hs), allocated
    together at the first core write: a stopped token's copies into the steps it skipped are then
    one gather and one scatter over the slot dimension, instead of two copies per (step, layer)
    (~150 a token at r = 32, each a kernel in a CUDA graph). So the slots are counted up front:
    num_steps (generate: its num_steps, the most steps a token runs) is needed under "full"
    (R * num_steps slots); under "compress-sN" there are N (fewer if R * num_steps is less)."""

    position_on_device = False  # the next token's position is seq_len, a host int (DecodeView: a tensor)

    def __init__(self, max_len, lookup_strategy="full", n_core_layers=1, num_steps=None):
        self.max_len = max_len
        self.num_slots = parse_lookup_strategy(lookup_strategy)
        self.n_core_layers = n_core_layers
        self.num_steps = num_steps
        pairs = None if num_steps is None else n_core_layers * num_steps
        self.n_core_slots = pairs if self.num_slots is None else min(self.num_slots, pairs or self.num_slots)
        self.entries = {}
        self.core = None  # (2, n_core_slots, B, nh, max_len, hs): every core entry's keys and values
        self.indices = {}  # slot numbers as device index tensors, made once (see slot_index)
        self.repeat_plans = {}  # (last_step, num_steps) -> what repeat_step writes (see repeat_plan)
        self.slot_keys = {}  # ("core", step, j) -> the key of its entry, as slot() found it
        self.seq_len = 0  # tokens stored so far; sets the RoPE position of the next token
        self.embeddings = None  # (B, max_len, h) token embeddings, for token_shift
        self.tokens = None  # (B, max_len) bool, False at left padding; None while there is none

    def core_slot(self, step, j):
        """The slot of core that step / core layer j store their keys and values in."""
        if self.num_steps is not None and step >= self.num_steps:
            raise ValueError(f"core step {step} is past this KV cache's num_steps = {self.num_steps}")
        if self.n_core_slots is None:
            raise ValueError("a 'full' KVCache needs num_steps (the most steps a token runs) to hold core "
                             "entries: KVCache(max_len, 'full', n_core_layers, num_steps)")
        return (step * self.n_core_layers + j) % self.n_core_slots

    def slot(self, key):
        """The key of the entry that key is stored in: itself, or its shared core slot under compress-sN."""
        if key[0] != "core":
            return key
        stored_in = self.slot_keys.get(key)  # (kept: under compress-sN the kernels ask R * r a launch)
        if stored_in is None:
            i = self.core_slot(*key[1:])  # (an error past num_steps, or without it under full)
            stored_in = self.slot_keys[key] = key if self.num_slots is None else ("core", i)
        return stored_in

    def buffers(self, key, batch, n_head, head_dim, dtype, device):
        """The (k, v) buffers (B, nh, max_len, hs) of key's entry, allocated (zeros) on first use."""
        stored = self.entries.get(key)  # (first: the kernels ask for R * r entries every launch)
        if stored is not None:
            return stored
        key = self.slot(key)
        stored = self.entries.get(key)
        if stored is None:
            shape = (batch, n_head, self.max_len, head_dim)
            if key[0] == "core":
                self.core = torch.zeros((2, self.n_core_slots, *shape), dtype=dtype, device=device)
                if self.num_slots is None:  # slot step * R + j
                    keys = [("core", step, j) for step in range(self.num_steps) for j in range(self.n_core_layers)]
                else:
                    keys = [("core", i) for i in range(self.n_core_slots)]
                for i, core_key in enumerate(keys):
                    self.entries[core_key] = (self.core[0, i], self.core[1, i])
            else:
                self.entries[key] = (torch.zeros(shape, dtype=dtype, device=device),
                                     torch.zeros(shape, dtype=dtype, device=device))
            stored = self.entries[key]
        return stored

    def slot_index(self, slots):
        """slots (a tuple of slot numbers) as an index tensor on core's device, made once: a CUDA
        graph cannot record the copy from the host that makes it (its warm-up run makes it)."""
        if slots not in self.indices:
            self.indices[slots] = torch.tensor(slots, dtype=torch.long, device=self.core.device)
        return self.indices[slots]

    def check_room(self, n_new):
        """ValueError unless n_new more tokens fit in max_len."""
        if self.seq_len + n_new > self.max_len:
            raise ValueError(f"{self.seq_len + n_new} tokens do not fit a KV cache of {self.max_len}")

    def update(self, key, k, v):
        """Write k, v (B, nh, T, hs) at positions seq_len .. seq_len + T - 1 of key's entry; return
        its keys and values of positions 0 .. seq_len + T - 1."""
        B, nh, T, hs = k.shape
        k_buf, v_buf = self.buffers(key, B, nh, hs, k.dtype, k.device)
        end = self.seq_len + T
        k_buf[:, :, self.seq_len:end] = k
        v_buf[:, :, self.seq_len:end] = v
        return k_buf[:, :, :end], v_buf[:, :, :end]

    def core_entries(self, step, n_new, rows=None):
        """Copies of the core keys and values that the n_new tokens being added wrote at step, in
        rows ((B,) bool; None: every row): (2, R, rows, nh, n_new, hs), core layer by core layer."""
        slots = self.slot_index(tuple(self.core_slot(step, j) for j in range(self.n_core_layers)))
        entries = self.core[:, slots, :, :, self.seq_len:self.seq_len + n_new]  # (indexing copies)
        return entries if rows is None else entries[:, :, rows]

    def repeat_plan(self, last_step, num_steps):
        """What repeat_step writes, as index tensors, worked out once per (last_step, num_steps):
        (the slots that steps last_step .. num_steps - 1 write, once each; the core layer whose
        last_step entry ends up in each; the slot that entry is in). Under compress-sN steps share
        slots, and the layer is the last one written there in step-after-step order (the scatter
        of repeat_step writes each slot once)."""
        if (last_step, num_steps) not in self.repeat_plans:
            latest = {}  # slot -> layer
            for step in range(last_step, num_steps):
                for j in range(self.n_core_layers):
                    latest[self.core_slot(step, j)] = j
            sources = tuple(self.core_slot(last_step, j) for j in latest.values())
            self.repeat_plans[last_step, num_steps] = (self.slot_index(tuple(latest)),
                                                       self.slot_index(tuple(latest.values())),
                                                       self.slot_index(sources))
        return self.repeat_plans[last_step, num_steps]

    def repeat_step(self, last_step, num_steps, n_new, rows=None, entries=None):
        """The n_new tokens being added, in rows ((B,) bool), all stopped after last_step (adaptive
        exit): the core entries of the steps they did not run get their last_step keys and values
        ("latest entry"), for later tokens to read at those steps. entries: those keys and values,
        copied by core_entries when the rows stopped (other rows' later steps may have written over
        them since). rows None: every row stopped at last_step and no step ran after it, so they
        are read from the cache. last_step's own slot is written too: under compress-sN a later
        step may share it."""
        new = slice(self.seq_len, self.seq_len + n_new)
        targets, layers, sources = self.repeat_plan(last_step, num_steps)
        if rows is None:  # one gather of the sources (a copy: a slot both read and written is safe)
            self.core[:, targets, :, :, new] = self.core[:, sources, :, :, new]
        else:
            self.core[:, targets[:, None], rows.nonzero()[:, 0], :, new] = entries[:, layers]

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
        """Bytes of the keys and values held for the seq_len tokens stored."""
        return sum(k[:, :, :self.seq_len].nbytes + v[:, :, :self.seq_len].nbytes for k, v in self.entries.values())

    def allocated_bytes(self):
        """Bytes of the key and value buffers allocated (up to max_len)."""
        return sum(k.nbytes + v.nbytes for k, v in self.entries.values())

    def reset(self):
        """Empty the cache for a new sequence, keeping its buffers (a captured CUDA graph holds
        their addresses): seq_len 0 and no padding; stored values are rewritten before they are read."""
        self.seq_len = 0
        if self.tokens is not None:
            self.tokens.fill_(True)


class DecodeView:
    """A KVCache seen by new tokens whose positions are a device tensor instead of the host int
    seq_len: writes go to those positions (index_copy_), attention reads all max_len positions
    under mask() (those up to each token's own, without padding). Every shape and kernel argument
    is then the same at every position, so the forward can be captured once in a CUDA graph and
    replayed at each (minird.graphed: one decoding token, or the verify of drafted tokens). The
    cache's own seq_len is not moved."""

    position_on_device = True

    def __init__(self, cache, positions):
        self.cache = cache
        self.positions = positions  # (T,) int64 on the cache's device: the new tokens', consecutive
        self.key_positions = torch.arange(cache.max_len, device=positions.device)

    def buffers(self, key, batch, n_head, head_dim, dtype, device):
        return self.cache.buffers(key, batch, n_head, head_dim, dtype, device)

    def update(self, key, k, v):
        """Write k, v (B, nh, T, hs) at the new tokens' positions of key's entry; return its whole
        buffers (B, nh, max_len, hs), which mask() restricts to the keys each token sees."""
        B, nh, _, hs = k.shape
        k_buf, v_buf = self.buffers(key, B, nh, hs, k.dtype, k.device)
        k_buf.index_copy_(2, self.positions, k)
        v_buf.index_copy_(2, self.positions, v)
        return k_buf, v_buf

    def shift_in(self, x):
        """KVCache.shift_in at positions >= 1 (decoding always follows a prompt)."""
        self.cache.embeddings.index_copy_(1, self.positions, x)
        return self.cache.embeddings.index_select(1, self.positions[:1] - 1)

    def repeat_step(self, last_step, num_steps):
        """KVCache.repeat_step for the new tokens of every row, at their device positions: the
        core entries of steps last_step .. num_steps - 1 get last_step's keys and values there."""
        core = self.cache.core
        targets, _, sources = self.cache.repeat_plan(last_step, num_steps)
        at = self.positions[None, :]  # with the slots: (slots, T, 2, B, nh, hs) of core's entries
        core[:, targets[:, None], :, :, at] = core[:, sources[:, None], :, :, at]

    def mask(self):
        """(B or 1, 1, T, max_len) bool: the keys each new token attends to (causal: up to its own
        position), without the prompt's padding."""
        keys = self.key_positions <= self.positions[:, None]  # (T, max_len)
        keys = keys[None] if self.cache.tokens is None else keys & self.cache.tokens[:, None, :]
        return keys[:, None]
