"""
Huginn checkpoints: load the official Hugging Face layout into a RecurrentDepthLM, and save one.

The layout is what `RavenForCausalLM.save_pretrained` writes in the official code
(seal-rg/recurrent-pretraining, `recpre/raven_modeling_minimal.py` and `raven_config_minimal.py`),
and what the hub's tomg-group-umd/huginn-0125 holds:

    config.json                       RavenConfig's fields (CONFIG_FIELDS below); model_type "huginn_raven"
    model.safetensors                 every tensor; or, sharded, model-00001-of-0000N.safetensors ...
    model.safetensors.index.json      {"metadata": {"total_size": bytes}, "weight_map": {tensor: shard file}}
    tokenizer.json, tokenizer_config.json, generation_config.json    (read by minird.tokenizer)

Tensor names, official -> minird; every other part of a name, and every shape but one, is the same:

    transformer.wte.weight                wte.weight, which lm_head.weight is tied to
    transformer.prelude.{i}.<block>       prelude.{i}.<block>
    transformer.adapter.weight            adapter.weight
    transformer.core_block.{i}.<block>    core.{i}.<block>
    transformer.coda.{i}.<block>          coda.{i}.<block>
    transformer.ln_f.weight               ln_f.weight
    lm_head.weight                        may be stored too, or instead; it must equal the embedding (tied)
    freqs_cis (1, block_size, 1, hs/2, 2) may be stored (the official RoPE table is a persistent buffer);
                                          minird recomputes its own (rope_cos, rope_sin) and only checks it
    <block>: norm_1..norm_4.weight, attn.Wqkv.weight, attn.proj.weight, mlp.fc.weight, mlp.proj.weight, and
    attn.qk_bias (2, 1, nh, hs) -> (2, 1, nh, 1, hs): minird adds it to q and k laid out (B, nh, T, hs),
                                          the official code to q and k laid out (B, T, nh, hs)

What minird cannot represent, and so refuses (the official code has switches for them, or reads them
without using them in its own minimal model): grouped-query attention (num_key_value_heads != n_heads),
untied embeddings, linear biases (`bias`), no q/k bias, other block, norm, MLP, nonlinearity or
injection classes, another initial state, test-time noise, orthogonal init, another step sampler, and
init strategies other than "takase" (Huginn's) and "bert" (std 0.02 everywhere: minird's "normal").
These must have Huginn's values (UNSUPPORTED_IF_NOT); a field that config.json omits takes
RavenConfig's default, as in the official code. Ignored, because they do not change the function: padding_multiple
(the vocabulary is already padded), activation_checkpoint_impl, torch_dtype, the derived fields
(head_dim, init_values, effective_expected_depth) and Hugging Face's generic fields. The other way,
the official layout cannot hold minird's token_shift or an unscaled embedding: save_pretrained
refuses those. minird's `init_scale` (the scale of s0) is written as an extra field that the official
code ignores (it takes init_scale as an argument of forward and generate instead).
"""

import json
import os
import re

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minird.model import RecurrentDepthConfig, RecurrentDepthLM, precompute_rope

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# -----------------------------------------------------------------------------
# the config: official field -> minird field


# official field: (minird field, RavenConfig's default, which the official code uses when the field is absent)
CONFIG_FIELDS = {
    "n_embd": ("n_embd", 5280),
    "n_heads": ("n_head", 55),
    "intermediate_size": ("intermediate_size", 17920),
    "vocab_size": ("vocab_size", 65536),
    "block_size": ("block_size", 4096),
    "n_layers_in_prelude": ("n_layers_in_prelude", 2),
    "n_layers_in_recurrent_block": ("n_layers_in_recurrent_block", 4),
    "n_layers_in_coda": ("n_layers_in_coda", 2),
    "mean_recurrence": ("mean_recurrence", 32),
    "mean_backprop_depth": ("mean_backprop_depth", 8),
    "rope_base": ("rope_base", 50000.0),
    "norm_eps": ("norm_eps", 1e-6),
}
# RavenConfig.attribute_map: config.json may spell these fields the Hugging Face way
FIELD_ALIASES = {"num_attention_heads": "n_heads", "hidden_size": "n_embd"}
# Huginn's value of every option that minird's model has no switch for
UNSUPPORTED_IF_NOT = {
    "architecture_class_name": "RecurrentGPT",
    "block_class_name": "SandwichBlock",
    "norm_class_name": "RMSNorm_llama",
    "mlp_class_name": "GatedMLP",
    "nonlin_name": "SiLU",
    "injection_type": "linear",
    "state_init": "like-init",
    "sampling_scheme": "poisson-lognormal-filling",
    "tie_embeddings": True,
    "bias": False,
    "qk_bias": True,
    "init_orthogonal": False,
    "test_time_noise": 0,
}
# official init_strategy <-> minird init; the official "bert" is std 0.02 everywhere, as minird's "normal"
INIT_STRATEGIES = {"takase": "takase", "bert": "normal"}
MODEL_TYPE, ARCHITECTURE = "huginn_raven", "RavenForCausalLM"


