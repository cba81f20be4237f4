"""The fast paths of a transform give exactly what the plain ones give, and nothing they remember goes stale.

- the compiled gather-and-scale kernel (workbench/symmetry/_kernels.py) against torch's gathers: bit for
  bit, on random shapes, layouts, dtypes and values (inf, NaN, −0, subnormals), and the maximum it measures;
  everything it does not cover falls back to torch;
- ``deepcopy_module`` (workbench/_copy.py) builds the object graph ``copy.deepcopy`` builds, sharing the
  same objects with the original and within itself;
- a weight changed in place (also through ``p.data``, which bumps no version) or a module swapped between
  two transforms is read as it is now: checked on the weights and outputs directly, in float64.

Nothing here is timed (benchmarks/performance.py, group ``transform``, measures the speed).
"""
from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import workbench as wb
from workbench._copy import deepcopy_module
from workbench._errors import InvalidOptionError, MissingDependencyError
from workbench.groups import ScaledPermutation
from workbench.symmetry import _kernels

F64 = torch.float64
numba = pytest.importorskip("numba", reason="the compiled kernel needs numba (the dev extra installs it)")
# WORKBENCH_NUMBA=0 turns the compiled kernel off with numba installed: the tests that require it skip then
needs_kernel = pytest.mark.skipif(_kernels._kernels() is None, reason="WORKBENCH_NUMBA=0: the compiled kernel is off")


def buffer(like):
    return torch.empty_like(like)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({torch.float32: torch.int32, torch.float64: torch.int64}[t.dtype])


def torch_reference(src, p, r, q, c):
    out = torch.empty(src.shape, dtype=src.dtype)
    _kernels.gather_scale_into(src, out, p, r, q, c, buffer, fast=False)
    return out


# ------------------------------------------------------------------ 1. the kernel against torch's gathers
@st.composite
def cases(draw):
    R, C = draw(st.integers(1, 40)), draw(st.integers(1, 70))
    tail = draw(st.sampled_from([(), (1,), (3,), (2, 3)]))
    dtype = draw(st.sampled_from([torch.float32, F64]))
    rows, cols = draw(st.sampled_from([(True, False), (False, True), (True, True)]))
    rs, cs = draw(st.booleans()), draw(st.booleans())
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    offset = draw(st.integers(0, 17))  # the output starts anywhere, not only on a cache line
    seed = draw(st.integers(0, 2**31 - 1))
    return R, C, tail, dtype, rows, cols, rs, cs, layout, offset, seed


@needs_kernel
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_the_compiled_kernel_agrees_bit_for_bit_with_torchs_gathers(case):
    R, C, tail, dtype, rows, cols, rs, cs, layout, offset, seed = case
    g = torch.Generator().manual_seed(seed)
    shape = (R, C, *tail)
    if layout == "transposed":  # a view whose first two axes are swapped: not contiguous
        src = torch.randn((C, R, *tail), generator=g, dtype=dtype).transpose(0, 1)
    elif layout == "strided":
        src = torch.randn((R, 2 * C, *tail), generator=g, dtype=dtype)[:, ::2]
    else:
        src = torch.randn(shape, generator=g, dtype=dtype)
    flat = src.reshape(-1) if src.is_contiguous() else None
    specials = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 1e-40, -3e-310, 1e30], dtype=dtype)
    with torch.no_grad():
        idx = torch.randint(0, src.numel(), (3,), generator=g)
        view = src if flat is None else flat
        for k, i in enumerate(idx.tolist()):
            pos = torch.unravel_index(torch.tensor(i), src.shape) if flat is None else i
            view[pos] = specials[(seed + k) % len(specials)]
    p = torch.randperm(R, generator=g) if rows else None
    q = torch.randperm(C, generator=g) if cols else None
    lognormal = lambda n: torch.exp(3.0 * torch.randn(n, generator=g, dtype=F64))  # noqa: E731
    r = lognormal(R) * torch.where(torch.rand(R, generator=g) < 0.3, -1.0, 1.0).double() if rs else None
    c = lognormal(C) if cs else None
    store = torch.empty(src.numel() + offset, dtype=dtype)
    out = store[offset:].view(shape)
    peak = _kernels.gather_scale_into(src, out, p, r, q, c, buffer, fast=True)
    expected = torch_reference(src, p, r, q, c)
    assert torch.equal(bits(out), bits(expected))
    a = src.abs()
    want = float("nan") if bool(a.isnan().any()) else float(a.max())
    assert (peak != peak and want != want) or peak == want


