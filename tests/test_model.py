"""The model: shapes, determinism, the step schedule, truncated backprop, the sampler, the
per-step loss, trace, padding and the prelude's hidden keys (generation: test_generate.py)."""

import dataclasses

import pytest
import torch

from helpers import make_model
from minird.generate import left_pad


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
    per_step = [torch.nn.functional.cross_entropy(model.readout(s, model.rope_cos[:9], model.rope_sin[:9]).flatten(0, 1),
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


def test_prelude_hidden_tokens_reach_only_their_own_position_through_the_prelude(tiny_config):
    """The prelude's mask of forward(prelude_hidden=...) (train.py's separator_mask_iters), which is
    positions()'s padding mask with the hidden tokens as padding: with it, what the hidden tokens
    are changes the prelude's output only at their own positions (every other token's attention
    skips them); without it, at every later position too."""
    config = dataclasses.replace(tiny_config, token_shift=False)  # (the shift would carry a token to the next)
    model = make_model(config).eval()
    idx = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    hidden = torch.zeros_like(idx, dtype=torch.bool)
    hidden[:, [3, 7]] = True
    changed = torch.where(hidden, (idx + 1) % config.vocab_size, idx)
    with torch.no_grad():
        cos, sin, masked = model.positions(idx, attention_mask=~hidden)  # masked: (B, 1, T, T)
        moved = (model.embed(idx, cos, sin, mask=masked) - model.embed(changed, cos, sin, mask=masked)).abs().amax(-1)
        moved_plain = (model.embed(idx, cos, sin) - model.embed(changed, cos, sin)).abs().amax(-1)  # (B, T)
    assert (moved[~hidden] == 0).all() and (moved[hidden] > 0).all()
    assert (moved_plain[:, 3:] > 0).all() and (moved_plain[:, :3] == 0).all()
