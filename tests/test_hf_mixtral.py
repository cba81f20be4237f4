"""Mixtral: a Llama whose MLP is a sparse mixture of experts (docs/DERIVATIONS.md §10, Mixtral).

A tiny random float64 Mixtral (hidden 32, 2 layers, 4 query heads sharing 2 key/value heads, 4 experts of 48 hidden
units, top-2, vocabulary 50), every parameter random. First the block's form is computed from its modules: the router
reads post_attention_layernorm's output, softmax over its logits, the top k renormalised, and the chosen experts'
SwiGLUs (gate first, then up, in the fused gate_up_proj) weighted by them; jitter noise only in training. Then the map
(a Llama's stream and attention; per expert a gated MLP's D·P; the experts' order), each draw exact to 1e-10 in
float64 computed directly — this file's own forward, RMSNorms and the router's softmax in float64 (Hugging Face
computes both in float32) — verify, fold, a bridge, negative controls, and top-1 / all-experts routing.

Hugging Face picks ``grouped_mm`` for the experts, which refuses float64: the models here run the ``eager`` experts
(the same mathematics, one expert at a time).
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import workbench as wb
from test_hf_families import (DECODER, FAIL, IDS, TOL, bridge, decoder_shapes, exact_everywhere, kinds, random_model,
                              refused_and_wrong, rel)
from test_hf_families_more import _trace

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

F64 = torch.float64
SHAPE = dict(DECODER, num_local_experts=4, num_experts_per_tok=2)
GROUPS = {"resid": {"signed_permutation"}, "blocks.attn.qk": {"rotary"}, "blocks.attn.ov": {"gl"},
          "blocks.attn.heads": {"permutation"}, "blocks.mlp.hidden": {"diagonal_permutation"},
          "blocks.mlp.experts": {"permutation"}}


def build(seed=0, **kw):
    model = random_model("MixtralForCausalLM", "MixtralConfig", {**SHAPE, **kw}, seed)
    model.config._experts_implementation = "eager"  # (grouped_mm refuses float64)
    return model


def rms(t, w, eps):
    return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w


def moe(block, x, k, renorm=True):
    """The sparse mixture of experts on tokens ``x`` [..., d] in float64: softmax over the router's logits, the top k
    (renormalised to sum 1 where ``renorm``: Mixtral always, OLMoE and Qwen where ``norm_topk_prob``), each expert's
    gated MLP (rows of gate_up_proj: gate, then up; the experts' own activation module, SiLU by default) weighted by its
    share (0 where unchosen)."""
    p = (x @ block.gate.weight.T).softmax(-1)
    top, idx = p.topk(k, -1)
    if renorm:
        top = top / top.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(block.gate.weight.shape[0]):
        g, u = (x @ block.experts.gate_up_proj[e].T).chunk(2, -1)
        share = (top * (idx == e)).sum(-1, keepdim=True)
        out = out + share * ((block.experts.act_fn(g) * u) @ block.experts.down_proj[e].T)
    return out


def rotate_half(t):
    a, b = t.chunk(2, -1)
    return torch.cat((-b, a), -1)


def attention(model, attn, x, window=None):
    """Causal GQA attention with ``rotate_half`` rotary (the model's own cos/sin), written out in float64; ``window``:
    a query sees only the keys less than ``window`` positions back (Hugging Face's sliding window mask)."""
    cfg = model.config
    B, T, _ = x.shape
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    dh = attn.head_dim
    q = attn.q_proj(x).view(B, T, H, dh).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, K, dh).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, K, dh).transpose(1, 2)
    cos, sin = getattr(model, "model", model).rotary_emb(x, torch.arange(T)[None])  # (a base model holds it itself)
    q, k = q * cos[:, None] + rotate_half(q) * sin[:, None], k * cos[:, None] + rotate_half(k) * sin[:, None]
    k, v = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)
    hidden = torch.ones(T, T, dtype=torch.bool).triu(1) | (torch.ones(T, T, dtype=torch.bool).tril(-window) if window else False)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(dh)).masked_fill(hidden, -math.inf)
    return attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1))


