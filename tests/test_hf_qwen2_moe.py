"""Qwen2-MoE: Qwen2's attention (q/k/v biases) with, on its sparse layers, a mixture of experts plus a **shared expert**
every token meets — a gated MLP on its own hidden units whose output is scaled by sigmoid(shared_expert_gate(x)), a
scalar per token read from the stream — and a dense SwiGLU on the layers ``mlp_only_layers`` and
``decoder_sparse_step`` make dense. docs/DERIVATIONS.md §10, Qwen2-MoE.

A tiny random float64 Qwen2-MoE (hidden 32, 4 query heads sharing 2 key/value heads, 3 layers: layer 1 dense, layers 0
and 2 with 4 experts of 12 hidden units, top 2, and a shared expert of 20; vocabulary 50), every parameter random.
First the block's form is computed from its modules; then the map, each draw exact to 1e-10 in float64 computed
directly (this file's own forward: RMSNorms and the router's softmax in float64), verify, fold, a bridge, negative
controls (the shared gate's one-dimensional output takes no element: its scale and sign change the function), a
float32 model verified, and a property over random shapes and layer mixes.
"""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import workbench as wb
from test_hf_families import (DECODER, FAIL, IDS, TOL, decoder_shapes, exact_everywhere, folded_exactly, random_model,
                              refused_and_wrong, rel)
from test_hf_families_more import _trace
from test_hf_mixtral import attention, base_exactly, decoder_logp, float32_verifies, moe, moe_bridged_exactly

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

SHAPE = dict(DECODER, num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=12,
             shared_expert_intermediate_size=20, mlp_only_layers=[1])
GROUPS = {"resid": {"signed_permutation"}, "blocks.attn.qk": {"rotary"}, "blocks.attn.ov": {"gl"},
          "blocks.attn.heads": {"permutation"}, "blocks.mlp.hidden": {"diagonal_permutation"},
          "blocks.mlp.experts": {"permutation"}, "blocks.mlp.shared": {"diagonal_permutation"},
          "blocks.mlp": {"diagonal_permutation"}}
SEED = 2  # (a draw leaving a layer's 4 experts in order, 1 in 24, would rightly fail verify's "representations moved")


def build(seed=0, **kw):
    model = random_model("Qwen2MoeForCausalLM", "Qwen2MoeConfig", {**SHAPE, **kw}, seed)
    model.config._experts_implementation = "eager"  # (grouped_mm refuses float64)
    return model


def swiglu(block, x):
    return block.down_proj(block.act_fn(block.gate_proj(x)) * block.up_proj(x))


def mlp(ref, block, x):
    """A dense layer's SwiGLU, or the mixture of experts (renormalised where norm_topk_prob) plus the shared expert
    scaled by sigmoid(shared_expert_gate(x))."""
    if not hasattr(block, "experts"):
        return swiglu(block, x)
    routed = moe(block, x, ref.config.num_experts_per_tok, renorm=ref.config.norm_topk_prob)
    return routed + torch.sigmoid(block.shared_expert_gate(x)) * swiglu(block.shared_expert, x)


def attend(ref, attn, x):
    """Qwen2's attention in float64 (biases in the projections), windowed on the layers ``layer_types`` says."""
    cfg = ref.config
    return attention(ref, attn, x, cfg.sliding_window if cfg.layer_types[attn.layer_idx] == "sliding_attention" else None)


def logp(model, ids=IDS):
    """Log-probabilities from this file's own float64 forward of a Qwen2-MoE."""
    return decoder_logp(model, attend, mlp, ids)


