"""Symmetry maps, random intertwiners and verification on MLPs and CNNs (paper §3)."""
import copy

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import workbench as wb
from workbench._errors import InvalidOptionError
from models import TinyResNet, cnn, mlp, randomise

matplotlib.use("Agg")

# Every catalogue activation as a module, with an input scale that keeps values finite.
ACTIVATIONS = {
    "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.1), "prelu": lambda: nn.PReLU(init=0.2),
    "gelu": nn.GELU, "silu": nn.SiLU, "mish": nn.Mish, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus,
    "elu": nn.ELU, "selu": nn.SELU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "tanh": nn.Tanh,
    "hardtanh": nn.Hardtanh, "softsign": nn.Softsign, "identity": nn.Identity,
    "gaussian": lambda: wb.groups.Activation("gaussian"), "cube": lambda: wb.groups.Activation("x^3"),
    "square": lambda: wb.groups.Activation("x^2"),
}
SMALL_DEPTH = {"cube", "square"}  # polynomials grow fast: keep them shallow so values stay finite


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ maps
def test_mlp_sites_follow_the_catalogue():
    model = mlp([6, 5, 4], nn.ReLU)
    model[3] = nn.GELU()
    model[5] = nn.Tanh()
    smap = wb.symmetry_map(model)
    assert [(s.name, s.n, s.group.name) for s in smap] == [
        ("1", 6, "scaled_permutation"), ("3", 5, "permutation"), ("5", 4, "signed_permutation")]
    site = smap["1"]
    assert [p.name for p in site.writers] == ["0"] and [p.name for p in site.readers] == ["2"]
    assert smap.skipped == [("6", "the model's output")]
    frame = smap.to_frame()
    assert list(frame.site) == ["1", "3", "5"] and frame.privileged.all()
    assert "Skipped" in smap._repr_html_() and "3 sites" in repr(smap)
    assert isinstance(smap.plot(), matplotlib.axes.Axes)


def test_linear_layers_without_activation_form_a_continuous_site():
    model = randomise(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2)))
    smap = wb.symmetry_map(model)
    assert smap["0"].group.name == "gl" and not smap["0"].privileged
    assert "a linear site" in smap["0"].notes[0]


def test_batchnorm_and_pooling_constrain_the_group():
    model = cnn([4, 5], nn.Tanh, pool="max")
    smap = wb.symmetry_map(model)
    first = smap[0]
    assert first.group.name == "permutation"  # tanh allows sign flips, max pooling does not
    assert any("max pooling" in n for n in first.notes)
    assert smap[1].group.name == "signed_permutation"  # no pool after the second block
    assert [p.level for p in first.writers] == ["prebn"] and first.writers[0].norm == "1"
    avg = wb.symmetry_map(cnn([4, 5], nn.ReLU, pool="avg"))
    assert all(s.group.name == "scaled_permutation" for s in avg)


def test_flatten_after_conv_reads_blocks_of_features():
    model = cnn([4], nn.ReLU, pool=None)
    site = wb.symmetry_map(model)[0]
    assert [(p.name, p.block) for p in site.readers] == [("4", 64)]  # 8×8 positions per channel
    new, t = wb.random_intertwiner(model, seed=1)
    assert wb.verify(model, new, torch.randn(6, 3, 8, 8), transform=t).passed


def test_resnet_stage_is_one_site_shared_by_blocks_and_shortcuts():
    model = randomise(TinyResNet("basic"))
    smap = wb.symmetry_map(model)
    stage1 = next(s for s in smap if "layer1.0.conv1" in [p.name for p in s.readers])
    assert {p.name for p in stage1.writers} == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
    assert {p.name for p in stage1.readers} == {"layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1",
                                                "layer2.0.downsample.0"}
    stage2 = next(s for s in smap if "fc" in [p.name for p in s.readers])
    assert {"layer2.0.downsample.0", "layer2.0.conv2", "layer2.1.conv2"} == {p.name for p in stage2.writers}
    assert len(smap) == 2 + 4  # two stages, one free site inside each block
    # the reused self.relu: its first call is the free site, its second call observes the stage
    inner = smap["layer1.0.relu"]
    assert {p.name for p in inner.writers} == {"layer1.0.conv1"}
    assert ("layer1.0.relu", 1) in [(o.name, o.call) for o in stage1.observed]