def decoder_stream(model, attend, mlp, ids=IDS):
    """The final norm's output from this file's own float64 forward of a pre-norm decoder (raw, or a bridge's Hugging
    Face model; a base model's is its last hidden state) whose layers add ``attend(ref, layer.self_attn, x)`` and
    ``mlp(ref, layer.mlp, x)``, each reading the stream through its RMSNorm (the formula in float64). Returns the
    stream and the plain model carrying the weights."""
    hf = getattr(model, "original_model", model)
    own = {k.replace("._original_component", ""): v for k, v in hf.state_dict().items()}
    ref = type(hf)(copy.deepcopy(hf.config)).double().eval()  # plain modules carrying the weights (no bridge wrappers)
    ref.load_state_dict({k: own[k] for k in ref.state_dict()})
    body, eps = getattr(ref, "model", ref), ref.config.rms_norm_eps
    with torch.no_grad():
        x = body.embed_tokens(ids)
        for layer in body.layers:
            x = x + attend(ref, layer.self_attn, rms(x, layer.input_layernorm.weight, eps))
            x = x + mlp(ref, layer.mlp, rms(x, layer.post_attention_layernorm.weight, eps))
        return rms(x, body.norm.weight, eps), ref


def decoder_logp(model, attend, mlp, ids=IDS):
    """Log-probabilities from ``decoder_stream``'s forward and the model's ``lm_head``."""
    x, ref = decoder_stream(model, attend, mlp, ids)
    with torch.no_grad():
        return ref.lm_head(x).log_softmax(-1)


def base_exactly(model, attend, mlp, seed):
    """``model``'s base model (no head; its output is the stream after the final norm): a random element (``seed``)
    moves its last hidden state, computed here, exactly by the stream's element, and verify compares it so."""
    base = model.base_model
    assert wb.models.hf.is_base(base)
    new, t = wb.random_intertwiner(base, seed=seed)
    a, b = decoder_stream(base, attend, mlp)[0], decoder_stream(new, attend, mlp)[0]
    assert float((t.elements["resid"].act(a, -1) - b).abs().max() / a.abs().max()) <= TOL
    assert float((a - b).abs().max() / a.abs().max()) > 1e-3  # the stream did move
    report = wb.verify(base, new, IDS, transform=t)
    assert report.passed and report.compared == "last hidden states", report.summary()


def logp(model, ids=IDS):
    """Log-probabilities from this file's own float64 forward of a Mixtral."""
    return decoder_logp(model, attention, lambda ref, block, x: moe(block, x, ref.config.num_experts_per_tok), ids)


def moe_bridged_exactly(raw_model, folder, groups, logp, seed=2):
    """A bridge around a mixture of experts: the raw model's map (``groups`` per kind of site), a random element
    (``seed``) of every site exact (``logp``: computed here) and verified at its float32 floor at every site but the
    experts' hidden units, which no hook shows (the experts run as one fused forward); the experts' order is observed
    in the router's logits. Returns the bridge's map, verify's report."""
    model = bridge(raw_model, folder)
    smap = wb.symmetry_map(model)
    assert kinds(smap) == kinds(wb.symmetry_map(raw_model)) and {k: kinds(smap).get(k) for k in groups} == groups
    new, t = wb.random_intertwiner(model, seed=seed)
    assert wb.models.model_kind(new) == wb.models.ModelKind.HF_BRIDGE and rel(logp(new), logp(model)) <= TOL
    report = wb.verify(model, new, IDS, transform=t)
    assert report.passed and report.floor is not None and report.max_abs_diff <= 10 * report.floor, report.summary()
    assert {c.site for c in report.checked} == {s.name for s in smap if ".mlp.hidden." not in s.name}
    return smap, report


