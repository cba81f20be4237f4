"""Transformer symmetries: every site of every supported family is exact, and non-symmetries break it.

Runs against TransformerLens 4 bridges and (in the second CI pass) 3.9's HookedTransformer.
Freshly booted models have LayerNorm gains 1 and biases 0 — degenerate, a wrong transform of the
norms could pass — so every model here gets random gains and biases first.
"""
import warnings

import pytest
import torch

import workbench as wb
from conftest import make_transformer
from workbench.groups import get_group
from workbench.symmetry._layout_push import clone
from workbench.symmetry._rotary_pairs import rotary_pairs

pytestmark = [pytest.mark.transformer, pytest.mark.filterwarnings("ignore")]

FAMILIES = {
    "gelu_ln": dict(act_fn="gelu", normalization_type="LN"),
    "relu_lnpre": dict(act_fn="relu", normalization_type="LNPre"),
    "solu": dict(act_fn="solu_ln", normalization_type="LN"),
    "attn_only": dict(attn_only=True, normalization_type=None),
    "rms_rotary": dict(act_fn="gelu", normalization_type="RMS", positional_embedding_type="rotary"),
    "gated_silu_rms_gqa": dict(act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
                               gated_mlp=True, n_key_value_heads=2),
}
RESID_GROUP = {"gelu_ln": "permutation", "relu_lnpre": "orthogonal_ones", "solu": "permutation", "attn_only": "gl",
               "rms_rotary": "signed_permutation", "gated_silu_rms_gqa": "signed_permutation"}


