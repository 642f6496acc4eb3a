"""Generation: the KV cache (full and shared), adaptive exit, continuous compute, self-speculative
decoding, left-padded batches, and generate's checks of its options."""

import pytest
import torch

from helpers import make_model
from minird import ops
from minird.generate import GenerationConfig, feed, generate, left_pad
from minird.kv_cache import DecodeView, KVCache, kv_cache_bytes


def ids_and_steps(*args, **kwargs):
    out = generate(*args, **kwargs)
    return out.ids, out.steps


def ids_steps_stats(*args, **kwargs):
    out = generate(*args, **kwargs)
    return out.ids, out.steps, out.stats


def test_kv_cache_matches_full_forward(tiny_config):
    c = tiny_config
    model = make_model(c).eval()
    idx = torch.randint(0, c.vocab_size, (2, 14))
    r = 3
    with torch.no_grad():
        full, _ = model(idx, num_steps=r, init_scale=0)
        cache = KVCache(idx.size(1), n_core_layers=c.n_layers_in_recurrent_block, num_steps=r)
        s0 = torch.zeros(2, 6, c.n_embd)
        chunks = [feed(model, idx[:, :6], cache, r, s0=s0)[0]]  # the prompt at once
        for t in range(6, idx.size(1)):  # then one token at a time
            chunks.append(feed(model, idx[:, t:t + 1], cache, r, s0=s0[:, :1])[0])
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)
    # one cache entry per prelude layer, per (step, core layer) and per coda layer
    assert len(cache.entries) == c.n_layers_in_prelude + r * c.n_layers_in_recurrent_block + c.n_layers_in_coda
    assert cache.seq_len == idx.size(1)


def test_generate_matches_greedy_full_forward(tiny_config):
    tiny_config.init_scale = 0.0
    model = make_model(tiny_config).eval()
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 5))
    out = generate(model, prompt, max_new_tokens=10, num_steps=4).ids
    expected = prompt
    with torch.no_grad():
        for _ in range(10):  # no cache: rerun the whole sequence for every new token
            logits, _ = model(expected, num_steps=4)
            expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