def test_bottleneck_blocks_and_projection_shortcuts():
    model = randomise(TinyResNet("bottleneck"))
    new, t = wb.random_intertwiner(model, seed=0)
    report = wb.verify(model, new, torch.randn(4, 3, 8, 8), transform=t, dtype=torch.float64)
    assert report.passed and report.representations_moved, report.to_frame()
    assert len(t.elements) == 3 + 2 * 3  # stem, two stages, two free sites in each of three blocks


def test_zero_padding_shortcut_couples_stages():
    model = randomise(TinyResNet("option_a"))
    smap = wb.symmetry_map(model)
    host = next(s for s in smap if s.embeds)
    parent, start, count, _ = host.embeds[0]
    assert (start, count) == (2, 4) and parent is not None
    new, t = wb.random_intertwiner(model, seed=2)
    M = t.elements[host.name].matrix()
    P = t.elements[parent].matrix()
    torch.testing.assert_close(M[2:6, 2:6], P)  # the embedded block carries the previous stage's element
    assert M[2:6, :2].abs().sum() == 0 and M[:2, 2:6].abs().sum() == 0  # unmixed with the new channels
    assert wb.verify(model, new, torch.randn(3, 3, 8, 8), transform=t, dtype=torch.float64).passed


def test_unknown_ops_are_skipped_with_a_reason_and_never_transformed():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)
            self.act = nn.ReLU()
            self.norm = nn.RMSNorm(6)  # not understood by the graph rules (LayerNorm and GroupNorm now are)
            self.c, self.out = nn.Linear(6, 5), nn.Linear(5, 2)

        def forward(self, x):
            h = torch.maximum(self.a(x), torch.sigmoid(self.b(x)))  # an op the rules do not know
            return self.out(self.act(self.c(self.norm(h))))

    model = randomise(Gated())
    smap = wb.symmetry_map(model)
    assert [s.name for s in smap] == ["act"]
    reasons = dict(smap.skipped)
    assert "maximum is not understood" in reasons["a"] and "RMSNorm" in reasons["norm"]
    new, t = wb.random_intertwiner(model, seed=0)
    for name in ["a.weight", "b.weight", "norm.weight"]:
        assert torch.equal(model.state_dict()[name], new.state_dict()[name])
    assert wb.verify(model, new, torch.randn(8, 4), transform=t).passed


def test_untraceable_model_gets_no_sites_and_says_why():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x) if x.sum() > 0 else x

    smap = wb.symmetry_map(Branchy())
    assert len(smap) == 0 and "torch.fx could not trace" in smap.skipped[0][1]


