"""GroupNorm in the graph backend (docs/DERIVATIONS.md §9): ``nn.GroupNorm`` and ``F.group_norm`` in plain traced
models, gains kept. Every check compares outputs directly in float64; negative controls edit the weights by hand."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings, strategies as st
from torch import nn

import workbench as wb
from workbench._errors import InvalidOptionError
from workbench.groups import ScaledPermutation
from workbench.symmetry import Transform

F64 = torch.float64
ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "none": nn.Identity}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter drawn from ``seed`` (not torch's global generator, whose state depends on the tests run
    before: a negative control's size did), with random gains (away from 0 and 1) and biases: a fresh norm's
    γ = 1, β = 0 hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) + (1.0 if "weight" in name or "gamma" in name else 0.0))
            else:  # a weight: unit-variance outputs, as a default initialisation gives
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model.eval().double()


class ConvGN(nn.Module):
    """conv → GroupNorm → act → conv → GroupNorm → act → pool → Linear; ``functional`` uses F.group_norm with the
    model's own γ, β parameters."""

    def __init__(self, c: int, groups: int, act: str, affine: bool, functional: bool, c2: int = 4, groups2: int = 2):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, c2, 3, padding=1)
        self.groups, self.functional = groups, functional
        if functional:
            self.gamma = nn.Parameter(torch.ones(c)) if affine else None
            self.beta = nn.Parameter(torch.zeros(c)) if affine else None
        else:
            self.gn = nn.GroupNorm(groups, c, affine=affine)
        self.gn2 = nn.GroupNorm(groups2, c2)
        self.a1, self.a2 = ACTS[act](), ACTS[act]()
        self.fc = nn.Linear(c2, 3)

    def forward(self, x):
        h = self.c1(x)
        h = F.group_norm(h, self.groups, self.gamma, self.beta) if self.functional else self.gn(h)
        h = self.a2(self.gn2(self.c2(self.a1(h))))
        return self.fc(h.mean((2, 3)))


def expected_base(act: str, affine: bool) -> str:
    """§9: the norm's output takes what the next layer allows (ReLU: D₊·P, GELU/SiLU: P, linear: D·P); without a
    gain nothing absorbs a scaling (P)."""
    if not affine:
        return "permutation"
    return {"relu": "scaled_permutation", "gelu": "permutation", "silu": "permutation", "none": "diagonal_permutation"}[act]


def check_element(e, n: int, groups: int, act: str, affine: bool) -> None:
    """The element's structure against §9: P maps groups onto groups; one sign per group on the input where a
    gain absorbs it; the output's scaling what the activation allows."""
    assert isinstance(e, ScaledPermutation)
    k = n // groups
    src = (e.perm // k).reshape(groups, k)
    assert bool((src == src[:, :1]).all()), "a channel moved into another group"
    signs = getattr(e, "signs", None)
    assert (signs is not None) == affine
    if signs is not None:
        s = signs.reshape(groups, k)
        assert bool((s.abs() == 1).all()) and bool((s == s[:, :1]).all())
    base = expected_base(act, affine)
    if base == "permutation":
        assert e.scale is None
    elif base == "scaled_permutation":
        assert bool((e.scale > 0).all())


# ------------------------------------------------------------------ random architectures, sizes and activations
@pytest.mark.slow
@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 4), groups=st.integers(1, 4), size=st.integers(1, 5), act=st.sampled_from(list(ACTS)),
       affine=st.booleans(), functional=st.booleans(), seed=st.integers(0, 10_000))
def test_random_groupnorm_models_keep_their_function(k, groups, size, act, affine, functional, seed):
    assume(k * size * size > 1)  # torch refuses a group of one value (its variance is not defined)
    n = k * groups
    model = randomised(ConvGN(n, groups, act, affine, functional), seed)
    x = torch.randn(3, 3, size, size, dtype=F64, generator=torch.Generator().manual_seed(seed))
    smap = wb.symmetry_map(model, x)
    site = next(s for s in smap if any(w.name == "c1" for w in s.writers))
    base = expected_base(act, affine)
    grouped = "grouped_" if 1 < groups < n else ""
    assert site.group.name == grouped + base + ("_with_group_signs" if affine else "")
    new, t = wb.random_intertwiner(model, seed=seed, example=x)
    e = t.elements[site.name]
    check_element(e, n, groups, act, affine)
    assert rel(new(x), model(x)) <= 1e-10
    trivial = bool((e.perm == torch.arange(n)).all()) and (getattr(e, "signs", None) is None or bool((e.signs == 1).all()))
    assert torch.equal(new.c1.weight, model.c1.weight) == trivial  # the writer moved by S·P
    assert wb.verify(model, new, x, transform=t).passed
    assert wb.verify(model.float(), new.float(), x.float(), transform=t).passed  # (.float() converts in place)


