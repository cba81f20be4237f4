"""Alignment measures: Procrustes (orthogonal, permutation, G_ReLU), correlation matching, CCA, SVCCA.

All read conv maps **per position**: each (example, position) pair is one sample of the C units
(``[N·P, C]`` rows), so the maps being aligned act on channels the same way at every position —
a 1×1 convolution, as the intertwiner groups act in a conv net. Both inputs need the same
examples and the same spatial shape; their channel counts may differ (the narrower side is padded
with zero units, as in the paper).

The Procrustes scores are the paper's ``1 − d`` with d in [0, 1]: d² = ‖A − B·M‖² / (4·s), where
A and B are normalised so that ‖A‖² = ‖B‖² = s, and M is the best map of the family. The residual
is computed directly rather than as ‖A‖² + ‖B‖² − 2·(matched) so identical inputs give d = 0 to
rounding, not sqrt(rounding).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .._errors import InvalidOptionError
from ._prep import DegenerateRepresentationError, as_pair, centred, per_position, score_from_distance, unit_normalise


def _pair_rows(acts_a, acts_b):
    a, b = as_pair(acts_a, acts_b, same_positions=True)
    return per_position(a), per_position(b)


def _pad(A: torch.Tensor, B: torch.Tensor):
    """Zero units appended to the narrower of ``[M, C_a]`` and ``[M, C_b]``."""
    c = max(A.shape[1], B.shape[1])
    return F.pad(A, (0, c - A.shape[1])), F.pad(B, (0, c - B.shape[1]))


def _global_normalise(H: torch.Tensor, name: str) -> torch.Tensor:
    norm = H.norm()
    if not norm > 0:
        raise DegenerateRepresentationError(f"{name} is all zeros; it cannot be normalised.")
    return H / norm


def _match(score: torch.Tensor) -> torch.Tensor:
    """Column matched to each row, maximising the total of ``score [C, C']`` (Hungarian algorithm)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(score.numpy(), maximize=True)
    return torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)


def orthogonal_procrustes(acts_a, acts_b) -> float:
    """1 − d for the best orthogonal map between the units, after global normalisation (‖A‖ = ‖B‖ = 1).

    d² = min_R ‖A − B R‖² / 4 over orthogonal R (R = UVᵀ from the SVD of BᵀA); equivalently
    (2 − 2‖BᵀA‖_*) / 4. Not centred, as in the paper. Invariant to rotations and reflections of the
    units, permutations and isotropic scaling; not to per-unit scaling, general maps or translation.

    Args:
        acts_a: ``[N, C_a]`` or ``[N, C_a, *spatial]``; acts_b ``[N, C_b, *spatial]`` (same spatial).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(30, 4, generator=g, dtype=torch.float64)
        >>> q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
        >>> round(orthogonal_procrustes(x, x @ q), 12)
        1.0
    """
    A, B = _pair_rows(acts_a, acts_b)
    A, B = _pad(_global_normalise(A, "acts_a"), _global_normalise(B, "acts_b"))
    U, _, Vh = torch.linalg.svd(B.T @ A)
    return score_from_distance((A - B @ (U @ Vh)).pow(2).sum(), 1)


def permutation_procrustes(acts_a, acts_b) -> float:
    """1 − d for the best permutation of the units, after global normalisation (‖A‖ = ‖B‖ = 1).

    d² = min_P ‖A − B P‖² / 4, the permutation found by Hungarian matching of the cross-Gram BᵀA.
    Invariant to permutations and isotropic scaling only.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(30, 4, generator=g, dtype=torch.float64)
        >>> round(permutation_procrustes(x, 2 * x[:, [3, 1, 0, 2]]), 12)
        1.0
    """
    A, B = _pair_rows(acts_a, acts_b)
    A, B = _pad(_global_normalise(A, "acts_a"), _global_normalise(B, "acts_b"))
    perm = _match(A.T @ B)  # unit i of A ↔ unit perm[i] of B
    return score_from_distance((A - B[:, perm]).pow(2).sum(), 1)


def grelu_procrustes(acts_a, acts_b) -> float:
    """The paper's G_ReLU-Procrustes: 1 − d with units normalised one by one and matched.

    Each unit is scaled to norm 1 over (examples, positions) — not centred — which removes any
    positive scaling; the Hungarian algorithm matches units to maximise the summed cross-Gram
    C_ij = ⟨A_i, B_j⟩; d = sqrt((‖A‖² + ‖B‖² − 2·Σ matched) / (4C)), C the larger channel count.
    Invariant to the ReLU intertwiner group P·D₊ (and isotropic scaling); not to rotations,
    general maps or translation. A dead (all-zero) unit stays zero.

    Args:
        acts_a: ``[N, C_a]`` or ``[N, C_a, *spatial]``; acts_b ``[N, C_b, *spatial]`` (same spatial).

    Returns:
        A float in [0, 1]; 1 when ``acts_b`` is a P·D₊ transform of ``acts_a``.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(30, 4, 2, 2, generator=g, dtype=torch.float64).relu()
        >>> scale = torch.tensor([0.5, 2.0, 3.0, 1.5]).reshape(1, 4, 1, 1)
        >>> round(grelu_procrustes(x, x[:, [2, 0, 3, 1]] * scale), 12)
        1.0
    """
    A, B = _pair_rows(acts_a, acts_b)
    A, B = _pad(unit_normalise(A, centre=False, name="acts_a"), unit_normalise(B, centre=False, name="acts_b"))
    perm = _match(A.T @ B)
    return score_from_distance((A - B[:, perm]).pow(2).sum(), A.shape[1])


