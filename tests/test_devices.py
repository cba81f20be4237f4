"""Models across devices: every tensor stays with the module that owns it.

This machine has no GPU, so "several devices" is a model dispatched by Hugging Face ``accelerate``
with part of it offloaded to disk and to CPU memory (its parameters then sit on the ``meta`` device
and a hook loads them for each forward). Answers are checked directly, in float64, against the same
model in memory; the offloaded files must be left as they were.
"""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import workbench as wb
from workbench._errors import InvalidOptionError
from workbench.hooks._fingerprint import model_fingerprint

accelerate = pytest.importorskip("accelerate")

F64 = torch.float64


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).double().eval()


@pytest.fixture
def dispatched(tmp_path):
    """(the model in memory, the same model dispatched: "2" offloaded to disk, "4" to CPU memory)."""
    from accelerate import dispatch_model

    model = mlp()
    device_map = {"0": "cpu", "1": "cpu", "2": "disk", "3": "cpu", "4": "disk"}
    return model, dispatch_model(copy.deepcopy(model), device_map=device_map, offload_dir=str(tmp_path / "offload"))


def offloaded_values(model):
    """What the offload hooks serve, by parameter name (the files on disk, read through accelerate)."""
    out = {}
    for name, m in model.named_modules():
        hook = getattr(m, "_hf_hook", None)
        if getattr(hook, "offload", False):
            for key in ("weight", "bias"):
                out[f"{name}.{key}"] = torch.as_tensor(hook.weights_map[key]).clone()
    return out


def test_the_fixture_really_offloads(dispatched):
    _, model = dispatched
    assert {n for n, p in model.named_parameters() if p.device.type == "meta"} == {"2.weight", "2.bias", "4.weight", "4.bias"}


def test_capture_of_an_offloaded_model_is_exact(dispatched):
    model, moved = dispatched
    x = torch.randn(5, 6, dtype=F64)
    out, cache = wb.run_with_cache(model, x, names=None)
    moved_out, moved_cache = wb.run_with_cache(moved, x, names=None)
    assert torch.equal(out, moved_out) and sorted(cache) == sorted(moved_cache)
    for name in cache:
        assert torch.equal(cache[name], moved_cache[name])
    _, kept = wb.run_with_cache(moved, x, names=None, device=None)  # where they were computed: the execution device
    assert all(kept[n].device.type == "cpu" for n in kept)


def test_a_transform_of_an_offloaded_model_is_offloaded_alike_and_preserves_the_function(dispatched):
    model, moved = dispatched
    before = offloaded_values(moved)
    x = torch.randn(7, 6, dtype=F64)
    new, transform = wb.random_intertwiner(moved, seed=3)
    # Same layout: the offloaded modules of the copy are offloaded too, and their hooks serve new weights.
    assert {n for n, p in new.named_parameters() if p.device.type == "meta"} == {"2.weight", "2.bias", "4.weight", "4.bias"}
    served = offloaded_values(new)
    assert not torch.allclose(served["2.weight"], before["2.weight"])  # the transformed weights, not the files
    with torch.no_grad():
        assert (new(x) - model(x)).abs().max() < 1e-12  # the function, checked directly in float64
    # Nothing of the original moved: its files and its meta parameters are as they were.
    after = offloaded_values(moved)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n for n, p in moved.named_parameters() if p.device.type == "meta"} == set(before)
    # The same element pushed into the in-memory model gives the same weights (the offload changes nothing).
    reference = wb.apply_transform(model, transform)
    ref = dict(reference.named_parameters())
    assert torch.allclose(served["2.weight"], ref["2.weight"], atol=1e-14, rtol=0)
    assert torch.equal(dict(new.named_parameters())["0.weight"], ref["0.weight"])
    assert wb.verify(moved, new, x, transform=transform).passed


def test_a_negative_control_through_the_offload_changes_the_function(dispatched):
    """If the copy's hooks still served the original files, a non-symmetry would go unnoticed."""
    model, moved = dispatched
    x = torch.randn(7, 6, dtype=F64)
    broken, _ = wb.random_intertwiner(moved, seed=1, group="orthogonal", allow_non_symmetry=True)
    with torch.no_grad():
        assert (broken(x) - model(x)).abs().max() > 1e-3


def test_inplace_on_offloaded_weights_is_refused_and_dtype_copies_too(dispatched):
    _, moved = dispatched
    with pytest.raises(InvalidOptionError, match=r"inplace=True cannot transform weights accelerate offloaded"):
        wb.random_intertwiner(moved, inplace=True)
    new, t = wb.random_intertwiner(moved, seed=0)
    with pytest.raises(InvalidOptionError, match=r"offloaded"):
        wb.verify(moved, new, torch.randn(2, 6, dtype=F64), transform=t, dtype=torch.float32)


def test_a_fingerprint_reads_offloaded_weights(dispatched, tmp_path):
    model, moved = dispatched
    assert model_fingerprint(moved) == model_fingerprint(model)
    hook = moved[2]._hf_hook  # another value behind the hook: another fingerprint (a resume would be refused)
    hook.weights_map = {k: torch.as_tensor(hook.weights_map[k]).clone() + (k == "bias") for k in ("weight", "bias")}
    assert model_fingerprint(moved)["parameters"] != model_fingerprint(model)["parameters"]


def test_harvest_of_an_offloaded_model_equals_the_in_memory_one(dispatched, tmp_path):
    model, moved = dispatched
    batches = [torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    a = wb.harvest(model, batches, names=["1", "3"], path=tmp_path / "a", progress=False)
    b = wb.harvest(moved, batches, names=["1", "3"], path=tmp_path / "b", progress=False)
    for name in ("1", "3"):
        np.testing.assert_array_equal(a.array(name), b.array(name))
    assert a.fingerprint["model"] == b.fingerprint["model"]


def test_capture_keeps_values_where_they_were_computed_or_moves_them_where_asked():
    model, x = mlp(), torch.randn(3, 6, dtype=F64)
    with wb.capture(model, names="1", device=None) as kept:
        out = model(x)
    assert kept["1"].device == out.device
    with wb.capture(model, names="1", device="meta") as moved:
        model(x)
    assert moved["1"].device.type == "meta" and moved["1"].shape == (3, 16)
    with wb.capture(model, names="1", dtype=torch.float32) as cast:
        model(x)
    assert cast["1"].dtype == torch.float32 and torch.equal(cast["1"], kept["1"].float())
