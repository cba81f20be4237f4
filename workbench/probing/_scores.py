"""Per-unit concept scores, vectorised over units and concepts: rank AUROC, mean difference, F statistic.

Every score here is a few matrix products away from the activations: AUROC is the Mann–Whitney rank
sum (one sort per unit, then ranks ᵀ · labels), the mean difference and F statistic are class means.
That is what makes the random-basis null of ``privileged_basis_test`` affordable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .._report import Report, new_axes
from ._inputs import prepare


def average_ranks(X: torch.Tensor) -> torch.Tensor:
    """1-based ranks of each column of ``X [N, m]``, ties sharing their average rank; returns ``[m, N]``.

    The numbers of ``scipy.stats.rankdata(X.T, axis=1)`` (a column holding a NaN ranks as all NaN).

    >>> average_ranks(torch.tensor([[3.0], [1.0], [3.0]])).tolist()
    [[2.5, 1.0, 2.5]]
    """
    from scipy.stats import rankdata

    a = X.T.contiguous().numpy()  # rows of a contiguous [m, N] array sort fastest
    if np.count_nonzero(a == 0) > a.size // 100:
        # Many tied zeros (a ReLU map in its own basis): scipy's stable sort is fastest here (144 ms where
        # NumPy's default sort takes 266, on 256 units x 10,000 examples half zero).
        return torch.from_numpy(rankdata(a, axis=1)).to(X.dtype)
    # Data with few ties: the random bases of privileged_basis_test's null, ~all of its time. NumPy's default
    # (SIMD) sort, then each run of ties given its average position, is what rankdata computes, with the
    # same numbers (tests/test_probing.py), in half the time on this project's CPU: 124-138 ms against
    # 223-239 (scipy 1.17 sorts stably, which costs 2x on distinct values).
    m, N = a.shape
    order = np.argsort(a, axis=1)
    s = np.take_along_axis(a, order, axis=1)
    if N and np.isnan(s[:, -1]).any():  # NumPy sorts NaN last: one look per row, not a pass over the data
        # A column with a NaN ranks as all NaN (rankdata's nan_policy="propagate"; the probing verbs refuse
        # non-finite input, so this costs a wasted sort only on input they would not pass).
        return torch.from_numpy(rankdata(a, axis=1)).to(X.dtype)
    pos = np.arange(1, N + 1, dtype=np.float64)
    same = s[:, 1:] == s[:, :-1]
    if same.any():  # float32 data ties now and then (10,000 normals: a few collisions per row)
        start = np.ones((m, N), dtype=bool)
        start[:, 1:] = ~same
        end = np.ones((m, N), dtype=bool)
        end[:, :-1] = ~same
        first = np.maximum.accumulate(np.where(start, pos, 0.0), axis=1)  # the run's first position
        last = np.minimum.accumulate(np.where(end, pos, np.inf)[:, ::-1], axis=1)[:, ::-1]  # its last
        value = (first + last) / 2
    else:
        value = np.broadcast_to(pos, (m, N))
    ranks = np.empty((m, N), dtype=np.float64)
    np.put_along_axis(ranks, order, value, axis=1)
    return torch.from_numpy(ranks).to(X.dtype)


def auroc_matrix(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """AUROC of every column of ``X [N, m]`` for every concept of ``Y bool [N, K]``: ``[m, K]``.

    AUROC = P(x_pos > x_neg) + ½ P(tie), from the rank sum of the positives (Mann–Whitney U).
    """
    ranks = average_ranks(X)  # [m, N]
    n1 = Y.sum(0).to(X.dtype)  # [K]
    n0 = Y.shape[0] - n1
    rank_sum = ranks @ Y.to(X.dtype)  # [m, K]
    return (rank_sum - n1 * (n1 + 1) / 2) / (n1 * n0)


def mean_difference_matrix(X: torch.Tensor, Y: torch.Tensor, standardize: bool = True) -> torch.Tensor:
    """Mean over positives minus mean over negatives, per unit and concept: ``[m, K]``.

    With ``standardize`` it is divided by the unit's standard deviation over all examples (0 where a
    unit is constant), so positive scalings of a unit leave it unchanged.
    """
    Yf = Y.to(X.dtype)
    n1 = Yf.sum(0)
    Xc, const, big = _centred(X)
    diff = Xc.T @ Yf / n1 - Xc.T @ (1 - Yf) / (Y.shape[0] - n1)
    diff = torch.where(const, torch.zeros((), dtype=X.dtype), diff)
    if not standardize:
        return diff * big
    sd = Xc.std(0, unbiased=False)[:, None]
    ok = (sd > 0) & ~const
    return torch.where(ok, diff / sd.clamp_min(torch.finfo(X.dtype).tiny), torch.zeros((), dtype=X.dtype))


def _centred(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``((X − column means) / big, constant [m, 1], big [m, 1])``, big each column's largest |value|
    (1 for a zero column): squares of 1e160 overflowed and of 1e-200 underflowed, which read as a
    mean difference of 0 and an F of 0 or inf for a unit that separates the classes. Sums of a
    constant column's values do not come back to
    the value exactly (61 copies of -1.84 have a mean 1 ulp off), so its mean difference and standard
    deviation were both rounding errors of the same size, and their ratio anything (17 was measured for
    a constant unit); constant columns are found exactly and score 0. Centring first keeps the rounding
    of the class sums relative to the spread, not to a large common offset."""
    const = (X == X[:1]).all(0)[:, None] if X.shape[0] else torch.ones(X.shape[1], 1, dtype=torch.bool)
    big = X.abs().amax(0, keepdim=True) if X.shape[0] else torch.ones(1, X.shape[1], dtype=X.dtype)
    big = torch.where(big > 0, big, torch.ones((), dtype=X.dtype))
    Xs = X / big
    return Xs - Xs.mean(0, keepdim=True), const, big.T


