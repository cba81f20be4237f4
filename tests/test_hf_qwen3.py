"""Qwen3: an RMSNorm on each head's queries and keys (``q_norm``, ``k_norm``) between the projections and the rotary
embedding (docs/DERIVATIONS.md §10, Qwen3).

A tiny random float64 Qwen3 (hidden 32, 4 query heads sharing 2 key/value heads, d_head 8, vocabulary 50), every
parameter random (norm gains around 1). First the facts the derivation rests on are computed from the model's own
modules: each norm acts on one head's d_head values with one gain shared by every head, and the attention is
softmax(rot(q_norm(q))·rot(k_norm(k))ᵀ/√d_head) with ``rotate_half`` pairs (i, i + d/2), written out here in float64.
Then the group, checked by editing weights by hand (no workbench code): an orthogonal map rotating the pairs whose
gains are equal and ±I on the others preserves log-probabilities; a rotation of a pair whose gains differ, a scaled
rotation (the norm divides the scale out) and a Haar rotation change them. Then workbench's map, draws, verify, fold,
bridge and refusals, compared directly in float64, and a property over random shapes and gain patterns.
"""
import copy
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import workbench as wb
from test_hf_families import (FAIL, TOL, bridged_exactly, exact_everywhere, folded_exactly, kinds, logp, random_model,
                              refused_and_wrong, rel)
from test_hf_families_more import _trace

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

F64 = torch.float64
SHAPE = dict(vocab_size=50, bos_token_id=0, eos_token_id=0, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=16)
HALVES = ((0, 4), (1, 5), (2, 6), (3, 7))


def build(seed=0, equal=(), **kw):
    """A random float64 Qwen3; in layer 0 the q and k norm gains are made equal on the pairs ``equal``."""
    return equal_gains(random_model("Qwen3ForCausalLM", "Qwen3Config", {**SHAPE, **kw}, seed), equal)


def equal_gains(model, equal):
    """``model`` with layer 0's q and k norm gains made equal on the pairs ``equal``."""
    with torch.no_grad():
        for norm in (model.model.layers[0].self_attn.q_norm, model.model.layers[0].self_attn.k_norm):
            for a, b in equal:
                norm.weight[b] = norm.weight[a]
    return model


def rms(t, w, eps):
    """An RMSNorm over the last axis in float64 (Hugging Face's rounds in float32)."""
    return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_attention(model, attn, x, q, k, v, window=None, layer_type=None, rotary=True):
    """Causal attention written out in float64 from queries, keys and values [batch, heads, pos, d_head] before the
    rotary embedding (``rotate_half`` pairs (i, i + d/2), the model's own cos/sin: for ``layer_type`` where each type of
    layer has its own, OLMo 3's), key/value heads repeated for their query heads, scores over √d_head, then ``o_proj``;
    ``window``: a query sees only the keys less than ``window`` positions back (Hugging Face's sliding window mask);
    ``rotary=False``: no rotary embedding at all (SmolLM3's NoPE layers)."""
    def rotate_half(t):
        a, b = t.chunk(2, -1)
        return torch.cat((-b, a), -1)

    B, T, _ = x.shape
    if rotary:
        rope = getattr(model, "model", model).rotary_emb  # (a base model holds it itself)
        cos, sin = rope(x, torch.arange(T)[None], *([layer_type] if layer_type else []))
        q, k = q * cos[:, None] + rotate_half(q) * sin[:, None], k * cos[:, None] + rotate_half(k) * sin[:, None]
    r = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    hidden = torch.ones(T, T, dtype=torch.bool).triu(1) | (torch.ones(T, T, dtype=torch.bool).tril(-window) if window else False)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(hidden, -math.inf)
    return attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1))


def test_the_norms_are_per_head_with_one_gain_before_a_halves_rotary():
    """Computed from the modules: q_norm reads q_proj's output one head at a time (d_head values) with one gain of
    d_head entries for every head, and the attention output is the formula written out here in float64."""
    model = build()
    attn, cfg = model.model.layers[0].self_attn, model.config
    seen = _trace(model, {"q_norm": attn.q_norm, "attn": attn, "ln1": model.model.layers[0].input_layernorm})
    x = seen["ln1"][1]  # what attention reads
    B, T, _ = x.shape
    H, K, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    assert attn.q_norm.weight.shape == (dh,) and attn.k_norm.weight.shape == (dh,)
    q_in, q_out = seen["q_norm"]
    assert torch.equal(q_in, attn.q_proj(x).view(B, T, H, dh))
    assert torch.allclose(q_out, rms(q_in, attn.q_norm.weight, cfg.rms_norm_eps), rtol=0, atol=1e-6)  # (float32 inside)
    q = rms(q_in, attn.q_norm.weight, cfg.rms_norm_eps).transpose(1, 2)  # [B, H, T, dh], the formula in float64
    k = rms(attn.k_proj(x).view(B, T, K, dh), attn.k_norm.weight, cfg.rms_norm_eps).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, K, dh).transpose(1, 2)
    assert torch.allclose(seen["attn"][1], rope_attention(model, attn, x, q, k, v), rtol=0, atol=1e-6)
    wb_cfg = wb.models.hf.adapter(model).cfg
    assert wb_cfg.normalization_type == "RMS" and wb_cfg.gated_mlp and not wb_cfg.parallel_attn_mlp
    assert wb.models.hf.facts(model)["qk_norm"]


