"""What the explorer computes, without any widget: unit scores, one Apply, and its report.

Kept apart from the ipywidgets front end so it can be timed, tested and reused headless. One Apply
makes a transformed copy (``wb.random_intertwiner``), checks it (``wb.verify``), and compares unit
scores before and after (``wb.match_neurons`` + the interpretation shift). The original model's
scores are computed once when the explorer opens; the transformed model's scores need only one
forward pass that stops at the site (``stop_at=True``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .._errors import WorkbenchError
from .._report import Report
from ..hooks import first_tensor, run_with_cache
from ..models import has_layout, no_grad_analysis
from ..symmetry import (InterpretationShift, InvarianceReport, NeuronMatching, Site, Transform, random_intertwiner,
                        verify)
from ..symmetry import match_site_units, may_flip, unit_extremes as _unit_extremes
from ..symmetry import site_observation, site_units
from ..symmetry import unit_activations as _unit_activations
from ..models import eval_mode


class Cancelled(WorkbenchError):
    """Long work was cancelled by the user (``widget.cancel()``); nothing was changed."""


#: ``check(label)`` is called between steps and batches; it raises :class:`Cancelled` when asked to stop.
Check = Callable[[Optional[str]], None]


def _no_check(label: Optional[str] = None) -> None:
    return None


def unit_activations(model: nn.Module, sites: Sequence[Site], inputs: torch.Tensor, *, batch_size: int = 256,
                check: Check = _no_check, bar=None) -> dict[str, torch.Tensor]:
    """``wb.symmetry``'s unit scores with one row per *sequence* for token inputs (the explorer shows
    whole sequences; ``wb.interpretation_shift`` ranks every token): ``{site name: float64 [N, C]}``.
    ``bar``: a progress bar advanced by one per batch."""
    return _unit_activations(model, sites, inputs, per_sequence=True, batch_size=batch_size, check=check, bar=bar)


def unit_extremes(model: nn.Module, sites: Sequence[Site], inputs: torch.Tensor, *, batch_size: int = 256,
                  check: Check = _no_check, bar=None) -> tuple[dict, dict]:
    """:func:`unit_activations` and each example's *smallest* value per unit, ``({site: [N, C]}, {site: [N, C]})``:
    what a sign flip turns into the largest (see ``wb.symmetry.match_site_units``)."""
    return _unit_extremes(model, sites, inputs, per_sequence=True, batch_size=batch_size, check=check, bar=bar)


def unit_traces(model: nn.Module, site: Site, inputs: torch.Tensor, unit: int) -> torch.Tensor:
    """The activation of one unit at every position (pixel, token) of a few examples: ``float64 [k, rest]``."""
    o = site_observation(site)
    with eval_mode(model), torch.no_grad():
        _, cache = run_with_cache(model, inputs, names=o.name, stop_at=o.call == 0, budget=None, reduce=first_tensor)
    return site_units(cache.calls(o.name)[o.call], site, o, has_layout(model))[:, unit].double()


def correlation(before: torch.Tensor, after: torch.Tensor, before_min: Optional[torch.Tensor] = None,
                after_min: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pearson r between every unit after (rows) and every unit before (columns): ``[C, C]`` from two ``[N, C]``.

    A unit that never varies (a dead ReLU) correlates 0 with everything rather than NaN. With each example's
    smallest values too (scores pooled over positions at a site whose group can flip signs), a pair is
    compared on (largest, smallest) both as it is and flipped — a flipped unit's largest values are the old
    smallest, negated, which its old largest values do not predict — and the larger |r| is kept: an exact
    flip shows r = −1, as ``wb.symmetry.match_site_units`` sees it.
    """
    def standard(x):
        x = x - x.mean(0, keepdim=True)
        norm = x.norm(dim=0, keepdim=True)
        return torch.where(norm > 0, x / norm.clamp_min(1e-300), torch.zeros_like(x))

    if before_min is None or after_min is None:
        return standard(after).T @ standard(before)
    b = standard(torch.cat([after, after_min]))
    kept, flipped = b.T @ standard(torch.cat([before, before_min])), b.T @ standard(torch.cat([before_min, before]))
    return torch.where(flipped.abs() > kept.abs(), flipped, kept)