def f_statistic_matrix(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """One-way ANOVA F of each unit for each binary concept (the square of the pooled two-sample t): ``[m, K]``.

    +inf where the two classes differ and neither varies within itself (a unit that is the concept:
    nothing separates better), 0 for a constant unit.
    """
    Yf = Y.to(X.dtype)
    N, n1 = Y.shape[0], Yf.sum(0)
    n0 = N - n1
    X, const, _ = _centred(X)  # F is shift- and scale-invariant; centred sums do not cancel a large offset
    s1, s = X.T @ Yf, X.sum(0)[:, None]  # [m, K], [m, 1]
    m1, m0 = s1 / n1, (s - s1) / n0
    between = n1 * (m1 - s / N) ** 2 + n0 * (m0 - s / N) ** 2
    within = (X * X).sum(0)[:, None] - n1 * m1 ** 2 - n0 * m0 ** 2
    within = within.clamp_min(0) / max(N - 2, 1)
    zero, inf = torch.zeros((), dtype=X.dtype), torch.full((), torch.inf, dtype=X.dtype)
    # no spread within the classes: a perfect separator (between > 0) scored 0, the worst, and sparse
    # probes selecting by F passed over the one unit that is the concept
    F = torch.where(within > 0, between / within.clamp_min(torch.finfo(X.dtype).tiny),
                    torch.where(between > 0, inf, zero))
    return torch.where(const, zero, F)


def auroc(acts, concepts, *, where=None) -> torch.Tensor:
    """Rank AUROC of every unit for every concept: float64 ``[d, K]`` (0.5 = no signal).

    Args:
        acts: ``[N, d]`` activations (or ``[N, T, d]`` with token-level concepts).
        concepts: bool ``[N, K]`` (or ``[N, T, K]``), a ``{name: labels}`` dict or a ConceptDataset.
        where: optional bool ``[N]`` / ``[N, T]`` rows to keep.

    >>> acts = torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 0.0], [3.0, 0.0]])
    >>> auroc(acts, torch.tensor([False, False, True, True])).flatten().tolist()
    [1.0, 0.0]
    """
    X, Y, _ = prepare(acts, concepts, where)
    return auroc_matrix(X, Y)


@dataclass(repr=False)
class UnitScores(Report):
    """Per-unit concept scores of one layer.

    Attributes:
        auroc: float64 ``[d, K]`` rank AUROC (0.5 = chance; < 0.5 = the unit is lower on the concept).
        mean_difference: float64 ``[d, K]`` standardised mean difference.
        f_statistic: float64 ``[d, K]``.
        concept_names: the K concept names.
        n_examples: rows scored.
    """

    auroc: torch.Tensor
    mean_difference: torch.Tensor
    f_statistic: torch.Tensor
    concept_names: list[str]
    n_examples: int

    def best_units(self) -> torch.Tensor:
        """``int64 [K]``: the unit with the largest |AUROC − 0.5| for each concept."""
        return (self.auroc - 0.5).abs().argmax(0)

    def summary(self) -> str:
        strength = (self.auroc - 0.5).abs().amax(0)
        k = int(strength.argmax())
        return (f"{self.auroc.shape[0]} units × {len(self.concept_names)} concepts on {self.n_examples} examples; "
                f"strongest: {self.concept_names[k]!r} at unit {int(self.best_units()[k])} "
                f"(AUROC {float(self.auroc[self.best_units()[k], k]):.3f})")

    def to_frame(self):
        """One row per (unit, concept): auroc, mean_difference, f_statistic."""
        import pandas as pd

        d, K = self.auroc.shape
        return pd.DataFrame({"unit": torch.arange(d).repeat_interleave(K).numpy(),
                             "concept": self.concept_names * d, "auroc": self.auroc.flatten().numpy(),
                             "mean_difference": self.mean_difference.flatten().numpy(),
                             "f_statistic": self.f_statistic.flatten().numpy()})

    def plot(self, ax=None):
        """Heat map of |AUROC − 0.5| (concepts × units)."""
        import seaborn as sns

        ax = new_axes(ax, figsize=(8, 0.3 * len(self.concept_names) + 1.5))
        sns.heatmap((self.auroc - 0.5).abs().T.numpy(), ax=ax, cmap="rocket_r", vmin=0, vmax=0.5,
                    yticklabels=self.concept_names, cbar_kws={"label": "|AUROC − 0.5|"})
        ax.set_xlabel("unit")
        return ax


def concept_scores(acts, concepts, *, where=None, names: Optional[Sequence[str]] = None) -> UnitScores:
    """AUROC, standardised mean difference and F statistic of every unit for every concept.

    Args:
        acts: ``[N, d]`` activations (``[N, T, d]`` with token-level concepts), e.g. ``cache[name]``.
        concepts: bool ``[N, K]`` / ``[N, T, K]``, a ``{name: labels}`` dict or a ConceptDataset.
        where: optional bool ``[N]`` / ``[N, T]`` rows to keep (text data sets skip padding by default).
        names: concept names when ``concepts`` is a plain array.

    Returns:
        :class:`UnitScores` with ``[d, K]`` matrices.

    >>> acts = torch.tensor([[0.0, 5.0], [0.0, 1.0], [2.0, 3.0], [3.0, 3.0]])
    >>> s = concept_scores(acts, {"big": torch.tensor([0, 0, 1, 1])})
    >>> s.best_units().tolist(), s.auroc[0, 0].item()
    ([0], 1.0)
    """
    X, Y, names = prepare(acts, concepts, where, names)
    return UnitScores(auroc_matrix(X, Y), mean_difference_matrix(X, Y), f_statistic_matrix(X, Y), names, len(X))