def randomised(model, seed=0):
    """Random norm gains and biases, in place (the model is ours)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rpartition(".")[2]
            if ".ln" in f".{name}" and leaf in ("weight", "w"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif ".ln" in f".{name}" and leaf in ("bias", "b"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def tokens(n=3, pos=10, seed=0):
    return torch.randint(0, 40, (n, pos), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return request.param, clone(randomised(make_transformer(**FAMILIES[request.param])), torch.float64)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_random_intertwiner_is_exact_and_moves_every_site(family):
    name, model = family
    before = state(model)
    smap = wb.symmetry_map(model)
    assert smap["resid"].group.name == RESID_GROUP[name]
    kinds = {s.name.split(".")[-2] if s.name.count(".") > 2 else s.name.split(".")[-1] for s in smap}
    assert {"resid", "qk", "ov"} <= kinds and ("mlp" in kinds) == (name != "attn_only")
    new, t = wb.random_intertwiner(model, seed=3)
    report = wb.verify(model, new, tokens(), transform=t)
    assert report.compared == "log-probabilities" and report.top1_agreement == 1.0
    assert report.passed, report.to_frame()
    assert report.representations_moved, report.to_frame()
    assert abs(report.kl) < 1e-6
    if report.floor is not None:  # only RMSNorm (float32 inside TransformerLens 4's native models)
        assert name.startswith(("rms", "gated")) and report.max_abs_diff > 1e-9
        assert report.max_abs_diff <= 10 * report.floor
    else:
        assert report.floor is None and report.max_abs_diff <= 1e-9
    # the original is untouched and shares no storage with the copy
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert not ptrs & {p.data_ptr() for p in new.parameters()}


def test_float32_models_pass_at_float32_tolerance(family):
    name, model = family
    m32 = clone(model, torch.float32)
    new, t = wb.random_intertwiner(m32, seed=4)
    assert wb.verify(m32, new, tokens(), transform=t).passed


def test_transform_record_replays(family, tmp_path):
    _, model = family
    new, t = wb.random_intertwiner(model, seed=5)
    t.save(tmp_path / "t.json")
    again = wb.apply_transform(model, wb.Transform.load(tmp_path / "t.json"))
    for (k, a), b in zip(new.state_dict().items(), again.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-12, rtol=0), k


def _forced(model, site, group, seed=0):
    return wb.random_intertwiner(model, seed=seed, sites=[site], group=group, allow_non_symmetry=True)


@pytest.mark.parametrize("fam", ["gelu_ln", "rms_rotary"])
def test_negative_control_invertible_map_on_normalised_stream(fam):
    model = clone(randomised(make_transformer(**FAMILIES[fam])), torch.float64)
    with pytest.raises(wb.InvalidOptionError, match="not a symmetry of site 'resid'"):
        wb.random_intertwiner(model, sites=["resid"], group="gl")
    new, t = _forced(model, "resid", "gl")
    report = wb.verify(model, new, tokens(), transform=t)
    assert not report.function_preserved and report.max_abs_diff > 1e-3


def test_negative_control_general_rotation_on_folded_layernorm():
    model = wb.fold_layernorm(clone(randomised(make_transformer(**FAMILIES["gelu_ln"])), torch.float64))
    assert wb.symmetry_map(model)["resid"].group.name == "orthogonal_ones"
    new, t = _forced(model, "resid", "orthogonal")  # R·1 ≠ 1: centring no longer commutes
    assert not wb.verify(model, new, tokens(), transform=t).function_preserved
    new, t = wb.random_intertwiner(model, seed=1, sites=["resid"])  # R·1 = 1: exact
    assert wb.verify(model, new, tokens(), transform=t).passed


def test_negative_control_positive_scaling_of_gelu_neurons():
    model = clone(randomised(make_transformer(**FAMILIES["gelu_ln"])), torch.float64)
    assert wb.symmetry_map(model)["blocks.0.mlp"].group.name == "permutation"
    new, t = _forced(model, "blocks.0.mlp", "scaled_permutation")
    assert not wb.verify(model, new, tokens(), transform=t).function_preserved
    relu = clone(randomised(make_transformer(**FAMILIES["relu_lnpre"])), torch.float64)
    new, t = wb.random_intertwiner(relu, sites=["blocks.0.mlp"], seed=2)  # the same group is exact for ReLU
    assert t.groups["blocks.0.mlp"] == "scaled_permutation" and wb.verify(relu, new, tokens(), transform=t).passed


def test_rotary_pairs_are_read_from_the_model_and_a_wrong_pairing_fails():
    model = clone(randomised(make_transformer(**FAMILIES["rms_rotary"])), torch.float64)
    pairs = rotary_pairs(model)
    dh = int(model.cfg.d_head)
    assert sorted(i for p in pairs for i in p) == list(range(dh))
    site = wb.symmetry_map(model)["blocks.0.attn.qk.1"]
    assert site.group.name == "rotary" and site.group.pairs == pairs
    # the other common layout: adjacent <-> halves
    adjacent = tuple((2 * i, 2 * i + 1) for i in range(dh // 2))
    halves = tuple((i, i + dh // 2) for i in range(dh // 2))
    wrong = halves if pairs == adjacent else adjacent
    assert wrong != pairs
    new, t = _forced(model, site.name, get_group("rotary", dh, pairs=wrong))
    assert not wb.verify(model, new, tokens(), transform=t).function_preserved
    new, t = wb.random_intertwiner(model, sites=[site.name], seed=1)
    assert wb.verify(model, new, tokens(), transform=t).passed


def test_partial_rotary_dimension_leaves_a_general_linear_block():
    model = clone(randomised(make_transformer(**FAMILIES["rms_rotary"], rotary_dim=4)), torch.float64)
    G = wb.symmetry_map(model)["blocks.1.attn.qk.0"].group
    assert len(G.pairs) == 2 and len(G.free) == 4
    new, t = wb.random_intertwiner(model, seed=6)
    assert wb.verify(model, new, tokens(), transform=t).passed


def test_fold_layernorm_preserves_function_and_enlarges_the_group():
    model = clone(randomised(make_transformer(**FAMILIES["gelu_ln"])), torch.float64)
    before = state(model)
    smap = wb.symmetry_map(model)
    assert smap["resid"].group.name == "permutation" and "fold_layernorm" in smap["resid"].notes[0]
    folded = wb.fold_layernorm(model)
    x = tokens()
    diff = (model(x).log_softmax(-1) - folded(x).log_softmax(-1)).abs().max().item()
    assert diff <= 1e-9
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert wb.symmetry_map(folded)["resid"].group.name == "orthogonal_ones"
    rms = clone(randomised(make_transformer(**FAMILIES["rms_rotary"])), torch.float64)
    assert wb.symmetry_map(wb.fold_layernorm(rms))["resid"].group.name == "orthogonal"


def test_fold_layernorm_refuses_a_plain_module_with_nothing_to_fold():
    # plain modules fold in the graph backend (tests/test_fold_vision.py); one whose only norm feeds a GELU cannot
    with pytest.raises(TypeError, match="no LayerNorm of Sequential can be folded"):
        wb.fold_layernorm(torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.GELU(), torch.nn.Linear(4, 2)))


def test_transformed_copy_has_its_own_hooks():
    model = clone(randomised(make_transformer(**FAMILIES["gelu_ln"])), torch.float64)
    model(tokens())  # a model that has run
    new, _ = wb.random_intertwiner(model, seed=0)
    seen = []
    with wb.intervene(new, {"blocks.0.hook_resid_pre": lambda x, name: seen.append(name)}):
        model(tokens())
    assert seen == []  # editing the copy's hooks does not reach the original
    with wb.intervene(new, {"blocks.0.hook_resid_pre": lambda x, name: seen.append(name)}):
        new(tokens())
    assert seen == ["blocks.0.hook_resid_pre"]


def test_copies_share_nothing_with_each_other_and_follow_their_config():
    # New bridges are deep copies of one never-run template per config: a copy that has run (and so
    # wired TransformerLens's capture hooks) must not leak into a later copy, nor either into the model.
    model = clone(randomised(make_transformer(**FAMILIES["gelu_ln"])), torch.float64)
    a, _ = wb.random_intertwiner(model, seed=0)
    a(tokens())
    b, tb = wb.random_intertwiner(model, seed=1)
    modules = [{id(m) for m in x.modules()} for x in (model, a, b)]
    assert not (modules[0] & modules[1] or modules[0] & modules[2] or modules[1] & modules[2])
    storages = [{t.untyped_storage().data_ptr() for t in [*x.parameters(), *x.buffers()] if t.numel()}
                for x in (model, a, b)]
    assert not (storages[0] & storages[1] or storages[0] & storages[2] or storages[1] & storages[2])
    names = list(wb.hook_names(a))
    seen = []
    with wb.intervene(a, {n: (lambda x, name: seen.append(name)) for n in names}):
        b(tokens())
        model(tokens())
    assert seen == []
    with wb.intervene(b, {n: (lambda x, name: seen.append(name)) for n in names}):
        b(tokens())
    assert "blocks.0.hook_resid_pre" in seen and "blocks.1.hook_resid_post" in seen
    assert wb.verify(model, b, tokens(), transform=tb).passed
    # same shapes, another activation: its own template
    relu = clone(randomised(make_transformer(**FAMILIES["relu_lnpre"])), torch.float64)
    new, t = wb.random_intertwiner(relu, seed=2)
    assert new.cfg.act_fn == "relu" and new.cfg.normalization_type == "LNPre"
    assert wb.verify(relu, new, tokens(), transform=t).passed


def test_groups_for_transformers_sample_members():
    g = torch.Generator().manual_seed(0)
    R = get_group("orthogonal_ones", 6).sample(g).matrix()
    assert torch.allclose(R @ torch.ones(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(R @ R.T, torch.eye(6, dtype=torch.float64), atol=1e-12)
    G = get_group("rotary", 6, pairs=[(0, 3), (1, 4)])
    e = G.sample(g)
    assert G.contains(e) and not G.contains(get_group("gl", 6).sample(g))
    assert get_group("orthogonal_ones", 6).contains(get_group("permutation", 6).sample(g))
    with pytest.raises(wb.InvalidOptionError, match="disjoint"):
        get_group("rotary", 4, pairs=[(0, 1), (1, 2)])


def test_interpretation_shift_mlp_neurons_relabel_but_residual_coordinates_change():
    model = wb.fold_layernorm(clone(randomised(make_transformer(**FAMILIES["gelu_ln"])), torch.float64))
    data = tokens(24, 12, seed=3)
    new, _ = wb.random_intertwiner(model, seed=1, sites=["blocks.1.mlp"])
    shift = wb.interpretation_shift(model, new, data, "blocks.1.mlp", k=8)
    assert shift.overlap_matched.min() == 1.0  # the same token contexts, relabelled
    assert shift.overlap_same_index.mean() < 0.5
    new, _ = wb.random_intertwiner(model, seed=1, sites=["resid"])  # a rotation fixing 1: exact, coordinates move
    shift = wb.interpretation_shift(model, new, data, "resid", k=8)
    assert shift.overlap_same_index.mean() < 0.3 and shift.overlap_matched.mean() < 0.5


def test_qk_norms_of_a_lens_model_leave_its_qk_spaces_alone_and_say_why():
    """TransformerLens 3's ``use_qk_norm`` puts a norm on q and k (per head or over all heads, by architecture name):
    derived here for Hugging Face's Qwen3, Gemma 3 and OLMo 2 only, so the QK sites are skipped with that reason (before, the
    rotary measurement refused them as "not 2-D rotations", which was wrong about the cause), and every other site
    is exact, computed directly. TransformerLens 4's native models build no q/k norm from this switch: their QK sites
    are read as usual."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = clone(randomised(make_transformer(**FAMILIES["gated_silu_rms_gqa"], use_qk_norm=True)), torch.float64)
    normed = any(k.endswith("attn.q_norm.w") for k in model.state_dict())
    smap = wb.symmetry_map(model)
    qk = [s.name for s in smap if ".qk." in s.name]
    if normed:
        assert not qk and smap.skipped and all("use_qk_norm" in why for _, why in smap.skipped), smap.skipped
    else:
        assert len(qk) == 4 and not smap.skipped
    new, t = wb.random_intertwiner(model, seed=5)
    with torch.no_grad():
        a, b = model(tokens()).log_softmax(-1), new(tokens()).log_softmax(-1)
    if normed:  # TransformerLens 3 computes its RMSNorms in the model's dtype: exact (4's native ones round in float32)
        assert float(((a - b).abs() / a.abs().amax(-1, keepdim=True)).max()) <= 1e-10
    assert wb.verify(model, new, tokens(), transform=t).passed


