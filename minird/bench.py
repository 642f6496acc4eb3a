"""
Time one recurrent step (adapter + R core blocks) five ways, on every device here:

    python -m minird.bench                 # all devices; --device=cpu or --device=cuda for one
    python -m minird.bench --device=cpu --threads=1
    python -m minird.bench --generate      # also generate() end to end: tokens/s at r = 4 and 32, batch
                                           # 1 to 64, plain loop and one CUDA graph per token; diffusion forcing

eager           RecurrentDepthLM.core_step, the pure-PyTorch reference
torch.compile   the same Python loop under torch.compile (default mode)
CUDA graph      the eager loop captured once and replayed (CUDA only)
minird          the fused ops: recurrent_steps_cached (one C++ call for all r steps) at decode,
                ops.core_step + autograd in training
minird + graph  the same, captured and replayed (CUDA only)
decode kernel   decode only, CUDA only: decode_steps, all r steps of the token in one persistent kernel
                (+ graph: captured and replayed)

Cases (docs/ARCHITECTURE.md, section 4): (a) decode: B=1, one new token after a KV cache of 128
tokens, r=4 steps for the token, h=256 and 1024; bf16 on GPU, fp32 on CPU. (b) training: B=64, T=256, h=256,
forward + backward through 4 steps (on the 2-core CPU, B=8 so that the run ends in minutes).
All: R=4 core blocks, heads of 64, SwiGLU inner size 4h. Times are us per recurrent step
(median over repeats on GPU, fastest repeat on CPU, / r), ratios are eager / variant.

The floor is what no implementation can beat: the bytes a step must read (weights, and the KV
cache at decode) over measured memory bandwidth, or its matrix FLOPs over measured peak FLOP/s.
"""

import statistics
import sys
import time
import warnings

import torch
from torch.nn import functional as F

from minird import ops
from minird.cli import Parser
from minird.generate import feed, generate
from minird.kv_cache import KVCache
from minird.model import RecurrentDepthConfig, RecurrentDepthLM

R = 4          # core blocks
STEPS = 4      # recurrent steps timed together (decode: r for one token; training: k grad steps)
CACHE = 128    # decode: tokens already in the KV cache
# the toy Huginn-shaped model of the generate() tables (h 256, heads of 64, P2 R4 C2)
TOY_HUGINN_SHAPE = dict(vocab_size=256, block_size=512, n_embd=256, n_head=4, intermediate_size=1024,
                        n_layers_in_prelude=2, n_layers_in_recurrent_block=4, n_layers_in_coda=2)


def bench_config(h):
    return RecurrentDepthConfig(vocab_size=256, block_size=512, n_embd=h, n_head=h // 64, intermediate_size=4 * h,
                                n_layers_in_recurrent_block=R, mean_recurrence=STEPS)


def bench_model(h, device, dtype):
    """The model of the cases, on the reference path: the eager columns time the plain PyTorch code."""
    torch.manual_seed(0)
    model = RecurrentDepthLM(bench_config(h)).to(device, dtype)
    model.use_kernels = False
    return model


# -----------------------------------------------------------------------------
# timing


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, min_time=0.5, max_reps=200):
    """Wall time of fn() in seconds, after warm-up; repeats for about min_time seconds. The median
    on a GPU; on a CPU the fastest repeat, since the CPU may be shared and other load only ever
    adds time (on the 2-core dev machines medians moved 5x between runs)."""
    for _ in range(3):
        fn()
    sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 5 or time.perf_counter() - start < min_time):
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times) if device == "cuda" else min(times)


