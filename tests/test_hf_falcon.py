"""Falcon (the 7B form and its switches): a fused query_key_value (multi-query, or one key/value head per query head),
rotary or ALiBi positions, a parallel block (one LayerNorm read by attention and MLP) or a sequential one, optional
biases, and an MLP whose activation is ``config.activation`` (GELU by default). docs/DERIVATIONS.md §10, Falcon.

TransformerLens's adapter does not set the activation: its configuration says "relu", and a transform built on that
drew positive scales for GELU units and moved the float64 log-probabilities by 0.2 (verify FAILed it; nothing refused).
The layout reads the model's own (``_hf._ACTIVATIONS``). ``new_decoder_architecture`` (Falcon-40B/180B: q/k/v rows
grouped per key/value head, two LayerNorms ``ln_attn`` and ``ln_mlp`` read in parallel) is read with one key/value head
(its one group is [queries | key | value], the multi-query layout) and refused with more than one: TransformerLens's
split of its fused projection fails there. Configurations whose own forward cannot run (the old architecture without
multi-query and num_kv_heads other than the head count; the new one with parallel_attn=False) are refused by name.
"""
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

import workbench as wb
from test_hf_config_hunt import build, outputs, preserved
from test_hf_families import FAIL, IDS, TOL, bridged_exactly, folded_exactly, kinds, refused_and_wrong, rel

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

ROTARY = {"resid": {"permutation"}, "blocks.attn.qk": {"rotary"}, "blocks.attn.ov": {"gl"},
          "blocks.attn.heads": {"permutation"}, "blocks.mlp": {"permutation"}}
VARIANTS = {  # id: (config switches, the groups)
    "7b": ({}, ROTARY),
    "mha": (dict(multi_query=False), ROTARY),
    "sequential": (dict(parallel_attn=False), ROTARY),
    "biases": (dict(bias=True), ROTARY),
    "alibi": (dict(alibi=True), {k: v for k, v in {**ROTARY, "blocks.attn.qk": {"gl"}}.items()
                                 if k != "blocks.attn.heads"}),  # no head permutations: a slope per head
    "relu": (dict(activation="relu"), {**ROTARY, "blocks.mlp": {"scaled_permutation"}}),
}


def logits(model):
    return outputs(model)["logits"]


def test_the_mlp_runs_the_configured_activation_not_the_adapters():
    model = build("falcon")
    mlp, x = model.transformer.h[0].mlp, torch.randn(2, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(mlp(x), mlp.dense_4h_to_h(F.gelu(mlp.dense_h_to_4h(x))), rtol=0, atol=1e-13)
    assert wb.models.hf.adapter(model).cfg.act_fn == "relu" and wb.models.hf.facts(model)["act_fn"] == "gelu"
    layer = model.transformer.h[0]
    assert model.config.parallel_attn and not hasattr(layer, "post_attention_layernorm")  # one norm, read by both


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_map_groups_and_exact(variant):
    kw, groups = VARIANTS[variant]
    model = build("falcon", kw)
    smap = wb.symmetry_map(model)
    assert kinds(smap) == groups
    assert all(why.startswith(("one key/value head", "ALiBi")) for _, why in smap.skipped), smap.skipped
    assert preserved(model, seeds=(1, 2)) <= TOL  # every output computed here in float64; verify passes on each


def test_the_adapters_activation_would_transform_wrongly(monkeypatch):
    """With the model's activation not read (the adapter's "relu" believed), GELU units take positive scales: the
    log-probabilities move and verify FAILs. A scale of GELU units is refused on the map the model's activation gives."""
    model = build("falcon")
    refused_and_wrong(model, "blocks.0.mlp", "diagonal_permutation", logp=logits)
    monkeypatch.setattr(wb.models.hf, "_ACTIVATIONS", {})
    monkeypatch.setattr(wb.models.hf, "_LAYOUTS", OrderedDict())  # its own cache: the wrong layout must not outlive this
    wrong = build("falcon", seed=1)
    assert kinds(wb.symmetry_map(wrong))["blocks.mlp"] == {"scaled_permutation"}
    new, t = wb.random_intertwiner(wrong, seed=1)
    assert rel(logits(new), logits(wrong)) > 1e-3
    assert not wb.verify(wrong, new, IDS, transform=t).passed


NEW_ONE_KV = dict(new_decoder_architecture=True, num_kv_heads=1)


def test_new_decoder_architecture_with_one_key_value_head_is_read_and_exact():
    """One group of [queries | key | value] rows: the multi-query layout, with two LayerNorms (``ln_attn``, ``ln_mlp``)
    reading the stream in parallel. Every output computed here in float64; ``ln_mlp`` left unmoved while the rest is
    transformed changes the outputs (it is read, not merely copied); the folded model is exact too."""
    model = build("falcon", NEW_ONE_KV)
    layer = model.transformer.h[0]
    assert hasattr(layer, "ln_attn") and hasattr(layer, "ln_mlp") and not hasattr(layer, "input_layernorm")
    assert layer.self_attention.query_key_value.weight.shape[0] == (4 + 2) * 8  # 4 query heads, 1 key, 1 value
    assert kinds(wb.symmetry_map(model)) == ROTARY
    assert preserved(model, seeds=(1, 2)) <= TOL
    new, _ = wb.random_intertwiner(model, seed=3)
    kept = {k: v for k, v in model.state_dict().items() if ".ln_mlp." in k}
    new.load_state_dict(kept, strict=False)
    assert rel(logits(new), logits(model)) > FAIL
    folded_exactly(model, "orthogonal_ones", logp=logits)
    one_norm = build("falcon", dict(NEW_ONE_KV, num_ln_in_parallel_attn=1))  # input_layernorm: not in the adapter's mapping
    with pytest.raises(wb.UnsupportedModelError, match="input_layernorm"):
        wb.random_intertwiner(one_norm, seed=0)


@pytest.mark.parametrize("kv", [2, 4])
def test_new_decoder_architecture_with_several_key_value_heads_is_refused_by_name(kv):
    model = build("falcon", dict(new_decoder_architecture=True, num_kv_heads=kv))
    smap = wb.symmetry_map(model)
    assert len(smap) == 0 and "query_key_value" in smap.skipped[0][1], smap.skipped
    with pytest.raises(wb.UnsupportedModelError, match="query_key_value"):
        wb.random_intertwiner(model, seed=0)


@pytest.mark.parametrize("kw, says", [
    (dict(multi_query=False, num_kv_heads=2), "num_kv_heads=2 makes its attention repeat"),
    (dict(multi_query=False, num_kv_heads=1), "num_kv_heads=1 makes its attention repeat"),
    (dict(NEW_ONE_KV, parallel_attn=False), "parallel_attn=False"),
])
def test_configurations_whose_own_forward_fails_are_refused_by_name(kw, says):
    """Hugging Face's own forward fails on these; read anyway, the layout took other heads (the old architecture's
    num_kv_heads) and the transform failed deep inside on an axis length, or the map was refused with the wrong cause."""
    model = build("falcon", kw)
    with pytest.raises((RuntimeError, AttributeError)):
        logits(model)
    assert says in wb.symmetry_map(model).skipped[0][1]
    with pytest.raises(wb.UnsupportedModelError, match="own forward cannot run"):
        wb.random_intertwiner(model, seed=0)


def test_bridge_around_falcon_is_exact(tmp_path_factory):
    model = build("falcon")
    model.config.architectures = ["FalconForCausalLM"]
    bridged_exactly(model, tmp_path_factory.getbasetemp(), logp=logits)
