"""
decode_steps (csrc/cuda/decode.cu), the persistent decode kernel -- num_steps recurrent steps for one
new token in one cooperative launch -- against recurrent_steps (csrc/ops.cpp), the chain of fused
ops whose loop is its specification. CUDA only.

Checked: the final state and the keys/values written into the cache at pos (relative error
||out - ref|| / ||ref||: <= 1e-5 in fp32, <= 2e-2 in bf16) over h = 64, 96, 256, 1024 (heads of
16, 24, 48, 64), R = 1, 4, num_steps = 1, 3, pos = 0, 5, 127, with one buffer per (step, block)
and with shared ones (compress-sN: N = R, and N = 1); the blocks alone, without the adapter (the
prelude's and coda's launch); the rest of every cache buffer untouched;
more steps than one launch takes; the same bits for any grid size, with the GEMV rows copied into
shared memory (opt-in; where the launcher applies it, read from its MINIRD_DECODE_VERBOSE plan), from
a CUDA graph replay, and with the position read from the device (one captured launch replayed at
several positions). Both kernels:
version 2 (the cooperative grid) and version 4 (one thread block cluster, csrc/cuda/decode_cluster.cu)
where it applies (h = 256, 1024), chosen with MINIRD_DECODE_VERSION; version 4's bits do not depend
on the cluster's size or on where it reads the weights from;
torch.library.opcheck; bad input fails with a message naming the argument. On failure each
assertion prints, per tensor, the relative error and the largest absolute difference.
"""
import functools

import pytest
import torch
from torch.nn import functional as F

from minird import ops
from minird.model import RecurrentDepthConfig, RecurrentDepthLM


def has_decode_kernel():
    try:
        return ops.BUILT and torch._C._dispatch_has_kernel_for_dispatch_key("minird::decode_steps", "CUDA")
    except RuntimeError:  # the op is not defined in this build
        return False


pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="decode_steps is a CUDA kernel"),
              pytest.mark.skipif(not has_decode_kernel(), reason="minird._C has no CUDA decode_steps")]

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
EPS = 1e-6
L = 160  # cache length: positions 0 .. L - 1
# (h, n_head): heads of 16, 24, 48, 64
SHAPES = [(64, 4), (96, 4), (96, 2), (256, 4), (1024, 16)]


# the sizes version 4 (the cluster kernel) takes: h = 1, 2, 4 (8 in fp32) x 32 x 16 bytes of elements
CLUSTER_SIZES = (256, 1024)


@pytest.fixture(params=["2", "4"], ids=["v2", "v4"])
def version(request, monkeypatch):
    """Which kernel serves the call: version 2 (grid) or 4 (cluster), where the test's h allows it."""
    monkeypatch.setenv("MINIRD_DECODE_VERSION", request.param)
    return request.param


def skip_unless_applies(version, h):
    if version == "4" and h not in CLUSTER_SIZES:
        pytest.skip(f"version 4 does not take h={h}")


