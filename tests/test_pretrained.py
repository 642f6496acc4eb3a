"""Huginn checkpoints in the official layout: minird.pretrained and minird.tokenizer against what the
official code computed on a tiny random checkpoint (tests/fixtures/huginn_tiny; both the folder and
its golden.json come from tools/make_huginn_fixture.py, which ran the official
raven_modeling_minimal.py and transformers on it). Nothing here downloads anything."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minird import pretrained
from minird.generate import generate
from minird.model import RecurrentDepthConfig, RecurrentDepthLM
from minird.pretrained import config_from_official, config_to_official, from_pretrained, save_pretrained
from minird.tokenizer import HuginnTokenizer, chat_prompt

FIXTURE = Path(__file__).parent / "fixtures" / "huginn_tiny"
GOLDEN = json.loads((FIXTURE / "golden.json").read_text())
SHARDS = sorted(p.name for p in FIXTURE.glob("model-*.safetensors"))


@pytest.fixture
def zero_state_model():
    """The fixture's model with s0 = 0 in every forward, generate's included: the golden values
    were computed so (the official init_scale=0), which makes them deterministic."""
    model = from_pretrained(FIXTURE)
    model.config.init_scale = 0.0
    return model


def fixture_tensors(folder=FIXTURE):
    """Every tensor of a checkpoint folder by its official name."""
    tensors = {}
    for shard in sorted(Path(folder).glob("model*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def test_fixture_is_what_the_tests_assume():
    assert len(SHARDS) == 2 and (FIXTURE / "model.safetensors.index.json").exists()
    assert sum(p.stat().st_size for p in FIXTURE.iterdir()) < 2e6
    config = json.loads((FIXTURE / "config.json").read_text())
    split = config["n_layers_in_prelude"], config["n_layers_in_recurrent_block"], config["n_layers_in_coda"]
    assert split == (2, 4, 2)  # the official latest-m4 lookup hard-codes Huginn's split
    # every decision the tests repeat is far from a tie, measured on the official side
    assert GOLDEN["greedy"]["min_top2_margin"] > 1e-3
    assert GOLDEN["adaptive"]["min_log_distance_to_threshold"] > 1e-2


def test_loads_the_official_layout_with_huginn_settings():
    model = from_pretrained(FIXTURE)
    c = model.config
    assert (c.n_embd, c.n_head, c.intermediate_size, c.vocab_size, c.block_size) == (32, 2, 64, 128, 64)
    assert (c.mean_recurrence, c.mean_backprop_depth, c.rope_base, c.norm_eps) == (32, 8, 50000.0, 1e-6)
    assert (c.init, c.token_shift, c.scale_embedding) == ("takase", False, True)
    assert not model.training and model.lm_head.weight is model.wte.weight
    tensors = fixture_tensors()
    assert torch.equal(model.core[3].attn.qk_bias, tensors["transformer.core_block.3.attn.qk_bias"].unsqueeze(3))
    assert torch.equal(model.coda[1].norm_4.weight, tensors["transformer.coda.1.norm_4.weight"])
    assert model.rope_cos.dtype == torch.float32
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_bf16_load():
    model = from_pretrained(FIXTURE, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.rope_cos.dtype == torch.float32  # the official code keeps RoPE in fp32 too
    assert torch.equal(model.adapter.weight, fixture_tensors()["transformer.adapter.weight"].bfloat16())


@pytest.mark.parametrize("num_steps", [1, 4, 32])
def test_logits_match_the_official_code(num_steps):
    model = from_pretrained(FIXTURE)
    logits, _ = model(torch.tensor([GOLDEN["prompt_ids"]]), num_steps=num_steps, init_scale=0)
    want = torch.tensor(GOLDEN["logits"][str(num_steps)])
    assert (logits[0] - want).abs().max().item() <= 1e-5


def test_greedy_tokens_match_the_official_code(zero_state_model):
    g = GOLDEN["greedy"]
    idx = torch.tensor([g["prompt_ids"]])
    out = generate(zero_state_model, idx, len(g["tokens"]), num_steps=g["num_steps"])
    assert out.ids[0, idx.size(1):].tolist() == g["tokens"]


def test_adaptive_exit_steps_match_the_official_code(zero_state_model):
    """The official generate_with_adaptive_compute with cache_lookup_strategy "latest-m4" (a token
    at step i reads, for an earlier token that stopped before i, that token's last keys of the same
    core layer) is minird's adaptive exit with its "full" cache, which repeats the last entries so.
    The prompt is one token: the official prefill stops all prompt tokens together, on the last one's
    criterion, where minird stops each by its own."""
    a = GOLDEN["adaptive"]
    out = generate(zero_state_model, torch.tensor([a["prompt_ids"]]), len(a["tokens"]), num_steps=a["num_steps"],
                   criterion=a["criterion"], exit_threshold=a["exit_threshold"])
    assert out.ids[0, 1:].tolist() == a["tokens"]
    assert out.steps[0].tolist() == a["steps"]  # the prompt token's, then each fed token's


def test_save_pretrained_round_trip(tmp_path):
    model = from_pretrained(FIXTURE)
    save_pretrained(model, tmp_path, shard_size=100_000)
    assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("model-*"))) > 2
    saved, original = fixture_tensors(tmp_path), fixture_tensors()
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[name], original[name]) for name in saved)
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads((FIXTURE / "config.json").read_text())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in saved.values())
    again = from_pretrained(tmp_path)
    assert again.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_save_pretrained_single_file_replaces_an_old_index(tmp_path):
    model = from_pretrained(FIXTURE)
    save_pretrained(model, tmp_path, shard_size=100_000)
    save_pretrained(model, tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "model.safetensors.index.json").exists()
    assert from_pretrained(tmp_path).config == model.config


def test_config_round_trip():
    config = RecurrentDepthConfig(vocab_size=100, n_embd=48, n_head=3, n_layers_in_prelude=1, n_layers_in_coda=3,
                                  init="normal", init_scale=0.0, token_shift=False)
    assert config_from_official(config_to_official(config)) == config


def test_save_refuses_what_the_official_layout_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="token_shift"):
        save_pretrained(RecurrentDepthLM(RecurrentDepthConfig(token_shift=True)), tmp_path)


# -----------------------------------------------------------------------------
# bad checkpoints: one line naming the file, the tensor or the field


def broken_copy(tmp_path, config_changes=None, remove=None):
    """A copy of the fixture with config.json fields changed and a file removed."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(FIXTURE, folder)
    if config_changes:
        config = json.loads((folder / "config.json").read_text())
        config.update(config_changes)
        (folder / "config.json").write_text(json.dumps(config))
    if remove:
        (folder / remove).unlink()
    return folder


