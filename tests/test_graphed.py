"""The whole token as one CUDA graph replay (minird/graphed.py, generate's decode_graphed): the
tokens of the plain loop for every option it serves, on the CPU (the static-position step,
uncaptured) and on CUDA (captured, replayed); the graph is kept for the next call of the same
shape and follows weights changed in place; options it cannot serve are refused in one line."""

import gc
import weakref

import pytest
import torch

from helpers import make_model
from minird.generate import GRAPHS, generate, left_pad
from minird.kv_cache import DecodeView, KVCache

# (device, use_kernels): the pure-PyTorch path, the CPU kernels, and on a GPU the CUDA kernels
# (the decode kernel reading the position from the device at batch 1, the fused ops otherwise)
BACKENDS = [("cpu", False), ("cpu", True),
            pytest.param("cuda", True, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
            pytest.param("cuda", False, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]

OPTIONS = [dict(), dict(continuous_compute=True), dict(cache_lookup_strategy="compress-s2")]


@pytest.mark.parametrize("device,use_kernels", BACKENDS)
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "continuous", "compress-s2"])
@pytest.mark.parametrize("batch", [1, 3])
def test_graphed_is_the_plain_loop(tiny_config, device, use_kernels, options, batch):
    """fp32: token for token (and the steps of the fed tokens) the plain loop's, up to block_size."""
    tiny_config.init_scale = 0.0
    model = make_model(tiny_config, use_kernels=use_kernels).eval().to(device)
    torch.manual_seed(batch)
    prompt = torch.randint(0, tiny_config.vocab_size, (batch, 6), device=device)
    for new_tokens in (1, 9, 100):  # 100: to the end of the context
        plain = generate(model, prompt, new_tokens, num_steps=4, cuda_graph=False, **options)
        graphed = generate(model, prompt, new_tokens, num_steps=4, cuda_graph=True, **options)
        assert torch.equal(graphed.ids, plain.ids) and torch.equal(graphed.steps, plain.steps)
        assert graphed.stats.forwards == plain.stats.forwards
    assert plain.ids.size(1) == tiny_config.block_size


@pytest.mark.parametrize("device,use_kernels", BACKENDS)
@pytest.mark.parametrize("criterion,threshold", [("kl", "auto"), ("latent-diff", 0.1), ("argmax-stability", 2)])
@pytest.mark.parametrize("options", OPTIONS + [dict(min_steps=3)], ids=["plain", "continuous", "compress-s2", "min3"])
def test_graphed_adaptive_exit_is_the_plain_loop(tiny_config, device, use_kernels, criterion, threshold, options):
    """Adaptive exit, one row, a replay per step (AdaptiveTokenGraph): fp32, the plain loop's tokens
    and the steps each token used, up to block_size, the graphs kept from call to call. (Criteria
    whose quantities sit away from their thresholds on this model: tests/test_generate.py.)"""
    tiny_config.init_scale = 0.0
    model = make_model(tiny_config, use_kernels=use_kernels).eval().to(device)
    torch.manual_seed(1)
    prompt = torch.randint(0, tiny_config.vocab_size, (1, 6), device=device)
    kwargs = dict(num_steps=8, criterion=criterion, exit_threshold=threshold, **options)
    for new_tokens in (1, 9, 100):
        plain = generate(model, prompt, new_tokens, cuda_graph=False, **kwargs)
        graphed = generate(model, prompt, new_tokens, cuda_graph=True, **kwargs)
        assert torch.equal(graphed.ids, plain.ids) and torch.equal(graphed.steps, plain.steps)
    assert plain.ids.size(1) == tiny_config.block_size
    # tokens stopped before the cap, so the copies into the steps not run were replayed too (on the
    # CPU they stop at several different steps; kl on the H100's kernels stopped every one at 3)
    assert (plain.steps[0, 6:] < 8).any()


@pytest.mark.parametrize("device,use_kernels", BACKENDS)
def test_graphed_stops_and_pads_as_the_plain_loop(tiny_config, device, use_kernels):
    """Stop tokens (read back every few tokens: the output is cut where the plain loop stops) and
    left-padded prompts (the mask of the padding kept in the cache) give the plain loop's tokens."""
    tiny_config.init_scale = 0.0
    model = make_model(tiny_config, use_kernels=use_kernels).eval().to(device)
    torch.manual_seed(3)
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 5), device=device)
    plain = generate(model, prompt, 20, num_steps=3, cuda_graph=False).ids
    for stops in ((int(plain[0, 7]), int(plain[1, 8])), (int(plain[0, 5]),), (int(plain[0, 16]),)):
        expected = generate(model, prompt, 20, num_steps=3, stop_tokens=stops, cuda_graph=False)
        out = generate(model, prompt, 20, num_steps=3, stop_tokens=stops, cuda_graph=True)
        assert torch.equal(out.ids, expected.ids) and torch.equal(out.steps, expected.steps)
    prompts = [torch.randint(0, tiny_config.vocab_size, (n,)).tolist() for n in (3, 8, 1)]
    idx, attention_mask = (t.to(device) for t in left_pad(prompts, pad_id=7))
    expected = generate(model, idx, 10, num_steps=5, attention_mask=attention_mask, cuda_graph=False)
    out = generate(model, idx, 10, num_steps=5, attention_mask=attention_mask, cuda_graph=True)
    assert torch.equal(out.ids, expected.ids) and torch.equal(out.steps, expected.steps)