def cuda_graph(fn):
    """Capture fn once (after warm-up on a side stream, as torch.cuda.graph wants); return replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def kernels_per_step(fn):
    """GPU kernels (and copies) that one call of fn launches, per recurrent step, by the profiler."""
    from torch.profiler import ProfilerActivity, profile
    with warnings.catch_warnings():  # the profiler warns once that it clears its events: not ours to act on
        warnings.simplefilter("ignore", UserWarning)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events()) / STEPS


def measure_ceilings(device):
    """(bytes/s, FLOP/s) measured here: a large copy (read + write) and a large matrix product."""
    if device == "cuda":
        n, dtype = 1 << 28, torch.bfloat16
        size = 8192
    else:
        n, dtype = 1 << 24, torch.float32
        size = 1024
    a = torch.randn(n, device=device, dtype=dtype)
    b = torch.empty_like(a)
    bw = 2 * a.nbytes / median_time(lambda: b.copy_(a), device, min_time=0.2)
    x = torch.randn(size, size, device=device, dtype=dtype)
    flops = 2 * size ** 3 / median_time(lambda: x @ x, device, min_time=0.2)
    return bw, flops


# -----------------------------------------------------------------------------
# the two cases


def step_params(model):
    """Parameters one recurrent step reads: the adapter and the R core blocks."""
    return model.adapter.weight.numel() + sum(p.numel() for p in model.core.parameters())


def decode_cache(model, device):
    """(a KV cache holding CACHE random tokens fed at STEPS steps, its (step, core block) key
    buffers, its value buffers), the buffers in the order decode_steps takes them. Every timed
    call writes the new token at position CACHE (the same place each time: the cache does not grow
    while the step is repeated)."""
    cache = KVCache(CACHE + 1, n_core_layers=R, num_steps=STEPS)
    feed(model, torch.randint(0, 256, (1, CACHE), device=device), cache, STEPS)
    keys = [("core", step, j) for step in range(STEPS) for j in range(R)]
    return cache, [cache.entries[key][0] for key in keys], [cache.entries[key][1] for key in keys]


def decode_case(device, dtype, h):
    """Variants for decode (one token, KV cache of CACHE tokens), each running STEPS steps."""
    model = bench_model(h, device, dtype).eval()
    W, nh, eps = model.adapter.weight, model.core[0].attn.n_head, model.core[0].norm_1.eps
    cache, k_cache, v_cache = decode_cache(model, device)
    cos, sin = model.rope_cos[CACHE:CACHE + 1], model.rope_sin[CACHE:CACHE + 1]
    mask = torch.ones(1, CACHE + 1, dtype=torch.bool, device=device)  # what model.forward passes
    s = torch.randn(1, 1, h, device=device, dtype=dtype)
    e = torch.randn(1, 1, h, device=device, dtype=dtype)
    weights = ops.block_weights(model.core)

    def eager_steps(s, e):
        for step in range(STEPS):
            s = model.core_step(s, e, cos, sin, step, cache, mask)
        return s

    def fused_steps(steps, *mask):
        return lambda s, e: steps(s, F.linear(e, W[:, h:]), W, weights, cos, sin, *mask, k_cache, v_cache, CACHE,
                                  STEPS, nh, eps)

    compiled = torch.compile(eager_steps)
    variants = {"eager": lambda: eager_steps(s, e), "torch.compile": lambda: compiled(s, e)}
    fused = {}
    if ops.kernels_available(device):
        fused["minird"] = fused_steps(ops.recurrent_steps_cached, None)
    if device == "cuda" and ops._HAS_DECODE_KERNEL:
        fused["decode kernel"] = fused_steps(ops.decode_steps)
    for name, steps in fused.items():
        variants[name] = lambda steps=steps: steps(s, e)
        with torch.no_grad():
            ref = eager_steps(s, e).float()
            err = (steps(s, e).float() - ref).norm() / ref.norm()
        print(f"  decode h={h}: {name} vs eager, relative difference {err.item():.1e}")
    kv_bytes = 2 * R * (CACHE + 1) * h * s.element_size()
    floor_bytes = step_params(model) * s.element_size() + kv_bytes
    floor_flops = 2 * step_params(model) + 4 * R * (CACHE + 1) * h
    return variants, floor_bytes, floor_flops


def train_case(device, dtype, B, T, h):
    """Variants for training: forward + backward through STEPS steps with gradient."""
    model = bench_model(h, device, dtype).train()
    nh, eps = model.config.n_head, model.config.norm_eps
    W = model.adapter.weight
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    s = torch.randn(B, T, h, device=device, dtype=dtype)
    e = torch.randn(B, T, h, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, T, h, device=device, dtype=dtype)

    def eager_steps(s, e):
        for step in range(STEPS):
            s = model.core_step(s, e, cos, sin, step)
        return s

    weights = ops.block_weights(model.core)

    def minird_steps(s, e):
        e_proj = F.linear(e, W[:, h:])
        for step in range(STEPS):
            s = ops.core_step(s, e_proj, W, weights, nh, eps, cos, sin, step)
        return s

    compiled = torch.compile(eager_steps)
    backward = lambda steps: lambda: steps(s, e).backward(grad)  # noqa: E731
    variants = {"eager": backward(eager_steps), "torch.compile": backward(compiled)}
    if ops.kernels_available(device):
        variants["minird"] = backward(minird_steps)
    tokens = B * T
    floor_bytes = step_params(model) * s.element_size()
    # forward 2 FLOPs per parameter per token, backward twice that; causal attention ~2 B T^2 h per block
    floor_flops = 3 * (2 * tokens * step_params(model) + 2 * B * T * T * h * R)
    return variants, floor_bytes, floor_flops


def run_device(device):
    """Measure and print one table; each row is printed as soon as it is measured."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    bw, peak = measure_ceilings(device)
    train_B = 64 if device == "cuda" else 8
    cases = [(f"decode h=256 B=1 cache={CACHE}", lambda: decode_case(device, dtype, 256), torch.no_grad),
             (f"train h=256 B={train_B} T=256 fwd+bwd", lambda: train_case(device, dtype, train_B, 256, 256),
              torch.enable_grad),
             (f"decode h=1024 B=1 cache={CACHE}", lambda: decode_case(device, dtype, 1024), torch.no_grad)]
    columns = ["eager", "torch.compile"] + (["CUDA graph"] if device == "cuda" else []) + ["minird"]
    columns += ["minird + graph", "decode kernel", "decode kernel + graph"] if device == "cuda" else []
    print(f"\n{name}, {dtype}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
          f"measured {bw / 1e9:.0f} GB/s copy, {peak / 1e12:.2f} TFLOP/s matmul")
    stat = "median" if device == "cuda" else "fastest of the repeats"
    print(f"us per recurrent step, {stat} (ratio to eager: higher is faster); "
          "floor = max(bytes / bandwidth, FLOPs / peak)")
    cells = [f"{'case':<34}"] + [f"{c:>16}" for c in columns] + [f"{'floor (bytes, flops)':>22}"]
    cells += [f"{'kernels/step':>20}"] if device == "cuda" else []
    print("| " + " | ".join(cells) + " |")
    print("|" + "|".join("-" * (len(c) + 2) for c in cells) + "|")
    for label, make, grad_mode in cases:
        with grad_mode():
            variants, floor_bytes, floor_flops = make()
            if device == "cuda":
                for graphed, base in (("CUDA graph", "eager"), ("minird + graph", "minird"),
                                      ("decode kernel + graph", "decode kernel")):
                    if base in variants:
                        try:
                            variants[graphed] = cuda_graph(variants[base])
                        except Exception as exc:
                            print(f"  {label} / {graphed}: capture failed: {type(exc).__name__}: {exc}")
            us = {}
            for k, fn in variants.items():
                try:
                    us[k] = median_time(fn, device) / STEPS * 1e6
                except Exception as exc:  # a variant that fails is reported, not fatal
                    print(f"  {label} / {k}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            counts = {}
            if device == "cuda":  # launches per step, from the profiler: what the time is made of
                counts = {k: kernels_per_step(variants[k]) for k in ("eager", "minird", "decode kernel")
                          if k in variants}
        t_bytes, t_flops = floor_bytes / bw * 1e6, floor_flops / peak * 1e6
        cells = [f"{label:<34}"]
        cells += [f"{us[c]:8.1f} ({us['eager'] / us[c]:4.2f}x)" if c in us and "eager" in us else f"{'n/a':>16}"
                  for c in columns]
        cells += [f"{f'{max(t_bytes, t_flops):.1f} ({t_bytes:.1f}, {t_flops:.1f})':>22}"]
        if device == "cuda":
            cells += [f"{' -> '.join(f'{n:.3g}' for n in counts.values()):>20}"]  # decode kernel: 1/r
        print("| " + " | ".join(cells) + " |", flush=True)


# -----------------------------------------------------------------------------
# end to end: what generate() costs per token, all of it (embed, prelude, the r steps, coda, head,
# the choice of the next token, and Python), on a model of Huginn's layout at toy width

def decode_floor(model, batch, num_steps, bandwidth):
    """Tokens/s of all rows if a token read only its weights, once, at bandwidth (bytes/s): the
    embedding, prelude and coda once, the adapter and the core once per step, for all rows at once."""
    once = sum(p.numel() for part in (model.prelude, model.coda) for p in part.parameters()) + model.wte.weight.numel()
    size = model.wte.weight.element_size()
    return batch * bandwidth / ((once + num_steps * step_params(model)) * size)


def decode_rate(run, rows, new_tokens, device, max_reps=5):
    """(the output of run(new_tokens), tokens/s of decoding alone): rows * (new_tokens - 1) tokens
    over the time of generating new_tokens less the time of generating 1 (the prompt's forward and
    the first token). run(n) generates n tokens; median_time warms each up first (and a CUDA graph
    is captured then) and times up to max_reps runs."""
    outputs = {}

    def timed(n):
        outputs[n] = run(n)

    seconds = {n: median_time(lambda: timed(n), device, min_time=0.3, max_reps=max_reps) for n in (1, new_tokens)}
    return outputs[new_tokens], rows * (new_tokens - 1) / max(seconds[new_tokens] - seconds[1], 1e-9)


LOOKAHEAD = 8  # drafted tokens per round of the self-speculative rows (the official default)


def generation_rows(device, new_tokens=32):
    """generate() greedy after a prompt of CACHE tokens, at r = 4 and 32, batch 1, 16 and 64: the
    plain loop on the reference path (eager) and on the kernels, and each token one CUDA graph
    replay (minird.graphed; on the kernels, and on the reference ops). Decoding tokens/s, us per
    recurrent step, and the floor: the weights one token reads (the prelude, coda and head once,
    the adapter and core once per step, for all rows of a batch at once) at the measured
    bandwidth. Then diffusion forcing against greedy at r = 32: tokens/s and the share of tokens
    that agree (a random model: the share says little about a trained one), and self-speculative
    decoding with plain and graphed drafts (the share of drafts kept, likewise)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    config = RecurrentDepthConfig(**TOY_HUGINN_SHAPE, token_shift=False, init_scale=0.0)
    model = RecurrentDepthLM(config).to(device, dtype).eval()
    bw, _ = measure_ceilings(device)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    paths = {"eager": (False, False), "minird kernels": (True, False), "graph (eager ops)": (False, True),
             "graph (minird kernels)": (True, True)}
    print(f"\ngenerate(), {name}, {dtype}: h=256, P2 R4 C2, heads of 64, greedy, {new_tokens} new tokens after a "
          f"prompt of {CACHE}; decoding tokens/s of all rows (us per recurrent step)")
    print("| batch | r | " + " | ".join(paths) + " | floor |")
    print("|---" * (len(paths) + 3) + "|")
    cases = [(1, 4), (1, 32)] + ([(16, 32), (64, 32)] if device == "cuda" else [(8, 32)])
    for batch, r in cases:
        prompt = torch.randint(0, 256, (batch, CACHE), device=device)
        cells = []
        for kernels, graph in paths.values():
            model.use_kernels = kernels
            if (kernels and not ops.kernels_available(device)) or (graph and device != "cuda"):
                cells.append("n/a")
                continue
            run = lambda n: generate(model, prompt, n, num_steps=r, cuda_graph=graph)  # noqa: E731
            # Only the reference path's plain loop at r = 32 (~90 ms a token) times 8 tokens. On the
            # kernels 8 were ~15 ms against a prompt's forward whose time moved by ~10 ms between runs:
            # their difference once gave 1,520 tok/s where decode_steps alone allows ~480 (H100).
            slow_reference_loop = r == 32 and not kernels and not graph
            _, tok_s = decode_rate(run, batch, 8 if slow_reference_loop else new_tokens, device)
            cells.append(f"{tok_s:.0f} ({1e6 * batch / tok_s / r:.1f} us)")
        print(f"| {batch} | {r} | " + " | ".join(cells) + f" | {decode_floor(model, batch, r, bw):.0f} |", flush=True)
    model.use_kernels = True
    prompt = torch.randint(0, 256, (1, CACHE), device=device)
    greedy = generate(model, prompt, new_tokens, num_steps=32)
    seconds = median_time(lambda: generate(model, prompt, new_tokens, num_steps=32), device, min_time=0.3, max_reps=5)
    print(f"\ndiffusion forcing vs greedy, batch 1, r = 32 for the prompt, {new_tokens} new tokens, same model")
    print("| sampler | tokens/s (prompt included) | forwards | core steps per token | tokens as greedy |")
    print("|---|---|---|---|---|")
    print(f"| greedy ({'graph' if device == 'cuda' else 'plain loop'}) | {new_tokens / seconds:.0f} | "
          f"{greedy.stats.forwards} | 32 | - |")
    for inner in (4, 8):
        def diffusion():
            return generate(model, prompt, new_tokens, num_steps=32, diffusion_forcing=True, inner_recurrence=inner,
                            max_diffusion_steps=16 * new_tokens)
        out = diffusion()
        seconds = median_time(diffusion, device, min_time=0.3, max_reps=5)
        agree = (out.ids[0, CACHE:] == greedy.ids[0, CACHE:out.ids.size(1)]).float().mean().item()
        print(f"| diffusion, inner_recurrence {inner} | {(out.ids.size(1) - CACHE) / seconds:.0f} | "
              f"{out.stats.forwards} | {out.steps[0, CACHE:].float().mean():.1f} | {agree:.0%} |", flush=True)
    print(f"\nadaptive exit vs a fixed r, batch 1, at most 32 steps, {new_tokens} new tokens, same model: each "
          "step on the kernels, then the criterion and one wait for the device (the host decides whether to "
          "run the next step); through graphs, a replay per step")
    print("| decoding | tokens/s (decoding) | core steps per token | us per core step |")
    print("|---|---|---|---|")
    loops = [("plain loop", False)] + ([("graph", True)] if device == "cuda" else [])
    exits = [(f"fixed r = 32, {loop}", dict(cuda_graph=graph)) for loop, graph in loops]
    exits += [(f"adaptive, {criterion}, {loop}", dict(criterion=criterion, cuda_graph=graph))
              for criterion in ("latent-diff", "kl") for loop, graph in loops]
    for label, options in exits:
        run = lambda n: generate(model, prompt, n, num_steps=32, **options)  # noqa: E731
        out, tok_s = decode_rate(run, 1, new_tokens, device)
        steps = out.steps[0, CACHE:].float().mean().item()  # the tokens fed back, which decode_rate times
        print(f"| {label} | {tok_s:.0f} | {steps:.1f} | {1e6 / tok_s / steps:.1f} |", flush=True)
    print(f"\nself-speculative vs greedy, batch 1, r = 32, {new_tokens} new tokens, same model: drafts at "
          f"draft_steps, {LOOKAHEAD} a round, verified in one forward at r = 32 (greedy's tokens up to rounding: "
          f"the verify runs {LOOKAHEAD + 1} tokens a forward)")
    print("| drafts | draft_steps | tokens/s (prompt included) | forwards | drafted tokens kept | tokens as greedy |")
    print("|---|---|---|---|---|---|")
    for draft_steps in (4, 8):
        for graph in ((False, True) if device == "cuda" else (False,)):
            def speculative():
                return generate(model, prompt, new_tokens, num_steps=32, draft_steps=draft_steps,
                                lookahead_for_draft=LOOKAHEAD, cuda_graph=graph)
            out = speculative()
            seconds = median_time(speculative, device, min_time=0.3, max_reps=5)
            agree = (out.ids[0, CACHE:] == greedy.ids[0, CACHE:]).float().mean().item()
            print(f"| {'graph replays' if graph else 'plain forwards'} | {draft_steps} | {new_tokens / seconds:.0f} | "
                  f"{out.stats.forwards} | {out.stats.acceptance_rate:.0%} | {agree:.0%} |", flush=True)


def main(argv):
    parser = Parser(prog="minird.bench", description=__doc__.splitlines()[1])
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all",
                        help="all: the CPU, and the GPU where there is one")
    parser.add_argument("--generate", action="store_true",
                        help="also time generate() end to end (tokens/s), on a Huginn-layout toy model")
    parser.add_argument("--generate_only", action="store_true", help="only the generate() tables")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (default 0: torch's); 1 is steadier on a CPU shared with other work")
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device=cuda but this torch has no CUDA device (torch.cuda.is_available() is False)")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not ops.BUILT:
        print("minird._C is not built: the minird columns will be missing")
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("no CUDA device: skipping the GPU table")
            continue
        if device == "cpu":
            torch.set_flush_denormal(True)  # denormals made CPU elementwise ops ~10x slower (docs/TRAINING_LOG.md)
        if not args.generate_only:
            run_device(device)
        if args.generate or args.generate_only:
            generation_rows(device)


if __name__ == "__main__":
    main(sys.argv[1:])