@pytest.fixture(autouse=True)
def full_fp32_matmuls():
    """The fp32 reference must not run its GEMMs in TF32."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


# -----------------------------------------------------------------------------
# inputs


@functools.lru_cache(maxsize=None)
def core_weights(h, n_head, R, dtype):
    """(adapter weight, block weights in BlockWeight order, rope cos, rope sin) of a RecurrentDepthLM,
    detached. Weights are re-drawn so every sub-layer matters without making the step chaotic (an
    fp32 comparison over 3 steps must not amplify rounding noise past 1e-5): GEMV weights
    N(0, 1/fan_in) times 0.5 (Wqkv times 1: q.k / sqrt(hs) ~ N(0, 1), attention far from uniform),
    norm weights 1 + 0.1 N(0, 1), q/k bias 0.1 N(0, 1)."""
    I = 4 * h if h >= 256 else 2 * h + 32  # bench: 4h; small h: an I that is no multiple of h
    config = RecurrentDepthConfig(vocab_size=17, block_size=L, n_embd=h, n_head=n_head, intermediate_size=I,
                       n_layers_in_recurrent_block=R)
    torch.manual_seed(h + 7 * n_head + R)
    model = RecurrentDepthLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "qk_bias" in name:
                p.copy_(0.1 * torch.randn_like(p))
            elif p.dim() == 2:
                p.copy_(torch.randn_like(p) * (1.0 if "Wqkv" in name else 0.5) / p.size(1) ** 0.5)
    model = model.to("cuda", dtype)
    blocks = [w.detach() for w in ops.block_weights(model.core)]
    return model.adapter.weight.detach(), blocks, model.rope_cos.detach(), model.rope_sin.detach()


class Case:
    """One call's inputs. Entry step * R + j of k_cache/v_cache is buffer slot_of[step * R + j]:
    its own buffer, or with slots=N the compress-sN sharing (step * R + j) mod N. Positions < pos
    hold random keys/values; positions >= pos hold 1000, which no correct kernel reads before it
    writes pos."""

    def __init__(self, h, n_head, R, num_steps, pos, dtype, slots=None, seed=0, adapter=True):
        self.h, self.n_head, self.R, self.num_steps, self.pos, self.dtype = h, n_head, R, num_steps, pos, dtype
        self.W, self.blocks, cos, sin = core_weights(h, n_head, R, dtype)
        self.cos, self.sin = cos[pos:pos + 1], sin[pos:pos + 1]
        g = torch.Generator(device="cuda").manual_seed(seed)
        randn = lambda *shape: torch.randn(*shape, device="cuda", generator=g).to(dtype)  # noqa: E731
        self.s = randn(1, 1, h)
        self.e_proj = F.linear(randn(1, 1, h), self.W[:, h:])
        if not adapter:  # the blocks alone (the prelude's or coda's of a decoding token)
            self.W = self.e_proj = None
        n_entries = num_steps * R
        self.slot_of = list(range(n_entries)) if slots is None else [i % slots for i in range(n_entries)]
        n_buffers = n_entries if slots is None else min(slots, n_entries)
        hs = h // n_head

        def buffer():
            b = randn(1, n_head, L, hs)
            b[:, :, pos:] = 1000.0
            return b

        self.k0 = [buffer() for _ in range(n_buffers)]
        self.v0 = [buffer() for _ in range(n_buffers)]

    def run(self, op):
        """op on fresh copies of the caches -> (state, k buffers, v buffers) after the call."""
        k = [b.clone() for b in self.k0]
        v = [b.clone() for b in self.v0]
        out = op(*self.args(k, v))
        return out, k, v

    def args(self, k, v):
        return (self.s, self.e_proj, self.W, self.blocks, self.cos, self.sin, [k[i] for i in self.slot_of],
                [v[i] for i in self.slot_of], self.pos, self.num_steps, self.n_head, EPS)

    def run_float64(self):
        """recurrent_steps on the same values in float64: the truth both sides are judged against in
        a failure report."""
        d = lambda t: None if t is None else t.double()  # noqa: E731
        k, v = [d(b) for b in self.k0], [d(b) for b in self.v0]
        out = reference(d(self.s), d(self.e_proj), d(self.W), [d(w) for w in self.blocks], d(self.cos), d(self.sin),
                        [k[i] for i in self.slot_of], [v[i] for i in self.slot_of], self.pos, self.num_steps,
                        self.n_head, EPS)
        return out, k, v


def reference(s, e_proj, W, blocks, cos, sin, *cache_and_rest):
    """The specification: recurrent_steps_cached, the loop of fused ops in csrc/ops.cpp (no mask:
    one token sees every cached one). Without an adapter (W None): one whose output is s itself,
    exactly (W_s = I, e_proj = 0: each row's dot product is one s_i times 1, plus zeros)."""
    if W is None:
        h = s.size(-1)
        W = torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1).to(s)
        e_proj = torch.zeros_like(s)
    return torch.ops.minird.recurrent_steps_cached(s, e_proj, W, blocks, cos, sin, None, *cache_and_rest)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def describe(name, out, ref):
    diff = (out.double() - ref.double()).abs()
    i = diff.argmax().item()
    return (f"{name}: rel {rel_err(out, ref):.2e}, max abs {diff.max().item():.2e} at flat index {i} "
            f"({out.flatten()[i].item():.4g} vs {ref.flatten()[i].item():.4g}), max |ref| {ref.abs().max().item():.3g}")