def test_random_s0_is_drawn_as_in_the_plain_loop(tiny_config):
    """On the CPU the uncaptured step draws each token's random s0 by the same calls, in the same
    order, as the plain loop: from the same seed, the same tokens. (A CUDA graph replays its
    random draws from new offsets of the generator: other noise, the same distribution.)"""
    model = make_model(tiny_config).eval()  # init_scale 1: a random s0 per token
    prompt = torch.randint(0, tiny_config.vocab_size, (2, 5))
    torch.manual_seed(4)
    plain = generate(model, prompt, 12, num_steps=3, cuda_graph=False).ids
    torch.manual_seed(4)
    assert torch.equal(generate(model, prompt, 12, num_steps=3, cuda_graph=True).ids, plain)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_graph_is_kept_for_the_same_shape(tiny_config, device):
    """A second call of the same shape (batch, r, cache bucket, options) reuses the graph and its
    cache with another prompt; weights changed in place are seen by the kept graph; an option that
    plain decoding does not use (lookahead_for_draft without draft_steps) keeps it; another shape
    replaces it (one per model)."""
    tiny_config.init_scale = 0.0
    model = make_model(tiny_config, use_kernels=True).eval().to(device)
    a, b = (torch.randint(0, tiny_config.vocab_size, (2, 5), device=device) for _ in range(2))
    generate(model, a, 8, num_steps=3, cuda_graph=True)
    kept = GRAPHS[model][1]
    assert torch.equal(generate(model, b, 7, num_steps=3, cuda_graph=True).ids,
                       generate(model, b, 7, num_steps=3, cuda_graph=False).ids)
    assert GRAPHS[model][1] is kept
    with torch.no_grad():
        for p in model.core.parameters():
            p.mul_(1.5)
    assert torch.equal(generate(model, a, 8, num_steps=3, cuda_graph=True).ids,
                       generate(model, a, 8, num_steps=3, cuda_graph=False).ids)
    assert GRAPHS[model][1] is kept
    generate(model, a, 8, num_steps=3, cuda_graph=True, lookahead_for_draft=3)  # no drafts: not part of the shape
    assert GRAPHS[model][1] is kept
    generate(model, a, 8, num_steps=4, cuda_graph=True)
    assert GRAPHS[model][1] is not kept and len([m for m in GRAPHS if m is model]) == 1


@pytest.mark.parametrize("options", [dict(), dict(criterion="kl"), dict(draft_steps=2)],
                         ids=["fixed", "adaptive", "drafts"])
def test_a_replaced_graph_frees_its_cache_at_once(tiny_config, options):
    """When the shape changes, the graph kept before is freed with its KV cache as soon as it is
    dropped, not at the garbage collector's next pass: at Huginn's size a cache is gigabytes, and
    the new one is allocated next. (No graph holds itself in a reference cycle.)"""
    tiny_config.init_scale = 0.0
    model = make_model(tiny_config).eval()
    prompt = torch.randint(0, tiny_config.vocab_size, (1, 5))
    gc.disable()
    try:
        generate(model, prompt, 6, num_steps=3, cuda_graph=True, **options)
        dropped = [weakref.ref(graph.kv_cache) for graph in GRAPHS[model][1]]
        generate(model, prompt, 6, num_steps=4, cuda_graph=True, **options)
        assert [cache() for cache in dropped] == [None] * len(dropped)
    finally:
        gc.enable()


