"""Qwen3-MoE: Qwen3's attention (an RMSNorm per head on q and on k, one gain shared by every head) with a sparse mixture
of experts as the MLP of some layers and a dense SwiGLU on the others (``mlp_only_layers``, ``decoder_sparse_step``).
docs/DERIVATIONS.md §10, Qwen3-MoE.

A tiny random float64 Qwen3-MoE (hidden 32, 4 query heads sharing 2 key/value heads, d_head 8, 3 layers: layer 1 dense
by ``mlp_only_layers``, layers 0 and 2 with 4 experts of 12 hidden units, top 2, vocabulary 50), every parameter
random. First the block's form is computed from its modules: which layers are sparse, the per-head norms, the router's
top k renormalised exactly when norm_topk_prob. Then the map, each draw exact to 1e-10 in float64 computed directly
(this file's own forward: RMSNorms and the router's softmax in float64), verify, fold, a bridge, negative controls, a
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
from test_hf_mixtral import (base_exactly, decoder_logp, decoder_stream, float32_verifies, moe, moe_bridged_exactly,
                             moe_form)
from test_hf_qwen3 import HALVES, equal_gains, rms, rope_attention

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

SHAPE = dict(DECODER, num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=12,
             mlp_only_layers=[1])
GROUPS = {"resid": {"signed_permutation"}, "blocks.attn.qk": {"rotary_orthogonal"}, "blocks.attn.ov": {"gl"},
          "blocks.attn.heads": {"permutation"}, "blocks.mlp.hidden": {"diagonal_permutation"},
          "blocks.mlp.experts": {"permutation"}, "blocks.mlp": {"diagonal_permutation"}}
SEED = 2  # (a draw leaving a layer's 4 experts in order, 1 in 24, would rightly fail verify's "representations moved")


def build(seed=0, equal=(), cls="Qwen3MoeForCausalLM", **kw):
    """A random float64 Qwen3-MoE; in layer 0 the q and k norm gains are made equal on the pairs ``equal``."""
    model = random_model(cls, "Qwen3MoeConfig", {**SHAPE, **kw}, seed)
    model.config._experts_implementation = "eager"  # (grouped_mm refuses float64)
    if cls == "Qwen3MoeForCausalLM":  # as a checkpoint's config says (TransformerLens's own boot of a bridge reads it)
        model.config.architectures = [cls]
    return equal_gains(model, equal)


def attend(ref, attn, x):
    """Qwen3's attention in float64: an RMSNorm on each head's q (k) with one gain for every head, then rotary; every
    layer windowed where use_sliding_window (the config's sliding_window is None otherwise)."""
    B, T, _ = x.shape
    dh, eps = attn.head_dim, ref.config.rms_norm_eps
    q = rms(attn.q_proj(x).view(B, T, -1, dh), attn.q_norm.weight, eps).transpose(1, 2)
    k = rms(attn.k_proj(x).view(B, T, -1, dh), attn.k_norm.weight, eps).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, -1, dh).transpose(1, 2)
    return rope_attention(ref, attn, x, q, k, v, ref.config.sliding_window)


def mlp(ref, block, x):
    """A dense layer's SwiGLU, or the mixture of experts (renormalised where norm_topk_prob)."""
    if hasattr(block, "gate_proj"):
        return block.down_proj(block.act_fn(block.gate_proj(x)) * block.up_proj(x))
    return moe(block, x, ref.config.num_experts_per_tok, renorm=ref.config.norm_topk_prob)


def logp(model, ids=IDS):
    """Log-probabilities from this file's own float64 forward of a Qwen3-MoE."""
    return decoder_logp(model, attend, mlp, ids)


@pytest.mark.parametrize("renorm", [False, True])
def test_sparse_and_dense_layers_per_head_norms_and_the_router(renorm):
    """Computed from the modules: layer 1 (in mlp_only_layers) holds a dense SwiGLU, layers 0 and 2 a mixture; with
    decoder_sparse_step 2 only layer 1 is sparse. Each q_norm reads one head's d_head values with one gain for every
    head; the mixture reads post_attention_layernorm's output and is ``moe`` with the top k renormalised exactly when
    norm_topk_prob; the whole model is this file's forward up to Hugging Face's float32 norms and softmax."""
    model = build(norm_topk_prob=renorm)
    kinds_ = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds_ == ["Qwen3MoeSparseMoeBlock", "Qwen3MoeMLP", "Qwen3MoeSparseMoeBlock"]
    stepped = build(decoder_sparse_step=2, mlp_only_layers=[])
    assert [type(layer.mlp).__name__ for layer in stepped.model.layers] == ["Qwen3MoeMLP", "Qwen3MoeSparseMoeBlock",
                                                                            "Qwen3MoeMLP"]
    layer, cfg = model.model.layers[0], model.config
    attn = layer.self_attn
    seen = _trace(model, {"ln1": layer.input_layernorm, "q_norm": attn.q_norm, "attn": attn,
                          "ln2": layer.post_attention_layernorm, "mlp": layer.mlp})
    x = seen["ln1"][1]
    B, T, _ = x.shape
    assert attn.q_norm.weight.shape == (8,) and torch.equal(seen["q_norm"][0], attn.q_proj(x).view(B, T, 4, 8))
    assert torch.allclose(seen["attn"][1], attend(model, attn, x), rtol=0, atol=1e-6)
    assert torch.equal(seen["mlp"][0], seen["ln2"][1])
    moe_form(model, layer.mlp, seen, renorm, logp, "qwen3_moe")
    assert cfg.num_local_experts == 4


