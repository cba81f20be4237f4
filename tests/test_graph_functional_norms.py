"""Two constructs found by the timm sweep (benchmarks/sweep_timm.py), checked directly in float64.

- ``F.batch_norm`` called with a BatchNorm module's own tensors — timm's ``BatchNormAct2d`` (a BatchNorm subclass whose
  forward is ``F.batch_norm`` then an activation, so the tracer enters it) in most of its CNNs. The function was
  "not understood" and froze every space around it: timm's MobileNetV2, DarkNet, MobileOne, DenseNet and DPN had 0
  sites. It now takes the BatchNorm module's rule (DERIVATIONS §6, Lemma 4). A shape read of the norm's input (timm asserts
  on ``x.ndim``) reads no values, so the writer still feeds the norm alone (then scalings go on γ, β, and a linear
  bottleneck keeps GL with the norm folded).
- ``F.pad`` with zeros on spatial axes only, including widths computed in the forward from the input's shape (timm's
  "same" padding): a map acting at each position sends the padded zeros to zeros, so the space is kept (without
  affine offsets, which would become a border effect). A width computed in the forward on the channel axis, which
  crashed the tracer (``int + Node``), freezes the space with a reason.

Each verdict: the transformed model's outputs against the original's, each output unit against its own scale
(``changed`` in test_vision_constructs), and a negative control just outside the group that must move them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import workbench as wb
from test_vision_constructs import changed, forced
from workbench._errors import InvalidOptionError

F64 = torch.float64


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in miniature: a BatchNorm whose forward calls ``F.batch_norm`` itself, then an activation."""

    def __init__(self, c, act=nn.ReLU, training_stats=False):
        super().__init__(c)
        self.act = act()
        self.training_stats = training_stats

    def forward(self, x):
        torch._assert(x.ndim == 4, "4-D input")  # a shape read, as timm's _assert: no value is read
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training or self.training_stats, self.momentum, self.eps)
        return self.act(x)


def net(c=6, act=nn.ReLU, bottleneck_act=nn.Identity, **kw):
    """conv → BNAct → conv → BN(no act: a linear bottleneck) → conv → BNAct → pool → linear."""
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), BatchNormAct(c, act, **kw),
                         nn.Conv2d(c, c + 2, 1), BatchNormAct(c + 2, bottleneck_act, **kw),
                         nn.Conv2d(c + 2, c, 1), BatchNormAct(c, act, **kw),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 4))


def randomised(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.randn(m.num_features, generator=g) * 0.5 + 1)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval().double()


def groups(smap) -> dict:
    return {s.name: s.group.name for s in smap}


@settings(max_examples=12, deadline=None)
@given(c=st.integers(2, 7), act=st.sampled_from([nn.ReLU, nn.Tanh, nn.GELU]), seed=st.integers(0, 10 ** 6))
def test_functional_batch_norm_takes_the_batchnorm_rule(c, act, seed):
    torch.manual_seed(seed)
    model = randomised(net(c, act), seed)
    x = torch.randn(3, 3, 8, 8, dtype=F64)
    smap = wb.symmetry_map(model, x[:1])
    want = {nn.ReLU: "scaled_permutation", nn.Tanh: "signed_permutation", nn.GELU: "permutation"}[act]
    # the two activation spaces take the activation's group; the linear bottleneck (a BatchNorm whose writer feeds
    # it alone, a shape read aside) takes GL, the norm folded into its writer
    assert sorted(groups(smap).values()) == sorted([want, want, "gl"]), (groups(smap), smap.skipped)
    new, t = wb.random_intertwiner(model, seed=seed, example=x[:1])
    assert changed(model, new, x) < 1e-10
    # negative control: a scaling of an activation space outside its group (GELU: none; tanh: not a sign) must move
    # the outputs
    if act is not nn.ReLU:
        first = next(s for s in smap if s.group.name == want)
        bad = forced(model, first.name, list(range(c)), [2.0] + [1.0] * (c - 1), x=x[:1])
        assert changed(model, bad, x) > 1e-6


