"""The compiled loops behind :mod:`._kernels` (imported only where numba is installed).

Each loop computes ``out[i, j(, k)] = src[p[i], q[j](, k)] · r[i] · c[j]``; a perm or scale passed as
None is left out at compile time (numba prunes ``x is None`` branches on a None argument), so there is
one specialisation per combination and no multiplication by 1. The products are in the arrays' own
dtype, in the order the torch path uses (× r, rounded, then × c), which makes the two bitwise equal.
Bounds checks are off: ``_kernels`` checks every index first.

What the 2-D loop does, each step measured on this project's AMD EPYC (Zen 4), one thread, CPU time,
a 2048×2048 float32 weight with a row and a column permutation and both scales, min of 30–40
repetitions interleaved with a copy (``clone``, 1.3–1.5 ms here; the load average was 3–6, so single
figures move by ±15% and the ratios are the medians of per-repetition ratios):

- a prefetch of the next source row while the current one is gathered (torch's kernels: 7.7 ms →
  3.3 ms), and non-temporal stores of the output, one 64-byte line at a time, which skip reading every
  output line into the cache before overwriting it (→ about 2 ms); the line gathered into a vector
  register and multiplied as a vector, its largest |source| taken on the way (→ about 1.8–2.1 ms);
- the line loop written in LLVM IR (``_stream_row``), with the largest |source| kept as a vector of
  per-lane maxima and reduced once per row instead of once per line (0.91× of the previous loop);
- the column indices loaded two at a time (one 64-bit load, split by a shift): the scalar gather was
  bound by the load ports, 16 index loads + 16 value loads per line (→ 0.88×);
- the rows visited in the *source's* order when the row index is a permutation (the output row is the
  inverse permutation's): the source is then read front to back, which the hardware prefetcher
  follows, while the output rows, written in a random order, need no prefetch because non-temporal
  stores read nothing. A row-only gather: 0.63× (0.9 ms, below a clone); with the column gather as
  well: 0.84–0.87× of the previous loop in total (about 1.7–1.9 ms).

Tried and not adopted (same weight, ratios to the previous loop): AVX-512 hardware gathers
(``vgatherdps`` through ``llvm.x86.avx512.mask.gather.dps.512``, int32 indices), 1.0–1.2× (slower
than the scalar loads on this CPU also with the source in L1: 1.77 vs 1.44 ms); LLVM's generic
``llvm.masked.gather`` (which LLVM 22 lowers to two ``vgatherqps``, not to scalar loads) 1.1–1.3×;
two lines per loop iteration, a prefetch distance of two or three rows, and prefetch hints for L2
only or non-temporal: within the noise; ordinary stores instead of non-temporal ones: 1.3×.
"""
from __future__ import annotations

import sys

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

LINE = 64  # bytes per cache line, the unit of a non-temporal store