def test_kv_cache_sharing(tiny_config):
    """compress-sN: step i / core layer j use slot (i * R + j) mod N. With N >= R * num_steps every
    pair keeps its own slot (= full); with N = R the cache holds one step's worth of core entries,
    and a new token reads, at every step, the keys of the last step the earlier tokens ran."""
    c = tiny_config
    c.init_scale = 0.0
    model = make_model(c).eval()
    R, r, T = c.n_layers_in_recurrent_block, 4, 6
    prompt = torch.randint(0, c.vocab_size, (2, T))
    full = generate(model, prompt, 6, num_steps=r).ids
    assert torch.equal(generate(model, prompt, 6, num_steps=r, cache_lookup_strategy=f"compress-s{R * r}").ids, full)

    caches = {}
    with torch.no_grad():
        for strategy in ("full", f"compress-s{R}", f"compress-s{2 * R}"):
            caches[strategy] = KVCache(T + 1, strategy, R, r)
            feed(model, prompt, caches[strategy], r)
    outside = c.n_layers_in_prelude + c.n_layers_in_coda
    for strategy, core_entries in (("full", r * R), (f"compress-s{R}", R), (f"compress-s{2 * R}", 2 * R)):
        assert len(caches[strategy].entries) == outside + core_entries
        assert caches[strategy].nbytes() * (outside + r * R) == caches["full"].nbytes() * (outside + core_entries)

    # the next token on compress-sR == on a full cache whose core entries all hold the last step's keys
    next_id = torch.randint(0, c.vocab_size, (2, 1))
    full_cache = caches["full"]
    for step in range(r - 1):
        for j in range(R):
            for t, last in zip(full_cache.entries[("core", step, j)], full_cache.entries[("core", r - 1, j)]):
                t.copy_(last)
    with torch.no_grad():
        shared, _, _ = feed(model, next_id, caches[f"compress-s{R}"], r)
        expected, _, _ = feed(model, next_id, full_cache, r)
    torch.testing.assert_close(shared, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("strategy,R,num_steps", [("full", 2, 5), ("full", 3, 7), ("compress-s2", 2, None),
                                                   ("compress-s3", 4, 5), ("compress-s9", 1, 5)])
@pytest.mark.parametrize("how", ["every row", "some rows", "device position"])
def test_repeat_step_is_the_skipped_steps_run_on_the_last_entries(strategy, R, num_steps, how):
    """A token that stopped after step 1 of 5 leaves, in every slot that steps 1 .. 4 write, what
    those steps would have left had each (step, layer), in order, stored its layer's step-1 keys
    and values: at the token's position and in its rows only; at a host position (from copies
    taken when the rows stopped, or from the cache) and at a device position. Also for a cache of
    more steps than the token's 5, and for more shared slots than the steps use."""
    torch.manual_seed(0)
    S, last, B, pos = 5, 1, 3, 4
    cache = KVCache(6, strategy, R, num_steps)
    for step in range(S):
        for j in range(R):
            for t in cache.buffers(("core", step, j), B, 2, 4, torch.float32, "cpu"):
                t.copy_(torch.randn_like(t))
    expected = {key: tuple(t.clone() for t in kv) for key, kv in cache.entries.items()}
    rows = torch.tensor([True, False, True]) if how == "some rows" else None
    which = torch.ones(B, dtype=torch.bool) if rows is None else rows
    last_entries = [[t[:, :, pos:pos + 1].clone() for t in cache.entries[cache.slot(("core", last, j))]]
                    for j in range(R)]
    for step in range(last, S):
        for j in range(R):
            for t, entry in zip(expected[cache.slot(("core", step, j))], last_entries[j]):
                t[which, :, pos:pos + 1] = entry[which]
    if how == "device position":
        DecodeView(cache, torch.tensor([pos])).repeat_step(last, S)
    else:
        cache.seq_len = pos
        entries = None if rows is None else cache.core_entries(last, 1, rows)  # as iterate_adaptive passes them
        cache.repeat_step(last, S, 1, rows, entries)
    assert cache.entries.keys() == expected.keys()
    assert all(torch.equal(cache.entries[key][i], expected[key][i]) for key in expected for i in (0, 1))


def test_kv_cache_holds_the_steps_it_was_made_for(tiny_config):
    """The core entries are allocated together, so their steps are counted up front: a full cache
    without num_steps holds no core entry, and no cache holds a step past its num_steps (a clear
    error, not an index out of range deep inside)."""
    model = make_model(tiny_config).eval()
    prompt = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="a 'full' KVCache needs num_steps"):
        feed(model, prompt, KVCache(4, "full", tiny_config.n_layers_in_recurrent_block), 2)
    for strategy in ("full", "compress-s2"):
        with pytest.raises(ValueError, match="core step 2 is past this KV cache's num_steps = 2"):
            feed(model, prompt, KVCache(4, strategy, tiny_config.n_layers_in_recurrent_block, num_steps=2), 3)
    assert KVCache(4).buffers(("prelude", 0), 1, 2, 4, torch.float32, "cpu")[0].shape == (1, 2, 4, 4)


@pytest.mark.parametrize("strategy", ["compress-s0", "compress-4", "compress-s", "skip", "always-last-m4",
                                      "latest-m4-compress-s0", "full-compress-s2"])
def test_kv_cache_bad_strategy(tiny_config, strategy):
    model = make_model(tiny_config).eval()
    with pytest.raises(ValueError, match="cache_lookup_strategy must be 'full' .* or 'compress-sN'"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 2, cache_lookup_strategy=strategy)


@pytest.mark.parametrize("official, ours", [("latest-m4", "full"), ("latest-m4-compress-s2", "compress-s2")])
def test_official_strategy_names_mean_ours(tiny_config, official, ours):
    """The names a user pastes from the official code: the same policy, so the same tokens and steps."""
    tiny_config.init_scale = 0.0
    model = make_model(tiny_config).eval()
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 5))
    theirs = generate(model, prompt, 6, num_steps=5, criterion="kl", cache_lookup_strategy=official)
    mine = generate(model, prompt, 6, num_steps=5, criterion="kl", cache_lookup_strategy=ours)
    assert torch.equal(theirs.ids, mine.ids) and torch.equal(theirs.steps, mine.steps)


