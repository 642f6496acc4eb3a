"""
Huginn-0125's shape through minird.pretrained, with random weights: save it in the official layout,
load it back with from_pretrained, decode greedily, and (with --official) do the same with the
official code on the same folder and compare the tokens.

    python tools/huginn_shape_check.py --device cuda --dtype bfloat16 --out shape_check.json
    python tools/huginn_shape_check.py ... --official PATH      # PATH: a seal-rg/recurrent-pretraining checkout
    python tools/huginn_shape_check.py --small --device cpu --dtype float32    # a smoke test in minutes
    python tools/huginn_shape_check.py --toy --device cpu --dtype float32 --speed --official PATH

The shape is h 5280, 55 heads of 96, P=2, R=4, C=2, SwiGLU inner 17920, vocabulary 65536: 3.5B
parameters, 7 GB in bf16. Each stage runs in a process of its own, so that its peak host memory
(ru_maxrss) is its own: `save` builds the random model on --device and writes it in shards of
--shard_gb; `minird` loads it with from_pretrained(dtype, device) and decodes --new_tokens tokens
greedily at --num_steps with a zero initial state; `official` (when --official is given and
transformers imports) loads the folder with RavenForCausalLM.from_pretrained, moves it to the
device, and decodes the same way through its generate. from_pretrained reads tensor by tensor
straight to the device, so its peak host memory should stay far below the checkpoint's size, and its
device memory near it (on the CPU the tensors stay memory-mapped from the files, read when first
used, so RSS says little there). Prints a table; --out writes it as JSON.
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minird.bench import TOY_HUGINN_SHAPE, decode_floor, decode_rate, measure_ceilings, sync  # noqa: E402
from minird.cli import positive_int  # noqa: E402
from minird.generate import generate  # noqa: E402
from minird.model import RecurrentDepthConfig, RecurrentDepthLM  # noqa: E402
from minird.pretrained import from_pretrained, save_pretrained  # noqa: E402

HUGINN = dict(n_embd=5280, n_head=55, intermediate_size=17920, vocab_size=65536, block_size=4096,
              n_layers_in_prelude=2, n_layers_in_recurrent_block=4, n_layers_in_coda=2)
SMALL = dict(HUGINN, n_embd=512, n_head=8, intermediate_size=1536, n_layers_in_prelude=1,
             n_layers_in_recurrent_block=2, n_layers_in_coda=1)
# minird.bench's toy Huginn-shaped model: there the host's per-op overhead, not the weights, sets the speed
TOY = dict(HUGINN, **TOY_HUGINN_SHAPE)
PROMPT_LEN = 8
SPEED_CASES = [(1, 4), (1, 32), (16, 32), (64, 32)]  # (batch, r) that --speed times


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def device_peak_gb(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def prompt(vocab_size):
    """PROMPT_LEN seeded random token ids (1, PROMPT_LEN): the model is random, so is the text."""
    return torch.randint(0, vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))


def stage_save(args, device, dtype):
    shape = SMALL if args.small else TOY if args.toy else HUGINN
    config = RecurrentDepthConfig(**shape, mean_recurrence=32, mean_backprop_depth=8,
                                  init="takase", token_shift=False, scale_embedding=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):  # initialized where it will run: a 3.5B model initializes slowly on a CPU
        model = RecurrentDepthLM(config).to(dtype)
    sync(device.type)
    t1 = time.perf_counter()
    save_pretrained(model, args.folder, shard_size=int(args.shard_gb * 2**30))
    return {"parameters": model.num_params(), "init_s": t1 - t0, "save_s": time.perf_counter() - t1,
            "checkpoint_gb": sum(p.stat().st_size for p in Path(args.folder).glob("*.safetensors")) / 2**30,
            "shards": len(list(Path(args.folder).glob("*.safetensors")))}


def minird_greedy(model, idx, args):
    """args.new_tokens greedy tokens after idx at args.num_steps, every token from s0 = 0."""
    model.config.init_scale = 0.0
    return generate(model, idx, args.new_tokens, num_steps=args.num_steps).ids[0, idx.size(1):].tolist()


def speed_prompts(vocab_size, batch, device):
    """batch seeded random prompts of PROMPT_LEN tokens, the first row prompt()'s."""
    rows = torch.randint(0, vocab_size, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    rows[0] = prompt(vocab_size)[0]
    return rows.to(device)


def minird_speed(model, args, device):
    """Decoding tokens/s at each (batch, r) of --speed, the plain loop and one CUDA graph per token,
    and diffusion forcing at batch 1 against greedy."""
    from minird import ops

    rows, (bandwidth, _), default_width = [], measure_ceilings(device.type), ops.DECODE_KERNEL_MAX_WIDTH
    for batch, r in SPEED_CASES:
        idx = speed_prompts(model.config.vocab_size, batch, device)
        row = {"batch": batch, "r": r, "floor_tok_s": decode_floor(model, batch, r, bandwidth)}
        # batch 1 runs the decode kernel up to ops.DECODE_KERNEL_MAX_WIDTH: both ways are timed
        paths = [("plain", False, 0), ("graph", True, 0)]
        if batch == 1 and device.type == "cuda" and ops.kernels_available("cuda"):
            paths += [("plain_decode_kernel", False, 1 << 30), ("graph_decode_kernel", True, 1 << 30)]
        for path, graph, max_width in paths:
            ops.DECODE_KERNEL_MAX_WIDTH = max_width
            out, row[f"{path}_tok_s"] = decode_rate(
                lambda n: generate(model, idx, n, num_steps=r, cuda_graph=graph), batch, args.new_tokens, device,
                args.repeats)
            row[f"{path}_tokens"] = out.ids[:, PROMPT_LEN:].tolist()
            row[f"{path}_kv_cache_gb"] = out.kv_cache_bytes / 2**30
        ops.DECODE_KERNEL_MAX_WIDTH = default_width
        rows.append(row)
    idx = speed_prompts(model.config.vocab_size, 1, device)
    greedy = generate(model, idx, args.new_tokens, num_steps=args.num_steps).ids[0, PROMPT_LEN:]
    for inner in (4, 8):
        sync(device.type)
        t0 = time.perf_counter()
        out = generate(model, idx, args.new_tokens, num_steps=args.num_steps, diffusion_forcing=True,
                       inner_recurrence=inner, max_diffusion_steps=16 * args.new_tokens)
        sync(device.type)
        new = out.ids[0, PROMPT_LEN:]
        rows.append({"diffusion_inner_recurrence": inner, "tok_s": new.numel() / (time.perf_counter() - t0),
                     "forwards": out.stats.forwards, "agreement": (new == greedy[:new.numel()]).float().mean().item(),
                     "steps_per_token": out.steps[0, PROMPT_LEN:].float().mean().item()})
    return rows


def official_speed(model, args, device, greedy):
    rows = []
    for batch, r in SPEED_CASES:
        idx = speed_prompts(model.config.vocab_size, batch, device)
        try:
            out, tok_s = decode_rate(lambda n: model.generate(
                idx, greedy, num_steps=r, max_new_tokens=n, init_scale=0.0, continuous_compute=False),
                batch, args.new_tokens, device, args.repeats)
            rows.append({"batch": batch, "r": r, "tok_s": tok_s, "tokens": out[:, PROMPT_LEN:].tolist()})
        except torch.OutOfMemoryError as exc:
            rows.append({"batch": batch, "r": r, "error": str(exc).splitlines()[0]})
            torch.cuda.empty_cache()
    return rows


def stage_minird(args, device, dtype):
    from minird import ops

    rss_before = peak_rss_gb()
    t0 = time.perf_counter()
    model = from_pretrained(args.folder, dtype=dtype, device=device)
    sync(device.type)
    load_s, rss_after = time.perf_counter() - t0, peak_rss_gb()
    idx = prompt(model.config.vocab_size).to(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        tokens = minird_greedy(model, idx, args)
    sync(device.type)
    result = {"load_s": load_s, "peak_rss_before_load_gb": rss_before, "peak_rss_gb": rss_after,
              "device_peak_gb": device_peak_gb(device), "decode_s": time.perf_counter() - t0, "tokens": tokens,
              "kernels": ops.kernels_available(device.type)}
    if args.speed:
        result["speed"] = minird_speed(model, args, device)
    return result


def stage_official(args, device, dtype):
    from transformers import GenerationConfig

    sys.path.insert(0, str(ROOT / "tools"))
    from make_huginn_fixture import import_official

    official = import_official(args.official)
    rss_before = peak_rss_gb()
    t0 = time.perf_counter()
    model = official.RavenForCausalLM.from_pretrained(args.folder, torch_dtype=dtype).to(device).eval()
    sync(device.type)
    load_s, rss_after = time.perf_counter() - t0, peak_rss_gb()
    idx = prompt(model.config.vocab_size).to(device)
    greedy = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=None, bos_token_id=None)
    t0 = time.perf_counter()
    out = model.generate(idx, greedy, num_steps=args.num_steps, max_new_tokens=args.new_tokens, init_scale=0.0,
                         continuous_compute=False)
    sync(device.type)
    result = {"load_s": load_s, "peak_rss_before_load_gb": rss_before, "peak_rss_gb": rss_after,
              "device_peak_gb": device_peak_gb(device), "decode_s": time.perf_counter() - t0,
              "tokens": out[0, idx.size(1):].tolist()}
    if args.speed:
        result["speed"] = official_speed(model, args, device, greedy)
    return result


STAGES = {"save": stage_save, "minird": stage_minird, "official": stage_official}


def run_stage(stage, args, folder):
    """One stage in a fresh process, with this run's settings; its result is the JSON on the last
    line of its output."""
    argv = [f"--device={args.device}", f"--dtype={args.dtype}", f"--num_steps={args.num_steps}",
            f"--new_tokens={args.new_tokens}", f"--shard_gb={args.shard_gb}", f"--folder={folder}",
            f"--repeats={args.repeats}"]
    argv += ["--small"] * args.small + ["--toy"] * args.toy + ["--speed"] * args.speed
    argv += [f"--official={args.official}"] * bool(args.official)
    result = subprocess.run([sys.executable, __file__, "--stage", stage, *argv], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"stage {stage} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(results):
    columns = [stage for stage in ("minird", "official") if stage in results]
    rows = [("load (s)", "load_s", "{:.1f}"),
            ("peak host RSS before load (GB)", "peak_rss_before_load_gb", "{:.2f}"),
            ("peak host RSS after load (GB)", "peak_rss_gb", "{:.2f}"),
            ("peak device memory (GB)", "device_peak_gb", "{:.2f}"),
            ("greedy decode (s)", "decode_s", "{:.1f}")]
    save = results["save"]
    print(f"checkpoint: {save['parameters'] / 1e9:.3f}B parameters, {save['checkpoint_gb']:.2f} GB in "
          f"{save['shards']} shards; random init {save['init_s']:.1f} s, save_pretrained {save['save_s']:.1f} s")
    print(f"{'':32}" + "".join(f"{c:>12}" for c in columns))
    for label, key, fmt in rows:
        cells = [results[c][key] for c in columns]
        print(f"{label:32}" + "".join(f"{'-' if v is None else fmt.format(v):>12}" for v in cells))
    for c in columns:
        print(f"{c} tokens: {results[c]['tokens']}")
    if "official" in results:
        print(f"tokens match: {results['minird']['tokens'] == results['official']['tokens']}")
    if "speed" in results["minird"]:
        print_speed(results)


def print_speed(results):
    official = {(row["batch"], row["r"]): row for row in results.get("official", {}).get("speed", [])}
    print("\ndecoding tokens/s of all rows (new tokens after the prompt's forward); floor: weights read once "
          "per step for all rows")
    print("| batch | r | official | minird plain loop | minird, a CUDA graph per token (CPU: uncaptured) | floor | "
          "graph / floor | "
          "same tokens (plain, graph, official) | KV cache (GB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in results["minird"]["speed"]:
        if "batch" not in row:
            continue
        ref = official.get((row["batch"], row["r"]), {})
        ref_cell = f"{ref['tok_s']:.1f}" if "tok_s" in ref else ref.get("error", "-")
        same = "yes" if row["graph_tokens"] == row["plain_tokens"] == ref.get("tokens", row["plain_tokens"]) else "NO"
        print(f"| {row['batch']} | {row['r']} | {ref_cell} | {row['plain_tok_s']:.1f} | {row['graph_tok_s']:.1f} | "
              f"{row['floor_tok_s']:.1f} | {row['graph_tok_s'] / row['floor_tok_s']:.0%} | {same} | "
              f"{row['graph_kv_cache_gb']:.2f} |")
        if "graph_decode_kernel_tok_s" in row:
            same_kernel = "yes" if row["graph_decode_kernel_tokens"] == row["plain_decode_kernel_tokens"] == ref.get(
                "tokens", row["plain_decode_kernel_tokens"]) else "NO"
            print(f"| {row['batch']} | {row['r']} | (decode kernel) | {row['plain_decode_kernel_tok_s']:.1f} | "
                  f"{row['graph_decode_kernel_tok_s']:.1f} | | {row['graph_decode_kernel_tok_s'] / row['floor_tok_s']:.0%}"
                  f" | {same_kernel} | |")
    for row in results["minird"]["speed"]:
        if "diffusion_inner_recurrence" in row:
            print(f"diffusion forcing, inner_recurrence {row['diffusion_inner_recurrence']}: {row['tok_s']:.1f} "
                  f"tok/s, {row['forwards']} forwards, {row['steps_per_token']:.1f} core steps per token, "
                  f"{row['agreement']:.0%} of tokens as greedy")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--small", action="store_true", help="h=512, 8 heads, P=1 R=2 C=1: a CPU smoke test")
    shape.add_argument("--toy", action="store_true",
                       help="minird.bench's toy model: h=256, 4 heads, P=2 R=4 C=2, vocabulary 256")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--num_steps", type=positive_int, default=32)
    parser.add_argument("--new_tokens", type=positive_int, default=16)
    parser.add_argument("--shard_gb", type=float, default=2.0, help="shard size (the hub's shards are a few GB)")
    parser.add_argument("--folder", help="where to write the checkpoint (kept); default: a temporary folder")
    parser.add_argument("--official", help="a checkout of seal-rg/recurrent-pretraining, to compare with")
    parser.add_argument("--speed", action="store_true",
                        help="also time decoding at batch 1, 16 and 64 (r = 32) and batch 1 at r = 4, the plain loop "
                             "and a CUDA graph per token, and diffusion forcing; with --official, its generate too")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="--speed: runs timed per case after 3 warm-ups (minird.bench.decode_rate: the median "
                             "on a GPU, the fastest on a CPU)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # set by run_stage
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.stage:
        print(json.dumps(STAGES[args.stage](args, device, dtype)))
        return

    folder = args.folder or tempfile.mkdtemp(prefix="huginn_shape_")
    results = {"settings": {k: v for k, v in vars(args).items() if k != "stage"}}
    try:
        results["save"] = run_stage("save", args, folder)
        results["minird"] = run_stage("minird", args, folder)
        if args.official:
            try:
                import transformers  # noqa: F401
            except ImportError:
                print("--official given but transformers is not importable: no comparison")
            else:
                results["official"] = run_stage("official", args, folder)
    finally:
        if not args.folder:
            shutil.rmtree(folder, ignore_errors=True)
    print_table(results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
