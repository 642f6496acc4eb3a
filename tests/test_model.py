"""The model: shapes, determinism, the step schedule, truncated backprop, the sampler, the KV cache."""

import pytest
import torch

from minird.model import KVCache, RecurrentDepthLM, left_pad


def make_model(config, seed=0):
    torch.manual_seed(seed)
    return RecurrentDepthLM(config)


def count_core_steps(model):
    """Wrap model.core_step to record, for every call, whether its output carries an autograd graph."""
    calls = []
    core_step = model.core_step

    def recording_core_step(*args, **kwargs):
        s = core_step(*args, **kwargs)
        calls.append(s.grad_fn is not None)
        return s

    model.core_step = recording_core_step
    return calls


def uses_in_graph(loss, param):
    """How many autograd nodes take `param` as an input, i.e. how many of its uses in the forward
    will be differentiated through."""
    seen, stack, uses = set(), [loss.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            uses += child is not None and getattr(child, "variable", None) is param
            stack.append(child)
    return uses


def test_shapes_and_sizes(tiny_config):
    c = tiny_config
    model = make_model(c)
    idx = torch.randint(0, c.vocab_size, (3, 11))
    logits, loss = model(idx, targets=idx, num_steps=2)
    assert logits.shape == (3, 11, c.vocab_size) and logits.dtype == torch.float32
    assert loss.shape == () and torch.isfinite(loss)
    assert model(idx)[1] is None
    # Unique parameters counted by hand: the tied lm_head once; a sandwich block has Wqkv, the
    # q/k bias, the attention and MLP projections and four norm weights; the token shift, the
    # adapter (2h -> h) and ln_f are the rest.
    h, inner = c.n_embd, c.intermediate_size
    block = 3 * h * h + 2 * h + h * h + 2 * h * inner + inner * h + 4 * h
    n_blocks = c.n_layers_in_prelude + c.n_layers_in_recurrent_block + c.n_layers_in_coda
    assert model.num_params() == c.vocab_size * h + n_blocks * block + h * h + 2 * h * h + h
    assert model.effective_depth(10) == c.n_layers_in_prelude + 10 * c.n_layers_in_recurrent_block + c.n_layers_in_coda


def test_bad_inputs_raise(tiny_config):
    model = make_model(tiny_config)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, tiny_config.block_size + 1, dtype=torch.long))
    for bad in (0, -2, (0, 0), (-1, 2)):
        with pytest.raises(ValueError, match="num_steps"):
            model(torch.zeros(1, 4, dtype=torch.long), num_steps=bad)


def test_init_scale_zero_is_deterministic(tiny_config):
    model = make_model(tiny_config).eval()
    idx = torch.randint(0, tiny_config.vocab_size, (2, 9))
    with torch.no_grad():
        a, b = (model(idx, num_steps=3, init_scale=0)[0] for _ in range(2))
        noisy_a, noisy_b = (model(idx, num_steps=3, init_scale=1.0)[0] for _ in range(2))
    assert torch.equal(a, b)
    assert not torch.allclose(noisy_a, noisy_b)  # s0 is fresh noise on every call otherwise


@pytest.mark.parametrize("num_steps, grad, expected", [
    (5, False, [False] * 5),            # an int without grad: r steps, none in the graph
    (3, True, [True] * 3),              # an int with grad: every step in the graph
    ((2, 3), True, [False] * 2 + [True] * 3),  # (n, k): n steps without, then k with gradient
    ((4, 0), True, [False] * 4),
])
def test_num_steps_honoured(tiny_config, num_steps, grad, expected):
    model = make_model(tiny_config)
    calls = count_core_steps(model)
    with torch.set_grad_enabled(grad):
        model(torch.zeros(1, 5, dtype=torch.long), num_steps=num_steps)
    assert calls == expected


def test_default_num_steps(tiny_config):
    model = make_model(tiny_config)
    calls = count_core_steps(model)
    idx = torch.zeros(1, 5, dtype=torch.long)
    with torch.no_grad():
        model.eval()(idx)
    assert calls == [False] * tiny_config.mean_recurrence  # eval: mean r, no grad
    model.train()
    for seed in range(5):  # training: one draw of the sampler per forward
        torch.manual_seed(seed)
        n, k = model.sample_num_steps()
        calls.clear()
        torch.manual_seed(seed)
        model(idx)
        assert calls == [False] * n + [True] * k


