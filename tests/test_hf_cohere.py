"""Cohere (Command-R): one bias-free LayerNorm read by attention and MLP in parallel, tied embeddings with the logits
scaled by ``logit_scale``, GQA, SwiGLU, and a rotary embedding on **adjacent** pairs (2i, 2i + 1).
docs/DERIVATIONS.md §10, Cohere.

Hugging Face's Cohere computes its LayerNorm and its rotary embedding in float32 even in a float64 model; the direct
checks here give both their formula in float64 (``logp``), and verify, which runs the model as it is, is held to the
floor it measures (the stream rounded where the norms read it: ``_hf.FLOAT32_NORM_FAMILIES``).
"""

import pytest
import torch

import workbench as wb
from test_hf_families import (DECODER, IDS, LLAMA_LIKE, TOL, as_raw, bridged_exactly, exact_everywhere, folded_exactly,
                              random_model, refused_and_wrong, rel)

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

SHAPE = dict(DECODER, logit_scale=0.7)


def build(seed=0, **kw):
    return random_model("CohereForCausalLM", "CohereConfig", {**SHAPE, **kw}, seed)


def layer_norm64(x, norm):
    """CohereLayerNorm's formula (mean-centred, no bias) in the input's dtype."""
    c = x - x.mean(-1, keepdim=True)
    return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight


def logp(model):
    """Log-probabilities in float64: the LayerNorms' and the rotary embedding's formulas in float64."""
    from transformers.models.cohere import modeling_cohere as mc

    def rotary64(q, k, cos, sin, unsqueeze_dim=1, **kw):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + mc.rotate_half(q) * sin, k * cos + mc.rotate_half(k) * sin

    new = as_raw(model)
    for m in new.modules():
        if type(m).__name__ == "CohereLayerNorm":
            m.forward = lambda x, m=m: layer_norm64(x, m)
    own = mc.apply_rotary_pos_emb
    mc.apply_rotary_pos_emb = rotary64
    try:
        with torch.no_grad():
            return new(input_ids=IDS).logits.log_softmax(-1)
    finally:
        mc.apply_rotary_pos_emb = own


def test_one_norm_feeds_attention_and_mlp_and_the_logits_are_scaled():
    from test_hf_families_more import _trace

    model = build()
    layer = model.model.layers[0]
    seen = _trace(model, {"layer": layer, "ln": layer.input_layernorm, "attn": layer.self_attn, "mlp": layer.mlp,
                          "final": model.model.norm})
    x, out = seen["layer"]
    assert torch.equal(seen["ln"][0], x) and torch.allclose(seen["ln"][1], layer_norm64(x, layer.input_layernorm),
                                                            rtol=0, atol=1e-6)  # (float32 inside)
    assert torch.equal(seen["attn"][0], seen["ln"][1]) and torch.equal(seen["mlp"][0], seen["ln"][1])
    assert torch.allclose(out, x + seen["attn"][1] + seen["mlp"][1], rtol=0, atol=1e-13)
    assert model.lm_head.weight is model.model.embed_tokens.weight and getattr(layer.input_layernorm, "bias", None) is None
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    assert torch.allclose(logits, model.lm_head(seen["final"][1]) * 0.7, rtol=0, atol=1e-12)
    cfg, facts = wb.models.hf.adapter(model).cfg, wb.models.hf.facts(model)
    assert cfg.normalization_type == "LN" and facts["parallel"] and cfg.gated_mlp and cfg.act_fn == "silu"


def test_map_groups_and_exact_random_intertwiner():
    """Tied LayerNorm stream: P (its exact group s·P); adjacent rotary pairs; GL values; SwiGLU D·P. Every element
    exact in float64; verify passes on the model as it is (float32 inside, judged against its measured floor); a
    sign per coordinate of the stream and the halves pairing are refused, and change the function."""
    model = build()
    smap, _, _, report = exact_everywhere(model, {**LLAMA_LIKE, "resid": {"permutation"}}, logp)
    assert smap["blocks.0.attn.qk.0"].group.pairs == ((0, 1), (2, 3), (4, 5), (6, 7)) and report.floor is not None
    halves = wb.get_group("rotary", 8, pairs=((0, 4), (1, 5), (2, 6), (3, 7)))
    for site, wrong in (("resid", "signed_permutation"), ("blocks.0.attn.qk.0", halves)):
        refused_and_wrong(model, site, wrong, logp)


def test_fold_unties_and_the_folded_stream_rotates():
    model = build()
    f = folded_exactly(model, "orthogonal_ones", logp)
    assert not f.config.tie_word_embeddings


def test_bridge_around_cohere_is_exact(tmp_path_factory):
    model = build()
    model.config.architectures = ["CohereForCausalLM"]
    bridged_exactly(model, tmp_path_factory.getbasetemp(), logp)


def test_per_head_layernorms_on_q_and_k_are_refused():
    """use_qk_norm puts a LayerNorm on each head's q and k (mean-centred: not Qwen3's RMSNorm); not derived, refused
    by name."""
    smap = wb.symmetry_map(build(use_qk_norm=True))
    assert len(smap) == 0 and "q_norm" in smap.skipped[0][1]


@pytest.mark.parametrize("kw", [dict(tie_word_embeddings=False), dict(num_key_value_heads=1), dict(num_key_value_heads=4),
                                dict(attention_bias=True)], ids=["untied", "mqa", "mha", "biases"])
def test_configuration_variants_are_exact(kw):
    model = build(seed=4, **kw)
    new, _ = wb.random_intertwiner(model, seed=4)
    assert rel(logp(new), logp(model)) <= TOL


def test_verify_measures_the_float32_layernorm_as_the_floor(monkeypatch):
    """With the rotary embedding given its formula in float64, Cohere's float32 LayerNorm is the only rounding inside a
    float64 model: verify rounds the stream where the norms read it (Cohere is named in FLOAT32_NORM_FAMILIES) and
    PASSes the exact transform; without that name it measured no floor and FAILed it at 2e-7 (checked by hand)."""
    from transformers.models.cohere import modeling_cohere as mc

    def rotary64(q, k, cos, sin, unsqueeze_dim=1, **kw):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + mc.rotate_half(q) * sin, k * cos + mc.rotate_half(k) * sin

    monkeypatch.setattr(mc, "apply_rotary_pos_emb", rotary64)
    model = build()
    new, t = wb.random_intertwiner(model, seed=1)
    report = wb.verify(model, new, IDS, transform=t)
    assert report.passed and report.floor is not None and report.tolerance < 1e-5, report.summary()
    monkeypatch.setattr(wb.models.hf, "FLOAT32_NORM_FAMILIES", frozenset())
    assert not wb.verify(model, new, IDS, transform=t).passed  # the floor unnamed: the float32 norm's rounding FAILs
