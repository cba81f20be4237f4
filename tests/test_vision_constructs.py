"""The graph backend on the constructs of today's vision models (docs/DERIVATIONS.md §1, §3, §5, §7):
depthwise and grouped convolutions, squeeze-excite gates, token-wise linear maps, stochastic depth.

Every verdict is checked directly: the transformed model's float64 outputs against the original's,
each output unit against its own scale (``changed``, computed here, never by ``wb.verify``), and a
negative control just outside the group, pushed as a forced element, must move them."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import workbench as wb
from models import randomise
from workbench._errors import InvalidOptionError
from workbench.groups import ScaledPermutation
from workbench.symmetry import Transform

F64 = torch.float64
SETTINGS = settings(max_examples=25, deadline=None)
ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "tanh": nn.Tanh, "silu": nn.SiLU, "gelu": nn.GELU}
# The group of a space whose activations are these (intersection of their catalogue groups; φ = M for all).
GROUP = {frozenset({"relu"}): "scaled_permutation", frozenset({"tanh"}): "signed_permutation"}


def expected(*acts: str) -> str:
    return GROUP.get(frozenset(acts), "permutation")


def changed(model, new, x) -> float:
    """Max relative output change, each output unit against its own largest |value| (float64, here)."""
    with torch.no_grad():
        a, b = model.eval()(x), new.eval()(x)
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return ((a - b).abs() / a.abs().amax(0).clamp_min(1e-300)).max().item()


def forced(model, site: str, perm, scale=None, x=None):
    """``model`` with one hand-made element at ``site``, recorded as forced (a negative control)."""
    e = ScaledPermutation(torch.as_tensor(perm), None if scale is None else torch.as_tensor(scale, dtype=F64))
    return wb.apply_transform(model, Transform({site: e}, {site: "forced"}, [site]), example=x)


def check(model, x, seed=0):
    """A random intertwiner preserves the function to 1e-10 (checked here) and verify passes."""
    new, t = wb.random_intertwiner(model, seed=seed, example=x)
    assert changed(model, new, x) < 1e-10
    report = wb.verify(model, new, x, transform=t)
    assert report.verdict == "PASS", report.summary()
    return new, t


def weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Unit-variance weights (default inits leave ReLU6 far below its bend at 6, which hides scalings)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
    return randomise(model, seed)


def site_with(smap, module: str):
    return next(s for s in smap if any(n == module for n, _ in s.norms) or module in [p.name for p in s.writers])


# ------------------------------------------------------------------ depthwise and grouped convolutions
def inverted_residual(c, act1, act2, k, padding_mode, bn, groups=None):
    """conv1×1 → [BN] → σ₁ → conv k×k with ``groups`` (depthwise by default) → [BN] → σ₂ → conv1×1 → mean → fc."""
    norm = (lambda: nn.BatchNorm2d(c)) if bn else nn.Identity
    return weights(nn.Sequential(
        nn.Conv2d(3, c, 1), norm(), ACTS[act1](),
        nn.Conv2d(c, c, k, padding=k // 2, groups=groups or c, padding_mode=padding_mode), norm(), ACTS[act2](),
        nn.Conv2d(c, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))).eval().double()


@SETTINGS
@given(c=st.integers(3, 9), act1=st.sampled_from(["relu", "relu6", "hardswish", "tanh"]),
       act2=st.sampled_from(["relu", "relu6", "hardswish", "tanh"]), k=st.sampled_from([1, 3, 5]),
       padding_mode=st.sampled_from(["zeros", "reflect", "circular"]), bn=st.booleans(), seed=st.integers(0, 99))
def test_a_depthwise_conv_couples_the_spaces_around_it(c, act1, act2, k, padding_mode, bn, seed):
    torch.manual_seed(seed)
    model = inverted_residual(c, act1, act2, k, padding_mode, bn)
    x = torch.randn(3, 3, 6, 6, dtype=F64)
    smap = wb.symmetry_map(model, x)
    site = site_with(smap, "3")
    assert ("3", "coupler") in site.norms and site.group.name == expected(act1, act2)
    assert any("couples the spaces" in n for n in site.notes)
    new, t = check(model, x, seed)
    assert torch.equal(new[3].weight, model[3].weight[t.elements[site.name].perm])  # kernels only permuted
    # negative controls just outside the group: a scaling where a σ is not scale-equivariant (ReLU6, hardswish,
    # tanh), a sign flip where it is not odd (ReLU); the coupled conv takes them like a symmetry
    perm = torch.randperm(c)
    scale = torch.full((c,), 100.0 if site.group.name in ("permutation", "signed_permutation") else -1.0, dtype=F64)
    assert changed(model, forced(model, site.name, perm, scale, x), x) > 1e-6


@SETTINGS
@given(groups=st.integers(2, 4), width=st.integers(1, 3), act=st.sampled_from(["relu", "relu6"]), seed=st.integers(0, 99))
def test_a_grouped_conv_maps_its_groups_onto_each_other(groups, width, act, seed):
    torch.manual_seed(seed)
    c = groups * width
    model = inverted_residual(c, act, act, 3, "zeros", True, groups=groups if width > 1 else c + 0)
    x = torch.randn(3, 3, 6, 6, dtype=F64)
    site = site_with(wb.symmetry_map(model, x), "3")
    want = ("grouped_" if width > 1 else "") + expected(act)
    assert site.group.name == want
    new, t = check(model, x, seed)
    perm = t.elements[site.name].perm
    assert width == 1 or bool(((perm // width).reshape(groups, width) == (perm // width).reshape(groups, width)[:, :1]).all())
    if width == 1:
        return
    # a permutation that moves one channel into another group: not in the group, refused unless forced, and then
    # it changes the function
    cross = torch.arange(c)
    cross[[0, width]] = cross[[width, 0]]
    with pytest.raises(InvalidOptionError, match="not a symmetry"):
        wb.random_intertwiner(model, group="permutation", example=x)
    with pytest.raises(InvalidOptionError, match="into another group"):
        wb.apply_transform(model, Transform({site.name: ScaledPermutation(cross, None)}, {site.name: "p"}, []), example=x)
    assert changed(model, forced(model, site.name, cross, None, x), x) > 1e-6


def test_a_grouped_conv_with_a_channel_multiplier_stays_frozen():
    model = randomise(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 3, groups=4), nn.ReLU(),
                                    nn.Conv2d(8, 2, 1), nn.Flatten(), nn.Linear(2 * 4 * 4, 2))).double()
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    smap = wb.symmetry_map(model, x)
    assert "channel multiplier" in dict(smap.skipped)["0"]
    new, _ = wb.random_intertwiner(model, example=x)
    assert changed(model, new, x) < 1e-10


# ------------------------------------------------------------------ squeeze-excite
class SqueezeExcite(nn.Module):
    """conv → BN → σ → x · gate(x) → conv, gate = g(fc2(ρ(fc1(pool(x))))) (torchvision's layout)."""

    def __init__(self, c, squeeze, act, inner, gate):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), ACTS[act]()
        self.fc1, self.inner, self.fc2 = nn.Conv2d(c, squeeze, 1), ACTS[inner](), nn.Conv2d(squeeze, c, 1)
        self.gate, self.out = gate(), nn.Conv2d(c, 3, 1)

    def forward(self, x):
        h = self.act(self.bn(self.conv(x)))
        s = self.gate(self.fc2(self.inner(self.fc1(nn.functional.adaptive_avg_pool2d(h, 1)))))
        return self.out(h * s).mean((2, 3))


