"""OLMoE: a pre-norm decoder (Llama's block order, not OLMo 2's) whose q and k each pass one RMSNorm over every head's
values (OLMo 2's q/k norm, a gain per head and dimension) and whose MLP is a sparse mixture of experts (Mixtral's, with
``norm_topk_prob`` choosing whether the top k probabilities are renormalised). docs/DERIVATIONS.md §10, OLMoE.

A tiny random float64 OLMoE (hidden 32, 4 query heads sharing 2 key/value heads, d_head 8, 4 experts of 48 hidden
units, top 2, vocabulary 50), every parameter random. First the block's form is computed from its modules: attention
and experts read the stream after input_layernorm and post_attention_layernorm, q_norm spans all of q_proj's output,
and the router's top k is renormalised exactly when norm_topk_prob says so. Then the map, each draw exact to 1e-10 in
float64 computed directly (this file's own forward: RMSNorms and the router's softmax in float64), verify, fold, a
bridge, negative controls, clip_qkv refused, a float32 model verified, and a property over random shapes.
"""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import workbench as wb
from test_hf_families import (DECODER, FAIL, IDS, TOL, decoder_shapes, exact_everywhere, folded_exactly, random_model,
                              refused_and_wrong, rel)
from test_hf_families_more import _trace
from test_hf_mixtral import base_exactly, decoder_logp, float32_verifies, moe, moe_bridged_exactly, moe_form
from test_hf_qwen3 import HALVES, rms, rope_attention

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

SHAPE = dict(DECODER, num_experts=4, num_experts_per_tok=2)
GROUPS = {"resid": {"signed_permutation"}, "blocks.attn.qk": {"rotary_orthogonal"}, "blocks.attn.ov": {"gl"},
          "blocks.attn.heads": {"permutation"}, "blocks.mlp.hidden": {"diagonal_permutation"},
          "blocks.mlp.experts": {"permutation"}}


def build(seed=0, cls="OlmoeForCausalLM", **kw):
    model = random_model(cls, "OlmoeConfig", {**SHAPE, **kw}, seed)
    model.config._experts_implementation = "eager"  # (grouped_mm refuses float64)
    if cls == "OlmoeForCausalLM":  # as a checkpoint's config says (TransformerLens's own boot of a bridge reads it)
        model.config.architectures = [cls]
    return model


def attend(ref, attn, x):
    """OLMoE's attention in float64: one RMSNorm over all of q_proj's (k_proj's) output, then rotary attention."""
    cfg = ref.config
    B, T, _ = x.shape
    dh = cfg.hidden_size // cfg.num_attention_heads
    q = rms(attn.q_proj(x), attn.q_norm.weight, cfg.rms_norm_eps).view(B, T, -1, dh).transpose(1, 2)
    k = rms(attn.k_proj(x), attn.k_norm.weight, cfg.rms_norm_eps).view(B, T, -1, dh).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, -1, dh).transpose(1, 2)
    return rope_attention(ref, attn, x, q, k, v)


def experts(ref, block, x):
    return moe(block, x, ref.config.num_experts_per_tok, renorm=ref.config.norm_topk_prob)


def logp(model, ids=IDS):
    """Log-probabilities from this file's own float64 forward of an OLMoE."""
    return decoder_logp(model, attend, experts, ids)


@pytest.mark.parametrize("renorm", [False, True])
def test_pre_norm_blocks_one_qk_norm_over_every_head_and_the_router(renorm):
    """Computed from the modules: attention reads input_layernorm's output, the experts post_attention_layernorm's
    (pre-norm, as Llama; OLMo 2 normalises the blocks' outputs instead); q_norm reads all of q_proj's output (a gain of
    heads·d_head entries); the block is ``moe`` with the top k renormalised exactly when norm_topk_prob (the other
    reading is 1e-3 away); the whole model is this file's forward up to Hugging Face's float32 norms and softmax."""
    model = build(norm_topk_prob=renorm)
    layer, cfg = model.model.layers[0], model.config
    attn = layer.self_attn
    seen = _trace(model, {"ln1": layer.input_layernorm, "attn": attn, "ln2": layer.post_attention_layernorm,
                          "mlp": layer.mlp, "q_norm": attn.q_norm, "layer": layer})
    assert torch.equal(seen["attn"][0], seen["ln1"][1]) and torch.equal(seen["mlp"][0], seen["ln2"][1])
    x, out = seen["layer"]
    assert torch.allclose(out, x + seen["attn"][1] + seen["mlp"][1], rtol=0, atol=1e-13)  # no norm on the outputs
    assert attn.q_norm.weight.shape == (32,) and attn.k_norm.weight.shape == (16,)
    assert torch.equal(seen["q_norm"][0], attn.q_proj(seen["ln1"][1]))  # every head's values at once
    assert torch.allclose(seen["attn"][1], attend(model, attn, seen["ln1"][1]), rtol=0, atol=1e-6)
    moe_form(model, layer.mlp, seen, renorm, logp, "olmoe")
    assert cfg.num_local_experts == cfg.num_experts == 4  # (the experts read num_local_experts, an alias)