@needs_kernel
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 700), dtype=st.sampled_from([torch.float32, F64]), scaled=st.booleans(),
       strided=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_the_vector_kernel_agrees_bit_for_bit_with_torchs_gather(n, dtype, scaled, strided, seed):
    """A bias (a vector with a row permutation and scale) goes through its own compiled loop (from
    FAST_MIN_VECTOR entries; any length with fast=True): the same bits as torch's gather and product, specials
    included, and its peak."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(2 * n if strided else n, generator=g, dtype=dtype)[:: 2 if strided else 1]
    specials = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 1e-40, -3e-310], dtype=dtype)
    with torch.no_grad():
        src[seed % n] = specials[seed % len(specials)]
    p = torch.randperm(n, generator=g)
    r = torch.exp(3.0 * torch.randn(n, generator=g, dtype=F64)) * torch.where(
        torch.rand(n, generator=g) < 0.3, -1.0, 1.0).double() if scaled else None
    out = torch.empty(n, dtype=dtype)
    peak = _kernels.gather_scale_into(src, out, p, r, None, None, buffer, fast=True)
    assert torch.equal(bits(out), bits(torch_reference(src, p, r, None, None)))
    a = src.abs()
    want = float("nan") if bool(a.isnan().any()) else float(a.max())
    assert (peak != peak and want != want) or peak == want


@needs_kernel
def test_an_index_outside_the_axis_never_reaches_the_unchecked_loops():
    """The compiled index check (one pass, int32) refuses what NumPy's min/max refused: an entry below 0 or at n
    and beyond, first or last; torch's gather, which then runs, raises. Nothing is written by the loops."""
    for n in (300, 5000):
        W, v = torch.randn(n, 64), torch.randn(n)
        for bad_value, where in ((n, 0), (-1, n - 1), (2**40, n // 2)):
            bad = torch.randperm(n)
            bad[where] = bad_value
            assert _kernels._checked_index(bad, n) is False
            for src in (W, v):
                out = torch.full_like(src, 7.0)
                with pytest.raises((IndexError, RuntimeError)):
                    _kernels.gather_scale_into(src, out, bad, None, None, None, buffer)
        good = torch.randperm(n)
        idx = _kernels._checked_index(good, n)
        assert idx.dtype == np.int32 and np.array_equal(idx, good.numpy())
    assert len(_kernels._checked_index(torch.empty(0, dtype=torch.long), 0)) == 0


@needs_kernel
def test_the_kernel_is_used_where_it_applies_and_torch_elsewhere(monkeypatch):
    W = torch.randn(256, 128)
    p, q = torch.randperm(256), torch.randperm(128)
    out = torch.empty_like(W)
    assert _kernels.gather_scale_into(W, out, p, None, q, None, buffer) is not None  # the kernel ran
    assert torch.equal(out, W[p][:, q])
    for dtype in (torch.float16, torch.bfloat16):  # dtypes numba cannot compute in: torch, same answer
        Wd, outd = W.to(dtype), torch.empty(W.shape, dtype=dtype)
        scale = torch.rand(256, dtype=F64) + 0.5
        assert _kernels.gather_scale_into(Wd, outd, p, scale, q, None, buffer) is None
        assert torch.equal(outd, Wd[p][:, q] * scale.to(dtype)[:, None])
        with pytest.raises(InvalidOptionError, match="cannot run here: dtype"):
            _kernels.gather_scale_into(Wd, outd, p, scale, q, None, buffer, fast=True)
    meta = torch.empty(256, 128, device="meta")  # another device: torch's kernels, wherever they run
    assert _kernels.gather_scale_into(meta, torch.empty_like(meta), p, None, q, None, buffer) is None
    with pytest.raises(InvalidOptionError, match="not on the CPU"):
        _kernels.gather_scale_into(meta, torch.empty_like(meta), p, None, q, None, buffer, fast=True)
    strided_out = torch.empty(128, 256).t()  # a destination that is not contiguous
    assert _kernels.gather_scale_into(W, strided_out, p, None, q, None, buffer) is None
    assert torch.equal(strided_out, W[p][:, q])
    inplace = W.clone()  # source and destination in one storage (inplace=True): staged through a buffer
    assert _kernels.gather_scale_into(inplace, inplace, p, None, q, None, buffer) is None
    assert torch.equal(inplace, W[p][:, q])
    small = torch.randn(4, 4)  # too small to repay a compiled call
    assert _kernels.gather_scale_into(small, torch.empty_like(small), torch.randperm(4), None, None, None, buffer) is None
    bad = p.clone()
    bad[0] = 256  # an index outside the weight: never read by the unchecked loop; torch's gather refuses it
    with pytest.raises((IndexError, RuntimeError)):
        _kernels.gather_scale_into(W, torch.empty_like(W), bad, None, q, None, buffer)
    monkeypatch.setattr(_kernels, "_state", {"kernels": None, "tried": True})  # numba absent
    assert _kernels.gather_scale_into(W, out, p, None, q, None, buffer) is None
    with pytest.raises(MissingDependencyError, match="numba is not available"):  # the project's error, an ImportError
        _kernels.gather_scale_into(W, out, p, None, q, None, buffer, fast=True)
    with pytest.raises(ImportError):
        _kernels.gather_scale_into(W, out, p, None, q, None, buffer, fast=True)


def mlp(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 300), nn.ReLU(), nn.Linear(300, 200), nn.LeakyReLU(0.1),
                         nn.Linear(200, 7)).to(dtype).eval()


def cnn(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 96, 3, padding=1, bias=False),
                          nn.BatchNorm2d(96), nn.ReLU(), nn.Conv2d(96, 32, 1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(32 * 8 * 8, 10))
    with torch.no_grad():
        model[3].running_mean.normal_()
        model[3].running_var.uniform_(0.5, 2.0)
    return model.to(dtype).eval()


@pytest.mark.parametrize("build,shape", [(mlp, (5, 40)), (cnn, (2, 3, 8, 8))])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_a_transform_is_the_same_with_and_without_the_kernel(build, shape, dtype, monkeypatch):
    model = build(dtype)
    monkeypatch.setattr(_kernels, "FAST_MIN_NUMEL", 0)  # every weight through the kernel
    monkeypatch.setattr(_kernels, "FAST_MIN_VECTOR", 0)  # and every bias through the vector loop
    fast, t = wb.random_intertwiner(model, seed=3)
    monkeypatch.setattr(_kernels, "_state", {"kernels": None, "tried": True})
    plain, t2 = wb.random_intertwiner(model, seed=3)
    assert t.to_dict() == t2.to_dict()
    a, b = fast.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(bits(a[k]) if a[k].is_floating_point() else a[k],
                                                    bits(b[k]) if b[k].is_floating_point() else b[k]) for k in a)
    if dtype == F64:  # and it is the same function, compared here
        x = torch.randn(shape, dtype=F64)
        with torch.no_grad():
            y, y2 = model(x), fast(x)
        assert float((y - y2).abs().max() / y.abs().max()) < 1e-10