@SETTINGS
@given(c=st.integers(3, 8), squeeze=st.integers(2, 5), act=st.sampled_from(["relu", "silu", "hardswish"]),
       inner=st.sampled_from(["relu", "silu"]), gate=st.sampled_from([nn.Sigmoid, nn.Hardsigmoid]), seed=st.integers(0, 99))
def test_a_squeeze_excite_gate_takes_the_permutation_of_what_it_gates(c, squeeze, act, inner, gate, seed):
    torch.manual_seed(seed)
    model = randomise(SqueezeExcite(c, squeeze, act, inner, gate)).eval().double()
    x = torch.randn(3, 3, 5, 5, dtype=F64)
    smap = wb.symmetry_map(model, x)
    main, hidden = site_with(smap, "conv"), smap["inner"]
    assert main.group.name == "permutation" and "fc2" in [p.name for p in main.writers]  # the gate's rows move with x
    assert hidden.group.name == expected(inner)  # the SE hidden layer is its own site
    check(model, x, seed)
    scale = torch.full((c,), 1.0, dtype=F64)
    scale[-1] = 3.0  # a scaling of x would be squared by the product (and the gate is not homogeneous)
    assert changed(model, forced(model, main.name, torch.arange(c), scale, x), x) > 1e-6


def test_a_product_that_broadcasts_over_channels_is_frozen():
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.out = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.out(h * h.mean(1, keepdim=True)).mean((2, 3))

    model = randomise(Pooled()).double()
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    smap = wb.symmetry_map(model, x)
    assert len(smap) == 0
    assert changed(model, wb.random_intertwiner(model, example=x)[0], x) < 1e-10