def test_a_batch_norm_in_training_mode_is_not_the_rule():
    """``training=True`` normalises with the batch's own statistics: another map, not the running-statistics one."""
    model = randomised(net(4, training_stats=True))
    smap = wb.symmetry_map(model, torch.randn(2, 3, 8, 8, dtype=F64))
    reasons = " ".join(r for _, r in smap.skipped)
    assert "batch_norm is not understood" in reasons
    new, _ = wb.random_intertwiner(model, seed=0, example=torch.randn(2, 3, 8, 8, dtype=F64))
    x = torch.randn(4, 3, 8, 8, dtype=F64)
    assert changed(model, new, x) < 1e-10  # whatever was left moves exactly


class Mixed(nn.Module):
    """``F.batch_norm`` with tensors of two different modules, or of a module that is no BatchNorm: not the rule."""

    def __init__(self, how):
        super().__init__()
        self.conv, self.how = nn.Conv2d(3, 4, 3, padding=1), how
        self.a, self.b, self.lin = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x)
        if self.how == "two modules":
            x = F.batch_norm(x, self.a.running_mean, self.b.running_var, self.a.weight, self.a.bias, False)
        else:  # a Linear's bias as the norm's shift
            x = F.batch_norm(x, self.a.running_mean, self.a.running_var, self.a.weight, self.lin.bias, False)
        return self.head(torch.relu(x).mean((2, 3)))


@pytest.mark.parametrize("how", ["two modules", "another module's tensor"])
def test_a_batch_norm_of_tensors_from_elsewhere_is_frozen(how):
    model = randomised(Mixed(how))
    x = torch.randn(3, 3, 6, 6, dtype=F64)
    smap = wb.symmetry_map(model, x[:1])
    assert "conv" not in " ".join(s.name for s in smap), groups(smap)
    new, _ = wb.random_intertwiner(model, seed=1, example=x[:1])
    assert changed(model, new, x) < 1e-10


