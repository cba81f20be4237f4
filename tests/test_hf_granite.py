"""Granite: a Llama (RMSNorm, GQA, rotary, SwiGLU) with four scalars — the embedding times ``embedding_multiplier``,
each block's outputs times ``residual_multiplier`` before they join the stream, the attention scores times
``attention_multiplier`` (instead of 1/√d_head), the logits divided by ``logits_scaling``. docs/DERIVATIONS.md §10.

A scalar commutes with every linear map, so the groups are Llama's; what is checked here is that the scalars sit where
that argument needs them (computed from the modules), then the map, draws, fold and bridge, compared directly.
"""
import math

import pytest
import torch

import workbench as wb
from test_hf_families import (DECODER, IDS, LLAMA_LIKE, bridged_exactly, exact_everywhere, folded_exactly, random_model,
                              refused_and_wrong)
from test_hf_families_more import _trace
from test_hf_qwen3 import rms

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

SHAPE = dict(DECODER, embedding_multiplier=3.0, residual_multiplier=0.3, attention_multiplier=0.2, logits_scaling=2.5)


def build(seed=0, **kw):
    return random_model("GraniteForCausalLM", "GraniteConfig", {**SHAPE, **kw}, seed)


def test_the_four_scalars_sit_where_the_argument_needs_them():
    model = build()
    layer, cfg = model.model.layers[0], model.config
    seen = _trace(model, {"layer": layer, "attn": layer.self_attn, "mlp": layer.mlp, "n2": layer.post_attention_layernorm,
                          "final": model.model.norm})
    x, out = seen["layer"]
    assert torch.allclose(x, model.model.embed_tokens(IDS) * 3.0, rtol=0, atol=1e-13)  # the first layer's input
    mid = x + 0.3 * seen["attn"][1]
    assert torch.allclose(seen["n2"][0], mid, rtol=0, atol=1e-13)
    assert torch.allclose(out, mid + 0.3 * seen["mlp"][1], rtol=0, atol=1e-13)
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    assert torch.allclose(logits, model.lm_head(seen["final"][1]) / 2.5, rtol=0, atol=1e-12)
    assert layer.self_attn.scaling == 0.2 != 1 / math.sqrt(8)  # scores: q·k times the multiplier
    assert torch.allclose(seen["final"][1], rms(seen["final"][0], model.model.norm.weight, cfg.rms_norm_eps), atol=1e-6)


def test_map_groups_and_exact_random_intertwiner():
    model = build()
    exact_everywhere(model, LLAMA_LIKE)
    refused_and_wrong(model, "resid", "orthogonal")
    folded_exactly(model, "orthogonal")


def test_bridge_around_granite_is_exact(tmp_path_factory):
    model = build()
    model.config.architectures = ["GraniteForCausalLM"]
    bridged_exactly(model, tmp_path_factory.getbasetemp())
