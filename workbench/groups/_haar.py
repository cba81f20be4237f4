"""Haar-distributed orthogonal matrices from Householder reflections of Gaussian vectors (Stewart 1980).

The draw. For j = 0 … n−1 let x_j ~ N(0, I_{n−j}) be independent, H_j the Householder reflection (on
coordinates j … n−1) that maps x_j to β_j·e_j with β_j = −sign(x_j[0])·‖x_j‖ (LAPACK's ``dlarfg``
convention; H_{n−1} = I), and d_j = sign(β_j). Then ``Q·diag(d)`` with ``Q = H_0·…·H_{n−1}`` is Haar on
O(n). Why: a Householder QR of a Gaussian matrix G builds exactly these reflectors from the vectors
x_j = (H_{j−1}·…·H_0·G[:, j])[j:], and gives G = Q·R with R's diagonal β, so Q·diag(sign β) is Haar
(Mezzadri 2007). Column j of G is independent of H_0 … H_{j−1} (which are functions of the columns
before it) and its law N(0, I_n) is invariant under that orthogonal map, so x_j is N(0, I_{n−j}) and
independent of x_0 … x_{j−1}: the x_j of a QR have the joint law of independent fresh Gaussians, and Q
is the same function of them. Drawing them fresh skips the QR's updates of the trailing columns (half
its arithmetic): the law is the same, the draws for a seed are not those of a QR of the same numbers.

Input: G ``[k, n, n]`` float64 whose lower triangle with the diagonal holds x_j in column j (the upper
triangle is not read). Two paths build the same reflectors: a compiled loop (``_haar_numba``, where numba
is installed, n ≤ ``FAST_MAX_N``) and torch (``householder_product``, LAPACK's ``dorgqr``). They agree to
rounding (tests/test_haar.py): a seed gives the same draw up to rounding with or without numba, as
LAPACK's own results already differ between CPUs. ``WORKBENCH_NUMBA=0`` turns the compiled loop off.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._errors import InvalidOptionError, MissingDependencyError
from .._numba import compiled, give_up

# Up to this n the compiled loop is faster than torch's householder_product here (measured, one thread, min of
# 7–15: 2.9x at n = 64 (a batch of 96), 1.3x at 256, 0.9x at 384, where MKL's blocked dorgqr keeps its block in cache).
FAST_MAX_N = 256
_state: dict = {"kernel": None, "tried": False}


def haar_reflections(G: torch.Tensor, *, fast: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, d)`` for ``G`` ``[k, n, n]`` float64 on the CPU (its lower triangle read, as in the module docstring):
    ``Q`` ``[k, n, n]`` the product of the reflectors of G's columns and ``d`` ``[k, 1, n]`` the signs of their
    β (0 where β is 0), so ``Q·d`` is Haar when the lower triangle is Gaussian.

    ``fast``: None takes the compiled loop where it applies (numba installed, n ≤ FAST_MAX_N), False
    forces torch, True requires the compiled loop (tests): ``MissingDependencyError`` without numba,
    ``InvalidOptionError`` for an input the loop does not take."""
    kernel = _kernel() if fast is not False else None
    if fast and kernel is None:
        raise MissingDependencyError("the compiled Haar draw was required (fast=True) but numba is not available (or "
                                     "WORKBENCH_NUMBA=0); install the 'fast' extra, or pass fast=None to use torch's")
    k, n = G.shape[0], G.shape[-1]
    applies = G.dtype == torch.float64 and G.device.type == "cpu" and G.ndim == 3 and G.shape[1] == n
    if kernel is not None and applies and (fast or n <= FAST_MAX_N):
        A = G.detach().contiguous().numpy()
        Q = torch.empty(k, n, n, dtype=torch.float64)
        d = torch.empty(k, n, dtype=torch.float64)
        try:
            kernel(A, Q.numpy(), d.numpy())
            return Q, d.unsqueeze(-2)
        except Exception as exc:  # noqa: BLE001 — a numba/llvmlite that cannot compile the loop: torch, always
            if fast:
                raise
            give_up(_state, "kernel", "the compiled Haar draw", exc, "Haar draws use torch's householder_product")
    elif fast:  # numba is there but this input is not what the loop takes
        raise InvalidOptionError(f"the compiled Haar draw (fast=True) takes [k, n, n] float64 on the CPU; got "
                                 f"{G.dtype} {tuple(G.shape)} on {G.device}; pass fast=None to use torch's")
    return _reflections_torch(G)


def _reflections_torch(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same reflectors as the compiled loop, vectorised over the columns, and LAPACK's accumulation."""
    alpha = G.diagonal(dim1=-2, dim2=-1)
    below = G.tril(-1)
    s = (below * below).sum(-2)
    zero = s == 0  # nothing below the diagonal (always so in the last column): H = I, β = α
    norm = torch.sqrt(alpha * alpha + s)
    beta = torch.where(zero, alpha, torch.where(alpha >= 0, -norm, norm))
    tau = torch.where(zero, 0.0, (beta - alpha) / torch.where(zero, 1.0, beta))
    v = below / torch.where(zero, 1.0, alpha - beta).unsqueeze(-2)
    return torch.linalg.householder_product(v, tau), torch.sign(beta).unsqueeze(-2)


def _kernel():
    """The compiled loop, or None without numba or with ``WORKBENCH_NUMBA=0``."""
    return compiled(_state, "kernel", f"{__package__}._haar_numba", lambda m: m.haar_reflections,
                    "Haar draws use torch's householder_product")