@pytest.mark.parametrize("device,use_kernels", BACKENDS)
@pytest.mark.parametrize("batch", [1, 3])
def test_graphed_drafts_are_plain_greedy(tiny_config, device, use_kernels, batch):
    """Self-speculative decoding whose drafted tokens are graph replays at draft_steps and whose
    verifies are replays of a graph of lookahead + 1 tokens (the shorter last ones plain forwards):
    plain greedy decoding's tokens and steps, to the end of the context and with left-padded
    prompts, and the drafting statistics of plainly fed drafts."""
    tiny_config.init_scale = 0.0
    model = make_model(tiny_config, use_kernels=use_kernels).eval().to(device)
    torch.manual_seed(batch)
    prompts = [torch.randint(0, tiny_config.vocab_size, (n,)).tolist() for n in (6, 2, 4)[:batch]]
    idx, attention_mask = (t.to(device) for t in left_pad(prompts, pad_id=7))
    for mask in (None, attention_mask) if batch > 1 else (None,):
        plain = generate(model, idx, 100, num_steps=4, attention_mask=mask, cuda_graph=False)
        for draft_steps, lookahead in ((1, 3), (2, 8), (4, 5)):
            options = dict(num_steps=4, attention_mask=mask, draft_steps=draft_steps, lookahead_for_draft=lookahead)
            drafts = generate(model, idx, 100, cuda_graph=False, **options)
            graphed = generate(model, idx, 100, cuda_graph=True, **options)
            assert torch.equal(graphed.ids, plain.ids) and torch.equal(graphed.steps, plain.steps)
            assert graphed.stats == drafts.stats and graphed.stats.rounds > 0
    assert plain.ids.size(1) == tiny_config.block_size


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 4])
def test_graphed_bf16_tokens(tiny_config, batch):
    """bf16 on CUDA: greedy tokens identical to the plain loop's on the tiny config (attention over
    the whole cache under a mask rounds differently from attention over the filled part)."""
    tiny_config.init_scale = 0.0
    model = make_model(tiny_config, use_kernels=True).eval().to("cuda", torch.bfloat16)
    prompt = torch.randint(0, tiny_config.vocab_size, (batch, 6), device="cuda")
    plain = generate(model, prompt, 16, num_steps=8, cuda_graph=False).ids
    graphed = generate(model, prompt, 16, num_steps=8, cuda_graph=True).ids
    assert torch.equal(graphed, plain)


@pytest.mark.parametrize("kwargs, rows, fragment", [
    (dict(cuda_graph=True, temperature=0.7), 1, "cuda_graph=True needs greedy decoding one token a forward"),
    (dict(cuda_graph=True, diffusion_forcing=True), 1, "cuda_graph=True needs greedy decoding one token a forward"),
    (dict(cuda_graph=True, criterion="kl"), 2, "cuda_graph=True with a criterion decodes one row"),
    (dict(cuda_graph="yes"), 1, "cuda_graph must be 'auto', True or False"),
])
def test_graphed_bad_options(tiny_config, kwargs, rows, fragment):
    with pytest.raises(ValueError) as err:
        generate(make_model(tiny_config).eval(), torch.zeros(rows, 4, dtype=torch.long), 3, num_steps=4, **kwargs)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_decode_view_writes_at_the_device_position():
    """DecodeView.update writes only position pos of the entry (shared slots under compress-sN
    too) and returns the whole buffers; mask() admits positions 0 .. pos and not the padding."""
    cache = KVCache(6, "compress-s1", n_core_layers=2)
    pos = torch.tensor([3])
    view = DecodeView(cache, pos)
    k, v = torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4)
    k_all, v_all = view.update(("core", 5, 1), k, v)
    assert k_all.shape == (2, 1, 6, 4) and k_all is cache.entries[("core", 0)][0]
    assert torch.equal(k_all[:, :, 3:4], k) and torch.equal(v_all[:, :, 3:4], v)
    assert (k_all[:, :, [0, 1, 2, 4, 5]] == 0).all()
    assert view.mask().tolist() == [[[[True, True, True, True, False, False]]]]
    cache.add_tokens(torch.tensor([[0, 1], [1, 1]]), 2)
    assert view.mask()[:, 0, 0].tolist() == [[False, True, True, True, False, False], [True] * 4 + [False] * 2]


def test_decode_view_of_several_tokens():
    """A view of 3 new tokens at positions 2, 3, 4 (the verify of drafts) writes exactly those
    positions, and each token attends causally: up to its own position, never the padding."""
    cache = KVCache(6)
    view = DecodeView(cache, torch.tensor([2, 3, 4]))
    k, v = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    k_all, v_all = view.update(("prelude", 0), k, v)
    assert torch.equal(k_all[:, :, 2:5], k) and torch.equal(v_all[:, :, 2:5], v)
    assert (k_all[:, :, [0, 1, 5]] == 0).all() and (v_all[:, :, [0, 1, 5]] == 0).all()
    causal = [[True] * 3 + [False] * 3, [True] * 4 + [False] * 2, [True] * 5 + [False]]
    assert view.mask().tolist() == [[causal]]
    cache.add_tokens(torch.tensor([[0, 1], [1, 1]]), 2)
    assert view.mask()[0, 0].tolist() == [[False] + row[1:] for row in causal]
    assert view.mask()[1, 0].tolist() == causal