def _edit_qk(model, layer, Mq, Mk):
    """Every query head's q_proj rows by Mq and every key head's k_proj rows by Mk, by hand."""
    new = copy.deepcopy(model)
    attn = new.model.layers[layer].self_attn
    with torch.no_grad():
        q, k = attn.q_proj.weight.view(4, 8, 32), attn.k_proj.weight.view(2, 8, 32)
        q.copy_(Mq @ q)
        k.copy_(Mk @ k)
    return new


def _pairs_map(angles, scale=1.0):
    M = torch.zeros(8, 8, dtype=F64)
    for (a, b), t in zip(HALVES, angles):
        M[[a, a, b, b], [a, b, a, b]] = scale * torch.tensor([math.cos(t), -math.sin(t), math.sin(t), math.cos(t)], dtype=F64)
    return M


def test_the_derived_group_by_hand():
    """Pairs 0-2 have equal gains in both norms, pair 3 not: rotating pairs 0-2 and −I on pair 3 preserves the
    log-probabilities (q and k rows by the same orthogonal M); rotating pair 3 or a Haar rotation change them. A
    scaled rotation (q by 1.5·R, k by R/1.5, which leaves the scores alone without the norms) is divided out by the
    norms but for their ε (1e-6 added to the mean square): it moves the log-probabilities by ~1e-7 — no exact symmetry,
    so not in the group."""
    model = build(equal=HALVES[:3])
    ref = logp(model)
    good = _pairs_map([0.7, 2.1, -1.3, math.pi])
    assert rel(logp(_edit_qk(model, 0, good, good)), ref) <= TOL
    turned = _pairs_map([0.7, 2.1, -1.3, 0.4])
    assert rel(logp(_edit_qk(model, 0, turned, turned)), ref) > FAIL
    scaled = _pairs_map([0.7, 2.1, -1.3, math.pi])
    assert 1e3 * TOL < rel(logp(_edit_qk(model, 0, 1.5 * scaled, scaled / 1.5)), ref) < FAIL
    Q = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=F64))[0]
    assert rel(logp(_edit_qk(model, 0, Q, Q)), ref) > FAIL


def test_map_groups_and_exact_random_intertwiner():
    """The map: the stream signed permutations (RMSNorm, gains kept), per key head a QK site of orthogonal maps on the
    halves pairs (rigid where gains differ: all pairs of layer 1, pair 3 of layer 0), GL values, the gated MLP's D·P,
    GQA head permutations; every site's random element preserves the log-probabilities and verify passes."""
    model = build(equal=HALVES[:3])
    smap, new, t, _ = exact_everywhere(model, {"resid": {"signed_permutation"}, "blocks.attn.qk": {"rotary_orthogonal"},
                                               "blocks.attn.ov": {"gl"}, "blocks.mlp": {"diagonal_permutation"}})
    g0, g1 = smap["blocks.0.attn.qk.1"].group, smap["blocks.1.attn.qk.0"].group
    assert g0.pairs == HALVES and g0.rigid == HALVES[3:] and g0.continuous
    assert g1.rigid == HALVES and not g1.continuous
    M = t.elements["blocks.0.attn.qk.0"].matrix()
    assert abs(float(M[0, 4])) > 1e-3 and torch.allclose(M @ M.T, torch.eye(8, dtype=F64), atol=1e-14)  # a rotation
    assert torch.equal(M[[3, 7]][:, [3, 7]].abs(), torch.eye(2, dtype=F64))  # ±I on the rigid pair
    for name in ("q_norm", "k_norm"):  # the norms' gains are not moved
        assert torch.equal(getattr(new.model.layers[0].self_attn, name).weight, getattr(model.model.layers[0].self_attn, name).weight)