@pytest.mark.parametrize("renorm", [False, True])
def test_map_groups_and_exact_random_intertwiner(renorm):
    """A Llama's stream (signed permutations, gains kept); per key head a QK site of rotations on the pairs where every
    gain slice it meets is equal (layer 0, key head 0 made so), ±I elsewhere; GL values; heads permuted with their
    q/k norm gain slices; per expert a gated MLP's D·P; the experts' order with the router's rows. A random element of
    every site is exact to 1e-10 in float64 (computed directly); verify passes at its float32 floor."""
    model = build(norm_topk_prob=renorm)
    with torch.no_grad():  # query heads 0, 1 and key head 0 of layer 0: gains equal on every rotary pair
        attn = model.model.layers[0].self_attn
        for norm, heads in ((attn.q_norm, (0, 1)), (attn.k_norm, (0,))):
            g = norm.weight.view(-1, 8)
            for h in heads:
                g[h, 4:] = g[h, :4]
    smap, new, t, report = exact_everywhere(model, GROUPS, logp, seed=1)  # (seed 2 leaves layer 1's experts in order)
    assert smap["blocks.0.attn.qk.0"].group.rigid == () and smap["blocks.0.attn.qk.1"].group.rigid == HALVES
    assert abs(float(t.elements["blocks.0.attn.qk.0"].matrix()[0, 4])) > 1e-3  # a rotation, not ±I
    assert sum(s.name.startswith("blocks.0.mlp.hidden.") for s in smap) == 4
    P = t.elements["blocks.1.attn.heads"].perm  # the key/value groups (a swap), each with its 2 query heads
    moved, old = new.model.layers[1].self_attn, model.model.layers[1].self_attn
    assert torch.equal(P, torch.tensor([1, 0]))
    assert torch.equal(moved.k_norm.weight.view(2, 8), old.k_norm.weight.view(2, 8)[P])  # gain slices with their heads
    old_rows, new_rows = ([tuple(r.tolist()) for r in a.q_norm.weight.view(4, 8)] for a in (old, moved))
    assert sorted(new_rows) == sorted(old_rows) and new_rows != old_rows
    assert report.floor is not None and report.max_abs_diff <= 10 * report.floor
    assert "blocks.0.mlp.experts" in {c.site for c in report.checked}  # observed in the router's logits


def test_negative_controls_change_the_function():
    """Refused, and forced wrong: a dense map of an expert's hidden units, the stream's rotations (gains kept),
    rotations of a QK pair whose gains differ, and the rotary commutant with scales (Llama's QK group: a scale of one
    head's q changes the norm's mean over every head). By hand: the experts' weights permuted without the router's rows, and a
    head swap whose q_norm gain slices stay, each change the function, and verify without a transform FAILs them."""
    model = build()
    ref = logp(model)
    refused_and_wrong(model, "blocks.0.mlp.hidden.1", "gl", logp=logp)
    refused_and_wrong(model, "resid", "orthogonal", logp=logp)
    for wrong in (wb.get_group("rotary_orthogonal", 8, pairs=HALVES), wb.get_group("rotary", 8, pairs=HALVES)):
        refused_and_wrong(model, "blocks.0.attn.qk.1", wrong, logp=logp)
    experts_only, heads_only = copy.deepcopy(model), copy.deepcopy(model)
    order = torch.tensor([1, 2, 3, 0])
    with torch.no_grad():
        ex = experts_only.model.layers[0].mlp.experts
        ex.gate_up_proj.copy_(ex.gate_up_proj[order])
        ex.down_proj.copy_(ex.down_proj[order])
        a = heads_only.model.layers[0].self_attn
        swap = torch.tensor([1, 0, 2, 3])
        a.q_proj.weight.copy_(a.q_proj.weight.view(4, 8, 32)[swap].reshape(32, 32))
        a.o_proj.weight.copy_(a.o_proj.weight.view(32, 4, 8)[:, swap].reshape(32, 32))
    for bad in (experts_only, heads_only):
        assert rel(logp(bad), ref) > FAIL
        assert not wb.verify(model, bad, IDS).passed
    with torch.no_grad():  # the same moves with their partners (router rows, gain slices): exact
        experts_only.model.layers[0].mlp.gate.weight.copy_(model.model.layers[0].mlp.gate.weight[order])
        g = heads_only.model.layers[0].self_attn.q_norm.weight
        g.copy_(g.view(4, 8)[swap].reshape(-1))
    assert rel(logp(experts_only), ref) <= TOL and rel(logp(heads_only), ref) <= TOL


