"""Falcon (the 7B form and its switches): a fused query_key_value (multi-query, or one key/value head per query head),
rotary or ALiBi positions, a parallel block (one LayerNorm read by attention and MLP) or a sequential one, optional
biases, and an MLP whose activation is ``config.activation`` (GELU by default). docs/DERIVATIONS.md §10, Falcon.

TransformerLens's adapter does not set the activation: its configuration says "relu", and a transform built on that
drew positive scales for GELU units and moved the float64 log-probabilities by 0.2 (verify FAILed it; nothing refused).
The layout reads the model's own (``_hf._ACTIVATIONS``). ``new_decoder_architecture`` (Falcon-40B/180B: grouped q/k/v
rows per key/value head, two LayerNorms in parallel) is refused: TransformerLens's split of its fused projection fails.
"""
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

import workbench as wb
from test_hf_config_hunt import build, outputs, preserved
from test_hf_families import IDS, TOL, bridged_exactly, kinds, refused_and_wrong, rel

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


def test_new_decoder_architecture_is_refused_by_name():
    model = build("falcon", dict(new_decoder_architecture=True, num_kv_heads=2))
    smap = wb.symmetry_map(model)
    assert len(smap) == 0 and "query_key_value" in smap.skipped[0][1], smap.skipped
    with pytest.raises(wb.UnsupportedModelError, match="query_key_value"):
        wb.random_intertwiner(model, seed=0)


def test_bridge_around_falcon_is_exact(tmp_path_factory):
    model = build("falcon")
    model.config.architectures = ["FalconForCausalLM"]
    bridged_exactly(model, tmp_path_factory.getbasetemp(), logp=logits)
