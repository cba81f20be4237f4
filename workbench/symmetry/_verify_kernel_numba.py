"""The compiled loop behind :mod:`._verify_kernel` (imported only where numba is installed)."""
from __future__ import annotations

import numpy as np
from numba import njit


# ``reassoc`` lets LLVM vectorise the four sums (their order changes, as a pairwise sum's would); no
# ``nnan``/``ninf``: a NaN or an infinity in either activation must reach the result. The caller checks
# every index of ``perm`` first (numba does not check bounds).
@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def sums(new, old, perm, scale, offset, out):
    """``out`` = [Σ(h' − w)², Σ(h' − h)², Σh², Σw²] with ``w[a, i, k] = scale[i]·h[a, perm[i], k] + offset[i]``,
    in float64; ``new``, ``old``: [A, n, K].

    Two passes over each block ``a``: the aligned sums first, reading both blocks front to back (a CNN's
    channel row is often one 4 KiB page, and a hardware prefetcher stops at a page's end: three rows read
    side by side, one of them gathered, start cold at every page), then the gathered ones, from the blocks
    the first pass left in the cache (measured: 9.2 → 6.5 ms on the benchmark's CNN-26)."""
    A, n, K = new.shape
    e = c = nh = nw = 0.0
    for a in range(A):
        c1 = h1 = 0.0
        for i in range(n):
            for k in range(K):
                hn = np.float64(new[a, i, k])
                h = np.float64(old[a, i, k])
                d = hn - h
                c1 += d * d
                h1 += h * h
        e1 = w1 = 0.0
        for i in range(n):
            p, s, o = perm[i], scale[i], offset[i]
            for k in range(K):
                w = s * np.float64(old[a, p, k]) + o
                d = np.float64(new[a, i, k]) - w
                e1 += d * d
                w1 += w * w
        e += e1
        c += c1
        nh += h1
        nw += w1
    out[0] = e
    out[1] = c
    out[2] = nh
    out[3] = nw
