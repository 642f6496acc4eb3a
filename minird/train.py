"""
The trainer behind train_tiny.py: a tiny recurrent-depth model on the variable-binding corpus,
then its depth-scaling table. Read top to bottom: the settings (each with its allowed range) ->
system -> data, model, optimizer -> the loop (sampled steps, per-step loss, a curriculum gated on
accuracy) -> evaluation. minird.experiments trains its baselines through train() too.

    from minird.train import TrainConfig, train
    result = train(TrainConfig(max_iters=500, out_dir="out-quick"))
"""

import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from minird.checkpoint import load_checkpoint, remove_stale_temporaries, save_checkpoint
from minird.cli import ConfigError
from minird.data import DIGITS, NAMES, CharTokenizer, CorpusConfig, encode_batch, sample_problems
from minird.evaluate import depth_results, held_out_sets
from minird.model import RecurrentDepthConfig, RecurrentDepthLM


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out-tiny"
    eval_interval: int = 500  # iterations between evaluations (and checkpoints)
    resume: bool = False  # continue from out_dir/ckpt.pt, bit for bit where it stopped (on CPU)
    overwrite: bool = False  # a fresh run into an out_dir that holds a checkpoint replaces it only if True
    # model (minird/model.py RecurrentDepthConfig says what each means)
    n_embd: int = 64
    n_head: int = 1  # one head of 64: matching a name among ~50 in one head of 16 made the first lookup a lottery
    intermediate_size: int = 128
    n_layers_in_prelude: int = 0
    n_layers_in_recurrent_block: int = 1
    n_layers_in_coda: int = 0
    mean_recurrence: int = 4
    mean_backprop_depth: int = 2
    init: str = "normal"
    scale_embedding: bool = True
    token_shift: bool = True
    # The token shift starts at zero: the previous token then enters the state only as fast as the
    # loss asks for it. Initialised like the other weights, it let a run fall into a trap where the
    # head attends to the ';' after each root digit (which carries the digit through the shift, the
    # same guess as the digits themselves) and never finds the name match (docs/TRAINING_LOG.md,
    # sections 17-19: 1 run in 15 with std 0.02, 1 in 4 with 0.125, 0 in 32 from zero). < 0: the
    # model's own init.
    token_shift_init_std: float = 0.0
    init_scale: float = 0.0
    block_size: int = 96
    # corpus (minird/data.py CorpusConfig)
    n_queries: int = 3
    n_distractors: int = 1
    max_hops: int = 3
    max_distractor_hops: int = 3
    extrapolation_hops: str = "4-10"  # held-out difficulties beyond training
    dense_targets: bool = True  # also train every statement's value slot on its root (minird/data.py)
    step_loss: bool = True  # per-step loss: step t is asked for the targets t lookups reach (model.py)
    fixed_steps: int = 0  # > 0: every batch runs exactly this many steps, all with gradient, instead of sampled (n, k)
    # curriculum: train on hops <= current max, raised by one when the running accuracy on the
    # targets that need current-max lookups (depth-max statements, answers of max - 1 hops) reaches
    # the threshold (gated on accuracy, not on time: docs/TRAINING_LOG.md, session 1)
    curriculum: bool = True
    curriculum_start: int = 1
    curriculum_threshold: float = 0.8
    # for the first this many iterations the prelude's attention skips the ';' separators (0: never).
    # Where a prelude exists, its attention can park on them, tokens that carry nothing, and the run
    # then stays at the guess (training log, sections 23 and 24); kept off them, it finds the lookup.
    separator_mask_iters: int = 0
    # optimizer: AdamW, linear warmup then cosine decay to min_lr
    batch_size: int = 32
    max_iters: int = 2000  # the first lookup forms at 450-650 with these settings (32 seeds, training log 19)
    learning_rate: float = 5e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    # the plateau detector: a run whose curriculum is still at its first level at plateau_check (the
    # one-lookup targets never reached curriculum_threshold) is stuck where no healthy run is (healthy
    # runs left it at 350-900 in 54 of 54; stuck ones were still there at 1,500-6,000): it says so
    # and restarts from iteration 0 with seed + 1000 * k, at most plateau_restarts times. 0: off.
    plateau_check: int = 1000
    plateau_restarts: int = 2
    # evaluation
    eval_problems: int = 256  # held-out lines per evaluation set
    depth_steps: str = "1,2,4,8,16,32,64"  # r values of the final depth-scaling table
    # system
    device: str = "auto"  # auto: cuda if available, else cpu
    seed: int = 1337
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    progress: bool = True  # tqdm progress bar
    diag_interval: int = 0  # > 0: every this many iterations, log the first lookup's attention and gradients
    preset: str = "tiny"  # a PRESETS entry: its values replace the defaults (settings given explicitly win)

    # Settings that make the model or the data what they are: a resumed run keeps the checkpoint's.
    RUN_DEFINING = ("n_embd", "n_head", "intermediate_size", "n_layers_in_prelude", "n_layers_in_recurrent_block",
                    "n_layers_in_coda", "mean_recurrence", "mean_backprop_depth", "init", "scale_embedding",
                    "token_shift", "token_shift_init_std", "init_scale", "block_size", "n_queries", "n_distractors",
                    "max_hops",
                    "max_distractor_hops", "dense_targets", "step_loss", "fixed_steps", "seed")

    def extrapolation_range(self):
        lo, hi = (int(v) for v in self.extrapolation_hops.split("-"))
        return lo, hi

    def depth_r_values(self):
        return [int(v) for v in self.depth_steps.split(",")]

    def model_config(self):
        return RecurrentDepthConfig(
            vocab_size=CharTokenizer().vocab_size, block_size=self.block_size, n_embd=self.n_embd,
            n_head=self.n_head, intermediate_size=self.intermediate_size,
            n_layers_in_prelude=self.n_layers_in_prelude, n_layers_in_recurrent_block=self.n_layers_in_recurrent_block,
            n_layers_in_coda=self.n_layers_in_coda, mean_recurrence=self.mean_recurrence,
            mean_backprop_depth=self.mean_backprop_depth, init=self.init, scale_embedding=self.scale_embedding,
            token_shift=self.token_shift, init_scale=self.init_scale)

    def corpus_config(self):
        return CorpusConfig(n_queries=self.n_queries, n_distractors=self.n_distractors, max_hops=self.max_hops,
                            max_distractor_hops=self.max_distractor_hops)

    def validate(self):
        """ConfigError naming the first setting out of its range: checked before any work."""
        def need(ok, setting, allowed):
            if not ok:
                raise ConfigError(f"--{setting} must be {allowed}, got {getattr(self, setting)!r}")

        for name in ("eval_interval", "n_embd", "n_head", "intermediate_size", "n_layers_in_recurrent_block",
                     "mean_recurrence", "mean_backprop_depth", "n_queries", "batch_size", "max_iters",
                     "eval_problems"):
            need(getattr(self, name) >= 1, name, ">= 1")
        for name in ("n_layers_in_prelude", "n_layers_in_coda", "n_distractors", "max_distractor_hops",
                     "fixed_steps", "curriculum_start", "warmup_iters", "threads", "grad_clip", "weight_decay",
                     "init_scale", "min_lr", "plateau_check", "plateau_restarts", "diag_interval",
                     "separator_mask_iters"):
            need(getattr(self, name) >= 0 and math.isfinite(getattr(self, name)), name, ">= 0")
        need(self.n_embd % self.n_head == 0, "n_head", f"a divisor of n_embd = {self.n_embd}")
        need((self.n_embd // self.n_head) % 2 == 0, "n_head", "such that n_embd / n_head is even (RoPE rotates pairs)")
        need(self.init in ("normal", "takase"), "init", "normal or takase")
        need(self.preset in PRESETS, "preset", f"one of {', '.join(PRESETS)}")
        need(math.isfinite(self.token_shift_init_std), "token_shift_init_std", "a number (< 0: the model's init)")
        need(math.isfinite(self.learning_rate) and self.learning_rate > 0, "learning_rate", "a number > 0")
        need(self.min_lr <= self.learning_rate, "min_lr", f"<= learning_rate = {self.learning_rate}")
        need(0 <= self.beta1 < 1, "beta1", "in [0, 1)")
        need(0 <= self.beta2 < 1, "beta2", "in [0, 1)")
        need(0 < self.curriculum_threshold <= 1, "curriculum_threshold", "in (0, 1]")
        need(0 <= self.max_hops, "max_hops", ">= 0")
        need(self.curriculum_start <= self.max_hops, "curriculum_start", f"<= max_hops = {self.max_hops}")
        need(self.n_queries + self.n_distractors <= len(DIGITS), "n_distractors",
             f"<= {len(DIGITS) - self.n_queries} with {self.n_queries} queries (every chain has its own root digit)")
        # The longest line a sampler can draw: every chain at its longest, 3 characters a
        # statement ("xy;"), 3 a query ("?x5"), and the end of line.
        def check_line(chains, setting):
            names = sum(h + 1 for h in chains)
            need(names <= len(NAMES), setting, f"small enough that a line's chains need <= {len(NAMES)} names "
                                               f"(it would need {names})")
            length = 3 * names + 3 * self.n_queries + 1
            need(length - 1 <= self.block_size, "block_size", f">= {length - 1}, the longest line's inputs")

        distractors = [self.max_distractor_hops] * self.n_distractors
        check_line([self.max_hops] * self.n_queries + distractors, "max_hops")
        try:
            lo, hi = self.extrapolation_range()
        except ValueError:
            raise ConfigError(f"--extrapolation_hops must look like 4-10, got {self.extrapolation_hops!r}") from None
        need(self.max_hops < lo <= hi, "extrapolation_hops", f"lo-hi with max_hops = {self.max_hops} < lo <= hi")
        short = min(self.max_hops, self.max_distractor_hops)
        check_line([hi] + [short] * (self.n_queries - 1) + distractors, "extrapolation_hops")
        try:
            r_values = self.depth_r_values()
        except ValueError:
            r_values = [0]
        need(min(r_values) >= 1, "depth_steps", "positive integers such as 1,2,4")
        need(self.device in ("auto", "cpu", "mps") or self.device == "cuda" or self.device.startswith("cuda:"),
             "device", "auto, cpu, cuda or cuda:N")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device={self.device} but this torch has no CUDA device")
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise ConfigError(f"--out_dir={self.out_dir} is a file, not a directory")


# Other shapes of the recipe, as --preset=NAME: the values that differ from TrainConfig's defaults.
PRESETS = {
    "tiny": {},
    # Huginn's three parts: a prelude, a core of two sandwich blocks looped r times with the
    # adapter's injection, a coda. Trained on chains of up to 3 hops, its four layers did the first
    # lookups feed-forward and the loop added little (2 hops right at r = 1, extrapolation flat at
    # 50-75%); on chains of up to 6 hops, more than the layers outside the loop can hold, it learns
    # one lookup per step as the tiny model does (training log, section 22). Its first lookup formed
    # with lr 3e-3 and the model's own token-shift init, where the tiny defaults stayed at the guess
    # (section 21). Even so, 3 of 6 seeds stayed at the guess, the prelude's attention parked on the
    # separators (section 23); with the separators hidden from it for 300 iterations, 15 of 15 seeds
    # opened the second level by iteration 450 (section 24).
    "huginn": dict(n_layers_in_prelude=1, n_layers_in_recurrent_block=2, n_layers_in_coda=1, learning_rate=3e-3,
                   token_shift_init_std=-1.0, max_hops=6, extrapolation_hops="7-12", max_iters=4000,
                   separator_mask_iters=300),
}


def with_preset(settings, given):
    """settings (a dict of TrainConfig's fields) with settings["preset"]'s values in place of the
    defaults, except where given (the keys named on the command line) says otherwise."""
    if settings["preset"] not in PRESETS:
        raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}, got {settings['preset']!r}")
    return {**settings, **{k: v for k, v in PRESETS[settings["preset"]].items() if k not in given}}


def settings_of(config):
    """The settings as a plain dict (what a checkpoint records and --key=value overrides)."""
    return {f.name: getattr(config, f.name) for f in fields(config)}


# what a checkpoint needs for --resume=True to go on exactly where the run stopped
RESUME_KEYS = ("optimizer", "iter_num", "current_max_hops", "gate", "run_seed", "restarts", "data_rng", "steps_rng",
               "torch_rng")


class TrainingStopped(Exception):
    """The run cannot go on (a checkpoint that does not fit, a finished run asked for fewer iterations)."""


class StopRequest:
    """Ctrl-C (SIGINT) asks the loop to stop at the end of the current iteration, save and exit:
    an interrupt inside optimizer.step would leave half-updated weights. A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def get_lr(config, it):
    """Linear warmup, then cosine decay from learning_rate to min_lr at max_iters."""
    if it < config.warmup_iters:
        return config.learning_rate * (it + 1) / config.warmup_iters
    ratio = min(1.0, (it - config.warmup_iters) / max(1, config.max_iters - config.warmup_iters))
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (config.learning_rate - config.min_lr)


def train(config, given=None, log_line=print):
    """Train as config says and return {"train_time_s", "iters", "settings", "results", "log",
    "restarts", "run_seed", "stopped_early", "model", "device"}: restarts lists the runs the plateau
    detector gave up ({"seed", "stopped_at", "gate_accuracy", "log"}), run_seed is the last run's;
    results is the final depth table {set: {r: {hops: accuracy}}} (on rank 0; None elsewhere and
    when stopped early). given: the settings named on the command line;
    with resume, one that would change the run (RUN_DEFINING) differing from the checkpoint's is
    an error. Raises ConfigError or TrainingStopped with a one-line reason."""
    config.validate()
    ckpt_path = os.path.join(config.out_dir, "ckpt.pt")

    # --- system ------------------------------------------------------------------
    ddp = int(os.environ.get("RANK", -1)) != -1
    device = config.device
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
        # on CPU (docs/TRAINING_LOG.md, session 1); flushing them to zero costs nothing in accuracy.
        torch.set_flush_denormal(True)
    if config.threads:
        torch.set_num_threads(config.threads)

    # --- the checkpoint to resume, or the room for a new one ----------------------------
    ckpt = None
    if config.resume:
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        saved = ckpt.get("settings", {})
        changed = sorted(k for k in (given or ()) if k in TrainConfig.RUN_DEFINING
                         and saved.get(k) != getattr(config, k))
        if changed:
            raise ConfigError(f"--resume=True keeps the checkpoint's {', '.join(changed)} "
                              f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed)}): drop the override, "
                              f"or start a new run in another --out_dir")
        for k in TrainConfig.RUN_DEFINING:  # the checkpoint's model and data, not this command's defaults
            if k in saved:
                setattr(config, k, saved[k])
        if config.max_iters <= ckpt["iter_num"]:
            raise TrainingStopped(f"{ckpt_path} has trained {ckpt['iter_num']} iterations already: "
                                  f"pass --max_iters above that to train on")
    elif os.path.exists(ckpt_path) and not config.overwrite:
        raise ConfigError(f"{ckpt_path} exists: --resume=True to continue it, --overwrite=True to replace it, "
                          f"or another --out_dir")
    if master:
        os.makedirs(config.out_dir, exist_ok=True)
        remove_stale_temporaries(config.out_dir)  # left by saves that were killed

    # --- model, corpus, optimizer ----------------------------------------------------
    tokenizer = CharTokenizer()
    separator = tokenizer.stoi[";"]  # what separator_mask_iters hides from the prelude
    corpus = config.corpus_config()
    model_args = asdict(config.model_config())

    def start(run_seed):
        """A new model, its optimizer and the random streams, from run_seed (config.seed; a restart
        of the plateau detector uses another). Each rank draws its own lines; every rank draws the
        step counts (n, k) from a generator with the same seed, so all ranks unroll the same number
        of steps each iteration (lockstep) without communicating."""
        torch.manual_seed(run_seed + rank)
        data_rng = random.Random(run_seed + rank)
        steps_rng = torch.Generator().manual_seed(run_seed)
        model = RecurrentDepthLM(RecurrentDepthConfig(**model_args)).to(device)
        std = config.token_shift_init_std
        if std == 0 and model.token_shift is not None:
            torch.nn.init.zeros_(model.token_shift.weight)
        elif std > 0 and model.token_shift is not None:
            torch.nn.init.trunc_normal_(model.token_shift.weight, std=std, a=-3 * std, b=3 * std)
        optimizer = torch.optim.AdamW(
            [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": config.weight_decay},
             {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
            lr=config.learning_rate, betas=(config.beta1, config.beta2))
        return model, optimizer, data_rng, steps_rng

    run_seed, restarts = config.seed, []
    first_level = config.curriculum_start if config.curriculum else config.max_hops
    iter_num, current_max_hops = 0, first_level
    gate = torch.zeros(2)  # [correct, total] on the curriculum's current targets since the last check
    gate_accuracy = 0.0  # of the last 50-iteration window
    model, optimizer, data_rng, steps_rng = start(run_seed)
    if ckpt is not None:
        missing = [k for k in RESUME_KEYS if k not in ckpt]
        if missing:
            raise TrainingStopped(f"{ckpt_path} was written by an older minird (no {', '.join(missing)}): it cannot "
                                  f"go on bit for bit; start a new run with --overwrite=True")
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise TrainingStopped(f"the checkpoint does not fit this model ({str(err).splitlines()[0]})") from None
        # every random stream where it stopped, so the run goes on as if never interrupted
        iter_num, current_max_hops, gate = ckpt["iter_num"], ckpt["current_max_hops"], ckpt["gate"]
        run_seed, restarts = ckpt["run_seed"], ckpt["restarts"]
        data_rng.setstate(ckpt["data_rng"][rank])
        steps_rng.set_state(ckpt["steps_rng"])
        torch.set_rng_state(ckpt["torch_rng"][rank])
    raw_model = model
    if ddp:
        model = DDP(model)
    if master:
        log_line(f"model: {raw_model.num_params():,} unique parameters; effective depth P + R*r + C = "
                 f"{raw_model.effective_depth(config.mean_recurrence)} layers at r = {config.mean_recurrence}")

    # held-out lines: a seed training never uses
    eval_sets = held_out_sets(corpus, config.eval_problems, config.seed + 10_000, config.extrapolation_range())

    def evaluate(r_values):
        return depth_results(raw_model, eval_sets, r_values, config.extrapolation_range()[0])

    def checkpoint():
        """Rank 0 writes it, with every rank's random streams (the lines each draws)."""
        streams = {"data_rng": [data_rng.getstate()], "torch_rng": [torch.get_rng_state()]}
        if ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, streams)
            streams = {k: [s[k][0] for s in gathered] for k in streams}
        if master:
            save_checkpoint(ckpt_path, {
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "model_args": model_args,
                "corpus": asdict(corpus), "tokenizer": tokenizer.chars, "iter_num": iter_num,
                "current_max_hops": current_max_hops, "gate": gate, "settings": settings_of(config), "log": log,
                "run_seed": run_seed, "restarts": restarts, "steps_rng": steps_rng.get_state(), **streams,
            })

    # --- training loop ---------------------------------------------------------------
    log = [] if ckpt is None else list(ckpt.get("log", []))
    if config.diag_interval:
        from minird.diagnose import LookupProbe
        probe = LookupProbe(corpus, config.seed + 20_000, config.block_size)
    bar = None
    if master and config.progress:
        from tqdm import tqdm
        bar = tqdm(total=config.max_iters, initial=iter_num, desc="train", dynamic_ncols=True)
    t0 = time.time()
    stopped_early = False
    with StopRequest() as stop:
        while iter_num < config.max_iters:
            lr = get_lr(config, iter_num)
            for group in optimizer.param_groups:
                group["lr"] = lr
            lines = sample_problems(data_rng, config.batch_size,
                                    CorpusConfig(**{**asdict(corpus), "max_hops": current_max_hops}))
            x, y, _, lookups = (t.to(device) for t in encode_batch(lines, tokenizer, config.block_size,
                                                                   config.dense_targets))
            num_steps = (0, config.fixed_steps) if config.fixed_steps else raw_model.sample_num_steps(steps_rng)
            hidden = x == separator if iter_num < config.separator_mask_iters else None
            logits, loss = model(x, y, num_steps=num_steps, target_lookups=lookups if config.step_loss else None,
                                 prelude_hidden=hidden)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.diag_interval and master:  # before clipping: the gradients the loss asks for
                probe.add_batch(logits, y, lookups)
                if (iter_num + 1) % config.diag_interval == 0:
                    log_line("diag " + json.dumps(probe.measure(raw_model, iter_num + 1)))
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            iter_num += 1

            if config.curriculum and current_max_hops < config.max_hops:
                with torch.no_grad():  # running accuracy on the current hardest targets gates the curriculum
                    hard = (lookups == current_max_hops)
                    stats = torch.tensor([(logits.argmax(-1)[hard] == y[hard]).sum().item(), hard.sum().item()],
                                         dtype=torch.float)
                    if ddp:
                        dist.all_reduce(stats)
                    gate += stats
                if iter_num % 50 == 0:
                    correct, total = gate.tolist()
                    gate_accuracy = correct / total if total else 0.0
                    if total and gate_accuracy >= config.curriculum_threshold:
                        current_max_hops += 1
                    gate.zero_()
            if (iter_num == config.plateau_check and current_max_hops == first_level < config.max_hops
                    and len(restarts) < config.plateau_restarts):
                restarts.append({"seed": run_seed, "stopped_at": iter_num, "gate_accuracy": round(gate_accuracy, 4),
                                 "log": log})
                run_seed = config.seed + 1000 * len(restarts)
                if master:
                    (bar.write if bar is not None else log_line)(
                        f"plateau: at iteration {iter_num} the curriculum is still at level {first_level} "
                        f"(one-lookup accuracy {gate_accuracy:.2f} < {config.curriculum_threshold}); restarting "
                        f"from iteration 0 with seed {run_seed} (restart {len(restarts)} of {config.plateau_restarts})")
                model, optimizer, data_rng, steps_rng = start(run_seed)
                raw_model, model = model, DDP(model) if ddp else model
                iter_num, current_max_hops, log = 0, first_level, []
                gate.zero_()
                if bar is not None:
                    bar.reset()
                continue
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", hops=current_max_hops, steps=sum(num_steps))
            stop_now = stop.requested
            if ddp:  # every rank stops at the same iteration, or the others wait for it forever
                flag = torch.tensor([float(stop_now)], device=device)
                dist.all_reduce(flag)
                stop_now = bool(flag.item())
            if iter_num % config.eval_interval == 0 or iter_num == config.max_iters or stop_now:
                if master:
                    r = config.mean_recurrence
                    acc = evaluate([r])["in-distribution"][r]
                    log.append({"iter": iter_num, "time_s": round(time.time() - t0, 1), "loss": round(loss.item(), 4),
                                "max_hops": current_max_hops, "acc_by_hops": acc})
                    (bar.write if bar is not None else log_line)(
                        f"iter {iter_num}: loss {loss.item():.3f}, curriculum hops <= {current_max_hops}, "
                        f"acc@r={r} by hops: " + " ".join(f"{h}:{a:.2f}" for h, a in sorted(acc.items())))
                checkpoint()
            if stop_now:
                stopped_early = True
                break
    if bar is not None:
        bar.close()
    train_time = time.time() - t0

    # --- depth scaling -------------------------------------------------------------------
    results = None
    if master and not stopped_early:
        results = evaluate(config.depth_r_values())
    if ddp:
        dist.destroy_process_group()
    return {"train_time_s": train_time, "iters": iter_num, "settings": settings_of(config), "results": results,
            "log": log, "restarts": restarts, "run_seed": run_seed, "stopped_early": stopped_early, "model": raw_model,
            "device": device}
