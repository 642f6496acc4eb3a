"""
The fused recurrent step from Python: loads the C++/CUDA extension minird._C, tells torch how to
trace its ops (fake tensors, so torch.compile(fullgraph=True) works) and how to differentiate
them (the backward is made of ops too), and runs the steps of RecurrentDepthLM.iterate on them.
This layer takes tensors (the state, the weights), not the model: the model draws s0 and calls it.

The ops (schemas in csrc/ops.cpp; each kernel file says what it fuses and why):
    add_rmsnorm(x, y, w, w_next)   norm(x + y) * w, and norm of that * w_next, in one pass
    swiglu(gate_up)                silu(gate) * up
    qk_bias_rope(qkv, ...)         split heads, add the q/k bias, rotate q and k
    qk_bias_rope_cache(qkv, ...)   the same at inference, k and v written straight into the KV cache
    adapter(s, e_proj, W)          W [s; e] with W_e e computed once per forward, not once per step
    recurrent_steps(...)           num_steps whole steps (adapter + R blocks) in one C++ call
    recurrent_steps_cached(...)    the same with a KV cache, written in place
    decode_steps(...)              the same for one new token, in one persistent CUDA kernel

The plain PyTorch code in minird/model.py is the specification: with the kernels on or off the
model computes the same function (tests/test_ops.py checks it). Kernels are off when minird._C
is not built (a one-line warning says so), when MINIRD_KERNELS=0 is set before import, or when
a model's use_kernels attribute is False.
"""

import logging
import os

import torch
from torch.nn import functional as F

try:
    from minird import _C  # noqa: F401  (loading it registers torch.ops.minird.*)
    BUILT = True
except ImportError as exc:
    BUILT = False
    # through logging: one line on stderr (a warning would also print the importing source line)
    logging.getLogger("minird").warning(f"minird: C++/CUDA kernels not built ({exc}); using the pure-PyTorch path")

ENABLED = BUILT and os.environ.get("MINIRD_KERNELS", "1") != "0"
# Which devices have kernels (a CPU-only build has no CUDA ones). Read once, so that the check
# inside a torch.compile'd forward is a constant lookup.
_HAS_KERNELS = {dev: ENABLED and torch._C._dispatch_has_kernel_for_dispatch_key("minird::swiglu", key)
                for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))}
_HAS_DECODE_KERNEL = ENABLED and torch._C._dispatch_has_kernel_for_dispatch_key("minird::decode_steps", "CUDA")
# One token's steps run in decode_steps up to this width, on the chain of fused ops (cuBLAS GEMVs)
# above it: the persistent kernel wins where a step is latency-bound (small h: 70 vs 100 us per
# step at h = 256, both under a CUDA graph) and loses where it is bandwidth-bound (Huginn's h = 5280,
# csrc/README.md). Read at every call: the benchmarks set it to compare the two.
DECODE_KERNEL_MAX_WIDTH = int(os.environ.get("MINIRD_DECODE_KERNEL_MAX_WIDTH", "4096"))


def kernels_available(device_type):
    """True when the minird kernels are built, enabled and exist for this device type ('cpu', 'cuda')."""
    return _HAS_KERNELS.get(device_type, False)


# -----------------------------------------------------------------------------
# the ops, as differentiable Python functions


def add_rmsnorm(x, y, weight, weight_next=None, eps=1e-6):
    """(norm(x + y) * weight, norm(that) * weight_next); y may be None (a plain RMSNorm); the second
    output is an empty tensor when weight_next is None."""
    return torch.ops.minird.add_rmsnorm(x, y, weight, weight_next, eps)


def swiglu(gate_up):
    """gate_up (..., 2I) -> silu(gate) * up (..., I)."""
    return torch.ops.minird.swiglu(gate_up)


