"""Per-channel PReLU in the graph backend (docs/DERIVATIONS.md §3, PReLU): ``y_c = max(0, x_c) + a_c·min(0, x_c)`` is
positively homogeneous per channel and permutation-equivariant when the slopes are permuted with the channels, so its
site is P·D₊ with ``a ↦ P·a`` (``nn.PReLU(C)`` and ``F.prelu(x, a)`` with ``a`` a tensor of the model).

Every verdict is checked directly in float64 (``same_function``: each output column against its own scale), never by
asking ``wb.verify``; negative controls (slopes left in place, a hand-built permutation of the convolutions only, a
rotation) must change the outputs. Slopes are random (a fresh PReLU's equal slopes would hide a missing carry).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import workbench as wb
from models import randomise, same_function

F64 = torch.float64


def slopes(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every PReLU slope (and F.prelu parameter named ``slope``) random in [-1, 1]: distinct per channel."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("slope") or any(isinstance(m, nn.PReLU) and p is m.weight for m in model.modules()):
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 2 - 1)
    return model


def prelu_cnn(c1=8, c2=6, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, c1, 3), nn.PReLU(c1), nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2),
                          nn.PReLU(c2), nn.Conv2d(c2, 4, 1), nn.PReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    return slopes(randomise(model, seed), seed).double().eval()


def images(n=6, size=10, seed=1):
    return torch.randn(n, 3, size, size, dtype=F64, generator=torch.Generator().manual_seed(seed))


def test_per_channel_prelu_slopes_move_with_the_permutation():
    model, x = prelu_cnn(), images()
    smap = wb.symmetry_map(model, x[:1])
    assert [(s.name, s.n, s.group.name) for s in smap] == [("1", 8, "scaled_permutation"), ("4", 6, "scaled_permutation"),
                                                           ("6", 4, "scaled_permutation")]
    assert "1.weight" in {p.name for p in smap["1"].writers} and "4.weight" in {p.name for p in smap["4"].writers}
    assert not any(p.name == "6.weight" for p in smap["6"].writers)  # one slope for all: nothing to carry
    for seed in range(3):
        new, t = wb.random_intertwiner(model, seed=seed, example=x[:1])
        for site in ("1", "4"):
            e = t.elements[site]
            assert not torch.equal(e.perm, torch.arange(len(e.perm))) and (e.scale != 1).any()
            assert torch.equal(new[int(site)].weight, model[int(site)].weight[e.perm])  # a ↦ P·a (scalings: none)
        assert same_function(model, new, x) < 1e-10
        assert same_function(model, new, images(size=14, seed=5)) < 1e-10
    assert wb.verify(model, new, x, transform=t).passed


def test_slopes_left_in_place_or_a_rotation_change_the_function():
    model, x = prelu_cnn(), images()
    new, t = wb.random_intertwiner(model, seed=0, example=x[:1])
    for site in ("1", "4"):
        kept = copy.deepcopy(new)
        with torch.no_grad():
            kept[int(site)].weight.copy_(model[int(site)].weight)  # the slopes not carried
        assert same_function(model, kept, x) > 1e-3
    rotated, rt = wb.random_intertwiner(model, seed=0, sites=["1"], group="orthogonal", allow_non_symmetry=True,
                                        example=x[:1])
    assert same_function(model, rotated, x) > 1e-3
    assert not wb.verify(model, rotated, x, transform=rt).passed


def test_a_hand_built_permutation_of_the_convolutions_needs_the_slopes():
    """Move conv 0's output channels and conv 2's input channels by one permutation by hand: with the PReLU's slopes
    permuted too the function is kept (the control is well built); without, it changes."""
    model, x = prelu_cnn(), images()
    perm = torch.tensor([3, 0, 7, 1, 6, 2, 5, 4])
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved[0].weight.copy_(model[0].weight[perm])
        moved[0].bias.copy_(model[0].bias[perm])
        moved[2].weight.copy_(model[2].weight[:, perm])
    assert same_function(model, moved, x) > 1e-3
    with torch.no_grad():
        moved[1].weight.copy_(model[1].weight[perm])
    assert same_function(model, moved, x) < 1e-12


class FunctionalPReLU(nn.Module):
    """``F.prelu`` with the model's own slopes: one per channel (``slope``), one in all (``one``)."""

    def __init__(self, width=6):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, width, 3), nn.Conv2d(width, 5, 1), nn.Linear(5, 2)
        self.slope, self.one = nn.Parameter(torch.randn(width)), nn.Parameter(torch.tensor([0.3]))

    def forward(self, x):
        h = F.prelu(self.b(F.prelu(self.a(x), self.slope)), self.one)
        return self.c(h.mean((2, 3)))


