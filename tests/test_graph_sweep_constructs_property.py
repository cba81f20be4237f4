"""Random compositions of the constructs the sweeps brought in (a hypothesis property): functional BatchNorm with an
activation (timm's BatchNormAct2d), zero padding of spatial axes with widths from the input's shape, concatenations,
residual additions (over a concatenation too) and blocks fx cannot trace (kept whole). Whatever the map finds, a random
intertwiner must keep the float64 outputs (``changed``, computed here, each output unit against its own scale)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import workbench as wb
from test_graph_functional_norms import BatchNormAct, randomised
from test_vision_constructs import changed

F64 = torch.float64
ACTS = [nn.ReLU, nn.GELU, nn.Tanh, nn.Identity]


class Step(nn.Module):
    """One step of a random network on C channels; ``kind`` picks the construct."""

    def __init__(self, kind: str, c: int, act):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(c, c, 3 if kind == "pad" else 1, bias=False)
        self.norm = BatchNormAct(c, act)
        if kind == "branch":
            self.block = Untraceable(c)
        if kind in ("cat", "cat_residual"):
            self.piece = nn.Conv2d(c, c // 2, 1, bias=False)
            self.other = nn.Conv2d(c // 2, c - c // 2, 3, padding=1, groups=1, bias=False)
            self.other_norm = nn.BatchNorm2d(c - c // 2)

    def forward(self, x):
        if self.kind == "pad":  # "same" padding from the input's size
            h, w = x.shape[-2:]
            x = F.pad(x, [1, 1 + w % 2 - w % 2, 1, 1 + h % 1])  # widths that are Nodes
            return self.norm(self.conv(x))
        if self.kind == "branch":
            return self.block(x)
        if self.kind in ("cat", "cat_residual"):
            a = self.piece(x)
            out = torch.cat([a, self.other_norm(self.other(a))], 1)
            if self.kind == "cat_residual":
                out += x
            return self.norm(self.conv(out))
        h = self.norm(self.conv(x))
        return h + x if self.kind == "residual" else h


class Untraceable(nn.Module):
    """A block whose forward branches on a shape: kept whole."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        if x.shape[-1] > 1:
            x = x + 0.0
        return torch.relu(self.conv(x))


def net(kinds: list, acts: list, c: int) -> nn.Module:
    steps = [Step(kind, c, act) for kind, act in zip(kinds, acts)]
    return nn.Sequential(nn.Conv2d(3, c, 1), *steps, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3))


@settings(max_examples=25, deadline=None)
@given(kinds=st.lists(st.sampled_from(["plain", "residual", "pad", "cat", "cat_residual", "branch"]), min_size=1, max_size=5),
       acts=st.lists(st.sampled_from(ACTS), min_size=5, max_size=5), c=st.sampled_from([4, 6]),
       seed=st.integers(0, 10 ** 6))
def test_random_compositions_of_the_new_constructs_transform_exactly(kinds, acts, c, seed):
    torch.manual_seed(seed)
    model = randomised(net(kinds, acts, c), seed)
    x = torch.randn(3, 3, 7, 7, dtype=F64)
    smap = wb.symmetry_map(model, x[:1])
    for s in (seed, seed + 1):
        new, _ = wb.random_intertwiner(model, seed=s, example=x[:1])
        assert changed(model, new, x) < 1e-9, ([(q.name, q.group.name) for q in smap], kinds)