def test_clip_qkv_is_refused_by_name():
    """clip_qkv clamps each query, key and value coordinate after the norms: the QK and OV maps do not commute with it;
    refused by name, nothing transformed."""
    model = build(clip_qkv=0.5)
    smap = wb.symmetry_map(model)
    assert len(smap) == 0 and "clip_qkv" in smap.skipped[0][1]
    with pytest.raises(wb.UnsupportedModelError, match="clip_qkv"):
        wb.random_intertwiner(model, seed=0)


def test_norm_topk_prob_edited_after_building_is_refused():
    """The router took norm_topk_prob when it was built; the configuration edited afterwards would build a transformed
    model that renormalises where the original does not: refused, naming the setting."""
    model = build()
    model.config.norm_topk_prob = True
    smap = wb.symmetry_map(model)
    assert len(smap) == 0 and "norm_topk_prob = False where OlmoeForCausalLM(config) builds True" in smap.skipped[0][1]


@pytest.mark.parametrize("k", [1, 4])
def test_top_one_and_every_expert(k):
    exact_everywhere(build(seed=k, num_experts_per_tok=k, norm_topk_prob=k == 1), GROUPS, logp, seed=1)


def test_fold_moves_ln2_into_the_router_and_experts():
    """Folding moves post_attention_layernorm's gain into the router and every expert's gate and up; q_norm and k_norm
    keep theirs (they read q and k, not the stream); the folded stream takes every rotation, exact."""
    model = build()
    f = folded_exactly(model, "orthogonal", logp)
    assert torch.equal(f.model.layers[0].post_attention_layernorm.weight, torch.ones(32, dtype=torch.float64))
    assert torch.equal(f.model.layers[1].self_attn.q_norm.weight, model.model.layers[1].self_attn.q_norm.weight)


def test_bridge_is_exact(tmp_path_factory):
    moe_bridged_exactly(build(norm_topk_prob=True), tmp_path_factory.getbasetemp(), {
        **GROUPS, "blocks.attn.qk": {"rotary_orthogonal"}}, logp)


def test_float32_model_verifies():
    """A float32 OLMoE: a random element of every site, verified against the float32 model's own outputs."""
    float32_verifies(build(), seed=1)


def test_base_model_moves_its_last_hidden_state():
    """An OlmoeModel built in code (its config names no architecture, and TransformerLens has no fallback by
    model_type for olmoe: the language-model class's adapter is used, _hf._ADAPTER_CLASSES): its last hidden state,
    computed here in float64, moves exactly by the stream's element, and verify compares it in the new basis."""
    model = build(cls="OlmoeModel")
    assert not model.config.architectures
    base_exactly(model, attend, experts, seed=1)


@settings(max_examples=8, deadline=None)
@given(experts_=st.integers(2, 5), data=st.data(), seed=st.integers(0, 2 ** 16))
def test_property_random_shapes_are_exact(experts_, data, seed):
    """Random expert counts, experts per token (1 to all), norm_topk_prob, heads, key/value heads, widths, depths and
    attention biases (q, k, v and o: attention_bias):
    a random element of every site is exact in float64 (the block computed here)."""
    kw = dict(data.draw(decoder_shapes()), num_experts=experts_, num_experts_per_tok=data.draw(st.integers(1, experts_)),
              norm_topk_prob=data.draw(st.booleans()), intermediate_size=data.draw(st.sampled_from([8, 12])),
              attention_bias=data.draw(st.booleans()))
    model = build(seed=seed % 5, **kw)
    new, _ = wb.random_intertwiner(model, seed=seed)
    assert rel(logp(new), logp(model)) <= TOL, kw


def test_a_head_dim_whose_own_forward_fails_is_refused_by_name():
    """OLMoE sizes q_norm by hidden_size: with head_dim != hidden/heads its own forward fails (checked here). Read
    anyway, the norm was taken as other heads' and the transform failed on an unclear permutation error; now the map is
    empty and every verb says which norm and why."""
    model = build(head_dim=16)
    with pytest.raises(RuntimeError):
        model(input_ids=IDS)
    assert len(list(wb.symmetry_map(model))) == 0
    with pytest.raises(wb.UnsupportedModelError, match="q_norm normalises 32 values where q_proj writes 4 heads of 16"):
        wb.random_intertwiner(model, seed=0)
