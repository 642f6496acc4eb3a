"""
Complete prompts with a trained model at a chosen number of recurrent steps, and check the answers.

    python sample.py --steps 8                          # held-out problems of rising difficulty
    python sample.py --steps 1,4,16,64                  # the same problems, side by side
    python sample.py --steps 4 --prompt "k5;bk;xb;?x"   # your own program, ending in a query
    python sample.py --steps 8 --trace                  # the answer decoded after every step
    python sample.py --steps 32 --criterion kl          # adaptive exit: the steps each answer used
    python sample.py --steps 32 --draft_steps 2 --new_tokens 8   # self-speculative decoding, same output

A prompt is a program of two-character statements (`k5`: k = 5, `bk`: b = k) ending in a query
`?name`; the model writes the answer digit (greedy) and minird.data.solve says whether it is right.
All prompts go through generate as one batch, padded on the left (each row as if it were alone).

With --init_from, a Huginn-0125 checkpoint in the official Hugging Face layout (a folder, or a hub
id with `pip install huggingface_hub`) writes free text instead, with the same test-time flags:

    python sample.py --init_from tomg-group-umd/huginn-0125 --chat --steps 32 --prompt "What is 7 * 8?"
    python sample.py --init_from PATH --steps 4,32 --new_tokens 64 --prompt "The capital of France is"
    python sample.py --init_from PATH --steps 32 --diffusion_forcing --prompt "..."   # the diffusion-style sampler
"""

import argparse
import os
import random
import re
import sys
import time

import torch

from minird.checkpoint import load_model
from minird.cli import Parser, positive_int, positive_ints
from minird.data import DIGITS, NAMES, sample_extrapolation_problems, solve
from minird.generate import EXIT_THRESHOLDS, generate, left_pad
from minird.kv_cache import kv_cache_bytes, parse_lookup_strategy


def parse_steps(text):
    """'8' or '1,4,16,64' -> [8] or [1, 4, 16, 64]; every r must be a positive integer."""
    return positive_ints(text, example="8 or 1,4,16,64")


def parse_threshold(text):
    """'auto' or a non-negative number."""
    try:
        if text == "auto" or float(text) >= 0:
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected auto or a non-negative number, got {text!r}")


def parse_strategy(text):
    """'full' or 'compress-sN', or the official names of the same (minird.kv_cache.parse_lookup_strategy)."""
    try:
        parse_lookup_strategy(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


parser = Parser(prog="sample.py", description="Complete and check prompts with a trained minird checkpoint.")
parser.add_argument("--steps", type=parse_steps, default=None,
                    help="recurrent steps r at test time: 8, or 1,4,16,64 for a side-by-side table "
                         "(default: the training mean)")
parser.add_argument("--ckpt", default="out-tiny/ckpt.pt", help="checkpoint written by train_tiny.py")
parser.add_argument("--prompt", action="append",
                    help="a program ending in a query, e.g. 'k5;bk;xb;?x' (repeatable)")
parser.add_argument("--seed", type=int, default=2025, help="seed of the default problems and of s0")
parser.add_argument("--criterion", default="none", choices=["none", *EXIT_THRESHOLDS],
                    help="adaptive exit: each token stops when this criterion says it has converged; "
                         "--steps is then the cap, and the table shows the steps the answer used")
parser.add_argument("--exit_threshold", type=parse_threshold, default="auto",
                    help="threshold of --criterion (auto: the official defaults, minird.generate.EXIT_THRESHOLDS)")
parser.add_argument("--min_steps", type=positive_int, default=1,
                    help="adaptive exit: steps every token runs at least")
parser.add_argument("--cache_lookup_strategy", type=parse_strategy, default="full",
                    help="KV cache: full (one entry per step and core layer) or compress-sN (N shared slots)")
parser.add_argument("--draft_steps", type=positive_int, default=None,
                    help="self-speculative decoding: draft tokens at this many steps, verify them at r in one "
                         "forward (same output as without; needs --new_tokens > 1 to draft anything)")
parser.add_argument("--lookahead_for_draft", type=positive_int, default=8,
                    help="self-speculative decoding: tokens drafted per round")
parser.add_argument("--new_tokens", type=positive_int, default=1,
                    help="tokens written after each prompt: the answer, then what the model writes next "
                         "(printed after the table)")
parser.add_argument("--trace", action="store_true",
                    help="also read out the latent state after every step 1..r (r = the largest --steps) "
                         "and show how the answer and its probability change")
parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above: sample at this temperature")
parser.add_argument("--top_k", type=positive_int, default=None, help="sample among the top_k tokens only")
pretrained = parser.add_argument_group("a Huginn-0125 checkpoint (the official Hugging Face layout)")
pretrained.add_argument("--init_from", default=None,
                        help="a checkpoint folder, or a hub id such as tomg-group-umd/huginn-0125 (needs "
                             "huggingface_hub); then --prompt is free text and --ckpt is not read")
pretrained.add_argument("--chat", action="store_true", help="wrap each --prompt in Huginn's chat format")
pretrained.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="the weights' dtype (default: bfloat16 on a GPU, float32 on the CPU)")
pretrained.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if there is one)")
pretrained.add_argument("--diffusion_forcing", action="store_true",
                        help="write with diffusion forcing (the official diffusion-style sampler): after the prompt "
                             "at r = --steps, a wave of positions is iterated --inner_recurrence steps a round")
