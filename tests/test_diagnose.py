"""minird/diagnose.py: the attention statistics of the first lookup, checked against a case worked
out by hand (uniform attention), for the core block and the prelude's."""

import math

import torch

from helpers import make_model
from minird.data import CharTokenizer, CorpusConfig
from minird.diagnose import LookupProbe, lookup_pairs
from minird.model import RecurrentDepthConfig


def preset_shaped_model():
    config = RecurrentDepthConfig(vocab_size=CharTokenizer().vocab_size, block_size=96, n_embd=32, n_head=2,
                                  intermediate_size=48, n_layers_in_prelude=1, n_layers_in_recurrent_block=2,
                                  n_layers_in_coda=1)
    return make_model(config)


def test_uniform_attention_gives_the_counted_statistics():
    """With q = k = 0 every visible key gets 1 / (query + 1): p_right, the mass on ';' and the entropy
    follow from the lines' text alone, for the core block at step 1 and for the prelude block."""
    model = preset_shaped_model()
    C = model.config.n_embd
    with torch.no_grad():
        for block in (model.core[0], model.prelude[0]):
            block.attn.Wqkv.weight[:2 * C].zero_()
            block.attn.qk_bias.zero_()
    probe = LookupProbe(CorpusConfig(), seed=7, block_size=model.config.block_size, n_lines=8)
    stats = probe.attention(model)

    pairs = [(line, query, key) for line in probe.lines for query, key in lookup_pairs(line)]
    assert pairs, "the probe's lines hold one-lookup positions"
    right = sum(1 / (query + 1) for _, query, _ in pairs) / len(pairs)
    separator = sum(line.text[:query + 1].count(";") / (query + 1) for line, query, _ in pairs) / len(pairs)
    uniform = sum(math.log(query + 1) for _, query, _ in pairs) / len(pairs)
    for prefix in ("", "prelude_"):
        assert math.isclose(stats[prefix + "p_right"], right, rel_tol=1e-5)
        assert math.isclose(stats[prefix + "on_separator"], separator, rel_tol=1e-5)
        assert math.isclose(stats[prefix + "entropy"], uniform, rel_tol=1e-5)
    assert math.isclose(stats["entropy_uniform"], uniform, rel_tol=1e-9)


def test_measure_reports_the_prelude_only_where_there_is_one():
    model = preset_shaped_model()
    probe = LookupProbe(CorpusConfig(), seed=7, block_size=model.config.block_size, n_lines=8)
    stats = probe.measure(model, iteration=1)
    assert {"prelude_p_right", "prelude_on_separator", "prelude_entropy"} <= stats.keys()
    assert 0 <= stats["prelude_p_right"] <= 1 and 0 <= stats["prelude_on_separator"] <= 1
    assert 0 <= stats["prelude_entropy"] <= stats["entropy_uniform"] + 1e-6

    config = RecurrentDepthConfig(**{**vars(model.config), "n_layers_in_prelude": 0, "n_layers_in_coda": 0})
    stats = probe.measure(make_model(config), iteration=1)
    assert "p_right" in stats and not any(k.startswith("prelude_") for k in stats)
