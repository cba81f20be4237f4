"""GPT-OSS: a pre-norm decoder (Llama's block order and RMSNorms) with biases on q, k, v and o, a learned attention sink
per query head, sliding-window layers alternating with full ones, YaRN rotary, and a sparse mixture of experts whose
router has a bias and whose experts are clamped SwiGLUs with biases. docs/DERIVATIONS.md §10, GPT-OSS.

A tiny random float64 GPT-OSS (hidden 32, 2 layers, 4 query heads sharing 2 key/value heads, d_head 8, 4 experts of 48
hidden units, top 2, sliding window 4 on 9 tokens, vocabulary 50), every parameter random, the sinks included. First
the block's form is computed from its modules: the sinks join each head's softmax and are dropped after it, the router
takes the top k of its logits (with its bias) and a softmax over those, each expert reads gate and up interleaved
(``[..., ::2]``, ``[..., 1::2]``) with their biases, clamps them, computes (up + 1)·gate·sigmoid(alpha·gate), and its
down projection adds its bias. Then the map (a Llama's stream, rotary QK and GL values, head permutations carrying the
sinks; per expert only permutations; the experts' order with the router's bias), each draw exact to 1e-10 in float64
computed directly — this file's own forward, RMSNorms in float64 (Hugging Face computes them in float32) — verify in
float64 and float32, fold, a bridge, negative controls, and a property over random shapes. The experts' limit is 1.0
here unless a test says otherwise (the default 7 is met by no unit of a random model: the clamps would never act).

Hugging Face picks ``grouped_mm`` for the experts, which refuses float64: the models here run the ``eager`` experts
(the same mathematics, one expert at a time).
"""
import copy
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import workbench as wb
from test_hf_families import (DECODER, FAIL, IDS, TOL, decoder_shapes, exact_everywhere, folded_exactly, kinds,
                              random_model, refused_and_wrong, rel)
from test_hf_families_more import _trace
from test_hf_mixtral import base_exactly, decoder_logp, float32_verifies, moe_bridged_exactly

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

F64 = torch.float64
# (YaRN's default factor, 32, assumes 32 × 4,096 positions: the released models' max_position_embeddings)
SHAPE = dict(DECODER, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4, swiglu_limit=1.0,
             max_position_embeddings=131072)
GROUPS = {"resid": {"signed_permutation"}, "blocks.attn.qk": {"rotary"}, "blocks.attn.ov": {"gl"},
          "blocks.attn.heads": {"permutation"}, "blocks.mlp.hidden": {"permutation"},
          "blocks.mlp.experts": {"permutation"}}


def build(seed=0, cls="GptOssForCausalLM", **kw):
    model = random_model(cls, "GptOssConfig", {**SHAPE, **kw}, seed)
    model.config._experts_implementation = "eager"  # (grouped_mm refuses float64)
    if cls == "GptOssForCausalLM":  # as a checkpoint's config says (TransformerLens's own boot of a bridge reads it)
        model.config.architectures = [cls]
    return model


def attend(ref, attn, x):
    """GPT-OSS's attention in float64: q, k, v with their biases; the rotary embedding on halves (pairs (i, i + d/2))
    with the model's own YaRN cos/sin (half width, its attention scaling in them); key/value heads repeated for their
    query heads; scores over √d_head, causal, and in the config's sliding layers only the keys less than
    ``sliding_window`` back; each head's sink logit joins its softmax as one more column, dropped after it; o_proj."""
    cfg = ref.config
    B, T, _ = x.shape
    dh = cfg.head_dim
    q, k, v = (p(x).view(B, T, -1, dh).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    cos, sin = getattr(ref, "model", ref).rotary_emb(x, torch.arange(T)[None])  # [1, T, d_head / 2]

    def rotate(t):
        a, b = t.chunk(2, -1)
        c, s = cos[:, None], sin[:, None]
        return torch.cat((a * c - b * s, b * c + a * s), -1)
    q, k = rotate(q), rotate(k)
    r = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    window = cfg.sliding_window if cfg.layer_types[attn.layer_idx] == "sliding_attention" else None
    hidden = torch.ones(T, T, dtype=torch.bool).triu(1) | (torch.ones(T, T, dtype=torch.bool).tril(-window) if window else False)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(dh)).masked_fill(hidden, -math.inf)
    sink = attn.sinks.reshape(1, -1, 1, 1).expand(B, -1, T, 1)
    p = torch.cat([scores, sink], -1).softmax(-1)[..., :-1]
    return attn.o_proj((p @ v).transpose(1, 2).reshape(B, T, -1))