def test_the_elements_and_weights_follow_section_9():
    """conv → GN → ReLU: the writer's rows move by S·P, γ by S·D·P, β by D·P, the reader's columns by (D·P)⁻¹."""
    model = randomised(ConvGN(8, 4, "relu", True, False))
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    new, t = wb.random_intertwiner(model, seed=5, example=x, sites=["a1"])  # c2's rows are the next site's
    e = t.elements["a1"]
    S, D, p = e.signs, e.scale, e.perm
    assert set(S.tolist()) == {-1.0, 1.0}  # seed 5 draws both signs
    torch.testing.assert_close(new.c1.weight, S.reshape(-1, 1, 1, 1) * model.c1.weight[p], rtol=0, atol=1e-15)
    torch.testing.assert_close(new.gn.weight, S * D * model.gn.weight[p], rtol=0, atol=1e-14)
    torch.testing.assert_close(new.gn.bias, D * model.gn.bias[p], rtol=0, atol=1e-14)
    torch.testing.assert_close(new.c2.weight, model.c2.weight[:, p] / D.reshape(1, -1, 1, 1),
                               rtol=1e-13, atol=0)
    assert rel(new(x), model(x)) <= 1e-10
    site = wb.symmetry_map(model, x)["a1"]
    assert any("GroupNorm gn" in note for note in site.notes)


@pytest.mark.parametrize("groups, block", [(1, 8), (8, 1)])
def test_one_group_is_a_layernorm_and_as_many_groups_as_channels_an_instance_norm(groups, block):
    """GroupNorm(1, C) is LayerNorm over C×H×W with a per-channel gain: any permutation, one global sign on its
    input; GroupNorm(C, C) is instance norm: any permutation, a sign per channel."""
    model = randomised(ConvGN(8, groups, "relu", True, False))
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    h = model.c1(x)
    if groups == 1:
        ln = F.layer_norm(h, h.shape[1:], eps=model.gn.eps)
        ref = ln * model.gn.weight.reshape(1, -1, 1, 1) + model.gn.bias.reshape(1, -1, 1, 1)
    else:
        ref = F.instance_norm(h, weight=model.gn.weight, bias=model.gn.bias, eps=model.gn.eps)
    assert rel(model.gn(h), ref) < 1e-12  # the edge case is the norm it names
    site = wb.symmetry_map(model, x)["a1"]
    assert site.group.name == "scaled_permutation_with_group_signs" and site.group.block == block
    seen = set()
    for seed in range(6):
        new, t = wb.random_intertwiner(model, seed=seed, example=x)
        assert rel(new(x), model(x)) <= 1e-10
        seen.add(len(set(t.elements["a1"].signs.tolist())))
    assert seen == ({1} if groups == 1 else {2})  # one global sign; per channel, both signs appear


def test_affine_false_takes_no_signs_and_no_scalings():
    model = randomised(ConvGN(6, 3, "relu", False, False))
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    site = wb.symmetry_map(model, x)["a1"]
    assert site.group.name == "grouped_permutation"
    new, t = wb.random_intertwiner(model, seed=1, example=x)
    e = t.elements["a1"]
    assert type(e) is ScaledPermutation and e.scale is None
    assert rel(new(x), model(x)) <= 1e-10


def test_a_groupnorm_reading_a_residual_stream_passes_grouped_permutations():
    """Pre-activation: the stream is read by the norm and by the addition, so the norm's output moves by the
    stream's element itself (γ, β permuted)."""
    class PreAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.gn, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            h = self.stem(x)
            return self.head((h + self.conv(F.relu(self.gn(h)))).mean((2, 3)))

    model = randomised(PreAct())
    x = torch.randn(3, 3, 5, 5, dtype=F64)
    (site,) = wb.symmetry_map(model, x).sites
    assert site.group.name == "grouped_permutation"
    new, t = wb.random_intertwiner(model, seed=2, example=x)
    p = t.elements[site.name].perm
    torch.testing.assert_close(new.gn.weight, model.gn.weight[p], rtol=0, atol=0)
    assert rel(new(x), model(x)) <= 1e-10


def test_two_groupings_in_one_space_freeze_it_with_the_reason():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
            self.ga, self.gb = nn.GroupNorm(2, 8), nn.GroupNorm(4, 8)
            self.out = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.out(F.relu(self.ga(self.a(x)) + self.gb(self.b(x)))).flatten(1)

    model = randomised(Two())
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    smap = wb.symmetry_map(model, x)
    assert len(smap) == 0
    assert any("different numbers of groups" in r for _, r in smap.skipped)
    new, _ = wb.random_intertwiner(model, seed=0, example=x)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), new.parameters()))