@pytest.mark.parametrize("renorm", [False, True])
def test_map_groups_and_exact_random_intertwiner(renorm):
    """Qwen3's stream and attention (QK: rotations on the pairs whose gains are equal in both norms, pairs 0-2 of layer
    0, ±I elsewhere), per expert a gated MLP's D·P and the experts' order in layers 0 and 2, a dense gated MLP's D·P in
    layer 1. A random element of every site is exact to 1e-10 in float64 (computed directly); verify passes."""
    model = build(equal=HALVES[:3], norm_topk_prob=renorm)
    smap, new, t, report = exact_everywhere(model, GROUPS, logp, seed=SEED)
    assert smap["blocks.0.attn.qk.0"].group.rigid == HALVES[3:] and smap["blocks.2.attn.qk.0"].group.rigid == HALVES
    assert [s.name for s in smap if s.name.startswith("blocks.1.mlp")] == ["blocks.1.mlp"]  # the dense layer
    assert sum(s.name.startswith("blocks.2.mlp.hidden.") for s in smap) == 4
    P = t.elements["blocks.2.mlp.experts"].perm
    assert not torch.equal(P, torch.arange(4))
    for name in ("q_norm", "k_norm"):  # one gain for every head: it stays
        assert torch.equal(getattr(new.model.layers[0].self_attn, name).weight, getattr(model.model.layers[0].self_attn, name).weight)
    assert report.floor is not None and report.max_abs_diff <= 10 * report.floor
    assert {"blocks.0.mlp.experts", "blocks.1.mlp"} <= {c.site for c in report.checked}




def test_negative_controls_change_the_function():
    """Refused, and forced wrong: a dense map of an expert's hidden units and of the dense layer's, the stream's
    rotations (gains kept), a rotation of the QK pair whose gains differ and the scaled rotary group. By hand: the
    experts' weights permuted without the router's rows change the function, and verify FAILs it."""
    model = build(equal=HALVES[:3])
    ref = logp(model)
    refused_and_wrong(model, "blocks.0.mlp.hidden.1", "gl", logp=logp)
    refused_and_wrong(model, "blocks.1.mlp", "gl", logp=logp)
    refused_and_wrong(model, "resid", "orthogonal", logp=logp)
    for wrong in (wb.get_group("rotary_orthogonal", 8, pairs=HALVES), wb.get_group("rotary", 8, pairs=HALVES)):
        refused_and_wrong(model, "blocks.0.attn.qk.0", wrong, logp=logp)
    bad = copy.deepcopy(model)
    order = torch.tensor([3, 0, 1, 2])
    with torch.no_grad():
        ex = bad.model.layers[2].mlp.experts
        ex.gate_up_proj.copy_(ex.gate_up_proj[order])
        ex.down_proj.copy_(ex.down_proj[order])
    assert rel(logp(bad), ref) > FAIL
    assert not wb.verify(model, bad, IDS).passed
    with torch.no_grad():
        bad.model.layers[2].mlp.gate.weight.copy_(model.model.layers[2].mlp.gate.weight[order])
    assert rel(logp(bad), ref) <= TOL  # with the router's rows: exact


@pytest.mark.parametrize("kw", [dict(num_experts_per_tok=1), dict(num_experts_per_tok=4, norm_topk_prob=True),
                                dict(decoder_sparse_step=2, mlp_only_layers=[]), dict(mlp_only_layers=[0, 1, 2]),
                                dict(attention_bias=True, tie_word_embeddings=True),
                                dict(use_sliding_window=True, sliding_window=4), dict(head_dim=16, hidden_act="gelu")],
                         ids=["top1", "all-experts", "sparse-step-2", "all-dense", "biases-tied", "sliding", "wide-heads-gelu"])
