"""``init="match"``: start a stitching layer at its group's best fit of B's activation from A's.

Rows are (example, position) samples of the channel vectors, ``X [M, C_a]`` from A and ``Y [M, C_b]``
from B at the same crossing. Each kind of map gets its own closed-form fit, so every group starts
from the same principle before the task loss takes over:

- full linear: least squares with a bias;  low rank k: reduced-rank regression (the least-squares
  map projected on the top-k principal directions of its fitted values);
- orthogonal: Procrustes, Q = U Vᵀ from the SVD of Yᵀ X (determinant fixed for SO(n));
- permutation groups: the Hungarian matching of unit cosines (``wb.match_neurons``) with its scales;
- positive diagonal: per-unit least-squares scales.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ._layers import StitchSpec


@dataclass
class Fit:
    """A fitted starting point: ``weight [C_b, C_a]``, ``bias [C_b]`` or None, low-rank ``factors (U, V)``."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    factors: Optional[tuple[torch.Tensor, torch.Tensor]] = None


def rows(v: torch.Tensor, channels: int, keep: torch.Tensor) -> torch.Tensor:
    """``[N, C, *rest]`` (or flattened ``[N, C·block]``) → ``[M, C]`` float64 rows at indices ``keep``."""
    r = torch.movedim(v.reshape(len(v), channels, -1), 1, -1).reshape(-1, channels)
    return r[keep[keep < len(r)]].double()


def sample_rows(n_rows: int, limit: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(n_rows, generator=gen)[:limit] if n_rows > limit else torch.arange(n_rows)


def fit(spec: StitchSpec, X: torch.Tensor, Y: torch.Tensor):
    """The starting point for a ``spec`` layer mapping rows of ``X [M, C_a]`` onto ``Y [M, C_b]``."""
    if spec.kind == "sinkhorn":
        from ..symmetry import match_neurons

        return match_neurons(X, Y, signed=spec.diagonal in ("sign", "nonzero")).element
    if spec.kind == "diagonal":
        # A unit never active in A has no fitted scale and gets no gradient: it starts (and stays) at 1, not at 0⁺.
        xx = (X * X).sum(0)
        s = torch.where(xx > 0, (X * Y).sum(0) / xx.clamp_min(1e-30), torch.ones_like(xx))
        return Fit(torch.diag(s.clamp_min(1e-6)))
    if spec.kind == "orthogonal":
        U, _, Vh = torch.linalg.svd(Y.T @ X)
        if spec.special and torch.linalg.det(U @ Vh) < 0:
            U[:, -1] = -U[:, -1]
        return Fit(U @ Vh)
    # (Reduced-rank) least squares with a bias: [X 1] [Wᵀ; bᵀ] = Y.
    Xb = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    sol = torch.linalg.lstsq(Xb, Y, driver="gelsd").solution  # [C_a + 1, C_b]
    W, b = sol[:-1].T, sol[-1]
    if spec.rank is None:
        return Fit(*(_invertible(W, b, X) if W.shape[0] == W.shape[1] else (W, b)))
    fitted = X @ W.T
    _, _, Vh = torch.linalg.svd(fitted - fitted.mean(0), full_matrices=False)
    Vk = Vh[: spec.rank].T  # [C_b, k]: top principal directions of the fitted values
    V = Vk.T @ W  # [k, C_a]
    return Fit(Vk @ V, Y.mean(0) - (Vk @ V) @ X.mean(0), (Vk, V))


def _invertible(W: torch.Tensor, b: torch.Tensor, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same fit on the data, invertible where it can be: a GL stitch must start in GL.

    Least squares leaves W's action on directions N in which A's data never varies (a unit that never
    fires) at its minimum norm, 0, and gradients never move it, so W would stay singular. On the data
    Nᵀ(x − μ) = 0, so W's action on N can be replaced — here by c·B, B spanning what W's range misses,
    c W's mean singular value — and the bias corrected by the constant it adds: every fitted value is kept.
    """
    mu = X.mean(0)
    # Vh must be [C_a, C_a]: full matrices only with fewer rows than channels, where U is small (the tour's
    # 131,072 rows of positions would make a full U of 137 GB)
    _, s, Vh = torch.linalg.svd(X - mu, full_matrices=X.shape[0] < X.shape[1])
    r = int((s > s[0] * max(X.shape) * torch.finfo(torch.float32).eps).sum()) if len(s) and s[0] > 0 else 0
    N = Vh[r:].T
    if N.shape[1] == 0:
        return W, b
    off = W - (W @ N) @ N.T
    U, sw, _ = torch.linalg.svd(off)
    kept = sw[: len(sw) - N.shape[1]]
    c = kept.mean() if len(kept) and kept.mean() > 0 else torch.ones((), dtype=W.dtype)
    B = U[:, len(sw) - N.shape[1]:]
    return off + c * B @ N.T, b + (W @ N - c * B) @ (N.T @ mu)