def qk_bias_rope(qkv, qk_bias, cos, sin, n_head):
    """qkv (B, T, 3h) -> q, k, v (B, nh, T, hs), contiguous, with q and k biased and rotated."""
    return torch.ops.minird.qk_bias_rope(qkv, qk_bias, cos, sin, n_head)


def adapter(s, e_proj, weight):
    """W [s; e] for weight W = [W_s W_e] (h, 2h), given e_proj = W_e e."""
    return torch.ops.minird.adapter(s, e_proj, weight)


def qk_bias_rope_cache(qkv, qk_bias, cos, sin, n_head, k_cache, v_cache, pos):
    """qkv (B, T, 3h) -> q (B, nh, T, hs); k and v are written into k_cache, v_cache (B, nh, L, hs)
    at positions pos .. pos + T - 1 (inference only)."""
    return torch.ops.minird.qk_bias_rope_cache(qkv, qk_bias, cos, sin, n_head, k_cache, v_cache, pos)


def recurrent_steps(s, e_proj, adapter_weight, block_weights, cos, sin, mask, num_steps, n_head, eps):
    """num_steps steps in one C++ call (no autograd: for steps run under torch.no_grad). mask: None
    (causal) or the attention mask of model.forward."""
    return torch.ops.minird.recurrent_steps(s, e_proj, adapter_weight, block_weights, cos, sin, mask, num_steps,
                                            n_head, eps)


def recurrent_steps_cached(s, e_proj, adapter_weight, block_weights, cos, sin, mask, k_cache, v_cache, pos,
                           num_steps, n_head, eps):
    """recurrent_steps with a KV cache: k_cache, v_cache hold num_steps * R buffers (B, nh, L, hs),
    one per (step, block), written at positions pos .. pos + T - 1."""
    return torch.ops.minird.recurrent_steps_cached(s, e_proj, adapter_weight, block_weights, cos, sin, mask,
                                                   k_cache, v_cache, pos, num_steps, n_head, eps)


def decode_steps(s, e_proj, adapter_weight, block_weights, cos, sin, k_cache, v_cache, pos, num_steps, n_head, eps,
                 pos_on_device=None):
    """recurrent_steps_cached for one new token (B = T = 1), in one CUDA kernel launch. pos_on_device:
    a (1,) int64 tensor the kernel reads the position from when it runs (pos is then its bound), so
    that a CUDA graph can replay one captured launch at every position. e_proj and adapter_weight
    None: the blocks alone, without the adapter (sandwich_blocks of one decoding token)."""
    return torch.ops.minird.decode_steps(s, e_proj, adapter_weight, block_weights, cos, sin, k_cache, v_cache,
                                         pos, num_steps, n_head, eps, pos_on_device)


# The tensors of one core block, in the order recurrent_steps takes them (csrc/ops.cpp, BlockWeight).
BLOCK_TENSORS = ("norm_1", "Wqkv", "qk_bias", "attn_proj", "norm_2", "norm_3", "fc", "mlp_proj", "norm_4")


# -----------------------------------------------------------------------------
# fake (meta) kernels: the output shapes, after the checks the C++ side makes (csrc/minird.h), with
# its messages, so that a traced call (torch.compile, meta tensors) fails where a real one would


def _check(ok, op, message):
    if not ok:
        raise RuntimeError(f"{op}: {message}")


def _check_shape(t, op, name, expected):
    _check(list(t.shape) == list(expected), op, f"{name} must have shape {list(expected)}, got {list(t.shape)}")


def _check_add_rmsnorm(op, x, y, weight, weight_next):
    h = x.shape[-1]
    if y is not None:
        _check_shape(y, op, "y", x.shape)
    _check_shape(weight, op, "weight", [h])
    if weight_next is not None:
        _check_shape(weight_next, op, "weight_next", [h])