def test_generated_ids_can_be_trained_on(tiny_config):
    """generate runs under inference_mode, but hands back ordinary tensors: a generated batch is a
    valid training batch (inference tensors may not be saved for a backward)."""
    model = make_model(tiny_config)
    out = generate(model, torch.randint(0, tiny_config.vocab_size, (2, 5)), 4, num_steps=2)
    assert not out.ids.is_inference() and not out.steps.is_inference()
    _, loss = model(out.ids[:, :-1], out.ids[:, 1:], num_steps=2)
    loss.backward()
    assert model.wte.weight.grad is not None and model.wte.weight.grad.abs().sum() > 0


def test_kv_cache_is_sized_to_the_work(tiny_config):
    """generate allocates prompt + new tokens positions, not block_size, and reports the bytes."""
    tiny_config.init_scale = 0.0
    model = make_model(tiny_config).eval()
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 5))
    for strategy in ("full", "compress-s2"):
        out = generate(model, prompt, 4, num_steps=3, cache_lookup_strategy=strategy)
        assert out.kv_cache_bytes == kv_cache_bytes(tiny_config, 2, 5 + 4, 3, strategy) > 0
    assert kv_cache_bytes(tiny_config, 2, 9, 3) < kv_cache_bytes(tiny_config, 2, tiny_config.block_size, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tiny_config):
    tiny_config.init_scale = 0.0
    model = make_model(tiny_config).eval()
    idx = torch.randint(0, tiny_config.vocab_size, (2, 16))
    with torch.no_grad():
        cpu_logits, _ = model(idx, num_steps=4)
        cuda_logits, _ = model.cuda()(idx.cuda(), num_steps=4)
    torch.testing.assert_close(cuda_logits.cpu(), cpu_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(generate(model, idx[:, :4].cuda(), 8, num_steps=4).ids.cpu(),
                       generate(model.cpu(), idx[:, :4], 8, num_steps=4).ids)


@pytest.mark.parametrize("criterion", ["kl", "latent-diff", "entropy-diff", "argmax-stability", "cosine"])
def test_adaptive_exit_never_met_is_fixed_steps(tiny_config, criterion):
    tiny_config.init_scale = 0.0
    model = make_model(tiny_config).eval()
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 6))
    never = 99 if criterion == "argmax-stability" else 0  # a count of steps / a distance below 0
    out, steps = ids_and_steps(model, prompt, 5, num_steps=4, criterion=criterion, exit_threshold=never)
    assert torch.equal(out, generate(model, prompt, 5, num_steps=4).ids)
    assert steps.shape == (2, 6 + 5 - 1) and (steps == 4).all()


@pytest.mark.parametrize("criterion", ["kl", "latent-diff", "entropy-diff", "argmax-stability", "cosine"])
def test_adaptive_exit_per_token(tiny_config, criterion):
    tiny_config.init_scale = 0.0
    model = make_model(tiny_config).eval()
    prompts = torch.randint(0, tiny_config.vocab_size, (3, 6))
    always = 0 if criterion == "argmax-stability" else 1e9  # met at the first step it may be
    out, steps = ids_and_steps(model, prompts, 4, num_steps=6, criterion=criterion, exit_threshold=always,
                                min_steps=2)
    assert (steps == 2).all()  # the floor holds, and every token stopped there
    # with the default thresholds: within [min_steps, cap], and each row as if it were alone
    out, steps = ids_and_steps(model, prompts, 4, num_steps=6, criterion=criterion, min_steps=2)
    assert ((2 <= steps) & (steps <= 6)).all()
    for b in range(3):
        alone, alone_steps = ids_and_steps(model, prompts[b:b + 1], 4, num_steps=6, criterion=criterion, min_steps=2)
        assert torch.equal(alone, out[b:b + 1]) and torch.equal(alone_steps, steps[b:b + 1])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("criterion,threshold", [("kl", "auto"), ("latent-diff", 0.1)])