def check_against_reference(case, what=""):
    """decode_steps vs recurrent_steps: the state, and each cache buffer (position pos close, the
    rest exactly as it was)."""
    out, k, v = case.run(torch.ops.minird.decode_steps)
    ref, k_ref, v_ref = case.run(reference)
    torch.cuda.synchronize()
    tol, pos = TOL[case.dtype], case.pos
    report = [describe("s", out, ref)]
    failed = rel_err(out, ref) > tol or not torch.isfinite(out).all()
    for name, bufs, refs, init in (("k", k, k_ref, case.k0), ("v", v, v_ref, case.v0)):
        for i, (b, r, b0) in enumerate(zip(bufs, refs, init)):
            report.append(describe(f"{name} buffer {i} at pos", b[:, :, pos], r[:, :, pos]))
            failed |= rel_err(b[:, :, pos], r[:, :, pos]) > tol
            for part, sl in (("before pos", slice(0, pos)), ("after pos", slice(pos + 1, None))):
                if not torch.equal(b[:, :, sl], b0[:, :, sl]):
                    report.append(f"{name} buffer {i} {part}: CHANGED ({describe('', b[:, :, sl], b0[:, :, sl])})")
                    failed = True
    if failed:  # is it the kernel, or rounding noise that both sides have? ask float64
        try:
            truth, k64, _ = case.run_float64()
            k_pos, k_ref_pos, k64_pos = k[0][:, :, pos], k_ref[0][:, :, pos], k64[0][:, :, pos]
            report.append(f"vs float64: decode_steps s rel {rel_err(out, truth):.2e}, recurrent_steps s rel "
                          f"{rel_err(ref, truth):.2e}; k buffer 0 at pos: {rel_err(k_pos, k64_pos):.2e} vs "
                          f"{rel_err(k_ref_pos, k64_pos):.2e}")
        except RuntimeError as exc:
            report.append(f"(no float64 reference: {str(exc).splitlines()[0]})")
    assert not failed, f"decode_steps vs recurrent_steps {what}(tolerance {tol:.0e}):\n  " + "\n  ".join(report)


# -----------------------------------------------------------------------------
# values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("h,n_head", SHAPES)
@pytest.mark.parametrize("R", [1, 4])
@pytest.mark.parametrize("num_steps", [1, 3])
@pytest.mark.parametrize("pos", [0, 5, 127])
@pytest.mark.parametrize("sharing", ["full", "compress-sR", "compress-s1"])
def test_decode_steps_matches_recurrent_steps(version, dtype, h, n_head, R, num_steps, pos, sharing):
    skip_unless_applies(version, h)
    slots = {"full": None, "compress-sR": R, "compress-s1": 1}[sharing]
    case = Case(h, n_head, R, num_steps, pos, dtype, slots)
    check_against_reference(case, f"v{version} h={h} nh={n_head} R={R} steps={num_steps} pos={pos} {sharing} ")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("h,n_head", SHAPES)
