"""A parameter port's moves, composed before they touch the tensor, then done in as few passes as possible.

A transformer's packed projection is moved by many sites: the stream's element on its columns, one GL(d_head)
map per head on row blocks of queries, keys and values, and the head permutation on whole blocks. Done one by
one (as ``_graph_stream`` did), ViT-B/16 took 1008 float64 products, a gather per head permutation and a
float64 round trip per tensor: 430 of its transform's 580 ms. Here every axis's moves are composed first into
one operator ``out = B · S · P`` along that axis: P a gather, S a diagonal, B dense blocks on disjoint ranges.
A permutation after dense blocks passes through them when it carries whole blocks (``_Axis.then``: the heads
of a packed projection), so a ViT's in-projection takes one gather (the stream's signed permutation and the
heads', ``_kernels.gather_scale_into``) and one batched product of its 3·H blocks, written into the new
model's tensor. Moves on different axes commute (row and column operations), so each axis composes alone.

Precision (``dense_ok``). Permutations are exact in any dtype; a scaling rounds once (as the module path's
kernel does). A dense block's product runs in float64 unless the weight is float32 and the block's condition
number is known and at most ``COND_MAX``. Why its error is then of the order of the forward's own rounding: a float32
dot product of length n errs by at most γ_n·(|A||W|)_ij ≈ n·u·(|A||W|)_ij (typically √n·u), against
u·|AW|_ij for the float64 product rounded once to float32 (u = 2⁻²⁴). The transformed model's forward computes
(AW)·x with dot products of length d_in and errs by ≈ √d_in·u·|AW||x| itself, and it then meets A⁻¹ (the
reader's dual), so both that rounding and the stored weight's are amplified by up to cond(A) alike. What the
float32 product adds is therefore the forward's own error times about √(n / d_in)·(|A||W| / |AW|); the last
factor is at most ‖|A|‖·‖A⁻¹‖ ≤ √n·cond(A), which ``COND_MAX`` bounds: a GL draw at the default σ = 1 has
cond ≈ 10²–3·10² (n = 64–320). Measured (benchmarks/results/coverage_vision.md): the transformed float32
ViT-B/16 against the exact function errs by 1.2e-05 relative (8e-06 with float64 products; the original's own
float32 rounding 2e-06), EfficientNet-B0 (GL(320) bottlenecks) by 2.7e-05 (6e-06; its own 3e-06); float32 verify
PASSes on all 13 vision models (largest figure 3e-05, was 2e-05). float64 models keep float64 arithmetic, and float16
and bfloat16 weights are moved in float64 and rounded once (their range check reads that value).
"""
from __future__ import annotations

import bisect
import weakref
from typing import Optional

import numpy as np
import torch

from ..groups import Dense, ScaledPermutation
from ._kernels import abs_range

# The largest condition number a dense map's product may run in float32 with (module docstring).
COND_MAX = 1e3


def dense_ok(e, dtype: torch.dtype) -> bool:
    """Whether a dense element's product with a ``dtype`` weight may run in that dtype (module docstring)."""
    return dtype == torch.float32 and isinstance(e, Dense) and e.cond is not None and e.cond <= COND_MAX


def fits(e, dtype: torch.dtype, scratch: Optional[dict] = None) -> bool:
    """Whether a scaled permutation's scales are normal numbers of ``dtype`` (so a product with them rounds
    once). Answered once per element and dtype within a push (``scratch`` lives for one push, in which the
    elements it names by id are alive): a site's element serves all of its writers."""
    if not isinstance(e, ScaledPermutation) or e.scale is None:
        return True
    key = ("fits", id(e), dtype)
    if scratch is not None and key in scratch:
        return scratch[key]
    info = torch.finfo(dtype)
    lo, hi = scale_range(e, scratch)  # NaN in either: not a normal number, and the comparisons say so
    ok = bool(hi <= info.max) and bool(lo >= info.tiny)
    if scratch is not None:
        scratch[key] = ok
    return ok


def scale_range(e: ScaledPermutation, scratch: Optional[dict] = None) -> tuple[float, float]:
    """``(min, max)`` of a scaled permutation's |scale| (NaN where it holds one; (inf, 0) for no entries),
    found once per element within a push (``scratch``, as in :func:`fits`): the dtype check of every weight the
    element moves and the range check's bound (``_graph_push._magnitude``) read the same two numbers."""
    key = ("range", id(e))
    if scratch is not None and key in scratch:
        return scratch[key]
    value = _absrange(e.scale) if e.scale.numel() else (float("inf"), 0.0)
    if scratch is not None:
        scratch[key] = value
    return value


