"""A rank-2 hidden tensor ``[B, C]`` reshaped to rank 3 keeping its channels whole (``h.view(B, 1, C)``): its channels
are then on the last axis. The graph kept reading them on axis 1 (of size 1), so a mean over them (``.mean(2)``) passed
for a mean over positions, the map listed a site, and ``random_intertwiner`` crashed with a raw torch RuntimeError
(``INDICES element is out of DATA bounds``) pushing C channels into a reader of one column. Checked directly, float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import workbench as wb
from test_vision_constructs import changed, randomised

F64 = torch.float64


class Lifted(nn.Module):
    def __init__(self, after, width):
        super().__init__()
        self.a, self.b, self.after = nn.Linear(6, 8), nn.Linear(width, 3), after

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(self.after(h.view(h.shape[0], 1, 8)))


CASES = {  # what reads the lifted tensor, its output width, and whether the ReLU's space can still move
    "a mean over the channels": (lambda t: t.mean(2), 1, False),
    "a max over the channels": (lambda t: t.amax(-1), 1, False),
    "an average pool over the channels": (lambda t: F.avg_pool1d(t, 8).flatten(1), 1, False),
    "a slice of the channels": (lambda t: t[:, :, :4].flatten(1), 4, False),
    "a flatten back": (lambda t: t.flatten(1), 8, True),
    "a transpose and a flatten": (lambda t: t.transpose(1, 2).flatten(1), 8, True),
}


def _lifted(after, width):
    model = randomised(Lifted(after, width))
    with torch.no_grad():  # unit-variance weights: a scaling or swap of the ReLU's units shows at the output
        model.a.weight.normal_()
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_a_rank_2_tensor_lifted_to_rank_3_keeps_its_channels_on_the_last_axis(case):
    after, width, moves = CASES[case]
    model = _lifted(after, width)
    x = torch.randn(16, 6, dtype=F64)
    smap = wb.symmetry_map(model, x)
    assert [s.name for s in smap] == (["a"] if moves else [])
    for seed in range(3):
        new, t = wb.random_intertwiner(model, seed=seed, example=x)
        assert changed(model, new, x) < 1e-10
    if not moves:  # negative control: a positive scaling of one ReLU unit (in the group the map claimed) moves the
        # output, as nothing after the lift can undo it (a permutation can pass the mean or the max: not claimed either)
        scaled = _lifted(after, width)
        scaled.load_state_dict(model.state_dict())
        with torch.no_grad():
            scaled.a.weight[0] *= 3.0
            scaled.a.bias[0] *= 3.0
        assert changed(model, scaled, x) > 1e-6