def correlation_matching(acts_a, acts_b) -> float:
    """Mean Pearson correlation of units matched one-to-one (Li et al. 2016, "convergent learning").

    Correlations between every unit of A and every unit of B over (examples, positions); the
    Hungarian algorithm picks the one-to-one matching with the largest total; the score is the mean
    over the min(C_a, C_b) matched pairs. A constant unit correlates 0 with everything. Invariant to
    permutations, per-unit positive scaling and translation; not to rotations or general maps.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(30, 3, generator=g, dtype=torch.float64)
        >>> round(correlation_matching(x, 5 * x[:, [2, 0, 1]] + 1), 12)
        1.0
    """
    A, B = _pair_rows(acts_a, acts_b)
    if A.shape[0] < 3:  # two centred samples are ±(1, −1)/√2: every correlation is ±1 whatever the maps
        raise InvalidOptionError(f"correlation matching needs at least 3 samples (examples × positions); got "
                                 f"{A.shape[0]}, for which every correlation is ±1.")
    R = unit_normalise(A, centre=True, name="acts_a").T @ unit_normalise(B, centre=True, name="acts_b")  # [C_a, C_b] correlations
    if R.shape[0] > R.shape[1]:
        R = R.T
    perm = _match(R)
    return float(R[torch.arange(R.shape[0]), perm].mean())


def _basis(H: torch.Tensor, keep, name: str) -> torch.Tensor:
    """Orthonormal basis ``[M, k]`` of the centred columns' span: all of it (``keep=None``) or the top
    singular directions holding a ``keep`` fraction of the variance (SVCCA's step one)."""
    m, c = H.shape
    # Centring leaves m − 1 dimensions: with c ≥ m − 1 units one side spans all of them, so every canonical
    # correlation is 1 whatever the other side is (unrelated random maps read 1.0 at m = c + 1).
    if m <= c + 1:
        raise InvalidOptionError(f"CCA needs more samples than units, at least units + 2 (centring removes one "
                                 f"dimension), or every canonical correlation is 1 whatever the other side is; "
                                 f"{name} has {m} samples (examples × positions) and {c} units.")
    H = centred(H)
    Q, R = torch.linalg.qr(H)  # cheap on tall [N·P, C] data; the SVD then runs on C × C
    U, S, _ = torch.linalg.svd(R)
    rounding = S.max() * m * torch.finfo(S.dtype).eps
    rank = int((S > rounding).sum()) if S.max() > 0 else 0
    if rank == 0:
        raise DegenerateRepresentationError(f"{name} is constant over the samples; CCA is undefined.")
    k = rank
    if keep is not None:
        share = (S[:rank] ** 2).cumsum(0) / (S[:rank] ** 2).sum()
        k = min(rank, int((share < keep - 1e-12).sum()) + 1)  # fewest directions reaching `keep`
        # ...and every direction tied (to rounding) with the last one kept: which of a tied set the SVD puts
        # first is rounding noise, and rotating or permuting the units picked others (whitened units: SVCCA
        # moved by 0.11 under a permutation it is invariant to)
        k = int((S[:rank] >= S[k - 1] - rounding).sum())
    return Q @ U[:, :k]


def _mean_cca(acts_a, acts_b, keep) -> float:
    A, B = _pair_rows(acts_a, acts_b)
    rho = torch.linalg.svdvals(_basis(A, keep, "acts_a").T @ _basis(B, keep, "acts_b"))
    return float(rho.clamp(max=1.0).mean())


def mean_cca(acts_a, acts_b) -> float:
    """Mean canonical correlation between the two sets of units (centred over examples and positions).

    Canonical correlations are the singular values of Q_aᵀQ_b for orthonormal bases of the two
    column spaces; the mean runs over min(rank_a, rank_b) of them. Invariant to every invertible
    linear map of the units and to translation. Needs N·P ≥ C + 2 samples (centring removes one dimension).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(30, 4, generator=g, dtype=torch.float64)
        >>> m = torch.randn(4, 4, generator=g, dtype=torch.float64)
        >>> round(mean_cca(x, x @ m + 3), 12)
        1.0
    """
    return _mean_cca(acts_a, acts_b, None)


def svcca(acts_a, acts_b, *, keep: float = 0.99) -> float:
    """SVCCA (Raghu et al. 2017): mean CCA of the top singular directions holding ``keep`` of the variance.

    The truncation depends on the spectrum, which rotations, permutations, isotropic scaling and
    translation preserve but per-unit scaling and general maps change — so, unlike mean CCA, SVCCA
    is not invariant to those (with ``keep=1`` it is mean CCA). Singular values tied (to rounding)
    with the last direction kept are kept too: among tied directions any choice is as good, so a
    cut inside a tie (e.g. whitened units) would depend on the basis the units come in.

    Args:
        acts_a: ``[N, C_a, *spatial]`` (or ``[N, C_a]``); acts_b likewise with the same spatial shape.
        keep: fraction of variance in (0, 1].

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(200, 4, generator=g, dtype=torch.float64)
        >>> x = x * torch.tensor([1.0, 0.5, 0.3, 0.01], dtype=torch.float64)  # the last direction is cut
        >>> round(svcca(x, 2 * x + 1), 12)
        1.0
        >>> d = torch.tensor([0.01, 1.0, 1.0, 100.0], dtype=torch.float64)  # now the first one is cut
        >>> round(svcca(x, x * d), 3), round(mean_cca(x, x * d), 12)
        (0.711, 1.0)
    """
    if not (isinstance(keep, (int, float)) and 0 < keep <= 1):
        raise InvalidOptionError(f"keep must be a fraction of variance in (0, 1]; got keep={keep!r}.")
    return _mean_cca(acts_a, acts_b, float(keep))
