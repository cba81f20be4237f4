"""TransformerLens configuration switches against the symmetry map, the transform and verify, checked directly.

Each model is small (d_model 32, 2 layers), random and float64, with every parameter that a fresh model holds constant
(norm gains, biases, attention sinks) made random, so that a weight the transform forgets to move shows. Function
preservation is computed here (log-probabilities of both models, relative 1e-10), never by asking ``wb.verify``.
Runs on TransformerLens 4's native bridges and, in the second pass, on 3.9's HookedTransformer; a switch that one
version does not build is checked for what that version does with it.
"""
import warnings

import pytest
import torch

import workbench as wb
from conftest import has_hooked_transformer, make_transformer
from workbench.symmetry._layout_push import clone

pytestmark = [pytest.mark.transformer, pytest.mark.filterwarnings("ignore")]

TOL = 1e-10
ROTARY_RMS = dict(normalization_type="RMS", positional_embedding_type="rotary")


def randomised(model, seed=0):
    """Every parameter a fresh model holds constant (all ones: a gain; all zeros: a bias, a sink) made random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.numel() and bool((p == 1).all()):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif p.numel() and bool((p == 0).all()):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def built(seed=0, **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return clone(randomised(make_transformer(**cfg), seed), torch.float64)


def tokens(n=3, pos=10, seed=0):
    return torch.randint(0, 40, (n, pos), generator=torch.Generator().manual_seed(seed))


def rel(model, new, x=None):
    """The largest difference of the two models' log-probabilities, relative to each row's largest magnitude."""
    x = tokens() if x is None else x
    with torch.no_grad():
        a, b = model(x).log_softmax(-1), new(x).log_softmax(-1)
    return float(((a - b).abs() / a.abs().amax(-1, keepdim=True)).max())


def exact(model, seed=3):
    """A random element of the map's groups: the function is preserved (computed here) and verify says so."""
    new, t = wb.random_intertwiner(model, seed=seed)
    assert rel(model, new) <= TOL
    report = wb.verify(model, new, tokens(), transform=t)
    assert report.passed, report.to_frame()
    return new, t


def test_lens_switches_that_are_not_derived_are_refused_by_name():
    """TransformerLens 3's clip_qkv clamps q, k and v coordinatewise (the QK and OV maps do not commute with it: a GL
    element changed the log-probabilities by 0.12) and its mixture of experts keeps its experts outside the canonical
    layout (the map raised KeyError 'blocks.0.mlp.W_in'; a float64 copy kept the experts in float32, so even measuring
    the rotary pairs failed in the model's own forward): each refuses the whole model by name, as Hugging Face OLMo's
    clip_qkv is, and a transform raises that reason. Shortformer positions were already in the map's reason but a
    transform returned an unchanged copy; it raises now too. TransformerLens 4's native models take neither switch
    (clip_qkv is no config field; num_experts builds a dense MLP, read as usual)."""
    cases = {"shortformer": (dict(positional_embedding_type="shortformer"), "shortformer")}
    if has_hooked_transformer():
        cases["clip_qkv"] = (dict(clip_qkv=0.05), "clip_qkv=0.05")
        cases["moe"] = (dict(num_experts=4, experts_per_token=2, gated_mlp=True, act_fn="silu", **ROTARY_RMS), "num_experts=4")
    else:
        with pytest.raises(TypeError, match="clip_qkv"):
            make_transformer(clip_qkv=0.05)
        with pytest.raises(ValueError, match="shortformer"):
            make_transformer(positional_embedding_type="shortformer")
        del cases["shortformer"]
        dense = built(num_experts=4, experts_per_token=2, gated_mlp=True, act_fn="silu")
        assert not any("experts" in k for k in dense.state_dict())
        exact(dense)
    for label, (cfg, why) in cases.items():
        model = built(**cfg)
        smap = wb.symmetry_map(model)
        assert len(smap) == 0 and why in smap.skipped[0][1], (label, smap.skipped)
        with pytest.raises(wb.UnsupportedModelError, match=why):
            wb.random_intertwiner(model, seed=0)


