"""Hugging Face text decoders added to the checked families: GPT-J, StableLM, StarCoder2, Nemotron, GPT-Neo.

As in test_hf_families.py: a tiny random config per family (hidden 32, 2 layers, vocabulary 50), every parameter
random in float64 (norm gains around 1, Nemotron's stored ``w`` of its ``1 + w`` gains around 0, biases random).
First the facts the layout rests on are computed here from the model's own modules (norm formula, activation,
parallel or sequential block, MLP form) and held against TransformerLens's adapter configuration; then the groups
docs/DERIVATIONS.md §10 derives, function preservation computed directly (log-probabilities of original and
transformed model with Hugging Face's own forward, SDPA attention, held to 1e-10 relative to each position's
largest |log-probability|), and negative controls one step outside each site's group.

Float32 inside Hugging Face: GPT-Neo's attention casts q and k to float32 (it has no SDPA path); its direct check
gives that attention the same formula in float64 (``exact``), and the model's own forward is held to its measured
floor. GPT-J's *eager* attention does the same; SDPA (used here) is float64, but the rotary measurement runs through
a TransformerLens bridge, which uses eager attention: see test_gptj_rotary_pairs_are_measured_through_float32_attention.
"""
import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F

import workbench as wb
from test_hf_families import FAIL, IDS, LARGER, TOL, as_raw, bridge, bridged_exactly, kinds, mapped, random_model, rel

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

F64 = torch.float64
TOKENS = dict(vocab_size=50, bos_token_id=0, eos_token_id=0)
LLAMA_LIKE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=16)
CONFIGS = {  # family: (class, config keywords)
    "gptj": ("GPTJForCausalLM", dict(n_embd=32, n_layer=2, n_head=4, n_positions=16, n_inner=48, rotary_dim=4)),  # parallel
    "stablelm": ("StableLmForCausalLM", dict(LLAMA_LIKE)),  # LayerNorm, SwiGLU, GQA, partial rotary 0.25
    "starcoder2": ("Starcoder2ForCausalLM", dict(LLAMA_LIKE, sliding_window=4)),  # biases everywhere, tied, window < sequence
    "nemotron": ("NemotronForCausalLM", dict(LLAMA_LIKE)),  # LayerNorm1P (1 + w), relu², partial rotary 0.5
    "gpt_neo": ("GPTNeoForCausalLM", dict(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                                          max_position_embeddings=16, attention_types=[[["global", "local"], 1]],
                                          window_size=4)),  # learned positions, unscaled scores, a local layer, tied
}
# The derived group of every site kind (docs/DERIVATIONS.md §10), gains kept as built.
MLP = {"gptj": "permutation", "stablelm": "diagonal_permutation", "starcoder2": "permutation",
       "nemotron": "scaled_permutation", "gpt_neo": "permutation"}
PAIRS = {"gptj": ((0, 1), (2, 3)), "stablelm": ((0, 1),), "starcoder2": ((0, 4), (1, 5), (2, 6), (3, 7)), "nemotron": ((0, 2), (1, 3))}
KV = {"stablelm": 2, "starcoder2": 2, "nemotron": 2}  # of 4 heads
OFFSET = {"nemotron": 1.0}  # the norm gain is offset + stored weight
NEO_FLOOR = 1e-5  # GPT-Neo's own forward (q·k in float32): measured 2e-7 to 1.5e-6 over 12 random models and elements


def build(family, seed=0, kw=None):
    """A tiny random float64 model of ``family`` in eval mode, every parameter random (``kw``: other config keywords)."""
    cls, own = CONFIGS[family]
    return random_model(cls, cls.replace("ForCausalLM", "Config"), {**TOKENS, **(own if kw is None else kw)}, seed,
                        gain=1 - OFFSET.get(family, 0.0),
                        embedding=lambda name: "embed" in name or name.endswith(("wte.weight", "wpe.weight")))


