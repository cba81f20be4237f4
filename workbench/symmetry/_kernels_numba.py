"""The compiled loops behind :mod:`._kernels` (imported only where numba is installed).

Each loop computes ``out[i, j(, k)] = src[p[i], q[j](, k)] · r[i] · c[j]``; a perm or scale passed as
None is left out at compile time (numba prunes ``x is None`` branches on a None argument), so there is
one specialisation per combination and no multiplication by 1. The products are in the arrays' own
dtype, in the order the torch path uses (× r, rounded, then × c), which makes the two bitwise equal.
Bounds checks are off: ``_kernels`` checks every index first.

Two hints numba has no words for are written as LLVM intrinsics below, each measured on a 2048×2048
float32 weight (one thread): a prefetch of the next source row while the current one is gathered
(7.7 ms with torch's kernels → 3.3 ms), and non-temporal stores of the output, one 64-byte line at a
time, which skip reading every output line into the cache before overwriting it (→ about 2 ms; a copy
of the weight takes 1.2–1.4 ms); the line gathered into a vector register and multiplied as a vector,
its largest |source| taken on the way (→ about 1.8 ms with the maximum).
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

LINE = 64  # bytes per cache line, the unit of a non-temporal store


@intrinsic
def _prefetch(typingctx, arr, idx):
    """LLVM's prefetch hint for ``arr[idx]`` (read, keep in all cache levels)."""
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False, boundscheck=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _stream_line(typingctx, o, j0, s, q, r, i, c, peak):
    """``o[j0 + k] = s[q[j0 + k]] · r[i] · c[j0 + k]`` for the ``k`` of one 64-byte line (``o[j0:]`` 64-byte
    aligned; q, r, c may be None), stored without reading the line into the cache; returns
    ``max(peak, bits of |s[q[j0 + k]]|)``. The source values are gathered into one vector register, then
    multiplied as vectors: LLVM's ``fmul`` without fast-math flags rounds every lane as numba's scalar ``*``
    does, in the same order (× r, then × c). Multiplying lane by lane before gathering cost a fifth more on
    the 2048×2048 weight (measured: 2.2 → 1.8 ms)."""
    sig = peak(o, j0, s, q, r, i, c, peak)

    def codegen(context, builder, signature, args):
        oty, _, sty, qty, rty, _, cty, pty = signature.args
        elem = context.get_data_type(oty.dtype)
        size = context.get_abi_sizeof(elem)
        width = LINE // size
        intp, i32 = context.get_value_type(types.intp), ir.IntType(32)
        vty = ir.VectorType(elem, width)

        def pointer(ty, value, index):
            ary = context.make_array(ty)(context, builder, value)
            return cgutils.get_item_pointer(context, builder, ty, ary, [index], wraparound=False, boundscheck=False)

        def line(ty, value, index=None):
            """entries j0 … j0 + width − 1 of ``value`` (at ``index``'s entries instead where given): one vector
            load where they lie next to each other (no alignment assumed), else one load each."""
            if index is None and ty.layout == "C":
                return builder.load(builder.bitcast(pointer(ty, value, args[1]), vty.as_pointer()), align=size)
            vec = ir.Constant(vty, ir.Undefined)
            for k in range(width):
                j = builder.add(args[1], ir.Constant(intp, k))
                if index is not None:
                    j = builder.load(pointer(qty, index, j))
                    j = builder.sext(j, intp) if j.type.width < intp.width else j
                vec = builder.insert_element(vec, builder.load(pointer(ty, value, j)), i32(k))
            return vec

        vec = line(sty, args[2], None if qty == types.none else args[3])
        # |source| as unsigned integers (sign bit cleared), reduced to the line's largest: see the loops below
        uty = ir.IntType(8 * size)
        bits = builder.and_(builder.bitcast(vec, ir.VectorType(uty, width)),
                            ir.Constant(ir.VectorType(uty, width), [(1 << (8 * size - 1)) - 1] * width))
        umax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(uty, [bits.type]),
                                              f"llvm.vector.reduce.umax.v{width}i{8 * size}")
        top = context.cast(builder, builder.call(umax, [bits]), types.uint32 if size == 4 else types.uint64, pty)
        top = builder.select(builder.icmp_unsigned(">", top, args[7]), top, args[7])
        if rty != types.none:
            ri = builder.insert_element(ir.Constant(vty, ir.Undefined), builder.load(pointer(rty, args[4], args[5])), i32(0))
            vec = builder.fmul(vec, builder.shuffle_vector(ri, ir.Constant(vty, ir.Undefined),
                                                            ir.Constant(ir.VectorType(i32, width), [0] * width)))
        if cty != types.none:
            vec = builder.fmul(vec, line(cty, args[6]))
        store = builder.store(vec, builder.bitcast(pointer(oty, args[0], args[1]), vty.as_pointer()), align=LINE)
        store.set_metadata("nontemporal", builder.module.add_metadata([i32(1)]))
        return top

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
def gather_scale_2d(src, out, p, r, q, c, bits, mask, base, width):
    """``bits``: ``src`` viewed as unsigned integers of its width; ``base``: the output's address modulo 64
    (where its rows' cache lines start); ``width``: elements per line. ``p`` and ``q`` may be int32 or
    int64 (int32 halves the index traffic of the column gather)."""
    R, C = out.shape
    isz = LINE // width
    peak = mask ^ mask  # zero, of the unsigned type (a signed zero would make the maximum a float)
    for i in range(R):
        s = src[i] if p is None else src[p[i]]
        b = bits[i] if p is None else bits[p[i]]
        o = out[i]
        nxt = s if i + 1 >= R else (src[i + 1] if p is None else src[p[i + 1]])
        off = (base + i * C * isz) % LINE
        head = min(((LINE - off) % LINE) // isz, C)
        for j in range(head):
            o[j] = _one(s, j, q, r, c, i)
            peak = max(peak, (b[j] if q is None else b[q[j]]) & mask)
        j0 = head
        while j0 + width <= C:
            # The column gather reads row s in a random order: fetch the next source row meanwhile,
            # or the loop waits on every line of every row.
            _prefetch(nxt, j0)
            peak = _stream_line(o, j0, s, q, r, i, c, peak)
            j0 += width
        for j in range(j0, C):
            o[j] = _one(s, j, q, r, c, i)
            peak = max(peak, (b[j] if q is None else b[q[j]]) & mask)
    _store_fence()
    return peak


@njit(cache=True, nogil=True, boundscheck=False)
def gather_scale_3d(src, out, p, r, q, c, bits, mask):
    R, C, K = out.shape
    peak = mask ^ mask  # zero, of the unsigned type (a signed zero would make the maximum a float)
    for i in range(R):
        s = src[i] if p is None else src[p[i]]
        o = out[i]
        for j in range(C):
            sj = s[j] if q is None else s[q[j]]
            oj = o[j]
            for k in range(K):
                v = sj[k]
                if r is not None:
                    v = v * r[i]
                if c is not None:
                    v = v * c[j]
                oj[k] = v
        b = bits[i] if p is None else bits[p[i]]
        for j in range(C):
            for k in range(K):
                peak = max(peak, b[j, k] & mask)
    return peak