def test_a_float64_copy_of_a_lens_mixture_of_experts_is_float64_throughout():
    """Rebuilding a model in another dtype cast it only when its first parameter was of another dtype: TransformerLens
    3's experts and router (nn.Linear, made in the default dtype whatever cfg.dtype says) stayed float32 inside a
    float64 copy, whose forward then failed."""
    cfg = dict(num_experts=4, experts_per_token=2, gated_mlp=True, act_fn="silu")
    model = clone(make_transformer(**cfg), torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    with torch.no_grad():
        assert model(tokens()).dtype == torch.float64


@pytest.mark.parametrize("kv", [None, 2])
def test_attention_sinks_move_with_their_heads(kv):
    """TransformerLens 3's use_attention_sinks (GPT-OSS's) gives each query head a learned logit in its softmax: a head
    permutation that left the sinks in place changed the log-probabilities by 8e-3 (4e-2 under grouped-query
    attention), which verify FAILed as a transform the map had claimed. The sinks now move with their heads; the
    negative control puts the original's sinks back into the transformed copy, which must change the function.
    TransformerLens 4's native models have no sinks (no such config field)."""
    if not has_hooked_transformer():
        with pytest.raises(TypeError, match="use_attention_sinks"):
            make_transformer(use_attention_sinks=True)
        return
    model = built(use_attention_sinks=True, n_key_value_heads=kv)
    new, t = exact(model)
    sinks = [k for k in model.state_dict() if k.endswith("attn.sinks")]
    assert sinks and any(not torch.equal(model.state_dict()[k], new.state_dict()[k]) for k in sinks)
    with torch.no_grad():
        for k in sinks:
            new.get_parameter(k).copy_(model.get_parameter(k))
    assert rel(model, new) > 1e-4


@pytest.fixture
def rms_in_float64(monkeypatch):
    """TransformerLens 4's native RMSNorm computes in float32 (as Hugging Face's does), so no float64 comparison of its
    models goes below ~1e-7; patched to compute in the input's dtype (the same function), an exact symmetry is exact to
    1e-10 and any other changes the function by far more."""
    if not has_hooked_transformer():
        from transformer_lens.model_bridge.sources.native import model as native

        monkeypatch.setattr(native.NativeRMSNorm, "forward",
                            lambda self, x: self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)))


def _forced(model, site, group, seed=0):
    return wb.random_intertwiner(model, seed=seed, sites=[site], group=group, allow_non_symmetry=True)


# final_rms: the final norm is an RMSNorm whatever the blocks' are; TransformerLens 4 gives it a gain even with no block
# norms, TransformerLens 3 builds no final norm then
FINAL_RMS_GROUP = {None: ("gl", "signed_permutation"), "LN": "permutation", "LNPre": "orthogonal_ones",
                   "RMS": "signed_permutation", "RMSPre": "orthogonal"}


@pytest.mark.parametrize("norm", list(FINAL_RMS_GROUP))
def test_final_rms_norm_bounds_the_stream_group(norm, rms_in_float64):
    """With normalization_type=None and final_rms=True, TransformerLens 4's native model ends in an RMSNorm with a gain,
    but the map gave the stream GL (from the blocks' None): a random element changed the log-probabilities by 2.4. The
    stream now takes what every norm on it passes; an element of the next larger group (GL) must change the function."""
    model = built(normalization_type=norm, final_rms=True)
    want = FINAL_RMS_GROUP[norm]
    want = want if isinstance(want, str) else want[not has_hooked_transformer()]
    resid = wb.symmetry_map(model)["resid"]
    assert resid.group.name == want
    exact(model)
    if want != "gl":
        new, _ = _forced(model, "resid", "gl")
        assert rel(model, new) > 1e-3
    if norm is None and want == "signed_permutation":  # folded: the final norm's gain in the unembedding, any rotation
        folded = wb.fold_layernorm(model)
        assert rel(model, folded) <= TOL and wb.symmetry_map(folded)["resid"].group.name == "orthogonal"
        exact(folded)
        new, _ = _forced(folded, "resid", "gl")
        assert rel(folded, new) > 1e-3


def test_verify_measures_a_float32_final_rms_norm_as_the_floor():
    """TransformerLens 4's final_rms RMSNorm computes in float32 under LayerNorm blocks: verify rounded the stream only
    where normalization_type said RMS, so an exact transform of a float64 model FAILed (7e-8 against 1e-10). It now
    rounds the final norm's input; a non-symmetry still FAILs. TransformerLens 3 computes it in float64: exact."""
    model = built(normalization_type="LN", final_rms=True)
    new, t = wb.random_intertwiner(model, seed=3)
    d = rel(model, new)
    assert d <= (TOL if has_hooked_transformer() else 1e-6)
    assert wb.verify(model, new, tokens(), transform=t).passed
    bad, tb = _forced(model, "resid", "gl")
    assert not wb.verify(model, bad, tokens(), transform=tb).passed


