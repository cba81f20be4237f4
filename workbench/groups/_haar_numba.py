"""The compiled loop behind :func:`._haar.haar_qr` (imported only where numba is installed).

``haar_qr(A, Q, d)`` is LAPACK's unblocked Householder QR (``dgeqr2``: ``dlarfg`` reflectors, R's diagonal
β = −sign(α)·‖x‖) followed by the backward accumulation of the reflectors into Q (``dorg2r``), for each
matrix of a batch in one call. The Q and sign(diag R) are unique for an invertible input, so they equal
LAPACK's to rounding (tests/test_haar.py compares them); only the order of the sums and the fused
multiply-adds differ.

Why it is written out (measured on this project's 2-core AMD EPYC, one thread, [96, 64, 64] float64):
``torch.linalg.qr`` goes through MKL, whose small-matrix path on this CPU runs at ~5 GFLOP/s (10–16 ms;
``geqrf`` alone 7–9 ms, ``householder_product`` 5.7 ms); CholeskyQR2 on ``bmm`` was slower (23 ms); numpy
and scipy call LAPACK per matrix. This loop takes 6–9 ms there. What makes it fast, each measured:
- row-major, row-oriented updates: the reflector's product with the trailing block (vᵀ·A) and the rank-one
  update (A −= v·wᵀ) both run along rows, as axpys that vectorise without reordering any sum (a
  column-oriented dot product needs ``fastmath`` reassociation to vectorise); four rows per pass
  (loads of w shared, one store per four products);
- unsigned loop indices (numba's wraparound check on a signed index blocks LLVM's loop vectoriser: 28 ms
  → 9.5 ms for the same loop);
- rows padded to a multiple of 8 and every pass starting at a multiple of 8 (one 64-byte line), so no pass
  ends in a scalar remainder; the columns in front of the trailing block see w = 0, which leaves them
  unchanged exactly (x − v·0 = x), and padding columns are zeros that stay zeros;
- ``fastmath={"contract"}`` only: fused multiply-adds (one rounding instead of two), no reassociation
  and nothing that changes what a NaN or an infinity does.
Beyond n ≈ 128 the unblocked loop streams the trailing block from L2 twice a column and LAPACK's blocked
code wins; ``_haar`` sends those to torch.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

U = np.uint64  # loop bounds as unsigned integers: see the module docstring
LANE = 8  # float64s per 64-byte line: the alignment of every pass


@njit(cache=True, nogil=True, fastmath={"contract"})
def haar_qr(A, Q, d):  # pragma: no cover — compiled; tests/test_haar.py checks it against LAPACK
    """A ``[k, n, n]`` float64 (read only), Q ``[k, n, n]`` (written: the QR factors), d ``[k, n]`` (written:
    sign(diag R), 0 where R's diagonal is 0)."""
    k, n = A.shape[0], A.shape[1]
    m = (n + LANE - 1) // LANE * LANE
    a = np.zeros((n, m))  # the matrix, then R above the diagonal and the reflectors v below (v_j[j] = 1 implied)
    q = np.zeros((n, m))
    tau = np.empty(n)
    w = np.zeros(m)
    for b in range(k):
        src = A[b]
        for i in range(n):
            ai, si = a[i], src[i]
            for c in range(U(n)):
                ai[c] = si[c]
        for j in range(n):  # dgeqr2: the reflector of column j, applied to the columns after it
            lo, hi = U((j + 1) // LANE * LANE), U(m)
            alpha = a[j, j]
            s = 0.0
            for i in range(j + 1, n):
                s += a[i, j] * a[i, j]
            if s == 0.0:  # dlarfg: nothing below the diagonal (always so in the last column): H = I
                t, beta = 0.0, alpha
            else:
                # ‖x‖ without dlapy2's overflow guard: Gaussian entries are far from 1e±154
                norm = math.sqrt(alpha * alpha + s)
                beta = -norm if alpha >= 0 else norm
                t = (beta - alpha) / beta
                scal = 1.0 / (alpha - beta)
                for i in range(j + 1, n):
                    a[i, j] *= scal
                aj = a[j]
                for c in range(lo, hi):  # w = vᵀ·A[j:, lo:] (v_j = 1)
                    w[c] = aj[c]
                _add_vt(w, a, a, j, n, lo, hi)
                for c in range(lo, U(j + 1)):  # columns up to j (R, earlier reflectors, v itself) stay as they are
                    w[c] = 0.0
                for c in range(lo, hi):
                    w[c] *= t
                    aj[c] -= w[c]
                _rank_one(a, a, w, j, n, lo, hi)
            tau[j] = t
            d[b, j] = 1.0 if beta > 0 else (-1.0 if beta < 0 else 0.0)
        for i in range(n):  # dorg2r: Q = H_0·…·H_{n−1}, accumulated from the last reflector backwards
            qi = q[i]
            for c in range(U(n)):
                qi[c] = 0.0
        for j in range(n - 1, -1, -1):
            # here Q = H_{j+1}·…·H_{n−1} is the identity outside rows and columns > j, so w is 0 in front of j + 1
            lo, hi = U((j + 1) // LANE * LANE), U(m)
            t = tau[j]
            for c in range(lo, hi):
                w[c] = 0.0
            _add_vt(w, q, a, j, n, lo, hi)
            qj = q[j]
            for c in range(lo, hi):
                w[c] *= t
                qj[c] = -w[c]
            _rank_one(q, a, w, j, n, lo, hi)
            for i in range(j + 1, n):  # column j of H_j·(the rest): e_j − τ·v
                q[i, j] = -t * a[i, j]
            qj[j] = 1.0 - t
        dst = Q[b]
        for i in range(n):
            di, qi = dst[i], q[i]
            for c in range(U(n)):
                di[c] = qi[c]


@njit(inline="always", fastmath={"contract"})
def _add_vt(w, x, a, j, n, lo, hi):  # pragma: no cover — compiled
    """w[lo:hi] += Σ_{i > j} v_i·x[i, lo:hi], with v_i = a[i, j]: vᵀ·x without v's implied 1 at row j (four rows
    a pass, as in the module docstring; the sums in the same order wherever it is called)."""
    i = j + 1
    while i + 3 < n:
        v0, v1, v2, v3 = a[i, j], a[i + 1, j], a[i + 2, j], a[i + 3, j]
        x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
        for c in range(lo, hi):
            w[c] += v0 * x0[c] + v1 * x1[c] + v2 * x2[c] + v3 * x3[c]
        i += 4
    while i < n:
        vi, xi = a[i, j], x[i]
        for c in range(lo, hi):
            w[c] += vi * xi[c]
        i += 1


@njit(inline="always", fastmath={"contract"})
def _rank_one(x, a, w, j, n, lo, hi):  # pragma: no cover — compiled
    """x[i, lo:hi] −= v_i·w[lo:hi] for the rows i > j, with v_i = a[i, j] (x may be a itself: w is 0 at column j)."""
    i = j + 1
    while i + 3 < n:
        v0, v1, v2, v3 = a[i, j], a[i + 1, j], a[i + 2, j], a[i + 3, j]
        x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
        for c in range(lo, hi):
            wc = w[c]
            x0[c] -= v0 * wc
            x1[c] -= v1 * wc
            x2[c] -= v2 * wc
            x3[c] -= v3 * wc
        i += 4
    while i < n:
        vi, xi = a[i, j], x[i]
        for c in range(lo, hi):
            xi[c] -= vi * w[c]
        i += 1
