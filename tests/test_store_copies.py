"""harvest copies a value held by reference only when something outside the capture shares its memory.

The adversaries: a model that keeps its output and overwrites it in its next forward, a module that returns a
view of a buffer it rewrites, and a batch returned as it is (an Identity) and then reused by the caller. Every
batch must keep its own rows (compared here with what each batch alone produces).
"""
import numpy as np
import pytest
import torch
from torch import nn

import workbench as wb
from workbench.hooks._capture import _Capture
from workbench.hooks._harvest import _sole_owner


class KeepsOutput(nn.Module):
    """Keeps its last output and overwrites it in place at the start of the next forward."""

    def __init__(self):
        super().__init__()
        self.lin, self.last = nn.Linear(2, 3), None

    def forward(self, x):
        if self.last is not None:
            self.last.mul_(0)  # writes last batch's output after the capture stopped watching it
        self.last = self.lin(x)
        return self.last


class BufferView(nn.Module):
    """Writes its result into the first rows of a workspace buffer (``out=``) and returns that contiguous view,
    rewritten by every forward (tests/test_store_faults.py has the whole buffer returned)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("workspace", torch.zeros(8, 2))
        self.inner = nn.Identity()

    def forward(self, x):
        rows = self.workspace[:len(x)]
        torch.mul(x, 2.0, out=rows)
        return self.inner(rows)


@pytest.mark.parametrize("make", [KeepsOutput, BufferView])
@pytest.mark.parametrize("on_disk", [False, True])
def test_memory_a_later_forward_rewrites_is_copied(tmp_path, make, on_disk):
    torch.manual_seed(0)
    model = make()
    batches = [torch.randn(4, 2, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    name = "lin" if make is KeepsOutput else "inner"
    with torch.no_grad():
        want = []
        for b in batches:  # each batch alone, on a fresh copy of the model state
            fresh = make()
            fresh.load_state_dict(model.state_dict())
            want.append(fresh(b).clone().numpy())
    store = wb.harvest(model, batches, names=name, path=tmp_path / "s" if on_disk else None, progress=False)
    np.testing.assert_array_equal(store.array(name), np.concatenate(want))


def test_a_batch_returned_as_it_is_and_reused_by_the_caller_is_copied():
    buf = torch.zeros(3, 2)

    def batches():  # one tensor, refilled for every batch (as a reusing loader would)
        for i in range(4):
            buf.fill_(float(i))
            yield buf

    store = wb.harvest(nn.Sequential(nn.Identity()), batches(), names="0", progress=False)
    np.testing.assert_array_equal(store.array("0")[:, 0], np.repeat(np.arange(4.0), 3))


def test_only_values_nothing_else_shares_are_left_uncopied():
    """The rule itself: a fresh output (and the in-place ReLU output aliasing it, and an Identity of it) is the
    capture's alone; an output the model keeps, a buffer view and the input are not."""
    torch.manual_seed(0)
    keep = KeepsOutput()
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(inplace=True), nn.Identity())
    for net, x, alone in ((model, torch.randn(4, 2), {"0": False, "1": True, "2": True}),
                          (keep, torch.randn(4, 2), {"lin": False}),
                          (BufferView(), torch.randn(4, 2), {"inner": False}),
                          (nn.Sequential(nn.Identity()), torch.randn(4, 2), {"0": False})):
        core = _Capture(net, None, device=None, budget=None)
        core.attach()
        try:
            with torch.no_grad():
                net(x)
            core.check()
            sole = _sole_owner(core.calls, core.by_reference())
            got = {k: id(v[0]) in sole for k, v in core.calls.items() if k in alone}
        finally:
            core.detach()
        # "0" of the ReLU model was cloned before the in-place ReLU: private, not held by reference at all
        assert got == alone, (type(net).__name__, got)
