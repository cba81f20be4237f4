"""The QR factor and sign(diag R) of a batch of square matrices: the one step of every Haar draw.

``Q·diag(sign(diag R))`` of a Gaussian matrix is Haar on O(n) (Mezzadri 2007), and Q and sign(diag R) are
unique for an invertible input, so every correct algorithm gives the same answer up to rounding. Two
compute it: torch's ``linalg.qr`` (LAPACK through MKL), and, where numba is installed, a compiled
Householder loop (``_haar_numba``) that is 1.6–1.9× as fast on this project's CPU at n = 64, the size the
transforms draw most (n ≤ 128 only; see that module for why). The two agree to rounding (≤ κ(G)·1e-14,
tests/test_haar.py): a seed gives the same draw up to rounding with or without numba, as LAPACK's own
results already differ between CPUs. ``WORKBENCH_NUMBA=0`` turns the compiled loop off.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._errors import InvalidOptionError, MissingDependencyError
from .._numba import compiled, give_up

# Up to this n the compiled loop is faster than MKL's QR here (measured, one thread, min of 15–20 interleaved:
# 1.6–1.9x at n = 64, 1.2–1.4x at 128, 1.0x at 256, where LAPACK's blocked code keeps the trailing block in cache).
FAST_MAX_N = 128
_state: dict = {"kernel": None, "tried": False}


def haar_qr(G: torch.Tensor, *, fast: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, d)`` for ``G`` ``[k, n, n]`` float64 on the CPU: ``G = Q·R``, ``Q`` ``[k, n, n]`` orthogonal and
    ``d = sign(diag R)`` ``[k, 1, n]`` (0 where R's diagonal is 0), so ``Q·d`` is Haar when G is Gaussian.

    ``fast``: None takes the compiled loop where it applies (numba installed, n ≤ FAST_MAX_N), False
    forces torch's QR, True requires the compiled loop (tests): ``MissingDependencyError`` without numba,
    ``InvalidOptionError`` for an input the loop does not take."""
    kernel = _kernel() if fast is not False else None
    if fast and kernel is None:
        raise MissingDependencyError("the compiled Haar QR was required (fast=True) but numba is not available (or "
                                     "WORKBENCH_NUMBA=0); install the 'fast' extra, or pass fast=None to use torch's QR")
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
            give_up(_state, "kernel", "the compiled Haar QR", exc, "Haar draws use torch's QR")
    elif fast:  # numba is there but this input is not what the loop takes
        raise InvalidOptionError(f"the compiled Haar QR (fast=True) takes [k, n, n] float64 on the CPU; got "
                                 f"{G.dtype} {tuple(G.shape)} on {G.device}; pass fast=None to use torch's QR")
    Q, R = torch.linalg.qr(G)
    return Q, torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)


def _kernel():
    """The compiled loop, or None without numba or with ``WORKBENCH_NUMBA=0``."""
    return compiled(_state, "kernel", f"{__package__}._haar_numba", lambda m: m.haar_qr, "Haar draws use torch's QR")