@pytest.mark.parametrize("norm", ["LN", "LNPre", "RMS", "RMSPre", None])
def test_post_embedding_layernorm_moves_with_the_stream(norm, rms_in_float64):
    """TransformerLens 3's post_embedding_ln (a LayerNorm with gain and bias on the token embedding, whatever the
    blocks' norms) was not read as a norm on the stream: its gain and bias stayed while the stream was permuted
    (log-probabilities off by 0.26), and under RMS or LNPre blocks the stream kept signed permutations or rotations
    that a LayerNorm with a gain does not pass. It is now the embedding norm on the stream (as BLOOM's): the stream
    takes permutations, and a signed permutation (the next larger group under RMS blocks) must change the function.
    TransformerLens 4's native models build no such norm."""
    model = built(normalization_type=norm, post_embedding_ln=True)
    if not has_hooked_transformer():
        assert not any("embed" in k and "ln" in k for k in model.state_dict())
        exact(model)
        return
    assert wb.symmetry_map(model)["resid"].group.name == "permutation"
    exact(model)
    new, _ = _forced(model, "resid", "signed_permutation")
    assert rel(model, new) > 1e-3


@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_gated_solu_ln_mlp_is_read_as_transformer_lens_runs_it(norm, rms_in_float64):
    """TransformerLens 3's gated MLP with act_fn="solu_ln" runs LN(solu(x·W_gate))·W_out (a LayerNormPre under other
    block norms) and never reads W_in: the map gave it a gated MLP's P·D (a random element changed the log-probabilities
    by 0.64) and verify raised UnknownNameError on hook_pre_linear, which never fires. It is now SoLU's permutation site
    on the gate; a positive scaling (SoLU's softmax is not scale-equivariant) and the old P·D must change the function.
    TransformerLens 4's gated MLP bridge puts no norm there: act(gate) ⊙ up, with its P·D."""
    model = built(act_fn="solu_ln", gated_mlp=True, normalization_type=norm)
    site = wb.symmetry_map(model)["blocks.0.mlp"]
    exact(model)
    if not has_hooked_transformer():
        assert site.group.name == "diagonal_permutation"
        new, _ = _forced(model, "blocks.0.mlp", "gl")
        assert rel(model, new) > 1e-3
        return
    assert site.group.name == "permutation"
    for bigger in ("scaled_permutation", "diagonal_permutation"):
        new, _ = _forced(model, "blocks.0.mlp", bigger)
        assert rel(model, new) > 1e-3, bigger


@pytest.mark.parametrize("kv", [2, 1])
def test_ungrouped_query_attention_is_observed_at_its_repeated_heads(kv):
    """TransformerLens 3's ungroup_grouped_query_attention repeats each key/value head for its query heads before
    hook_k and hook_v: the stored weights keep n_key_value_heads heads (the transform is the grouped one, exact), but
    verify observed hook_k/hook_v as n_key_value_heads wide and raised InvalidOptionError ('a permutation of 2 head
    groups of 1 does not fit an axis of 4 heads'). It observes them at the repeated heads now, every site checked.
    TransformerLens 4's native models have no such switch."""
    if not has_hooked_transformer():
        with pytest.raises(TypeError, match="ungroup_grouped_query_attention"):
            make_transformer(n_key_value_heads=kv, ungroup_grouped_query_attention=True)
        return
    model = built(n_key_value_heads=kv, ungroup_grouped_query_attention=True, **ROTARY_RMS)
    new, t = wb.random_intertwiner(model, seed=3)
    assert rel(model, new) <= TOL
    report = wb.verify(model, new, tokens(), transform=t)
    frame = report.to_frame()
    qk = frame[frame.site.str.contains(r"\.qk\.|\.heads")]
    assert report.passed and len(qk) and (qk.equivariance_error <= TOL).all(), frame
    with torch.no_grad():  # the keys of one key/value head moved without their queries: the function and the QK site change
        new.get_parameter("blocks.0.attn._W_K")[0].mul_(2.0)
    assert rel(model, new) > 1e-6 and not wb.verify(model, new, tokens(), transform=t).passed


def test_tie_word_embeddings_in_a_lens_config_ties_nothing_and_the_shear_note_holds():
    """A TransformerLens model with tie_word_embeddings=True keeps W_E and W_U apart (wb.untie_embeddings says so), but
    the map's note said the exact group was s·P, leaving out the shear I + 1·aᵀ that every mean-subtracting reader
    passes. Computed here: a shear of the stream (every writer's output plus (x·a)·1, readers unchanged) is exact."""
    from workbench.models import read_weights, rebuild

    model = built(tie_word_embeddings=True)
    W = read_weights(model)
    assert W["embed.W_E"].data_ptr() != W["unembed.W_U"].data_ptr()
    notes = " ".join(wb.symmetry_map(model)["resid"].notes)
    assert "shear" in notes and "tied embeddings" not in notes
    a = torch.randn(32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    W = {k: v.clone() for k, v in W.items()}
    for k in W:
        if k in ("embed.W_E", "pos_embed.W_pos") or k.endswith(("attn.W_O", "attn.b_O", "mlp.W_out", "mlp.b_out")):
            W[k] = W[k] + (W[k] @ a)[..., None]  # x ↦ x + (x·a)·1 on the d_model axis (the last)
    assert rel(model, rebuild(model, W)) <= TOL