def clamped_swiglu(gate, up, alpha, limit):
    """GPT-OSS's expert activation: g = min(gate, limit), u = clamp(up, -limit, limit), (u + 1)·g·sigmoid(alpha·g)."""
    g, u = gate.clamp(max=limit), up.clamp(-limit, limit)
    return (u + 1) * g * torch.sigmoid(alpha * g)


def experts(ref, block, x):
    """GPT-OSS's mixture of experts on tokens ``x`` [..., d] in float64: the router's logits (weight and bias), their
    top k, a softmax over those k; each expert's gate and up the even and odd columns of ``x·gate_up_proj + bias``,
    its clamped SwiGLU, its down projection and bias, weighted by its share (0 where unchosen)."""
    cfg = ref.config
    logits = x @ block.router.weight.T + block.router.bias
    top, idx = logits.topk(cfg.num_experts_per_tok, -1)
    top = top.softmax(-1)
    ex = block.experts
    out = torch.zeros_like(x)
    for e in range(cfg.num_local_experts):
        h = x @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
        act = clamped_swiglu(h[..., ::2], h[..., 1::2], cfg.swiglu_alpha, cfg.swiglu_limit)
        share = (top * (idx == e)).sum(-1, keepdim=True)
        out = out + share * (act @ ex.down_proj[e] + ex.down_proj_bias[e])
    return out


def logp(model, ids=IDS):
    """Log-probabilities from this file's own float64 forward of a GPT-OSS."""
    return decoder_logp(model, attend, experts, ids)


def mlp_readings(ref, block, x, swapped=False, softmax_first=False, limit=None):
    """``experts`` read another way, for the block's form: gate and up swapped (odd columns the gate), the softmax over
    every logit before the top k (not renormalised), or another clamp ``limit``."""
    cfg = copy.deepcopy(ref.config)
    if limit is not None:
        cfg.swiglu_limit = limit
    logits = x @ block.router.weight.T + block.router.bias
    if softmax_first:
        top, idx = logits.softmax(-1).topk(cfg.num_experts_per_tok, -1)
    else:
        top, idx = logits.topk(cfg.num_experts_per_tok, -1)
        top = top.softmax(-1)
    ex, out = block.experts, torch.zeros_like(x)
    for e in range(cfg.num_local_experts):
        h = x @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
        g, u = (h[..., 1::2], h[..., ::2]) if swapped else (h[..., ::2], h[..., 1::2])
        share = (top * (idx == e)).sum(-1, keepdim=True)
        out = out + share * (clamped_swiglu(g, u, cfg.swiglu_alpha, cfg.swiglu_limit) @ ex.down_proj[e] + ex.down_proj_bias[e])
    return out


def test_the_block_is_sinks_then_router_top_k_then_clamped_experts():
    """Computed from the modules: the attention is ``attend`` (its sinks one more softmax column per head; without them
    another function), the MoE block reads post_attention_layernorm's output and is ``experts`` in float64 exactly
    (the router's softmax runs in the model's dtype), and not its other readings (gate and up swapped, softmax before
    the top k, no clamp); the clamps act on a good share of the units at limit 1; the rotary embedding is YaRN (its
    attention scaling is not 1) on halves; the whole model is this file's forward up to Hugging Face's float32 norms."""
    model = build()
    layer = model.model.layers[0]
    seen = _trace(model, {"ln1": layer.input_layernorm, "attn": layer.self_attn, "ln2": layer.post_attention_layernorm,
                          "mlp": layer.mlp})
    x, y = seen["attn"]
    assert torch.equal(x, seen["ln1"][1])
    with torch.no_grad():
        assert torch.allclose(y, attend(model, layer.self_attn, x), rtol=0, atol=1e-12)
        sinkless = copy.deepcopy(model)
        sinkless.model.layers[0].self_attn.sinks.fill_(-math.inf)  # exp(-inf) = 0: the plain softmax
        assert not torch.allclose(y, attend(sinkless, sinkless.model.layers[0].self_attn, x), atol=1e-3)
        x, y = seen["mlp"]
        assert torch.equal(x, seen["ln2"][1])
        assert torch.allclose(y, experts(model, layer.mlp, x), rtol=0, atol=1e-12)
        for other in (dict(swapped=True), dict(softmax_first=True), dict(limit=math.inf)):
            assert not torch.allclose(y, mlp_readings(model, layer.mlp, x, **other), atol=1e-3), other
        h = x @ layer.mlp.experts.gate_up_proj[0] + layer.mlp.experts.gate_up_proj_bias[0]
        assert float((h[..., ::2] > 1).double().mean()) > 0.1 and float((h[..., 1::2].abs() > 1).double().mean()) > 0.1
        assert model.model.rotary_emb.rope_type == "yarn" and model.model.rotary_emb.attention_scaling != 1
        assert torch.allclose(model(input_ids=IDS).logits.log_softmax(-1), logp(model), rtol=0, atol=1e-5)
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    facts = wb.models.hf.facts(model)
    assert facts["family"] == "gpt_oss" and facts["act_fn"] == wb.models.hf.CLAMPED_SWIGLU and not facts["parallel"]
    assert wb.symmetry_map(model)["blocks.0.attn.qk.0"].group.pairs == ((0, 4), (1, 5), (2, 6), (3, 7))