def test_a_batch_norm_module_reused_functionally_twice_moves_its_tensors_once():
    """One BatchNorm module's tensors in two ``F.batch_norm`` calls on two spaces: the spaces must then be the same
    map (the tensors move once), or frozen; either way the function is kept."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            bn = self.bn
            x = torch.relu(F.batch_norm(self.c1(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False))
            x = torch.relu(F.batch_norm(self.c2(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False))
            return self.head(x.mean((2, 3)))

    model = randomised(Twice())
    x = torch.randn(3, 3, 5, 5, dtype=F64)
    for seed in range(3):
        new, _ = wb.random_intertwiner(model, seed=seed, example=x[:1])
        assert changed(model, new, x) < 1e-10


class SamePad(nn.Module):
    """Like timm's "same" padding: widths computed in the forward from the input's size, zeros on spatial axes only."""

    def __init__(self, c=5, k=3, stride=2, act=nn.ReLU):
        super().__init__()
        self.k, self.stride = k, stride
        self.c1, self.c2 = nn.Conv2d(3, c, 1), nn.Conv2d(c, c, k, stride)
        self.act1, self.act2, self.head = act(), act(), nn.Linear(c, 3)

    def forward(self, x):
        x = self.act1(self.c1(x))
        ih, iw = x.shape[-2:]
        x = F.pad(x, [self.k // 2, iw % self.stride, self.k // 2, ih % self.stride])  # widths known only in the forward
        return self.head(self.act2(self.c2(x)).mean((2, 3)))


@settings(max_examples=10, deadline=None)
@given(c=st.integers(2, 6), side=st.integers(5, 9), act=st.sampled_from([nn.ReLU, nn.GELU]), seed=st.integers(0, 10 ** 6))
def test_zero_padding_of_spatial_axes_keeps_the_space(c, side, act, seed):
    torch.manual_seed(seed)
    model = SamePad(c, act=act).double().eval()
    x = torch.randn(3, 3, side, side, dtype=F64)
    smap = wb.symmetry_map(model, x[:1])
    assert len(smap) == 2, smap.skipped  # the padded space is a site (was frozen: "a padding of spatial axes")
    assert all(s.group.name == ("scaled_permutation" if act is nn.ReLU else "permutation") for s in smap)
    new, _ = wb.random_intertwiner(model, seed=seed, example=x[:1])
    assert changed(model, new, x) < 1e-10
    # negative control: a permutation pushed into the padded space's writer but not its reader moves the outputs
    site = next(s.name for s in smap if "c1" in s.name or "act1" in s.name)
    bad = wb.apply_transform(model, wb.symmetry.Transform(
        {site: wb.groups.ScaledPermutation(torch.roll(torch.arange(c), 1), torch.full((c,), 2.0, dtype=F64))},
        {site: "forced"}, [site]), example=x[:1]) if act is nn.GELU else None
    if bad is not None:
        assert changed(model, bad, x) > 1e-6


def test_affine_offsets_do_not_cross_a_spatial_zero_padding():
    """A constant offset added to every position would reach the padded border as a step: offsets are refused."""
    model = SamePad(4, act=nn.Identity).double().eval()
    x = torch.randn(2, 3, 7, 7, dtype=F64)
    smap = wb.symmetry_map(model, x[:1], affine=True)
    padded = [s for s in smap if "c1" in s.name or "act1" in s.name]
    assert padded and not padded[0].affine


class PadsChannels(nn.Module):
    """A rank-2 tensor padded on its last axis by a width computed in the forward (BoTNet's relative logits): it
    crashed the tracer (``int + Node``)."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.lin(x))
        padded = F.pad(h, [0, x.shape[0] - 1])
        return self.head(h) + padded[:, :2].sum(1, keepdim=True)


def test_a_channel_padding_of_a_width_computed_in_the_forward_is_frozen_not_a_crash():
    model = PadsChannels().double().eval()
    x = torch.randn(3, 4, dtype=F64)
    smap = wb.symmetry_map(model, x[:1])
    reasons = " ".join(r for _, r in smap.skipped)
    assert "computed in the forward" in reasons
    new, _ = wb.random_intertwiner(model, seed=0, example=x[:1])
    assert changed(model, new, x) < 1e-10


def test_a_hand_made_dense_element_is_refused_where_a_functional_batch_norm_reads_a_stream():
    """A BatchNorm reading a space that something else also reads passes only D·P: a dense map is refused."""

    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.bn, self.c2, self.head = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.Linear(4, 2)

        def forward(self, x):
            h = self.c1(x)
            bn = self.bn
            y = F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, False) + self.c2(h)
            return self.head(torch.relu(y).mean((2, 3)))

    model = randomised(Branch())
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    smap = wb.symmetry_map(model, x[:1])
    site = next(s for s in smap if "c1" in s.name or "bn" in s.name)
    assert site.group.name != "gl"
    dense = wb.groups.get_group("gl", 4).sample(seed=0)
    with pytest.raises(InvalidOptionError):
        wb.apply_transform(model, wb.symmetry.Transform({site.name: dense}, {}, [site.name]), example=x[:1])


class CatBlock(nn.Module):
    """GhostNetV3's block in miniature: a residual over a concatenation, ``cat(a, b) += s``; ``split``: a's width."""

    def __init__(self, c, depthwise=True, split=None):
        super().__init__()
        h = c // 2 if split is None else split
        self.p, self.pbn = nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h)
        self.q = nn.Conv2d(h, c - h, 3, padding=1, groups=h if depthwise and 2 * h == c else 1, bias=False)
        self.qbn = nn.BatchNorm2d(c - h)

    def forward(self, s):
        a = self.pbn(self.p(s))
        out = torch.cat([a, self.qbn(self.q(a))], 1)
        out += s
        return out


class CatNet(nn.Module):
    def __init__(self, blocks, c=8, depthwise=True, splits=None):
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, c, 1), nn.Linear(c, 3)
        splits = splits or [None] * blocks
        self.blocks = nn.Sequential(*[CatBlock(c, depthwise, sp) for sp in splits])

    def forward(self, x):
        return self.head(torch.relu(self.blocks(torch.relu(self.stem(x)))).mean((2, 3)))


