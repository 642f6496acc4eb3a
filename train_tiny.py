"""
Train a tiny recurrent-depth model on the variable-binding corpus, then show depth scaling:
held-out accuracy by difficulty (hops) for r = 1 ... 64 test-time steps.

    python train_tiny.py                        # CPU, a few minutes
    python train_tiny.py --max_iters=500 --out_dir=out-quick
    torchrun --standalone --nproc_per_node=2 train_tiny.py   # DDP (gloo on CPU, nccl on GPU)

Settings are the plain values below; any can be overridden as --key=value (nanoGPT style).
"""

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from minird.data import CharTokenizer, CorpusConfig, encode_batch, sample_extrapolation_problems, sample_problems
from minird.model import RecurrentDepthConfig, RecurrentDepthLM
from minird.utils import (ConfigError, accuracy_by_hops, apply_overrides, load_checkpoint,
                                print_depth_table, save_checkpoint, save_depth_plot)

# -----------------------------------------------------------------------------
# I/O
out_dir = "out-tiny"
eval_interval = 500  # iterations between evaluations (and checkpoints)
resume = False  # continue from out_dir/ckpt.pt
# model (see minird/model.py RecurrentDepthConfig for what each means)
n_embd = 64
n_head = 1  # one head of 64: matching a name among ~50 in one head of 16 made the first lookup a lottery
intermediate_size = 128
n_layers_in_prelude = 0
n_layers_in_recurrent_block = 1
n_layers_in_coda = 0
mean_recurrence = 4
mean_backprop_depth = 2
init = "normal"
scale_embedding = True
token_shift = True
init_scale = 0.0
block_size = 96
# corpus (see minird/data.py CorpusConfig)
n_queries = 3
n_distractors = 1
max_hops = 3
max_distractor_hops = 3
extrapolation_hops = "4-10"  # held-out difficulties beyond training
dense_targets = True  # also train every statement's value slot on its root (minird/data.py)
step_loss = True  # per-step loss: step t is asked for the targets t lookups reach (model.py)
fixed_steps = 0  # > 0: every batch runs exactly this many steps, all with gradient, instead of sampled (n, k)
# curriculum: train on hops <= current max, raised by one when the running accuracy on the targets
# that need current-max lookups (depth-max statements, answers of max - 1 hops) reaches the
# threshold (gated on accuracy, not on time: SPEC section 5)
curriculum = True
curriculum_start = 1
curriculum_threshold = 0.8
# optimizer: AdamW, linear warmup then cosine decay to min_lr
batch_size = 32
max_iters = 6000
learning_rate = 3e-3
min_lr = 1e-4
warmup_iters = 100
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
# evaluation
eval_problems = 256  # held-out lines per evaluation set
depth_steps = "1,2,4,8,16,32,64"  # r values of the final depth-scaling table
# system
device = "auto"  # auto: cuda if available, else cpu
seed = 1337
threads = 0  # torch CPU threads; 0 keeps torch's default
progress = True  # tqdm progress bar
# -----------------------------------------------------------------------------
settings = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
try:
    apply_overrides(settings, sys.argv[1:])
except ConfigError as err:
    sys.exit(f"train_tiny.py: {err}")
globals().update(settings)


def parse_settings():
    """Check the settings that are strings or ranges now, not after minutes of training."""
    try:
        lo, hi = (int(v) for v in extrapolation_hops.split("-"))
        r_values = [int(v) for v in depth_steps.split(",")]
    except ValueError:
        raise ConfigError(f"--extrapolation_hops must look like 7-10 and --depth_steps like 1,2,4 "
                          f"(got {extrapolation_hops!r}, {depth_steps!r})") from None
    if not (max_hops < lo <= hi) or min(r_values) < 1:
        raise ConfigError(f"need max_hops ({max_hops}) < extrapolation_hops ({extrapolation_hops}) "
                          f"and every depth step >= 1 ({depth_steps})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={device} but this torch has no CUDA device")
    return (lo, hi), r_values


try:
    (extra_lo, extra_hi), depth_r_values = parse_settings()
except ConfigError as err:
    sys.exit(f"train_tiny.py: {err}")

# --- system ------------------------------------------------------------------
ddp = int(os.environ.get("RANK", -1)) != -1
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
if ddp:
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank()
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
else:
    rank = 0
master = rank == 0
if device == "cpu":
    # The takase init's small output projections make denormal floats, which ran ~10x slower
    # on CPU (SPEC section 5); flushing them to zero costs nothing in accuracy.
    torch.set_flush_denormal(True)
if threads:
    torch.set_num_threads(threads)
torch.manual_seed(seed + rank)
data_rng = random.Random(seed + rank)  # each rank draws its own lines
# Every rank draws the step counts (n, k) from a generator with the same seed, so all ranks
# unroll the same number of steps each iteration (lockstep) without communicating.
steps_rng = torch.Generator().manual_seed(seed)

# --- model, corpus, optimizer ----------------------------------------------------
tokenizer = CharTokenizer()
model_args = dict(vocab_size=tokenizer.vocab_size, block_size=block_size, n_embd=n_embd, n_head=n_head,
                  intermediate_size=intermediate_size, n_layers_in_prelude=n_layers_in_prelude,
                  n_layers_in_recurrent_block=n_layers_in_recurrent_block, n_layers_in_coda=n_layers_in_coda,
                  mean_recurrence=mean_recurrence, mean_backprop_depth=mean_backprop_depth,
                  init=init, scale_embedding=scale_embedding, token_shift=token_shift, init_scale=init_scale)
corpus = CorpusConfig(n_queries=n_queries, n_distractors=n_distractors, max_hops=max_hops,
                      max_distractor_hops=max_distractor_hops)