@pytest.mark.parametrize("R", [1, 2])
@pytest.mark.parametrize("pos", [0, 5, 127])
def test_blocks_without_the_adapter(version, dtype, h, n_head, R, pos):
    """e_proj and adapter_weight None (the prelude's or coda's blocks of one decoding token, one
    step): the blocks on s itself, as recurrent_steps with an adapter that passes s through; and
    the bits of the kernel's own run with that adapter (phase A then writes s exactly)."""
    skip_unless_applies(version, h)
    case = Case(h, n_head, R, 1, pos, dtype, adapter=False)
    check_against_reference(case, f"v{version} no adapter h={h} nh={n_head} R={R} pos={pos} ")
    out, k, v = case.run(torch.ops.minird.decode_steps)
    with_identity = Case(h, n_head, R, 1, pos, dtype)
    with_identity.W = torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1).to(case.s)
    with_identity.e_proj = torch.zeros_like(case.s)
    expected, k_ref, v_ref = with_identity.run(torch.ops.minird.decode_steps)
    assert torch.equal(out, expected), describe("s", out, expected)
    assert all(torch.equal(a, b) for a, b in zip(k + v, k_ref + v_ref)), "the caches differ"


@pytest.mark.parametrize("sharing", ["full", "compress-sR", "compress-s1"])
@pytest.mark.parametrize("h,dtype", [(64, torch.float32), (256, torch.bfloat16)], ids=["h64-fp32", "h256-bf16"])
def test_more_steps_than_one_launch(version, sharing, h, dtype):
    """25 steps at R = 4 are 100 (step, block) cache entries, more than one launch takes (96): the op
    runs 24 steps, then 1 from the state the first launch left. That must be what two calls of 24 + 1
    or 10 + 15 steps give (the state and the cache entries handed over by hand), bit for bit: the
    result does not depend on how the steps are split into launches."""
    skip_unless_applies(version, h)
    R, num_steps = 4, 25
    case = Case(h, 4, R, num_steps, 5, dtype, {"full": None, "compress-sR": R, "compress-s1": 1}[sharing])
    whole, k_whole, v_whole = case.run(torch.ops.minird.decode_steps)
    assert torch.isfinite(whole).all()
    for first in (24, 10):
        k = [b.clone() for b in case.k0]
        v = [b.clone() for b in case.v0]
        s, e_proj, W, blocks, cos, sin, k_list, v_list, pos, _, n_head, eps = case.args(k, v)
        n = first * R
        s = torch.ops.minird.decode_steps(s, e_proj, W, blocks, cos, sin, k_list[:n], v_list[:n], pos, first,
                                          n_head, eps)
        s = torch.ops.minird.decode_steps(s, e_proj, W, blocks, cos, sin, k_list[n:], v_list[n:], pos,
                                          num_steps - first, n_head, eps)
        assert torch.equal(s, whole), f"{first} + {num_steps - first} steps: {describe('s', s, whole)}"
        assert all(torch.equal(a, b) for a, b in zip(k + v, k_whole + v_whole)), f"{first} + rest: caches differ"


def test_zero_steps_returns_a_copy():
    case = Case(64, 4, 1, 0, 5, torch.float32)
    out, _, _ = case.run(torch.ops.minird.decode_steps)
    assert torch.equal(out, case.s) and out.data_ptr() != case.s.data_ptr()


def assert_same_bits_under(monkeypatch, case, envs):
    """The call's state and caches under each set of environment variables in envs are the bits of
    the call without them."""
    base, k_base, v_base = case.run(torch.ops.minird.decode_steps)
    for env in envs:
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            out, k, v = case.run(torch.ops.minird.decode_steps)
        assert torch.equal(out, base), f"{env}: {describe('s', out, base)}"
        assert all(torch.equal(a, b) for a, b in zip(k + v, k_base + v_base)), f"{env}: the caches differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("h,n_head,pos", [(96, 4, 5), (256, 4, 127), (1024, 16, 127)])
