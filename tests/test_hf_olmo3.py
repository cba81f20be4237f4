"""OLMo 3: OLMo 2's block (no norm before attention or MLP, an RMSNorm on each block's output, one RMSNorm over all
heads' queries and one over all keys before the rotary embedding) with two kinds of layer, ``layer_types``: sliding
window layers and full attention layers, each kind with its own rotary parameters (``rope_parameters[layer_type]``:
OLMo 3's checkpoints rotate their full layers with YaRN, their sliding ones with the default embedding).
docs/DERIVATIONS.md §10, OLMo 3.

A tiny random float64 OLMo 3 (hidden 32, 4 query heads on 2 key/value heads, d_head 8), layer 0 sliding (window 4 over
9 tokens) with the default rotary embedding (base 10⁴), layer 1 full with YaRN (factor 4, attention factor ≈ 1.14).
First the block and each kind of layer's attention are computed from the modules; then workbench's map (the rotary
pairs measured at each kind of layer), draws, negative controls, verify, fold, bridge and a property, compared
directly in float64.
"""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import workbench as wb
from test_hf_families import (DECODER, FAIL, IDS, TOL, bridged_exactly, decoder_shapes, exact_everywhere,
                              kinds, logp, random_model, refused_and_wrong, rel)
from test_hf_families_more import _trace
from test_hf_qwen3 import HALVES, rms, rope_attention

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

TYPES = ["sliding_attention", "full_attention"]
ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0,
                           "original_max_position_embeddings": 4}}
SHAPE = dict(DECODER, sliding_window=4, layer_types=TYPES)
GROUPS = {"resid": {"signed_permutation"}, "blocks.attn.qk": {"rotary_orthogonal"}, "blocks.attn.ov": {"gl"},
          "blocks.mlp": {"diagonal_permutation"}, "blocks.attn.heads": {"permutation"}}


def build(seed=0, equal_in_group0=False, **kw):
    """A random float64 OLMo 3 (gains around 1; ``rope_parameters`` ROPE unless given); ``equal_in_group0``: in every
    layer the q/k norm gains of query heads 0, 1 and key head 0 are equal on every rotary pair (their site may
    rotate), the others' stay generic."""
    model = random_model("Olmo3ForCausalLM", "Olmo3Config", {**SHAPE, "rope_parameters": copy.deepcopy(ROPE), **kw}, seed)
    if equal_in_group0:
        dh = model.config.hidden_size // model.config.num_attention_heads
        with torch.no_grad():
            for layer in model.model.layers:
                attn = layer.self_attn
                for norm, heads in ((attn.q_norm, (0, 1)), (attn.k_norm, (0,))):
                    g = norm.weight.view(-1, dh)
                    for h in heads:
                        g[h, dh // 2:] = g[h, :dh // 2]
    return model


def test_each_kind_of_layer_has_its_own_rotary_embedding_and_mask():
    """Computed from the modules: OLMo 2's block (the raw stream into attention, the output norm before the add), one
    norm over every head's queries, and per layer the attention written out in float64 with that layer type's own
    cos/sin — layer 0 under a 4-token window, layer 1 over every earlier token. The two kinds' rotations differ (the
    YaRN layer scales cos and sin by its attention factor): with the other kind's, or without the window, the formula
    misses the module's output."""
    model = build()
    cfg = model.config
    B, T = IDS.shape
    H, K, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    rope = model.model.rotary_emb
    cos = {t: rope(torch.zeros(1, T, 32, dtype=torch.float64), torch.arange(T)[None], t)[0] for t in TYPES}
    assert (cos["sliding_attention"] - cos["full_attention"]).abs().max() > 0.1
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        seen = _trace(model, {"layer": layer, "attn": attn, "post_attn": layer.post_attention_layernorm})
        x = seen["layer"][0]
        assert not hasattr(layer, "input_layernorm") and torch.equal(seen["attn"][0], x)  # the raw stream
        assert torch.equal(seen["post_attn"][0], seen["attn"][1])  # the attention's output, normed before the add
        assert attn.attention_type == TYPES[i] and attn.q_norm.weight.shape == (H * dh,)
        q = rms(attn.q_proj(x), attn.q_norm.weight, cfg.rms_norm_eps).view(B, T, H, dh).transpose(1, 2)
        k = rms(attn.k_proj(x), attn.k_norm.weight, cfg.rms_norm_eps).view(B, T, K, dh).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, K, dh).transpose(1, 2)
        window = 4 if TYPES[i] == "sliding_attention" else None
        out = rope_attention(model, attn, x, q, k, v, window=window, layer_type=TYPES[i])
        assert torch.allclose(seen["attn"][1], out, rtol=0, atol=1e-6)  # (float32 norms)
        other = rope_attention(model, attn, x, q, k, v, window=window, layer_type=TYPES[1 - i])
        assert (seen["attn"][1] - other).abs().max() > 1e-3
        if window:
            assert (seen["attn"][1] - rope_attention(model, attn, x, q, k, v, layer_type=TYPES[i])).abs().max() > 1e-3
    facts = wb.models.hf.facts(model)
    assert facts["qk_norm"] and not facts["parallel"] and not facts["post_ln"]