def float32_verifies(model, seed: int) -> None:
    """``model`` in float32: a random element of every site (``seed``), verified against the float32 model's own
    outputs, with every checked representation moved."""
    model = model.float()
    new, t = wb.random_intertwiner(model, seed=seed)
    report = wb.verify(model, new, IDS, transform=t)
    assert report.passed and report.representations_moved, report.summary()


def moe_form(model, mlp, seen, renorm, logp, family):
    """For the q/k-norm mixtures (OLMoE, Qwen3-MoE): ``mlp``'s output (traced as ``seen["mlp"]``) is ``moe`` with the top
    k renormalised exactly when ``renorm`` (the other reading is 1e-3 away), the whole model is ``logp`` (the test's own
    forward) up to Hugging Face's float32 norms and softmax, and the layout reads a pre-norm, sequential ``family`` with
    q/k norms."""
    x, y = seen["mlp"]
    assert torch.allclose(y, moe(mlp, x, 2, renorm), rtol=0, atol=1e-6)
    assert not torch.allclose(y, moe(mlp, x, 2, not renorm), atol=1e-3)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=IDS).logits.log_softmax(-1), logp(model), rtol=0, atol=1e-5)
    facts = wb.models.hf.facts(model)
    assert facts["family"] == family and facts["qk_norm"] and not facts["parallel"] and not facts["post_ln"]


def test_the_block_is_a_router_top_k_and_weighted_swiglu_experts():
    """Computed from the modules: the MoE block reads post_attention_layernorm's output, and its output is ``moe`` (the
    router's softmax, top 2 renormalised, gate-then-up SwiGLU experts) up to the router's float32 softmax; the whole
    model is this file's forward up to Hugging Face's float32 norms. Jitter noise is applied in training only."""
    model = build(router_jitter_noise=0.5)
    layer = model.model.layers[0]
    seen = _trace(model, {"ln2": layer.post_attention_layernorm, "mlp": layer.mlp})
    x, y = seen["mlp"]
    assert torch.equal(x, seen["ln2"][1])
    assert torch.allclose(y, moe(layer.mlp, x, 2), rtol=0, atol=1e-6) and not torch.allclose(y, moe(layer.mlp, x, 1), atol=1e-3)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=IDS).logits.log_softmax(-1), logp(model), rtol=0, atol=1e-5)
        model.train()
        noisy = layer.mlp(x.clone())
        model.eval()
    assert not torch.allclose(noisy, y, atol=1e-3)  # training only: eval is the formula above
    facts = wb.models.hf.facts(model)
    cfg = wb.models.hf.adapter(model).cfg
    assert facts["family"] == "mixtral" and cfg.normalization_type == "RMS" and not facts["parallel"]


def test_map_groups_and_exact_random_intertwiner():
    """A Llama's stream (signed permutations: RMSNorm gains kept), rotary QK, GL values and head permutations; a gated
    MLP's D·P for each expert's hidden units; the experts' order. One random element of every site is exact to 1e-10
    in float64 (computed directly) and verify passes at its float32 floor (router softmax and norms in float32)."""
    model = build()
    # (seed 1 draws the identity order of layer 1's 4 experts, a 1-in-24 draw, whose router logits then rightly do not
    # move: verify's "representations moved" would fail)
    smap, new, t, report = exact_everywhere(model, GROUPS, logp, seed=2)
    assert not smap.skipped
    assert sum(s.name.startswith("blocks.0.mlp.hidden.") for s in smap) == 4
    P = t.elements["blocks.0.mlp.experts"].perm
    assert not torch.equal(P, torch.arange(4))  # the experts move: each expert's weights with its router column
    for e in range(4):
        old, moved = model.model.layers[0].mlp, new.model.layers[0].mlp
        assert torch.allclose(moved.gate.weight[e] @ torch.linalg.inv(t.elements["resid"].matrix()).T,
                              old.gate.weight[P[e]], rtol=0, atol=1e-12)
    assert report.floor is not None and report.max_abs_diff <= 10 * report.floor
    assert "blocks.0.mlp.experts" in {c.site for c in report.checked}  # observed in the router's logits