# ------------------------------------------------------------------ negative controls, measured directly
def _moved(model, x, perm=None, signs=None, scale_in=None, gamma_signs=None):
    """conv → GN(4) → ReLU → conv with the writer's rows moved by diag(scale_in)·S·P, γ by S'·P (S' = the signs
    unless ``gamma_signs`` says otherwise), β by P and the reader's columns by P⁻¹, by hand."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    n = sd["gn.weight"].numel()
    p = perm if perm is not None else torch.arange(n)
    s = signs if signs is not None else torch.ones(n, dtype=F64)
    d = scale_in if scale_in is not None else torch.ones(n, dtype=F64)
    sd["c1.weight"], sd["c1.bias"] = (d * s).reshape(-1, 1, 1, 1) * sd["c1.weight"][p], d * s * sd["c1.bias"][p]
    sd["gn.weight"] = (s if gamma_signs is None else gamma_signs) * sd["gn.weight"][p]
    sd["gn.bias"], sd["c2.weight"] = sd["gn.bias"][p], sd["c2.weight"][:, p]
    new = copy.deepcopy(model)
    new.load_state_dict(sd)
    return rel(new(x), model(x))


def test_negative_controls_change_the_output():
    model = randomised(ConvGN(8, 4, "relu", True, False), seed=3)
    x = torch.randn(4, 3, 6, 6, dtype=F64, generator=torch.Generator().manual_seed(0))
    within = torch.tensor([1, 0, 2, 3, 5, 4, 7, 6])
    group_signs = torch.tensor([-1.0, -1, 1, 1, -1, -1, 1, 1], dtype=F64)
    assert _moved(model, x, within, group_signs) <= 1e-12  # the control's own control: inside the group
    # measured (relative, float64): 0.017, 0.034, 0.045, 0.008 (seeds 0-5 of this model: 0.016-0.13, 0.010-0.034,
    # 0.045-0.65, 0.008-0.22)
    assert _moved(model, x, torch.tensor([2, 1, 0, 3, 4, 5, 6, 7])) > 1e-3  # a permutation across groups
    assert _moved(model, x, scale_in=torch.linspace(0.5, 2.0, 8, dtype=F64)) > 1e-3  # a per-channel scaling
    assert _moved(model, x, within, group_signs, gamma_signs=torch.ones(8, dtype=F64)) > 1e-3  # γ not flipped
    per_channel = torch.tensor([-1.0, 1, 1, 1, 1, 1, 1, 1], dtype=F64)
    assert _moved(model, x, signs=per_channel) > 1e-3  # a sign that is not one per group
    # A positive uniform scaling of one group is exact only as ε → 0: the change is of the order of ε / var.
    uniform = torch.tensor([3.0, 3, 1, 1, 1, 1, 1, 1], dtype=F64)
    inexact = _moved(model, x, scale_in=uniform)
    assert 1e-9 < inexact < 1e-5, inexact  # measured: 4.2e-8 with ε = 1e-5 (seeds 0-5: 4e-8 to 9e-7)
    model.gn.eps = 1e-3
    assert 50 < _moved(model, x, scale_in=uniform) / inexact < 200  # 1.9e-5: proportional to ε
    model.gn.eps = 0.0
    assert _moved(model, x, scale_in=uniform) < 1e-12  # …and ε is the whole reason


def test_a_hand_made_element_no_groupnorm_passes_is_refused_and_forced_it_changes_the_output():
    model = randomised(ConvGN(8, 4, "relu", True, False))
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    across = ScaledPermutation(torch.tensor([2, 1, 0, 3, 4, 5, 6, 7]), None)
    for bad in (across, wb.get_group("orthogonal", 8).sample(seed=0)):
        with pytest.raises(InvalidOptionError, match="GroupNorm 'gn.weight' does not pass|only scaled permutations"):
            wb.apply_transform(model, Transform({"a1": bad}, {"a1": "x"}), example=x)
    with pytest.raises(InvalidOptionError, match="input signs that are not one per group"):
        from workbench.symmetry._graph_groupnorm import InputSigned

        odd = InputSigned(torch.arange(8), None, "identity", "x", torch.tensor([-1.0, 1, 1, 1, 1, 1, 1, 1]))
        wb.apply_transform(model, Transform({"a1": odd}, {"a1": "x"}), example=x)
    new, t = wb.random_intertwiner(model, seed=0, sites=["a1"], group="permutation", allow_non_symmetry=True, example=x)
    assert t.forced == ["a1"] and rel(new(x), model(x)) > 1e-3  # a full permutation crosses the groups


def test_a_saved_transform_replays_its_signs(tmp_path):
    model = randomised(ConvGN(8, 2, "gelu", True, False))
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    new, t = wb.random_intertwiner(model, seed=4, example=x)
    t.save(tmp_path / "t.json")
    again = wb.apply_transform(model, Transform.load(tmp_path / "t.json"), example=x)
    for (name, p), q in zip(new.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name


# ------------------------------------------------------------------ a realistic model, verify at two dtypes
class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(groups, cout)
        self.conv2, self.gn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.GroupNorm(groups, cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(groups, cout))

    def forward(self, x):
        h = self.relu(self.gn1(self.conv1(x)))
        h = self.gn2(self.conv2(h))
        return self.relu(h + (x if self.down is None else self.down(x)))


class GNResNet(nn.Module):
    """A small ResNet with GroupNorm where torchvision's has BatchNorm (stem, two stages, shortcut conv → GN)."""

    def __init__(self, width: int = 8, groups: int = 2, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.GroupNorm(groups, width), nn.ReLU())
        self.layer1 = nn.Sequential(Block(width, width, 1, groups), Block(width, width, 1, groups))
        self.layer2 = nn.Sequential(Block(width, 2 * width, 2, groups), Block(2 * width, 2 * width, 1, groups))
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layer2(self.layer1(self.stem(x))), 1), 1))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_a_resnet_with_groupnorm_transforms_exactly_and_verify_passes(dtype):
    model = randomised(GNResNet())
    x = torch.randn(3, 3, 12, 12, dtype=F64, generator=torch.Generator().manual_seed(0))
    smap = wb.symmetry_map(model, x)
    # stage 1 stream, stage 2 stream, and each block's inner ReLU space: 2 + 4
    assert len(smap) == 6 and [r for _, r in smap.skipped] == ["the model's output"]
    assert {s.group.name for s in smap} == {"grouped_scaled_permutation_with_group_signs"}
    new, t = wb.random_intertwiner(model, seed=0, example=x)
    assert rel(new(x), model(x)) <= 1e-10  # float64, computed here
    m, n = model.to(dtype), new.to(dtype)
    report = wb.verify(m, n, x.to(dtype), transform=t, dtype=F64)
    assert report.passed, report.summary()