def test_gradients_reach_every_stage_through_last_k_steps_only(tiny_config):
    model = make_model(tiny_config)
    n, k = 3, 2
    calls = count_core_steps(model)
    idx = torch.randint(0, tiny_config.vocab_size, (2, 12))
    _, loss = model(idx, targets=idx, num_steps=(n, k))
    # the state after the n no-grad steps has no graph; the k steps after it do
    assert calls == [False] * n + [True] * k
    # only the k grad steps' uses of the adapter and of each core weight are in the graph
    assert uses_in_graph(loss, model.adapter.weight) == k
    for block in model.core:
        assert uses_in_graph(loss, block.attn.Wqkv.weight) == k
        assert uses_in_graph(loss, block.mlp.fc.weight) == k
    loss.backward()
    for stage in ("wte", "prelude", "adapter", "core", "coda", "ln_f"):
        for name, p in getattr(model, stage).named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {stage}.{name}"


@pytest.mark.parametrize("mean_r, k", [(4, 2), (32, 8)])
def test_step_sampler_mean(tiny_config, mean_r, k):
    tiny_config.mean_recurrence, tiny_config.mean_backprop_depth = mean_r, k
    model = make_model(tiny_config)
    gen = torch.Generator().manual_seed(0)
    draws = [model.sample_num_steps(gen) for _ in range(5000)]
    for n, kk in draws:
        assert n >= 0 and 1 <= kk <= k and (n == 0 or kk == k)  # k = min(p, k), n = max(p - k, 0)
    mean_total = sum(n + kk for n, kk in draws) / len(draws)
    # rate has mean mean_r and p = Poisson(rate) + 1, so E[n + k] = mean_r + 1 (as the official code)
    assert abs(mean_total - (mean_r + 1)) < 0.05 * (mean_r + 1)
    assert len(set(draws)) > 5  # really random, not a constant
    gen.manual_seed(0)
    assert [model.sample_num_steps(gen) for _ in range(50)] == draws[:50]  # reproducible from a seed


def test_kv_cache_matches_full_forward(tiny_config):
    c = tiny_config
    model = make_model(c).eval()
    idx = torch.randint(0, c.vocab_size, (2, 14))
    r = 3
    with torch.no_grad():
        full, _ = model(idx, num_steps=r, init_scale=0)
        cache = KVCache(c.block_size, n_core_layers=c.n_layers_in_recurrent_block)
        chunks = [model(idx[:, :6], num_steps=r, kv_cache=cache, init_scale=0)[0]]  # the prompt at once
        for t in range(6, idx.size(1)):  # then one token at a time
            chunks.append(model(idx[:, t:t + 1], num_steps=r, kv_cache=cache, init_scale=0)[0])
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)
    # one cache entry per prelude layer, per (step, core layer) and per coda layer
    assert len(cache.entries) == c.n_layers_in_prelude + r * c.n_layers_in_recurrent_block + c.n_layers_in_coda
    assert cache.seq_len == idx.size(1)


