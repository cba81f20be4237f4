"""SmolLM3: a Llama (pre-norm RMSNorm blocks, GQA, SwiGLU, tied embeddings by default) whose attention skips the rotary
embedding on some layers (NoPE): ``no_rope_layers[i]`` is 1 where layer i rotates and 0 where it does not (by default
every ``no_rope_layer_interval``-th layer, the fourth). docs/DERIVATIONS.md §10, SmolLM3.

A tiny random float64 SmolLM3 (hidden 32, 4 query heads on 2 key/value heads, d_head 8, 4 layers: layer 3 NoPE).
First each kind of layer's attention is computed from the modules; then workbench's map — the rotary commutant at a
rotating layer, GL at a NoPE layer, the pairs measured at each kind of layer — draws, negative controls, verify, fold,
bridge and a property, compared directly in float64.
"""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import workbench as wb
from test_hf_families import (DECODER, IDS, LLAMA_LIKE, TOL, bridged_exactly, decoder_shapes, exact_everywhere,
                              folded_exactly, kinds, logp, random_model, refused_and_wrong, rel)
from test_hf_families_more import _trace
from test_hf_qwen3 import HALVES, rms, rope_attention

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

SHAPE = dict(DECODER, num_hidden_layers=4)
GL_QK = {**LLAMA_LIKE, "blocks.attn.qk": {"rotary", "gl"}}  # rotary where a layer rotates, GL where it does not


def build(seed=0, **kw):
    return random_model("SmolLM3ForCausalLM", "SmolLM3Config", {**SHAPE, **kw}, seed)


def test_nope_layers_skip_the_rotary_embedding():
    """Computed from the modules: every layer is a Llama block (input_layernorm before attention); layers 0-2 rotate
    (``use_rope`` 1, the formula with the model's cos/sin), layer 3 does not (``use_rope`` 0: softmax(q·kᵀ/√d) of the
    raw projections), and each formula misses the other kind's output. The embeddings are tied."""
    model = build()
    cfg = model.config
    assert cfg.no_rope_layers == [1, 1, 1, 0] and cfg.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    B, T = IDS.shape
    H, K, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        seen = _trace(model, {"ln1": layer.input_layernorm, "attn": attn})
        x = seen["ln1"][1]
        assert torch.equal(seen["attn"][0], x) and attn.use_rope == cfg.no_rope_layers[i]
        q = attn.q_proj(x).view(B, T, H, dh).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, K, dh).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, K, dh).transpose(1, 2)
        own = rope_attention(model, attn, x, q, k, v, rotary=bool(attn.use_rope))
        other = rope_attention(model, attn, x, q, k, v, rotary=not attn.use_rope)
        assert torch.allclose(seen["attn"][1], own, rtol=0, atol=1e-12)
        assert (seen["attn"][1] - other).abs().max() > 1e-3
    ad = wb.models.hf.adapter(model).cfg
    assert ad.normalization_type == "RMS" and ad.gated_mlp and not ad.parallel_attn_mlp


def test_map_groups_per_layer_and_exact_random_intertwiner(monkeypatch):
    """The rotating layers' QK sites take the rotary commutant on the halves pairs, the NoPE layer's GL (its pairs
    measured at layer 3, none found); the tied stream signed permutations; every element exact, verify passes, and the
    NoPE layer's element is no rotary one (it mixes dimensions 0 and 1, which no pair joins)."""
    from workbench.symmetry import _rotary_pairs

    measured = []
    real = _rotary_pairs._measure_pairs
    monkeypatch.setattr(_rotary_pairs, "_PAIRS", {})
    monkeypatch.setattr(_rotary_pairs, "_measure_pairs", lambda m, layer: measured.append(layer) or real(m, layer))
    model = build()
    smap, new, t, _ = exact_everywhere(model, GL_QK)
    assert measured == [0, 3]  # one measurement per kind of layer (its attention's use_rope)
    for i in range(4):
        for k in range(2):
            g = smap[f"blocks.{i}.attn.qk.{k}"].group
            assert (g.name, getattr(g, "pairs", None)) == (("gl", None) if i == 3 else ("rotary", HALVES))
    assert any("NoPE" in n for n in smap["blocks.3.attn.qk.0"].notes)
    assert abs(float(t.elements["blocks.3.attn.qk.0"].matrix()[0, 1])) > 1e-3
    assert new.lm_head.weight is new.model.embed_tokens.weight  # the tie kept