def test_the_block_is_routed_experts_plus_a_gated_shared_expert():
    """Computed from the modules: layer 1 is dense (mlp_only_layers), 0 and 2 sparse; a sparse block reads
    post_attention_layernorm's output and returns ``moe`` plus sigmoid(shared_expert_gate(x)) · shared_expert(x)
    (without the shared term, or with its gate's sign flipped, it is 1e-3 away); q, k and v carry biases; the whole
    model is this file's forward up to Hugging Face's float32 norms and softmax."""
    model = build()
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == ["Qwen2MoeSparseMoeBlock", "Qwen2MoeMLP",
                                                                          "Qwen2MoeSparseMoeBlock"]
    layer = model.model.layers[0]
    block = layer.mlp
    seen = _trace(model, {"ln2": layer.post_attention_layernorm, "mlp": block, "gate": block.shared_expert_gate})
    x, y = seen["mlp"]
    assert torch.equal(x, seen["ln2"][1]) and torch.equal(seen["gate"][0].reshape(x.shape), x)
    assert block.shared_expert_gate.weight.shape == (1, 32) and block.shared_expert_gate.bias is None
    assert torch.allclose(y, mlp(model, block, x), rtol=0, atol=1e-6)
    assert not torch.allclose(y, moe(block, x, 2, False), atol=1e-3)
    flipped = moe(block, x, 2, False) + torch.sigmoid(-block.shared_expert_gate(x)) * swiglu(block.shared_expert, x)
    assert not torch.allclose(y, flipped, atol=1e-3)
    attn = layer.self_attn
    assert all(getattr(attn, p).bias is not None for p in ("q_proj", "k_proj", "v_proj")) and attn.o_proj.bias is None
    with torch.no_grad():
        assert torch.allclose(model(input_ids=IDS).logits.log_softmax(-1), logp(model), rtol=0, atol=1e-5)
    facts = wb.models.hf.facts(model)
    assert facts["family"] == "qwen2_moe" and not facts["qk_norm"] and not facts["parallel"] and not facts["post_ln"]


@pytest.mark.parametrize("renorm", [False, True])
def test_map_groups_and_exact_random_intertwiner(renorm):
    """Qwen2's stream and attention (rotary QK with q/k biases, GL values, head permutations); per expert a gated MLP's
    D·P and the experts' order; the shared expert's hidden units a gated MLP's D·P (its own site); the dense layer's
    D·P; the shared gate reads the stream and takes nothing else. Every site's random element exact, verify passes."""
    model = build(norm_topk_prob=renorm)
    smap, new, t, report = exact_everywhere(model, GROUPS, logp, seed=SEED)
    assert [s.name for s in smap if s.name.startswith("blocks.1.mlp")] == ["blocks.1.mlp"]
    assert {s.name for s in smap if ".shared" in s.name} == {"blocks.0.mlp.shared", "blocks.2.mlp.shared"}
    assert smap["blocks.0.mlp.shared"].n == 20
    M = t.elements["resid"].matrix()  # the gate moves as a reader of the stream, nothing more
    old, moved = model.model.layers[0].mlp, new.model.layers[0].mlp
    assert torch.allclose(moved.shared_expert_gate.weight @ torch.linalg.inv(M).T, old.shared_expert_gate.weight,
                          rtol=0, atol=1e-12)
    assert report.floor is not None and report.max_abs_diff <= 10 * report.floor
    assert {"blocks.0.mlp.shared", "blocks.2.mlp.experts", "blocks.1.mlp"} <= {c.site for c in report.checked}


def test_negative_controls_change_the_function():
    """Refused, and forced wrong: a dense map of the shared expert's units (and of an expert's), the stream's rotations.
    By hand: the shared gate's output scaled by 2 or by −1 (its one-dimensional space takes no element), the gate left
    in place while the stream moves (it is a reader), and the shared expert's gate rows permuted without its up rows,
    each change the function, and verify without a transform FAILs them."""
    model = build()
    ref = logp(model)
    refused_and_wrong(model, "blocks.0.mlp.shared", "gl", logp=logp)
    refused_and_wrong(model, "blocks.2.mlp.hidden.1", "gl", logp=logp)
    refused_and_wrong(model, "resid", "orthogonal", logp=logp)
    bads = []
    for c in (2.0, -1.0):
        bad = copy.deepcopy(model)
        with torch.no_grad():
            bad.model.layers[0].mlp.shared_expert_gate.weight.mul_(c)
        bads.append(bad)
    new, _ = wb.random_intertwiner(model, seed=SEED, sites=["resid"])
    assert rel(logp(new), ref) <= TOL
    with torch.no_grad():
        new.model.layers[2].mlp.shared_expert_gate.weight.copy_(model.model.layers[2].mlp.shared_expert_gate.weight)
    bads.append(new)
    permuted = copy.deepcopy(model)
    with torch.no_grad():
        g = permuted.model.layers[0].mlp.shared_expert.gate_proj.weight
        g.copy_(g[torch.randperm(20, generator=torch.Generator().manual_seed(1))])
    bads.append(permuted)
    for bad in bads:
        assert rel(logp(bad), ref) > FAIL
        assert not wb.verify(model, bad, IDS).passed


