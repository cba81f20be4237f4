"""OLMo 2: no norm before a block (attention and MLP read the raw stream), a norm on each block's output before it
joins the stream, and one RMSNorm over all heads' queries (and one over all keys) before the rotary embedding, with a
gain per head and dimension. docs/DERIVATIONS.md §10, OLMo 2.

A tiny random float64 OLMo 2 (hidden 32, 4 query heads on 2 key/value heads, d_head 8). First the block's form and
the attention are computed from the modules; then, by editing weights by hand, that a head permutation must carry the
norms' per-head gains along; then workbench's map, draws, verify, fold, bridge and a property, compared directly.
"""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import workbench as wb
from test_hf_families import (DECODER, FAIL, TOL, bridged_exactly, decoder_shapes, exact_everywhere, folded_exactly,
                              logp, random_model, refused_and_wrong, rel)
from test_hf_families_more import _trace
from test_hf_qwen3 import HALVES, rms, rope_attention

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

SHAPE = DECODER


def build(seed=0, equal_in_group0=False, **kw):
    """A random float64 OLMo 2 (gains around 1); ``equal_in_group0``: in layer 0 the gains of query heads 0, 1 and
    key head 0 are equal on every rotary pair (their site may rotate), the others' stay generic."""
    model = random_model("Olmo2ForCausalLM", "Olmo2Config", {**SHAPE, **kw}, seed)
    if equal_in_group0:
        attn = model.model.layers[0].self_attn
        with torch.no_grad():
            for norm, heads in ((attn.q_norm, (0, 1)), (attn.k_norm, (0,))):
                g = norm.weight.view(-1, 8)
                for h in heads:
                    g[h, 4:] = g[h, :4]
    return model


def test_blocks_read_the_raw_stream_and_one_norm_spans_every_head():
    model = build()
    layer, attn, cfg = model.model.layers[0], model.model.layers[0].self_attn, model.config
    seen = _trace(model, {"layer": layer, "attn": attn, "post_attn": layer.post_attention_layernorm, "mlp": layer.mlp,
                          "post_ff": layer.post_feedforward_layernorm, "q_norm": attn.q_norm})
    x, out = seen["layer"]
    assert not hasattr(layer, "input_layernorm") and torch.equal(seen["attn"][0], x)  # the raw stream
    mid = x + seen["post_attn"][1]
    assert torch.equal(seen["post_attn"][0], seen["attn"][1]) and torch.allclose(seen["mlp"][0], mid, rtol=0, atol=1e-13)
    assert torch.allclose(out, mid + seen["post_ff"][1], rtol=0, atol=1e-13)
    B, T, _ = x.shape
    H, K, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    assert attn.q_norm.weight.shape == (H * dh,) and attn.k_norm.weight.shape == (K * dh,)
    assert torch.equal(seen["q_norm"][0], attn.q_proj(x))  # every head's values at once
    q = rms(attn.q_proj(x), attn.q_norm.weight, cfg.rms_norm_eps).view(B, T, H, dh).transpose(1, 2)
    k = rms(attn.k_proj(x), attn.k_norm.weight, cfg.rms_norm_eps).view(B, T, K, dh).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, K, dh).transpose(1, 2)
    assert torch.allclose(seen["attn"][1], rope_attention(model, attn, x, q, k, v), rtol=0, atol=1e-6)  # (float32 norms)
    facts = wb.models.hf.facts(model)
    assert facts["qk_norm"] and not facts["parallel"] and not facts["post_ln"]


def test_a_head_permutation_carries_the_norms_per_head_gains():
    """Swapping query heads 0 and 1 (they share key head 0): their q_proj rows, o_proj columns and q_norm gain slices
    swapped by hand preserve the log-probabilities; the same swap leaving the gains in place does not."""
    model = build()
    ref = logp(model)

    def swapped(gains):
        new = copy.deepcopy(model)
        a = new.model.layers[0].self_attn
        order = torch.tensor([1, 0, 2, 3])
        with torch.no_grad():
            a.q_proj.weight.copy_(a.q_proj.weight.view(4, 8, 32)[order].reshape(32, 32))
            a.o_proj.weight.copy_(a.o_proj.weight.view(32, 4, 8)[:, order].reshape(32, 32))
            if gains:
                a.q_norm.weight.copy_(a.q_norm.weight.view(4, 8)[order].reshape(-1))
        return new

    assert rel(logp(swapped(True)), ref) <= TOL
    assert rel(logp(swapped(False)), ref) > FAIL


def test_map_groups_and_exact_random_intertwiner():
    """The stream: signed permutations (the output norms' and the final norm's gains); QK per key head: rotations on
    the pairs where every gain slice the site meets is equal (key head 0's site in layer 0), ±I elsewhere; heads
    permuted with their gain slices; every element exact, verify passes, the stream's rotation refused and wrong."""
    model = build(equal_in_group0=True)
    smap, new, t, _ = exact_everywhere(model, {
        "resid": {"signed_permutation"}, "blocks.attn.qk": {"rotary_orthogonal"}, "blocks.attn.ov": {"gl"},
        "blocks.mlp": {"diagonal_permutation"}, "blocks.attn.heads": {"permutation"}})
    assert smap["blocks.0.attn.qk.0"].group.rigid == () and smap["blocks.0.attn.qk.1"].group.rigid == HALVES
    assert smap["blocks.1.attn.qk.0"].group.rigid == HALVES
    assert abs(float(t.elements["blocks.0.attn.qk.0"].matrix()[0, 4])) > 1e-3  # a rotation, not ±I
    refused_and_wrong(model, "resid", "orthogonal")
    refused_and_wrong(model, "blocks.0.attn.qk.1", wb.get_group("rotary_orthogonal", 8, pairs=HALVES))  # gains differ


def fold_moves_the_final_gain_only(model):
    """Folding moves the final norm's gain into lm_head; the output norms keep theirs, so the stream stays at signed
    permutations, exact (OLMo 2's and OLMo 3's layers)."""
    f = folded_exactly(model, "signed_permutation", logp, seed=4)
    assert bool((f.model.norm.weight == 1).all())
    assert torch.equal(f.model.layers[1].post_feedforward_layernorm.weight, model.model.layers[1].post_feedforward_layernorm.weight)


def test_fold_moves_the_final_gain_only():
    fold_moves_the_final_gain_only(build())


def test_bridge_around_olmo2_is_exact(tmp_path_factory):
    model = build(equal_in_group0=True)
    model.config.architectures = ["Olmo2ForCausalLM"]  # as a checkpoint's config says (TransformerLens boots by it)
    _, report = bridged_exactly(model, tmp_path_factory.getbasetemp())
    assert report.floor is not None and report.max_abs_diff <= 10 * report.floor  # float32 RMSNorms inside


@settings(max_examples=8, deadline=None)
@given(kw=st.builds(lambda d, bias: {**d, "attention_bias": bias}, decoder_shapes(), st.booleans()),
       seed=st.integers(0, 2 ** 16))
def test_property_random_shapes_are_exact(kw, seed):
    model = build(seed=seed % 5, **kw)
    new, _ = wb.random_intertwiner(model, seed=seed)
    assert rel(logp(new), logp(model)) <= TOL, kw