@intrinsic
def _stream_row(typingctx, o, j0, jend, s, q, r, i, c, peak, nxt):
    """``o[j] = s[q[j]] · r[i] · c[j]`` for ``j`` in ``[j0, jend)``, one 64-byte line at a time (``o[j0:]``
    64-byte aligned, ``jend − j0`` a whole number of lines; q, r, c may be None), each line stored without
    reading it into the cache, while the line of ``nxt`` (the next source row) at ``j`` is prefetched.
    Returns ``max(peak, bits of |s[q[j]]|)``.

    The source values of a line are gathered into one vector register, then multiplied as vectors: LLVM's
    ``fmul`` without fast-math flags rounds every lane as numba's scalar ``*`` does, in the same order
    (× r, then × c). Their |value| bits are kept as a vector of per-lane maxima across the row and reduced
    once at its end. int32 column indices are read two per 64-bit load (the gather was bound by the load
    ports: see the module docstring)."""
    if not (isinstance(o, types.Array) and o.layout == "C"):
        return None  # whole lines are stored as vectors: the output row must be contiguous
    sig = peak(o, j0, jend, s, q, r, i, c, peak, nxt)

    def codegen(context, builder, signature, args):
        oty, _, _, sty, qty, rty, _, cty, pty, nty = signature.args
        o_, j0_, jend_, s_, q_, r_, i_, c_, peak_, nxt_ = args
        elem = context.get_data_type(oty.dtype)
        size = context.get_abi_sizeof(elem)
        width = LINE // size
        intp, i32, i64 = context.get_value_type(types.intp), ir.IntType(32), ir.IntType(64)
        i8p = ir.IntType(8).as_pointer()
        vty, uty = ir.VectorType(elem, width), ir.IntType(8 * size)
        uvty = ir.VectorType(uty, width)
        utype = types.uint32 if size == 4 else types.uint64
        module = builder.module

        def pointer(ty, value, index):
            ary = context.make_array(ty)(context, builder, value)
            return cgutils.get_item_pointer(context, builder, ty, ary, [index], wraparound=False, boundscheck=False)

        def line(ty, value, j):
            """entries j … j + width − 1 of ``value``: one vector load where they lie next to each other (no
            alignment assumed), else one load each (a strided view)"""
            if ty.layout == "C":
                return builder.load(builder.bitcast(pointer(ty, value, j), vty.as_pointer()), align=size)
            vec = ir.Constant(vty, ir.Undefined)
            for k in range(width):
                vec = builder.insert_element(vec, builder.load(pointer(ty, value, builder.add(j, ir.Constant(intp, k)))),
                                             i32(k))
            return vec

        def gathered(j):
            """the line's source values, ``s[q[j + k]]`` for each lane k (``s[j + k]`` without q)"""
            if qty == types.none:
                return line(sty, s_, j)
            vec = ir.Constant(vty, ir.Undefined)
            if qty.dtype.bitwidth == 32 and qty.layout == "C":
                # two indices per load: the low half is the first on a little-endian machine
                pairs = builder.bitcast(pointer(qty, q_, j), i64.as_pointer())
                for k in range(0, width, 2):
                    two = builder.load(builder.gep(pairs, [ir.Constant(intp, k // 2)]), align=4)
                    low = builder.zext(builder.trunc(two, i32), intp)
                    high = builder.trunc(builder.lshr(two, i64(32)), intp) if intp.width < 64 else builder.lshr(two, i64(32))
                    first, second = (low, high) if sys.byteorder == "little" else (high, low)
                    vec = builder.insert_element(vec, builder.load(pointer(sty, s_, first)), i32(k))
                    vec = builder.insert_element(vec, builder.load(pointer(sty, s_, second)), i32(k + 1))
                return vec
            for k in range(width):
                jk = builder.load(pointer(qty, q_, builder.add(j, ir.Constant(intp, k))))
                jk = builder.sext(jk, intp) if jk.type.width < intp.width else jk
                vec = builder.insert_element(vec, builder.load(pointer(sty, s_, jk)), i32(k))
            return vec

        def intrinsic_fn(name, ret, *params):
            return cgutils.get_or_insert_function(module, ir.FunctionType(ret, list(params)), name)

        prefetch = intrinsic_fn("llvm.prefetch.p0", ir.VoidType(), i8p, i32, i32, i32)
        umax = intrinsic_fn(f"llvm.umax.v{width}i{8 * size}", uvty, uvty, uvty)
        reduce_umax = intrinsic_fn(f"llvm.vector.reduce.umax.v{width}i{8 * size}", uty, uvty)
        sign_off = ir.Constant(uvty, [(1 << (8 * size - 1)) - 1] * width)
        if rty != types.none:  # r[i] in every lane
            ri = builder.insert_element(ir.Constant(vty, ir.Undefined), builder.load(pointer(rty, r_, i_)), i32(0))
            rvec = builder.shuffle_vector(ri, ir.Constant(vty, ir.Undefined),
                                          ir.Constant(ir.VectorType(i32, width), [0] * width))
        top = cgutils.alloca_once_value(builder, ir.Constant(uvty, [0] * width))  # promoted to a register
        with cgutils.for_range(builder, builder.sdiv(builder.sub(jend_, j0_), ir.Constant(intp, width))) as loop:
            j = builder.add(j0_, builder.mul(loop.index, ir.Constant(intp, width)))
            # the next source row, read in a random order too: fetched meanwhile, or every line is a miss
            builder.call(prefetch, [builder.bitcast(pointer(nty, nxt_, j), i8p), i32(0), i32(3), i32(1)])
            vec = gathered(j)
            bits = builder.and_(builder.bitcast(vec, uvty), sign_off)  # |value| as unsigned integers
            builder.store(builder.call(umax, [builder.load(top), bits]), top)
            if rty != types.none:
                vec = builder.fmul(vec, rvec)
            if cty != types.none:
                vec = builder.fmul(vec, line(cty, c_, j))
            store = builder.store(vec, builder.bitcast(pointer(oty, o_, j), vty.as_pointer()), align=LINE)
            store.set_metadata("nontemporal", module.add_metadata([i32(1)]))
        row = context.cast(builder, builder.call(reduce_umax, [builder.load(top)]), utype, pty)
        return builder.select(builder.icmp_unsigned(">", row, peak_), row, peak_)

    return sig, codegen


@intrinsic
def _prefetch_at(typingctx, arr, j):
    """LLVM's prefetch hint for ``arr[j, 0, ...]`` (its row ``j``'s first element; ``arr[j]`` of a 1-D array), any
    strides (read, keep in all cache levels)."""
    sig = types.void(arr, j)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]] + [zero] * (aryty.ndim - 1),
                                       wraparound=False, boundscheck=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _store_fence(typingctx):
    """Order the non-temporal stores before anything that follows (they bypass the usual ordering)."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _one(s, j, q, r, c, i):
    v = s[j] if q is None else s[q[j]]
    if r is not None:
        v = v * r[i]
    if c is not None:
        v = v * c[j]
    return v


# Both loops also return the largest |src| they read, as the bits of its absolute value (the sign bit
# cleared by ``mask``): an integer maximum, which vectorises, and which ranks NaN above inf above every
# finite value, so a NaN is never lost. Every source value is read once on its way to the output (the
# perms are permutations), so the maximum is taken there, in the register the line is built in: a
# separate pass over the weights (``torch.aminmax``) cost a quarter of a copy, a second scan of each
# source row from L1 a tenth. The range check of a transform (``_graph_push._check_ranges``) uses it
# instead of a remembered maximum, which a write through ``p.data`` could leave stale.


@njit(cache=True, nogil=True, boundscheck=False)
def _row_order(p, R):
    """``(source row, output row)`` of each step of the row loop. Where ``p`` is a permutation the steps
    follow the source (output row = the inverse permutation): read front to back, it streams from memory,
    and the output needs no such help (its non-temporal stores read nothing). Otherwise (no ``p``, or an
    index with repeats, which ``_kernels`` does not rule out) they follow the output."""
    src_rows, out_rows = np.arange(R), np.arange(R)
    if p is None:
        return src_rows, out_rows
    out_rows[:] = -1
    for i in range(R):
        if out_rows[p[i]] >= 0:  # a repeat: not a permutation
            for k in range(R):
                src_rows[k], out_rows[k] = p[k], k
            return src_rows, out_rows
        out_rows[p[i]] = i
    return src_rows, out_rows


@njit(cache=True, nogil=True, boundscheck=False)
def gather_scale_2d(src, out, p, r, q, c, bits, mask, base, width):
    """``bits``: ``src`` viewed as unsigned integers of its width; ``base``: the output's address modulo 64
    (where its rows' cache lines start); ``width``: elements per line. ``p`` and ``q`` may be int32 or
    int64 (int32 halves the index traffic of the column gather)."""
    R, C = out.shape
    isz = LINE // width
    peak = mask ^ mask  # zero, of the unsigned type (a signed zero would make the maximum a float)
    src_rows, out_rows = _row_order(p, R)
    for k in range(R):
        i = out_rows[k]
        s, b, o = src[src_rows[k]], bits[src_rows[k]], out[i]
        nxt = src[src_rows[min(k + 1, R - 1)]]
        off = (base + i * C * isz) % LINE
        head = min(((LINE - off) % LINE) // isz, C)  # entries before the row's first whole output line
        for j in range(head):
            o[j] = _one(s, j, q, r, c, i)
            peak = max(peak, (b[j] if q is None else b[q[j]]) & mask)
        end = head + (C - head) // width * width
        peak = _stream_row(o, head, end, s, q, r, i, c, peak, nxt)
        for j in range(end, C):
            o[j] = _one(s, j, q, r, c, i)
            peak = max(peak, (b[j] if q is None else b[q[j]]) & mask)
    _store_fence()
    return peak


@njit(cache=True, nogil=True, boundscheck=False)
def gather_scale_3d(src, out, p, r, q, c, bits, mask):
    """The same for weights with trailing axes (a conv's ``[out, in, k]``): each ``(i, j)`` moves a run of K
    entries. The next source row is prefetched while the current one is gathered, as in the 2-D loop
    (measured, float32, one thread: 512×512×9 with both permutations 5.5 → 2.1 ms, a copy 0.8 ms;
    256×256×9 0.75 → 0.48 ms), and the largest |source| is taken as each entry is moved instead of in a
    second scan of the row (with the scales kept in locals, a row-only gather: 0.6× of before). Visiting
    the rows in the source's order (as the 2-D loop does) measured within the noise here, before the
    prefetch: not done."""
    R, C, K = out.shape
    peak = mask ^ mask  # zero, of the unsigned type (a signed zero would make the maximum a float)
    for i in range(R):
        s = src[i] if p is None else src[p[i]]
        b = bits[i] if p is None else bits[p[i]]
        o = out[i]
        nxt = src[min(i + 1, R - 1)] if p is None else src[p[min(i + 1, R - 1)]]
        # the scales read once per row / column into locals: LLVM cannot prove that the stores to ``out``
        # leave them unchanged, so it may not hoist the loads out of the inner loop itself
        if r is not None:
            ri = r[i]
        for j in range(C):
            jj = j if q is None else q[j]
            sj, bj, oj = s[jj], b[jj], o[j]
            _prefetch_at(nxt, j)
            if c is not None:
                cj = c[j]
            for k in range(K):
                v = sj[k]
                if r is not None:
                    v = v * ri
                if c is not None:
                    v = v * cj
                oj[k] = v
                peak = max(peak, bj[k] & mask)
    return peak


@njit(cache=True, nogil=True, boundscheck=False)
def gather_scale_1d(src, out, p, r, bits, mask):
    """``out[i] = src[p[i]] · r[i]`` for a vector (a bias): one loop instead of torch's gather, its scale's cast
    and its product (three calls, ~17 µs on a 2048-vector against ~2 µs here). ``r`` may be None. Returns the
    largest |src| as bits, as the matrix loops do."""
    peak = mask ^ mask
    for i in range(out.shape[0]):
        k = p[i]
        v = src[k]
        if r is not None:
            v = v * r[i]
        out[i] = v
        peak = max(peak, bits[k] & mask)
    return peak


@njit(cache=True, nogil=True, boundscheck=False)
def index_int32(index, n):
    """``index`` as int32 where every entry lies in [0, n) (the loops read without bounds checks), else an empty
    array: one pass, where NumPy's min, max and cast were three calls (~14 µs on a 2048-index against ~2 µs)."""
    out = np.empty(index.shape[0], np.int32)
    for i in range(index.shape[0]):
        v = index[i]
        if v < 0 or v >= n:
            return out[:0]
        out[i] = v
    return out


@njit(cache=True, nogil=True, boundscheck=False)
def abs_range(values):
    """``(min |v|, max |v|)`` of a vector, both NaN where one entry is (as NumPy's min and max): one pass, where
    ``np.abs`` and two reductions were three calls (~13 µs on a 2048-vector)."""
    lo, hi = np.inf, 0.0
    for i in range(values.shape[0]):
        a = abs(values[i])
        if a != a:
            return np.nan, np.nan
        lo = min(lo, a)
        hi = max(hi, a)
    return lo, hi


@njit(cache=True, nogil=True, boundscheck=False)
def gather_headwise_cols(src, out, p, r, q, c):
    """``out[e, i, j] = (src[h, k, q[h, j]] · c[h, j]) · r[e·R + i]`` for ``src``, ``out`` ``[E, R, C]`` (any strides:
    GPT-OSS's interleaved gate and up are every other column), where ``(h, k) = divmod(p[e·R + i], R)`` (``p``: an
    index over the ``E·R`` rows, None for none), ``q`` ``[E, C]`` one column index per head (of the source row's head)
    and ``c`` ``[E, C]`` its scales, ``r`` ``[E·R]`` the rows' (either scale None for none). The products in this
    order, each rounded to the dtype: a per-head move of the columns first, then the rows' moves, as the push applies
    them one after the other (``_layout_gathers._gathered_cols``). Rows are visited in the source's order, the next
    source row prefetched while one is gathered (as ``gather_scale_2d``: a column gather reads its row in a random
    order, which the hardware prefetcher cannot follow); each row by ``_headwise_row``."""
    E, R, C = out.shape
    src_rows, out_rows = _row_order(p, E * R)
    for t in range(E * R):
        s, row = src_rows[t], out_rows[t]
        h = s // R
        e = row // R
        srow, qh, o = src[h, s - h * R], q[h], out[e, row - e * R]
        s2 = src_rows[min(t + 1, E * R - 1)]
        nxt = src[s2 // R, s2 - s2 // R * R]
        _headwise_row(o, srow, qh, c, h, r, row, nxt)
    _store_fence()  # (after _headwise_row's non-temporal stores, where it made them)


def _headwise_row(o, srow, qh, c, h, r, row, nxt):
    """One row of ``gather_headwise_cols``: ``o[j] = (srow[qh[j]] · c[h, j]) · r[row]``, the next source row ``nxt``
    prefetched meanwhile. Compiled by its overload, one body per argument types."""
    raise NotImplementedError("compiled only (_headwise_row_impl)")


@overload(_headwise_row, jit_options={"boundscheck": False})
def _headwise_row_impl(o, srow, qh, c, h, r, row, nxt):
    """A contiguous output row without column scales (GPT-OSS's gate and up as one tensor, ``_layout_gathers.
    _fused_halves``) takes ``_stream_row``'s lines, as ``gather_scale_2d``'s rows do: its products are then the
    same (× r only). Measured on an [8, 512, 1024] float32 weight, rows and per-head columns permuted, one thread, min
    of 30: 2.6-2.7 ms the element loop, 1.5 ms the lines (a copy 0.6 ms). Anything else: the element loop."""
    if isinstance(o, types.Array) and o.layout == "C" and c == types.none:
        def lines(o, srow, qh, c, h, r, row, nxt):
            C, width = o.shape[0], LINE // o.itemsize
            head = min(((LINE - o.ctypes.data % LINE) % LINE) // o.itemsize, C)  # entries before the first whole line
            for j in range(head):
                o[j] = _one(srow, j, qh, r, None, row)
            end = head + (C - head) // width * width
            _stream_row(o, head, end, srow, qh, r, row, None, np.uint64(0), nxt)  # (its largest |value| unused)
            for j in range(end, C):
                o[j] = _one(srow, j, qh, r, None, row)
        return lines

    def elements(o, srow, qh, c, h, r, row, nxt):  # (a None scale's branches are pruned when compiled)
        if r is not None:
            ri = r[row]
        if c is not None:
            ch = c[h]
        for j in range(o.shape[0]):
            v = srow[qh[j]]
            if c is not None:
                v = v * ch[j]
            _prefetch_at(nxt, j)
            if r is not None:
                v = v * ri
            o[j] = v
    return elements
