"""Names the write guard had to copy are copied in the hook by later captures of the same model: same values.

References are computed by hand on a deep copy with no hooks (tests/test_capture_once.py's ``by_hand``).
"""
import copy

import pytest
import torch
from torch import nn

import workbench as wb
from workbench.hooks._capture import _COPY_AT_CAPTURE, _COPY_SEEN, _Capture

from test_capture_once import INPLACE, Writer, by_hand


@pytest.mark.parametrize("kind", sorted(INPLACE))
def test_a_name_the_guard_copied_is_copied_in_the_hook_next_time_with_the_same_values(kind):
    torch.manual_seed(0)
    model, x = Writer(kind), torch.randn(5, 4)
    lin_ref, out_ref = by_hand(copy.deepcopy(model), x)
    _COPY_SEEN.pop(model, None)
    _, first = wb.run_with_cache(model, x, names=["lin", "head"])
    assert _COPY_SEEN[model] == {"lin"} and model not in _COPY_AT_CAPTURE  # learned, and no failure recorded
    core = _Capture(model, ["lin", "head"], device=None, budget=None)
    core.attach()
    try:
        with torch.no_grad():
            for _ in range(2):  # a second context on the same core (as harvest's next batch)
                core.reset()
                out = model(x)
                (lin,) = core.calls["lin"]
                # copied in the hook: a private value the guard no longer watches (a reference kept by mistake
                # would be watched, or, if not, overwritten: the values below would then differ)
                assert id(lin) not in core.by_reference() and id(core.calls["head"][0]) in core.by_reference()
                # and no second copy: the guard's copy would have counted the model's own memory for lin too
                assert core.needed == lin.nbytes + core.calls["head"][0].nbytes
                torch.testing.assert_close(lin, lin_ref, rtol=0, atol=0)
                torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    finally:
        core.detach()
    torch.testing.assert_close(first["lin"], lin_ref, rtol=0, atol=0)


def test_a_name_learned_in_one_context_is_not_copied_early_in_that_context():
    """The first context copies through the guard only (what it learns applies from the next context on)."""
    torch.manual_seed(0)
    model, x = Writer("method_relu_"), torch.randn(5, 4)
    _COPY_SEEN.pop(model, None)
    core = _Capture(model, ["lin"], device=None, budget=None)
    core.attach()
    try:
        with torch.no_grad():
            model(x)
            model(x)
        assert core._copy == set() and _COPY_SEEN[model] == {"lin"}
    finally:
        core.detach()


def test_a_module_no_longer_written_in_place_still_gives_exact_values():
    """A learned name whose module stops being overwritten only costs a copy."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    x = torch.randn(3, 4)
    _COPY_SEEN.pop(net, None)
    wb.run_with_cache(net, x)
    assert _COPY_SEEN[net] == {"0"}
    net[1].inplace = False
    with torch.no_grad():
        want = net[0](x)
    _, cache = wb.run_with_cache(net, x)
    torch.testing.assert_close(cache["0"], want, rtol=0, atol=0)
    torch.testing.assert_close(cache["1"], want.clamp_min(0), rtol=0, atol=0)