def test_functional_activations_and_methods_are_understood():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 5), nn.Linear(5, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.c(F.gelu(self.b(self.a(x).relu())))

    model = randomise(Functional())
    assert [(s.n, s.group.name) for s in wb.symmetry_map(model)] == [(5, "scaled_permutation"), (4, "permutation")]
    new, t = wb.random_intertwiner(model, seed=0)
    assert wb.verify(model, new, torch.randn(4, 3), transform=t, dtype=torch.float64).passed


# ------------------------------------------------------------------ transforms
def test_random_intertwiner_never_mutates_and_is_seeded():
    model = cnn([4, 6], nn.ReLU)
    before = state(model)
    a, ta = wb.random_intertwiner(model, seed=5)
    b, tb = wb.random_intertwiner(model, seed=5)
    c, tc = wb.random_intertwiner(model, seed=6)
    assert same_state(before, state(model))
    assert same_state(state(a), state(b)) and not same_state(state(a), state(c))
    assert ta.seed == 5 and "seed 5" in repr(ta)


def test_transform_saves_loads_and_replays(tmp_path):
    model = randomise(TinyResNet("basic"))
    new, t = wb.random_intertwiner(model, seed=3)
    t.save(tmp_path / "t.json")
    replayed = wb.apply_transform(model, wb.Transform.load(tmp_path / "t.json"))
    assert same_state(state(new), state(replayed))
    other = mlp([4], nn.ReLU)
    with pytest.raises(KeyError, match="no site named"):
        wb.apply_transform(other, t)


def test_scale_sigma_controls_the_scalings():
    model = mlp([64], nn.ReLU)
    _, small = wb.random_intertwiner(model, seed=0, scale_sigma=0.01)
    _, large = wb.random_intertwiner(model, seed=0, scale_sigma=1.0)
    assert small.elements["1"].scale.log().std() < 0.05 < large.elements["1"].scale.log().std()


@pytest.mark.parametrize("act, group", [
    (nn.ReLU, "orthogonal"),  # a rotation at a ReLU site
    (nn.GELU, "scaled_permutation"),  # positive scalings at a GELU site
    (nn.Tanh, "gl"),  # a general linear map at a tanh site
    (nn.ReLU6, "scaled_permutation"),  # ReLU6 is not positively homogeneous
])
def test_negative_controls_change_the_function(act, group):
    model = mlp([6, 6], act)
    site = wb.symmetry_map(model)[0].name
    with pytest.raises(ValueError, match=f"{group} is not a symmetry of site '{site}'.*allow_non_symmetry=True"):
        wb.random_intertwiner(model, sites=[site], group=group)
    new, t = wb.random_intertwiner(model, sites=[site], group=group, allow_non_symmetry=True, scale_sigma=1.0)
    x = 10 * torch.randn(64, 5, generator=torch.Generator().manual_seed(0))  # reach ReLU6's saturation
    report = wb.verify(model, new, x, transform=t)
    assert not report.passed and report.max_rel_diff > 1e-3, report
    assert t.forced == [site]


def test_a_subgroup_is_allowed_without_the_flag():
    model = mlp([6], nn.ReLU)
    new, t = wb.random_intertwiner(model, group="permutation")
    assert t.elements["1"].scale is None
    assert wb.verify(model, new, torch.randn(4, 5), transform=t).passed


def test_verify_restores_modes_and_reports():
    model = cnn([4], nn.ReLU).train()
    new, t = wb.random_intertwiner(model, seed=0)
    new.train()
    report = wb.verify(model, new, torch.randn(4, 3, 8, 8), transform=t)
    assert model.training and new.training
    assert report.passed and report.top1_agreement == 1.0
    assert "PASS" in report._repr_html_() and isinstance(report.plot(), matplotlib.axes.Axes)
    assert list(report.to_frame().columns) == ["site", "group", "equivariance_error", "representation_change",
                                               "observations"]


def test_affine_extension_for_sigmoid():
    model = mlp([6, 5], nn.Sigmoid)
    linear = wb.symmetry_map(model)
    assert all(s.group.name == "permutation" and not s.affine for s in linear)
    affine = wb.symmetry_map(model, affine=True)
    assert all(s.group.name == "affine_signed_permutation" and s.affine for s in affine)
    new, t = wb.random_intertwiner(model, seed=4, affine=True)
    assert any((e.scale < 0).any() for e in t.elements.values())  # some sign flips really happened
    report = wb.verify(model, new, torch.randn(16, 5), transform=t, dtype=torch.float64)
    assert report.passed, report.to_frame()
    # Without the offsets absorbed by the readers' biases, the same sign flips change the function: a linear
    # replay refuses them (not in the linear map's group), and forced (the negative control) they break it.
    with pytest.raises(InvalidOptionError, match="not in the site's group permutation"):
        wb.apply_transform(model, wb.Transform(t.elements, t.groups, seed=4, model=t.model, affine=False))
    flips = wb.Transform(t.elements, t.groups, forced=list(t.elements), seed=4, model=t.model, affine=False)
    broken = wb.apply_transform(model, flips)
    assert not wb.verify(model, broken, torch.randn(16, 5)).function_preserved


def test_affine_extension_is_off_where_readers_cannot_absorb_a_constant():
    model = cnn([4, 4], nn.Sigmoid, pool=None)  # 3×3 convs with zero padding read the space
    smap = wb.symmetry_map(model, affine=True)
    assert not smap[0].affine and "affine extension off" in smap[0].notes[0]


# ------------------------------------------------------------------ properties over random architectures
@st.composite
def architectures(draw):
    kind = draw(st.sampled_from(["mlp", "cnn", "resnet"]))
    act = draw(st.sampled_from(sorted(ACTIVATIONS)))
    seed = draw(st.integers(0, 1000))
    depth = 2 if act in SMALL_DEPTH else 5
    if kind == "mlp":
        widths = draw(st.lists(st.integers(1, 7), min_size=1, max_size=depth))
        return kind, act, seed, mlp(widths, ACTIVATIONS[act], bias=draw(st.booleans()),
                                    batchnorm=draw(st.booleans()), seed=seed)
    if kind == "cnn":
        channels = draw(st.lists(st.integers(1, 5), min_size=1, max_size=min(depth, 3)))
        return kind, act, seed, cnn(channels, ACTIVATIONS[act], pool=draw(st.sampled_from([None, "max", "avg"])),
                                    batchnorm=draw(st.booleans()), bias=draw(st.booleans()), seed=seed)
    torch.manual_seed(seed)
    return kind, "relu", seed, randomise(TinyResNet(draw(st.sampled_from(["basic", "bottleneck", "option_a"])),
                                                    width=draw(st.sampled_from([2, 4]))), seed)


def inputs_for(kind, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 5, generator=g) if kind == "mlp" else torch.randn(3, 3, 8, 8, generator=g)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=architectures(), sigma=st.sampled_from([0.3, 1.0]))
def test_random_intertwiners_preserve_the_function_exactly(arch, sigma):
    kind, act, seed, model = arch
    model = model.double()
    x = inputs_for(kind, seed).double()
    new, t = wb.random_intertwiner(model, seed=seed, scale_sigma=sigma)
    r64 = wb.verify(model, new, x, transform=t)
    assert r64.tolerance == 1e-10 and r64.passed, (kind, act, r64.to_frame())
    m32 = copy.deepcopy(model).float()
    r32 = wb.verify(m32, wb.apply_transform(m32, t), x.float(), transform=t)
    # float32: the dtype's 1e-5, or 10x this model's own measured rounding where that is larger (an exact
    # transform of x³ through a 1-channel conv differs from itself in float32 by 2e-5); exactness is r64's
    assert r32.passed and (r32.tolerance == 1e-5 or "own rounding" in r32.rule), (kind, act, r32)
    # the representation moved wherever the element is not the identity and the site is not dead
    smap = wb.symmetry_map(model)
    for check in r64.sites:
        site = smap[check.site]
        _, cache = wb.run_with_cache(model, x, names=sorted({o.name for o in site.observed}))
        alive = any(cache.calls(o.name)[o.call].abs().max() > 0 for o in site.observed)
        if alive and not t.elements[check.site].is_identity(atol=1e-12):
            assert check.representation_change > 1e-6, (act, check)


