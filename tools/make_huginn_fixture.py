"""
Make tests/fixtures/huginn_tiny: a tiny random Huginn checkpoint in the official Hugging Face layout,
and the golden values that the official code computes on it (tests/test_pretrained.py checks
minird against them).

    python tools/make_huginn_fixture.py --official PATH [--out tests/fixtures/huginn_tiny]

PATH is a checkout of seal-rg/recurrent-pretraining. Its code is imported from there at run time
and never copied into this repository; its chat template and special-token list are read from it.
It needs transformers 4.53, which minird does not, so run this in a venv of its own:

    python -m venv .venv-official
    .venv-official/bin/pip install torch==2.13.0 "transformers==4.53.*"
    .venv-official/bin/python tools/make_huginn_fixture.py --official PATH

What it writes (about 0.5 MB):
  tokenizer.json, tokenizer_config.json, special_tokens_map.json
      a byte-level BPE trained on a few sentences, then the official special tokens with the last
      ids (Huginn-0125's end at 65535 too), 128 in all, saved by transformers the way the official
      code uploads its tokenizer: `<|begin_text|> $A <|end_text|>` around encoded text, and the chat
      template that the official converter puts on the hub
  generation_config.json
      Huginn's (bos, pad, eos = end_text and end_turn) with this vocabulary's ids
  config.json, model-0000{1,2}-of-00002.safetensors, model.safetensors.index.json
      minird.pretrained.save_pretrained of a seeded random model with Huginn's layer split P=2, R=4,
      C=2 (the official "latest-m4" cache strategy hard-codes it) at h=32, 2 heads of 16; every
      norm weight and q/k bias is random too, so a tensor mapped to the wrong place shows
  golden.json
      from the official RavenForCausalLM on this folder, fp32, zero initial state (init_scale=0):
      logits at r = 1, 4, 32; 16 greedy tokens through its KV cache at r = 32; 16 greedy tokens with
      per-token adaptive exit (criterion "kl", cache_lookup_strategy "latest-m4") and the steps each
      token took; the tokenizer's encodings and chat renderings from transformers
"""

import argparse
import ast
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minird.model import RecurrentDepthConfig, RecurrentDepthLM  # noqa: E402
from minird.pretrained import save_pretrained  # noqa: E402

CORPUS = [
    "The capital of Westphalia is Muenster.",
    "The raven flies over the hill and the river.",
    "Huginn and Muninn are the ravens of Odin; they fly over the world every day.",
    "What do ravens eat? Ravens eat seeds, fish and bread.",
    "You are a helpful assistant. Think before you answer. The system message comes first.",
    "One, two, three: the raven counts the stones in the river.",
    "Question:\n\nWhat is the capital?\n\nAnswer:\n\nMuenster.",
]
VOCAB_SIZE = 128  # a byte-level BPE, then the special tokens
PROMPT = "The capital of Westphalia is"
NUM_STEPS = (1, 4, 32)
GENERATE_STEPS, NEW_TOKENS = 32, 16
EXIT_THRESHOLD = 1e-3  # the official default of criterion "kl"
CHATS = [
    ([{"role": "system", "content": "You are a helpful assistant."},
      {"role": "user", "content": " What do ravens eat? "}], True),
    ([{"role": "user", "content": "What is the capital of Westphalia?"},
      {"role": "assistant", "content": "The capital of Westphalia is Muenster.\n"},
      {"role": "user", "content": "One, two, three?"}], False),
]
TEXTS = ["The raven flies over the hill.", "<|begin_header|>Huginn<|end_header|>\n\nRavens eat fish.<|end_turn|>"]


def import_official(path):
    """The official recpre/raven_modeling_minimal.py from a checkout at path, imported as
    huginn_official.raven_modeling_minimal: recpre/__init__.py is not run, since it imports the
    training stack (lightning, ...), which the minimal model file does not need."""
    package = types.ModuleType("huginn_official")
    package.__path__ = [str(Path(path) / "recpre")]
    sys.modules["huginn_official"] = package
    return importlib.import_module("huginn_official.raven_modeling_minimal")