def test_the_layout_reads_interleaved_gate_and_up_and_every_bias():
    """The canonical weights are views of the model's own: expert e's gate (up) the even (odd) columns of gate_up_proj
    and of its bias, the down projection transposed with its bias, the router's weight and bias, the sinks."""
    model = build()
    W = wb.models.read_weights(model)
    mlp, attn = model.model.layers[1].mlp, model.model.layers[1].self_attn
    ex = mlp.experts
    pairs = {"experts.W_gate": ex.gate_up_proj[..., ::2], "experts.W_in": ex.gate_up_proj[..., 1::2],
             "experts.b_gate": ex.gate_up_proj_bias[..., ::2], "experts.b_in": ex.gate_up_proj_bias[..., 1::2],
             "experts.W_out": ex.down_proj, "experts.b_out": ex.down_proj_bias, "W_router": mlp.router.weight.T,
             "b_router": mlp.router.bias}
    for key, want in pairs.items():
        assert torch.equal(W[f"blocks.1.mlp.{key}"], want.detach()), key
    assert torch.equal(W["blocks.1.attn.sinks"], attn.sinks.detach())


def test_map_groups_and_exact_random_intertwiner():
    """A Llama's stream (signed permutations: RMSNorm gains kept), rotary QK, GL values, head permutations that carry
    each query head's sink; per expert only permutations (gate, up, their biases and the down rows together); the
    experts' order, the router's bias with its columns and every expert bias with its expert. One random element of
    every site is exact to 1e-10 in float64 (computed directly) and verify passes."""
    model = build()
    smap, new, t, report = exact_everywhere(model, GROUPS, logp, seed=2)
    assert not smap.skipped and report.floor is not None and report.max_abs_diff <= 10 * report.floor
    for layer in range(2):
        old, moved = model.model.layers[layer], new.model.layers[layer]
        groups = t.elements[f"blocks.{layer}.attn.heads"].perm  # the key/value groups, two query heads each
        within = [t.elements[f"blocks.{layer}.attn.heads.{k}"].perm for k in range(2)]
        heads = torch.cat([2 * groups[g] + within[int(groups[g])] for g in range(2)])  # new head j holds old head heads[j]
        assert torch.equal(moved.self_attn.sinks, old.self_attn.sinks[heads])
        assert not torch.equal(heads, torch.arange(4)) or layer  # (seed 2 moves layer 0's heads)
        P = t.elements[f"blocks.{layer}.mlp.experts"].perm
        assert torch.equal(moved.mlp.router.bias, old.mlp.router.bias[P])
        assert torch.allclose(moved.mlp.experts.down_proj_bias, t.elements["resid"].act(old.mlp.experts.down_proj_bias[P], -1),
                              rtol=0, atol=1e-12)
    assert "blocks.0.mlp.experts" in {c.site for c in report.checked}  # observed in the router's logits


def _edited(model, edit):
    """A copy of ``model`` with ``edit(copy)`` applied to its parameters (no gradient)."""
    new = copy.deepcopy(model)
    with torch.no_grad():
        edit(new)
    return new


