"""A parameter tied between modules whose rules move it as a parameter port (PReLU slopes, a GRN's γ and β, a
LayerNorm's gain and bias): the uses unite the spaces into one site, which then held a port under each module's
name, and the push (which composes every move of one tensor) applied the site's element once per name: slopes
``a ↦ P·P·a``. Two PReLUs sharing their slopes changed the function by 9.2 (relative), two GRNs sharing γ by 7.8, two
LayerNorms sharing their gain on a stream by 1.6, while the map claimed a symmetry. Now a site moves a tensor once
(``_shared.one_port_per_tensor``), and a tensor its ports would move differently (a GRN's γ tied to a LayerNorm's
bias) is skipped, saying why.

Every verdict is checked directly in float64 (``same_function``), never by asking ``wb.verify``.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import workbench as wb
from models import same_function

F64 = torch.float64


def _grn(c: int, channels_last: bool = True) -> nn.Module:
    from workbench.models._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from timm.layers.grn import GlobalResponseNorm

    return GlobalResponseNorm(c, channels_last=channels_last)


class TwoPReLUs(nn.Module):
    def __init__(self, c=5):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, c, 3), nn.Conv2d(c, c, 1), nn.Conv2d(c, 2, 1)
        self.act1, self.act2 = nn.PReLU(c), nn.PReLU(c)
        self.act2.weight = self.act1.weight

    def forward(self, x):
        return self.c(self.act2(self.b(self.act1(self.a(x))))).mean((2, 3))


class TwoGRNs(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, c), nn.Linear(c, c), nn.Linear(c, 2)
        self.grn1, self.grn2 = _grn(c), _grn(c)
        self.grn2.weight = self.grn1.weight

    def forward(self, x):
        h = self.grn1(F.gelu(self.a(x.permute(0, 2, 3, 1))))
        return self.c(self.grn2(F.gelu(self.b(h)))).mean((1, 2))


class TwoLayerNorms(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.a, self.m, self.c = nn.Linear(3, c), nn.Linear(c, c), nn.Linear(c, 2)
        self.ln1, self.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.ln2.weight = self.ln1.weight

    def forward(self, x):
        h = self.a(x.permute(0, 2, 3, 1))
        h = h + self.m(self.ln1(h))
        return self.c(self.ln2(h)).mean((1, 2))


class GRNAndLayerNorm(nn.Module):
    """A GRN's γ tied to the LayerNorm after it: ``gain`` (moved by the permutation part at both), or the LayerNorm's
    ``bias`` (moved by the element there): one tensor, two different moves."""

    def __init__(self, tie: str, c=6):
        super().__init__()
        self.a, self.c, self.grn, self.ln = nn.Linear(3, c), nn.Linear(c, 2), _grn(c), nn.LayerNorm(c)
        setattr(self.ln, tie, self.grn.weight)

    def forward(self, x):
        return self.c(self.ln(self.grn(F.gelu(self.a(x.permute(0, 2, 3, 1)))))).mean((1, 2))


def _random(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (a fresh PReLU's equal slopes, a GRN's zeros, a LayerNorm's ones hide a missing or
    doubled move)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.double().eval()


def _images(seed=1):
    return torch.randn(6, 3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make, tied", [(TwoPReLUs, ("act1", "act2")), (TwoGRNs, ("grn1", "grn2")),
                                        (TwoLayerNorms, ("ln1", "ln2")), (lambda: GRNAndLayerNorm("weight"), ("grn", "ln"))])
def test_a_tied_parameter_port_moves_once(make, tied):
    model, x = _random(make()), _images()
    first, second = (getattr(model, name) for name in tied)
    assert first.weight is second.weight
    smap = wb.symmetry_map(model, x[:1])
    ports = [p.name for s in smap for p in s.writers if p.name.endswith(".weight") and p.name.split(".")[0] in tied]
    assert len(ports) == 1, ports  # one tensor, one port
    (site,) = [s for s in smap if ports[0] in {p.name for p in s.writers}]
    moved = 0
    for seed in range(4):
        new, t = wb.random_intertwiner(model, seed=seed, example=x[:1])
        perm = t.elements[site.name].perm_part().perm
        assert getattr(new, tied[0]).weight is getattr(new, tied[1]).weight  # still tied
        assert torch.equal(getattr(new, tied[0]).weight, first.weight[perm])  # a ↦ P·a, once
        assert same_function(model, new, x) < 1e-10
        if not torch.equal(perm[perm], perm):  # P·P ≠ P: the doubled move is a different tensor
            twice = copy.deepcopy(new)
            with torch.no_grad():
                getattr(twice, tied[0]).weight.copy_(first.weight[perm][perm])
            assert same_function(model, twice, x) > 1e-3  # what the push did before
            moved += 1
    assert moved  # the negative control ran


def test_a_tensor_two_ports_would_move_differently_is_skipped():
    model, x = _random(GRNAndLayerNorm("bias")), _images()
    smap = wb.symmetry_map(model, x[:1])
    assert not smap.sites
    (why,) = [r for place, r in smap.skipped if "grn.weight" in place]
    assert "grn.weight and ln.bias are one tensor, moved differently" in why
    new, _ = wb.random_intertwiner(model, seed=0, example=x[:1])
    assert same_function(model, new, x) == 0