def official_special_tokens(path):
    """get_special_tokens("complete") of the official scripts/tokenizer_generation.py: the function
    alone is compiled and called (the script itself downloads data sets)."""
    source = (Path(path) / "scripts" / "tokenizer_generation.py").read_text()
    function = next(node for node in ast.parse(source).body
                    if isinstance(node, ast.FunctionDef) and node.name == "get_special_tokens")
    namespace = {}
    exec(compile(ast.Module(body=[function], type_ignores=[]), "tokenizer_generation.py", "exec"), namespace)
    return namespace["get_special_tokens"]("complete")


def official_chat_template(path):
    """The chat template that the official evaluate_raven/checkpoint_to_hf_converter.py uploads with
    the model (the assignment to chat_template there, read with ast)."""
    source = (Path(path) / "evaluate_raven" / "checkpoint_to_hf_converter.py").read_text()
    return next(ast.literal_eval(node.value) for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "chat_template")


def make_tokenizer(special_tokens):
    """A byte-level BPE trained on CORPUS, then the special tokens with the last ids: VOCAB_SIZE in all."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    n_bpe = VOCAB_SIZE - len(special_tokens)
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=n_bpe, show_progress=False))
    assert tokenizer.get_vocab_size() == n_bpe, f"CORPUS gives {tokenizer.get_vocab_size()} BPE tokens, not {n_bpe}"
    tokenizer.add_special_tokens(special_tokens)
    bos, eos = "<|begin_text|>", "<|end_text|>"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tokenizer.token_to_id(bos)), (eos, tokenizer.token_to_id(eos))])
    return tokenizer


def make_model(vocab_size, seed):
    """A seeded random minird model with Huginn's settings and layer split, tiny."""
    torch.manual_seed(seed)
    config = RecurrentDepthConfig(vocab_size=vocab_size, block_size=64, n_embd=32, n_head=2, intermediate_size=64,
                                  n_layers_in_prelude=2, n_layers_in_recurrent_block=4, n_layers_in_coda=2,
                                  mean_recurrence=32, mean_backprop_depth=8, init="takase", token_shift=False,
                                  scale_embedding=True)
    model = RecurrentDepthLM(config)
    # norm weights start at 1 and q/k biases at 0: random instead, so that one loaded into the wrong
    # place, or a bias laid out wrong, changes the logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name == "ln_f.weight":
                p.uniform_(0.5, 1.5)
            elif name.endswith("qk_bias"):
                p.normal_(0, 0.5)
    return model.eval()


class RecordingExitEvaluator:
    """Wraps an official exit evaluator: counts the steps of each generated token (its checks, one
    per step with min_steps=0) and keeps every criterion value, to measure how close to the
    threshold any decision was."""

    def __init__(self, inner):
        self.inner, self.steps, self.values = inner, [], []

    def init(self, initial_latents):
        self.inner.init(initial_latents)
        self.steps.append(0)

    def check(self, model, latents, aux_inputs):
        exits, outputs, values = self.inner.check(model, latents, aux_inputs)
        self.steps[-1] += 1
        self.values.append(values.item())
        return exits, outputs, values


def golden_model_values(official, folder, prompt_ids, bos_id):
    """What the official model computes on folder (see the module docstring)."""
    from transformers import GenerationConfig

    model, info = official.RavenForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"the official code did not load every tensor as it is: {problems}"
    model.eval()
    idx = torch.tensor([prompt_ids])
    golden = {}
    with torch.no_grad():
        golden["logits"] = {str(r): model(idx, num_steps=r, init_scale=0.0).logits[0].tolist() for r in NUM_STEPS}
        # no eos: the stop tokens would end generation early; the minird test does without them too
        greedy_config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=None, bos_token_id=None)
        out = model.generate(idx, greedy_config, num_steps=GENERATE_STEPS, max_new_tokens=NEW_TOKENS, init_scale=0.0,
                             continuous_compute=False)
        tokens = out[0, idx.size(1):].tolist()
        # how far each greedy choice was from a tie, from one forward over the whole sequence
        logits = model(out, num_steps=GENERATE_STEPS, init_scale=0.0).logits[0, idx.size(1) - 1:-1]
        top2 = logits.topk(2, dim=-1).values
        golden["greedy"] = {"num_steps": GENERATE_STEPS, "prompt_ids": prompt_ids, "tokens": tokens,
                            "min_top2_margin": (top2[:, 0] - top2[:, 1]).min().item()}
        # one-token prompt: the official prefill exits all prompt tokens together, on the last one's criterion
        recorder = RecordingExitEvaluator(official.KLExitEvaluator(model, EXIT_THRESHOLD))
        adaptive_idx = torch.tensor([[bos_id]])
        out = model.generate(adaptive_idx, greedy_config, num_steps=GENERATE_STEPS, max_new_tokens=NEW_TOKENS,
                             init_scale=0.0, cache_lookup_strategy="latest-m4", exit_evaluator=recorder)
        golden["adaptive"] = {
            "num_steps": GENERATE_STEPS, "criterion": "kl", "exit_threshold": EXIT_THRESHOLD,
            "cache_lookup_strategy": "latest-m4", "prompt_ids": [bos_id], "tokens": out[0, 1:].tolist(),
            "steps": recorder.steps,
            "min_log_distance_to_threshold": min(abs(math.log(v / EXIT_THRESHOLD)) for v in recorder.values)}
    return golden