# ------------------------------------------------------------------ timm (offline, random weights)
def _timm():
    pytest.importorskip("timm")
    from workbench.models import ensure_torchvision_importable

    ensure_torchvision_importable()
    import timm

    return timm


@pytest.mark.slow
@pytest.mark.parametrize("name", ["test_efficientnet_gn", "resnet50_gn"])
def test_timm_groupnorm_models_transform_exactly(name):
    """timm models whose norms are plain ``GroupNorm`` (``F.group_norm`` inside timm's subclass; the tiny
    EfficientNet also has depthwise convs and squeeze-excite)."""
    timm = _timm()
    model = randomised(timm.create_model(name, pretrained=False, num_classes=5))
    x = torch.randn(2, 3, 32, 32, dtype=F64, generator=torch.Generator().manual_seed(0))
    smap = wb.symmetry_map(model, x)
    assert len(smap) > 10 and [r for _, r in smap.skipped] == ["the model's output"]
    assert all("with_group_signs" in s.group.name for s in smap if any("GroupNorm" in n and "writer" in n for n in s.notes))
    new, t = wb.random_intertwiner(model, seed=0, example=x)
    assert rel(new(x), model(x)) <= 1e-10
    assert wb.verify(model, new, x, transform=t).passed


def test_weight_standardised_convs_freeze_and_nothing_moves():
    """timm's StdConv2d normalises its weight per output channel, which is not linear in the weight: its spaces
    are frozen with the reason, and a transform leaves its weights and the function alone."""
    _timm()
    from timm.layers import StdConv2d

    class Std(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.gn, self.b = StdConv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), StdConv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(F.relu(self.b(F.relu(self.gn(self.a(x))))).mean((2, 3)))

    model = randomised(Std())
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    smap = wb.symmetry_map(model, x)
    assert not any(w.name in ("a", "b", "a.weight", "b.weight") for s in smap for w in s.writers + s.readers)
    assert any("standardis" in r for _, r in smap.skipped)
    new, t = wb.random_intertwiner(model, seed=0, example=x)
    assert torch.equal(new.a.weight, model.a.weight) and torch.equal(new.b.weight, model.b.weight)
    assert rel(new(x), model(x)) <= 1e-10
