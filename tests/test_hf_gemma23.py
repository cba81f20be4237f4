"""Gemma 2 and Gemma 3: a norm on each block's output before it joins the stream ("sandwich" norms:
``post_attention_layernorm``, ``post_feedforward_layernorm``), attention-logit soft-capping (Gemma 2), per-head q/k
RMSNorms (Gemma 3, as Qwen3's, with gains 1 + w) and two rotary bases (Gemma 3's local and global layers).
docs/DERIVATIONS.md §10, Gemma 2 and 3.

Tiny random float64 models (hidden 32, 4 query heads on 2 key/value heads, d_head 8, two layers: Gemma 3's first
sliding, its second global). First the block's form is computed from its modules; then the stream's group by editing
weights by hand (a signed permutation: the output norms' gains must move by its permutation too); then workbench's
map, draws, verify, fold, bridge and a property, each compared directly in float64. Hugging Face's eager attention
(the only one with soft-capping) takes its softmax in float32: the direct check gives it its formula in float64.
"""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import workbench as wb
from test_hf_families import (DECODER, FAIL, IDS, TOL, as_raw, bridged_exactly, exact_everywhere, folded_exactly,
                              random_model, refused_and_wrong, rel)
from test_hf_families_more import _trace

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

F64 = torch.float64
SHAPE = dict(DECODER, head_dim=8, sliding_window=4)
FAMILIES = {"gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {}),
            "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(layer_types=["sliding_attention", "full_attention"]))}


def build(family, seed=0, gain=True, **kw):
    """A random float64 model (norm weights w around 0, gains 1 + w; ``gain=False``: every w exactly 0, as built)."""
    cls, config_cls, own = FAMILIES[family]
    model = random_model(cls, config_cls, {**SHAPE, **own, **kw}, seed, gain=0.0)
    if not gain:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.zero_()
    return model


def _eager64(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kw):
    """Hugging Face's eager attention of Gemma 2 and 3 with its softmax in the input's dtype (it takes it in float32)."""
    r = module.num_key_value_groups
    k, v = key.repeat_interleave(r, 1), value.repeat_interleave(r, 1)
    w = query @ k.transpose(2, 3) * scaling
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    if attention_mask is not None:
        w = w + attention_mask
    w = w.softmax(-1)
    return (w @ v).transpose(1, 2).contiguous(), w


@pytest.fixture(autouse=True)
def float64_eager(monkeypatch):
    from transformers.models.gemma2 import modeling_gemma2
    from transformers.models.gemma3 import modeling_gemma3

    for mod in (modeling_gemma2, modeling_gemma3):
        monkeypatch.setattr(mod, "eager_attention_forward", _eager64)


def logp(model):
    """Log-probabilities computed here in float64: every RMSNorm given its formula, eager attention in float64."""
    new = as_raw(model)
    new.config._attn_implementation = "eager"
    with torch.no_grad():
        return new(input_ids=IDS).logits.log_softmax(-1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_block_normalises_its_outputs_before_the_stream(family):
    """Computed from the modules: x + post_attn(attn(input_norm(x))), then h + post_ff(mlp(pre_ff(h))); every norm
    x·rsqrt(mean(x²) + ε)·(1 + w); the final norm reads the stream and the tied embedding (scaled by √d) writes it."""
    model = build(family)
    layer = model.model.layers[0]
    parts = {n: getattr(layer, n) for n in ("input_layernorm", "self_attn", "post_attention_layernorm",
                                            "pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm")}
    seen = _trace(model, {**parts, "layer": layer})
    x, out = seen["layer"]
    x = x[0] if isinstance(x, tuple) else x
    assert torch.equal(seen["input_layernorm"][0], x) and torch.equal(seen["self_attn"][0], seen["input_layernorm"][1])
    assert torch.equal(seen["post_attention_layernorm"][0], seen["self_attn"][1])
    mid = x + seen["post_attention_layernorm"][1]
    assert torch.allclose(seen["pre_feedforward_layernorm"][0], mid, rtol=0, atol=1e-13)
    assert torch.equal(seen["mlp"][0], seen["pre_feedforward_layernorm"][1])
    assert torch.equal(seen["post_feedforward_layernorm"][0], seen["mlp"][1])
    assert torch.allclose(out, mid + seen["post_feedforward_layernorm"][1], rtol=0, atol=1e-13)
    for name in ("input_layernorm", "post_attention_layernorm", "post_feedforward_layernorm"):
        t, norm = seen[name][0], parts[name]
        want = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + norm.eps) * (1 + norm.weight)
        assert torch.allclose(seen[name][1], want, rtol=0, atol=1e-6)  # Hugging Face rounds in float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    facts, cfg = wb.models.hf.facts(model), wb.models.hf.adapter(model).cfg
    assert facts["gain_offset"] == 1.0 and not facts["post_ln"] and not facts["parallel"]
    assert cfg.normalization_type == "RMS" and cfg.gated_mlp and facts["qk_norm"] == (family == "gemma3")


def _signed_permutation_by_hand(model, perm, s, move_output_gains=True):
    """The stream element x ↦ S·P·x written into the weights here: (S·P·x)_j = s_j·x_perm[j]. Readers' columns and the
    tied embedding's by it, writers' rows (o_proj, down_proj) by it, every gain w ↦ P·w — the output norms' too unless
    ``move_output_gains`` is False."""
    new = copy.deepcopy(model)
    with torch.no_grad():
        emb = new.model.embed_tokens.weight
        emb.copy_(emb[:, perm] * s)
        for layer in new.model.layers:
            a, m = layer.self_attn, layer.mlp
            for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
                lin.weight.copy_(lin.weight[:, perm] * s)
            for lin in (a.o_proj, m.down_proj):
                lin.weight.copy_(lin.weight[perm] * s[:, None])
            norms = ["input_layernorm", "pre_feedforward_layernorm"]
            norms += ["post_attention_layernorm", "post_feedforward_layernorm"] if move_output_gains else []
            for n in norms:
                w = getattr(layer, n).weight
                w.copy_(w[perm])
        new.model.norm.weight.copy_(new.model.norm.weight[perm])
    return new


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_stream_group_by_hand(family):
    """A signed permutation of the stream, with the output norms' gains permuted too, preserves the log-probabilities;
    leaving those gains where they were, or a Haar rotation of the stream, does not (their gains are generic)."""
    model = build(family)
    ref = logp(model)
    g = torch.Generator().manual_seed(1)
    perm, s = torch.randperm(32, generator=g), torch.where(torch.rand(32, generator=g) < 0.5, -1.0, 1.0).double()
    assert rel(logp(_signed_permutation_by_hand(model, perm, s)), ref) <= TOL
    assert rel(logp(_signed_permutation_by_hand(model, perm, s, move_output_gains=False)), ref) > FAIL


@pytest.mark.parametrize("family", list(FAMILIES))
def test_map_groups_and_exact_random_intertwiner(family):
    model = build(family)
    smap, new, t, _ = exact_everywhere(model, {
        "resid": {"signed_permutation"}, "blocks.attn.ov": {"gl"}, "blocks.mlp": {"diagonal_permutation"},
        "blocks.attn.heads": {"permutation"}, "blocks.attn.qk": {"rotary_orthogonal" if family == "gemma3" else "rotary"}},
        logp)
    assert smap["blocks.1.attn.qk.0"].group.pairs == ((0, 4), (1, 5), (2, 6), (3, 7))
    P = t.elements["resid"]
    a, b = model.model.layers[1].post_feedforward_layernorm.weight, new.model.layers[1].post_feedforward_layernorm.weight
    assert torch.equal(b, a[P.perm.argsort()]) or torch.equal(b, a[P.perm])  # moved, by the element's permutation
    assert not torch.equal(a, b)
    refused_and_wrong(model, "resid", "orthogonal", logp)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_unit_gains_take_rotations_and_folding_keeps_the_output_norms(family):
    """Every gain 1 (w = 0, as built): every norm on the stream, the output norms included, passes any rotation, and
    the stream takes O(d), exact. Folding a trained model's stream norms leaves its output norms' gains in place,
    so its stream stays at signed permutations (a Haar rotation there would fail: it is refused)."""
    fresh = build(family, gain=False)
    smap = wb.symmetry_map(fresh)
    assert smap["resid"].group.name == "orthogonal"
    new, _ = wb.random_intertwiner(fresh, seed=2, sites=["resid"])
    assert rel(logp(new), logp(fresh)) <= TOL
    model = build(family)
    f = folded_exactly(model, "signed_permutation", logp, seed=4)
    assert torch.equal(f.model.layers[0].post_attention_layernorm.weight, model.model.layers[0].post_attention_layernorm.weight)


def test_gemma2_soft_capped_scores_and_logits_are_exact():
    """Gemma 2's defaults cap attention logits (tanh(s/50)·50) and final logits (tanh(z/30)·30): both act on values no
    element moves (scores are unchanged by every QK and head element; logits by every stream element)."""
    model = build("gemma2", seed=5)
    assert model.config.attn_logit_softcapping and model.config.final_logit_softcapping
    new, t = wb.random_intertwiner(model, seed=5)
    assert rel(logp(new), logp(model)) <= TOL
    assert wb.verify(model, new, IDS, transform=t).passed


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bridge_around_each_is_exact(family, tmp_path_factory):
    model = build(family, attn_logit_softcapping=None) if family == "gemma2" else build(family)
    model.config.architectures = [FAMILIES[family][0]]  # as a checkpoint's config says (TransformerLens boots by it)
    bridged_exactly(model, tmp_path_factory.getbasetemp(), logp)


@st.composite
def shapes(draw):
    heads = draw(st.sampled_from([2, 4]))
    return draw(st.sampled_from(list(FAMILIES))), dict(
        num_attention_heads=heads, num_key_value_heads=draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0])),
        head_dim=draw(st.sampled_from([4, 8])), hidden_size=draw(st.sampled_from([16, 24])),
        tie_word_embeddings=draw(st.booleans()))


@settings(max_examples=8, deadline=None)
@given(shape=shapes(), seed=st.integers(0, 2 ** 16))
def test_property_random_shapes_are_exact(shape, seed):
    family, kw = shape
    model = build(family, seed=seed % 5, **kw)
    new, _ = wb.random_intertwiner(model, seed=seed)
    assert rel(logp(new), logp(model)) <= TOL, (family, kw)
