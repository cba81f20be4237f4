"""Spaces made of pieces (a concatenation along the channels, a zero padding of the channels) whose pieces cannot move.

A concatenation's element is the block-diagonal of its pieces' elements (DERIVATIONS §6). When every piece is a space
the rules freeze (here: slices of the channels, which are not understood), that block-diagonal is the identity: the map
listed the concatenation as a site with group GL(n), whose every draw was the identity and whose verify said "NOT
CHECKED" for a reason about hooks. It is now skipped with the reason. A channel padding read by a conv alone (no
residual sum to name it) was a site named "" (its space had no writer and no label); it is now named after the op.
Outputs are compared here, directly in float64."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import workbench as wb
from test_vision_constructs import changed, randomised

F64 = torch.float64


class SlicedCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(torch.cat([h[:, :4], h[:, 4:]], 1))


def test_a_concatenation_of_pieces_that_cannot_move_is_no_site():
    model = randomised(SlicedCat())
    x = torch.randn(16, 6, dtype=F64)
    smap = wb.symmetry_map(model, x)
    assert [s.name for s in smap] == []
    assert "no map but the identity" in dict(smap.skipped)["cat"]
    # the identity is indeed all it takes: a permutation of the concatenation's channels moves the function
    perm = torch.arange(8).flip(0)
    moved = randomised(SlicedCat())
    with torch.no_grad():
        moved.b.weight.copy_(model.b.weight[:, perm])
    assert changed(model, moved, x) > 1e-3


class PaddedChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(F.pad(torch.relu(self.a(x)), (0, 0, 0, 0, 1, 1))).mean((2, 3))


def test_a_channel_padding_read_by_a_conv_is_a_site_named_after_the_op():
    model = randomised(PaddedChannels())
    x = torch.randn(4, 3, 8, 8, dtype=F64)
    smap = wb.symmetry_map(model, x)
    assert all(s.name for s in smap) and "pad" in [s.name for s in smap]
    for seed in range(3):
        new, t = wb.random_intertwiner(model, seed=seed, example=x)
        assert changed(model, new, x) < 1e-10
        assert wb.verify(model, new, x, t).verdict == "PASS"