def _neo_attn64(self, query, key, value, attention_mask=None):
    """GPTNeoSelfAttention._attn with q·k in the input's dtype (Hugging Face casts q and k to float32 first)."""
    w = query @ key.transpose(-1, -2)  # no 1/√d: GPT-Neo does not scale
    q_len, k_len = query.size(-2), key.size(-2)
    w = torch.where(self.bias[:, :, k_len - q_len:k_len, :k_len], w, torch.tensor(torch.finfo(w.dtype).min, dtype=w.dtype))
    if attention_mask is not None:
        w = w + attention_mask
    w = w.softmax(-1)
    return w @ value, w


def exact(model):
    """A plain float64 Hugging Face model with ``model``'s weights (raw or a bridge's), SDPA attention; GPT-Neo's
    attention given its own formula in float64."""
    new = as_raw(model)
    for m in new.modules():
        if type(m).__name__ == "GPTNeoSelfAttention":
            m._attn = types.MethodType(_neo_attn64, m)
    return new


def logp(model, own=False):
    """Log-probabilities in float64, computed here (``own``: Hugging Face's forward as it is, float32 parts included)."""
    with torch.no_grad():
        return (as_raw(model) if own else exact(model))(input_ids=IDS).logits.double().log_softmax(-1)


@pytest.fixture(scope="module")
def raw():
    cache = {}
    return lambda family: cache.setdefault(family, build(family))


# ---------------------------------------------------------------------- the facts, computed from the modules
def _parts(model):
    """(layer 0, its first norm, second norm or None, attention, MLP, MLP's activation module, final norm)."""
    base = model.transformer if hasattr(model, "transformer") else model.model
    layer = (base.h if hasattr(base, "h") else base.layers)[0]
    n1 = getattr(layer, "ln_1", None) or layer.input_layernorm
    n2 = getattr(layer, "ln_2", None) or getattr(layer, "post_attention_layernorm", None)
    attn = getattr(layer, "attn", None) or layer.self_attn
    act = getattr(layer.mlp, "act", None) or layer.mlp.act_fn
    return layer, n1, n2, attn, layer.mlp, act, getattr(base, "ln_f", None) or base.norm


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _trace(model, modules):
    """Each module's input (its first tensor argument or ``hidden_states``) and output (first element) in one forward."""
    seen, handles = {}, []
    for name, m in modules.items():
        def hook(mod, args, kwargs, out, name=name):
            seen[name] = (args[0] if args else kwargs["hidden_states"], _first(out))
        handles.append(m.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=IDS)
    finally:
        for h in handles:
            h.remove()
    return seen


GELU_TANH = lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))  # noqa: E731
ACTS = {"gptj": ("gelu_new", GELU_TANH), "gpt_neo": ("gelu_new", GELU_TANH), "starcoder2": ("gelu_pytorch_tanh", GELU_TANH),
        "stablelm": ("silu", lambda x: x * torch.sigmoid(x)), "nemotron": ("relu2", lambda x: torch.relu(x) ** 2)}