# ------------------------------------------------------------------ matching and interpretations
def test_match_neurons_recovers_an_applied_scaled_permutation():
    acts = torch.randn(200, 12, 3, 3).relu()
    G = wb.get_group("relu", 12)
    g = G.sample(seed=1)
    moved = g.act(acts.double(), 1)
    m = wb.match_neurons(acts, moved)
    assert torch.equal(m.perm, g.perm)
    torch.testing.assert_close(m.scale, g.scale)
    assert m.quality.min() > 1 - 1e-12
    assert "mean matched cosine 1.0000" in m.summary()
    signed = wb.get_group("signed_permutation", 12).sample(seed=2)
    ms = wb.match_neurons(acts, signed.act(acts.double(), 1), signed=True)
    assert torch.equal(ms.perm, signed.perm) and torch.equal(ms.scale.sign(), signed.scale.sign())
    with pytest.raises(ValueError, match="same shape"):
        wb.match_neurons(acts, acts[:, :5])


def test_interpretation_shift_relabels_under_the_group_and_changes_under_a_rotation():
    model = cnn([8, 8], nn.ReLU, pool=None)
    data = torch.randn(300, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    site = wb.symmetry_map(model)[0].name
    new, _ = wb.random_intertwiner(model, seed=0)
    same = wb.interpretation_shift(model, new, data, site, k=10)
    assert same.overlap_matched.min() == 1.0  # the same examples, relabelled
    assert same.overlap_same_index.mean() < 0.9
    rotated, _ = wb.random_intertwiner(model, sites=[site], group="orthogonal", allow_non_symmetry=True)
    moved = wb.interpretation_shift(model, rotated, data, site, k=10)
    assert moved.overlap_matched.mean() < 0.7
    assert "after matching" in repr(moved) and len(moved.to_frame()) == 8


def test_conv1d_dropout_and_avgpool_sites():
    torch.manual_seed(0)
    model = randomise(nn.Sequential(nn.Conv1d(2, 6, 5, padding=2), nn.BatchNorm1d(6), nn.GELU(), nn.Dropout(0.3),
                                    nn.AvgPool1d(2), nn.Conv1d(6, 4, 3), nn.SiLU(), nn.AdaptiveAvgPool1d(1),
                                    nn.Flatten(), nn.Linear(4, 3)))
    smap = wb.symmetry_map(model)
    assert [(s.n, s.group.name) for s in smap] == [(6, "permutation"), (4, "permutation")]
    before = state(model)
    new, t = wb.random_intertwiner(model, seed=1)
    again = wb.apply_transform(model, t)
    assert same_state(before, state(model)) and same_state(state(new), state(again))
    report = wb.verify(model.train(), new, torch.randn(5, 2, 32), transform=t, dtype=torch.float64)
    assert report.passed and report.representations_moved
    assert model.training  # verify ran it in eval mode (dropout off) and restored training mode
