"""The gather pass of the layout push: (scaled) permutations of a weight's axes composed into one pass.

A weight in memory order is a matrix ``[rows, last axis]``; every permutation that moves it — the stream's, a head
move lifted to its axis (``HeadPermutation``), a mixture's per-expert moves of its hidden units where those are rows —
composes into one index and at most one scale per side, which ``_kernels.gather_scale_into`` applies in one pass
(numba's fused loop, else torch's gathers). ``_gather_run`` says which consecutive moves join one pass; ``_gathered``
runs it; ``_sides``/``_side``/``_rows_side`` compose the indices. Per-expert moves of the fastest axis (GPT-OSS's
gate and up) take ``_cols_run``/``_gathered_cols``, and two interleaved halves of one tensor moved alike one job on the
whole (``_fused_halves``). Used by ``_layout_push`` (and ``_graph_stream`` for ViT head moves).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._errors import InvalidOptionError
from ..groups import ScaledPermutation


class HeadPermutation:
    """A permutation of ``m`` units lifted to an axis: unit j is ``block`` consecutive entries — all of
    them in order (a key/value group's query heads; a raw projection's output features), or starting
    at ``heads[j]·block`` (the query heads of one group; the other entries stay). The axis's length is
    only known when it acts."""

    def __init__(self, perm: ScaledPermutation, block: int = 1, heads: Optional[tuple] = None):
        self.perm, self.block, self.heads = perm.perm, block, heads
        self._index: dict[int, torch.Tensor] = {}  # n -> index: one move meets W_Q, b_Q and W_O (~10 µs each)

    def index(self, n: int) -> torch.Tensor:
        """``idx`` with ``out[c] = x[idx[c]]`` on an axis of length ``n`` (the same tensor on every call: read only)."""
        idx = self._index.get(n)
        if idx is None:
            idx = self._index[n] = self._compute(n)
        return idx

    def _compute(self, n: int) -> torch.Tensor:
        if self.heads is None:
            idx = (self.perm[:, None] * self.block + torch.arange(self.block)).flatten()
            if idx.numel() != n:
                raise InvalidOptionError(f"a permutation of {self.perm.numel()} head groups of {self.block} does not fit "
                                         f"an axis of {n} heads.")
            return idx
        idx, h = torch.arange(n), torch.tensor(self.heads)
        within = torch.arange(self.block)
        idx[(h[:, None] * self.block + within).flatten()] = (h[self.perm][:, None] * self.block + within).flatten()
        return idx

    def act(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        d = dim % x.ndim
        return x.index_select(d, self.index(x.shape[d]).to(x.device))


def _gather_run(ops: list, i: int, x: torch.Tensor) -> int:
    """The end of the run of (scaled, head) permutations from ``ops[i]`` (``i``: none to fuse). Several may
    act on one axis — a key/value group's permutation, then the query heads' within each group — as long as
    at most one of those carries a scale: their composition is one index and that one scale, so each entry is
    still one gather and one product by the same factor (the same bits as one gather per move)."""
    if x.ndim < 2:
        return i
    scaled, j = set(), i
    while j < len(ops):
        a, F = ops[j]
        a %= x.ndim
        if isinstance(F, dict):  # per-head scaled permutations whose heads and acted axis are the rows (_headwise_rows)
            if not _headwise_rows(x, a, F):
                break
            axes, scale = {0, a}, any(f.scale is not None for f in F.values())
        elif isinstance(F, HeadPermutation) or (isinstance(F, ScaledPermutation) and F.n == x.shape[a]):
            axes, scale = {a}, getattr(F, "scale", None) is not None
        else:
            break
        if scale:
            if scaled & axes:
                break
            scaled |= axes
        j += 1
    return j


def _headwise_rows(x: torch.Tensor, a: int, F: dict) -> bool:
    """Whether per-head scaled permutations ``F`` (heads on axis 0, each acting on axis ``a``) join a gather pass: a 3-D
    weight whose slowest memory axes are the heads, then ``a`` (a mixture's fused gate and up projections), so that
    every head's move is a move of the rows, and composes with the other row moves into one row index (``_side``).
    Where ``a`` is the fastest axis (the experts' down projections) each head would need its own column index: those
    take ``_along``'s slice-by-slice gathers."""
    if x.ndim != 3 or a == 0 or not F:
        return False
    order = sorted(range(3), key=lambda d: -x.stride(d))
    return order[:2] == [0, a] and all(isinstance(f, ScaledPermutation) and f.n == x.shape[a] for f in F.values())


def _cols_run(ops: list, i: int, x: torch.Tensor) -> int:
    """The end of a run that ``_gathered_cols`` applies in one pass (``i``: none): per-head scaled permutations
    ``ops[i]`` of every head of a 3-D weight whose heads are its slowest memory axis and whose acted axis is its
    fastest (GPT-OSS's experts' gate and up, input-major: each expert's hidden units are columns, where
    ``_headwise_rows`` does not reach), all with scales or all without, then the moves of the other two axes that one
    gather pass takes (``_gather_run``), up to the first that acts on the columns again."""
    if x.ndim != 3 or not isinstance(ops[i][1], dict):
        return i
    a, F = ops[i][0] % 3, ops[i][1]
    order = sorted(range(3), key=lambda d: -x.stride(d))
    if (a == 0 or order[0] != 0 or order[2] != a or set(F) != set(range(x.shape[0]))
            or not all(isinstance(f, ScaledPermutation) and f.n == x.shape[a] for f in F.values())
            or len({f.scale is None for f in F.values()}) != 1):
        return i
    end, j = _gather_run(ops, i + 1, x), i + 1
    while j < end and not isinstance(ops[j][1], dict) and ops[j][0] % 3 != a:
        j += 1
    return j


def _gathered_cols(x: torch.Tensor, run: list, out: Optional[torch.Tensor], casts: dict) -> Optional[torch.Tensor]:
    """``x`` moved by ``run`` (``_cols_run``: each head's columns by its own scaled permutation, then the rows' moves)
    in one compiled pass (``_kernels.headwise_cols_into``), written into ``out`` where it is not ``x``'s storage and
    has its dtype; None, with nothing written, where the compiled loop does not run (the caller then applies the
    moves one after the other, which gives the same bits: each entry one gather and the same products in the same
    order).

    Why: GPT-OSS's experts store gate and up input-major ([experts, d_model, 2·d_mlp], interleaved), so an expert's
    move of its hidden units falls on the fastest axis, where each expert took an ``index_select`` of its own (half
    strided), then the stream's and the experts' moves a second pass and a copy into the new model."""
    from ._kernels import headwise_cols_into

    F = run[0][1]
    a = run[0][0] % 3
    order = [0, 3 - a, a]  # heads, the rows' axis, the columns (``_cols_run``)
    xm, back = x.permute(order), [order.index(d) for d in range(3)]
    E, C = xm.shape[0], xm.shape[2]
    key = ("headwise cols", id(F), C)  # the ops (and so F) live as long as the push's memo
    hit = casts.get(key)
    if hit is None or hit[0] is not F:
        perms = torch.stack([F[h].perm for h in range(E)])
        scales = None if F[0].scale is None else torch.stack([F[h].scale.double() for h in range(E)])
        hit = casts[key] = (F, perms, scales)
    (p, r), _ = _sides(xm, [(order.index(ax % 3), G) for ax, G in run[1:]], casts)  # (no column moves: _cols_run)
    into = (out is not None and out.dtype == x.dtype
            and out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr())
    res = out.permute(order) if into else torch.empty(xm.shape, dtype=x.dtype, device=x.device)
    if not headwise_cols_into(xm, res, p, r, hit[1], hit[2], memo=casts):
        return None
    return out if into else res.permute(back)


def _gathered(x: torch.Tensor, run: list, out: Optional[torch.Tensor], casts: Optional[dict] = None) -> torch.Tensor:
    """``x`` moved by ``run`` (permutations, see ``_gather_run``) in one gather pass (``_kernels.gather_scale_into``:
    numba's fused loop, else torch's gathers): ``x`` in memory order is a matrix [rows, last axis], and the
    moves of the row axes compose into one index (and one scale) over their flattened product.

    Written into ``out`` when it lies in ``x``'s memory order and is not ``x``'s storage (``inplace``).
    ``casts`` (one push's memo, see ``_along``) keeps the composed indices and scales, keyed by the moves' ids
    (they live in the push's ops until it ends) and the shape: W_K and W_V, or every reader of the stream,
    compose the same ones (~20 small tensor operations a side)."""
    from ._kernels import gather_scale_into

    order = sorted(range(x.ndim), key=lambda d: -x.stride(d))
    xm, back = x.permute(order), [order.index(d) for d in range(x.ndim)]
    if not xm.is_contiguous():
        xm = xm.contiguous()
    sides = _sides(xm, [(order.index(a % x.ndim), F) for a, F in run], {} if casts is None else casts)
    R = xm.numel() // xm.shape[-1]
    into = (out is not None and out.dtype == x.dtype and out.permute(order).is_contiguous()
            and out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr())
    res = out.permute(order) if into else torch.empty(xm.shape, dtype=x.dtype, device=x.device)
    (p, r), (q, c) = sides
    # the same memo keeps each composed side's checked index and cast scale for the kernel (a side is one tensor
    # object across the weights that share it, see _sides)
    gather_scale_into(xm.reshape(R, -1), res.view(R, -1), p, r, q, c, torch.empty_like, memo=casts)
    return out if into else res.permute(back)


def _sides(xm: torch.Tensor, run: list, memo: dict) -> list:
    """``[(index, scale) of the rows, (index, scale) of the columns]`` of ``xm`` (memory order: rows are every
    axis but the last) for ``run``'s moves, given as ``(memory axis, move)``; None where nothing moves.
    ``memo`` (one push's, see ``_gathered``) keeps each side by the ids of the moves on its axes and its shape:
    the stream's move is every reader's column side (W_Q, W_K, W_V, W_in, ...), a layer's head move that of
    W_K and W_V."""
    ndim = xm.ndim
    sides = []  # (index, scale) of the rows (memory axes but the last) and of the columns (the last)
    for axes in (range(ndim - 1), [ndim - 1]):
        key = ("side", tuple((m, id(F)) for m, F in run if m in axes), tuple(xm.shape[m] for m in axes))
        side = memo.get(key)
        if side is None:
            side = memo[key] = _side(xm, [(m, F) for m, F in run if m in axes], axes)
        sides.append(side)
    return sides


def _side(xm: torch.Tensor, run: list, axes) -> tuple:
    """One side of ``_sides``: the moves of ``run`` (all on ``axes``) as one index and scale over those axes."""
    if any(isinstance(F, dict) for _, F in run):
        return _rows_side(xm, run)
    moves: dict[int, tuple] = {}  # memory axis -> (index, scale or None): its moves composed in order
    for m, F in run:
        i_F = F.index(xm.shape[m]) if isinstance(F, HeadPermutation) else F.perm
        s_F = getattr(F, "scale", None)
        if m in moves:  # after (i, s): out[c] = x[i[f[c]]]·s[f[c]]·s_F[c], one of s, s_F None (``_gather_run``)
            i, s = moves[m]
            moves[m] = (i[i_F], s_F if s is None else s[i_F])
        else:
            moves[m] = (i_F, s_F)
    idx, scale = None, None
    if any(m in moves for m in axes):
        idx, scale = torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.float64)
        for m in axes:
            n = xm.shape[m]
            i_m, s_m = moves.get(m, (None, None))
            i_m = torch.arange(n) if i_m is None else i_m
            idx = (idx[:, None] * n + i_m[None, :]).flatten()
            scale = scale.repeat_interleave(n) if s_m is None else (scale[:, None] * s_m.double()[None, :]).flatten()
        if all(moves.get(m, (None, None))[1] is None for m in axes):
            scale = None
    return idx, scale


def _rows_side(xm: torch.Tensor, run: list) -> tuple:
    """The row side of a 3-D weight in memory order ``[heads, n, columns]`` whose moves include per-head scaled
    permutations (``_headwise_rows``): every move as an index (and scale) over the ``heads·n`` rows, composed in order
    as moves of one axis are (``_side``: ``out[c] = x[i[f[c]]]·s[f[c]]·s_F[c]``, one of the two scales None). A per-head
    move sends row ``(h, c)`` to ``(h, f_h[c])`` (heads it does not name stay), a move of the heads ``(h, c)`` to
    ``(f[h], c)``, a move of the n axis ``(h, c)`` to ``(h, f[c])``."""
    E, n = xm.shape[0], xm.shape[1]
    rows = torch.arange(E * n).view(E, n)
    idx, scale = None, None
    for m, F in run:
        if isinstance(F, dict):
            i_F, s_F = rows.clone(), None
            if any(f.scale is not None for f in F.values()):
                s_F = torch.ones(E, n, dtype=torch.float64)
            for h, f in F.items():
                i_F[h] = h * n + f.perm
                if f.scale is not None:
                    s_F[h] = f.scale.double()
        else:
            i_m = F.index(xm.shape[m]) if isinstance(F, HeadPermutation) else F.perm
            s_m = getattr(F, "scale", None)
            i_F = i_m[:, None] * n + torch.arange(n)[None, :] if m == 0 else rows[:, :1] + i_m[None, :]
            s_F = None if s_m is None else (s_m.double()[:, None].expand(E, n) if m == 0 else s_m.double()[None, :].expand(E, n))
        i_F, s_F = i_F.flatten(), None if s_F is None else s_F.flatten()
        if idx is None:
            idx, scale = i_F, s_F
        else:
            idx, scale = idx[i_F], s_F if scale is None else scale[i_F]
    return idx, scale


def _fused_halves(weights: dict) -> list:
    """``weights``' ``(src, dst, ops)`` (by key), with each pair of interleaved halves — the even and the odd entries of
    one tensor's fastest axis, in the source and in the destination — whose moves agree but for their moves of that
    axis taken as ONE ``(whole src, whole dst, ops)``, those moves interleaved (``_interleave``): GPT-OSS's gate and up
    (``gate_up_proj`` [experts, d_model, 2·d_mlp], gate at even columns, up at odd; their biases likewise).

    Why: each half was a pass of its own (``_gathered_cols``) that read every cache line of the whole tensor and wrote
    every line of the new one half at a time, 2.7 ms each a layer at the coverage table's shape, against one pass over
    the whole, whose rows are read once and written whole. Each entry is the same gather and the same products in the
    same order as before: the same bits."""
    def place(x, shift=0):
        return x.untyped_storage().data_ptr(), x.storage_offset() + shift, tuple(x.shape), x.stride()

    odd = {place(x): k for k, (x, _, _) in weights.items() if x.ndim and min(x.stride()) == 2}
    fused, taken = {}, set()  # even half's key -> the whole's job; the keys the jobs take
    for k, (x, _, _) in weights.items():
        k2 = odd.get(place(x, 1)) if x.ndim and min(x.stride()) == 2 else None
        if k2 is not None and not {k, k2} & taken and (job := _whole(weights[k], weights[k2])) is not None:
            fused[k] = job
            taken |= {k, k2}
    return [fused.get(k, w) for k, w in weights.items() if k in fused or k not in taken]


def _whole(even: tuple, odd: tuple) -> Optional[tuple]:
    """The job of the tensor whose even and odd entries on its fastest axis are ``even``'s and ``odd``'s source
    (``_fused_halves``), or None where their destinations are not one tensor's halves too, or their moves do not
    interleave."""
    (x, y, ops), (_, y2, ops2) = even, odd
    a = x.stride().index(2)
    if (y.shape != x.shape or y.stride() != y2.stride() or y.stride(a) != 2 or len(ops) != len(ops2)
            or y.untyped_storage().data_ptr() != y2.untyped_storage().data_ptr()
            or y2.storage_offset() != y.storage_offset() + 1):
        return None

    def whole(t):
        shape, stride = list(t.shape), list(t.stride())
        shape[a], stride[a] = 2 * shape[a], 1
        w = t.as_strided(shape, stride, t.storage_offset())
        order = sorted(range(w.ndim), key=lambda d: -w.stride(d))
        return w if w.permute(order).is_contiguous() else None  # each entry once (no other axis overlaps them)

    moves = []
    for (b, F), (b2, G) in zip(ops, ops2):
        b, b2 = b % x.ndim, b2 % x.ndim
        if b != b2:
            return None
        if b != a:  # a move of the other axes: the same one on both halves
            H = F if F is G else None
        elif isinstance(F, dict) and isinstance(G, dict) and F.keys() == G.keys():  # per-head moves of the axis
            H = {h: _interleave(F[h], G[h]) for h in F}
            H = None if None in H.values() else H
        else:
            H = _interleave(F, G)
        if H is None:
            return None
        moves.append((b, H))
    wx, wy = whole(x), whole(y)
    return None if wx is None or wy is None else (wx, wy, moves)


def _interleave(f, g) -> Optional[ScaledPermutation]:
    """One move of a whole axis from the moves ``f`` of its even entries and ``g`` of its odd ones: whole entry 2j is
    ``f``'s entry j, 2j + 1 ``g``'s (the index 2·f.perm[j], resp. 2·g.perm[j] + 1, the scales likewise); None where
    either is not a scaled permutation or one has scales and the other not (ones in their place would multiply by 1: a
    signalling NaN comes back quiet). An index outside its half is refused (InvalidOptionError; the compiled pass would
    refuse the whole's index too, 2i + b lying in the whole's axis exactly when i lies in the half's, and torch's gather
    after it raise its own IndexError)."""
    from ._kernels import _checked_index

    if not (isinstance(f, ScaledPermutation) and isinstance(g, ScaledPermutation) and f.n == g.n
            and (f.scale is None) == (g.scale is None)):
        return None
    if _checked_index(f.perm, f.n) is False or _checked_index(g.perm, g.n) is False:
        raise InvalidOptionError(f"a move of the interleaved halves of a weight (GPT-OSS's gate and up) names an index "
                                 f"outside 0..{f.n - 1}: {f.perm.tolist()[:12]}, {g.perm.tolist()[:12]}")
    perm = torch.stack((2 * f.perm, 2 * g.perm + 1), -1).flatten()
    return ScaledPermutation(perm, None if f.scale is None else torch.stack((f.scale, g.scale), -1).flatten())