@pytest.mark.parametrize("family,extra", [(f, {}) for f in CONFIGS] + [("stablelm", dict(use_parallel_residual=True))])
def test_layout_facts_computed_from_the_modules_agree_with_the_adapter(family, extra):
    """Norm formula (LayerNorm with gain offset + w), activation, MLP form, parallel or sequential block and norm
    placement (pre-LN: the norms read the stream, the sublayers add to it), each computed here from the model's own
    modules in float64, and what TransformerLens's adapter configuration says about each."""
    model = build(family, kw=dict(CONFIGS[family][1], **extra))
    layer, n1, n2, attn, mlp, act, final = _parts(model)
    cfg, facts = wb.models.hf.adapter(model).cfg, wb.models.hf.facts(model)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1), dtype=F64)
    offset = OFFSET.get(family, 0.0)
    for norm in (n1, n2, final):
        if norm is not None:
            want = F.layer_norm(x, (32,), offset + norm.weight, norm.bias, norm.eps)
            assert torch.allclose(norm(x), want, rtol=0, atol=1e-13)
    assert cfg.normalization_type == "LN" and facts["gain_offset"] == offset and not facts["post_ln"]
    name, fn = ACTS[family]
    assert cfg.act_fn == name and torch.allclose(act(x), fn(x), rtol=0, atol=1e-13)
    gated = hasattr(mlp, "gate_proj")
    lin = [getattr(mlp, n) for n in ("up_proj", "c_fc", "fc_in") if hasattr(mlp, n)][0]
    out = [getattr(mlp, n) for n in ("down_proj", "c_proj", "fc_out") if hasattr(mlp, n)][0]
    want = out(fn(mlp.gate_proj(x)) * lin(x)) if gated else out(fn(lin(x)))
    assert torch.allclose(mlp(x), want, rtol=0, atol=1e-13) and bool(cfg.gated_mlp) == gated
    seen = _trace(model, {"block": layer, "n1": n1, "attn": attn, "mlp": mlp, **({"n2": n2} if n2 is not None else {})})
    x_in, x_out = seen["block"]
    assert torch.equal(seen["n1"][0], x_in) and torch.equal(seen["attn"][0], seen["n1"][1])
    parallel = n2 is None
    if parallel:  # x + attn(ln(x)) + mlp(ln(x)): one norm read by both
        assert torch.equal(seen["mlp"][0], seen["n1"][1])
        assert torch.allclose(x_out, x_in + seen["attn"][1] + seen["mlp"][1], rtol=0, atol=1e-13)
    else:  # x + attn(ln1(x)), then + mlp(ln2(·))
        mid = x_in + seen["attn"][1]
        assert torch.allclose(seen["n2"][0], mid, rtol=0, atol=1e-13) and torch.equal(seen["mlp"][0], seen["n2"][1])
        assert torch.allclose(x_out, mid + seen["mlp"][1], rtol=0, atol=1e-13)
    assert bool(cfg.parallel_attn_mlp) == parallel == facts["parallel"] == (family == "gptj" or bool(extra))
    assert cfg.positional_embedding_type == ("standard" if family == "gpt_neo" else "rotary")


# ---------------------------------------------------------------------- the groups, exact, and their refusals
@pytest.mark.parametrize("family", list(CONFIGS))
def test_raw_model_sites_groups_and_exact_random_intertwiner(family, raw):
    model = raw(family)
    before, smap, got = mapped(model)
    assert got["resid"] == {"permutation"} and got["blocks.mlp"] == {MLP[family]} and got["blocks.attn.ov"] == {"gl"}
    assert sum(s.name.startswith("blocks.0.attn.ov.") for s in smap) == KV.get(family, 4)
    if family == "gpt_neo":  # learned positions: scores q·kᵀ, any A per head
        assert got["blocks.attn.qk"] == {"gl"} and not smap.skipped
    else:
        assert got["blocks.attn.qk"] == {"rotary"} and smap["blocks.0.attn.qk.0"].group.pairs == PAIRS[family]
        assert not smap.skipped
    if family == "nemotron":
        assert any("folded means w = 0" in n for n in smap["resid"].notes)
    new, t = wb.random_intertwiner(model, seed=1)
    assert type(new) is type(model) and set(t.elements) == set(smap.names)
    assert rel(logp(new), logp(model)) <= TOL
    if family == "gpt_neo":  # Hugging Face's own forward, q·k in float32
        assert rel(logp(new, own=True), logp(model, own=True)) <= NEO_FLOOR
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is untouched
    report = wb.verify(model, new, IDS, transform=t)
    assert report.passed and report.compared == "log-probabilities", report.summary()
    assert report.representations_moved, report.to_frame()
    assert (report.floor is not None) == (family == "gpt_neo")  # GPT-Neo: a float32 floor, measured by verify


