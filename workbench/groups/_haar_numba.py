"""The compiled loop behind :func:`._haar.haar_reflections` (imported only where numba is installed).

``haar_reflections(A, Q, d)`` builds, for each matrix of a batch in one call, the Householder reflector
``H_j`` of column j of A from the diagonal down (LAPACK's ``dlarfg``: β = −sign(α)·‖x‖, τ = (β − α)/β,
v = x/(α − β) below the implied v_j = 1), then accumulates ``Q = H_0·…·H_{n−1}`` backwards (LAPACK's
``dorg2r``), and writes ``d = sign(β)``: Stewart's (1980) algorithm, so that ``Q·diag(d)`` is Haar (the
derivation is in ``_haar``). It is a QR without the trailing updates: the torch path
(``_haar._reflections_torch``, ``householder_product``) computes the same reflectors, so the two agree
to rounding (tests/test_haar.py).

Why it is written out (measured on this project's 2-core AMD EPYC, one thread, CPU time, min of 15):
``torch.linalg.householder_product`` goes through MKL's ``dorgqr``, whose small-matrix path runs at a
few GFLOP/s: [96, 64, 64] 8.5 ms with the reflectors built in torch, this loop 2.9 ms ([276, 32, 32] 2.6
vs 1.7, [1, 256, 256] 1.6 vs 1.2; from n ≈ 384 MKL's blocked code is faster). What makes it fast, each
measured when the loop still did a whole QR (the accumulation is that loop's second half, unchanged):
- row-major, row-oriented updates: the reflector's product with the block (vᵀ·Q) and the rank-one
  update (Q −= v·wᵀ) both run along rows, as axpys that vectorise without reordering any sum (a
  column-oriented dot product needs ``fastmath`` reassociation to vectorise); four rows per pass
  (loads of w shared, one store per four products);
- unsigned loop indices (numba's wraparound check on a signed index blocks LLVM's loop vectoriser: 28 ms
  → 9.5 ms for the same loop);
- rows padded to a multiple of 8 and every pass starting at a multiple of 8 (one 64-byte line), so no pass
  ends in a scalar remainder; the columns in front of the trailing block see w = 0, which leaves them
  unchanged exactly (x − v·0 = x), and padding columns are zeros that stay zeros;
- ``fastmath={"contract"}`` only: fused multiply-adds (one rounding instead of two), no reassociation
  and nothing that changes what a NaN or an infinity does.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

U = np.uint64  # loop bounds as unsigned integers: see the module docstring
LANE = 8  # float64s per 64-byte line: the alignment of every pass


@njit(cache=True, nogil=True, fastmath={"contract"})
def haar_reflections(A, Q, d):  # pragma: no cover — compiled; tests/test_haar.py checks it against torch's path
    """A ``[k, n, n]`` float64 (read only, its lower triangle with the diagonal: the reflectors' vectors),
    Q ``[k, n, n]`` (written: H_0·…·H_{n−1}), d ``[k, n]`` (written: sign(β_j), 0 where β_j is 0)."""
    k, n = A.shape[0], A.shape[1]
    m = (n + LANE - 1) // LANE * LANE
    a = np.zeros((n, m))  # the reflectors' v below the diagonal (v_j[j] = 1 implied)
    q = np.zeros((n, m))
    tau = np.empty(n)
    w = np.zeros(m)
    for b in range(k):
        src = A[b]
        for j in range(n):  # dlarfg on A[j:, j]
            alpha = src[j, j]
            s = 0.0
            for i in range(j + 1, n):
                s += src[i, j] * src[i, j]
            if s == 0.0:  # nothing below the diagonal (always so in the last column): H = I
                t, beta = 0.0, alpha
                for i in range(j + 1, n):
                    a[i, j] = 0.0
            else:
                # ‖x‖ without dlapy2's overflow guard: Gaussian entries are far from 1e±154
                norm = math.sqrt(alpha * alpha + s)
                beta = -norm if alpha >= 0 else norm
                t = (beta - alpha) / beta
                scal = 1.0 / (alpha - beta)
                for i in range(j + 1, n):
                    a[i, j] = src[i, j] * scal
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
    a pass, as in the module docstring)."""
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
    """x[i, lo:hi] −= v_i·w[lo:hi] for the rows i > j, with v_i = a[i, j]."""
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