def test_adaptive_exit_runs_on_the_kernels(tiny_config, device, criterion, threshold):
    """With the kernels on, adaptive exit runs each step on them (one C++ call a step; one token of
    one row on CUDA: one decode_steps launch), never the reference core_step, and gives the
    reference path's tokens and steps (fp32): a batch whose prompt goes in at once, one row, a full
    and a shared cache. On this model these criteria stop tokens at different steps, and every
    quantity they compare is at least 0.4% away from its threshold, so the kernels' rounding (~1e-6)
    cannot move a stop; entropy-diff (a difference of two near-equal entropies) moved one on a
    16-core CPU."""
    if not ops.kernels_available(device):
        pytest.skip(f"minird._C has no {device} kernels")
    tiny_config.init_scale = 0.0
    reference = make_model(tiny_config).eval().to(device)
    fused = make_model(tiny_config, use_kernels=True).eval().to(device)

    def reference_step(*args):
        raise AssertionError("adaptive exit ran the reference core_step with the kernels on")

    fused.core_step = reference_step
    torch.manual_seed(1)
    prompts = torch.randint(0, tiny_config.vocab_size, (2, 6), device=device)
    for rows in (prompts, prompts[:1]):
        for strategy in ("full", "compress-s2"):
            kwargs = dict(num_steps=8, criterion=criterion, exit_threshold=threshold, min_steps=2,
                          cache_lookup_strategy=strategy)
            want = generate(reference, rows, 6, **kwargs)
            got = generate(fused, rows, 6, **kwargs)
            assert torch.equal(got.ids, want.ids) and torch.equal(got.steps, want.steps)
            assert (want.steps > 2).any() and (want.steps < 8).any()  # tokens stopped at different steps


def test_adaptive_exit_bad_criterion(tiny_config):
    model = make_model(tiny_config).eval()
    with pytest.raises(ValueError, match="criterion must be one of"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 2, criterion="entropy")


def test_continuous_compute_changes_s0_and_nothing_else(tiny_config):
    tiny_config.init_scale = 0.0
    model = make_model(tiny_config).eval()
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 5))
    calls = []  # (step, state in, state out) of every core step
    core_step = model.core_step

    def recording_core_step(s, e, cos, sin, step, *args):
        out = core_step(s, e, cos, sin, step, *args)
        calls.append((step, s, out))
        return out

    model.core_step = recording_core_step
    plain = generate(model, prompt, 4, num_steps=3).ids
    plain_starts = [s for step, s, _ in calls if step == 0]
    calls.clear()
    cont = generate(model, prompt, 4, num_steps=3, continuous_compute=True).ids
    starts = [s for step, s, _ in calls if step == 0]
    finals = [out for step, _, out in calls if step == 2]
    assert len(starts) == len(plain_starts) == 4  # the prompt, then 3 generated tokens fed back
    assert all((s == 0).all() for s in plain_starts) and (starts[0] == 0).all()  # the prompt starts fresh
    for start, previous_final in zip(starts[1:], finals):  # each token starts where the last one ended
        assert torch.equal(start, previous_final[:, -1:])
    assert torch.equal(cont[:, :6], plain[:, :6])  # the first new token comes from the prompt: unchanged


# -----------------------------------------------------------------------------
# self-speculative decoding and padded batches (the kernels, where built, run the same tests)