@pytest.mark.parametrize("family", list(CONFIGS))
def test_negative_controls_one_step_outside_each_group(family, raw):
    """A stream map, a rotary map and an MLP map each one step larger than the derived group change the function
    (computed directly); the tool grants none of them without allow_non_symmetry. (A tied LayerNorm stream's exact
    group is s·P: a sign per coordinate is still outside it.)"""
    model = raw(family)
    ref = logp(model)
    smap = wb.symmetry_map(model)
    for site in ["resid", "blocks.0.attn.qk.0", "blocks.1.mlp"]:
        if site not in smap.names or smap[site].group.name not in LARGER:
            continue  # GPT-Neo's QK is GL, every invertible map
        larger = LARGER[smap[site].group.name]
        with pytest.raises(ValueError, match="not a symmetry"):
            wb.random_intertwiner(model, sites=[site], group=larger)
        new, t = wb.random_intertwiner(model, seed=3, sites=[site], group=larger, allow_non_symmetry=True)
        assert rel(logp(new), ref) > FAIL, (site, larger)
        assert not wb.verify(model, new, IDS, transform=t).passed


def test_nemotron_relu_squared_reader_takes_d_to_the_minus_two(raw):
    """ReLU² is positively homogeneous of degree 2: a hidden element D₊·P moves up_proj rows by D·P and down_proj
    columns by (D²·P)⁻¹ (read from the new weights); the ReLU rule D⁻¹, applied here by hand, changes the function,
    and so does a negative scale (refused as outside the group)."""
    model = raw("nemotron")
    new, t = wb.random_intertwiner(model, seed=5, sites=["blocks.0.mlp"])
    M = t.elements["blocks.0.mlp"].matrix()
    d = M.abs().sum(1)
    assert (d > 0).all() and (d - 1).abs().max() > 0.1  # a nontrivial positive scaling
    a, b = model.model.layers[0].mlp, new.model.layers[0].mlp
    assert torch.allclose(b.up_proj.weight, M @ a.up_proj.weight, rtol=0, atol=1e-12)
    assert torch.allclose(b.down_proj.weight, a.down_proj.weight @ torch.linalg.inv(M ** 2), rtol=0, atol=1e-12)
    assert rel(logp(new), logp(model)) <= TOL
    wrong = copy.deepcopy(new)
    with torch.no_grad():
        wrong.model.layers[0].mlp.down_proj.weight.copy_(a.down_proj.weight @ torch.linalg.inv(M))
    assert rel(logp(wrong), logp(model)) > FAIL


def _conformal(dh, pairs, g):
    """A QK element for rotary ``pairs``: a scalar times a 2-D rotation on each pair, any GL on the other dimensions."""
    A = torch.zeros(dh, dh, dtype=F64)
    for i, j in pairs:
        s, th = math.exp(0.3 * torch.randn(1, generator=g, dtype=F64).item()), 6.0 * torch.rand(1, generator=g).item()
        A[[i, i, j, j], [i, j, i, j]] = s * torch.tensor([math.cos(th), -math.sin(th), math.sin(th), math.cos(th)], dtype=F64)
    rest = [k for k in range(dh) if all(k not in p for p in pairs)]
    A[[[k] for k in rest], rest] = torch.eye(len(rest), dtype=F64) + 0.5 * torch.randn(len(rest), len(rest), generator=g, dtype=F64)
    return A


def _move_qk(model, A):
    """q rows of every head by A, k rows by A⁻ᵀ, in every layer (GPT-J: 4 heads, no GQA, no biases)."""
    new = copy.deepcopy(model)
    with torch.no_grad():
        for blk in new.transformer.h:
            q, k = blk.attn.q_proj.weight.view(4, 8, 32), blk.attn.k_proj.weight.view(4, 8, 32)
            q.copy_(A @ q)
            k.copy_(torch.linalg.inv(A).T @ k)
    return new