def golden_tokenizer_values(folder):
    """Encodings, decodings and chat renderings of the folder's tokenizer through transformers."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return {
        "texts": [{"text": text, "ids": tokenizer(text, add_special_tokens=False)["input_ids"],
                   "ids_with_special_tokens": tokenizer(text)["input_ids"],
                   "decoded": tokenizer.decode(tokenizer(text)["input_ids"])} for text in TEXTS],
        "chats": [{"messages": messages, "add_generation_prompt": add_generation_prompt,
                   "text": tokenizer.apply_chat_template(messages, tokenize=False,
                                                         add_generation_prompt=add_generation_prompt)}
                  for messages, add_generation_prompt in CHATS],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, help="a checkout of seal-rg/recurrent-pretraining")
    parser.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "huginn_tiny"))
    parser.add_argument("--seed", type=int, default=2, help="a seed whose choices all pass the checks in main")
    args = parser.parse_args()
    from transformers import PreTrainedTokenizerFast

    official = import_official(args.official)
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)

    tokenizer = make_tokenizer(official_special_tokens(args.official))
    ids = {name: tokenizer.token_to_id(f"<|{name}|>") for name in ("begin_text", "end_text", "end_turn", "pad")}
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_text|>",
                                           eos_token="<|end_text|>", pad_token="<|pad|>")
    hf_tokenizer.chat_template = official_chat_template(args.official)
    # the chat template inside tokenizer_config.json, as on the hub (4.53 writes a .jinja file by default)
    hf_tokenizer.save_pretrained(args.out, save_jinja_files=False)
    with open(os.path.join(args.out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": ids["begin_text"], "eos_token_id": [ids["end_text"], ids["end_turn"]],
                   "pad_token_id": ids["pad"], "do_sample": True, "temperature": 0.7}, f, indent=2)

    model = make_model(tokenizer.get_vocab_size(), args.seed)
    n_bytes = sum(t.nbytes for t in model.state_dict().values())
    save_pretrained(model, args.out, shard_size=n_bytes // 2)  # two shards and an index

    prompt_ids = tokenizer.encode(PROMPT).ids[:-1]  # as the official README: drop the <|end_text|>
    golden = {"prompt": PROMPT, "prompt_ids": prompt_ids,
              **golden_model_values(official, args.out, prompt_ids, ids["begin_text"]),
              "tokenizer": golden_tokenizer_values(args.out)}
    # the test repeats these choices with minird, whose logits differ from the official ones by ~1e-6:
    # none of them may hinge on that
    assert golden["greedy"]["min_top2_margin"] > 1e-3, "a greedy choice is close to a tie: try another --seed"
    assert golden["adaptive"]["min_log_distance_to_threshold"] > 1e-2, \
        "an exit decision is close to the threshold: try another --seed"
    assert len(set(golden["adaptive"]["steps"])) >= 4, "the tokens exit after alike steps: try another --seed"
    commit = subprocess.run(["git", "-C", args.official, "rev-parse", "HEAD"], capture_output=True, text=True)
    import transformers
    golden["made_with"] = {"official_commit": commit.stdout.strip() or None, "torch": torch.__version__,
                           "transformers": transformers.__version__}
    with open(os.path.join(args.out, "golden.json"), "w") as f:
        json.dump(golden, f)

    print(f"wrote {args.out}: {sum(p.stat().st_size for p in Path(args.out).iterdir()) / 1e6:.2f} MB")
    for key in ("greedy", "adaptive"):
        print(key, {k: v for k, v in golden[key].items() if k != "prompt_ids"})


if __name__ == "__main__":
    main()