def assert_one_line_value_error(folder, *fragments):
    with pytest.raises(ValueError) as info:
        from_pretrained(folder)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_config(tmp_path):
    assert_one_line_value_error(broken_copy(tmp_path, remove="config.json"), "no config.json")


def test_missing_shard(tmp_path):
    assert_one_line_value_error(broken_copy(tmp_path, remove=SHARDS[1]), SHARDS[1], "missing")


def test_no_weights(tmp_path):
    folder = broken_copy(tmp_path, remove="model.safetensors.index.json")
    assert_one_line_value_error(folder, "no model.safetensors")


@pytest.mark.parametrize("keep", [0.5, 0.001])  # cut in the data, cut in the header
def test_truncated_shard(tmp_path, keep):
    folder = broken_copy(tmp_path)
    shard = folder / SHARDS[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:int(len(data) * keep)])
    assert_one_line_value_error(folder, SHARDS[1], "not a complete safetensors file")


def test_missing_tensor(tmp_path):
    folder = broken_copy(tmp_path)
    tensors = load_file(folder / SHARDS[0])
    name = next(iter(tensors))
    save_file({k: v for k, v in tensors.items() if k != name}, folder / SHARDS[0], metadata={"format": "pt"})
    assert_one_line_value_error(folder, name, "1 tensors missing")


def test_lm_head_must_be_tied(tmp_path):
    folder = broken_copy(tmp_path)
    tensors = load_file(folder / SHARDS[1])
    tensors["lm_head.weight"] = torch.zeros(128, 32)
    save_file(tensors, folder / SHARDS[1], metadata={"format": "pt"})
    assert_one_line_value_error(folder, "lm_head.weight differs from transformer.wte.weight")


def test_tied_head_stored_instead_of_the_embedding(tmp_path):
    """A tied checkpoint may keep the tensor under the head's name only (the official vLLM loader reads either)."""
    folder = broken_copy(tmp_path)
    for shard in SHARDS:
        tensors = load_file(folder / shard)
        if "transformer.wte.weight" in tensors:
            tensors["lm_head.weight"] = tensors.pop("transformer.wte.weight")
            save_file(tensors, folder / shard, metadata={"format": "pt"})
    model = from_pretrained(folder)
    assert torch.equal(model.wte.weight, fixture_tensors()["transformer.wte.weight"])
    assert model.lm_head.weight is model.wte.weight


def test_wrong_shape(tmp_path):
    folder = broken_copy(tmp_path, {"intermediate_size": 48})
    assert_one_line_value_error(folder, "mlp.fc.weight has shape (128, 32), config.json gives (96, 32)")


def test_extra_tensor(tmp_path):
    folder = broken_copy(tmp_path, {"n_layers_in_coda": 1})
    assert_one_line_value_error(folder, "transformer.coda.1.", "not part of a Huginn model")


@pytest.mark.parametrize("changes, fragment", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "'llama'"),
    ({"architectures": ["RavenForSequenceClassification"]}, "RavenForSequenceClassification"),
])
def test_another_architecture(tmp_path, changes, fragment):
    assert_one_line_value_error(broken_copy(tmp_path, changes), fragment, "is not Huginn's")


@pytest.mark.parametrize("changes, fragment", [
    ({"num_key_value_heads": 1}, "grouped-query attention"),
    ({"test_time_noise": 0.1}, "test_time_noise=0.1"),
    ({"tie_embeddings": False}, "tie_embeddings=False"),
    ({"mlp_class_name": "BaseMLP"}, "mlp_class_name='BaseMLP'"),
    ({"init_strategy": "mitchell"}, "init_strategy='mitchell'"),
    ({"n_heads": 3, "num_key_value_heads": 3}, "not a multiple"),
])
def test_options_minird_does_not_implement(tmp_path, changes, fragment):
    assert_one_line_value_error(broken_copy(tmp_path, changes), fragment)