def _scale_up(c, shift):
    """Expert 1 of layer 0: its up columns and up bias times ``c`` (the bias also + ``shift``), its down rows over ``c``."""
    def edit(m):
        ex = m.model.layers[0].mlp.experts
        ex.gate_up_proj[1, :, 1::2] *= c
        ex.gate_up_proj_bias[1, 1::2] = ex.gate_up_proj_bias[1, 1::2] * c + shift
        ex.down_proj[1] /= c[:, None]
    return edit


def test_negative_controls_change_the_function():
    """One step outside each group, refused by the map and, forced, wrong: a gated MLP's D·P on an expert's units (a
    scale of the up branch), signs on them, a rotation of them, the stream's rotations (gains kept), GL on a rotary QK
    space. By hand: a permutation of query heads that leaves their sinks in place (the same permutation moving the
    sinks is exact), a positive scale of an expert's up branch undone on its down rows (the + 1 keeps it from
    commuting), the affine one that commutes with the + 1 (u ↦ c·u + c − 1) while the clamp acts (it is exact with the
    clamp removed, limit = inf: the clamp is what rules it out), a positive scale of the gate undone on the down rows;
    each changes the function, and verify without a transform FAILs it."""
    model = build()
    ref = logp(model)
    refused_and_wrong(model, "blocks.0.mlp.hidden.1", "diagonal_permutation", logp=logp)
    refused_and_wrong(model, "blocks.1.mlp.hidden.2", "signed_permutation", logp=logp)
    refused_and_wrong(model, "blocks.0.mlp.hidden.3", "orthogonal", logp=logp)
    refused_and_wrong(model, "resid", "orthogonal", logp=logp)
    refused_and_wrong(model, "blocks.1.attn.qk.0", "gl", logp=logp)
    n, dh = SHAPE["intermediate_size"], SHAPE["head_dim"]
    swap = torch.tensor([1, 0])

    def heads(m, sinks):  # layer 1's query heads 0 and 1 (one key/value group) swapped: q rows, q bias, o columns
        a = m.model.layers[1].self_attn
        a.q_proj.weight[:2 * dh] = a.q_proj.weight[:2 * dh].view(2, dh, -1)[swap].reshape(2 * dh, -1)
        a.q_proj.bias[:2 * dh] = a.q_proj.bias[:2 * dh].view(2, dh)[swap].reshape(-1)
        a.o_proj.weight[:, :2 * dh] = a.o_proj.weight[:, :2 * dh].view(-1, 2, dh)[:, swap].reshape(-1, 2 * dh)
        if sinks:
            a.sinks[:2] = a.sinks[:2][swap]
    with torch.no_grad():
        assert model.model.layers[1].self_attn.sinks[0] != model.model.layers[1].self_attn.sinks[1]
    assert rel(logp(_edited(model, lambda m: heads(m, True))), ref) <= TOL
    c = torch.exp(torch.randn(n, generator=torch.Generator().manual_seed(5), dtype=F64))  # positive scales
    bad = [_edited(model, lambda m: heads(m, False)), _edited(model, _scale_up(c, 0.0)),
           _edited(model, _scale_up(c, c - 1))]

    def gate(m):
        ex = m.model.layers[1].mlp.experts
        ex.gate_up_proj[2, :, ::2] *= c
        ex.gate_up_proj_bias[2, ::2] *= c
        ex.down_proj[2] /= c[:, None]
    bad.append(_edited(model, gate))
    for b in bad:
        assert rel(logp(b), ref) > FAIL
        assert not wb.verify(model, b, IDS).passed
    unclamped = build(swiglu_limit=math.inf)
    assert rel(logp(_edited(unclamped, _scale_up(c, c - 1))), logp(unclamped)) <= TOL


@pytest.mark.parametrize("k", [1, 4])
def test_top_one_and_every_expert(k):
    """num_experts_per_tok = 1 (each token's one expert, weight 1) and = num_local_experts (a softmax over every logit):
    the same groups, exact in float64, verified."""
    exact_everywhere(build(seed=k, num_experts_per_tok=k), GROUPS, logp, seed=2)


@pytest.mark.parametrize("kw", [dict(swiglu_limit=7.0, attention_bias=False, tie_word_embeddings=True),
                                dict(num_key_value_heads=1, layer_types=["full_attention", "sliding_attention"],
                                     sliding_window=2),
                                dict(num_key_value_heads=4, head_dim=16, rope_parameters={"rope_type": "default",
                                                                                          "rope_theta": 10000.0}),
                                dict(swiglu_alpha=0.5, swiglu_limit=0.25)])