def test_same_bits_for_any_grid(monkeypatch, dtype, h, n_head, pos):
    """Every row's dot product is one warp's and every head's sums one block's, in a fixed order, so
    the grid size (MINIRD_DECODE_BLOCKS; 1 block runs every phase's grid-stride loops alone), where
    the norm weights are read from (MINIRD_DECODE_NORMS_IN_SMEM=0) and where phase C reads the keys
    and values from (MINIRD_DECODE_KV_IN_SMEM=0: the cache in L2, not the block's staged copy; a grid
    of 1 or 3 blocks, with more attention items than blocks, reads L2 too) and where the GEMVs read
    their rows from (MINIRD_DECODE_WEIGHTS_IN_SMEM=16: every core block's from the warps' copies in
    shared memory, where they fit; =1: only the first core block's; unset: L2) must not change a
    bit. Version 2 (the grid) here; version 4 in test_same_bits_for_any_cluster."""
    monkeypatch.setenv("MINIRD_DECODE_VERSION", "2")
    assert_same_bits_under(monkeypatch, Case(h, n_head, 4, 3, pos, dtype, slots=1),
                           [{"MINIRD_DECODE_BLOCKS": "1"}, {"MINIRD_DECODE_BLOCKS": "3"},
                            {"MINIRD_DECODE_BLOCKS": "100000"}, {"MINIRD_DECODE_NORMS_IN_SMEM": "0"},
                            {"MINIRD_DECODE_KV_IN_SMEM": "0"}, {"MINIRD_DECODE_WEIGHTS_IN_SMEM": "16"},
                            {"MINIRD_DECODE_WEIGHTS_IN_SMEM": "1"}])


def decode_plan(monkeypatch, capfd, case, env):
    """What version 2's launcher put in shared memory for the case's call under env (its
    MINIRD_DECODE_VERBOSE line, e.g. '... holding the norm weights: yes, ...')."""
    with monkeypatch.context() as m:
        for key, value in {"MINIRD_DECODE_VERSION": "2", "MINIRD_DECODE_VERBOSE": "1", **env}.items():
            m.setenv(key, value)
        capfd.readouterr()
        case.run(torch.ops.minird.decode_steps)
        torch.cuda.synchronize()
        lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("decode_steps: version 2")]
    assert lines, "MINIRD_DECODE_VERBOSE=1 printed no plan"
    return lines[-1]


def test_weights_in_shared_memory_where_they_fit(monkeypatch, capfd):
    """The same-bits test above means something only if the copies are made. They are opt-in
    (MINIRD_DECODE_WEIGHTS_IN_SMEM=n: at most n core blocks): at h = 96 every core block's rows fit
    in the blocks' shared memory, n caps the count, and a grid with more attention items than blocks
    keeps them in L2. At h = 256 in fp32 (I = 1024, a 128-token cache) they do not all fit: some of
    the R core blocks, not an error."""
    case = Case(96, 4, 4, 3, 5, torch.bfloat16, slots=1)
    every = {"MINIRD_DECODE_WEIGHTS_IN_SMEM": "16"}
    for env, held in (({}, 0), (every, 4), ({"MINIRD_DECODE_WEIGHTS_IN_SMEM": "1"}, 1),
                      ({**every, "MINIRD_DECODE_BLOCKS": "3"}, 0)):
        plan = decode_plan(monkeypatch, capfd, case, env)
        assert f"the weights of {held} of 4 core blocks" in plan, f"{env}: {plan}"
    some = decode_plan(monkeypatch, capfd, Case(256, 4, 4, 1, 127, torch.float32, slots=1), every)
    assert "of 4 core blocks" in some and not any(f"weights of {n} of 4" in some for n in (0, 4)), some


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("h,n_head,pos", [(256, 4, 5), (256, 4, 127), (1024, 16, 127)])
def test_same_bits_for_any_cluster(monkeypatch, dtype, h, n_head, pos):
    """Version 4: every dot product is one warp's over the same lanes, every norm one warp's, every
    head's sums one block's, so a cluster of 8 blocks instead of 16 (other slices of every phase)
    and the weights read from L2 instead of the copies staged in shared memory give the same bits."""
    monkeypatch.setenv("MINIRD_DECODE_VERSION", "4")
    assert_same_bits_under(monkeypatch, Case(h, n_head, 4, 3, pos, dtype, slots=1),
                           [{"MINIRD_DECODE_CLUSTER": "8"}, {"MINIRD_DECODE_WEIGHTS_IN_SMEM": "0"},
                            {"MINIRD_DECODE_CLUSTER": "8", "MINIRD_DECODE_WEIGHTS_IN_SMEM": "0"}])


