"""
The fused ops (minird/ops.py, csrc/) against the pure-PyTorch model they replace (minird/model.py).

Every op: values and gradients vs the reference (relative error ||out - ref|| / ||ref||: fp32
<= 1e-5 on CPU and CUDA, bf16 <= 2e-2 on CUDA), over odd shapes; torch.library.opcheck; gradcheck
in float64. The model: kernels on vs off give the same logits, the same greedy text, the same
losses over a few training steps, and torch.compile(fullgraph=True) matches eager. Bad input
fails with a message naming the argument. CUDA cases skip without CUDA.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from minird import ops
from minird.generate import feed, generate
from minird.kv_cache import KVCache
from minird.model import RecurrentDepthConfig, RecurrentDepthLM, RMSNorm, apply_rope, precompute_rope

pytestmark = pytest.mark.skipif(not ops.BUILT, reason="minird._C is not built")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (device, dtype) pairs: bf16 is checked on CUDA, where it is what the model runs in
DEVICE_DTYPES = [(d, torch.float32) for d in DEVICES] + [(d, torch.bfloat16) for d in DEVICES if d == "cuda"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float64: 1e-12}
# (B, T, h, n_head): B = 1 and 3; T = 1, 7, 64; h = 64, 96, 256; head sizes 16, 24, 48, 64
SHAPES = [(1, 1, 64, 4), (3, 7, 96, 4), (3, 7, 96, 2), (1, 64, 256, 4), (3, 64, 96, 6)]


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def assert_close(outs, refs, dtype, what):
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert o.shape == r.shape, f"{what}[{i}]: shape {tuple(o.shape)} != {tuple(r.shape)}"
        err = rel_err(o, r)
        assert err <= TOL[dtype], f"{what}[{i}]: relative error {err:.2e} > {TOL[dtype]:.0e}"


def leaf(*shape, device, dtype, scale=1.0):
    return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_()


def check_fwd_bwd(op, ref, inputs, dtype):
    """Same outputs, and the same grads for a random output grad, as the reference."""
    outs, refs = op(*inputs), ref(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    refs = refs if isinstance(refs, tuple) else (refs,)
    assert_close(outs, refs, dtype, "forward")
    grads_out = [torch.randn_like(r) for r in refs]
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    g = torch.autograd.grad(outs, wrt, grads_out)
    g_ref = torch.autograd.grad(refs, wrt, grads_out)
    assert_close(g, g_ref, dtype, "grad")


# -----------------------------------------------------------------------------
# references, built from minird/model.py's own code


def rmsnorm_ref(x, w, eps=1e-6):
    norm = RMSNorm(x.size(-1), eps).to(x.device)
    return torch.func.functional_call(norm, {"weight": w}, (x,))


def add_rmsnorm_ref(x, y, w, wn):
    out = rmsnorm_ref(x + y, w)
    return out, rmsnorm_ref(out, wn)


def qk_bias_rope_ref(qkv, qk_bias, cos, sin, n_head):
    """The first lines of CausalSelfAttention.forward."""
    B, T, h3 = qkv.shape
    q, k, v = (t.view(B, T, n_head, -1).transpose(1, 2) for t in qkv.split(h3 // 3, dim=2))
    return apply_rope(q + qk_bias[0], cos, sin), apply_rope(k + qk_bias[1], cos, sin), v


def swiglu_ref(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_tables(T, hs, device, dtype):
    cos, sin = precompute_rope(hs, T, 50000.0)
    return cos.to(device, dtype), sin.to(device, dtype)


def samples(device, dtype, B, T, h, n_head):
    """One input set per op (used by the value, opcheck and bad-input tests)."""
    hs = h // n_head
    cos, sin = rope_tables(T, hs, device, dtype)
    return {
        "add_rmsnorm": (leaf(B, T, h, device=device, dtype=dtype), leaf(B, T, h, device=device, dtype=dtype),
                        leaf(h, device=device, dtype=dtype), leaf(h, device=device, dtype=dtype)),
        "swiglu": (leaf(B, T, 2 * h, device=device, dtype=dtype, scale=2.0),),
        "qk_bias_rope": (leaf(B, T, 3 * h, device=device, dtype=dtype),
                         leaf(2, 1, n_head, 1, hs, device=device, dtype=dtype), cos, sin, n_head),
        "adapter": (leaf(B, T, h, device=device, dtype=dtype), leaf(B, T, h, device=device, dtype=dtype),
                    leaf(h, 2 * h, device=device, dtype=dtype, scale=h ** -0.5)),
    }


# -----------------------------------------------------------------------------
# each op vs its reference


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_add_rmsnorm(device, dtype, shape):
    torch.manual_seed(0)
    x, y, w, wn = samples(device, dtype, *shape)["add_rmsnorm"]
    eps = 1e-6
    check_fwd_bwd(lambda x, y, w, wn: ops.add_rmsnorm(x, y, w, wn, eps), add_rmsnorm_ref, (x, y, w, wn), dtype)
    # the two other forms: plain norm (norm_1), add + norm without a next norm (the last norm_4)
    check_fwd_bwd(lambda x, w: ops.add_rmsnorm(x, None, w, None, eps)[0], rmsnorm_ref, (x, w), dtype)
    check_fwd_bwd(lambda x, y, w: ops.add_rmsnorm(x, y, w, None, eps)[0], lambda x, y, w: rmsnorm_ref(x + y, w),
                  (x, y, w), dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("h", [2049, 5280, 9000])
@pytest.mark.parametrize("rows", [1, 3])
def test_add_rmsnorm_wide_rows(device, dtype, h, rows):
    """Rows wider than 2048 get more threads on CUDA (past 8192, the plain passes instead of registers):
    Huginn's width 5280 among them, at decode's one row and at a few."""
    torch.manual_seed(0)
    x, y = (leaf(rows, 1, h, device=device, dtype=dtype).detach() for _ in range(2))
    w, wn = (1 + 0.1 * leaf(h, device=device, dtype=dtype).detach() for _ in range(2))
    with torch.no_grad():
        assert_close(ops.add_rmsnorm(x, y, w, wn, 1e-6), add_rmsnorm_ref(x, y, w, wn), dtype, "add + two norms")
        assert_close(ops.add_rmsnorm(x, None, w, None, 1e-6)[:1], (rmsnorm_ref(x, w),), dtype, "plain norm")


@pytest.mark.skipif(not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()),
                    reason="the extension is built with OpenMP on Linux where torch has it (setup.py)")
def test_cpu_kernels_run_on_torchs_threads():
    """Built without -fopenmp, at::parallel_for runs every CPU kernel on one thread. With it, the
    kernels must share torch's OpenMP runtime (one libgomp in the process, so torch.set_num_threads
    governs them too), and split the work among threads without changing a bit: the weight grads,
    summed over rows, included (csrc/rmsnorm.cpp), so that a training run does not depend on it."""
    from minird import _C

    with open(_C.__file__, "rb") as f:
        assert b"GOMP_parallel" in f.read(), "minird._C was compiled without OpenMP"
    torch.manual_seed(0)
    rows, h, n_head = 300, 64, 4
    x, y = torch.randn(rows, h), torch.randn(rows, h)
    w, wn = torch.rand(h) + 0.5, torch.rand(h) + 0.5
    qkv, bias = torch.randn(rows, 1, 3 * h), torch.randn(2, 1, n_head, 1, h // n_head)
    cos, sin = torch.rand(1, h // n_head // 2), torch.rand(1, h // n_head // 2)

    def run(threads):
        torch.set_num_threads(threads)
        caches = [torch.zeros(rows, n_head, 4, h // n_head) for _ in range(2)]
        q = ops.qk_bias_rope_cache(qkv, bias, cos, sin, n_head, *caches, 2)
        xg, wg, wng = (t.clone().requires_grad_() for t in (x, w, wn))
        out, out_next = ops.add_rmsnorm(xg, y, wg, wng)
        (out.square().sum() + out_next.sum()).backward()
        return (out, out_next, q, *caches), (xg.grad, wg.grad, wng.grad)

    threads = torch.get_num_threads()
    try:
        one, one_grads = run(1)
        two, two_grads = run(2)
    finally:
        torch.set_num_threads(threads)
    libgomp = {line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line}
    assert len(libgomp) == 1, f"two OpenMP runtimes loaded: {sorted(libgomp)}"
    assert all(torch.equal(a, b) for a, b in zip(one, two)), "the forward's bits depend on the thread count"
    assert all(torch.equal(a, b) for a, b in zip(one_grads, two_grads)), "the grads' bits depend on the thread count"


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu(device, dtype, shape):
    torch.manual_seed(0)
    check_fwd_bwd(ops.swiglu, swiglu_ref, samples(device, dtype, *shape)["swiglu"], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_swiglu_on_cpu_is_eager_bit_for_bit(dtype):
    """The CPU swiglu runs eager's own vectorised ops (csrc/swiglu.cpp says why), so its output
    and both halves of its grad are eager's bits, not only within the tolerance."""
    torch.manual_seed(0)
    x = leaf(5, 9, 2 * 96, device="cpu", dtype=dtype, scale=3.0)
    ours = ops.swiglu(x)
    grad = torch.randn_like(ours)
    ours_grad, = torch.autograd.grad(ours, x, grad)
    eager = swiglu_ref(x)
    eager_grad, = torch.autograd.grad(eager, x, grad)
    assert torch.equal(ours, eager) and torch.equal(ours_grad, eager_grad)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_qk_bias_rope(device, dtype, shape):
    torch.manual_seed(0)
    check_fwd_bwd(ops.qk_bias_rope, qk_bias_rope_ref, samples(device, dtype, *shape)["qk_bias_rope"], dtype)
    # the inference form: k and v written into a cache (B, nh, L, hs) at pos .. pos + T - 1, the rest untouched
    qkv, bias, cos, sin, n_head = (t.detach() if isinstance(t, torch.Tensor) else t
                                   for t in samples(device, dtype, *shape)["qk_bias_rope"])
    B, T, h3 = qkv.shape
    pos, L = 3, T + 5
    k_cache, v_cache = (torch.randn(B, n_head, L, h3 // 3 // n_head, device=device, dtype=dtype) for _ in range(2))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_ref, k_ref[:, :, pos:pos + T], v_ref[:, :, pos:pos + T] = qk_bias_rope_ref(qkv, bias, cos, sin, n_head)
    q = ops.qk_bias_rope_cache(qkv, bias, cos, sin, n_head, k_cache, v_cache, pos)
    assert_close([q, k_cache, v_cache], [q_ref, k_ref, v_ref], dtype, "qk_bias_rope_cache")


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_adapter(device, dtype, shape):
    """adapter(s, W_e e, W) == Linear(2h -> h)(cat[s, e]), grads to s, e and W included."""
    torch.manual_seed(0)
    s, e, W = samples(device, dtype, *shape)["adapter"]
    h = s.size(-1)
    check_fwd_bwd(lambda s, e, W: ops.adapter(s, F.linear(e, W[:, h:]), W),
                  lambda s, e, W: F.linear(torch.cat([s, e], dim=-1), W), (s, e, W), dtype)


def random_mask(B, T, device):
    """A (B, 1, T, T) attention mask, True = may attend; the diagonal always (no empty row)."""
    return (torch.rand(B, 1, T, T, device=device) > 0.4) | torch.eye(T, dtype=torch.bool, device=device)


def small_model(device, dtype, h=96, n_head=4, R=3, **kw):
    config = RecurrentDepthConfig(vocab_size=17, block_size=64, n_embd=h, n_head=n_head, intermediate_size=2 * h + 32,
                       n_layers_in_recurrent_block=R, mean_recurrence=3, **kw)
    torch.manual_seed(0)
    model = RecurrentDepthLM(config).to(device, dtype)
    with torch.no_grad():  # the norm weights and q/k bias start at 1 and 0: make them matter
        for name, p in model.named_parameters():
            if "norm" in name or "qk_bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 64, 4), (3, 7, 96, 6)])
def test_core_step(device, dtype, shape):
    """A whole step: ops.core_step (differentiable) and recurrent_steps (C++ loop) vs model.core_step."""
    B, T, h, n_head = shape
    model = small_model(device, dtype, h=h, n_head=n_head)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    s = leaf(B, T, h, device=device, dtype=dtype)
    e = leaf(B, T, h, device=device, dtype=dtype)
    W = model.adapter.weight
    ref = lambda s, e: model.core_step(model.core_step(s, e, cos, sin, 0), e, cos, sin, 1)  # noqa: E731
    weights, eps = ops.block_weights(model.core), model.config.norm_eps
    step = lambda s, e, i: ops.core_step(s, F.linear(e, W[:, h:]), W, weights, n_head, eps, cos, sin, i)  # noqa: E731
    fused = lambda s, e: step(step(s, e, 0), e, 1)  # noqa: E731
    check_fwd_bwd(fused, ref, (s, e), dtype)
    # grads of the weights too
    params = list(model.parameters())
    g = torch.autograd.grad(fused(s, e).sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad(ref(s, e).sum(), params, allow_unused=True)
    # as one vector: at T=1 the q/k bias grad is exactly 0 in theory (one key), rounding noise in practice
    flat = lambda gs: torch.cat([t.flatten() for t in gs if t is not None])  # noqa: E731
    assert_close([flat(g)], [flat(g_ref)], dtype, "weight grads")
    with torch.no_grad():
        out = ops.recurrent_steps(s, F.linear(e, W[:, h:]), W, ops.block_weights(model.core), cos, sin, None, 2,
                                  n_head, model.core[0].norm_1.eps)
        assert_close([out], [ref(s, e)], dtype, "recurrent_steps")
        # an attention mask (padded batches): the same one given to both
        mask = random_mask(B, T, device)
        out = ops.recurrent_steps(s, F.linear(e, W[:, h:]), W, ops.block_weights(model.core), cos, sin, mask, 2,
                                  n_head, model.core[0].norm_1.eps)
        ref_masked = model.core_step(model.core_step(s, e, cos, sin, 0, mask=mask), e, cos, sin, 1, mask=mask)
        assert_close([out], [ref_masked], dtype, "recurrent_steps with a mask")


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("T,strategy", [(1, "full"), (3, "full"), (1, "compress-s2"), (3, "compress-s1")])
def test_recurrent_steps_with_kv_cache(device, dtype, T, strategy):
    """Tokens after a cached prompt: recurrent_steps_cached writing the cache in place (qk_bias_rope_cache)
    vs model.core_step with KVCache.update, compared on the states and on every cache buffer.
    compress-sN makes several (step, block) pairs share a buffer (the list holds it twice)."""
    model = small_model(device, dtype)  # h = 96, 4 heads of 24
    h, R, steps, past = 96, len(model.core), 3, 5
    W, eps = model.adapter.weight, model.core[0].norm_1.eps
    ref_cache = KVCache(16, strategy, R, steps)
    with torch.no_grad():
        feed(model, torch.randint(0, 17, (2, past), device=device), ref_cache, steps)
        cache = copy.deepcopy(ref_cache)  # (its core entries stay views of its own core)
        cos, sin = model.rope_cos[past:past + T], model.rope_sin[past:past + T]
        mask = torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past)
        s, e = (torch.randn(2, T, h, device=device, dtype=dtype) for _ in range(2))
        ref = s
        for step in range(steps):
            ref = model.core_step(ref, e, cos, sin, step, ref_cache, mask)
        keys = [("core", step, j) for step in range(steps) for j in range(R)]
        k_cache = [cache.buffers(key, 2, 4, 24, dtype, device)[0] for key in keys]
        v_cache = [cache.buffers(key, 2, 4, 24, dtype, device)[1] for key in keys]
        out = ops.recurrent_steps_cached(s, F.linear(e, W[:, h:]), W, ops.block_weights(model.core), cos, sin,
                                         None, k_cache, v_cache, past, steps, 4, eps)
    assert_close([out], [ref], dtype, "recurrent_steps_cached")
    assert cache.entries.keys() == ref_cache.entries.keys()
    for key in ref_cache.entries:
        assert_close(list(cache.entries[key]), list(ref_cache.entries[key]), dtype, f"cache entry {key}")


# -----------------------------------------------------------------------------
# torch.library.opcheck and float64 gradcheck


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    torch.manual_seed(0)
    smp = samples(device, torch.float32, 3, 7, 96, 4)
    x, y, w, wn = smp["add_rmsnorm"]
    gate_up = smp["swiglu"][0]
    qkv, bias, cos, sin, n_head = smp["qk_bias_rope"]
    s, e, W = smp["adapter"]
    nograd = lambda *ts: [t.detach() for t in ts]  # noqa: E731
    q = torch.randn(3, 4, 7, 24, device=device)
    cases = [
        (torch.ops.minird.add_rmsnorm, (x, y, w, wn, 1e-6)),
        (torch.ops.minird.add_rmsnorm, (x, None, w, None, 1e-6)),
        (torch.ops.minird.add_rmsnorm_backward, (*nograd(x, x, x, y, w, wn), 1e-6)),
        (torch.ops.minird.add_rmsnorm_backward, (nograd(x)[0], None, *nograd(x, y, w), None, 1e-6)),
        (torch.ops.minird.swiglu, (gate_up,)),
        (torch.ops.minird.swiglu_backward, (torch.randn(3, 7, 96, device=device), gate_up.detach())),
        (torch.ops.minird.qk_bias_rope, (qkv, bias, cos, sin, n_head)),
        (torch.ops.minird.qk_bias_rope_backward, (q, torch.randn_like(q), torch.randn_like(q), cos, sin)),
        (torch.ops.minird.adapter, (s, e, W)),
    ]
    model = small_model(device, torch.float32)
    sd, ed = nograd(s, e)
    cache = [torch.randn(3, 4, 16, 24, device=device) for _ in range(2 * 3)]  # 16 positions, 7 new at 5..11
    args = (sd, ed, model.adapter.weight.detach(), [t.detach() for t in ops.block_weights(model.core)], cos, sin)
    cases += [(torch.ops.minird.qk_bias_rope_cache, (*nograd(qkv, bias), cos, sin, n_head, cache[0], cache[1], 5)),
              (torch.ops.minird.recurrent_steps, (*args, None, 2, 4, 1e-6)),
              (torch.ops.minird.recurrent_steps, (*args, random_mask(3, 7, device), 2, 4, 1e-6)),
              (torch.ops.minird.recurrent_steps_cached, (*args, None, cache, [c + 1 for c in cache], 5, 2, 4, 1e-6))]
    for op, inputs in cases:
        torch.library.opcheck(op, inputs)


def test_gradcheck_float64():
    torch.manual_seed(0)
    smp = samples("cpu", torch.float64, 2, 3, 8, 2)
    x, y, w, wn = smp["add_rmsnorm"]
    s, e, W = smp["adapter"]
    qkv, bias, cos, sin, n_head = smp["qk_bias_rope"]
    assert torch.autograd.gradcheck(lambda *a: ops.add_rmsnorm(*a, 1e-6), (x, y, w, wn))
    assert torch.autograd.gradcheck(lambda x, w: ops.add_rmsnorm(x, None, w, None, 1e-6)[0], (x, w))
    assert torch.autograd.gradcheck(ops.swiglu, smp["swiglu"])
    assert torch.autograd.gradcheck(lambda q, b: ops.qk_bias_rope(q, b, cos, sin, n_head), (qkv, bias))
    assert torch.autograd.gradcheck(ops.adapter, (s, e, W))


# -----------------------------------------------------------------------------
# the model with kernels on and off


def set_kernels(model, on):
    model.use_kernels = on
    return model


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_model_logits_and_generation(device, dtype):
    model = small_model(device, dtype).eval()
    idx = torch.randint(0, 17, (3, 20), device=device)
    for num_steps in (1, 4, (2, 1)):
        torch.manual_seed(1)  # the same noisy s0 on both paths
        ref, _ = set_kernels(model, False)(idx, num_steps=num_steps)
        torch.manual_seed(1)
        out, _ = set_kernels(model, True)(idx, num_steps=num_steps)
        assert_close([out], [ref], dtype, f"logits at num_steps={num_steps}")
    # greedy generation with a KV cache: the no-grad steps run in recurrent_steps (C++ loop)
    prompt = idx[:1, :5]
    torch.manual_seed(2)
    ref = generate(set_kernels(model, False), prompt, 12, num_steps=3).ids
    torch.manual_seed(2)
    out = generate(set_kernels(model, True), prompt, 12, num_steps=3).ids
    if dtype == torch.float32:  # bf16 rounding may flip a near-tie argmax: compare text in fp32 only
        assert out.tolist() == ref.tolist()


def test_model_training_steps():
    """A few AdamW steps with sampled (n, k) and noisy s0, alternating the last-step and the
    per-step loss: the same loss curve, kernels on or off."""
    model_ref = set_kernels(small_model("cpu", torch.float32), False).train()
    model = set_kernels(copy.deepcopy(model_ref), True)
    losses = {}
    for m in (model_ref, model):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(3)
        torch.manual_seed(4)
        curve = []
        for i in range(4):
            idx = torch.randint(0, 17, (4, 24), generator=gen)
            lookups = torch.randint(0, 4, (4, 23), generator=gen) if i % 2 else None
            _, loss = m(idx[:, :-1], idx[:, 1:], target_lookups=lookups)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        losses[m.use_kernels] = curve
    assert torch.allclose(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-5, atol=0), losses


def test_compile_fullgraph_matches_eager():
    model = set_kernels(small_model("cpu", torch.float32, init_scale=0.0), True)
    idx = torch.randint(0, 17, (2, 9))
    compiled = torch.compile(model, fullgraph=True)
    out, loss = compiled(idx, idx, num_steps=(1, 2))
    ref, loss_ref = model(idx, idx, num_steps=(1, 2))
    assert_close([out], [ref], torch.float32, "compiled logits")
    g = torch.autograd.grad(loss, list(model.parameters()))
    g_ref = torch.autograd.grad(loss_ref, list(model.parameters()))
    assert_close(g, g_ref, torch.float32, "compiled grads")


def test_switches_and_missing_extension():
    """MINIRD_KERNELS=0 turns the kernels off; without minird._C the model runs, after a one-line warning."""
    code = ("import sys, torch; {setup}\n"
            "from minird import ops; from minird.model import RecurrentDepthConfig, RecurrentDepthLM\n"
            "RecurrentDepthLM(RecurrentDepthConfig())(torch.zeros(1, 3, dtype=torch.long))\n"
            "print(ops.BUILT, ops.kernels_available('cpu'))")
    run = lambda setup, env: subprocess.run([sys.executable, "-c", code.format(setup=setup)],  # noqa: E731
                                            env={**os.environ, **env}, capture_output=True, text=True, check=True)
    off = run("", {"MINIRD_KERNELS": "0"})
    assert off.stdout.strip() == "True False" and "minird" not in off.stderr
    missing = run("sys.modules['minird._C'] = None", {})
    assert missing.stdout.strip() == "False False"
    lines = [line for line in missing.stderr.splitlines() if "minird" in line]
    assert len(lines) == 1 and lines[0].startswith("minird: C++/CUDA kernels not built"), missing.stderr


# -----------------------------------------------------------------------------
# bad input: a TORCH_CHECK naming the argument and what was expected


def bad_calls(device):
    """[(call, the message it must raise)]: each argument check of the ops, once. On the meta device
    the calls run the fake kernels (minird/ops.py), which check shapes but not dtypes or strides."""
    smp = samples(device, torch.float32, 2, 3, 64, 4)
    x, y, w, wn = (t.detach() for t in smp["add_rmsnorm"])
    qkv, bias, cos, sin, n_head = smp["qk_bias_rope"]
    qkv, bias = qkv.detach(), bias.detach()
    s, e, W = (t.detach() for t in smp["adapter"])
    bad = [
        (lambda: ops.add_rmsnorm(x, y, torch.ones(63, device=device), None), "weight must have shape [64]"),
        (lambda: ops.add_rmsnorm(x, y[:, :2].contiguous(), w, None), "y must have shape [2, 3, 64]"),
        (lambda: ops.swiglu(torch.randn(2, 5, device=device)), "gate_up must have shape (..., 2*I)"),
        (lambda: ops.qk_bias_rope(qkv, bias[:, :, :3].contiguous(), cos, sin, n_head),
         "qk_bias must have shape [2, 1, 4, 1, 16]"),
        (lambda: ops.qk_bias_rope(qkv, bias, cos[:2], sin, n_head), "cos must have shape [3, 8]"),
        (lambda: ops.qk_bias_rope(qkv, bias, cos, sin, 5), "n_head=5 must divide h=64"),
        (lambda: ops.adapter(s, e, W[:, :64].contiguous()), "weight must have shape [64, 128]"),
    ]
    # KV caches: buffers of different lengths (one mask for all), and no room at pos
    cache = torch.zeros(2, 4, 8, 16, device=device)
    bad.append((lambda: ops.qk_bias_rope_cache(qkv, bias, cos, sin, n_head, cache, cache, 6),
                "positions pos .. pos + T - 1 = 6 .. 8 must lie in the cache's length L = 8"))
    bad.append((lambda: ops.qk_bias_rope_cache(qkv, bias, cos, sin, n_head, cache[:1].contiguous(), cache, 0),
                "k_cache must have shape (B, nh, L, hs) = (2, 4, L, 16)"))
    model = small_model(device, torch.float32)
    k_cache = [torch.randn(1, 4, 8, 24, device=device) for _ in range(2 * 3)]
    short = k_cache[:-1] + [k_cache[-1][:, :, :7].contiguous()]
    args = (torch.randn(1, 1, 96, device=device), torch.randn(1, 1, 96, device=device),
            model.adapter.weight.detach(), [t.detach() for t in ops.block_weights(model.core)],
            model.rope_cos[5:6], model.rope_sin[5:6])
    bad.append((lambda: ops.recurrent_steps_cached(*args, None, k_cache, short, 5, 2, 4, 1e-6),
                "v_cache[i] must have shape [1, 4, 8, 24]"))
    bad.append((lambda: ops.recurrent_steps_cached(*args, None, k_cache[:2], k_cache[:2], 5, 2, 4, 1e-6),
                "k_cache and v_cache must hold num_steps * R = 6 tensors, got 2 and 2"))
    if device != "meta":
        bad += [(lambda: ops.add_rmsnorm(x, y.double(), w, None), "y must have dtype Float"),
                (lambda: ops.add_rmsnorm(x.transpose(0, 1), y.transpose(0, 1), w, None), "x must be contiguous"),
                (lambda: ops.add_rmsnorm(x.long(), None, w.long(), None), "x must be a floating tensor")]
    if device == "cuda":
        bad.append((lambda: ops.add_rmsnorm(x, y.cpu(), w, None), "y must be on cuda"))
    return bad


@pytest.mark.parametrize("device", DEVICES + ["meta"])
def test_bad_input(device):
    """Real kernels and fake ones (meta: what torch.compile traces) refuse the same calls, alike."""
    for call, message in bad_calls(device):
        with pytest.raises(RuntimeError) as info:
            call()
        assert message in str(info.value), f"expected {message!r} in: {info.value}"
