"""The geodesic Q^α from the identity to a rotation Q (Network Dissection's interpolation)."""
from __future__ import annotations

import math

import numpy as np
import torch

from .._errors import InvalidOptionError
from ._elements import Dense, GroupElement


def _as_matrix(Q) -> tuple[torch.Tensor, object]:
    if isinstance(Q, GroupElement):
        return Q.matrix(torch.float64), Q.phi_kind
    M = torch.as_tensor(np.asarray(Q) if not isinstance(Q, torch.Tensor) else Q).detach().to("cpu", torch.float64)
    return M, "identity"


def geodesic(Q, alpha: float) -> Dense:
    """Q^α = exp(α log Q) for a rotation Q ∈ SO(n): the shortest path of rotations from I (α = 0) to Q (α = 1).

    Q^α is orthogonal with determinant +1 for every α, and Q^a Q^b = Q^{a+b} (a one-parameter
    subgroup). Computed in float64 from the real Schur form Q = Z·T·Zᵀ, where T is block diagonal
    with 2×2 rotations by θ_k and ±1 entries: each θ_k becomes αθ_k, and pairs of −1 entries (which a
    rotation has an even number of) become rotations by απ. Where Q has eigenvalue −1 the geodesic
    is not unique; this picks one.

    Args:
        Q: ``[n, n]`` rotation, as a tensor, array or group element (e.g. sampled from
            ``"special_orthogonal"``).
        alpha: the fraction of the way, usually in [0, 1] (any real number works).

    Returns:
        a :class:`Dense` ``[n, n]`` element, ``orthogonal=True``, in group ``"special_orthogonal"``.

    >>> from workbench.groups import get_group
    >>> Q = get_group("special_orthogonal", 5).sample(seed=0)
    >>> half = geodesic(Q, 0.5)
    >>> torch.allclose((half @ half).matrix(), Q.matrix(), atol=1e-12)
    True
    >>> float(torch.linalg.det(half.matrix())) > 0
    True
    """
    M, phi = _as_matrix(Q)
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise InvalidOptionError(f"geodesic needs a square [n, n] rotation; got shape {tuple(M.shape)}.")
    n = M.shape[0]
    if not math.isfinite(float(alpha)):
        raise InvalidOptionError(f"geodesic: alpha must be a finite number (0 = identity, 1 = Q); got {alpha!r}.")
    drift = (M.T @ M - torch.eye(n, dtype=torch.float64)).abs().max().item()
    if drift > 1e-8:
        raise InvalidOptionError(f"geodesic needs an orthogonal Q (QᵀQ = I), but max|QᵀQ − I| = {drift:.2g}; a "
                                 f"general linear map has no rotation path. Sample from 'special_orthogonal'.")
    if torch.linalg.det(M) < 0:
        raise InvalidOptionError(
            "geodesic needs a rotation (det +1), but this Q has det −1: it is a reflection, and no path of "
            "rotations reaches it from the identity. Sample from 'special_orthogonal' (SO(n)) instead of "
            "'orthogonal', e.g. wb.get_group('special_orthogonal', n).sample(seed=0).")
    return Dense(_power(M, float(alpha)), phi, "special_orthogonal", orthogonal=True)


def _power(M: torch.Tensor, alpha: float) -> torch.Tensor:
    import scipy.linalg

    n = M.shape[0]
    if alpha == 0.0:
        return torch.eye(n, dtype=torch.float64)
    T, Z = scipy.linalg.schur(M.numpy(), output="real")
    B = np.eye(n)
    flips = []  # 1×1 blocks at −1: paired up into rotations by π
    i = 0
    while i < n:
        if i + 1 < n and T[i + 1, i] != 0.0:  # a 2×2 block [[c, −s], [s, c]] (LAPACK zeroes a deflated subdiagonal)
            theta = math.atan2(T[i + 1, i] - T[i, i + 1], T[i, i] + T[i + 1, i + 1])
            c, s = math.cos(alpha * theta), math.sin(alpha * theta)
            B[i:i + 2, i:i + 2] = [[c, -s], [s, c]]
            i += 2
            continue
        if T[i, i] < 0:
            flips.append(i)
        i += 1
    c, s = math.cos(alpha * math.pi), math.sin(alpha * math.pi)
    for a, b in zip(flips[0::2], flips[1::2]):
        B[a, a], B[a, b], B[b, a], B[b, b] = c, -s, s, c
    return torch.from_numpy(Z @ B @ Z.T)