pretrained.add_argument("--inner_recurrence", type=positive_int, default=4,
                        help="diffusion forcing: steps a round of the wave")


def default_prompts(corpus, seed):
    """(prompt, hops) for held-out problems of rising difficulty, every other hop count of
    training and then two beyond it. Each line looks like a training line; its prompt stops
    at the query with the chosen hop count."""
    rng = random.Random(seed)
    prompts = []
    for h in list(range(corpus.min_hops, corpus.max_hops + 1, 2)) + [corpus.max_hops + 2]:
        # one query with h hops and the other queried chains short (the extrapolation sampler)
        p = sample_extrapolation_problems(rng, 1, corpus, (h, h))[0]
        prompts.append((p.text[:p.answer_positions[p.hops.index(h)]], h))
    return prompts


# statements such as k5; and bk; then queries, all answered but the last: ?x5?b
PROMPT = re.compile(f"([{NAMES}][{DIGITS}{NAMES}];)+(\\?[{NAMES}][{DIGITS}])*\\?[{NAMES}]")


def expected_answer(prompt, tokenizer, block_size):
    """The right answer to the prompt's last query; ValueError with a one-line reason for a prompt
    the model cannot take or that has no answer."""
    tokenizer.encode(prompt)  # raises on characters outside the vocabulary
    if len(prompt) > block_size:
        raise ValueError(f"the prompt has {len(prompt)} characters, the model's context is {block_size}")
    if not PROMPT.fullmatch(prompt):
        raise ValueError(f"a prompt is statements such as 'k5;bk;' then a query such as '?b', got {prompt!r}")
    try:
        return solve(prompt)[-1]
    except KeyError as err:
        raise ValueError(f"{prompt!r} uses {err.args[0]!r} before defining it") from None


def print_trace(model, tokenizer, prompt, want, num_steps):
    """The answer the coda reads from the state after each step, with its probability and the
    probability of the right answer: a problem of h hops typically flips to right at step h + 1."""
    idx = torch.tensor([tokenizer.encode(prompt)])
    probs = [logits[0, -1].softmax(-1) for logits in model.trace(idx, num_steps)]
    top = [p.argmax().item() for p in probs]
    cell = "{:>6}".format
    print(f"\n{prompt}  (want {want})")
    print(f"  {'step':<10}" + "".join(cell(t) for t in range(1, num_steps + 1)))
    print(f"  {'answer':<10}" + "".join(cell(repr(tokenizer.decode([i]))[1:-1]) for i in top))
    print(f"  {'p(answer)':<10}" + "".join(cell(f"{p[i].item():.2f}") for p, i in zip(probs, top)))
    print(f"  {'p(want)':<10}" + "".join(cell(f"{p[tokenizer.stoi[want]].item():.2f}") for p in probs))


def check_memory(model, batch, length, num_steps, strategy):
    """ValueError, before any work, when the KV cache at num_steps would take over half of the
    memory of the model's device: with the full cache every step keeps its own keys (bytes grow with r)."""
    weight = model.wte.weight
    needed = kv_cache_bytes(model.config, batch, length, num_steps, strategy, weight.dtype)
    if weight.device.type == "cuda":
        memory, where = torch.cuda.mem_get_info(weight.device)[0], "free on the GPU"
    else:
        memory, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "in this machine"
    advice = (f"--cache_lookup_strategy compress-s{model.config.n_layers_in_recurrent_block} keeps one step's "
              f"worth of keys, whatever r")
    if needed > memory / 2:
        raise ValueError(f"--steps {num_steps} needs a KV cache of {needed / 2**30:.1f} GiB for {batch} prompts "
                         f"({memory / 2**30:.1f} GiB {where}): use fewer steps, or {advice}")
    if needed > 2**30:
        print(f"sample.py: note: --steps {num_steps} keeps a KV cache of {needed / 2**30:.1f} GiB ({advice})",
              file=sys.stderr)