class _Tiled:
    """``blockdiag(F, …, F)`` (k copies) acting on an axis of k·n entries: Swin's patch merging concatenates the
    channels of 2×2 neighbouring tokens, so its norm and reduction see the stream's element on each quarter."""

    def __init__(self, F, k: int):
        self.F, self.k = F, k

    def act(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        d = dim % x.ndim
        parts = x.unflatten(d, (self.k, -1))
        return self.F.act(parts, d + 1).flatten(d, d + 1)


def _act_slice(v: torch.Tensor, F, axis: int, sl: Optional[tuple[int, int]], own: bool) -> torch.Tensor:
    """``v`` moved by F along ``axis`` (only ``sl`` of it), one move at a time (``_port_moves.Moves`` falls back
    to this for moves it cannot compose). A slice is moved in place unless ``v`` is the model's own tensor."""
    axis %= v.ndim
    if sl is None:
        return F.act(v, axis)
    out = v.clone() if own else v
    part = out.narrow(axis, sl[0], sl[1] - sl[0])
    part.copy_(F.act(part, axis))
    return out


def _parts(F, n: int, numpy: bool = False):
    """``F`` acting on a range of length ``n`` as ``("perm", idx, scale)`` (out[i] = scale[i]·x[idx[i]]) or
    ``("dense", [(offset, size, M, cond)])``; None for a map not understood here. ``numpy``: a head permutation's
    ``idx`` as the read-only NumPy array :func:`_head_index` keeps (``_Axis.then``), else a tensor of its own."""
    if isinstance(F, Dense) and F.n == n:
        return "dense", [(0, n, F.M, F.cond)]
    if isinstance(F, ScaledPermutation) and F.n == n:
        return "perm", F.perm, F.scale
    if callable(getattr(F, "index", None)):  # _layout_gathers.HeadPermutation (duck-typed: a head move of whole units)
        idx = _head_index(F, n)
        return "perm", idx if numpy else torch.from_numpy(idx.copy()), None
    if isinstance(F, _Tiled) and F.F.n * F.k == n:
        m, k = F.F.n, F.k
        if isinstance(F.F, ScaledPermutation):
            idx = (torch.arange(k)[:, None] * m + F.F.perm[None, :]).reshape(-1)
            return "perm", idx, None if F.F.scale is None else F.F.scale.repeat(k)
        if isinstance(F.F, Dense):
            return "dense", [(j * m, m, F.F.M, F.F.cond) for j in range(k)]
    return None


# A head permutation's index on an axis of length n, by permutation object: plan_ports makes one per site and
# block, and its queries', keys' and values' row blocks (and a Swin bias table) ask for the same index. Held
# weakly: the permutation lives for one push. Kept as a read-only NumPy array (``_Axis.then`` composes in NumPy;
# ``_tensor`` copies a read-only array, so no composed index is ever this array itself).
_HEAD_INDEX: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _head_index(F, n: int) -> np.ndarray:
    try:
        known = _HEAD_INDEX.setdefault(F, {})
    except TypeError:  # not weakly referable or not hashable: computed each time, as before
        return _np(F.index(n))
    idx = known.get(n)
    if idx is None:
        idx = known[n] = _np(F.index(n)).copy()
        idx.flags.writeable = False
    return idx


def _head_units(F) -> Optional[tuple[int, list]]:
    """``(block, inv)`` for a head permutation of whole units (``HeadPermutation`` without ``heads``: output unit j
    reads input unit ``perm[j]``, its ``block`` entries in order, so input unit u lands on output unit ``inv[u]``);
    None for any other map. Kept with the permutation's index (``_HEAD_INDEX``), once per permutation."""
    if getattr(F, "heads", 0) is not None or type(getattr(F, "block", None)) is not int:
        return None
    try:
        known = _HEAD_INDEX.setdefault(F, {})
    except TypeError:
        return None
    hit = known.get("units")
    if hit is None:
        perm = F.perm.tolist()
        inv = [0] * len(perm)
        for j, u in enumerate(perm):
            inv[u] = j
        hit = known["units"] = (F.block, inv)
    return hit


class _Axis:
    """The composite of the moves on one axis of length L: ``out = B · diag(scale) · x[idx]``, B dense blocks
    ``start → (size, C, cond)`` on disjoint ranges (the identity elsewhere)."""

    def __init__(self, L: int):
        self.L = L
        self.idx: Optional[torch.Tensor] = None
        self.scale: Optional[torch.Tensor] = None  # float64
        self.blocks: dict[int, tuple] = {}
        self.starts: list[int] = []  # the blocks' starts, sorted

    def then(self, F, sl) -> bool:
        """Compose ``F`` (on ``sl`` of the axis, or all of it) after what is here; False where the result has no
        such form (the caller then does the moves one by one)."""
        a, b = sl if sl is not None else (0, self.L)
        if isinstance(F, Dense) and F.n == b - a:  # most moves (a head's map on its rows): no _parts tuple
            return self._block(a, F.n, F.M, F.cond)
        parts = _parts(F, b - a, numpy=True)
        if parts is None:
            return False
        if parts[0] == "dense":
            # All of F's blocks or none: on a False the caller applies F whole, so a block already composed here
            # would be applied twice (a tiled map whose later block straddles a pending one).
            saved = dict(self.blocks), list(self.starts)
            for off, n, M, cond in parts[1]:
                if not self._block(a + off, n, M, cond):
                    self.blocks, self.starts = saved
                    return False
            return True
        # The index arithmetic runs in NumPy on views of the tensors: a Swin-T transform composes ~1200 moves, each
        # a dozen small operations that cost torch 5-10 µs of dispatch apiece and NumPy about 1. Gathers of
        # integers are exact and a float64 product rounds the same (IEEE) in both, so the result is the same bits.
        _, f_idx, f_scale = parts
        f_idx = f_idx if isinstance(f_idx, np.ndarray) else _np(f_idx)
        whole = a == 0 and b == self.L
        if self.blocks and f_scale is None:  # a permutation after dense blocks (a head permutation): blocks move
            moved = self._moved_blocks(a, b, f_idx, _head_units(F))
            if moved is not None:
                if whole:
                    g = f_idx
                else:
                    g = np.arange(self.L, dtype=np.int64)
                    g[a:b] = a + f_idx
                self.idx = _tensor(g if self.idx is None else self.idx.numpy()[g])
                self.scale = None if self.scale is None else _tensor(self.scale.numpy()[g])
                self.blocks, self.starts = moved
                return True
        if whole:
            g, gs = f_idx, None if f_scale is None else _np(f_scale, np.float64)
        else:
            g = np.arange(self.L, dtype=np.int64)
            g[a:b] = a + f_idx
            gs = None
            if f_scale is not None:
                gs = np.ones(self.L, dtype=np.float64)
                gs[a:b] = _np(f_scale, np.float64)
        idx0 = None if self.idx is None else self.idx.numpy()
        scale0 = None if self.scale is None else self.scale.numpy()
        if not self.blocks:  # the common case (a stream's element on a norm, a table, a projection's columns)
            scale = gs if scale0 is None else scale0[g] if gs is None else scale0[g] * gs
            self.scale = None if scale is None else _tensor(scale)
            self.idx = _tensor(g if idx0 is None else idx0[g])
            return True
        # A block on input rows R passes g when g maps a contiguous run of outputs onto R in order: its rows then
        # take g's scales (diag(gs)·C), and the run is the block's new place.
        inv = np.empty_like(g)
        inv[g] = np.arange(self.L)
        blocks, in_block = {}, np.zeros(self.L, dtype=bool) if gs is not None else None
        by_size: dict[int, list] = {}
        for s, (n, *_) in self.blocks.items():
            by_size.setdefault(n, []).append(s)
        for n, starts in by_size.items():  # one check per block size (a packed projection: 3·H blocks of d_head)
            span = np.arange(n)
            rows = inv[np.asarray(starts)[:, None] + span]
            if not np.array_equal(rows, rows[:, :1] + span):
                return False
            if gs is None:  # a head permutation: the blocks only move
                blocks.update(zip(rows[:, 0].tolist(), map(self.blocks.__getitem__, starts)))
                continue
            for s, s2 in zip(starts, rows[:, 0].tolist()):
                _, C, cond = self.blocks[s]
                r = gs[s2:s2 + n]
                C = torch.from_numpy(r)[:, None] * C
                cond = None if cond is None else cond * float(np.abs(r).max() / np.abs(r).min())
                in_block[s2:s2 + n] = True
                blocks[s2] = (n, C, cond)
        scale = None if scale0 is None else scale0[g]
        if gs is not None:
            outside = np.where(in_block, 1.0, gs)
            scale = outside if scale is None else scale * outside
        self.idx = _tensor(g if idx0 is None else idx0[g])
        self.scale = None if scale is None else _tensor(scale)
        self.blocks, self.starts = blocks, sorted(blocks)
        return True

    def _moved_blocks(self, a: int, b: int, f_idx: np.ndarray, units: Optional[tuple] = None) -> Optional[tuple[dict, list]]:
        """``(blocks, starts)`` after the permutation ``out[a + i] = x[a + f_idx[i]]`` of ``[a, b)`` (the identity
        elsewhere), for the general path of :meth:`then` with no scale; None where that path must decide (a block
        straddles ``a`` or ``b``, or is not carried whole and in order). Only the blocks inside ``[a, b)`` are
        looked at: a head permutation moves one of a packed projection's three sections, and the general path
        checked all 3·H blocks on each (a Swin-T transform made 84 such moves at 40-90 µs each). ``units``: a head
        permutation's ``(block, inv)`` (:func:`_head_units`), where a block that is one whole unit needs no check.
        The blocks' matrices are the same objects, only their starts change: no arithmetic, the same result."""
        starts, blocks = self.starts, self.blocks
        lo, hi = bisect.bisect_left(starts, a), bisect.bisect_left(starts, b)
        if (lo and starts[lo - 1] + blocks[starts[lo - 1]][0] > a) or (hi > lo and starts[hi - 1] + blocks[starts[hi - 1]][0] > b):
            return None
        inner = starts[lo:hi]
        if not inner:
            return blocks, starts
        where: Optional[dict] = None  # an inner block's start → its new start
        if units is not None:  # a block that is one whole unit of a head permutation goes where its unit goes
            unit, inv_units = units
            where = {}
            for s in inner:
                o = s - a
                if blocks[s][0] != unit or o % unit:
                    where = None
                    break
                where[s] = a + inv_units[o // unit] * unit
        if where is None:
            m = b - a
            inv = np.empty(m, dtype=np.int64)
            inv[f_idx] = np.arange(m)  # output row (local) of each input row
            by_size: dict[int, list] = {}
            for s in inner:
                by_size.setdefault(blocks[s][0], []).append(s)
            where = {}
            for n, group in by_size.items():
                span = np.arange(n)
                rows = inv[(np.asarray(group) - a)[:, None] + span]
                if not np.array_equal(rows, rows[:, :1] + span):
                    return None
                where.update(zip(group, (a + r for r in rows[:, 0].tolist())))
        # The new dict in the general path's order (by block size, then the old order): nothing reads the order,
        # but a composed operator is compared with the general path's entry by entry (test_transform_overhead).
        groups: dict[int, list] = {}
        for s, v in blocks.items():
            groups.setdefault(v[0], []).append(s)
        new = {where.get(s, s): blocks[s] for group in groups.values() for s in group}
        return new, starts[:lo] + sorted(where.values()) + starts[hi:]

    def _block(self, s: int, n: int, M: torch.Tensor, cond) -> bool:
        """Compose the dense map M on ``[s, s + n)`` after what is here (False: it straddles a block)."""
        old = self.blocks.get(s)
        if old is not None and old[0] == n:
            _, C, c0 = old
            self.blocks[s] = (n, M @ C, None if c0 is None or cond is None else c0 * cond)
            return True
        starts = self.starts
        i = bisect.bisect(starts, s)  # the blocks are disjoint: only the neighbours can overlap
        if (i and starts[i - 1] + self.blocks[starts[i - 1]][0] > s) or (i < len(starts) and starts[i] < s + n):
            return False
        starts.insert(i, s)
        self.blocks[s] = (n, M, cond)
        return True


def _absrange(scale: torch.Tensor) -> tuple[float, float]:
    """(min, max) of |scale| (NaN where it holds one), through NumPy's view of it: a third of torch's per-call cost
    here, and one compiled pass where numba is there (``_kernels.abs_range``)."""
    return abs_range(_np(scale).reshape(-1))


def _np(t: torch.Tensor, dtype=None) -> np.ndarray:
    """A CPU tensor's values as a NumPy array (a view where no conversion is asked for)."""
    a = t.detach().cpu().numpy() if t.dtype != torch.bfloat16 else t.detach().double().cpu().numpy()
    return a if dtype is None or a.dtype == dtype else a.astype(dtype)


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A NumPy result as a tensor (no copy; arrays this class made, or read-only views it never writes)."""
    return torch.from_numpy(a if a.flags.writeable else a.copy())


class Moves:
    """The new value of one parameter (or BatchNorm vector): the model's own tensor ``own``, then port moves
    (``add``, composed lazily per axis) and float64 functions of the value so far (``apply``), in order."""

    def __init__(self, own: torch.Tensor):
        self.own = own
        self.base = own  # the model's tensor, or a float64 value of our own after a function or a flush
        self.axes: dict[int, _Axis] = {}
        # After ``value``: a bound on max|value| from what the gather read (max|W|·Π max|scale|·Π ‖C‖∞), or None.
        # A copy's range check then needs no pass of its own over the result (_graph_push).
        self.bound: Optional[float] = None

    def add(self, F, axis: int, sl: Optional[tuple[int, int]]) -> None:
        axis %= self.own.ndim
        op = self.axes.get(axis)
        if op is None:
            op = self.axes[axis] = _Axis(self.own.shape[axis])
        if type(F) is Dense and sl is not None and F.n == sl[1] - sl[0]:  # most moves (a head's map): then's first case
            done = op._block(sl[0], F.n, F.M, F.cond)
        else:
            done = op.then(F, sl)
        if not done:  # not composable: what is pending is done in float64, then F alone
            self.base = self.value(torch.float64)
            self.axes = {}
            self.base = _act_slice(self.base, F, axis, sl, False)

    def apply(self, fn) -> None:
        """``fn`` of the float64 value so far (a BatchNorm vector's move, a grouped convolution's conjugation)."""
        self.base = fn(self.value(torch.float64) if self.axes or self.base is not self.own else self.own.double())
        self.axes = {}

    def elements_ok(self, dtype: torch.dtype) -> bool:
        """Whether every pending move may run in ``dtype`` (module docstring)."""
        info = torch.finfo(dtype)
        for op in self.axes.values():
            if op.scale is not None:
                lo, hi = _absrange(op.scale)
                if not (hi <= info.max and lo >= info.tiny):  # NaN in either: False
                    return False
            if op.blocks and not (dtype == torch.float32 and all(
                    c is not None and c <= COND_MAX for _, _, c in op.blocks.values())):
                return False
        return True

    def value(self, dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None,
              memo: Optional[dict] = None) -> torch.Tensor:
        """The final value, computed in ``dtype`` (default: the tensor's own dtype where every move allows it,
        else float64), and also written into ``out`` when given (rounded to its dtype). Returned in ``dtype`` (``out``
        itself when that is its dtype; a range check reads what is returned). Never the model's own tensor.
        ``memo``: a dict that lives for one push, where the stacked dense blocks are kept (:func:`_stacked`)."""
        W = self.base
        self.bound = None
        if dtype is None:
            dtype = W.dtype if W.dtype == torch.float64 or self.elements_ok(W.dtype) else torch.float64
        if not self.axes:
            v = W.to(dtype, copy=W is self.own)
            if out is not None:
                out.copy_(v)
            return out if out is not None and out.dtype == dtype else v
        dense = [a for a, op in self.axes.items() if op.blocks]
        target = out if out is not None and out.dtype == dtype and out.shape == W.shape and out.is_contiguous() \
            and not dense else None
        X, peak = self._gathered(W.to(dtype), target)
        bound = peak
        for op in self.axes.values():
            if bound is not None and op.scale is not None:
                bound *= _absrange(op.scale)[1]
        for a in dense:
            X, norm = _blocks(X, a, self.axes[a].blocks, out if out is not None and out.dtype == dtype and a == dense[-1] else None,
                              memo)
            bound = None if bound is None else bound * norm
        self.bound = bound
        if out is not None and X is not out:
            out.copy_(X)
        return out if out is not None and out.dtype == dtype else X

    def _gathered(self, W: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        """``(X, peak)``: W with every axis's gather and scale applied (one pass for a matrix: the compiled kernel),
        and max|W| when the kernel read it (else None)."""
        ops = self.axes
        moving = {a: op for a, op in ops.items() if op.idx is not None or op.scale is not None}
        if not moving:
            return (W if W is not self.own and W is not self.base else W.clone()), None
        if W.ndim >= 2 and set(moving) <= {0, 1} and W.is_contiguous():
            from ._kernels import gather_scale_into

            out = target if target is not None else torch.empty_like(W)
            r, c = ops.get(0), ops.get(1)
            peak = gather_scale_into(W, out, r and r.idx, r and r.scale, c and c.idx, c and c.scale, torch.empty_like)
            return out, peak
        X = W
        for a, op in moving.items():
            if op.idx is not None:
                X = X.index_select(a, op.idx.to(X.device))
            if op.scale is not None:
                shape = [1] * X.ndim
                shape[a] = -1
                X = X * op.scale.to(device=X.device, dtype=X.dtype).reshape(shape)
        return (X if X is not self.own and X is not self.base else X.clone()), None


def _blocks(X: torch.Tensor, axis: int, blocks: dict, out: Optional[torch.Tensor],
            memo: Optional[dict] = None) -> tuple[torch.Tensor, float]:
    """``(Y, norm)``: X with each dense block ``start → (n, C, _)`` applied along ``axis`` (``X[R] ← C·X[R]``),
    blocks of one size on one grid as one batched product (``torch.bmm``), written into ``out`` when they cover
    the axis; ``norm`` the largest ‖C‖∞ (1 where no block acts: max|Y| ≤ norm·max|X|)."""
    L = X.shape[axis]
    Y = X.movedim(axis, 0)
    rest = Y.shape[1:]
    Y = Y.reshape(L, -1)  # a copy unless axis is 0 and X is contiguous
    by_size: dict[int, list] = {}
    for s, (n, C, _) in sorted(blocks.items()):
        by_size.setdefault(n, []).append((s, C))
    whole = len(by_size) == 1 and axis == 0 and out is not None and out.is_contiguous()
    norm = 1.0
    for n, items in by_size.items():
        starts = [s for s, _ in items]
        Cs, top = _stacked([C for _, C in items], X.dtype, X.device, memo)
        norm = max(norm, top)
        if L % n == 0 and all(s % n == 0 for s in starts):
            grid = Y.view(L // n, n, -1)
            if len(starts) == L // n:  # every block of the grid, in order
                if whole:
                    torch.bmm(Cs, grid, out=out.view(L // n, n, -1))
                    return out, norm
                Y = torch.bmm(Cs, grid).reshape(L, -1)
            else:
                k = torch.tensor([s // n for s in starts], device=X.device)
                grid.index_copy_(0, k, torch.bmm(Cs, grid.index_select(0, k)))
        else:
            for s, C in items:
                Y[s:s + n] = C.to(Y.dtype) @ Y[s:s + n]
    return Y.reshape(L, *rest).movedim(0, axis), norm


def _stacked(Cs: list, dtype: torch.dtype, device: torch.device, memo: Optional[dict]) -> tuple[torch.Tensor, float]:
    """``(S, norm)``: the blocks stacked, in ``dtype`` on ``device``, and their largest ‖C‖∞ (read in float64), once
    per list of blocks within ``memo``'s life (one push): a packed projection's weight and bias carry the same
    blocks (each head's map on its rows: the same matrices, by identity), and stacking, reducing and converting
    them again for the bias cost more than the bias's own product (Swin-T's values, replayed: 25.0-25.7 ->
    23.2-24.7 ms; ViT-B/16 92.6 -> 89.3 ms; helper 35). The entry holds the blocks themselves, so their ids cannot
    be reused by other tensors while the memo lives."""
    key = None
    if memo is not None:
        key = ("stacked", dtype, device, *map(id, Cs))
        hit = memo.get(key)
        if hit is not None:
            return hit[1], hit[2]
    S = torch.stack(Cs)
    norm = float(S.abs().sum(-1).max())
    S = S.to(device=device, dtype=dtype)
    if memo is not None:
        memo[key] = (Cs, S, norm)
    return S, norm
