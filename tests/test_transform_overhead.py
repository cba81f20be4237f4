"""The per-port Python overhead cut from graph-backend transforms (issue 17: Swin-T, timm's ViT) changed no bits.

- ``_port_moves._Axis.then`` now does its index arithmetic in NumPy. The torch composition it replaced is kept
  below as the reference (``_torch_then``, verbatim but for its two cached ``arange`` calls): the same draws
  pushed through either give bitwise equal weights on small ViTs and Swins (float32 and float64, the signs and
  scalings of several seeds), and every random sequence of moves composes to the same operator bit for bit.
- ``_transform._check_elements`` checks all drawn elements in one pass per kind and dtype; it refuses exactly
  what ``_check_element`` refuses, naming the same (first) site.
- ``_kernels._warm``: numba compiles one variant per argument signature, and a None scale (a global sign of +1)
  is another than an array (−1), so new compiles appeared inside later transforms; every variant a weight of the
  same structure can meet is compiled with the first.
"""
from __future__ import annotations

import bisect

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import workbench as wb
from workbench._errors import InvalidOptionError
from workbench.groups import Dense, ScaledPermutation
from workbench.symmetry import _port_moves as pm
from workbench.symmetry._transform import _check_element, _check_elements
from test_port_moves import _move
from test_vision_transformers import randomised, swin, timm_vit, tv_vit, one_thread  # noqa: F401 (fixture)


def _torch_then(self, F, sl) -> bool:
    """``_Axis.then`` before the NumPy rewrite (commit b0a7403), the reference."""
    a, b = sl if sl is not None else (0, self.L)
    parts = pm._parts(F, b - a)
    if parts is None:
        return False
    if parts[0] == "dense":
        for off, n, M, cond in parts[1]:
            s = a + off
            if s in self.blocks and self.blocks[s][0] == n:
                _, C, c0 = self.blocks[s]
                self.blocks[s] = (n, M @ C, None if c0 is None or cond is None else c0 * cond)
                continue
            i = bisect.bisect(self.starts, s)
            if (i and self.starts[i - 1] + self.blocks[self.starts[i - 1]][0] > s) or \
                    (i < len(self.starts) and self.starts[i] < s + n):
                return False
            self.starts.insert(i, s)
            self.blocks[s] = (n, M, cond)
        return True
    _, f_idx, f_scale = parts
    whole = a == 0 and b == self.L
    if whole:
        g, gs = f_idx, None if f_scale is None else f_scale.double()
    else:
        g = torch.arange(self.L)
        g[a:b] = a + f_idx
        gs = None
        if f_scale is not None:
            gs = torch.ones(self.L, dtype=torch.float64)
            gs[a:b] = f_scale.double()
    if not self.blocks:
        self.scale = gs if self.scale is None else self.scale[g] if gs is None else self.scale[g] * gs
        self.idx = g if self.idx is None else self.idx[g]
        return True
    inv = torch.empty_like(g)
    inv[g] = torch.arange(self.L)
    blocks, in_block = {}, torch.zeros(self.L, dtype=torch.bool) if gs is not None else None
    by_size: dict[int, list] = {}
    for s, (n, *_) in self.blocks.items():
        by_size.setdefault(n, []).append(s)
    for n, starts in by_size.items():
        span = torch.arange(n)
        rows = inv[torch.tensor(starts)[:, None] + span]
        if not torch.equal(rows, rows[:, :1] + span):
            return False
        for s, s2 in zip(starts, rows[:, 0].tolist()):
            _, C, cond = self.blocks[s]
            if gs is not None:
                r = gs[s2:s2 + n]
                C = r[:, None] * C
                cond = None if cond is None else cond * float(r.abs().max() / r.abs().min())
                in_block[s2:s2 + n] = True
            blocks[s2] = (n, C, cond)
    scale = None if self.scale is None else self.scale[g]
    if gs is not None:
        outside = torch.where(in_block, torch.ones_like(gs), gs)
        scale = outside if scale is None else scale * outside
    self.idx = g if self.idx is None else self.idx[g]
    self.scale, self.blocks, self.starts = scale, blocks, sorted(blocks)
    return True


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.is_floating_point() else t.numpy().tobytes()


