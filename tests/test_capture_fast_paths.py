"""The capture core's per-hook and per-call shortcuts keep every value exact.

Three shortcuts save Python work on every hook or torch call of a capture; each test here builds the case
the shortcut could get wrong and checks the stored values directly against values computed by hand:
- ``_conversion`` skips nn.Module's failing ``__getattr__`` unless the module (instance or class) has a
  ``hook_conversion``: a conversion given as a class property (TransformerLens's alias wrapper) still applies;
- ``_moves``: with ``device=None`` the stored value is the module's output itself, but ``dtype=`` alone
  still converts it;
- the write guard's one-lookup path for calls that write nothing still sees ``out=`` and ``inplace``
  writes (the full list of write forms is tests/test_capture_once.py's).
And the split of the capture module keeps its imports.
"""
import pytest
import torch
from torch import nn

import workbench as wb
from workbench.hooks._intervene import _conversion


class Heads:
    """A stand-in for a TransformerLens hook conversion: [b, d] <-> [b, 2, d/2]."""

    def convert(self, t):
        return t.reshape(t.shape[0], 2, -1)

    def revert(self, t):
        return t.reshape(t.shape[0], -1)


class WithAttribute(nn.Identity):
    def __init__(self):
        super().__init__()
        self.hook_conversion = Heads()  # as TransformerLens's HookPoint sets it


class Target(nn.Module):
    def __init__(self):
        super().__init__()
        self.hook_conversion = Heads()


class WithProperty(nn.Identity):
    """TransformerLens's alias wrapper: the conversion is a property that delegates to another object."""

    def __init__(self, target):
        super().__init__()
        self._target = target

    @property
    def hook_conversion(self):
        return self._target.hook_conversion


class WithNone(nn.Identity):
    def __init__(self):
        super().__init__()
        self.hook_conversion = None


def test_conversion_is_found_as_attribute_or_property_and_absent_elsewhere():
    assert isinstance(_conversion(WithAttribute()), Heads)
    assert isinstance(_conversion(WithProperty(Target())), Heads)  # a __dict__-only check would miss it
    assert _conversion(WithNone()) is None
    assert _conversion(nn.Linear(2, 2)) is None
    assert _conversion(nn.ReLU(inplace=True)) is None


@pytest.mark.parametrize("point", [WithAttribute, lambda: WithProperty(Target())], ids=["attribute", "property"])
def test_a_conversion_given_either_way_is_applied_to_the_stored_value(point):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), point(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        _, cache = wb.run_with_cache(model, x, names=["1"])
        expected = model[0](x).reshape(5, 2, 2)  # by hand
    assert cache["1"].shape == (5, 2, 2)
    torch.testing.assert_close(cache["1"], expected, rtol=1e-12, atol=0)


def test_device_none_keeps_the_output_itself_and_dtype_alone_still_converts():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    x = torch.randn(6, 3)
    outputs = {}
    handle = model[0].register_forward_hook(lambda m, a, out: outputs.__setitem__("0", out))
    try:
        with torch.no_grad(), wb.capture(model, names=["0"], device=None) as kept:
            model(x)
        # Not written in place afterwards: held by reference, no copy.
        assert kept["0"].untyped_storage().data_ptr() == outputs["0"].untyped_storage().data_ptr()
        with torch.no_grad(), wb.capture(model, names=["0"], device=None, dtype=torch.float64) as wide:
            model(x)
    finally:
        handle.remove()
    assert wide["0"].dtype == torch.float64  # a shortcut keyed on device= alone would store float32
    torch.testing.assert_close(wide["0"], outputs["0"].double(), rtol=0, atol=0)


class OutWriter(nn.Module):
    """lin's output is overwritten through ``out=`` of a call with no in-place rule (torch.mul), then by a
    keyword ``inplace=True``; the capture must keep what lin produced."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.lin, self.head = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = self.lin(x)
        if self.how == "out":
            torch.mul(h, -2.0, out=h)
        else:
            torch.nn.functional.hardtanh(h, -0.1, 0.1, inplace=True)
        return self.head(h)


@pytest.mark.parametrize("how", ["out", "inplace_keyword"])
def test_the_guard_still_sees_out_and_inplace_writes(how):
    torch.manual_seed(2)
    model = OutWriter(how).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        lin = x @ model.lin.weight.T + model.lin.bias  # by hand, before any write
        for _ in range(2):  # the first capture copies in the guard, the second in the hook (learned)
            out, cache = wb.run_with_cache(model, x, names=["lin"], device=None)
            torch.testing.assert_close(cache["lin"], lin, rtol=1e-12, atol=1e-12)
            assert not torch.equal(cache["lin"], model.lin(x).mul(-2.0) if how == "out" else lin.clamp(-0.1, 0.1))


def test_the_capture_module_split_keeps_its_imports():
    from workbench.hooks import _capture, _capture_core
    for name in ("_Capture", "_COPY_AT_CAPTURE", "_COPY_SEEN", "inherit_copy_list", "default_budget"):
        assert getattr(_capture, name) is getattr(_capture_core, name)
    assert wb.capture is _capture.capture and wb.run_with_cache is _capture.run_with_cache