def test_alibi_lens_model_has_no_head_permutations_and_is_exact():
    """ALiBi (TransformerLens 3's positional_embedding_type="alibi", BLOOM's): a bias m_h·(j − i) on head h's scores,
    moved by no channel map (QK stays GL) but tied to the head's index, so heads are not permuted (the map says why);
    every other site is exact, computed directly. TransformerLens 4's native models have no ALiBi (it refuses to build
    one); its Hugging Face BLOOM is tests/test_hf_bloom.py."""
    from conftest import has_hooked_transformer

    kw = dict(act_fn="gelu", normalization_type="LN", positional_embedding_type="alibi")
    if not has_hooked_transformer():
        with pytest.raises(ValueError, match="alibi"):
            make_transformer(**kw)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = clone(randomised(make_transformer(**kw)), torch.float64)
    smap = wb.symmetry_map(model)
    assert not any(".heads" in s.name for s in smap) and {s.name.split(".")[-2] for s in smap if ".qk." in s.name} == {"qk"}
    assert smap.skipped and all(why.startswith("ALiBi gives each head its own slope") for _, why in smap.skipped)
    new, t = wb.random_intertwiner(model, seed=2)
    with torch.no_grad():
        a, b = model(tokens()).log_softmax(-1), new(tokens()).log_softmax(-1)
    assert float(((a - b).abs() / a.abs().amax(-1, keepdim=True)).max()) <= 1e-10
    assert wb.verify(model, new, tokens(), transform=t).passed