def config_from_official(official, source=CONFIG_FILE):
    """A RecurrentDepthConfig from the official config dict (config.json), with Huginn's settings for
    what the official layout has no field for; a one-line ValueError for another architecture or an
    option minird does not implement."""
    if official.get("model_type") != MODEL_TYPE or ARCHITECTURE not in official.get("architectures", [ARCHITECTURE]):
        raise ValueError(f"{source}: model_type {official.get('model_type')!r}, architectures "
                         f"{official.get('architectures')} is not Huginn's ({MODEL_TYPE!r}, {ARCHITECTURE!r})")
    official = {FIELD_ALIASES.get(k, k): v for k, v in official.items()}
    for field, value in UNSUPPORTED_IF_NOT.items():
        if official.get(field, value) != value:
            raise ValueError(f"{source}: {field}={official[field]!r} is not implemented in minird (only {value!r})")
    n_heads = official.get("n_heads", CONFIG_FIELDS["n_heads"][1])
    if official.get("num_key_value_heads", n_heads) != n_heads:
        raise ValueError(f"{source}: num_key_value_heads={official['num_key_value_heads']} != n_heads={n_heads}: "
                         "grouped-query attention is not implemented in minird")
    init_strategy = official.get("init_strategy", "takase")
    if init_strategy not in INIT_STRATEGIES:
        raise ValueError(f"{source}: init_strategy={init_strategy!r} is not implemented in minird "
                         f"(only {', '.join(map(repr, INIT_STRATEGIES))})")
    fields = {mine: official.get(theirs, default) for theirs, (mine, default) in CONFIG_FIELDS.items()}
    # the official embedding and head are padded_vocab_size long (RavenConfig sets it to vocab_size)
    fields["vocab_size"] = official.get("padded_vocab_size", fields["vocab_size"])
    if fields["n_embd"] % fields["n_head"] != 0:
        raise ValueError(f"{source}: n_embd={fields['n_embd']} is not a multiple of n_heads={fields['n_head']}")
    return RecurrentDepthConfig(**fields, init=INIT_STRATEGIES[init_strategy], token_shift=False,
                                scale_embedding=True, init_scale=official.get("init_scale", 1.0))


def config_to_official(config):
    """config.json's dict for a RecurrentDepthConfig: every RavenConfig field, so that the official
    code reads the model it describes without relying on its defaults."""
    if config.token_shift or not config.scale_embedding:
        raise ValueError("the official layout has no token_shift and always scales the embedding by sqrt(h): "
                         "only a model with token_shift=False, scale_embedding=True can be saved in it")
    official = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
                # where the hub's copies find the official code (raven_*_minimal.py next to the weights)
                "auto_map": {"AutoConfig": "raven_config_minimal.RavenConfig",
                             "AutoModelForCausalLM": "raven_modeling_minimal.RavenForCausalLM"}}
    official.update({theirs: getattr(config, mine) for theirs, (mine, _) in CONFIG_FIELDS.items()})
    official.update(UNSUPPORTED_IF_NOT)
    official.update(padded_vocab_size=config.vocab_size, num_key_value_heads=config.n_head,
                    n_layers=config.n_layers_in_prelude + config.n_layers_in_recurrent_block + config.n_layers_in_coda,
                    init_strategy={mine: theirs for theirs, mine in INIT_STRATEGIES.items()}[config.init],
                    init_scale=config.init_scale)
    return official