# -----------------------------------------------------------------------------
# CUDA graph, opcheck, bad input


def test_cuda_graph_capture_and_replay(version):
    """One call captured in a CUDA graph and replayed gives the eager call's bits (state and caches),
    and a replay after new values are copied into the captured input follows them."""
    case = Case(256, 4, 4, 3, 127, torch.bfloat16, slots=4)
    eager, k_eager, v_eager = case.run(torch.ops.minird.decode_steps)
    k = [b.clone() for b in case.k0]
    v = [b.clone() for b in case.v0]
    s_static = case.s.clone()
    args = lambda: (s_static,) + case.args(k, v)[1:]  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture, as torch.cuda.graphs recommends
        torch.ops.minird.decode_steps(*args())
    torch.cuda.current_stream().wait_stream(side)
    for b, b0 in zip(k + v, case.k0 + case.v0):  # back to the initial caches before capturing
        b.copy_(b0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = torch.ops.minird.decode_steps(*args())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out_static, eager), describe("s (graph replay)", out_static, eager)
    assert all(torch.equal(a, b) for a, b in zip(k + v, k_eager + v_eager)), "graph replay: the caches differ"
    # a new state through the same graph
    new_s = torch.randn_like(case.s)
    s_static.copy_(new_s)
    graph.replay()
    torch.cuda.synchronize()
    case.s = new_s
    expected, _, _ = case.run(torch.ops.minird.decode_steps)
    assert torch.equal(out_static, expected), describe("s (replay, new input)", out_static, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_position_read_from_the_device(version, dtype):
    """pos_on_device: ONE launch captured in a CUDA graph with pos = L - 1 as the bound, replayed with
    the position tensor set to 0, 5 and 127, gives at each the bits of the eager call at that
    position (state and caches): what minird.graphed replays for every token."""
    R, num_steps, h, n_head = 4, 3, 256, 4
    pos_t = torch.zeros(1, dtype=torch.long, device="cuda")
    W, blocks, cos_table, sin_table = core_weights(h, n_head, R, dtype)
    cases = {pos: Case(h, n_head, R, num_steps, pos, dtype, slots=R, seed=0) for pos in (0, 5, 127)}
    first = cases[0]
    s_static = first.s.clone()
    k = [b.clone() for b in first.k0]
    v = [b.clone() for b in first.v0]
    cos, sin = cos_table.index_select(0, pos_t), sin_table.index_select(0, pos_t)

    def call():
        cos.copy_(cos_table.index_select(0, pos_t))
        sin.copy_(sin_table.index_select(0, pos_t))
        return torch.ops.minird.decode_steps(s_static, first.e_proj, W, blocks, cos, sin, [k[i] for i in first.slot_of],
                                             [v[i] for i in first.slot_of], L - 1, num_steps, n_head, EPS, pos_t)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = call()
    for pos, case in cases.items():
        pos_t.fill_(pos)
        for b, b0 in zip(k + v, case.k0 + case.v0):  # this position's caches (1000 from pos on)
            b.copy_(b0)
        graph.replay()
        expected, k_ref, v_ref = case.run(torch.ops.minird.decode_steps)
        torch.cuda.synchronize()
        assert torch.equal(out_static, expected), describe(f"s at pos {pos}", out_static, expected)
        assert all(torch.equal(a, b) for a, b in zip(k + v, k_ref + v_ref)), f"pos {pos}: the caches differ"


def test_opcheck():
    for case in (Case(96, 4, 2, 2, 5, torch.float32), Case(96, 4, 2, 1, 5, torch.float32, adapter=False)):
        k = [b.clone() for b in case.k0]
        v = [b.clone() for b in case.v0]
        torch.library.opcheck(torch.ops.minird.decode_steps, case.args(k, v))
        torch.library.opcheck(torch.ops.minird.decode_steps,
                              case.args(k, v) + (torch.tensor([case.pos], device="cuda"),))


def test_bad_input():
    h, nh, R, I, L, pos, steps = 96, 4, 2, 64, 8, 5, 1
    hs = h // nh
    r = lambda *shape: torch.randn(*shape, device="cuda")  # noqa: E731
    good = dict(s=r(1, 1, h), e_proj=r(1, 1, h), adapter_weight=r(h, 2 * h),
                block_weights=[t for _ in range(R) for t in (r(h), r(3 * h, h), r(2, 1, nh, 1, hs), r(h, h), r(h),
                                                             r(h), r(2 * I, h), r(h, I), r(h))],
                cos=r(1, hs // 2), sin=r(1, hs // 2), k_cache=[r(1, nh, L, hs) for _ in range(steps * R)],
                v_cache=[r(1, nh, L, hs) for _ in range(steps * R)], pos=pos, num_steps=steps, n_head=nh, eps=1e-6)
    wrong_wqkv = list(good["block_weights"])
    wrong_wqkv[1] = r(3 * h - 1, h)
    torch.ops.minird.decode_steps(*good.values())  # the good call runs
    cases = [
        (dict(s=r(2, 1, h)), "s must have shape (1, 1, h)"),
        (dict(block_weights=wrong_wqkv), "block_weights[1] (attn.Wqkv of core block 0) must have shape [288, 96]"),
        (dict(adapter_weight=r(h, h)), "adapter_weight must have shape [96, 192]"),
        (dict(e_proj=good["e_proj"].double()), "e_proj must have dtype Float"),
        (dict(e_proj=None), "e_proj and adapter_weight must be given together"),
        (dict(cos=r(1, hs)), "cos must have shape [1, 12]"),
        (dict(k_cache=good["k_cache"][:1]), "k_cache and v_cache must hold num_steps * R = 2 tensors"),
        (dict(v_cache=[good["v_cache"][0], r(1, nh, L, hs + 2)]), "v_cache[1] must have shape [1, 4, 8, 24]"),
        (dict(pos=L), "pos=8 must lie in the caches' length L = 8"),
        (dict(n_head=5), "n_head=5 must divide h=96"),
        (dict(pos_on_device=torch.tensor([5], device="cuda", dtype=torch.int32)),
         "pos_on_device must be a (1,) int64 tensor"),
        (dict(pos_on_device=torch.tensor([5])), "pos_on_device must be a (1,) int64 tensor on cuda:0"),
    ]
    for change, message in cases:
        with pytest.raises(RuntimeError) as info:
            torch.ops.minird.decode_steps(*{**good, **change}.values())
        assert message in str(info.value), f"expected {message!r} in: {info.value}"


def test_bad_kernel_choice(monkeypatch):
    """MINIRD_DECODE_VERSION=4 where version 4 does not apply, or an unknown version or cluster
    size, fails with a message that says why."""
    case = Case(96, 4, 2, 1, 5, torch.float32)
    for env, message in (({"MINIRD_DECODE_VERSION": "4"}, "MINIRD_DECODE_VERSION=4 does not apply: h must be"),
                         ({"MINIRD_DECODE_VERSION": "3"}, "MINIRD_DECODE_VERSION must be 2 or 4, got 3"),
                         ({"MINIRD_DECODE_VERSION": "4", "MINIRD_DECODE_CLUSTER": "4"},
                          "MINIRD_DECODE_CLUSTER must be 8 or 16, got 4")):
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            with pytest.raises(RuntimeError) as info:
                case.run(torch.ops.minird.decode_steps)
        assert message in str(info.value), f"{env}: expected {message!r} in: {info.value}"