def test_functional_prelu_with_a_parameter_carries_it():
    model, x = slopes(randomise(FunctionalPReLU())).double().eval(), images()
    smap = wb.symmetry_map(model, x[:1])
    assert [(s.name, s.group.name) for s in smap] == [("a", "scaled_permutation"), ("b", "scaled_permutation")]
    assert "slope" in {p.name for p in smap["a"].writers} and not any(p.name == "one" for p in smap["b"].writers)
    new, t = wb.random_intertwiner(model, seed=3, example=x[:1])
    assert torch.equal(new.slope, model.slope[t.elements["a"].perm]) and torch.equal(new.one, model.one)
    assert same_function(model, new, x) < 1e-10
    assert wb.verify(model, new, x, transform=t).passed
    with torch.no_grad():
        new.slope.copy_(model.slope)
    assert same_function(model, new, x) > 1e-3


def test_functional_prelu_with_slopes_no_transform_can_carry_is_skipped():
    class Constant(nn.Module):  # slopes made in forward: a constant of the code, not a tensor of the model
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(F.prelu(self.a(x), torch.tensor([0.1, -0.2, 0.3, 0.9], dtype=x.dtype)))

    model, x = Constant().double(), torch.randn(8, 3, dtype=F64)
    smap = wb.symmetry_map(model, x[:1])
    assert not smap.sites and "no transform can carry them" in dict(smap.skipped)["a"]
    new, _ = wb.random_intertwiner(model, seed=0, example=x[:1])
    assert same_function(model, new, x) == 0


def test_a_flattened_per_channel_prelu_is_skipped_not_a_failed_map():
    """``Flatten`` then ``nn.PReLU(C·k)``: slopes per flattened feature, not per channel. The map raised "acts on 16
    units, but n=4" for the whole model; now the place is skipped, saying why."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.PReLU(16), nn.Linear(16, 2)).double().eval()
    slopes(model)
    x = torch.randn(5, 3, 4, 4, dtype=F64)
    smap = wb.symmetry_map(model, x[:1])
    assert not smap.sites and "not its channels one by one" in dict(smap.skipped)["0"]


def test_one_prelu_called_on_two_spaces_makes_them_take_one_element():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.act = nn.Conv2d(3, 5, 3), nn.Conv2d(5, 5, 1), nn.Conv2d(5, 2, 1), nn.PReLU(5)

        def forward(self, x):
            return self.c(self.act(self.b(self.act(self.a(x)))))

    model, x = slopes(randomise(Twice())).double().eval(), images()
    smap = wb.symmetry_map(model, x[:1])
    (site,) = smap.sites
    assert site.group.name == "scaled_permutation" and {"a", "b"} <= {p.name for p in site.writers}
    assert any("shared by 2 calls" in n for n in site.notes)
    new, t = wb.random_intertwiner(model, seed=1, example=x[:1])
    assert same_function(model, new, x) < 1e-10 and not torch.equal(new.act.weight, model.act.weight)


@settings(max_examples=12, deadline=None)
@given(c1=st.integers(2, 7), c2=st.integers(2, 7), functional=st.booleans(), norm=st.booleans(),
       seed=st.integers(0, 100))
def test_random_prelu_nets_keep_their_function(c1, c2, functional, norm, seed):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, c1, 3), nn.Conv2d(c1, c2, 3, padding=1), nn.Linear(c2, 2)
            self.bn = nn.BatchNorm2d(c2) if norm else nn.Identity()
            self.act1, self.slope = nn.PReLU(c1), nn.Parameter(torch.randn(c2))

        def forward(self, x):
            h = self.act1(self.a(x))
            h = self.bn(self.b(h))
            h = F.prelu(h, self.slope) if functional else F.leaky_relu(h, 0.2)
            return self.c(h.amax((2, 3)))

    torch.manual_seed(seed)
    model, x = slopes(randomise(Net(), seed), seed).double().eval(), images(seed=seed)
    smap = wb.symmetry_map(model, x[:1])
    assert [(s.n, s.group.name) for s in smap] == [(c1, "scaled_permutation"), (c2, "scaled_permutation")]
    assert ("slope" in {p.name for p in smap[-1].writers}) == functional
    new, t = wb.random_intertwiner(model, seed=seed, example=x[:1])
    assert same_function(model, new, x) < 1e-10
    if c1 > 2:  # (two channels: the permutation may be the identity)
        kept = copy.deepcopy(new)
        with torch.no_grad():
            kept.act1.weight.copy_(model.act1.weight)
        moved = not torch.equal(t.elements["act1"].perm, torch.arange(c1))
        assert (same_function(model, kept, x) > 1e-6) == moved