def test_gptj_rotary_pairs_are_measured_through_float32_attention(raw, monkeypatch):
    """GPT-J rotates interleaved pairs (rotate_every_two: (2i, 2i + 1)) within the first rotary_dim dimensions. The
    map measures those pairs, then checks a random element commuting with them through a TransformerLens bridge,
    whose eager attention is Hugging Face's: it casts q and k to float32, so the pattern moves by ~1e-7 from rounding.
    That is judged against the rounding the same attention shows for q·c, k/c (no change to any score): within 10³×
    of it, the pairs hold (they were skipped before, against a fixed 1e-9). Computed here: the conformal group on
    those pairs (GL beyond) is exact, the halves pairing is not; the map's rotary sites and a random element of every
    site are exact; and with the eager attention given its formula in float64 the same pairs are measured."""
    model = raw("gptj")
    smap = wb.symmetry_map(model)
    assert not smap.skipped and kinds(smap)["blocks.attn.qk"] == {"rotary"}
    assert smap["blocks.0.attn.qk.0"].group.pairs == ((0, 1), (2, 3))
    new, _ = wb.random_intertwiner(model, seed=2)
    assert rel(logp(new), logp(model)) <= TOL
    g = torch.Generator().manual_seed(7)
    assert rel(logp(_move_qk(model, _conformal(8, ((0, 1), (2, 3)), g))), logp(model)) <= TOL
    assert rel(logp(_move_qk(model, _conformal(8, ((0, 2), (1, 3)), g))), logp(model)) > FAIL  # rotate_half's pairs

    from transformers.models.gptj import modeling_gptj

    from workbench.symmetry import _rotary_pairs

    def eager64(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        w = query @ key.transpose(2, 3) * scaling + (0 if attention_mask is None else attention_mask)
        w = w.softmax(-1)
        return (w @ value).transpose(1, 2).contiguous(), w

    monkeypatch.setattr(modeling_gptj, "eager_attention_forward", eager64)
    monkeypatch.setattr(_rotary_pairs, "_PAIRS", {})  # measured pairs are kept per configuration: measure again
    assert wb.symmetry_map(model)["blocks.0.attn.qk.0"].group.pairs == ((0, 1), (2, 3))


# Configuration switches inside each family that change what a forward computes.
VARIANTS = [
    ("gptj", dict(activation_function="relu")), ("gptj", dict(tie_word_embeddings=True)),
    ("stablelm", dict(use_parallel_residual=True)), ("stablelm", dict(use_qkv_bias=True)),
    ("stablelm", dict(tie_word_embeddings=True)), ("stablelm", dict(hidden_act="relu")),
    ("stablelm", dict(rope_parameters={"rope_theta": 10000.0, "rope_type": "default", "partial_rotary_factor": 0.5})),
    ("starcoder2", dict(use_bias=False)), ("starcoder2", dict(tie_word_embeddings=False)),
    ("starcoder2", dict(hidden_act="relu")), ("nemotron", dict(attention_bias=True, mlp_bias=True)),
    ("nemotron", dict(hidden_act="relu")), ("nemotron", dict(num_key_value_heads=1, head_dim=16)),
    ("nemotron", dict(tie_word_embeddings=True)), ("gpt_neo", dict(activation_function="relu")),
    ("gpt_neo", dict(tie_word_embeddings=False)),
]


@pytest.mark.parametrize("family,extra", VARIANTS, ids=[f"{f}-{'-'.join(map(str, e))}" for f, e in VARIANTS])
def test_configuration_variants_are_exact(family, extra):
    """Each switch, one at a time: the derived MLP group (a ReLU takes P·D₊, a gated MLP D·P on its up branch
    whatever its activation), and a random element of every site preserves log-probabilities in float64."""
    model = build(family, kw=dict(CONFIGS[family][1], **extra))
    smap = wb.symmetry_map(model)
    relu = "relu" in (extra.get("hidden_act"), extra.get("activation_function"))
    want = "diagonal_permutation" if family == "stablelm" else "scaled_permutation" if relu else MLP[family]
    assert kinds(smap)["blocks.mlp"] == {want}
    assert all(why.startswith("one key/value head") for _, why in smap.skipped), smap.skipped  # MQA: said, not a loss
    if "rope_parameters" in extra:
        assert smap["blocks.0.attn.qk.0"].group.pairs == ((0, 2), (1, 3))
    new, _ = wb.random_intertwiner(model, seed=4)
    assert rel(logp(new), logp(model)) <= TOL


@pytest.mark.parametrize("family", list(CONFIGS))
def test_fold_layernorm_then_the_folded_group(family, raw):
    """Folding moves every gain into its readers (GPT-J's one norm into attention and MLP; Nemotron's 1 + w,
    leaving w = 0; a tied model is untied first, as it says): same function, the folded stream's group
    s·R·(I + 1aᵀ) sampled as R fixing 1 is exact; a Haar rotation (moving the mean) is not."""
    model = raw(family)
    f = wb.fold_layernorm(model)
    assert type(f) is type(model) and rel(logp(f), logp(model)) <= TOL
    assert not getattr(f.config, "tie_word_embeddings", False)
    stored = [p for n, p in f.named_parameters() if p.ndim == 1 and n.endswith("weight") and ("norm" in n or "ln" in n)]
    assert stored and all(bool((p == 1 - OFFSET.get(family, 0.0)).all()) for p in stored)
    assert wb.symmetry_map(f)["resid"].group.name == "orthogonal_ones"
    new, _ = wb.random_intertwiner(f, seed=7, sites=["resid"])
    assert rel(logp(new), logp(model)) <= TOL
    new, _ = wb.random_intertwiner(f, seed=7, sites=["resid"], group="orthogonal", allow_non_symmetry=True)
    assert rel(logp(new), logp(model)) > FAIL


@pytest.mark.parametrize("family", list(CONFIGS))
def test_bridge_around_each_family_is_exact(family, raw, tmp_path_factory):
    model, report = bridged_exactly(raw(family), tmp_path_factory.getbasetemp(), logp)
    # GPT-J's and GPT-Neo's attention computes q·kᵀ in float32 inside the bridge, whose hooks see float64 values: the
    # floor is what queries·1.3 and keys÷1.3 (no score changes) move the outputs by, and a wrong element still FAILs
    assert (report.floor is not None) == (family in ("gptj", "gpt_neo")), report.summary()
    if report.floor is not None:
        assert report.tolerance < 1e-5
        bad, bt = wb.random_intertwiner(model, seed=3, sites=["resid"], group="signed_permutation", allow_non_symmetry=True)
        assert rel(logp(bad), logp(model)) > FAIL and not wb.verify(model, bad, IDS, transform=bt).passed


def test_stablelm_qk_layernorm_is_refused():
    """StableLM's qk_layernorm (a LayerNorm per head on q and k) is not derived: an empty map naming it."""
    model = build("stablelm", kw=dict(CONFIGS["stablelm"][1], qk_layernorm=True))
    smap = wb.symmetry_map(model)
    assert len(smap) == 0 and "q_layernorm" in smap.skipped[0][1]
    with pytest.raises(ValueError, match="q_layernorm"):
        wb.random_intertwiner(model)


def test_gpt_neo_float64_verify_floor_covers_its_float32_scores():
    """At hidden 256 and 4 layers, the float32 q·kᵀ inside GPT-Neo's attention moves later activations by 6e-7 under
    an exact transform, while rounding its attention's output (the floor named by module) accounts for 5e-8: verify
    FAILed the exact transform. It then measures the rounding of a trivial symmetry (queries·1.3, keys÷1.3) through
    the model and PASSes; a wrong stream element still FAILs (computed directly too)."""
    from benchmarks.coverage_text import build as build_shape

    kw = dict(hidden_size=256, num_layers=4, num_heads=4, vocab_size=1000, intermediate_size=512,
              max_position_embeddings=64, window_size=8, attention_types=[[["global", "local"], 2]])
    model = build_shape("GPTNeoForCausalLM", kw)
    ids = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    new, t = wb.random_intertwiner(model, seed=0)
    report = wb.verify(model, new, ids, transform=t, dtype=F64)
    assert report.passed and report.tolerance < 1e-5, report.summary()
    bad, bt = wb.random_intertwiner(model, seed=0, sites=["resid"], group="signed_permutation", allow_non_symmetry=True)
    with torch.no_grad():
        old = model.double()(input_ids=ids).logits.log_softmax(-1)
        moved = copy.deepcopy(bad).double()(input_ids=ids).logits.log_softmax(-1)
    assert rel(moved, old) > FAIL
    assert not wb.verify(model, bad, ids, transform=bt, dtype=F64).passed
