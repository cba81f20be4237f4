"""One pass per weight: ``out[i, j, …] = src[p[i], q[j], …] · r[i] · c[j]`` (a scaled permutation on axis 0,
another on axis 1), the step every transform of a weight takes.

Why a compiled kernel (measured on this project's 2-core AMD EPYC, one thread, a 2048×2048 float32
weight, min of 30): a clone of the weight takes 1.2–1.3 ms. torch's kernels need a row gather
(``index_select`` dim 0), a column gather (dim 1) and two in-place products: 7.7 ms. A column gather
reads each source row in a random order, so the hardware prefetcher cannot see which row comes next.
The loops in ``_kernels_numba.py`` walk the source rows in order (writing the permuted output rows with
non-temporal stores), prefetch the next row, and gather each output line into a vector register:
rows and columns permuted 1.66 ms, rows only 0.96 ms (below a clone). AVX-512's hardware gather measured
slower than the scalar loads here, even from L1 (1.77 vs 1.44 ms). numba compiles the loops
(``cache=True``: once per machine); no well-kept library offers a fused permute-and-scale, and torch's
own kernels are the fallback.

numba is optional (the ``fast`` extra; ``dev`` and the benchmarks install it). Without it, or for anything it
does not cover (a device other than the CPU, dtypes other than float32/float64, a destination that is
not contiguous or overlaps the source, weights too small to repay the call), the torch path runs.
Both compute the same thing in the same order, gather then ``× r`` rounded to the dtype then ``× c``
rounded, so the two give bitwise identical weights (tests/test_transform_speed.py checks it).
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from .._errors import InvalidOptionError, MissingDependencyError
from .._numba import compiled, give_up

# Below this many elements a matrix's compiled call (its arguments' preparation, ~10–30 µs) outweighs what it
# saves; a vector (a bias: one gather and one product) repays its much cheaper call from this length.
FAST_MIN_NUMEL = 1 << 14
FAST_MIN_VECTOR = 256
_FAST_DTYPES = (torch.float32, torch.float64)
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}
_state: dict = {"kernels": None, "tried": False}


def gather_scale_into(src: torch.Tensor, out: torch.Tensor, row_perm: Optional[torch.Tensor],
                      row_scale: Optional[torch.Tensor], col_perm: Optional[torch.Tensor],
                      col_scale: Optional[torch.Tensor], buffer: Callable[[torch.Tensor], torch.Tensor],
                      *, fast: Optional[bool] = None, memo: Optional[dict] = None) -> Optional[float]:
    """``out = (src[row_perm][:, col_perm] · row_scale[:, None]) · col_scale[None, :]`` along axes 0 and 1,
    each factor rounded to ``out``'s dtype as it is applied (a missing perm or scale: none on that axis).

    ``src`` and ``out`` have one shape (axes after 1 are carried along); ``buffer(like)`` gives scratch
    memory shaped like ``like`` for the torch path. ``fast``: None picks the compiled kernel where it
    applies, False forces the torch path, True requires the kernel (tests): ``MissingDependencyError``
    without numba (or with ``WORKBENCH_NUMBA=0``), ``InvalidOptionError`` for arguments it does not take
    (as ``groups._haar.haar_reflections``).
    Returns the largest ``|src|`` (NaN if any is NaN) when the compiled kernel ran, which read all of it
    anyway; None after the torch path. ``memo``: see ``_run_fast`` (a push's scratch dict).
    """
    if fast and _kernels() is None:  # before the arguments: without numba no argument could run
        raise MissingDependencyError("the compiled transform kernel was required (fast=True) but numba is not "
                                     "available (or WORKBENCH_NUMBA=0); install the 'fast' extra, or pass fast=None "
                                     "to use torch's gathers")
    if fast is not False and _fast_applies(src, out, row_perm, col_perm, strict=fast is True):
        kernels = _kernels()
        peak = None if kernels is None else _run_fast(kernels, src, out, row_perm, row_scale, col_perm, col_scale, memo)
        if peak is not None:
            return peak
        if fast and _kernels() is None:  # the loops failed to compile just now (give_up logged why)
            raise MissingDependencyError("the compiled transform kernel was required (fast=True) but numba could not "
                                         "compile it (see the warning logged); pass fast=None to use torch's gathers")
        if fast:  # numba is there, but an index outside the weight (or a scale of the wrong length)
            raise InvalidOptionError("the compiled transform kernel (fast=True) cannot use these permutations or "
                                     "scales (an index outside the weight, or a length that differs from its axis); "
                                     "pass fast=None to use torch's gathers, which name what is wrong")
    _torch_path(src, out, row_perm, row_scale, col_perm, col_scale, buffer)
    return None


def _torch_path(src, out, row_perm, row_scale, col_perm, col_scale, buffer) -> None:
    """torch's kernels: each gather into new memory (or ``out``), then the two in-place products."""
    staged = src
    if row_perm is not None:
        target = out if col_perm is None and src.data_ptr() != out.data_ptr() else buffer(src)
        torch.index_select(src, 0, row_perm.to(src.device), out=target)
        staged = target
    if col_perm is not None:
        target = out if staged.data_ptr() != out.data_ptr() else buffer(src)
        torch.index_select(staged, 1, col_perm.to(src.device), out=target)
        staged = target
    if staged.data_ptr() != out.data_ptr():
        out.copy_(staged)
    for axis, scale in ((0, row_scale), (1, col_scale)):
        if scale is not None:
            shape = [1] * out.ndim
            shape[axis] = -1
            out.mul_(scale.to(device=out.device, dtype=out.dtype).reshape(shape))


def _fast_applies(src, out, row_perm, col_perm, strict: bool) -> bool:
    why = None
    if src.device.type != "cpu" or out.device.type != "cpu":
        why = "not on the CPU"
    elif src.dtype != out.dtype or out.dtype not in _FAST_DTYPES:
        why = f"dtype {src.dtype} → {out.dtype}"
    elif out.ndim == 1 and (row_perm is None or col_perm is not None or src.shape != out.shape):
        why = "not a vector with a permuted axis"
    elif out.ndim != 1 and (out.ndim < 2 or src.shape != out.shape or (row_perm is None and col_perm is None)):
        why = "not a matrix with a permuted axis"
    elif not out.is_contiguous():
        why = "a destination that is not contiguous"
    elif not strict and out.numel() < (FAST_MIN_VECTOR if out.ndim == 1 else FAST_MIN_NUMEL):
        why = "too small to repay the call"
    elif _overlaps(src, out):
        why = "a destination that overlaps the source"
    elif src.requires_grad and torch.is_grad_enabled():
        why = "a source that needs gradients"
    if why is not None and strict:
        raise InvalidOptionError(f"the compiled kernel cannot run here: {why}; pass fast=None to use torch's gathers")
    return why is None


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    return True  # one storage: conservatively, the torch path (it stages through a buffer)


def _checked_index(perm: Optional[torch.Tensor], n: int, shape: Optional[tuple] = None):
    """The permutation as a NumPy array the kernel may index with unchecked, or False where an entry lies
    outside [0, n) (a compiled loop without bounds checks would read outside the weight; torch's gather,
    which then runs, raises). ``shape``: the index's shape, ``(n,)`` unless given (the per-head column pass's
    ``[heads, n]``: one index of n columns per head)."""
    if perm is None:
        return None
    perm = perm.detach()
    if perm.device.type != "cpu":
        perm = perm.cpu()
    shape = (n,) if shape is None else tuple(shape)
    if tuple(perm.shape) != shape or perm.dtype != torch.long:
        return False
    index = perm.numpy().reshape(-1)
    # int32 where it holds every index: the column gather reads one index per element, and half the bytes
    # took a tenth off the 2048×2048 weight's pass (measured). Checked and cast in one compiled pass where
    # numba is there (empty: an entry outside [0, n))
    kernels = _kernels()
    if kernels is not None and 0 < n <= 2**31:
        try:
            small = kernels[3](index, n)
        except Exception as exc:  # noqa: BLE001 — as in _run_fast: torch's kernels from now on
            give_up(_state, "kernels", "the compiled transform kernel", exc, "transforms use torch's gathers")
        else:
            return small.reshape(shape) if len(small) == index.size else False
    # NumPy's min, max and cast: the same answers as torch's, at half the call overhead
    if index.size and (int(index.min()) < 0 or int(index.max()) >= n):
        return False
    return (index.astype(np.int32) if n <= 2**31 else index).reshape(shape)


def _scale(scale: Optional[torch.Tensor], dtype: torch.dtype, n: int, shape: Optional[tuple] = None):
    """The scale in the weight's dtype (the same rounding as the torch path's ``scale.to(dtype)``), or False
    where it is not ``n`` numbers (the torch path's product then raises); ``shape``: as ``_checked_index``'s."""
    if scale is None:
        return None
    if tuple(scale.shape) != ((n,) if shape is None else tuple(shape)):
        return False
    scale = scale.detach()
    if scale.device.type == "cpu" and scale.dtype in _FAST_DTYPES:  # NumPy's cast rounds as torch's (IEEE)
        return np.ascontiguousarray(scale.numpy().astype(_NUMPY[dtype]))
    return scale.to(device="cpu", dtype=dtype).contiguous().numpy()


def _prepared(memo: Optional[dict], make, t: Optional[torch.Tensor], *key):
    """``make(t, *key)``, once per tensor and key within ``memo``'s life (one push: a site's permutation serves
    its writers' rows, their biases and its readers' columns). The entry holds ``t`` itself, so its id cannot
    be reused by another tensor while the memo lives."""
    if memo is None or t is None:
        return make(t, *key)
    k = (make, id(t), *key)
    hit = memo.get(k)
    if hit is None or hit[0] is not t:
        hit = memo[k] = (t, make(t, *key))
    return hit[1]


def _run_fast(kernels, src, out, row_perm, row_scale, col_perm, col_scale, memo: Optional[dict] = None):
    """The largest |value| of ``src`` when the compiled kernel wrote ``out`` (None: an index it must not use;
    nothing written). ``memo``: a dict that lives while none of the perms and scales it sees change (one push),
    where each one's prepared array is kept."""
    R, C = out.shape[0], (out.shape[1] if out.ndim > 1 else 1)
    p, q = _prepared(memo, _checked_index, row_perm, R), _prepared(memo, _checked_index, col_perm, C)
    r, c = _prepared(memo, _scale, row_scale, out.dtype, R), _prepared(memo, _scale, col_scale, out.dtype, C)
    if p is False or q is False or r is False or c is False:
        return None
    K = out.numel() // max(R * C, 1)
    s = src.detach()
    d = out.detach()
    unsigned, mask = _BITS[out.dtype]
    try:
        if out.ndim == 1:  # a vector: row_perm is set (_fast_applies), nothing on a second axis
            _warm(kernels, "vector", p, None)
            s_np = s.numpy()
            bits = kernels[2](s_np, d.numpy(), p, r, s_np.view(unsigned), mask)
        elif K == 1:
            _warm(kernels, "matrix", p, q)
            s_np = s.reshape(R, C).numpy()
            bits = kernels[0](s_np, d.view(R, C).numpy(), p, r, q, c, s_np.view(unsigned), mask, d.data_ptr() % 64,
                              64 // out.element_size())
        else:
            _warm(kernels, "blocks", p, q)
            s_np = s.reshape(R, C, K).numpy()
            bits = kernels[1](s_np, d.view(R, C, K).numpy(), p, r, q, c, s_np.view(unsigned), mask)
    except Exception as exc:  # noqa: BLE001 — a numba/llvmlite that cannot compile the loops: torch's kernels, always
        give_up(_state, "kernels", "the compiled transform kernel", exc, "transforms use torch's gathers")
        return None
    return float(np.array([bits], dtype=unsigned).view(s_np.dtype)[0])


def _first_warm(key: tuple) -> bool:
    """Whether the kernel variants ``key`` names are met for the first time in this process (then marked warm)."""
    warmed = _state.setdefault("warmed", set())
    if key in warmed:
        return False
    warmed.add(key)
    return True


def _warm(kernels, loop: str, p, q) -> None:
    """Compile, once per process, every variant of a kernel that the same weights can meet on another draw.

    numba compiles one machine-code variant per argument signature, and a None scale is another signature
    than an array. Which one a weight meets depends on the draw, not on the model: a global sign of −1 is a
    scale, +1 is None (``_graph_stream.WithSign``), and a float32 weight whose dense map is ill-conditioned
    moves in float64 (``_port_moves.dense_ok``). So new variants appeared on the third transform of timm's
    ViT and later ones (3 compiles, ~21 ms, inside a timed transform). Passing ones instead of None would
    fix the signature but multiply by 1 (a signalling NaN would come back quiet: not the same bits), so the
    variants sharing this call's structure (``loop``: "vector", "matrix" or "blocks", the 1-D, 2-D or 3-D loop;
    which axes are permuted, the index type) are
    compiled here on tiny arrays the first time that structure runs: 8 variants, loaded from numba's
    on-disk cache after the first run on a machine."""
    if not _first_warm((loop, None if p is None else p.dtype, None if q is None else q.dtype)):
        return
    if loop == "vector":
        for dtype in _FAST_DTYPES:
            unsigned, mask = _BITS[dtype]
            src = np.zeros(2, dtype=_NUMPY[dtype])
            for r in (None, np.ones(2, dtype=_NUMPY[dtype])):
                kernels[2](src, np.empty_like(src), np.arange(2, dtype=p.dtype), r, src.view(unsigned), mask)
        return
    shape = (2, 2) if loop == "matrix" else (2, 2, 2)
    tiny_p = None if p is None else np.arange(2, dtype=p.dtype)
    tiny_q = None if q is None else np.arange(2, dtype=q.dtype)
    for dtype in _FAST_DTYPES:
        unsigned, mask = _BITS[dtype]
        src = np.zeros(shape, dtype=_NUMPY[dtype])
        ones = np.ones(2, dtype=_NUMPY[dtype])
        for r in (None, ones):
            for c in (None, ones):
                out = np.empty_like(src)
                if loop == "matrix":
                    kernels[0](src, out, tiny_p, r, tiny_q, c, src.view(unsigned), mask, 0, 64 // src.itemsize)
                else:
                    kernels[1](src, out, tiny_p, r, tiny_q, c, src.view(unsigned), mask)


# the unsigned integers of each dtype's width, and the mask that clears the sign bit (|x| as bits)
_BITS = {torch.float32: (np.uint32, np.uint32(0x7FFFFFFF)), torch.float64: (np.uint64, np.uint64(0x7FFFFFFFFFFFFFFF))}


def _kernels():
    """The compiled kernels (2-D, 3-D, 1-D, the index check, the |scale| range, the per-head column gather), or None
    without numba or with ``WORKBENCH_NUMBA=0``."""
    return compiled(_state, "kernels", f"{__package__}._kernels_numba",
                    lambda m: (m.gather_scale_2d, m.gather_scale_3d, m.gather_scale_1d, m.index_int32, m.abs_range,
                               m.gather_headwise_cols),
                    "transforms use torch's gathers")


def headwise_cols_into(src: torch.Tensor, out: torch.Tensor, row_perm: Optional[torch.Tensor],
                       row_scale: Optional[torch.Tensor], col_perms: torch.Tensor, col_scales: Optional[torch.Tensor],
                       *, memo: Optional[dict] = None) -> bool:
    """``out[e, i, j] = (src[h, k, col_perms[h, j]] · col_scales[h, j]) · row_scale[e·R + i]`` for ``src`` and ``out``
    ``[E, R, C]`` (any strides), ``(h, k)`` the source row ``row_perm[e·R + i]`` over the ``E·R`` rows (None: none;
    either scale None: none), each product rounded to ``out``'s dtype in that order: a per-head move of the columns,
    then the rows' moves, as applying them one after the other does. One compiled pass (``_kernels_numba.
    gather_headwise_cols``); False, with nothing written, where it does not run (no numba, not the CPU, a dtype other
    than float32/float64, an index outside its axis, overlapping tensors): the caller applies the moves in turn.
    ``memo``: see ``_run_fast``. Why: ``_layout_gathers._gathered_cols``."""
    kernels = _kernels()
    if (kernels is None or src.device.type != "cpu" or out.device.type != "cpu" or src.dtype != out.dtype
            or out.dtype not in _FAST_DTYPES or src.ndim != 3 or src.shape != out.shape or _overlaps(src, out)
            or tuple(col_perms.shape) != tuple(out.shape[::2]) or (src.requires_grad and torch.is_grad_enabled())):
        return False
    E, R, C = out.shape
    p, r = _prepared(memo, _checked_index, row_perm, E * R), _prepared(memo, _scale, row_scale, out.dtype, E * R)
    q = _prepared(memo, _checked_index, col_perms, C, (E, C))
    c = _prepared(memo, _scale, col_scales, out.dtype, C, (E, C))
    if p is False or r is False or q is False or c is False:
        return False
    try:
        s_np, o_np = src.detach().numpy(), out.detach().numpy()
        _warm_cols(kernels, s_np, o_np, p, q)
        kernels[5](s_np, o_np, p, r, q, c)
    except Exception as exc:  # noqa: BLE001 — as in _run_fast: torch's kernels from now on
        give_up(_state, "kernels", "the compiled transform kernel", exc, "transforms use torch's gathers")
        return False
    return True


def _warm_cols(kernels, s_np: np.ndarray, o_np: np.ndarray, p, q) -> None:
    """``_warm`` for the per-head column loop: its variants for this call's memory layouts (numba types a contiguous
    array apart from a strided one) and index types, each scale None or not, both dtypes."""
    def layout(a):
        return "C" if a.flags.c_contiguous else "F" if a.flags.f_contiguous else "A"

    key = ("headwise cols", layout(s_np), layout(o_np), None if p is None else p.dtype, q.dtype)
    if not _first_warm(key):
        return

    def like(kind, dtype):
        base = np.zeros((2, 2, 4), dtype=dtype)
        return (np.ascontiguousarray(base[:, :, :2]) if kind == "C" else np.asfortranarray(base[:, :, :2]) if kind == "F"
                else base[:, :, ::2])
    tiny_p = None if p is None else np.arange(4, dtype=p.dtype)
    tiny_q = np.zeros((2, 2), dtype=q.dtype)
    for dtype in _FAST_DTYPES:
        src, out = like(key[1], _NUMPY[dtype]), like(key[2], _NUMPY[dtype])
        ones = np.ones(4, dtype=_NUMPY[dtype])
        for r in (None, ones):
            for c in (None, ones.reshape(2, 2)):
                kernels[5](src, out, tiny_p, r, tiny_q, c)


def abs_range(values: np.ndarray) -> tuple[float, float]:
    """``(min, max)`` of ``|values|`` (both NaN where one is NaN), for a non-empty vector: one compiled pass where
    numba is there (a transform asks this of each scaled permutation's scales, four to six times a push), else
    NumPy's ``abs``, ``min`` and ``max``."""
    kernels = _kernels()
    if kernels is not None and values.ndim == 1 and values.dtype in (np.float32, np.float64):
        try:
            lo, hi = kernels[4](values)
        except Exception as exc:  # noqa: BLE001 — as in _run_fast
            give_up(_state, "kernels", "the compiled transform kernel", exc, "transforms use torch's gathers")
        else:
            return float(lo), float(hi)
    a = np.abs(values)
    return float(a.min()), float(a.max())