def test_generate_matches_greedy_full_forward(tiny_config):
    tiny_config.init_scale = 0.0
    model = make_model(tiny_config).eval()
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 5))
    out = model.generate(prompt, max_new_tokens=10, num_steps=4)
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
    full = model.generate(prompt, 6, num_steps=r)
    assert torch.equal(model.generate(prompt, 6, num_steps=r, cache_lookup_strategy=f"compress-s{R * r}"), full)

    caches = {}
    with torch.no_grad():
        for strategy in ("full", f"compress-s{R}", f"compress-s{2 * R}"):
            caches[strategy] = KVCache(c.block_size, strategy, R)
            model(prompt, num_steps=r, kv_cache=caches[strategy])
    outside = c.n_layers_in_prelude + c.n_layers_in_coda
    for strategy, core_entries in (("full", r * R), (f"compress-s{R}", R), (f"compress-s{2 * R}", 2 * R)):
        assert len(caches[strategy].entries) == outside + core_entries
        assert caches[strategy].nbytes() * (outside + r * R) == caches["full"].nbytes() * (outside + core_entries)

    # the next token on compress-sR == on a full cache whose core entries all hold the last step's keys
    next_id = torch.randint(0, c.vocab_size, (2, 1))
    full_cache = caches["full"]
    for step in range(r - 1):
        for j in range(R):
            k, v = full_cache.entries[("core", r - 1, j)]
            full_cache.entries[("core", step, j)] = (k.clone(), v.clone())
    with torch.no_grad():
        shared, _ = model(next_id, num_steps=r, kv_cache=caches[f"compress-s{R}"])
        expected, _ = model(next_id, num_steps=r, kv_cache=full_cache)
    torch.testing.assert_close(shared, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("strategy", ["compress-s0", "compress-4", "latest-m4", "compress-s"])
def test_kv_cache_bad_strategy(tiny_config, strategy):
    model = make_model(tiny_config).eval()
    with pytest.raises(ValueError, match="cache_lookup_strategy must be 'full' or 'compress-sN' with N >= 1"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, cache_lookup_strategy=strategy)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tiny_config):
    tiny_config.init_scale = 0.0
    model = make_model(tiny_config).eval()
    idx = torch.randint(0, tiny_config.vocab_size, (2, 16))
    with torch.no_grad():
        cpu_logits, _ = model(idx, num_steps=4)
        cuda_logits, _ = model.cuda()(idx.cuda(), num_steps=4)
    torch.testing.assert_close(cuda_logits.cpu(), cpu_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(model.generate(idx[:, :4].cuda(), 8, num_steps=4).cpu(),
                       model.cpu().generate(idx[:, :4], 8, num_steps=4))


def test_per_step_loss_asks_each_step_only_for_what_it_can_reach(tiny_config):
    tiny_config.init_scale = 0.0  # s0 = 0: the same states on every call
    model = make_model(tiny_config).train()
    idx = torch.randint(0, tiny_config.vocab_size, (2, 9))
    targets = torch.randint(0, tiny_config.vocab_size, (2, 9))
    lookups = torch.tensor([1, 3] * 9).view(2, 9)  # alternate targets need 1 and 3 lookups
    far = lookups == 3

    def loss_at(num_steps, t):
        return model(idx, t, num_steps=num_steps, target_lookups=lookups)[1]

    changed = torch.where(far, (targets + 1) % tiny_config.vocab_size, targets)
    # steps 1 and 2 cannot reach a 3-lookup target: changing it changes nothing
    assert torch.equal(loss_at((0, 2), targets), loss_at((0, 2), changed))
    # steps 2 and 3 can: the last step is asked for it
    assert not torch.equal(loss_at((1, 2), targets), loss_at((1, 2), changed))
    # the 1-lookup targets are asked for at every step: the mean of the two steps' losses
    near_only = torch.where(far, -1, targets)
    states = model.iterate(model.embed(idx, model.rope_cos[:9], model.rope_sin[:9]), (0, 2),
                           model.rope_cos[:9], model.rope_sin[:9], keep_states=True)
    per_step = [torch.nn.functional.cross_entropy(model.decode(s, model.rope_cos[:9], model.rope_sin[:9]).flatten(0, 1),
                                                  near_only.flatten(), ignore_index=-1) for s in states]
    assert torch.allclose(loss_at((0, 2), targets), torch.stack(per_step).mean())
    # nothing reachable at all: the plain last-step loss on every target
    unreachable = torch.full_like(lookups, 9)
    plain = model(idx, targets, num_steps=(0, 2))[1]
    assert torch.equal(model(idx, targets, num_steps=(0, 2), target_lookups=unreachable)[1], plain)


def test_trace_ends_where_forward_ends(tiny_config):
    tiny_config.init_scale = 0.0
    model = make_model(tiny_config).eval()
    idx = torch.randint(0, tiny_config.vocab_size, (2, 7))
    steps = model.trace(idx, 4)
    assert len(steps) == 4 and all(s.shape == (2, 7, tiny_config.vocab_size) for s in steps)
    for r in (1, 4):
        assert torch.allclose(steps[r - 1], model(idx, num_steps=r)[0], atol=1e-6)


@pytest.mark.parametrize("criterion", ["kl", "latent-diff", "entropy-diff", "argmax-stability", "cosine"])
def test_adaptive_exit_never_met_is_fixed_steps(tiny_config, criterion):
    tiny_config.init_scale = 0.0
    model = make_model(tiny_config).eval()
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 6))
    never = 99 if criterion == "argmax-stability" else 0  # a count of steps / a distance below 0
    out, steps = model.generate(prompt, 5, num_steps=4, criterion=criterion, exit_threshold=never, return_steps=True)
    assert torch.equal(out, model.generate(prompt, 5, num_steps=4))
    assert steps.shape == (2, 6 + 5 - 1) and (steps == 4).all()


@pytest.mark.parametrize("criterion", ["kl", "latent-diff", "entropy-diff", "argmax-stability", "cosine"])
def test_adaptive_exit_per_token(tiny_config, criterion):
    tiny_config.init_scale = 0.0
    model = make_model(tiny_config).eval()
    prompts = torch.randint(0, tiny_config.vocab_size, (3, 6))
    always = 0 if criterion == "argmax-stability" else 1e9  # met at the first step it may be
    out, steps = model.generate(prompts, 4, num_steps=6, criterion=criterion, exit_threshold=always,
                                min_steps=2, return_steps=True)
    assert (steps == 2).all()  # the floor holds, and every token stopped there
    # with the default thresholds: within [min_steps, cap], and each row as if it were alone
    out, steps = model.generate(prompts, 4, num_steps=6, criterion=criterion, min_steps=2, return_steps=True)
    assert ((2 <= steps) & (steps <= 6)).all()
    for b in range(3):
        alone, alone_steps = model.generate(prompts[b:b + 1], 4, num_steps=6, criterion=criterion, min_steps=2,
                                            return_steps=True)
        assert torch.equal(alone, out[b:b + 1]) and torch.equal(alone_steps, steps[b:b + 1])