def test_negative_controls_are_refused_and_change_the_function():
    """At a QK site: the rotary commutant with scales (Llama's group), GL, a Haar rotation, and rotations of the rigid
    pair (the normed group without its rigid pairs) are each refused as no symmetry; forced, each changes the
    function (computed directly) and verify fails."""
    model = build(equal=HALVES[:3])
    ref = logp(model)
    site = "blocks.0.attn.qk.0"
    own = wb.symmetry_map(model)[site].group
    for wrong in (wb.get_group("rotary", 8, pairs=HALVES), "gl", "orthogonal",
                  wb.get_group("rotary_orthogonal", 8, pairs=HALVES)):
        refused_and_wrong(model, site, wrong, seed=2)
    new, t = wb.random_intertwiner(model, seed=2, sites=[site], group="rotary_orthogonal")  # the site's own, by name
    assert not t.forced and own.contains(t.elements[site]) and rel(logp(new), ref) <= TOL


def test_other_per_head_norms_stay_refused():
    """StableLM's qk_layernorm (a LayerNorm per head, mapped by TransformerLens to the same q_norm key) is still refused
    by name: the q/k norm keys are known only in the families whose norm was checked (Qwen3)."""
    from test_hf_families_more import CONFIGS, build as build_more

    model = build_more("stablelm", kw=dict(CONFIGS["stablelm"][1], qk_layernorm=True))
    smap = wb.symmetry_map(model)
    assert len(smap) == 0 and "q_layernorm" in smap.skipped[0][1]


@pytest.mark.parametrize("kw", [dict(attention_bias=True), dict(tie_word_embeddings=True),
                                dict(num_key_value_heads=1), dict(num_key_value_heads=4),
                                dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)],
                         ids=["biases", "tied", "mqa", "mha", "sliding"])
def test_configuration_variants_are_exact(kw):
    model = build(seed=3, equal=HALVES[:2], **kw)
    smap = wb.symmetry_map(model)
    assert kinds(smap)["blocks.attn.qk"] == {"rotary_orthogonal"}
    assert all(why.startswith("one key/value head") for _, why in smap.skipped), smap.skipped
    new, _ = wb.random_intertwiner(model, seed=4)
    assert rel(logp(new), logp(model)) <= TOL


def test_fold_then_the_orthogonal_stream():
    """Folding the stream's RMSNorm gains leaves the per-head norms as they are; the folded stream takes O(d)."""
    model = build(equal=HALVES)
    f = folded_exactly(model, "orthogonal", logp, seed=5)
    assert torch.equal(f.model.layers[1].self_attn.q_norm.weight, model.model.layers[1].self_attn.q_norm.weight)


def test_bridge_around_qwen3_is_exact(tmp_path_factory):
    _, report = bridged_exactly(build(equal=HALVES[:3]), tmp_path_factory.getbasetemp())
    assert report.floor is not None and report.max_abs_diff <= 10 * report.floor  # HF's RMSNorms round in float32


@st.composite
def shapes(draw):
    heads = draw(st.sampled_from([2, 4]))
    dh = draw(st.sampled_from([4, 8]))
    kw = dict(num_attention_heads=heads, num_key_value_heads=draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0])),
              head_dim=dh, hidden_size=draw(st.sampled_from([16, 24])), num_hidden_layers=draw(st.integers(1, 2)),
              tie_word_embeddings=draw(st.booleans()), attention_bias=draw(st.booleans()))
    pairs = tuple((i, i + dh // 2) for i in range(dh // 2))
    equal = tuple(p for p in pairs if draw(st.booleans()))
    return kw, equal


@settings(max_examples=10, deadline=None)
@given(shape=shapes(), seed=st.integers(0, 2 ** 16))
def test_property_random_shapes_and_gain_patterns_are_exact(shape, seed):
    kw, equal = shape
    model = build(seed=seed % 5, equal=equal, **kw)
    smap = wb.symmetry_map(model)
    g = smap["blocks.0.attn.qk.0"].group
    assert set(g.pairs) - set(g.rigid) == set(equal)
    new, _ = wb.random_intertwiner(model, seed=seed)
    assert rel(logp(new), logp(model)) <= TOL, (kw, equal)


def test_a_transform_drawn_where_pairs_rotate_is_refused_where_they_cannot():
    """A transform drawn on a Qwen3 whose q/k gains are equal on every pair (as built: rotations) replayed on one whose
    gains differ (as trained: ±I only) is refused, naming the site; forced, it would change the function."""
    fresh, trained = build(equal=HALVES), build()
    _, t = wb.random_intertwiner(fresh, seed=6)
    with pytest.raises(ValueError, match="blocks.0.attn.qk"):
        wb.apply_transform(trained, t)
    assert all(p in wb.symmetry_map(trained)["blocks.0.attn.qk.0"].group.rigid for p in HALVES)
    same = wb.apply_transform(build(equal=HALVES, seed=0), t)  # the same model: accepted and exact
    assert rel(logp(same), logp(fresh)) <= TOL