# ------------------------------------------------------------------ token-wise linear maps
class TokenMLP(nn.Module):
    """x + fc2(σ(fc1(x))) on [batch, tokens…, channels], pooled over tokens, then a head: a ViT/Mixer MLP."""

    def __init__(self, c, hidden, act, rank):
        super().__init__()
        self.embed, self.fc1, self.act, self.fc2 = nn.Linear(3, c), nn.Linear(c, hidden), ACTS[act](), nn.Linear(hidden, c)
        self.head, self.dims = nn.Linear(c, 2), tuple(range(1, rank - 1))

    def forward(self, x):
        h = self.embed(x)
        h = h + self.fc2(self.act(self.fc1(h)))
        return self.head(h.mean(self.dims))


@SETTINGS
@given(c=st.integers(2, 6), hidden=st.integers(2, 8), act=st.sampled_from(["gelu", "relu", "tanh"]),
       rank=st.sampled_from([3, 4]), seed=st.integers(0, 99))
def test_a_tokenwise_mlp_hidden_space_is_a_site_on_the_last_axis(c, hidden, act, rank, seed):
    torch.manual_seed(seed)
    model = randomise(TokenMLP(c, hidden, act, rank)).double()
    x = torch.randn(3, *([4] * (rank - 2)), 3, dtype=F64)
    smap = wb.symmetry_map(model, x)
    site, stream = smap["act"], smap["embed"]
    assert site.group.name == expected(act) and [p.name for p in site.writers] == ["fc1"]
    assert all(o.axis == -1 for o in site.observed)
    assert stream.group.name == "gl" and {p.name for p in stream.writers} == {"embed", "fc2"}  # a linear stream
    check(model, x, seed)
    # negative controls: a positive scaling at a GELU/tanh site, a sign flip at a ReLU site (verify's PASS above
    # also says the site checks act on the last axis: on axis 1 they would compare tokens, and fail)
    scale = torch.ones(hidden, dtype=F64)
    scale[0] = 2.0 if act != "relu" else -1.0
    assert changed(model, forced(model, "act", torch.arange(hidden), scale, x), x) > 1e-6


def test_stitching_refuses_a_tokenwise_site_instead_of_mapping_its_tokens():
    from workbench.stitching._cut import Cut

    model = nn.Sequential(nn.Linear(3, 6), nn.GELU(), nn.Linear(6, 2)).double()
    with pytest.raises(InvalidOptionError, match="last axis"):
        Cut(model, "1", torch.randn(4, 5, 3, dtype=F64))  # [batch, tokens, features]: a stitch would map tokens
    assert Cut(model, "1", torch.randn(4, 3, dtype=F64)).crossings[0].shape == (4, 6)  # [batch, features] cuts


def test_a_linear_reading_positions_of_a_conv_output_freezes_it():
    class Positions(nn.Module):  # Conv1d writes [batch, channels, length]; a Linear then acts on the length
        def __init__(self):
            super().__init__()
            self.conv, self.lin, self.out = nn.Conv1d(2, 3, 1), nn.Linear(5, 5), nn.Linear(5, 2)

        def forward(self, x):
            return self.out(self.lin(torch.relu(self.conv(x))).mean(1))

    model = randomise(Positions()).double()
    x = torch.randn(4, 2, 5, dtype=F64)
    smap = wb.symmetry_map(model, x)
    # lin maps positions per channel (it would pass permutations: tests/test_vision_transformers.py, Mixer); the mean
    # over the channels freezes the conv's space and lin's output axis
    assert "conv" not in [p.name for s in smap for p in s.writers] and "lin" not in [p.name for s in smap for p in s.writers]
    assert "reduces the batch or the channel axis (axis 1)" in dict(smap.skipped)["conv"]
    assert changed(model, wb.random_intertwiner(model, example=x)[0], x) < 1e-10