def test_adaptive_exit_bad_criterion(tiny_config):
    model = make_model(tiny_config).eval()
    with pytest.raises(ValueError, match="criterion must be one of"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, criterion="entropy")


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
    plain = model.generate(prompt, 4, num_steps=3)
    plain_starts = [s for step, s, _ in calls if step == 0]
    calls.clear()
    cont = model.generate(prompt, 4, num_steps=3, continuous_compute=True)
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
    tiny_config.init_scale, tiny_config.use_kernels = 0.0, use_kernels
    model = make_model(tiny_config).eval().to(device)
    r = 4
    torch.manual_seed(1)
    kept = []
    for prompt in (torch.randint(0, tiny_config.vocab_size, (3, 5), device=device),
                   torch.randint(0, tiny_config.vocab_size, (1, 9), device=device)):
        plain, plain_steps = model.generate(prompt, 12, num_steps=r, return_steps=True)
        for draft_steps in (1, 3, r):
            for lookahead in (1, 3, 8):
                out, steps, stats = model.generate(prompt, 12, num_steps=r, draft_steps=draft_steps,
                                                   lookahead_for_draft=lookahead, return_steps=True, return_stats=True)
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
    plain = model.generate(prompt, 100, num_steps=r)
    assert plain.size(1) == tiny_config.block_size
    assert torch.equal(model.generate(prompt, 100, num_steps=r, draft_steps=2, lookahead_for_draft=5), plain)
    stop = int(plain[0, 9])
    stopped = model.generate(prompt, 100, num_steps=r, stop_token=stop)
    assert torch.equal(model.generate(prompt, 100, num_steps=r, stop_token=stop, draft_steps=r, lookahead_for_draft=6),
                       stopped)


@pytest.mark.parametrize("device,use_kernels", BACKENDS)
@pytest.mark.parametrize("criterion", ["none", "kl", "latent-diff"])
def test_padded_batch_is_one_prompt_at_a_time(tiny_config, device, use_kernels, criterion):
    """Prompts of different lengths, padded on the left, in one batch: every row's tokens, and the
    steps its tokens used with adaptive exit, are those of the prompt alone; padding used 0 steps."""
    tiny_config.init_scale, tiny_config.use_kernels = 0.0, use_kernels
    model = make_model(tiny_config).eval().to(device)
    torch.manual_seed(2)
    prompts = [torch.randint(0, tiny_config.vocab_size, (n,)).tolist() for n in (3, 8, 1, 5)]
    idx, attention_mask = (t.to(device) for t in left_pad(prompts, pad_id=7))
    assert idx.shape == attention_mask.shape == (4, 8)
    out, steps = model.generate(idx, 8, num_steps=6, criterion=criterion, attention_mask=attention_mask,
                                return_steps=True)
    assert out.shape == (4, 8 + 8) and torch.equal(out[:, :8], idx)
    for b, prompt in enumerate(prompts):
        alone, alone_steps = model.generate(torch.tensor([prompt], device=device), 8, num_steps=6,
                                            criterion=criterion, return_steps=True)
        pad = 8 - len(prompt)
        assert torch.equal(out[b, pad:], alone[0]) and torch.equal(steps[b, pad:], alone_steps[0])
        assert (steps[b, :pad] == 0).all()
    # the pad id is never looked at
    other_pad = model.generate(left_pad(prompts, pad_id=3)[0].to(device), 8, num_steps=6, criterion=criterion,
                               attention_mask=attention_mask)
    assert torch.equal(other_pad[:, 8:], out[:, 8:])


def test_forward_with_attention_mask(tiny_config):
    """forward: the logits of each row's tokens are those of the row alone; no NaN at the padding."""
    model = make_model(tiny_config).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    idx, attention_mask = left_pad(prompts)
    with torch.no_grad():
        logits, _ = model(idx, num_steps=3, init_scale=0, attention_mask=attention_mask)
        assert torch.isfinite(logits).all()
        for b, prompt in enumerate(prompts):
            alone, _ = model(torch.tensor([prompt]), num_steps=3, init_scale=0)
            torch.testing.assert_close(logits[b, 6 - len(prompt):], alone[0], atol=1e-5, rtol=1e-5)


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
])
def test_generate_bad_options(tiny_config, kwargs, fragment):
    model = make_model(tiny_config).eval()
    with pytest.raises(ValueError) as err:
        model.generate(torch.zeros(2, 4, dtype=torch.long), 3, num_steps=4, **kwargs)
    assert fragment in str(err.value) and "\n" not in str(err.value)