# (device, use_kernels): the pure-PyTorch path, the CPU kernels, and on a GPU the CUDA kernels
BACKENDS = [("cpu", False), ("cpu", True),
            pytest.param("cuda", True, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device,use_kernels", BACKENDS)
def test_speculative_decoding_is_plain_greedy(tiny_config, device, use_kernels):
    """Drafted at few steps, verified in one forward at num_steps, rolled back: the tokens (and the
    steps of the tokens fed) are plain greedy decoding's, token for token, for any draft depth and
    lookahead, in a batch or alone, up to block_size and with a stop token."""
    tiny_config.init_scale = 0.0
    model = make_model(tiny_config, use_kernels=use_kernels).eval().to(device)
    r = 4
    torch.manual_seed(1)
    kept = []
    for prompt in (torch.randint(0, tiny_config.vocab_size, (3, 5), device=device),
                   torch.randint(0, tiny_config.vocab_size, (1, 9), device=device)):
        plain, plain_steps = ids_and_steps(model, prompt, 12, num_steps=r)
        for draft_steps in (1, 3, r):
            for lookahead in (1, 3, 8):
                out, steps, stats = ids_steps_stats(model, prompt, 12, num_steps=r, draft_steps=draft_steps,
                                                   lookahead_for_draft=lookahead)
                assert torch.equal(out, plain) and torch.equal(steps, plain_steps)
                assert 0 <= stats.accepted <= stats.drafted <= lookahead * stats.rounds
                # the prompt, then per round the drafted tokens and one verify: 1 + drafted + verifies
                assert stats.forwards == 1 + stats.drafted + (12 - 1 - stats.accepted)
                kept.append((stats.accepted, stats.drafted))
                if draft_steps == r:  # the draft is the verifier: everything is kept
                    assert stats.accepted == stats.drafted > 0
    assert any(0 < a < d for a, d in kept)  # some rounds were rolled back part of the way
    # to the end of the context, and stopping where plain decoding stops
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 5), device=device)
    plain = generate(model, prompt, 100, num_steps=r).ids
    assert plain.size(1) == tiny_config.block_size
    assert torch.equal(generate(model, prompt, 100, num_steps=r, draft_steps=2, lookahead_for_draft=5).ids, plain)
    stop = int(plain[0, 9])
    stopped = generate(model, prompt, 100, num_steps=r, stop_tokens=stop).ids
    assert torch.equal(generate(model, prompt, 100, num_steps=r, stop_tokens=stop, draft_steps=r,
                                lookahead_for_draft=6).ids,
                       stopped)


@pytest.mark.parametrize("device,use_kernels", BACKENDS)
@pytest.mark.parametrize("criterion", ["none", "kl", "latent-diff"])
def test_padded_batch_is_one_prompt_at_a_time(tiny_config, device, use_kernels, criterion):
    """Prompts of different lengths, padded on the left, in one batch: every row's tokens, and the
    steps its tokens used with adaptive exit, are those of the prompt alone; padding used 0 steps."""
    tiny_config.init_scale = 0.0
    model = make_model(tiny_config, use_kernels=use_kernels).eval().to(device)
    torch.manual_seed(2)
    prompts = [torch.randint(0, tiny_config.vocab_size, (n,)).tolist() for n in (3, 8, 1, 5)]
    idx, attention_mask = (t.to(device) for t in left_pad(prompts, pad_id=7))
    assert idx.shape == attention_mask.shape == (4, 8)
    out, steps = ids_and_steps(model, idx, 8, num_steps=6, criterion=criterion, attention_mask=attention_mask)
    assert out.shape == (4, 8 + 8) and torch.equal(out[:, :8], idx)
    for b, prompt in enumerate(prompts):
        alone, alone_steps = ids_and_steps(model, torch.tensor([prompt], device=device), 8, num_steps=6,
                                            criterion=criterion)
        pad = 8 - len(prompt)
        assert torch.equal(out[b, pad:], alone[0]) and torch.equal(steps[b, pad:], alone_steps[0])
        assert (steps[b, :pad] == 0).all()
    # the pad id is never looked at
    other_pad = generate(model, left_pad(prompts, pad_id=3)[0].to(device), 8, num_steps=6, criterion=criterion,
                               attention_mask=attention_mask).ids
    assert torch.equal(other_pad[:, 8:], out[:, 8:])


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(draft_steps=0), "draft_steps must be an integer from 1 to num_steps = 4"),
    (dict(draft_steps=5), "draft_steps must be an integer from 1 to num_steps = 4"),
    (dict(draft_steps=2.0), "draft_steps must be an integer"),
    (dict(draft_steps=2, lookahead_for_draft=0), "lookahead_for_draft must be an integer >= 1"),
    (dict(draft_steps=2, temperature=0.8), "draft_steps needs temperature=0"),
    (dict(draft_steps=2, criterion="kl"), "draft_steps needs criterion='none'"),
    (dict(draft_steps=2, continuous_compute=True), "draft_steps does not go with continuous_compute"),
    (dict(draft_steps=2, cache_lookup_strategy="compress-s2"), "draft_steps needs cache_lookup_strategy='full'"),
    (dict(attention_mask=torch.tensor([[1, 1, 0, 1]] * 2)), "pad on the left"),
    (dict(attention_mask=torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])), "pad on the left"),
    (dict(attention_mask=torch.ones(2, 3)), "attention_mask must have idx's shape"),
    (dict(criterion="kl", min_steps=5), "min_steps must be an integer from 1 to num_steps = 4"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_k=0), "top_k must be None or an integer >= 1"),
    (dict(stop_tokens=[99]), "stop_tokens must be token ids below vocab_size"),
    (dict(exit_threshold=-0.5), "exit_threshold must be 'auto' or a number >= 0"),
    (dict(criterion="entropy"), "criterion must be one of"),
])
def test_generate_bad_options(tiny_config, kwargs, fragment):
    model = make_model(tiny_config).eval()
    with pytest.raises(ValueError) as err:
        generate(model, torch.zeros(2, 4, dtype=torch.long), 3, num_steps=4, **kwargs)
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("num_steps", [0, -3, 2.5])
def test_generate_bad_num_steps(tiny_config, num_steps):
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        generate(make_model(tiny_config).eval(), torch.zeros(1, 4, dtype=torch.long), 3, num_steps=num_steps)