iter_num, current_max_hops = 0, (curriculum_start if curriculum else max_hops)
if resume:
    try:
        ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"), map_location=device)
    except ValueError as err:
        sys.exit(f"train_tiny.py: {err}")
    model_args, corpus = ckpt["model_args"], CorpusConfig(**ckpt["corpus"])
    iter_num, current_max_hops = ckpt["iter_num"], ckpt["current_max_hops"]
    # new lines for each rank (not a replay of the first batches) and the shared step stream
    # continued where it stopped, so all ranks stay in lockstep
    data_rng = random.Random(f"{seed}-{rank}-{iter_num}")
    steps_rng.set_state(ckpt["steps_rng"])
model = RecurrentDepthLM(RecurrentDepthConfig(**model_args)).to(device)
optimizer = torch.optim.AdamW(
    [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": weight_decay},
     {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
    lr=learning_rate, betas=(beta1, beta2))
if resume:
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError) as err:
        sys.exit(f"train_tiny.py: the checkpoint does not fit this model ({str(err).splitlines()[0]})")
raw_model = model
if ddp:
    model = DDP(model)
if master:
    print(f"model: {raw_model.num_params():,} unique parameters; effective depth P + R*r + C = "
          f"{raw_model.effective_depth(mean_recurrence)} layers at r = {mean_recurrence}")

eval_rng = random.Random(seed + 10_000)  # held-out lines: a seed training never uses
eval_sets = {
    "in-distribution": sample_problems(eval_rng, eval_problems, CorpusConfig(**{**asdict(corpus), "min_hops": 0})),
    "extrapolation": sample_extrapolation_problems(eval_rng, eval_problems, corpus, (extra_lo, extra_hi)),
}


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / warmup_iters
    ratio = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def evaluate(r_values):
    """{set name: {r: {hops: accuracy}}} on the held-out sets, teacher-forced answers."""
    raw_model.eval()
    results = {}
    for name, problems in eval_sets.items():
        x, y, hops, _ = (t.to(device) for t in encode_batch(problems, tokenizer, block_size))
        results[name] = {r: accuracy_by_hops(raw_model, x, y, hops, r) for r in r_values}
        if name == "extrapolation":  # report only the difficulties never seen in training
            results[name] = {r: {h: a for h, a in acc.items() if h >= extra_lo} for r, acc in results[name].items()}
    raw_model.train()
    return results


def checkpoint():
    save_checkpoint(os.path.join(out_dir, "ckpt.pt"), {
        "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "model_args": model_args,
        "corpus": asdict(corpus), "tokenizer": tokenizer.chars, "iter_num": iter_num,
        "current_max_hops": current_max_hops, "settings": settings,
        "steps_rng": steps_rng.get_state(),
    })


# --- training loop ---------------------------------------------------------------
if master:
    os.makedirs(out_dir, exist_ok=True)
log = []
gate = torch.zeros(2)  # [correct, total] on the curriculum's current targets since the last check
bar = None
if master and progress:
    from tqdm import tqdm
    bar = tqdm(total=max_iters, initial=iter_num, desc="train", dynamic_ncols=True)
t0 = time.time()
while iter_num < max_iters:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr
    lines = sample_problems(data_rng, batch_size, CorpusConfig(**{**asdict(corpus), "max_hops": current_max_hops}))
    x, y, _, lookups = (t.to(device) for t in encode_batch(lines, tokenizer, block_size, dense_targets))
    num_steps = (0, fixed_steps) if fixed_steps else raw_model.sample_num_steps(steps_rng)
    logits, loss = model(x, y, num_steps=num_steps, target_lookups=lookups if step_loss else None)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    iter_num += 1

    if curriculum and current_max_hops < max_hops:
        with torch.no_grad():  # running accuracy on the current hardest targets gates the curriculum
            hard = (lookups == current_max_hops)
            stats = torch.tensor([(logits.argmax(-1)[hard] == y[hard]).sum().item(), hard.sum().item()],
                                 dtype=torch.float)
            if ddp:
                dist.all_reduce(stats)
            gate += stats
        if iter_num % 50 == 0:
            correct, total = gate.tolist()
            if total and correct / total >= curriculum_threshold:
                current_max_hops += 1
            gate.zero_()
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", hops=current_max_hops, steps=sum(num_steps))
    if iter_num % eval_interval == 0 or iter_num == max_iters:
        if master:
            acc = evaluate([mean_recurrence])["in-distribution"][mean_recurrence]
            entry = {"iter": iter_num, "time_s": round(time.time() - t0, 1), "loss": round(loss.item(), 4),
                     "max_hops": current_max_hops, "acc_by_hops": acc}
            log.append(entry)
            msg = f"iter {iter_num}: loss {loss.item():.3f}, curriculum hops <= {current_max_hops}, " + \
                  "acc@r=%d by hops: " % mean_recurrence + " ".join(f"{h}:{a:.2f}" for h, a in sorted(acc.items()))
            (bar.write if bar is not None else print)(msg)
            checkpoint()
if bar is not None:
    bar.close()

# --- depth scaling -------------------------------------------------------------------
if master:
    train_time = time.time() - t0
    r_values = depth_r_values
    results = evaluate(r_values)
    print(f"\ntrained {iter_num} iterations in {train_time:.0f} s on {device}")
    print_depth_table(results, r_values)
    with open(os.path.join(out_dir, "depth_scaling.json"), "w") as f:
        json.dump({"train_time_s": train_time, "iters": iter_num, "settings": settings, "results": results,
                   "log": log}, f, indent=1)
    plot = save_depth_plot(results, r_values, os.path.join(out_dir, "depth_scaling.png"))
    print(f"saved {out_dir}/depth_scaling.json" + (f" and {plot}" if plot else " (install matplotlib for the plot)"))
if ddp:
    dist.destroy_process_group()