def test_official_field_aliases_and_defaults():
    """RavenConfig's attribute_map spellings are read; absent fields take RavenConfig's defaults."""
    config = config_from_official({"model_type": "huginn_raven", "num_attention_heads": 4, "hidden_size": 64})
    assert (config.n_head, config.n_embd, config.intermediate_size, config.mean_recurrence) == (4, 64, 17920, 32)


def test_not_a_folder(tmp_path):
    assert_one_line_value_error(tmp_path / "nothing" / "here", "no such folder")


# -----------------------------------------------------------------------------
# hub ids: snapshot_download replaced, so nothing is downloaded


def test_hub_id_goes_through_snapshot_download(monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(FIXTURE)

    monkeypatch.setattr(pretrained, "snapshot_download", fake_snapshot_download)
    model = from_pretrained("tomg-group-umd/huginn-0125")
    tokenizer = HuginnTokenizer.from_pretrained("tomg-group-umd/huginn-0125")
    assert model.config.n_embd == 32 and tokenizer.vocab_size == 128
    assert [repo for repo, _ in calls] == ["tomg-group-umd/huginn-0125"] * 2
    assert set(calls[0][1]["allow_patterns"]) == {"*.json", "*.safetensors"}


def test_hub_id_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # the import fails
    with pytest.raises(ValueError, match=r"minird\[hf\]"):
        from_pretrained("tomg-group-umd/huginn-0125")


# -----------------------------------------------------------------------------
# the tokenizer


@pytest.fixture
def tokenizer():
    return HuginnTokenizer.from_pretrained(FIXTURE)


def test_encode_decode_match_transformers(tokenizer):
    for case in GOLDEN["tokenizer"]["texts"]:
        assert tokenizer.encode(case["text"], add_special_tokens=False) == case["ids"]
        assert tokenizer.encode(case["text"]) == case["ids_with_special_tokens"]
        assert tokenizer.decode(case["ids_with_special_tokens"]) == case["decoded"]
        assert tokenizer.decode(case["ids"]) == case["text"]  # a round trip
    text = GOLDEN["tokenizer"]["texts"][0]["text"]
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text


def test_special_and_stop_tokens(tokenizer):
    ids = {name: tokenizer.token_to_id(f"<|{name}|>") for name in ("begin_text", "end_text", "end_turn", "pad")}
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (ids["begin_text"], ids["end_text"], ids["pad"])
    assert ids["begin_text"] == GOLDEN["prompt_ids"][0]
    # the official stop set: begin_text, end_text, end_turn, and generation_config's eos ids (end_text, end_turn)
    assert tokenizer.stop_token_ids == sorted([ids["begin_text"], ids["end_text"], ids["end_turn"]])


def test_chat_format_matches_transformers(tokenizer):
    for chat in GOLDEN["tokenizer"]["chats"]:
        text = tokenizer.apply_chat_template(chat["messages"], chat["add_generation_prompt"])
        assert text == chat["text"]
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids[0] == tokenizer.bos_id and tokenizer.decode(ids) == text
    assert chat_prompt([], add_generation_prompt=True) == "<|begin_header|>Huginn<|end_header|>\n\n"


def test_chat_format_matches_the_checkpoints_jinja_template(tokenizer):
    pytest.importorskip("jinja2")
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """transformers' {% generation %}...{% endgeneration %}: marks the assistant's text (for
        training masks) and renders as its body."""
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    # the environment transformers renders chat templates in
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag])
    template = env.from_string(tokenizer.chat_template)
    conversations = [chat["messages"] for chat in GOLDEN["tokenizer"]["chats"]]
    conversations.append([{"role": "Huginn", "content": "\tHello.  "}, {"role": "tool", "content": "42"}])
    for messages in conversations:
        for add_generation_prompt in (False, True):
            want = template.render(messages=messages, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                                   add_generation_prompt=add_generation_prompt)
            assert tokenizer.apply_chat_template(messages, add_generation_prompt) == want


def test_bf16_load_runs_on_the_kernels():
    """from_pretrained(dtype=bf16) keeps the RoPE tables in fp32 (as the official code); the fused
    kernels, which take one dtype for all inputs, get them cast: the same logits as the reference
    path within bf16's tolerance, and generate runs."""
    model = from_pretrained(FIXTURE, dtype=torch.bfloat16)
    idx = torch.tensor([GOLDEN["prompt_ids"]])
    with torch.no_grad():
        fused, _ = model(idx, num_steps=4, init_scale=0)
        model.use_kernels = False
        reference, _ = model(idx, num_steps=4, init_scale=0)
    assert ((fused - reference).norm() / reference.norm()).item() <= 2e-2
    model.use_kernels = True
    assert generate(model, idx, 3, num_steps=4).ids.shape == (1, idx.size(1) + 3)