def test_configuration_variants_are_exact(kw):
    """The default limit (no clamp acts on a random model) with no attention biases and tied embeddings; multi-query
    attention with another layer order and window; plain multi-head attention with a head size that is not hidden /
    heads and plain rotary; another sigmoid gain and limit: a random element of every site is exact in float64."""
    model = build(seed=3, **kw)
    smap = wb.symmetry_map(model)
    assert not smap.skipped or kw.get("num_key_value_heads") == 1, smap.skipped
    assert {k: kinds(smap)[k] for k in ("blocks.mlp.hidden", "blocks.mlp.experts")} == {"blocks.mlp.hidden": {"permutation"},
                                                                                        "blocks.mlp.experts": {"permutation"}}
    new, _ = wb.random_intertwiner(model, seed=4)
    assert rel(logp(new), logp(model)) <= TOL, kw


def test_fold_moves_ln2_into_the_router_and_experts():
    """Folding post_attention_layernorm's gain into the router and every expert's gate and up (their biases and the
    router's stay: they are added after the product) keeps the function (computed directly) and turns the stream's
    group into every rotation; a random element is exact there too."""
    model = build()
    folded = folded_exactly(model, "orthogonal", logp)
    layer, old = folded.model.layers[0], model.model.layers[0]
    assert torch.equal(layer.post_attention_layernorm.weight, torch.ones(32, dtype=F64))
    assert torch.equal(layer.mlp.router.bias, old.mlp.router.bias)
    assert torch.equal(layer.mlp.experts.gate_up_proj_bias, old.mlp.experts.gate_up_proj_bias)


def test_bridge_is_exact(tmp_path_factory):
    """A bridge around a GPT-OSS: the raw model's map, a random element of every site exact (computed directly) and
    verified at every site but the experts' hidden units, which no hook shows; the experts' order is observed in the
    router's logits (the bridge's ``router`` component, not Mixtral's ``gate``)."""
    smap, report = moe_bridged_exactly(build(), tmp_path_factory.getbasetemp(), GROUPS, logp)
    assert smap["blocks.0.mlp.experts"].hook_name == "blocks.0.mlp.router.hook_out"
    assert "blocks.1.mlp.experts" in {c.site for c in report.checked}


def test_float32_model_verifies():
    float32_verifies(build(), seed=3)


def test_base_model_moves_its_last_hidden_state():
    """The base GptOssModel (no head): its last hidden state, computed here in float64, moves exactly by the stream's
    element, and verify compares it in the new basis."""
    base_exactly(build(), attend, experts, seed=2)


def test_balance_loss_and_edited_experts_settings():
    """A model returning its load-balancing loss keeps every site but the experts' order (the loss couples expert e of
    every layer), the rest exact; the experts' limit edited in the configuration after building (the experts keep the
    one they were built with) is refused by name."""
    model = build(output_router_logits=True)
    smap = wb.symmetry_map(model)
    assert {s for s, _ in smap.skipped} == {"blocks.0.mlp.experts", "blocks.1.mlp.experts"}
    new, _ = wb.random_intertwiner(model, seed=2)
    assert rel(logp(new), logp(model)) <= TOL
    model = build()
    model.config.swiglu_limit = 3.0
    smap = wb.symmetry_map(model)
    assert len(smap) == 0 and "limit" in smap.skipped[0][1], smap.skipped


@settings(max_examples=6, deadline=None)
@given(experts_=st.integers(2, 5), data=st.data(), seed=st.integers(0, 2 ** 16))
def test_property_random_shapes_are_exact(experts_, data, seed):
    """Random expert counts, experts per token (1 to all), key/value heads, widths, depths, windows and limits: a random
    element of every site is exact in float64 (the block computed here)."""
    shape = data.draw(decoder_shapes())
    kw = dict(shape, head_dim=shape["hidden_size"] // shape["num_attention_heads"], num_local_experts=experts_,
              num_experts_per_tok=data.draw(st.integers(1, experts_)), intermediate_size=data.draw(st.sampled_from([8, 12])),
              sliding_window=data.draw(st.integers(1, 9)), swiglu_limit=data.draw(st.sampled_from([0.5, 1.0, 7.0])))
    model = build(seed=seed % 5, **kw)
    new, _ = wb.random_intertwiner(model, seed=seed)
    assert rel(logp(new), logp(model)) <= TOL, kw