# -----------------------------------------------------------------------------
# tensor names: official <-> minird

# official prefix, minird prefix; the rest of the name is the same
PREFIXES = [
    ("transformer.wte.", "wte."),
    ("transformer.prelude.", "prelude."),
    ("transformer.adapter.", "adapter."),
    ("transformer.core_block.", "core."),
    ("transformer.coda.", "coda."),
    ("transformer.ln_f.", "ln_f."),
]
TIED_HEAD = "lm_head.weight"  # the official name, and minird's: the same tensor as the embedding
EMBEDDING = "wte.weight"
ROPE_TABLE = "freqs_cis"


def minird_name(name):
    """The minird name of an official tensor name, or None when it is not one of the mapped ones."""
    for theirs, mine in PREFIXES:
        if name.startswith(theirs):
            return mine + name[len(theirs):]
    return None


def official_name(name):
    """The official tensor name of a minird parameter name."""
    for theirs, mine in PREFIXES:
        if name.startswith(mine):
            return theirs + name[len(mine):]
    raise ValueError(f"{name} has no name in the official layout")


def is_qk_bias(name):
    return name.endswith("attn.qk_bias")


def official_rope_table(config):
    """The official freqs_cis (1, block_size, 1, hs/2, 2) (cos, sin last), from minird's own tables."""
    cos, sin = precompute_rope(config.n_embd // config.n_head, config.block_size, config.rope_base)
    return torch.stack([cos, sin], dim=-1)[None, :, None]


# -----------------------------------------------------------------------------
# loading


def snapshot_download(repo_id, **kwargs):
    """huggingface_hub.snapshot_download, imported only when a hub id is given (the [hf] extra);
    a module attribute so that tests can replace it."""
    try:
        from huggingface_hub import snapshot_download as download
    except ImportError:
        raise ValueError(f"{repo_id} is not a local folder, and a hub id needs huggingface_hub: "
                         "pip install 'minird[hf]'") from None
    return download(repo_id, **kwargs)


def checkpoint_folder(path_or_hub_id):
    """A local folder as it is; a hub id ("owner/name") downloaded (the json and safetensors files
    only: the hub repo also holds the official code, which minird does not need)."""
    path = os.fspath(path_or_hub_id)
    if os.path.isdir(path):
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith("."):
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors"])
    raise ValueError(f"{path}: no such folder, and not a hub id of the form owner/name")


def read_json(folder, name):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise ValueError(f"no {name} in {folder}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def shard_files(folder):
    """The safetensors files of the checkpoint: those the index lists, or the single file."""
    if os.path.isfile(os.path.join(folder, INDEX_FILE)):
        weight_map = read_json(folder, INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{os.path.join(folder, INDEX_FILE)}: no weight_map")
        files = sorted(set(weight_map.values()))
        for file in files:
            if not os.path.isfile(os.path.join(folder, file)):
                raise ValueError(f"{file}, listed in {INDEX_FILE}, is missing from {folder}")
        return files
    if os.path.isfile(os.path.join(folder, SINGLE_FILE)):
        return [SINGLE_FILE]
    raise ValueError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")


def from_pretrained(path_or_hub_id, dtype=torch.float32, device="cpu"):
    """A RecurrentDepthLM (in eval mode) from a folder, or a hub id, in the official layout.

    The model is built on the meta device (no memory), then each shard is opened lazily and its
    tensors are read one at a time straight to `device`, cast to `dtype` and assigned in place of
    the meta ones: no second copy of the model is made, in host memory or on the device (a 3.5B
    model in bf16 needs its 7 GB once). On the CPU, tensors stored in `dtype` stay memory-mapped
    from the files (copy-on-write: training them does not change the files). The RoPE tables stay
    fp32, as the official code keeps them."""
    folder = checkpoint_folder(path_or_hub_id)
    config = config_from_official(read_json(folder, CONFIG_FILE), os.path.join(folder, CONFIG_FILE))
    device = torch.device(device)
    with torch.device("meta"):
        model = RecurrentDepthLM(config)
    expected = {name: t.shape for name, t in model.state_dict().items() if name != TIED_HEAD}
    loaded, head = set(), None
    for file in shard_files(folder):
        path = os.path.join(folder, file)
        tensors = {}
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                for name in f.keys():
                    if name == ROPE_TABLE:
                        check_rope_table(f.get_tensor(name), config, file)
                        continue
                    mine = EMBEDDING if name == TIED_HEAD else minird_name(name)
                    if mine not in expected:
                        raise ValueError(f"{file}: tensor {name} is not part of a Huginn model with this config.json")
                    want = expected[mine] if not is_qk_bias(name) else expected[mine][:3] + expected[mine][4:]
                    shape = tuple(f.get_slice(name).get_shape())  # from the header: nothing read yet
                    if shape != tuple(want):
                        raise ValueError(f"{file}: {name} has shape {shape}, config.json gives {tuple(want)}")
                    t = f.get_tensor(name).to(dtype)
                    if name == TIED_HEAD:
                        head = t  # the embedding, if that is not stored too; else the same values
                        continue
                    tensors[mine] = t.unsqueeze(3) if is_qk_bias(name) else t  # (2, 1, nh, hs) -> (2, 1, nh, 1, hs)
        except SafetensorError as exc:
            raise ValueError(f"{path}: not a complete safetensors file ({exc})") from None
        model.load_state_dict(tensors, strict=False, assign=True)
        loaded.update(tensors)
        del tensors
    if head is not None and EMBEDDING not in loaded:  # a tied checkpoint may keep either name
        model.load_state_dict({EMBEDDING: head}, strict=False, assign=True)
        loaded.add(EMBEDDING)
    elif head is not None and not torch.equal(head, model.wte.weight):
        raise ValueError(f"{folder}: lm_head.weight differs from transformer.wte.weight; minird ties them")
    missing = [official_name(name) for name in expected if name not in loaded]
    if missing:
        raise ValueError(f"{folder}: the checkpoint has no {missing[0]} ({len(missing)} tensors missing)")
    model.lm_head.weight = model.wte.weight  # assign=True replaced wte's parameter; tie the head to it again
    # computed on the CPU, as minird's constructor does, so that the tables are the same bits on any device
    cos, sin = precompute_rope(config.n_embd // config.n_head, config.block_size, config.rope_base)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    return model.eval()


def check_rope_table(t, config, file):
    """The stored official RoPE table must be the one config.json describes: another size or base
    would be a model whose positions minird encodes differently. bf16 rounding of it is allowed."""
    want = official_rope_table(config)
    if t.shape != want.shape:
        raise ValueError(f"{file}: {ROPE_TABLE} has shape {tuple(t.shape)}, config.json gives {tuple(want.shape)}")
    if (t.float().cpu() - want).abs().max() > 1e-2:
        raise ValueError(f"{file}: {ROPE_TABLE} is not the RoPE table of rope_base={config.rope_base}")


# -----------------------------------------------------------------------------
# saving


def shard_name(i, n):
    return SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def save_pretrained(model, path, shard_size=5_000_000_000):
    """Write model in the official layout to folder path: config.json, and the tensors in shards of
    at most shard_size bytes each (a larger tensor gets a shard of its own) with an index when there
    is more than one. Tensors keep the model's dtype; the official code opens the folder with
    RavenForCausalLM.from_pretrained(path). One shard at a time is copied to host memory."""
    official = config_to_official(model.config)
    tensors = [(official_name(name), t.squeeze(3) if is_qk_bias(name) else t)
               for name, t in model.state_dict().items() if name != TIED_HEAD]
    tensors.append((ROPE_TABLE, official_rope_table(model.config)))  # fp32, as the official buffer
    shards = [[]]
    for name, t in tensors:
        if shards[-1] and sum(u.nbytes for _, u in shards[-1]) + t.nbytes > shard_size:
            shards.append([])
        shards[-1].append((name, t))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(official, f, indent=2)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = shard_name(i, len(shards))
        save_file({name: t.detach().cpu().contiguous() for name, t in shard}, os.path.join(path, file),
                  metadata={"format": "pt"})  # transformers refuses safetensors files without this
        weight_map.update((name, file) for name, _ in shard)
    index_path = os.path.join(path, INDEX_FILE)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for _, t in tensors)}, "weight_map": weight_map}
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2)
    elif os.path.isfile(index_path):
        os.remove(index_path)  # an earlier save's index would be read instead of the new single file