def main():
    args = parser.parse_args()
    if args.init_from is not None:
        return sample_pretrained(args)
    if args.chat or args.dtype or args.device:
        parser.error("--chat, --dtype and --device go with --init_from (a Huginn checkpoint)")
    if args.diffusion_forcing:
        parser.error("--diffusion_forcing goes with --init_from (one prompt at a time); on the toy checkpoint, "
                     "python -m minird.experiments diffusion compares it with greedy decoding")
    try:
        model, tokenizer, corpus = load_model(args.ckpt)
        block_size, mean_r = model.config.block_size, model.config.mean_recurrence
        prompts = [(p, None) for p in args.prompt] if args.prompt else default_prompts(corpus, args.seed)
        wanted = [expected_answer(p, tokenizer, block_size) for p, _ in prompts]
        steps = args.steps or [mean_r]
        torch.manual_seed(args.seed)  # s0 is noise when the model was trained with init_scale > 0
        # all prompts in one batch, padded on the left: generate masks the padding out
        idx, attention_mask = left_pad([tokenizer.encode(p) for p, _ in prompts])
        room = max(1, block_size - idx.size(1))  # the last written token is never fed back
        if args.new_tokens > room:
            raise ValueError(f"--new_tokens {args.new_tokens} does not fit after the longest prompt "
                             f"({idx.size(1)} of the model's {block_size} positions): use --new_tokens <= {room}")
        check_memory(model, idx.size(0), idx.size(1) + args.new_tokens, max(steps), args.cache_lookup_strategy)
        runs = {r: generate(model, idx, args.new_tokens, num_steps=r, criterion=args.criterion,
                            exit_threshold=args.exit_threshold, min_steps=args.min_steps,
                            cache_lookup_strategy=args.cache_lookup_strategy, attention_mask=attention_mask,
                            draft_steps=args.draft_steps, lookahead_for_draft=args.lookahead_for_draft,
                            temperature=args.temperature, top_k=args.top_k)
                for r in steps}
    except ValueError as err:
        sys.exit(f"sample.py: {err}")
    T = idx.size(1)

    print(f"{args.ckpt}: {model.num_params():,} parameters, trained with mean r = {mean_r}, "
          f"effective depth P + R*r + C = " + ", ".join(f"{model.effective_depth(r)} at r={r}" for r in steps))
    width = 9 if args.criterion != "none" else 6  # room for the steps used
    print(f"{'hops':>4} {'want':>4} | " + " ".join(f"{f'r={r}':<{width}}" for r in steps) + " | prompt")
    right = [0] * len(steps)
    for b, ((prompt, hops), want) in enumerate(zip(prompts, wanted)):
        cells = []
        for i, r in enumerate(steps):
            out, used = runs[r].ids, runs[r].steps
            answer = tokenizer.decode([out[b, T].item()])
            right[i] += answer == want
            cells.append(f"{repr(answer)[1:-1]} {'ok' if answer == want else 'x'}"  # repr: a newline shows as \n
                         + (f" {used[b, T - 1].item()}" if args.criterion != "none" else ""))
        label = "" if hops is None else f"{hops}*" if hops > corpus.max_hops else str(hops)
        print(f"{label:>4} {want:>4} | " + " ".join(f"{c:<{width}}" for c in cells) + f" | {prompt}")
    print(f"{'right':>9} | " + " ".join(f"{f'{n}/{len(prompts)}':<{width}}" for n in right))
    if not args.prompt:
        print(f"hops: lookups past the first one; * = more hops than any training line (max {corpus.max_hops})")
    if args.criterion != "none":
        print(f"adaptive exit ({args.criterion}, threshold {args.exit_threshold}): r is the cap; "
              "the number after each verdict is the steps the answer used")
    if args.new_tokens > 1:
        for r in steps:
            print(f"\nwritten after each prompt at r={r} (the model was trained to write answers only):")
            for b, (prompt, _) in enumerate(prompts):
                print(f"  {prompt} -> {tokenizer.decode(runs[r].ids[b, T:].tolist())!r}")
    if args.draft_steps is not None:
        for r in steps:
            stats = runs[r].stats
            print(f"self-speculative decoding at r={r}: drafts of {args.lookahead_for_draft} tokens at "
                  f"{args.draft_steps} steps, {stats.accepted}/{stats.drafted} drafted tokens kept "
                  f"({100 * stats.acceptance_rate:.0f}%), {stats.forwards} forwards")
    if args.trace:
        for (prompt, _), want in zip(prompts, wanted):
            torch.manual_seed(args.seed)
            print_trace(model, tokenizer, prompt, want, max(steps))