def test_negative_controls_change_the_function():
    """A dense map of an expert's hidden units (refused; forced, wrong and FAILed), the stream's orthogonal maps (gains
    kept: refused, forced wrong); by hand: a positive scale of an expert's gate units undone on its down projection (a
    ReLU's symmetry, not SiLU's), and a permutation of an expert's gate rows without its up rows, each change the
    function, and verify without a transform FAILs them."""
    model = build()
    ref = logp(model)
    refused_and_wrong(model, "blocks.0.mlp.hidden.1", "gl", logp=logp)
    refused_and_wrong(model, "resid", "orthogonal", logp=logp)
    n = SHAPE["intermediate_size"]
    scaled, permuted = copy.deepcopy(model), copy.deepcopy(model)
    c = torch.exp(torch.randn(n, generator=torch.Generator().manual_seed(5), dtype=F64))  # positive scales
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ex = scaled.model.layers[0].mlp.experts
        ex.gate_up_proj[1, :n] *= c[:, None]
        ex.down_proj[1] /= c[None, :]
        ex = permuted.model.layers[1].mlp.experts
        ex.gate_up_proj[2, :n] = ex.gate_up_proj[2, :n][perm]
    for bad in (scaled, permuted):
        assert rel(logp(bad), ref) > FAIL
        assert not wb.verify(model, bad, IDS).passed
    with pytest.raises(ValueError, match="not a symmetry"):  # a rotation of an expert's SiLU-gated units
        wb.random_intertwiner(model, sites=["blocks.0.mlp.hidden.1"], group="orthogonal")


@pytest.mark.parametrize("k", [1, 4])
def test_top_one_and_every_expert(k):
    """num_experts_per_tok = 1 (each token's one expert, weight 1) and = num_local_experts (every expert, weighted by the
    whole softmax): the same groups, exact in float64, verified."""
    model = build(seed=k, num_experts_per_tok=k)
    exact_everywhere(model, GROUPS, logp, seed=2)


def test_fold_moves_the_gain_into_the_router_and_experts():
    """Folding post_attention_layernorm's gain into the router and every expert's gate and up keeps the function
    (computed directly) and turns the stream's group into every rotation; a random element is exact there too."""
    model = build()
    folded = wb.fold_layernorm(model)
    assert rel(logp(folded), logp(model)) <= TOL
    assert torch.equal(folded.model.layers[0].post_attention_layernorm.weight, torch.ones(32, dtype=F64))
    exact_everywhere(folded, {**GROUPS, "resid": {"orthogonal"}}, logp, seed=2)


def test_bridge_is_exact(tmp_path_factory):
    """A bridge around a Mixtral: the raw model's map, a random element of every site exact (computed directly) and
    verified at every site but the experts' hidden units, which no hook shows (the experts run as one fused forward);
    the experts' order is observed in the router's logits."""
    moe_bridged_exactly(build(), tmp_path_factory.getbasetemp(), GROUPS, logp)


def test_base_model_moves_its_last_hidden_state():
    """The base MixtralModel (no head): its last hidden state, computed here in float64, moves exactly by the stream's
    element, and verify compares it in the new basis."""
    base_exactly(build(), attention, lambda ref, block, x: moe(block, x, ref.config.num_experts_per_tok), seed=2)


@settings(max_examples=8, deadline=None)
@given(experts=st.integers(2, 5), data=st.data(), seed=st.integers(0, 2 ** 16))
def test_property_random_shapes_are_exact(experts, data, seed):
    """Random expert counts, experts per token (1 to all), key/value heads, widths and depths: a random element of
    every site is exact in float64 (the block computed here)."""
    kw = dict(data.draw(decoder_shapes()), num_local_experts=experts,
              num_experts_per_tok=data.draw(st.integers(1, experts)), intermediate_size=data.draw(st.sampled_from([8, 12])))
    model = build(seed=seed % 5, **kw)
    new, _ = wb.random_intertwiner(model, seed=seed)
    assert rel(logp(new), logp(model)) <= TOL, kw