def test_a_nope_first_layer_does_not_set_the_others_group():
    """With layer 0 NoPE and layer 1 rotating, each layer takes its own group. Measured at layer 0 alone (as every layer
    was before the pairs were measured per kind of layer), layer 1 took GL too, and a random element changed the
    log-probabilities by 0.66 with verify saying FAIL: found while adding this family."""
    model = build(num_hidden_layers=2, no_rope_layers=[0, 1])
    smap = wb.symmetry_map(model)
    assert smap["blocks.0.attn.qk.0"].group.name == "gl" and smap["blocks.1.attn.qk.0"].group.name == "rotary"
    new, t = wb.random_intertwiner(model, seed=1)
    assert rel(logp(new), logp(model)) <= TOL and wb.verify(model, new, IDS, transform=t).passed
    refused_and_wrong(model, "blocks.1.attn.qk.0", "gl")


def test_negative_controls_one_step_outside_each_group():
    """Each forced, each refused as no symmetry and each changes the log-probabilities (computed directly): GL at a
    rotating layer's QK site, a rotary group on other pairs (adjacent) there, the tied stream's rotations (gains kept),
    a GL map of the gated MLP's units. At the NoPE layer GL is the site's own group: drawn by name, exact."""
    model = build()
    adjacent = wb.get_group("rotary", 8, pairs=((0, 1), (2, 3), (4, 5), (6, 7)))
    for site, group in (("blocks.0.attn.qk.0", "gl"), ("blocks.2.attn.qk.1", adjacent), ("resid", "orthogonal"),
                        ("blocks.3.mlp", "gl")):
        refused_and_wrong(model, site, group)
    new, t = wb.random_intertwiner(model, seed=2, sites=["blocks.3.attn.qk.1"], group="gl")
    assert not t.forced and rel(logp(new), logp(model)) <= TOL


def test_verify_passes_in_float32():
    model = copy.deepcopy(build()).float()
    new, t = wb.random_intertwiner(model, seed=8)
    assert next(new.parameters()).dtype == torch.float32
    assert wb.verify(model, new, IDS, transform=t).passed


def test_fold_then_the_orthogonal_stream():
    """Folding the RMSNorm gains into the readers (the tied embedding untouched: the final gain goes into the
    unembedding only where it is untied) leaves the function; the folded stream's group is exact."""
    model = build(tie_word_embeddings=False)
    folded_exactly(model, "orthogonal", logp, seed=5)


def test_bridge_around_smollm3_is_exact(tmp_path_factory):
    """TransformerLens's SmolLM3 adapter drops the rotation on NoPE layers: the bridge's logits agree with the model's
    to the float32 norms' rounding, and its map (GL at layer 3) and draws are the raw model's, exact."""
    model = build()
    model.config.architectures = ["SmolLM3ForCausalLM"]
    bridged, report = bridged_exactly(model, tmp_path_factory.getbasetemp())
    with torch.no_grad():
        assert rel(bridged(IDS).double().log_softmax(-1), model(input_ids=IDS).logits.log_softmax(-1)) < 1e-6
    assert wb.symmetry_map(bridged)["blocks.3.attn.qk.0"].group.name == "gl"
    assert report.floor is not None and report.max_abs_diff <= 10 * report.floor


@pytest.mark.parametrize("kw", [dict(attention_bias=True, mlp_bias=True), dict(tie_word_embeddings=False),
                                dict(num_key_value_heads=1), dict(num_key_value_heads=4),
                                dict(use_sliding_window=True, sliding_window=4), dict(no_rope_layer_interval=2)],
                         ids=["biases", "untied", "mqa", "mha", "sliding", "every-other"])
def test_configuration_variants_are_exact(kw):
    model = build(seed=3, **kw)
    smap = wb.symmetry_map(model)
    assert all(why.startswith("one key/value head") for _, why in smap.skipped), smap.skipped
    nope = {i for i, r in enumerate(model.config.no_rope_layers) if not r}
    assert {i for i in range(4) if smap[f"blocks.{i}.attn.qk.0"].group.name == "gl"} == nope
    new, _ = wb.random_intertwiner(model, seed=4)
    assert rel(logp(new), logp(model)) <= TOL


@settings(max_examples=8, deadline=None)
@given(kw=decoder_shapes(), rope=st.lists(st.sampled_from([0, 1]), min_size=2, max_size=2), seed=st.integers(0, 2 ** 16))
def test_property_random_shapes_and_nope_patterns_are_exact(kw, rope, seed):
    model = build(seed=seed % 5, **dict(kw, no_rope_layers=rope[:kw["num_hidden_layers"]]))
    smap = wb.symmetry_map(model)
    assert [smap[f"blocks.{i}.attn.qk.0"].group.name for i in range(kw["num_hidden_layers"])] == \
        ["rotary" if r else "gl" for r in rope[:kw["num_hidden_layers"]]]
    new, _ = wb.random_intertwiner(model, seed=seed)
    assert rel(logp(new), logp(model)) <= TOL, (kw, rope)
