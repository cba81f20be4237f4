"""OLMo (1): a Llama (GQA, rotary on ``rotate_half`` pairs, SwiGLU, no biases) whose norms are LayerNorms with **no
parameters at all** (``OlmoLayerNorm``: mean-centred, eps 1e-5, computed in float32). docs/DERIVATIONS.md §10, OLMo.

A parameter-free LayerNorm is §2's folded norm (gain 1, bias 0), so the stream takes what a folded LN stream takes:
every rotation fixing the all-ones direction, times a sign, ``s·R`` (``orthogonal_ones``); a tied embedding keeps it
(the embedding ``E·Rᵀ`` is also the unembedding, which reads through ``R⁻¹ = Rᵀ``). ``clip_qkv`` clamps every query,
key and value coordinate, which the GL and rotary maps of those spaces do not commute with: refused by name.

The direct checks give the norm its formula in float64 (``logp``); verify runs the model as it is (float32 inside)
and is held to the floor it measures (``_hf.FLOAT32_NORM_FAMILIES``).
"""
import pytest
import torch
import torch.nn.functional as F

import workbench as wb
from test_hf_families import (DECODER, IDS, LLAMA_LIKE, TOL, as_raw, bridged_exactly, exact_everywhere, random_model,
                              refused_and_wrong, rel)
from test_hf_families_more import _trace

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

SHAPE = DECODER
GROUPS = {**LLAMA_LIKE, "resid": {"orthogonal_ones"}}


def build(seed=0, **kw):
    return random_model("OlmoForCausalLM", "OlmoConfig", {**SHAPE, **kw}, seed)


def layer_norm64(x):
    """OlmoLayerNorm's formula in the input's dtype: mean-centred, no gain, no bias, eps 1e-5."""
    return F.layer_norm(x, x.shape[-1:], None, None, eps=1e-5)


def logp(model):
    """Log-probabilities in float64, the norms given their formula in float64 (Hugging Face computes them in float32)."""
    new = as_raw(model)
    for m in new.modules():
        if type(m).__name__ == "OlmoLayerNorm":
            m.forward = layer_norm64
    with torch.no_grad():
        return new(input_ids=IDS).logits.log_softmax(-1)


def test_the_norms_have_no_parameters_and_read_the_stream():
    model = build()
    layer = model.model.layers[0]
    assert not any("layernorm" in n or "norm." in n for n, _ in model.named_parameters())
    seen = _trace(model, {"layer": layer, "ln1": layer.input_layernorm, "attn": layer.self_attn,
                          "ln2": layer.post_attention_layernorm, "mlp": layer.mlp, "final": model.model.norm})
    x, out = seen["layer"]
    assert torch.equal(seen["ln1"][0], x)
    assert torch.allclose(seen["ln1"][1], layer_norm64(x), rtol=0, atol=1e-6)  # (float32 inside)
    mid = x + seen["attn"][1]
    assert torch.allclose(seen["ln2"][0], mid, rtol=0, atol=1e-13)
    assert torch.allclose(out, mid + seen["mlp"][1], rtol=0, atol=1e-13)
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    assert torch.allclose(logits, model.lm_head(seen["final"][1]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kw", [{}, dict(tie_word_embeddings=True)], ids=["untied", "tied"])
def test_map_groups_and_exact_random_intertwiner(kw):
    """A rotation fixing 1 on the stream, Llama's sites elsewhere; every element exact in float64; verify passes on the
    model as it is against its measured floor. A rotation that does not fix 1 (a Haar rotation) and a sign per
    coordinate are refused, and change the function."""
    model = build(**kw)
    smap, _, _, report = exact_everywhere(model, GROUPS, logp)
    assert report.floor is not None
    R = smap["resid"].group.sample(seed=3).matrix()
    ones = torch.ones(R.shape[0], dtype=R.dtype)
    assert torch.allclose(R @ ones, ones, atol=1e-12) and not torch.allclose(R.abs(), torch.eye(R.shape[0], dtype=R.dtype))
    for wrong in ("orthogonal", "signed_permutation"):
        refused_and_wrong(model, "resid", wrong, logp)


def test_bridge_around_olmo_is_exact(tmp_path_factory):
    model = build()
    model.config.architectures = ["OlmoForCausalLM"]
    bridged_exactly(model, tmp_path_factory.getbasetemp(), logp)


def test_clip_qkv_is_refused_by_name():
    model = build(clip_qkv=0.5)
    smap = wb.symmetry_map(model)
    assert len(smap) == 0 and "clip_qkv=0.5" in smap.skipped[0][1], smap.skipped
    with pytest.raises(wb.UnsupportedModelError, match="clip_qkv"):
        wb.random_intertwiner(model, seed=0)


def test_verify_measures_the_float32_layernorm_as_the_floor(monkeypatch):
    """verify rounds the stream where the float32 norms read it (OLMo is named in FLOAT32_NORM_FAMILIES) and PASSes the
    exact transform; without that name it measured no floor and FAILed it (9e-8 against a 1e-10 tolerance)."""
    model = build()
    new, t = wb.random_intertwiner(model, seed=1)
    assert rel(logp(new), logp(model)) <= TOL
    report = wb.verify(model, new, IDS, transform=t)
    assert report.passed and report.floor is not None and report.tolerance < 1e-5, report.summary()
    monkeypatch.setattr(wb.models.hf, "FLOAT32_NORM_FAMILIES", frozenset())
    assert not wb.verify(model, new, IDS, transform=t).passed