@pytest.mark.parametrize("depthwise", [True, False])
@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_concatenations_meeting_in_one_stream_take_one_element_per_aligned_piece(blocks, depthwise):
    """``cat(a₁, b₁) + s`` then ``cat(a₂, b₂) + …`` in one stream: its element is blockdiag(M_a₁, M_b₁) and
    blockdiag(M_a₂, M_b₂) at once. The pieces were drawn independently and the transform changed the outputs by
    0.8 (found on timm's GhostNetV3 by the sweep): pieces on the same channels are now one site (a₁ with a₂, b₁ with
    b₂), and each transform is exact, one site at a time too."""
    model = randomised(CatNet(blocks, depthwise=depthwise))
    x = torch.randn(3, 3, 6, 6, dtype=F64)
    smap = wb.symmetry_map(model, x[:1])
    assert any("pbn" in s.name for s in smap), groups(smap)
    for seed in range(3):
        new, _ = wb.random_intertwiner(model, seed=seed, example=x[:1])
        assert changed(model, new, x) < 1e-10
    for s in smap:
        new, _ = wb.random_intertwiner(model, seed=0, sites=[s.name], example=x[:1])
        assert changed(model, new, x) < 1e-10, s.name
    # negative control: one block put back as it was (its pieces no longer moved with the others') breaks the stream
    pbn = next(s for s in smap if "pbn" in s.name)
    new, _ = wb.random_intertwiner(model, seed=0, sites=[pbn.name], example=x[:1])
    new.blocks[-1].load_state_dict(model.blocks[-1].state_dict())
    assert changed(model, new, x) > 1e-6


def test_concatenations_that_split_one_stream_differently_freeze_it():
    """Pieces that claim the same channels at different offsets cannot be one site: the stream and its pieces are
    frozen, with the reason, and the transform is exact."""
    model = randomised(CatNet(2, depthwise=False, splits=[4, 3]))
    x = torch.randn(3, 3, 6, 6, dtype=F64)
    smap = wb.symmetry_map(model, x[:1])
    assert not any("pbn" in s.name or "qbn" in s.name for s in smap), groups(smap)
    assert "two concatenations" in " ".join(r for _, r in smap.skipped)
    for seed in range(3):
        new, _ = wb.random_intertwiner(model, seed=seed, example=x[:1])
        assert changed(model, new, x) < 1e-10


class PadsNothing(nn.Module):
    """``F.pad`` with every width 0 (TensorFlow "same" padding where the input's size needs none: Hugging Face's MobileNet
    pads by widths computed from the shape, 0 on even sizes), then ``nn.ZeroPad2d`` on the spatial axes."""

    def __init__(self, c=4):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, c, 3), nn.Conv2d(c, c + 2, 1), nn.Conv2d(c + 2, 5, 3)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x):
        h = torch.relu(F.pad(self.a(x), (0, 0, 0, 0), "constant", 0.0))
        return self.c(self.pad(torch.relu(self.b(h)))).mean((2, 3))


def test_a_padding_of_width_zero_is_the_identity_and_zero_pad_modules_keep_the_space():
    """A zero-width F.pad was read as a channel padding by 0 and 0: a new space 'carrying' the old one, and
    random_intertwiner crashed (a Dense of 4 acting on a reader's 6 columns). It is the identity; nn.ZeroPad2d of the
    spatial axes keeps the space (was 'not understood')."""
    torch.manual_seed(0)
    model = PadsNothing().double().eval()
    x = torch.randn(3, 3, 8, 8, dtype=F64)
    smap = wb.symmetry_map(model, x[:1])
    assert [s.group.name for s in smap] == ["scaled_permutation", "scaled_permutation"], smap.skipped
    assert [s.n for s in smap] == [4, 6]
    new, _ = wb.random_intertwiner(model, seed=0, example=x[:1])
    assert changed(model, new, x) < 1e-10