def test_configuration_variants_are_exact(kw):
    """Top-1 and all-experts routing, the other layer mixes (every other layer sparse; every layer dense: a Qwen3),
    biases with a tie, a sliding window, heads wider than hidden/heads with GELU-gated experts: the groups per kind of
    site, a random element exact in float64."""
    model = build(seed=2, equal=HALVES[:2], **kw)
    with torch.no_grad():  # the test's forward is the model's
        assert torch.allclose(model(input_ids=IDS).logits.log_softmax(-1), logp(model), rtol=0, atol=1e-5)
    smap = wb.symmetry_map(model)
    got = {s.name.rpartition(".")[0] if ".hidden." in s.name else s.name for s in smap if ".mlp" in s.name}
    sparse = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    assert got == {f"blocks.{i}.mlp" + (".hidden" if i in sparse else "") for i in range(3)} | \
        {f"blocks.{i}.mlp.experts" for i in sparse}
    new, _ = wb.random_intertwiner(model, seed=4)
    assert rel(logp(new), logp(model)) <= TOL


def test_fold_moves_ln2_into_the_router_experts_and_dense_mlp():
    """Folding moves post_attention_layernorm's gain into the router and every expert's gate and up, or the dense
    layer's; the per-head q/k norms keep theirs; the folded stream takes every rotation, exact."""
    model = build(equal=HALVES)
    f = folded_exactly(model, "orthogonal", logp)
    for i in range(3):
        assert torch.equal(f.model.layers[i].post_attention_layernorm.weight, torch.ones(32, dtype=torch.float64))
    assert torch.equal(f.model.layers[1].self_attn.q_norm.weight, model.model.layers[1].self_attn.q_norm.weight)


def test_bridge_is_exact(tmp_path_factory):
    """A bridge (TransformerLens maps the dense layer's projections as optional parts of its MoE component): the raw
    model's map, a random element exact, verified at every site but the experts' hidden units."""
    moe_bridged_exactly(build(equal=HALVES[:3], norm_topk_prob=True), tmp_path_factory.getbasetemp(), GROUPS, logp,
                        seed=SEED)


def test_float32_model_verifies():
    float32_verifies(build(), seed=SEED)


def test_base_model_moves_its_last_hidden_state():
    """The base Qwen3MoeModel (no head): its last hidden state, computed here in float64, moves exactly by the stream's
    element, and verify compares it in the new basis."""
    base_exactly(build(), attend, mlp, seed=SEED)


def test_sequence_classifier_built_in_code():
    """A Qwen3MoeForSequenceClassification built in code (no architecture named; TransformerLens lists its adapter
    under the language-model class only): its score reads the last non-pad token's final stream, and its logits,
    computed here in float64, are unchanged by a random element; verify passes."""
    model = build(cls="Qwen3MoeForSequenceClassification", num_labels=3)

    def scores(m):
        x, ref = decoder_stream(m, attend, mlp)
        last = (torch.arange(IDS.shape[1]) * (IDS != ref.config.pad_token_id)).argmax(-1)
        with torch.no_grad():
            return ref.score(x)[torch.arange(IDS.shape[0]), last]

    with torch.no_grad():
        assert torch.allclose(model(input_ids=IDS).logits, scores(model), rtol=0, atol=1e-5)
    new, t = wb.random_intertwiner(model, seed=SEED)
    assert rel(scores(new), scores(model)) <= TOL
    assert wb.verify(model, new, IDS, transform=t).passed


@settings(max_examples=8, deadline=None)
@given(experts_=st.integers(2, 5), data=st.data(), seed=st.integers(0, 2 ** 16))
def test_property_random_shapes_are_exact(experts_, data, seed):
    """Random expert counts, experts per token (1 to all), norm_topk_prob, heads, key/value heads, widths, depths and
    which layers are dense: a random element of every site is exact in float64 (the blocks computed here)."""
    shape = data.draw(decoder_shapes())
    heads = shape["num_attention_heads"]
    layers = shape["num_hidden_layers"]
    kw = dict(shape, head_dim=shape["hidden_size"] // heads, num_experts=experts_,
              num_experts_per_tok=data.draw(st.integers(1, experts_)), norm_topk_prob=data.draw(st.booleans()),
              moe_intermediate_size=data.draw(st.sampled_from([4, 8])), intermediate_size=data.draw(st.sampled_from([8, 12])),
              mlp_only_layers=data.draw(st.lists(st.integers(0, layers - 1), unique=True, max_size=layers)),
              decoder_sparse_step=data.draw(st.integers(1, 2)))
    model = build(seed=seed % 5, **kw)
    new, _ = wb.random_intertwiner(model, seed=seed)
    assert rel(logp(new), logp(model)) <= TOL, kw