def _check_qk_bias_rope(qkv, qk_bias, cos, sin, n_head, op="qk_bias_rope"):
    _check(qkv.dim() == 3 and qkv.shape[2] % 3 == 0, op, f"qkv must have shape (B, T, 3*h), got {list(qkv.shape)}")
    h = qkv.shape[2] // 3
    _check(n_head > 0 and h % n_head == 0 and (h // n_head) % 2 == 0, op,
           f"n_head={n_head} must divide h={h} into heads of even size")
    hs = h // n_head
    _check_shape(qk_bias, op, "qk_bias", [2, 1, n_head, 1, hs])
    _check_shape(cos, op, "cos", [qkv.shape[1], hs // 2])
    _check_shape(sin, op, "sin", [qkv.shape[1], hs // 2])


def _check_steps(op, s, e_proj, adapter_weight, block_weights, num_steps, n_head, k_cache=None, v_cache=None,
                 pos=0):
    _check(s.dim() == 3, op, f"s must have shape (B, T, h), got {list(s.shape)}")
    _check(num_steps >= 0, op, f"num_steps must be >= 0, got {num_steps}")
    B, T, h = s.shape
    _check(len(block_weights) > 0 and len(block_weights) % len(BLOCK_TENSORS) == 0, op,
           f"block_weights must hold 9 tensors per core block, got {len(block_weights)}")
    R = len(block_weights) // len(BLOCK_TENSORS)
    if k_cache is not None:
        _check(len(k_cache) == num_steps * R and len(v_cache) == len(k_cache), op,
               f"k_cache and v_cache must hold num_steps * R = {num_steps * R} tensors, got {len(k_cache)} and "
               f"{len(v_cache)}")
    _check(n_head > 0 and h % n_head == 0, op, f"n_head={n_head} must divide h={h}")
    if num_steps > 0 and adapter_weight is not None:  # the adapter checks these when it first runs
        _check_shape(e_proj, "adapter", "e_proj", s.shape)
        _check_shape(adapter_weight, "adapter", "weight", [h, 2 * h])
    if k_cache and num_steps > 0:
        L = k_cache[0].shape[2] if k_cache[0].dim() == 4 else -1
        _check(0 <= pos and pos + T <= L, op, f"positions pos .. pos + T - 1 = {pos} .. {pos + T - 1} must lie in "
                                              f"the caches' length L = {L}")
        for t, name in [(t, "k_cache[i]") for t in k_cache] + [(t, "v_cache[i]") for t in v_cache]:
            _check_shape(t, op, name, [B, n_head, L, h // n_head])
    I = block_weights[BLOCK_TENSORS.index("fc")].shape[0] // 2
    for j in range(R):
        w = dict(zip(BLOCK_TENSORS, block_weights[j * len(BLOCK_TENSORS):(j + 1) * len(BLOCK_TENSORS)]))
        _check_shape(w["Wqkv"], op, "Wqkv.weight", [3 * h, h])
        _check_shape(w["attn_proj"], op, "attn.proj.weight", [h, h])
        _check_shape(w["fc"], op, "mlp.fc.weight", [2 * I, h])
        _check_shape(w["mlp_proj"], op, "mlp.proj.weight", [h, I])


if BUILT:

    @torch.library.register_fake("minird::add_rmsnorm")
    def _(x, y, weight, weight_next, eps):
        _check_add_rmsnorm("add_rmsnorm", x, y, weight, weight_next)
        return torch.empty_like(x), torch.empty_like(x) if weight_next is not None else x.new_empty(0)

    @torch.library.register_fake("minird::add_rmsnorm_backward")
    def _(grad_out, grad_next, x, y, weight, weight_next, eps):
        _check_add_rmsnorm("add_rmsnorm_backward", x, y, weight, weight_next)
        _check_shape(grad_out, "add_rmsnorm_backward", "grad_out", x.shape)
        gwn = torch.empty_like(weight_next) if weight_next is not None else x.new_empty(0)
        return torch.empty_like(x), torch.empty_like(weight), gwn

    def _add_rmsnorm_setup(ctx, inputs, output):
        x, y, weight, weight_next, eps = inputs
        ctx.save_for_backward(x, y, weight, weight_next)
        ctx.eps = eps

    def _add_rmsnorm_backward(ctx, grad_out, grad_next):
        x, y, weight, weight_next = ctx.saved_tensors
        if weight_next is None:
            grad_next = None
        else:
            grad_next = grad_next.contiguous()
        grad_x, grad_w, grad_wn = torch.ops.minird.add_rmsnorm_backward(
            grad_out.contiguous(), grad_next, x, y, weight, weight_next, ctx.eps)
        return (grad_x, grad_x if y is not None else None, grad_w,
                grad_wn if weight_next is not None else None, None)

    torch.library.register_autograd("minird::add_rmsnorm", _add_rmsnorm_backward, setup_context=_add_rmsnorm_setup)

    @torch.library.register_fake("minird::swiglu")
    def _(gate_up):
        _check(gate_up.shape[-1] % 2 == 0, "swiglu", f"gate_up must have shape (..., 2*I), got {list(gate_up.shape)}")
        return gate_up.new_empty(gate_up.shape[:-1] + (gate_up.shape[-1] // 2,))

    @torch.library.register_fake("minird::swiglu_backward")
    def _(grad, gate_up):
        return torch.empty_like(gate_up)

    def _swiglu_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def _swiglu_backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        return torch.ops.minird.swiglu_backward(grad.contiguous(), gate_up)

    torch.library.register_autograd("minird::swiglu", _swiglu_backward, setup_context=_swiglu_setup)

    @torch.library.register_fake("minird::qk_bias_rope")
    def _(qkv, qk_bias, cos, sin, n_head):
        _check_qk_bias_rope(qkv, qk_bias, cos, sin, n_head)
        B, T, h3 = qkv.shape
        shape = (B, n_head, T, h3 // 3 // n_head)
        return qkv.new_empty(shape), qkv.new_empty(shape), qkv.new_empty(shape)

    @torch.library.register_fake("minird::qk_bias_rope_backward")
    def _(grad_q, grad_k, grad_v, cos, sin):
        B, nh, T, hs = grad_q.shape
        return grad_q.new_empty(B, T, 3 * nh * hs)

    def _qk_bias_rope_setup(ctx, inputs, output):
        qkv, qk_bias, cos, sin, n_head = inputs
        ctx.save_for_backward(cos, sin)

    def _qk_bias_rope_backward(ctx, grad_q, grad_k, grad_v):
        cos, sin = ctx.saved_tensors
        grad_qkv = torch.ops.minird.qk_bias_rope_backward(
            grad_q.contiguous(), grad_k.contiguous(), grad_v.contiguous(), cos, sin)
        grad_bias = None
        if ctx.needs_input_grad[1]:  # the bias is added before the rotation: its grad is the q/k grad summed
            B, nh, T, hs = grad_q.shape
            grad_bias = grad_qkv[..., :2 * nh * hs].reshape(B * T, 2, nh, hs).sum(0).view(2, 1, nh, 1, hs)
        return grad_qkv, grad_bias, None, None, None

    torch.library.register_autograd("minird::qk_bias_rope", _qk_bias_rope_backward, setup_context=_qk_bias_rope_setup)

    @torch.library.register_fake("minird::adapter")
    def _(s, e_proj, weight):
        _check_shape(e_proj, "adapter", "e_proj", s.shape)
        _check_shape(weight, "adapter", "weight", [s.shape[-1], 2 * s.shape[-1]])
        return torch.empty_like(s)

    def _adapter_setup(ctx, inputs, output):
        s, e_proj, weight = inputs
        ctx.save_for_backward(s if ctx.needs_input_grad[2] else None, weight if ctx.needs_input_grad[0] else None)

    def _adapter_backward(ctx, grad):
        s, weight = ctx.saved_tensors
        h = grad.size(-1)
        grad_s = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_s = grad @ weight[:, :h]
        if ctx.needs_input_grad[2]:  # only W_s's half: W_e's grad comes through e_proj = F.linear(e, W_e)
            grad_w = F.pad(grad.reshape(-1, h).t() @ s.reshape(-1, h), (0, h))
        return grad_s, grad, grad_w

    torch.library.register_autograd("minird::adapter", _adapter_backward, setup_context=_adapter_setup)

    @torch.library.register_fake("minird::qk_bias_rope_cache")
    def _(qkv, qk_bias, cos, sin, n_head, k_cache, v_cache, pos):
        _check_qk_bias_rope(qkv, qk_bias, cos, sin, n_head)
        op, (B, T, h3) = "qk_bias_rope_cache", qkv.shape
        hs = h3 // 3 // n_head
        _check(k_cache.dim() == 4 and [k_cache.shape[i] for i in (0, 1, 3)] == [B, n_head, hs], op,
               f"k_cache must have shape (B, nh, L, hs) = ({B}, {n_head}, L, {hs}), got {list(k_cache.shape)}")
        _check_shape(v_cache, op, "v_cache", k_cache.shape)
        _check(0 <= pos and pos + T <= k_cache.shape[2], op, f"positions pos .. pos + T - 1 = {pos} .. {pos + T - 1} "
                                                             f"must lie in the cache's length L = {k_cache.shape[2]}")
        return qkv.new_empty(B, n_head, T, h3 // 3 // n_head)

    @torch.library.register_fake("minird::recurrent_steps")
    def _(s, e_proj, adapter_weight, block_weights, cos, sin, mask, num_steps, n_head, eps):
        _check_steps("recurrent_steps", s, e_proj, adapter_weight, block_weights, num_steps, n_head)
        return torch.empty_like(s)

    @torch.library.register_fake("minird::recurrent_steps_cached")
    def _(s, e_proj, adapter_weight, block_weights, cos, sin, mask, k_cache, v_cache, pos, num_steps, n_head, eps):
        _check_steps("recurrent_steps_cached", s, e_proj, adapter_weight, block_weights, num_steps, n_head, k_cache,
                     v_cache, pos)
        return torch.empty_like(s)

    @torch.library.register_fake("minird::decode_steps")
    def _(s, e_proj, adapter_weight, block_weights, cos, sin, k_cache, v_cache, pos, num_steps, n_head, eps,
          pos_on_device=None):
        _check((e_proj is None) == (adapter_weight is None), "decode_steps",
               "e_proj and adapter_weight must be given together (or neither: the blocks without the adapter)")
        _check_steps("decode_steps", s, e_proj, adapter_weight, block_weights, num_steps, n_head, k_cache, v_cache,
                     pos)
        return torch.empty_like(s)


# -----------------------------------------------------------------------------
# the recurrence on the kernels: RecurrentDepthLM.iterate / core_step, on tensors, same math

def block_weights(blocks):
    """The tensors of sandwich blocks (the core, or the prelude or coda), 9 per block, block after
    block, each in BLOCK_TENSORS order."""
    return [w for b in blocks for w in (b.norm_1.weight, b.attn.Wqkv.weight, b.attn.qk_bias, b.attn.proj.weight,
                                      b.norm_2.weight, b.norm_3.weight, b.mlp.fc.weight, b.mlp.proj.weight,
                                      b.norm_4.weight)]


def sandwich_blocks(x, weights, n_head, eps, cos, sin, kv_cache=None, cache_keys=(), mask=None):
    """x (B, T, h) through the sandwich blocks whose tensors are weights (block_weights of them), on
    the fused ops, each residual add + norm fused with the following pre-norm (norm_2 with norm_3,
    norm_4 with the next block's norm_1); block j writes its keys and values to kv_cache under
    cache_keys[j]. Matches SandwichBlock.forward, block after block."""
    B, T, h = x.shape
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # a bf16 model may keep fp32 tables; the kernels take one dtype
    if kv_cache is not None and not torch.is_grad_enabled() and _decodes_in_kernel(x, kv_cache):
        return _blocks_in_decode_kernel(x, weights, n_head, eps, cos, sin, kv_cache, cache_keys)
    blocks = [dict(zip(BLOCK_TENSORS, weights[i:i + len(BLOCK_TENSORS)]))
              for i in range(0, len(weights), len(BLOCK_TENSORS))]
    s = x
    x, _ = add_rmsnorm(s, None, blocks[0]["norm_1"], None, eps)
    for j, w in enumerate(blocks):
        q, k, v = qk_bias_rope(F.linear(x, w["Wqkv"]), w["qk_bias"], cos, sin, n_head)
        if kv_cache is not None:
            k, v = kv_cache.update(cache_keys[j], k, v)  # (B, nh, T_past + T, hs)
        if mask is None:  # causal; one token attends to every key (as model.Attention)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = F.linear(y.transpose(1, 2).reshape(B, T, h), w["attn_proj"])
        s, x = add_rmsnorm(s, y, w["norm_2"], w["norm_3"], eps)
        y = F.linear(swiglu(F.linear(x, w["fc"])), w["mlp_proj"])
        next_norm_1 = blocks[j + 1]["norm_1"] if j + 1 < len(blocks) else None
        s, x = add_rmsnorm(s, y, w["norm_4"], next_norm_1, eps)
    return s


def core_step(s, e_proj, adapter_weight, weights, n_head, eps, cos, sin, step, kv_cache=None, mask=None):
    """One differentiable step on the fused ops: the adapter, then the R core blocks. Matches
    RecurrentDepthLM.core_step given e_proj = W_e e and weights = block_weights(model.core)."""
    keys = [("core", step, j) for j in range(len(weights) // len(BLOCK_TENSORS))]
    return sandwich_blocks(adapter(s, e_proj, adapter_weight), weights, n_head, eps, cos, sin, kv_cache, keys, mask)


def iterate(s, e, num_steps, adapter_weight, weights, n_head, eps, cos, sin, kv_cache=None, mask=None,
            keep_states=False, first_step=0):
    """RecurrentDepthLM.iterate on the kernels, from the state s (B, T, h), steps first_step,
    first_step + 1, ... The steps without gradient run in one C++ call; the steps with gradient go
    through core_step's differentiable ops."""
    n_no_grad, n_grad = num_steps
    no_grad_steps = range(first_step, first_step + n_no_grad)
    h = e.size(-1)
    s = s.contiguous()  # the C++ steps take contiguous states; an s0 may be a slice (continuous_compute's s[:, -1:])
    cos, sin = cos.to(s.dtype), sin.to(s.dtype)  # a bf16 model may keep fp32 tables; the kernels take one dtype
    e_proj = F.linear(e, adapter_weight[:, h:])  # W_e e: once per forward, reused by every step
    if n_no_grad > 0:
        with torch.no_grad():
            if kv_cache is not None and kv_cache.position_on_device:
                s = _steps_at_device_position(s, e_proj, adapter_weight, weights, n_head, eps, cos, sin, mask,
                                              no_grad_steps, kv_cache)
            else:
                s = _steps_in_cpp(s, e_proj, adapter_weight, weights, n_head, eps, cos, sin, mask, no_grad_steps,
                                  kv_cache)
    states = []
    for step in range(no_grad_steps.stop, no_grad_steps.stop + n_grad):
        s = core_step(s, e_proj, adapter_weight, weights, n_head, eps, cos, sin, step, kv_cache, mask)
        states.append(s)
    return states if keep_states else s


def _cache_buffers(kv_cache, s, steps, n_weights, n_head):
    """The (step, core block) key and value buffers of kv_cache for the steps (a range), in the order
    the ops take them (step after step, block after block)."""
    keys = [("core", step, j) for step in steps for j in range(n_weights // len(BLOCK_TENSORS))]
    return _buffers_of(kv_cache, keys, s, n_head)


def _buffers_of(kv_cache, keys, s, n_head):
    """(key buffers, value buffers) of kv_cache's entries under keys, for states like s (B, T, h)."""
    B, _, h = s.shape
    pairs = [kv_cache.buffers(key, B, n_head, h // n_head, s.dtype, s.device) for key in keys]
    return [k for k, _ in pairs], [v for _, v in pairs]


def _kernel_position(kv_cache):
    """(pos, pos_on_device) for decode_steps: the host's seq_len; or for a DecodeView, the device
    position the kernel reads when it runs, with the last cache position as its bound."""
    if kv_cache.position_on_device:
        return kv_cache.cache.max_len - 1, kv_cache.positions
    return kv_cache.seq_len, None


def _use_decode_kernel(s):
    return s.device.type == "cuda" and _HAS_DECODE_KERNEL and s.size(-1) <= DECODE_KERNEL_MAX_WIDTH


def _decodes_in_kernel(s, kv_cache):
    """Whether one new token s (1, 1, h) after kv_cache runs in decode_steps: a single row on CUDA
    without padding (the kernel takes no mask; one token attends to every cached key)."""
    B, T, _ = s.shape
    cache = kv_cache.cache if kv_cache.position_on_device else kv_cache
    return B == 1 and T == 1 and _use_decode_kernel(s) and cache.tokens is None


def _blocks_in_decode_kernel(x, weights, n_head, eps, cos, sin, kv_cache, cache_keys):
    """sandwich_blocks of one new token in one decode_steps launch (one step, no adapter), at
    kv_cache's position: the host's seq_len, or a DecodeView's device position."""
    k_cache, v_cache = _buffers_of(kv_cache, cache_keys, x, n_head)
    pos, pos_on_device = _kernel_position(kv_cache)
    return decode_steps(x.contiguous(), None, None, weights, cos, sin, k_cache, v_cache, pos, 1, n_head, eps,
                        pos_on_device)


def _steps_in_cpp(s, e_proj, adapter_weight, weights, n_head, eps, cos, sin, mask, steps, kv_cache):
    """The steps (a range of step indices) in one C++ call, writing kv_cache in place; one new token
    on CUDA (decode) runs in the persistent decode_steps kernel."""
    if kv_cache is None:
        return recurrent_steps(s, e_proj, adapter_weight, weights, cos, sin, mask, len(steps), n_head, eps)
    k_cache, v_cache = _cache_buffers(kv_cache, s, steps, len(weights), n_head)
    args = (k_cache, v_cache, kv_cache.seq_len, len(steps), n_head, eps)
    if _decodes_in_kernel(s, kv_cache):
        return decode_steps(s, e_proj, adapter_weight, weights, cos, sin, *args)
    return recurrent_steps_cached(s, e_proj, adapter_weight, weights, cos, sin, mask, *args)


def _steps_at_device_position(s, e_proj, adapter_weight, weights, n_head, eps, cos, sin, mask, steps, view):
    """The steps of new tokens whose positions are a device tensor (a kv_cache.DecodeView: one token
    per row while decoding, or a verify's drafts), with no host value in any kernel argument: what
    a CUDA graph captures once and replays at every position. One token of one row on CUDA:
    decode_steps reading the position from view.positions; otherwise core_step per step (Python
    runs only while the graph is captured)."""
    if _decodes_in_kernel(s, view):
        k_cache, v_cache = _cache_buffers(view, s, steps, len(weights), n_head)
        pos, pos_on_device = _kernel_position(view)
        return decode_steps(s, e_proj, adapter_weight, weights, cos, sin, k_cache, v_cache, pos, len(steps), n_head,
                            eps, pos_on_device)
    for step in steps:
        s = core_step(s, e_proj, adapter_weight, weights, n_head, eps, cos, sin, step, view, mask)
    return s