def test_the_rotary_pairs_are_measured_at_each_kind_of_layer(monkeypatch):
    """Each kind of layer is measured at its first layer (its attention module's settings differ: attention_type,
    sliding_window): with three sliding layers and a full one, layers 0 and 3, and both find the halves pairs."""
    from workbench.symmetry import _rotary_pairs

    measured = []
    real = _rotary_pairs._measure_pairs
    monkeypatch.setattr(_rotary_pairs, "_PAIRS", {})
    monkeypatch.setattr(_rotary_pairs, "_measure_pairs", lambda m, layer: measured.append(layer) or real(m, layer))
    model = build(num_hidden_layers=4, layer_types=None)  # Olmo3Config's default: every fourth layer full
    assert model.config.layer_types == ["sliding_attention"] * 3 + ["full_attention"]
    smap = wb.symmetry_map(model)
    assert measured == [0, 3]
    assert all(smap[f"blocks.{i}.attn.qk.{k}"].group.pairs == HALVES for i in range(4) for k in range(2))


def test_map_groups_and_exact_random_intertwiner():
    """The stream: signed permutations (the output norms' and the final norm's gains); QK per key head: rotations on
    the pairs where every gain slice the site meets is equal (key head 0's site in both layers), ±I elsewhere; heads
    permuted with their gain slices; every element exact, verify passes in float64."""
    model = build(equal_in_group0=True)
    smap, new, t, report = exact_everywhere(model, GROUPS)
    for i in range(2):
        assert smap[f"blocks.{i}.attn.qk.0"].group.rigid == () and smap[f"blocks.{i}.attn.qk.1"].group.rigid == HALVES
        M = t.elements[f"blocks.{i}.attn.qk.0"].matrix()
        assert abs(float(M[0, 4])) > 1e-3 and torch.allclose(M @ M.T, torch.eye(8, dtype=torch.float64), atol=1e-14)
    assert report.floor is not None  # (float32 RMSNorms inside: held to the measured floor)


def test_negative_controls_one_step_outside_each_group():
    """Each forced, each refused as no symmetry and each changes the log-probabilities (computed directly): at the full
    (YaRN) layer's rotating QK site the rotary commutant with scales (Llama's group: the norm over every head does not
    pass a scale) and GL; at the sliding layer's rigid site a rotation of its pairs; the stream's rotations; a GL map
    of the gated MLP's units."""
    model = build(equal_in_group0=True)
    for site, group in (("blocks.1.attn.qk.0", wb.get_group("rotary", 8, pairs=HALVES)), ("blocks.1.attn.qk.0", "gl"),
                        ("blocks.0.attn.qk.1", wb.get_group("rotary_orthogonal", 8, pairs=HALVES)),
                        ("resid", "orthogonal"), ("blocks.1.mlp", "gl")):
        refused_and_wrong(model, site, group)


def test_verify_passes_in_float32():
    model = copy.deepcopy(build()).float()
    new, t = wb.random_intertwiner(model, seed=8)
    assert next(new.parameters()).dtype == torch.float32
    report = wb.verify(model, new, IDS, transform=t)
    assert report.passed, report.summary()


def test_fold_moves_the_final_gain_only():
    from test_hf_olmo2 import fold_moves_the_final_gain_only

    fold_moves_the_final_gain_only(build())


def test_bridge_around_olmo3_is_exact(tmp_path_factory):
    """TransformerLens's OLMo 3 adapter is OLMo 2's; the bridge runs each layer with the mask and rotation the Hugging
    Face model hands it: its logits agree with the model's to the float32 norms' rounding, and its map and draws are
    the raw model's, exact."""
    model = build(equal_in_group0=True)
    model.config.architectures = ["Olmo3ForCausalLM"]  # as a checkpoint's config says (TransformerLens boots by it)
    bridged, report = bridged_exactly(model, tmp_path_factory.getbasetemp())
    with torch.no_grad():
        assert rel(bridged(IDS).double().log_softmax(-1), model(input_ids=IDS).logits.log_softmax(-1)) < 1e-6
    assert report.floor is not None and report.max_abs_diff <= 10 * report.floor


@pytest.mark.parametrize("kw", [dict(tie_word_embeddings=True), dict(attention_bias=True), dict(num_key_value_heads=1),
                                dict(num_key_value_heads=4), dict(layer_types=["full_attention"] * 2),
                                dict(rope_parameters={t: {"rope_type": "default", "rope_theta": 5e5} for t in TYPES})],
                         ids=["tied", "biases", "mqa", "mha", "all-full", "one-rope"])
def test_configuration_variants_are_exact(kw):
    model = build(seed=3, **kw)
    smap = wb.symmetry_map(model)
    assert {k: v for k, v in kinds(smap).items() if k in GROUPS and k != "blocks.attn.heads"} == \
        {k: v for k, v in GROUPS.items() if k != "blocks.attn.heads"}
    assert all(why.startswith("one key/value head") for _, why in smap.skipped), smap.skipped
    new, _ = wb.random_intertwiner(model, seed=4)
    assert rel(logp(new), logp(model)) <= TOL


@settings(max_examples=8, deadline=None)
@given(kw=decoder_shapes(), bias=st.booleans(), types=st.lists(st.sampled_from(TYPES), min_size=2, max_size=2),
       window=st.sampled_from([2, 4, 16]), seed=st.integers(0, 2 ** 16))
def test_property_random_shapes_and_layer_types_are_exact(kw, bias, types, window, seed):
    model = build(seed=seed % 5, attention_bias=bias, sliding_window=window, **dict(kw, layer_types=types[:kw["num_hidden_layers"]]))
    new, _ = wb.random_intertwiner(model, seed=seed)
    assert rel(logp(new), logp(model)) <= TOL, (kw, types, window)