def _same_bits(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and _bits(sa[k]) == _bits(sb[k]), k


MODELS = {
    "swin64": lambda: randomised(swin()),
    "swin32": lambda: randomised(swin()).float(),
    "swin_wide32": lambda: randomised(swin((1, 1), (3, 6), 24)).float(),
    "timm32": lambda: randomised(timm_vit()).float(),
    "timm64": lambda: randomised(timm_vit(heads=4, hidden=32)),
    "torchvision32": lambda: randomised(tv_vit()).float(),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_the_numpy_composition_gives_the_same_bits_as_the_torch_one(name, monkeypatch):
    model = MODELS[name]()
    runs = [(seed, sigma) for seed in range(4) for sigma in (1.0, 2.5)]
    new = [wb.random_intertwiner(model, seed=seed, scale_sigma=sigma)[0] for seed, sigma in runs]
    monkeypatch.setattr(pm._Axis, "then", _torch_then)
    old = [wb.random_intertwiner(model, seed=seed, scale_sigma=sigma)[0] for seed, sigma in runs]
    for a, b in zip(new, old):
        _same_bits(a, b)
    # negative control: a different draw does change the weights (the comparison can fail)
    assert _bits(new[0].state_dict()[next(k for k, v in model.state_dict().items() if v.ndim == 2)]) != \
        _bits(new[2].state_dict()[next(k for k, v in model.state_dict().items() if v.ndim == 2)])


@settings(max_examples=60, deadline=None)
@given(kinds=st.lists(st.tuples(st.integers(0, 1), st.sampled_from(["perm", "signed", "heads", "tiled", "block", "odd"])),
                      min_size=1, max_size=8), seed=st.integers(0, 1000))
def test_every_sequence_of_moves_composes_to_the_same_operator_bit_for_bit(kinds, seed):
    g = torch.Generator().manual_seed(seed)
    L = (8, 12)
    steps = [(*_move(kind, L[axis], g), axis) for axis, kind in kinds]
    own = torch.randn(*L, generator=g, dtype=torch.float64)
    new, ref = pm.Moves(own), pm.Moves(own)
    for F, sl, axis in steps:
        new.add(F, axis, sl)
        op = ref.axes.get(axis)
        if op is None:
            op = ref.axes[axis] = pm._Axis(L[axis])
        if not _torch_then(op, F, sl):  # Moves.add's fallback, with the reference composition
            ref.base = ref.value(torch.float64)
            ref.axes = {}
            ref.base = pm._act_slice(ref.base, F, axis, sl, False)
    assert set(new.axes) == set(ref.axes)
    for axis, op in new.axes.items():
        r = ref.axes[axis]
        for x, y in ((op.idx, r.idx), (op.scale, r.scale)):
            assert (x is None) == (y is None) and (x is None or (x.dtype == y.dtype and _bits(x) == _bits(y)))
        assert list(op.blocks) == list(r.blocks) and op.starts == r.starts
        for s, (n, C, cond) in op.blocks.items():
            n2, C2, cond2 = r.blocks[s]
            assert n == n2 and _bits(C) == _bits(C2) and cond == cond2
    _same_bits_tensor = _bits(new.value(torch.float64)) == _bits(ref.value(torch.float64))
    assert _same_bits_tensor


# ------------------------------------------------------------------ the drawn elements' check, batched
def _elements(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return {
        "a": ScaledPermutation(torch.randperm(5, generator=g), torch.rand(5, generator=g, dtype=dtype) + 0.5),
        "b": ScaledPermutation(torch.randperm(4, generator=g)),
        "c": Dense(torch.randn(3, 3, generator=g, dtype=torch.float64) + 3 * torch.eye(3, dtype=torch.float64)),
        "d": ScaledPermutation(torch.randperm(6, generator=g), torch.rand(6, generator=g, dtype=dtype) + 0.5),
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_batched_element_check_refuses_what_the_single_one_does_and_names_the_first_site(dtype):
    _check_elements(_elements(dtype), 1.0)  # every element fine: no refusal
    cases = [("d", "scale", 3, float("inf")), ("d", "scale", 0, 0.0), ("c", "M", (1, 2), float("nan")),
             ("a", "scale", 4, float("nan"))]
    if dtype == torch.float32:  # 1/a overflows float32 though not float64: each dtype is checked in its own
        cases.append(("a", "scale", 1, 1e-39))
    for name, attr, where, value in cases:
        elements = _elements(dtype)
        getattr(elements[name], attr)[where] = value
        with pytest.raises(InvalidOptionError, match=repr(name)) as single:
            _check_element(name, elements[name], 1.0)
        with pytest.raises(InvalidOptionError) as batched:
            _check_elements(elements, 1.0)
        assert str(batched.value) == str(single.value)
    elements = _elements(dtype)  # two bad sites: the first in order is named, as the loop over sites did
    elements["d"].scale[0] = float("inf")
    elements["a"].scale[0] = 0.0
    with pytest.raises(InvalidOptionError, match="'a'"):
        _check_elements(elements, 1.0)


def test_a_finite_dense_map_whose_entries_sum_beyond_the_range_is_not_refused():
    elements = _elements()
    elements["c"].M[0] = 1e308  # finite entries whose sum is inf: the screen flags it, the exact check clears it
    with np.errstate(over="ignore"):
        assert not np.isfinite(elements["c"].M.numpy().sum())
    _check_elements(elements, 1.0)
    elements["c"].M[1, 1] = -float("inf")  # and one that is not finite is still refused
    with pytest.raises(InvalidOptionError, match="'c'"):
        _check_elements(elements, 1.0)


def test_a_huge_sigma_is_still_refused_by_a_transform():
    with pytest.raises(InvalidOptionError, match="scale_sigma"):
        wb.random_intertwiner(randomised(timm_vit()), seed=0, scale_sigma=1e4)


# ------------------------------------------------------------------ numba: no new variants inside later transforms
def test_every_scale_and_dtype_variant_is_compiled_with_the_first_call():
    pytest.importorskip("numba")
    from workbench.symmetry import _kernels

    kernels = _kernels._kernels()
    if kernels is None:
        pytest.skip("the compiled kernels are off (WORKBENCH_NUMBA=0)")
    g = torch.Generator().manual_seed(0)
    for shape in ((40, 30), (12, 10, 3)):
        kernel = kernels[0 if len(shape) == 2 else 1]
        for row, col in ((True, True), (True, False), (False, True)):
            seen = None
            for dtype in (torch.float32, torch.float64):
                for r_on in (False, True):
                    for c_on in (False, True):
                        src = torch.randn(*shape, generator=g, dtype=dtype)
                        out, ref = torch.empty_like(src), torch.empty_like(src)
                        args = (torch.randperm(shape[0], generator=g) if row else None,
                                torch.rand(shape[0], generator=g, dtype=torch.float64) + 0.5 if r_on else None,
                                torch.randperm(shape[1], generator=g) if col else None,
                                torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5 if c_on else None)
                        _kernels.gather_scale_into(src, out, *args, torch.empty_like, fast=True)
                        _kernels.gather_scale_into(src, ref, *args, torch.empty_like, fast=False)
                        assert torch.equal(out, ref)  # the warmed variants compute what torch does
                        if seen is None:  # after the first call of this structure, nothing new is compiled
                            seen = len(kernel.signatures)
                        assert len(kernel.signatures) == seen


def test_a_transforms_draws_compile_nothing_after_the_first(one_thread):  # noqa: F811
    pytest.importorskip("numba")
    from workbench.symmetry import _kernels

    if _kernels._kernels() is None:
        pytest.skip("the compiled kernels are off (WORKBENCH_NUMBA=0)")
    model = randomised(timm_vit(heads=4, hidden=64)).float()  # weights of ≥ 2¹⁴ entries reach the kernel
    kernels = _kernels._kernels()
    wb.random_intertwiner(model, seed=0)
    counts = [len(k.signatures) for k in kernels]
    signs = set()
    for seed in range(1, 9):  # draws whose global signs differ (scale None vs an array)
        _, t = wb.random_intertwiner(model, seed=seed)
        signs.update(e.scale is None for e in t.elements.values() if isinstance(e, ScaledPermutation))
        assert [len(k.signatures) for k in kernels] == counts
    assert signs == {True, False}  # the draws did meet both variants


# ------------------------------------------------------------------ the copy's modules found through deepcopy's memo
class _OwnCopy(torch.nn.Sequential):
    """A block whose __deepcopy__ ignores the memo: its children's copies are not recorded there."""

    def __deepcopy__(self, memo):
        import copy

        return _OwnCopy(*[copy.deepcopy(m) for m in self])


@pytest.mark.parametrize("own_copy", [False, True])
def test_a_copy_with_modules_deepcopy_did_not_record_is_still_written_and_exact(own_copy):
    g = torch.Generator().manual_seed(0)
    inner = (_OwnCopy if own_copy else torch.nn.Sequential)(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5))
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), inner).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new, t = wb.random_intertwiner(model, seed=1, example=torch.randn(3, 4, dtype=torch.float64))
    assert t.elements  # something moved
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    assert torch.allclose(new(x), model(x), atol=1e-12, rtol=0)  # the function is kept, checked directly
    assert any(not torch.equal(new.state_dict()[k], v) for k, v in before.items())  # the weights did move
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # the original is untouched