@pytest.mark.parametrize("kw", [dict(num_experts_per_tok=1), dict(num_experts_per_tok=4, norm_topk_prob=True),
                                dict(decoder_sparse_step=2, mlp_only_layers=[]), dict(qkv_bias=False),
                                dict(use_sliding_window=True, sliding_window=4, max_window_layers=2),
                                dict(head_dim=16, hidden_act="gelu"), dict(shared_expert_intermediate_size=0)],
                         ids=["top1", "all-experts", "sparse-step-2", "no-biases", "sliding", "wide-heads-gelu",
                              "no-shared-units"])
def test_configuration_variants_are_exact(kw):
    """Top-1 and all-experts routing, every other layer sparse, no q/k/v biases, a sliding window on layers 0 and 2
    (``layer_types``), heads wider than hidden/heads with GELU-gated experts, a shared expert of no hidden units (its
    output 0; its site was a group on 0 dimensions: an InvalidOptionError from symmetry_map) (the test's forward,
    compared with Hugging Face's to 1e-5 first): a random element exact."""
    model = build(seed=2, **kw)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=IDS).logits.log_softmax(-1), logp(model), rtol=0, atol=1e-5)
    new, _ = wb.random_intertwiner(model, seed=4)
    assert rel(logp(new), logp(model)) <= TOL


def test_layer_mix_edited_after_building_is_refused():
    """Which layers are sparse is fixed when the model is built; mlp_only_layers edited afterwards would build a
    transformed model with another mix: refused, naming the module."""
    model = build()
    model.config.mlp_only_layers = [0]
    smap = wb.symmetry_map(model)
    assert len(smap) == 0 and "'model.layers.0.mlp' is a Qwen2MoeSparseMoeBlock" in smap.skipped[0][1]


def test_fold_moves_ln2_into_the_router_experts_shared_expert_and_its_gate():
    """Folding moves post_attention_layernorm's gain into the router, every expert's gate and up, the shared expert's
    gate and up and the shared gate's row (or the dense layer's); the folded stream takes every rotation, exact."""
    model = build()
    f = folded_exactly(model, "orthogonal", logp)
    w = model.model.layers[0].post_attention_layernorm.weight
    assert torch.allclose(f.model.layers[0].mlp.shared_expert_gate.weight,
                          model.model.layers[0].mlp.shared_expert_gate.weight * w, rtol=0, atol=1e-14)


def test_bridge_is_exact(tmp_path_factory):
    """A bridge (TransformerLens maps the shared expert as a gated MLP, its gate as a linear, the dense layer's
    projections as optional parts): the raw model's map, a random element exact, verified at every site but the
    experts' hidden units; the shared expert's units are observed at its hooks."""
    smap, report = moe_bridged_exactly(build(norm_topk_prob=True), tmp_path_factory.getbasetemp(), GROUPS, logp, seed=SEED)
    assert "blocks.0.mlp.shared" in {c.site for c in report.checked}


def test_float32_model_verifies():
    float32_verifies(build(), seed=SEED)


def test_base_model_moves_its_last_hidden_state():
    """The base Qwen2MoeModel (no head): its last hidden state, computed here in float64, moves exactly by the stream's
    element, and verify compares it in the new basis."""
    base_exactly(build(), attend, mlp, seed=SEED)


@settings(max_examples=8, deadline=None)
@given(experts_=st.integers(2, 5), data=st.data(), seed=st.integers(0, 2 ** 16))
def test_property_random_shapes_are_exact(experts_, data, seed):
    """Random expert counts, experts per token (1 to all), norm_topk_prob, shared-expert and expert widths, heads,
    key/value heads, widths, depths, q/k/v biases and which layers are dense: a random element of every site is exact
    in float64 (the blocks computed here)."""
    shape = data.draw(decoder_shapes())
    layers = shape["num_hidden_layers"]
    kw = dict(shape, num_experts=experts_, num_experts_per_tok=data.draw(st.integers(1, experts_)),
              norm_topk_prob=data.draw(st.booleans()), moe_intermediate_size=data.draw(st.sampled_from([4, 8])),
              shared_expert_intermediate_size=data.draw(st.sampled_from([4, 12])),
              intermediate_size=data.draw(st.sampled_from([8, 12])), qkv_bias=data.draw(st.booleans()),
              mlp_only_layers=data.draw(st.lists(st.integers(0, layers - 1), unique=True, max_size=layers)),
              decoder_sparse_step=data.draw(st.integers(1, 2)))
    model = build(seed=seed % 5, **kw)
    new, _ = wb.random_intertwiner(model, seed=seed)
    assert rel(logp(new), logp(model)) <= TOL, kw