def test_stochastic_depth_commutes_with_channel_maps():
    pytest.importorskip("torchvision")
    from workbench.models import ensure_torchvision_importable

    ensure_torchvision_importable()
    from torchvision.ops import stochastic_depth

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.out = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 5, 1), nn.Conv2d(5, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            h = self.a(x)
            h = h + stochastic_depth(self.c(torch.relu(self.b(h))), 0.5, "row", self.training)
            return self.out(h).mean((2, 3))

    model = randomise(Block()).double()
    x = torch.randn(6, 3, 4, 4, dtype=F64)
    smap = wb.symmetry_map(model, x)
    assert {s.group.name for s in smap} == {"gl", "scaled_permutation"}
    new, t = check(model, x)
    torch.manual_seed(0)
    a = model.train()(x)
    torch.manual_seed(0)
    b = new.train()(x)  # the same random rows dropped: the transformed model computes the same function
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-10


# ------------------------------------------------------------------ torch.cat along the channels (DenseNet)
class Dense(nn.Module):
    """A stem piece (conv → ReLU), then layers that each read BN → σ → conv of the concatenation of everything
    before them and add a piece written by a conv with no activation; a BN → ReLU → conv transition at the end."""

    def __init__(self, stem, widths, act):
        super().__init__()
        self.stem, self.act = nn.Conv2d(3, stem, 3, padding=1), ACTS[act]()
        c, self.norms, self.convs = stem, nn.ModuleList(), nn.ModuleList()
        for w in widths:
            self.norms.append(nn.BatchNorm2d(c))
            self.convs.append(nn.Conv2d(c, w, 3, padding=1))
            c += w
        self.norm, self.out = nn.BatchNorm2d(c), nn.Conv2d(c, 2, 1)

    def forward(self, x):
        pieces = [self.act(self.stem(x))]
        for norm, conv in zip(self.norms, self.convs):
            pieces.append(conv(self.act(norm(torch.cat(pieces, 1)))))
        return self.out(torch.relu(self.norm(torch.cat(pieces, 1)))).mean((2, 3))


@SETTINGS
@given(stem=st.integers(1, 4), widths=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       act=st.sampled_from(["relu", "tanh", "gelu"]), seed=st.integers(0, 99))
def test_a_concatenation_is_a_direct_sum_of_its_pieces(stem, widths, act, seed):
    torch.manual_seed(seed)
    model = weights(Dense(stem, widths, act)).eval().double()
    x = torch.randn(3, 3, 5, 5, dtype=F64)
    smap = wb.symmetry_map(model, x)
    hosts = [s for s in smap if s.embeds]
    assert len(hosts) == len(widths) + 1  # every concatenation is a site: its element is block-diagonal
    last = hosts[-1]
    assert [(start, count) for _, start, count, _ in last.embeds] == \
        [(sum(([stem] + widths)[:i]), w) for i, w in enumerate([stem] + widths)]
    pieces = {p for h in hosts for p, *_ in h.embeds}
    assert None not in pieces and all(smap[p].group.name in ("scaled_permutation", "signed_permutation", "permutation")
                                      for p in pieces)  # a conv piece is GL alone; what reads the sum restricts it
    check(model, x, seed)
    # only the pieces chosen: the concatenations carry their elements anyway (the readers must move)
    new, _ = wb.random_intertwiner(model, seed=seed, sites=sorted(pieces - {s.name for s in hosts}), example=x)
    assert changed(model, new, x) < 1e-10
    # negative control: a permutation of the last concatenation that swaps channels of two different pieces
    perm = torch.arange(last.n)
    perm[[0, last.n - 1]] = perm[[last.n - 1, 0]]
    assert changed(model, forced(model, last.name, perm, None, x), x) > 1e-6


def test_pieces_of_a_concatenation_that_cannot_move_do_not_move():
    class Out(nn.Module):  # the concatenation is the model's output: nothing may move its channels
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1), nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return torch.cat([self.b(torch.relu(self.a(x))), self.c(x)], 1).mean((2, 3))

    model = randomise(Out()).double()
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    smap = wb.symmetry_map(model, x)
    assert [s.name for s in smap] == ["a"]  # a's ReLU site is inside; b's and c's outputs are the concatenation's
    assert "cannot move" in dict(smap.skipped)["b"] and "cannot move" in dict(smap.skipped)["c"]
    assert changed(model, wb.random_intertwiner(model, seed=1, example=x)[0], x) < 1e-10