@dataclass(repr=False)
class ExplorerResult(Report):
    """One Apply of the explorer: a random element at one site, verified, and how the units moved.

    ``correlation[u, v]`` is Pearson's r between unit ``u`` of the transformed model and unit ``v``
    of the original (per-example scores; at a site whose group can flip signs, a flipped unit counts
    as r = −1, see :func:`correlation`); ``matching.perm[u]`` is the original unit matched to ``u``.
    """

    site: str
    group: str  # the group the element was drawn from (registry name)
    site_group: str  # the site's own intertwiner group
    seed: int
    sigma: float
    transform: Transform
    verification: InvarianceReport  # wb.verify on the first ``verified_on`` examples
    matching: NeuronMatching
    correlation: torch.Tensor  # [C, C]
    shift: InterpretationShift
    verified_on: int
    scored_on: int

    @property
    def passed(self) -> bool:
        """Whether ``wb.verify`` found the function unchanged (and the site moved as its element says)."""
        return self.verification.passed

    @property
    def is_symmetry(self) -> bool:
        """Whether the element came from a subgroup of the site's own group (else: a negative control)."""
        return self.site not in self.transform.forced

    @property
    def matched_correlation(self) -> torch.Tensor:
        """``[C]``: r between each unit after and its matched unit before (±1 when a P·D maps one onto the other)."""
        return self.correlation[torch.arange(len(self.matching.perm)), self.matching.perm]

    def summary(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}: {self.evidence()}"

    def evidence(self) -> str:
        """The summary without its verdict word (shown beside a PASS/FAIL badge)."""
        kind = "" if self.is_symmetry else " (not a symmetry here)"
        return (f"site {self.site}, {self.group}{kind}, seed {self.seed}, scale σ {self.sigma:g} — max relative "
                f"output difference {self.verification.max_rel_diff:.2e} (tolerance {self.verification.tolerance:.0e}); "
                f"top-{self.shift.k} overlap {self.shift.overlap_matched.mean():.2f} after matching, "
                f"{self.shift.overlap_same_index.mean():.2f} at the same index")

    def to_frame(self):
        frame = self.shift.to_frame()
        frame["scale"] = self.matching.scale.numpy()
        frame["cosine"] = self.matching.quality.numpy()
        frame["correlation"] = self.matched_correlation.numpy()
        return frame

    def plot(self, ax=None):
        """The correlation heatmap in matched order (a clean diagonal when units map onto units)."""
        import seaborn as sns

        from .._report import new_axes

        ax = new_axes(ax, figsize=(4.5, 4))
        sns.heatmap(self.correlation[:, self.matching.perm].numpy(), cmap="vlag", center=0, vmin=-1, vmax=1, ax=ax,
                    square=True, cbar_kws={"label": "Pearson r"})
        ax.set_xlabel("original unit (matched order)")
        ax.set_ylabel("transformed unit")
        ax.set_title(f"{self.site}: {self.group}, seed {self.seed}")
        return ax

    def _repr_html_(self) -> str:
        import html

        frame = self.to_frame()
        table = frame.head(8).to_html(index=False, float_format=lambda v: f"{v:.3g}", border=0)
        more = f"<p><i>first 8 of {len(frame)} units; <code>.to_frame()</code> has them all</i></p>" if len(frame) > 8 else ""
        return f"<div>{badge_html(self.passed)}{html.escape(self.evidence())}{table}{more}</div>"


def badge_html(passed: bool) -> str:
    colour = "#1a7f37" if passed else "#cf222e"
    return (f"<span class='wb-badge' style='background:{colour};color:white;padding:1px 8px;border-radius:4px;"
            f"font-weight:bold'>{'PASS' if passed else 'FAIL'}</span> ")


@no_grad_analysis
def explore(model: nn.Module, site: Site, group: Optional[str], seed: int, sigma: float, inputs: torch.Tensor,
            before: torch.Tensor, *, verify_examples: int = 32, batch_size: int = 256, k: int = 10,
            check: Check = _no_check, before_min: Optional[torch.Tensor] = None) -> tuple[ExplorerResult, nn.Module]:
    """One Apply: a new model with a random element at ``site``, verified, with unit scores compared.

    Args:
        group: None for the site's own group, or a registry name (a non-symmetry is the negative control).
        inputs: ``[N, ...]`` examples; ``wb.verify`` runs on the first ``verify_examples`` of them.
        before: the original model's ``unit_activations`` at the site, ``[N, C]``.
        before_min: its smallest values (``unit_extremes``), so that units whose sign flipped are matched.

    Returns:
        ``(result, new_model)``; ``model`` is not modified. The verbs inside draw no progress bars of their
        own: the widget's job bar shows these steps.
    """
    check("transform")
    new, transform = random_intertwiner(model, seed=seed, sites=[site.name], scale_sigma=sigma, group=group,
                                        allow_non_symmetry=True, progress=False)
    check("verify")
    n_verify = min(verify_examples, len(inputs))
    report = verify(model, new, inputs[:n_verify], transform=transform, progress=False)
    check("scores")
    after, after_min = unit_extremes(new, [site], inputs, batch_size=batch_size, check=check)
    after = after[site.name]
    check("matching")
    # as interpretation_shift matches them (without before_min, on the largest values alone)
    matching = match_site_units(before, after, site, before_min=before_min, after_min=after_min[site.name], group=group)
    shift = InterpretationShift.from_scores(site.name, before, after, matching.perm, k)
    # the correlations the matching saw: at a site whose group may flip signs, flips count (r = −1)
    lows = (before_min, after_min[site.name]) if may_flip(site, group) else (None, None)
    result = ExplorerResult(site.name, transform.groups[site.name], site.group.name, seed, sigma, transform, report,
                            matching, correlation(before, after, *lows), shift, n_verify, len(inputs))
    return result, new