# ------------------------------------------------------------------ 2. deepcopy_module is copy.deepcopy
class Custom(nn.Module):
    """A class that customises copying: deepcopy_module must leave it to copy.deepcopy."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.copies = 0

    def __deepcopy__(self, memo):
        new = Custom.__new__(Custom)
        nn.Module.__init__(new)
        new.lin = copy.deepcopy(self.lin, memo)
        new.copies = self.copies + 1
        return new


def zoo() -> list[nn.Module]:
    shared = nn.Linear(4, 4)
    a = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 2))  # one module twice
    b = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    b[2].weight = b[0].weight  # tied weights
    b.register_forward_hook(lambda m, i, o: o)  # a hook: a non-empty OrderedDict
    b.notes = ["plain", {"k": torch.ones(2)}, b[0].weight]  # attributes deepcopy copies too
    b.register_buffer("stat", torch.arange(3.0))
    b[0].register_buffer("frozen", torch.zeros(2), persistent=False)
    c = nn.Sequential(Custom(), nn.BatchNorm1d(3), nn.ModuleDict({"x": nn.Linear(3, 3)}), nn.ModuleList([nn.GELU()]))
    return [a, b, c]


def skeleton(root, outside: set) -> list:
    """The object graph reachable from ``root``: each object's type, whether it is one of ``outside`` (shared
    with the original rather than copied), the values of copied tensors, and where an object recurs."""
    seen, out = {}, []

    def walk(obj, path):
        if isinstance(obj, (bool, int, float, str, type(None), torch.dtype, torch.device)):
            out.append((path, repr(obj)))
            return
        if id(obj) in seen:
            out.append((path, "same object as", seen[id(obj)]))
            return
        seen[id(obj)] = path
        kind, shared = type(obj).__name__, id(obj) in outside
        if isinstance(obj, torch.Tensor):
            out.append((path, kind, shared, tuple(obj.shape), None if shared else obj.detach().tolist()))
        elif isinstance(obj, dict):
            out.append((path, kind, shared, list(obj)))
            for k, v in obj.items():
                walk(v, path + (k,))
        elif isinstance(obj, (list, tuple, set)):
            out.append((path, kind, shared, len(obj)))
            for i, v in enumerate(sorted(obj, key=repr) if isinstance(obj, set) else obj):
                walk(v, path + (i,))
        elif callable(obj) and not isinstance(obj, nn.Module):
            out.append((path, kind, shared, getattr(obj, "__qualname__", "")))
        else:
            out.append((path, kind, shared))
            for k, v in vars(obj).items():
                walk(v, path + (k,))

    walk(root, ())
    return out


def reachable(root) -> set:
    ids, stack = set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in ids or isinstance(obj, (bool, int, float, str, type(None))):
            continue
        ids.add(id(obj))
        if isinstance(obj, dict):
            stack += list(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack += list(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            stack += list(vars(obj).values())
    return ids


def test_deepcopy_module_builds_what_copy_deepcopy_builds():
    from workbench.models import ensure_torchvision_importable

    models = zoo()
    try:
        ensure_torchvision_importable()
        import torchvision

        models.append(torchvision.models.mobilenet_v3_small(num_classes=5))
    except ImportError:
        pass
    for model in models:
        params = list(model.parameters())
        seeded = {id(p): nn.Parameter(torch.zeros_like(p)) for p in params[::2]}  # as a transform seeds the memo
        fast, plain = deepcopy_module(model, dict(seeded)), copy.deepcopy(model, dict(seeded))
        outside = reachable(model) | {id(p) for p in seeded.values()}
        assert skeleton(fast, outside) == skeleton(plain, outside)
        fast.register_forward_hook(lambda m, i, o: o)  # the copy's hook dicts are its own
        assert len(model._forward_hooks) == len(plain._forward_hooks)
    assert models[2][0].copies == 0 and deepcopy_module(models[2])[0].copies == 1  # its own __deepcopy__ ran


# ------------------------------------------------------------------ 3. nothing remembered goes stale
def same_function(a, b, x) -> float:
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return float((ya - yb).abs().max() / ya.abs().max())


def test_a_weight_changed_in_place_between_transforms_is_read_as_it_is_now():
    model = mlp(F64)
    x = torch.randn(9, 40, dtype=F64)
    wb.random_intertwiner(model, seed=1)  # whatever a first call remembers
    with torch.no_grad():
        model[0].weight.data.mul_(-3.0)  # through .data: the version counter does not move
        model[0].weight.data[7, 5] = 11.0
        model[2].weight.add_(0.5)  # an ordinary in-place write
    new, t = wb.random_intertwiner(model, seed=1)
    assert same_function(model, new, x) < 1e-10
    e = t.elements["1"]  # the first writer's rows moved by the element's matrix, from the current weight
    assert torch.equal(new[0].weight, e.act(model[0].weight.detach(), 0))


def test_a_swapped_module_is_transformed_as_it_is_now():
    model = mlp(F64)
    x = torch.randn(9, 40, dtype=F64)
    wb.random_intertwiner(model, seed=0)
    model[2] = nn.Linear(300, 200).double()  # new weights, same shapes
    new, _ = wb.random_intertwiner(model, seed=0)
    assert same_function(model, new, x) < 1e-10
    assert not torch.equal(new[2].weight, model[2].weight)
    model[1] = nn.GELU()  # a new activation: a new group
    new, t = wb.random_intertwiner(model, seed=0)
    assert t.groups["1"] == "permutation" and same_function(model, new, x) < 1e-10


@pytest.mark.parametrize("inplace", [False, True])
def test_a_float16_weight_grown_through_data_is_refused_and_nothing_is_written(inplace):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)).half()
    e = ScaledPermutation(torch.randperm(16), torch.full((16,), 10.0, dtype=F64), "identity", "scaled_permutation")
    t = wb.Transform({"1": e}, {"1": "scaled_permutation"})
    wb.apply_transform(model, t)  # fits: max|W| ≈ 0.5, times 10
    with torch.no_grad():
        model[0].weight.data[3, 2] = 6e4  # the version counter does not move; 6e5 would be inf
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(InvalidOptionError, match=r"0\.weight would reach 6e\+05.*Nothing was written"):
        wb.apply_transform(model, t, inplace=inplace)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_a_weight_holding_nan_or_inf_is_refused_by_the_kernels_measurement(dtype, monkeypatch):
    monkeypatch.setattr(_kernels, "FAST_MIN_NUMEL", 0)
    model = mlp(dtype)
    for bad in (float("nan"), float("inf")):
        with torch.no_grad():
            model[2].weight.data[3, 4] = bad
        with pytest.raises(InvalidOptionError, match=r"2\.weight would reach (nan|inf)"):
            wb.random_intertwiner(model, seed=0)


@needs_kernel
def test_every_combination_of_the_kernels_specialisations_runs():
    """Each perm/scale present or absent, 2-D and 3-D, float32 and float64: one call each."""
    for (p, r, q, c), tail, dtype in itertools.product(itertools.product([0, 1], repeat=4), [(), (3,)],
                                                       [torch.float32, F64]):
        if not (p or q):
            continue
        W = torch.randn(33, 21, *tail, dtype=dtype)
        args = (torch.randperm(33) if p else None, torch.rand(33, dtype=F64) + 0.5 if r else None,
                torch.randperm(21) if q else None, torch.rand(21, dtype=F64) + 0.5 if c else None)
        out = torch.empty_like(W)
        _kernels.gather_scale_into(W, out, *args, buffer, fast=True)
        assert torch.equal(bits(out), bits(torch_reference(W, *args)))


def test_a_kernel_that_fails_to_compile_leaves_torchs_gathers_in_charge(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("LLVM says no")  # what a future numba/llvmlite that cannot lower the loops would raise

    monkeypatch.setattr(_kernels, "_state", {"kernels": (broken, broken), "tried": True})
    W, p = torch.randn(256, 128), torch.randperm(256)
    out = torch.empty_like(W)
    with caplog.at_level("WARNING"):
        assert _kernels.gather_scale_into(W, out, p, None, None, None, buffer) is None
    assert torch.equal(out, W[p]) and "LLVM says no" in caplog.text
    assert _kernels._state["kernels"] is None  # not tried again
    wrong = torch.rand(255, dtype=F64)  # a scale of the wrong length: never read past its end; torch refuses it
    monkeypatch.setattr(_kernels, "_state", {"kernels": None, "tried": False})
    with pytest.raises(RuntimeError):
        _kernels.gather_scale_into(W, out, p, wrong, None, None, buffer)