def test_generation_config_and_keywords(tiny_config):
    """Options come as a GenerationConfig, as keywords, or both (keywords win); one return type."""
    tiny_config.init_scale = 0.0
    model = make_model(tiny_config).eval()
    prompt = torch.randint(0, tiny_config.vocab_size, (1, 5))
    config = GenerationConfig(num_steps=3, criterion="kl")
    a = generate(model, prompt, 4, config)
    b = generate(model, prompt, 4, num_steps=3, criterion="kl")
    c = generate(model, prompt, 4, config, criterion="none")
    assert torch.equal(a.ids, b.ids) and torch.equal(a.steps, b.steps)
    assert (c.steps == 3).all() and a.stats.forwards == b.stats.forwards == 4


def test_stop_tokens_end_every_row(tiny_config):
    """Several stop ids: generation ends once every row has written one of them."""
    tiny_config.init_scale = 0.0
    model = make_model(tiny_config).eval()
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 5))
    plain = generate(model, prompt, 20, num_steps=3).ids
    stops = (int(plain[0, 7]), int(plain[1, 8]))
    out = generate(model, prompt, 20, num_steps=3, stop_tokens=stops).ids
    ends = [min(i for i in range(5, plain.size(1)) if int(plain[b, i]) in stops) for b in (0, 1)]
    assert torch.equal(out, plain[:, :max(ends) + 1])


def test_init_scale_option_is_the_models_setting(tiny_config):
    """GenerationConfig.init_scale (the official generate's argument) does what the model's
    init_scale does: 0 gives the deterministic run of a model configured with s0 = 0."""
    model = make_model(tiny_config).eval()  # tiny_config: init_scale 1, a random s0 per token
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 5))
    zero = generate(model, prompt, 6, num_steps=3, criterion="kl", init_scale=0.0)
    tiny_config.init_scale = 0.0
    assert torch.equal(zero.ids, generate(model, prompt, 6, num_steps=3, criterion="kl").ids)
    with pytest.raises(ValueError, match="init_scale must be None or a number >= 0"):
        generate(model, prompt, 2, init_scale=-1.0)


# -----------------------------------------------------------------------------
# diffusion forcing


def state_blind(model):
    """The model with the adapter's state half zeroed: every step then computes the same function
    of the injected input, so a state has settled after its first step and diffusion forcing must
    write plain greedy decoding's tokens (each token frozen once its position was seen twice)."""
    with torch.no_grad():
        model.adapter.weight[:, :model.config.n_embd] = 0
    return model


@pytest.mark.parametrize("device,use_kernels", BACKENDS)
@pytest.mark.parametrize("options", [dict(), dict(max_wavefront=2, inner_recurrence=1),
                                     dict(cache_lookup_strategy="compress-s2", state_noise_mixing=0.0)],
                         ids=["defaults", "narrow wave", "compress-s2"])
