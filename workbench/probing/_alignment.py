"""Basis-alignment statistics: is the activation distribution itself lined up with the units?

Concept-free signs of a privileged basis: heavy-tailed coordinates (excess kurtosis of each
example's activation vector), a few units carrying most of the energy (kurtosis of per-unit RMS,
"outlier dimensions"). A random rotation mixes coordinates towards Gaussian, so each statistic is
compared with its distribution over random bases of a family (default Haar rotations).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch

from .._errors import InvalidOptionError
from .._progress import ProgressLike, progress_bar
from .._random import SeedLike, as_seed
from .._report import Report, new_axes
from ..models import no_grad_analysis
from ._inputs import _tensor, resolve_bases
from ._null import null_distribution
from ._privileged import empirical_p, z_scores

STAT_NAMES = ["kurtosis_per_example", "kurtosis_of_rms", "outlier_dimensions"]


def _excess_kurtosis(V: torch.Tensor, dim: int) -> torch.Tensor:
    """Excess kurtosis along ``dim``; 0 for a constant vector (no spread, no shape)."""
    c = V - V.mean(dim, keepdim=True)
    m2, m4 = (c * c).mean(dim), (c ** 4).mean(dim)
    # A vector of one value repeated (0.1 in 7 units) has a mean off that value by rounding, which left every
    # deviation the same residue: m2 > 0 and a kurtosis of exactly −2, the smallest there is, for no shape.
    spread = (m2 > 0) & ~(V == V.narrow(dim, 0, 1)).all(dim)
    return torch.where(spread, m4 / (m2 * m2).clamp_min(1e-300) - 3, torch.zeros((), dtype=V.dtype))


def alignment_statistics(XB: torch.Tensor, c: int, outlier_factor: float) -> torch.Tensor:
    """``[c, 3]`` statistics of each of c bases side by side in ``XB [N, c·d]`` (see ``STAT_NAMES``)."""
    N = XB.shape[0]
    V = XB.reshape(N, c, -1)  # [N, c, d]
    per_example = _excess_kurtosis(V, dim=2).mean(0)  # [c]
    rms = (V * V).mean(0).sqrt()  # [c, d]
    of_rms = _excess_kurtosis(rms, dim=1)
    # the typical unit is the median *live* unit: with more than half the units dead (a ReLU layer) the
    # median over all of them was 0 and every live unit counted as an outlier; no live unit: NaN, none
    typical = torch.where(rms > 0, rms, torch.nan).nanmedian(1, keepdim=True).values
    outliers = (rms > outlier_factor * typical).sum(1).to(XB.dtype)
    return torch.stack([per_example, of_rms, outliers], dim=1)


@dataclass(repr=False)
class BasisAlignment(Report):
    """Alignment statistics of a layer's basis against random bases.

    Attributes:
        observed: float64 ``[3]`` in the neuron basis (order of ``STAT_NAMES``).
        null: float64 ``[n_bases, 3]`` in random bases of ``family``.
        family, outlier_factor, seed: what was asked.
    """

    observed: torch.Tensor
    null: torch.Tensor
    family: str
    outlier_factor: float
    seed: int
    n_examples: int

    def to_frame(self):
        """One row per statistic: observed, null mean/std, z, one-sided p (+1 corrected)."""
        import pandas as pd

        p, z = empirical_p(self.observed, self.null), z_scores(self.observed, self.null)
        sd = self.null.std(0) if len(self.null) > 1 else torch.full_like(self.observed, torch.nan)  # one draw: no spread
        return pd.DataFrame({"statistic": STAT_NAMES, "observed": self.observed.numpy(),
                             "null_mean": self.null.mean(0).numpy(), "null_std": sd.numpy(),
                             "z": z.numpy(), "p": p.numpy(), "family": self.family})

    def summary(self) -> str:
        f = self.to_frame()
        return "; ".join(f"{r.statistic} {r.observed:.3g} vs {r.null_mean:.3g} ({self.family}, p={r.p:.3g})"
                         for r in f.itertuples())

    def plot(self, ax=None):
        """The z-score of each statistic against the random-basis null."""
        import seaborn as sns

        ax = new_axes(ax)
        f = self.to_frame()
        sns.barplot(f, x="statistic", y="z", ax=ax, color="steelblue")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylabel(f"z vs {self.family} bases")
        return ax


@no_grad_analysis
def basis_alignment(acts, *, family="orthogonal", n_bases: int = 100, seed: SeedLike = 0,
                    outlier_factor: float = 6.0, progress: ProgressLike = None) -> BasisAlignment:
    """Kurtosis and outlier-dimension statistics of ``acts`` against random bases of ``family``.

    Args:
        acts: ``[N, d]`` (or ``[..., d]``, flattened to rows) activations, raw (not centred: a
            rotation moves the mean direction too).
        family: registry name or Group of the random bases (default Haar rotations).
        n_bases: random bases (streamed).
        seed: an int, None, a ``torch.Generator`` or a NumPy ``Generator``; same seed, same bases.
        outlier_factor: a unit is an outlier dimension when its RMS exceeds this many times the
            median RMS of the live units (``torch.nanmedian``: for an even count the lower of the two
            middle values). Dead units (RMS exactly 0, e.g. ReLU units that never fire) are left out of
            the median and are never outliers: with more than half the units dead, a median over all of
            them is 0, and every live unit read as an outlier (4 of 10 units whose 4 live ones had one
            scale, p = 1/(B + 1)). So a layer with one live unit has no outlier dimension — there is no
            typical unit for it to stand out from; ``kurtosis_of_rms`` still sees the energy on one unit.
            Random bases make outliers too: a Haar rotation of a signal carried by one unit (the
            others zero) leaves an outlier dimension in 7.5%, 4.8%, 2.65% and 2.2% of bases at d = 8,
            16, 32, 64 (this function, ``n_bases=2000, seed=0``; a direct NumPy simulation of |Q e₁|
            against its lower median, ``default_rng(0)``, gives 9.4%, 4.8%, 3.0%, 2.1% over 4000), so
            this statistic's p-value needs more bases than the kurtosis ones to mean much.
        progress: a bar of the bases done: True, False, or None (the default) for a bar in a Jupyter
            notebook only.

    Returns:
        :class:`BasisAlignment`: ``kurtosis_per_example`` (mean over examples of the excess kurtosis
        of the example's d coordinates), ``kurtosis_of_rms`` (excess kurtosis of the d per-unit RMS
        values), ``outlier_dimensions`` (count).

    >>> acts = 0.01 * torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    >>> acts[:, 0] = torch.linspace(1, 2, 50)   # one unit carries nearly everything
    >>> b = basis_alignment(acts, n_bases=9)
    >>> int(b.observed[2]), b.to_frame().p.tolist()[:2]  # no rotation is as heavy-tailed: p = 1/(9 + 1)
    (1, [0.1, 0.1])
    """
    X = _tensor(acts, "acts")
    if not X.is_floating_point() or X.ndim < 2:
        raise InvalidOptionError(f"acts must be floating point [N, d]; got {X.dtype} of shape {tuple(X.shape)}.")
    if X.shape[-1] == 0 or X.numel() == 0:
        raise InvalidOptionError(f"acts must hold at least one example of at least one unit; got shape "
                                 f"{tuple(X.shape)}.")
    X = X.reshape(-1, X.shape[-1]).to(torch.float64)
    if not bool(torch.isfinite(X).all()):
        raise InvalidOptionError("acts contain NaN or infinite values.")
    if not isinstance(n_bases, numbers.Integral) or isinstance(n_bases, (bool, np.bool_)) or n_bases < 1:
        raise InvalidOptionError(f"n_bases must be a positive int; got {n_bases!r}.")
    n_bases = int(n_bases)
    if isinstance(outlier_factor, bool) or not isinstance(outlier_factor, numbers.Real) or not outlier_factor > 0 \
            or outlier_factor == float("inf"):
        raise InvalidOptionError(f"outlier_factor must be a finite number > 0 (a multiple of the median unit's RMS, "
                                 f"e.g. 6.0); got {outlier_factor!r}.")
    seed = as_seed(seed)
    (group,) = resolve_bases([family], X.shape[1])
    observed = alignment_statistics(X, 1, outlier_factor)[0]
    with progress_bar(total=n_bases, desc=f"{group.name} bases", unit="basis", progress=progress) as bar:
        null = null_distribution(X, None, group, n_bases, seed,
                                 lambda XB, _, m: alignment_statistics(XB, m, outlier_factor), bar=bar)
    return BasisAlignment(observed, null, group.name, float(outlier_factor), int(seed), len(X))