def sample_pretrained(args):
    """--init_from: load a Huginn checkpoint, complete each --prompt (free text, or a chat turn with
    --chat) at every r of --steps, and print the text with its speed and, with --criterion, the
    steps each written token used. Generation stops at the checkpoint's stop tokens."""
    from minird.pretrained import from_pretrained
    from minird.tokenizer import HuginnTokenizer

    if not args.prompt:
        parser.error("--init_from needs at least one --prompt")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        parser.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device={args.device} but this torch has no CUDA device")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    try:
        t0 = time.perf_counter()
        model = from_pretrained(args.init_from, dtype=dtype, device=device).eval()
        tokenizer = HuginnTokenizer.from_pretrained(args.init_from)
        n = model.num_params()
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"
        print(f"{args.init_from}: {size} parameters in {dtype}, loaded on {device} in "
              f"{time.perf_counter() - t0:.1f} s; effective depth P + R*r + C = "
              + ", ".join(f"{model.effective_depth(r)} at r={r}" for r in args.steps or [model.config.mean_recurrence]))
        for prompt in args.prompt:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True) \
                if args.chat else prompt
            ids = tokenizer.encode(text, add_special_tokens=not args.chat)
            if not args.chat and ids and ids[-1] == tokenizer.token_to_id("<|end_text|>"):
                ids = ids[:-1]  # the text goes on: as the official README, drop the end-of-text mark
            idx = torch.tensor([ids], device=device)
            check_memory(model, 1, idx.size(1) + args.new_tokens, max(args.steps or [model.config.mean_recurrence]),
                         args.cache_lookup_strategy)
            print(f"\n{prompt!r} ({idx.size(1)} tokens{', chat format' if args.chat else ''})")
            for r in args.steps or [model.config.mean_recurrence]:
                torch.manual_seed(args.seed)  # Huginn starts every token from a random state
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                out = generate(model, idx, args.new_tokens, num_steps=r, stop_tokens=tokenizer.stop_token_ids,
                               criterion=args.criterion, exit_threshold=args.exit_threshold,
                               min_steps=args.min_steps, cache_lookup_strategy=args.cache_lookup_strategy,
                               draft_steps=args.draft_steps, lookahead_for_draft=args.lookahead_for_draft,
                               temperature=args.temperature, top_k=args.top_k,
                               diffusion_forcing=args.diffusion_forcing, inner_recurrence=args.inner_recurrence)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - t0
                written = out.ids[0, idx.size(1):].tolist()
                steps = out.steps[0, idx.size(1) - 1:].tolist()  # the steps of the tokens that made each one
                extra = f", mean steps {sum(steps) / len(steps):.1f}" if args.criterion != "none" else ""
                if args.diffusion_forcing:
                    extra = f", diffusion forcing: {out.stats.forwards} forwards, mean steps {sum(steps) / len(steps):.1f}"
                print(f"  r={r} ({len(written)} tokens, {len(written) / seconds:.1f} tok/s{extra}): "
                      f"{tokenizer.decode(written)!r}")
            if args.trace:
                torch.manual_seed(args.seed)
                logits = model.trace(idx, max(args.steps or [model.config.mean_recurrence]))
                tops = [step[0, -1].float().softmax(-1).max(-1) for step in logits]
                print("  the next token read out after each step: " + " ".join(
                    f"{t + 1}:{tokenizer.decode([i.item()])!r}({p.item():.2f})" for t, (p, i) in enumerate(tops)))
    except ValueError as err:
        sys.exit(f"sample.py: {err}")


if __name__ == "__main__":
    main()