def test_diffusion_forcing_on_settled_states_is_greedy(tiny_config, device, use_kernels, options):
    """With states that settle at once, the wave's rounds, cache roll-backs and freezing give the
    greedy tokens, to the end of the context (ema_embeds=0: the official mix scales a new position's
    input by 1 - ema_embeds, which a state-blind model would see; headway 1: the random tokens of a
    longer headway are frozen where a later guess happens to repeat one, 1 in 16 in this vocabulary)."""
    model = state_blind(make_model(tiny_config, use_kernels=use_kernels)).eval().to(device)
    torch.manual_seed(5)
    prompt = torch.randint(0, tiny_config.vocab_size, (1, 5), device=device)
    for new_tokens in (1, 12, 100):
        greedy = generate(model, prompt, new_tokens, num_steps=4, init_scale=0.0).ids
        out = generate(model, prompt, new_tokens, num_steps=4, diffusion_forcing=True, ema_embeds=0.0, **options)
        assert torch.equal(out.ids, greedy)
        assert out.steps.shape == (1, out.ids.size(1) - 1) and (out.steps[0, :5] == 4).all()
        assert (out.stats.forwards > 1) == (new_tokens > 1)  # the first token comes from the prompt's forward


def test_diffusion_forcing_runs_its_rounds(tiny_config):
    """On a model whose states move: a round per forward, every new position after the first at
    least one round of inner_recurrence steps, stop tokens end it, the same seed the same tokens."""
    model = make_model(tiny_config).eval()
    prompt = torch.randint(0, tiny_config.vocab_size, (1, 5))
    torch.manual_seed(6)
    out = generate(model, prompt, 10, num_steps=4, diffusion_forcing=True, inner_recurrence=2)
    torch.manual_seed(6)
    assert torch.equal(generate(model, prompt, 10, num_steps=4, diffusion_forcing=True, inner_recurrence=2).ids,
                       out.ids)
    assert out.ids.shape == (1, 15) and torch.equal(out.ids[:, :5], prompt)
    assert (out.steps[0, 6:] >= 2).all() and (out.steps[0, 6:] % 2 == 0).all()
    stop = int(out.ids[0, 8])
    torch.manual_seed(6)
    wide = generate(model, prompt, 10, num_steps=4, diffusion_forcing=True, headway=3, max_wavefront=5)
    assert wide.ids.shape == (1, 15) and torch.equal(wide.ids[:, :5], prompt)
    torch.manual_seed(6)
    stopped = generate(model, prompt, 10, num_steps=4, diffusion_forcing=True, inner_recurrence=2, stop_tokens=stop)
    first = 5 + out.ids[0, 5:].tolist().index(stop)
    assert torch.equal(stopped.ids, out.ids[:, :first + 1])
    # rounds deeper than the prompt's steps: the cache holds those steps too
    deep = generate(model, prompt, 4, num_steps=2, diffusion_forcing=True, inner_recurrence=6)
    assert deep.ids.shape == (1, 9) and (deep.steps[0, 6:] % 6 == 0).all()


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(inner_recurrence=0), "inner_recurrence must be an integer >= 1"),
    (dict(max_wavefront=1.5), "max_wavefront must be an integer >= 1"),
    (dict(ema_embeds=2.0), "ema_embeds must be a number from 0 to 1"),
    (dict(freeze_threshold=-1), "freeze_threshold must be a number >= 0"),
    (dict(temperature=0.5), "diffusion_forcing is greedy"),
    (dict(draft_steps=2), "diffusion_forcing is greedy"),
])
def test_diffusion_forcing_bad_options(tiny_config, kwargs, fragment):
    model = make_model(tiny_config).eval()
    with pytest.raises(ValueError) as err:
        generate(model, torch.zeros(1, 4, dtype=torch.long), 3, num_steps=4, diffusion_forcing=True, **kwargs)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="diffusion_forcing takes one prompt"):
        generate(model, torch.zeros(2, 4, dtype=torch.long), 3, num_steps=4, diffusion_forcing=True)