def test_choosing_only_the_stage_a_zero_padding_shortcut_carries_moves_the_next_stage_too():
    from models import TinyResNet

    model = randomise(TinyResNet("option_a")).double()
    x = torch.randn(3, 3, 8, 8, dtype=F64)
    host = next(s for s in wb.symmetry_map(model) if s.embeds)
    new, t = wb.random_intertwiner(model, seed=2, sites=[host.embeds[0][0]])
    assert list(t.elements) == [host.embeds[0][0]]
    assert changed(model, new, x) < 1e-10  # was 0.14: the next stage's readers did not move with the padded channels


# ------------------------------------------------------------------ real constructors (torchvision, timm), small
def _tv():
    pytest.importorskip("torchvision")
    from workbench.models import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torchvision

    return torchvision


def small_vision_models() -> dict:
    """Name → constructor of a small configuration of each family (random weights, offline)."""
    def regnet():
        from torchvision.models.regnet import BlockParams, RegNet

        return RegNet(BlockParams.from_init_params(depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25),
                      num_classes=10)

    def efficientnet():
        from torchvision.models.efficientnet import EfficientNet, MBConvConfig

        return EfficientNet([MBConvConfig(1, 3, 1, 16, 16, 1), MBConvConfig(4, 3, 2, 16, 24, 2),
                             MBConvConfig(4, 5, 2, 24, 32, 1)], dropout=0.2, num_classes=10)

    def convnext():
        from torchvision.models.convnext import CNBlockConfig, ConvNeXt

        return ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 1)], num_classes=10)

    def vit():
        from torchvision.models.vision_transformer import VisionTransformer

        return VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=10)

    def mixer():
        from workbench.models import require

        require("timm")
        from timm.models.mlp_mixer import MlpMixer

        return MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=32)

    def densenet():
        from torchvision.models.densenet import DenseNet

        return DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=10)

    tv = lambda: _tv().models  # noqa: E731
    return {"mobilenet_v2": lambda: tv().mobilenet_v2(num_classes=10, width_mult=0.35),
            "mobilenet_v3_small": lambda: tv().mobilenet_v3_small(num_classes=10),
            "efficientnet": efficientnet, "regnet_y": regnet, "densenet": densenet, "convnext": convnext, "vit": vit, "mixer": mixer}


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every vector parameter (norm gains and biases, layer scales, class tokens) and every zero-initialised
    tensor (ViT's head) random, BatchNorm statistics random: a fresh model's 1s and 0s hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1 or "layer_scale" in name or not p.any():
                p.copy_(0.3 * torch.randn(p.shape, generator=g) + (1.0 if name.endswith("weight") and p.ndim == 1 else 0.0))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval().double()


# The group each site's activations allow (docs/DERIVATIONS.md §3, §5): not scale-equivariant → P; ReLU → D₊·P
# (P where a squeeze-excite gate multiplies it); grouped convs map their groups onto each other.
NOT_HOMOGENEOUS = ("ReLU6", "Hardswish", "SiLU", "GELU", "Sigmoid", "Hardsigmoid")


def allowed_groups(site) -> set:
    if site.activation in ("attention scores", "linear (value → output)"):  # per head (tests/test_vision_transformers.py)
        return {"gl"}
    if site.activation == "attention heads":
        return {"permutation"}
    if site.activation == "none" and any("residual stream" in n for n in site.notes):  # a pre-LN stream (DERIVATIONS §2)
        return {"permutation", "orthogonal_ones", "permutation_with_sign", "orthogonal_ones_with_sign"}
    if site.activation == "none":  # a linear site; a concatenation's piece takes what reads the concatenation
        return {"gl"} if not any("its channels are part of" in n for n in site.notes) else {"scaled_permutation"}
    if any(a in site.activation for a in NOT_HOMOGENEOUS):
        return {"permutation", "grouped_permutation"}
    return {"scaled_permutation", "permutation", "grouped_scaled_permutation", "grouped_permutation"}


@pytest.fixture
def one_thread():
    """Small float64 convolutions on two threads of a busy 2-core machine wait at barriers (measured: a
    MobileNetV2 forward 0.06 s on one thread, 0.4 s to minutes on two)."""
    from workbench._threads import threads

    with threads(1):
        yield


@pytest.mark.slow
@pytest.mark.parametrize("name", list(small_vision_models()))
def test_real_vision_models_transform_exactly(name, one_thread):
    torch.manual_seed(0)  # the constructors draw from the global generator: without a seed the weights (and whether the
    # negative control's channels are alive) depended on the tests run before (DenseNet's swap once moved nothing)
    model = randomised(small_vision_models()[name]())
    x = torch.randn(2, 3, 32, 32, dtype=F64, generator=torch.Generator().manual_seed(1))
    smap = wb.symmetry_map(model, x)
    assert len(smap) > 0 and smap.trace_error is None
    for site in smap:  # a host (DenseNet's concatenations): its family's, block by block (tests/test_host_groups.py)
        family = site.group.family.name if site.embeds else site.group.name
        assert family in allowed_groups(site) and site.group.name == family + "_per_block" * bool(site.embeds), site
    couplers = {n for s in smap for n, mode in s.norms if mode == "coupler"}
    grouped = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    # every depthwise / grouped conv is inside a site, none is frozen (ConvNeXt's read its residual stream)
    assert couplers == grouped
    if name in ("vit", "mixer", "convnext"):  # the MLP hidden spaces (Mixer: token and channel MLPs) on the last axis;
        # the streams (ViT, ConvNeXt, Mixer) and ViT's attention heads: tests/test_vision_transformers.py
        blocks = {"vit": 2, "mixer": 4, "convnext": 3}[name]
        mlp = [s for s in smap if s.activation == "GELU" and not any("residual stream" in n for n in s.notes)]
        assert [s.group.name for s in mlp] == ["permutation"] * blocks
        assert all(o.axis == -1 for s in mlp for o in s.observed)
        # ViT: stream, 2 layers × 2 heads × qk/ov, heads; ConvNeXt: a stream per stage
        assert len(smap) == blocks + {"vit": 1 + 2 * 2 * 2 + 2, "convnext": 2, "mixer": 1}[name]
    else:
        assert [r for _, r in smap.skipped] == ["the model's output"]
    new, t = wb.random_intertwiner(model, seed=2, example=x)
    assert changed(model, new, x) < 1e-10
    assert wb.verify(model, new, x, transform=t).verdict == "PASS"
    # negative control: scalings ×100 at the last site whose nonlinearity is not scale-equivariant (the
    # nearest the output: an early one's change is washed out by the layers after it at default inits)
    # (RegNet: a permutation moving a channel into another group of its grouped conv)
    # (DenseNet, all ReLU: a permutation of the last concatenation that swaps channels of two pieces)
    site = [s for s in smap if s.activation != "attention heads"
            and (s.group.name in ("permutation", "grouped_permutation") or s.embeds)][-1]
    perm, scale = torch.arange(site.n), torch.full((site.n,), 100.0, dtype=F64)
    if site.group.name == "grouped_permutation":
        width = site.n // site.group.groups
        perm[[0, width]], scale = perm[[width, 0]], None
    elif site.embeds:
        perm[[0, site.n - 1]], scale = perm[[site.n - 1, 0]], None
    assert changed(model, forced(model, site.name, perm, scale, x), x) > 1e-6


def test_a_hand_made_element_of_a_concatenation_that_ignores_its_pieces_is_refused():
    """A Transform giving a concatenation's site an element of its group but not its pieces' elements would
    move the host's readers without the pieces' writers: refused unless marked forced. The transform
    random_intertwiner builds (the host from its pieces) is accepted and exact."""
    torch.manual_seed(0)
    model = weights(Dense(2, [2, 1], "relu")).eval().double()
    x = torch.randn(3, 3, 5, 5, dtype=F64)
    smap = wb.symmetry_map(model, x)
    host = [s for s in smap if s.embeds][-1]
    swap = torch.arange(host.n)
    swap[[0, host.n - 1]] = swap[[host.n - 1, 0]]
    lone = Transform({host.name: ScaledPermutation(swap, None)}, {host.name: host.group.name})
    with pytest.raises(InvalidOptionError, match="does not carry its pieces' elements"):
        wb.apply_transform(model, lone, example=x)
    assert changed(model, forced(model, host.name, swap, None, x), x) > 1e-6  # forced: applied, and it is wrong
    _, t = wb.random_intertwiner(model, seed=3, example=x)
    assert changed(model, wb.apply_transform(model, t, example=x), x) < 1e-10
    t_roundtrip = Transform.from_dict(t.to_dict())
    assert changed(model, wb.apply_transform(model, t_roundtrip, example=x), x) < 1e-10
