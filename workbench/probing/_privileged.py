"""``privileged_basis_test``: is a concept carried by single units more than a random basis would allow?

For each concept the statistic (default: the best unit's |AUROC − 0.5|) is computed in the neuron
basis and in ``n_bases`` random bases of each family. When the activations' distribution does not
care about the basis (the null), the neuron basis is one more draw from the family, so its rank among
the draws is uniform and the +1-corrected p-value ``(1 + #{null ≥ observed}) / (n_bases + 1)`` is
exactly calibrated for compact families ("orthogonal", "permutation", …). GL has no uniform
distribution, so its p-values compare against a reference distribution, not an exchangeable null.

Units are first divided by their standard deviations (``standardize=True``). A unit's scale is
arbitrary — a ReLU layer's units can be rescaled without changing the network's function, and both
built-in statistics ignore it — but a rotation of units of unequal scales is dominated by the largest,
whose shared directions correlate every rotated unit; the best of d correlated units is less extreme
than the best of d independent ones, so unequal scales alone made the neuron basis look privileged.
Measured (labels independent of Gaussian activations whose 16 unit standard deviations are
log-uniform on [0.1, 10], n = 200, 99 rotations, 300 data sets): privileged (q < 0.05) in 86 and 90
of 300 data sets for the AUROC and mean-difference statistics raw, in 11 and 10 standardized; an exact
null gives 4% (12 of 300: with one concept q = p, and q < 0.05 is p ≤ 0.04 with 99 rotations). The
standard deviations are the sample's, a per-unit operation, so with standardizing the calibration is
measured rather than exact by the argument above (which ``standardize=False`` keeps): isotropic
Gaussian activations, a concept along a random direction (y = x·u > 0, u uniform), the AUROC
statistic, 19 rotations, 1500 data sets each, P(p ≤ 0.05) = 0.053 (n = 50, d = 8), 0.051 (n = 20,
d = 16), 0.050 with half the rows zero (n = 100, d = 8); the 99% binomial band around 0.05 is
[0.036, 0.065]. Standardizing also changes which concepts count as basis-free: with the same unequal
scales, a concept along a random direction of the *raw* activations is dominated by the few largest
units on it, so single units do carry it, and it came out privileged in 160 of 300 data sets
standardized, 11 of 300 raw (AUROC, n = 200, 99 rotations). Raw directions are only basis-free when
unit scales mean something; in a ReLU layer they do not (a function-preserving
rescaling moves them). ``standardize=False`` asks the raw question.

What a small p-value does and does not say: the null is that activations and concepts *together*
look the same in every basis of the family. Standardizing removes unequal scales, not other ways in
which the activations alone differ between bases, and those can move the statistic for a concept no
unit carries. Measured with labels drawn independently of i.i.d. standardized units (d = 16, 99
rotations, 300 data sets; a calibrated test is privileged in 4%, 12 of 300, and more than 22 of 300
has probability 0.0025 under it): with the AUROC statistic at n = 1000, privileged in 36 of 300 for
Cauchy units, 24 for log-normal (σ = 2) units, 16 for Gaussian units; at n = 200, 33, 33, 15 (Cauchy,
log-normal, Student-t(3)); with the mean difference at n = 200 in 1, 1 and 12 (conservative for the
first two). ReLU'd Gaussian units gave 9 (AUROC) and 9, 90%-sparse ReLU'd units 0 and 2 (n = 200).
So a concept found privileged in a layer with heavy-tailed units (``basis_alignment``) needs a
control: the same test with the concept's labels shuffled (``y[torch.randperm(len(y))]``), over a few
shuffles, shows how often this layer makes a concept it cannot carry look privileged.

Every figure above is a row of ``benchmarks/probing_calibration.py`` (seeded, about 4 CPU minutes);
its page ``benchmarks/results/probing_calibration.md`` gives each count's 95% interval and protocol.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .._errors import InvalidOptionError, check_option
from .._progress import ProgressLike, progress_bar
from .._random import SeedLike, as_seed
from .._report import Report, new_axes
from ..models import no_grad_analysis
from ._inputs import prepare, resolve_bases, resolve_group
from ._null import null_distribution
from ._scores import auroc_matrix, mean_difference_matrix


def _max_auroc(XB, Y, c):  # best unit's |AUROC − 0.5| in each of the c bases: [c, K]
    return (auroc_matrix(XB, Y) - 0.5).abs().reshape(c, -1, Y.shape[1]).amax(1)


def _max_mean_difference(XB, Y, c):
    return mean_difference_matrix(XB, Y).abs().reshape(c, -1, Y.shape[1]).amax(1)


#: statistic name -> (per-chunk function, what it measures); all are invariant under P·D± of units
STATISTICS = {"auroc": (_max_auroc, "max over units of |AUROC − 0.5|"),
              "mean_difference": (_max_mean_difference, "max over units of |standardised mean difference|")}


def _user_statistic(fn: Callable) -> Callable:
    name = getattr(fn, "__name__", "custom")

    def one(Xb, Y):
        out = fn(Xb, Y)
        try:
            v = _as_values(out)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InvalidOptionError(f"statistic {name!r} must return K = {Y.shape[1]} numbers (one per concept); "
                                     f"its result is not numeric: {exc}") from exc
        if v.numel() != Y.shape[1]:
            # a wrong length would be paired with the wrong concepts (or drop some) without a word
            raise InvalidOptionError(f"statistic {name!r} must return K = {Y.shape[1]} numbers (one per concept, "
                                     f"shape [{Y.shape[1]}]); it returned shape {tuple(v.shape)}.")
        return v.reshape(-1)

    def per_chunk(XB, Y, c):
        d = XB.shape[1] // c
        return torch.stack([one(XB[:, b * d:(b + 1) * d], Y) for b in range(c)])
    return per_chunk


def _as_values(v) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().to(torch.float64)
    return torch.as_tensor(np.asarray(v, dtype=np.float64))


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg q-values of a vector of p-values (same order).

    >>> bh_qvalues(np.array([0.01, 0.04, 0.03, 0.5])).round(3).tolist()
    [0.04, 0.053, 0.053, 0.5]
    """
    from scipy.stats import false_discovery_control

    p = np.asarray(p, dtype=float)
    if p.ndim != 1:
        raise InvalidOptionError(f"bh_qvalues takes a vector of p-values (shape [m]); got shape {p.shape}. For a "
                                 f"matrix, call it on each column (one family of tests each).")
    bad = np.flatnonzero(~((p >= 0) & (p <= 1)))  # NaN fails both comparisons
    if len(bad):
        raise InvalidOptionError(f"p-values must lie in [0, 1]; got {p[bad[:5]].tolist()} at positions "
                                 f"{bad[:5].tolist()}. (A NaN p-value has no rank: drop it and its test first.)")
    return false_discovery_control(p, method="bh") if len(p) else p


def _finite(values: torch.Tensor, stat_name: str, names: Sequence[str], where: str) -> torch.Tensor:
    """``values`` ([K] or [B, K]) if it holds no NaN; a NaN statistic would rank below every basis and read
    as the smallest p-value, 1/(B+1) (NaN ≥ x and |NaN − x| ≤ tol are both false)."""
    nan = torch.isnan(values.reshape(-1, values.shape[-1])).any(0)
    if bool(nan.any()):
        bad = [n for n, b in zip(names, nan.tolist()) if b]
        raise InvalidOptionError(f"statistic {stat_name!r} is NaN in {where} for concepts {bad[:5]}; a p-value "
                                 f"needs a number in every basis. Make the statistic return finite values "
                                 f"(e.g. 0 where it is undefined).")
    return values


#: values within this relative distance of the observed statistic count as ties: an invariant statistic
#: recomputed in a group's basis (e.g. a standardised mean difference after a positive scaling) differs
#: from the neuron basis's value by rounding alone, and must not look smaller than it
TIE_RTOL = 1e-10


def _ties(observed: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    return (null - observed).abs() <= TIE_RTOL * observed.abs()


def empirical_p(observed: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """One-sided ``(1 + #{null ≥ observed}) / (B + 1)`` per column of ``null [B, K]`` (ties within ``TIE_RTOL``)."""
    return (1 + ((null >= observed) | _ties(observed, null)).sum(0)).double() / (null.shape[0] + 1)


def z_scores(observed: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """(observed − null mean) / null std; 0 where every null value ties with the observed one (to
    ``TIE_RTOL``: a spread of rounding errors divided by rounding errors would read ±1), ±inf where
    the null (two or more draws) is constant and differs, NaN from a single draw that differs: one
    value has no spread to divide by (it read ±inf, an infinitely significant z from one basis)."""
    if null.shape[0] > 1:
        sd = null.std(0)
        gap = observed - null.mean(0)
        z = torch.where(sd > 0, gap / sd.clamp_min(1e-300), torch.sign(gap) * torch.where(gap == 0, 0.0, torch.inf))
    else:
        z = torch.full_like(observed, torch.nan)
    return torch.where(_ties(observed, null).all(0), torch.zeros_like(z), z)


@dataclass(repr=False)
class PrivilegedBasisTest(Report):
    """The neuron basis against random bases, per concept and per family.

    Attributes:
        observed: float64 ``[K]`` the statistic in the neuron basis.
        null: ``{family: float64 [n_bases, K]}`` the statistic in each random basis.
        roles: ``{family: "random" | "architecture"}`` (bases drawn from the layer's own group).
        concept_names, statistic, seed, alpha: what was asked.
        standardized: whether units were divided by their standard deviations before the bases turned.
    """

    observed: torch.Tensor
    null: dict[str, torch.Tensor]
    roles: dict[str, str]
    concept_names: list[str]
    statistic: str
    seed: int
    alpha: float = 0.05
    n_examples: int = 0
    standardized: bool = True

    def p_values(self, family: str) -> torch.Tensor:
        """``[K]`` one-sided permutation p-values against ``family``'s bases, +1-corrected, ties counted."""
        return empirical_p(self.observed, self._null(family))

    def z_scores(self, family: str) -> torch.Tensor:
        """``[K]`` (observed − null mean) / null std; 0 where every basis tied with the neuron basis."""
        return z_scores(self.observed, self._null(family))

    def _null(self, family: str) -> torch.Tensor:
        check_option("family", family, list(self.null))
        return self.null[family]

    def invariant(self, family: str) -> bool:
        """True when every basis of ``family`` gave the neuron basis's statistic (to ``TIE_RTOL``)."""
        return bool(_ties(self.observed, self._null(family)).all())

    def to_frame(self):
        """One row per (family, concept): observed, null mean/std, z, p, BH q, privileged (q < alpha)."""
        import pandas as pd

        rows = []
        for fam, null in self.null.items():
            p = empirical_p(self.observed, null).numpy()
            q = bh_qvalues(p)
            z = z_scores(self.observed, null).numpy()
            for k, name in enumerate(self.concept_names):
                rows.append({"family": fam, "role": self.roles[fam], "concept": name,
                             "observed": float(self.observed[k]), "null_mean": float(null[:, k].mean()),
                             "null_std": float(null[:, k].std()) if len(null) > 1 else float("nan"),
                             "z": float(z[k]), "p": float(p[k]), "q": float(q[k]), "privileged": bool(q[k] < self.alpha)})
        return pd.DataFrame(rows)

    def layer_frame(self):
        """One row per family: the layer-level test of the mean statistic over concepts, and counts."""
        import pandas as pd

        rows = []
        for fam, null in self.null.items():
            obs, draws = self.observed.mean()[None], null.mean(1, keepdim=True)
            q = bh_qvalues(empirical_p(self.observed, null).numpy())
            rows.append({"family": fam, "role": self.roles[fam], "n_bases": len(null),
                         "mean_observed": float(obs), "mean_null": float(draws.mean()),
                         "z": float(z_scores(obs, draws)), "p": float(empirical_p(obs, draws)),
                         "n_privileged": int((q < self.alpha).sum()), "n_concepts": len(self.concept_names),
                         "identical": self.invariant(fam)})
        return pd.DataFrame(rows)

    def summary(self) -> str:
        parts = []
        for r in self.layer_frame().itertuples():
            if r.identical:
                parts.append(f"{r.family}: identical in every basis (the statistic is invariant under it)")
            else:
                parts.append(f"{r.family}: {r.n_privileged}/{r.n_concepts} concepts privileged, layer z={r.z:.1f} "
                             f"p={r.p:.3g}")
        return f"{self.statistic}; " + "; ".join(parts)

    def _repr_html_(self) -> str:
        import html

        layer = self.layer_frame().to_html(index=False, float_format=lambda v: f"{v:.3g}", border=0)
        per = self.to_frame().to_html(index=False, float_format=lambda v: f"{v:.3g}", border=0)
        return (f"<div><p><b>PrivilegedBasisTest</b> — {html.escape(self.summary())}</p>{layer}"
                f"<details><summary>per concept</summary>{per}</details></div>")

    def plot(self, ax=None):
        """Null distributions per concept (one strip of draws per family) with the neuron basis marked."""
        import pandas as pd
        import seaborn as sns

        ax = new_axes(ax, figsize=(max(6, 0.6 * len(self.concept_names)), 3.5))
        frames = [pd.DataFrame({"concept": np.tile(self.concept_names, len(v)), "statistic": v.flatten().numpy(),
                                "family": fam}) for fam, v in self.null.items()]
        sns.stripplot(pd.concat(frames), x="concept", y="statistic", hue="family", ax=ax, dodge=True, size=2,
                      alpha=0.5)
        ax.scatter(range(len(self.concept_names)), self.observed.numpy(), marker="*", s=90, c="crimson",
                   zorder=5, label="neuron basis")
        ax.legend(fontsize="small")
        ax.tick_params(axis="x", rotation=60)
        ax.set_ylabel(STATISTICS.get(self.statistic, (None, self.statistic))[1])
        return ax


@no_grad_analysis
def privileged_basis_test(acts, concepts, bases: Sequence = ("orthogonal", "gl"), group=None, *,
                          n_bases: int = 200, statistic: Union[str, Callable] = "auroc", seed: SeedLike = 0,
                          alpha: float = 0.05, standardize: bool = True, where=None,
                          names: Optional[Sequence[str]] = None,
                          progress: ProgressLike = None, check: Optional[Callable[[Optional[str]], None]] = None
                          ) -> PrivilegedBasisTest:
    """Test whether single units carry each concept more than units of random bases do.

    Args:
        acts: ``[N, d]`` activations (``[N, T, d]`` with token-level concepts).
        concepts: bool ``[N, K]`` / ``[N, T, K]``, a ``{name: labels}`` dict or a ConceptDataset.
        bases: random basis families, registry names of ``workbench.groups`` or Group objects.
        group: the layer's own group — a registry name (``"relu"``), a Group, or a ``Site`` of
            ``wb.symmetry_map`` (its ``.group``). Its bases are a further family, role "architecture":
            an invariant statistic comes out identical in all of them (p = 1).
        n_bases: random bases per family (streamed: memory does not grow with it).
        statistic: ``"auroc"`` (best unit's |AUROC − 0.5|), ``"mean_difference"``, or a callable
            ``(acts [N, d] float64, concepts bool [N, K]) -> [K]``.
        seed: an int, None, a ``torch.Generator`` or a NumPy ``Generator`` (as scikit-learn's
            ``random_state``); same seed, same bases (each family has its own stream). The report records
            the effective int seed, which reproduces the result. The same bases applied to the units in
            another order are other bases of the data, so relabelling the units (a permutation of the columns)
            keeps the neuron basis's statistic but may move the p-value as another seed would (the test stays
            calibrated; a verdict should not rest on one seed near the threshold).
        alpha: false discovery rate for the ``privileged`` column (Benjamini–Hochberg over concepts).
            The smallest p is 1/(n_bases + 1), so with K concepts a concept alone reaches q < alpha
            only if K/(n_bases + 1) < alpha (20 concepts need n_bases ≥ 400 at alpha = 0.05); with fewer
            bases only several small p-values together do. Measured under the complete null (20
            concepts, labels independent of or along random directions of isotropic data, n = 200,
            d = 16, 99 bases, 300 data sets each; ``benchmarks/probing_calibration.py``): no concept
            privileged in any data set.
        standardize: divide each unit by its standard deviation over the rows tested (constant units
            are left as they are) before computing anything, in the neuron basis as in every random
            one. The built-in statistics are unchanged by it in the neuron basis; what changes is the
            null, which no longer depends on the units' arbitrary scales (module docstring: with
            unequal scales and no concept at all, raw activations gave "privileged" in 29-30% of data
            sets at alpha = 0.05). False turns the raw activations. The layer's own group acts on
            the standardized activations too. For permutation groups, signed or scaled (the ReLU,
            GELU, tanh, LayerNorm groups), standardizing M·x gives the standardized x acted on by M up
            to a positive scaling of each unit, which the built-in statistics ignore, so those bases
            still show what the layer's symmetries do. For an orthogonal own group (a folded-norm
            residual stream) they are rotations of the standardized stream, not function-preserving
            ones; ``standardize=False`` tests against those.
        where, names: as in :func:`concept_scores`.
        progress: one bar of the bases tested, ``n_bases`` per family: True, False, or None (the default)
            for a bar in a Jupyter notebook only.
        check: called as ``check(family)`` before each family's null and ``check(None)`` before each chunk
            of bases — a place to cancel (raise) from a front end, as the probe widget does.

    Returns:
        :class:`PrivilegedBasisTest`; ``to_frame()`` per concept, ``layer_frame()`` per family.

    >>> g = torch.Generator().manual_seed(0)
    >>> y = torch.rand(300, generator=g) < 0.5
    >>> acts = torch.randn(300, 6, generator=g); acts[:, 2] += 2 * y
    >>> t = privileged_basis_test(acts, y, bases=["orthogonal"], group="relu", n_bases=19)
    >>> t.to_frame()[["family", "p"]].values.tolist()
    [['orthogonal', 0.05], ['scaled_permutation', 1.0]]
    """
    if not isinstance(n_bases, numbers.Integral) or isinstance(n_bases, (bool, np.bool_)) or n_bases < 1:
        raise InvalidOptionError(f"n_bases must be a positive int; got {n_bases!r}. With B bases the smallest "
                                 f"p-value is 1/(B+1), so p < 0.01 needs n_bases ≥ 100.")
    if callable(statistic):
        stat, stat_name = _user_statistic(statistic), getattr(statistic, "__name__", "custom")
    else:
        stat, stat_name = STATISTICS[check_option("statistic", statistic, list(STATISTICS), allow_callable=True)][0], statistic
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < 1:
        # alpha ≥ 1 would mark every concept privileged (q ≤ 1 < alpha), a p = 1 one included
        raise InvalidOptionError(f"alpha is a false discovery rate in (0, 1), e.g. 0.05; got {alpha!r}.")
    n_bases = int(n_bases)
    seed = as_seed(seed)
    X, Y, names = prepare(acts, concepts, where, names)
    if standardize:
        # scaled by each unit's largest |value| first, so squares neither overflow (1e200) nor underflow
        big = X.abs().amax(0)
        big = torch.where(big > 0, big, torch.ones((), dtype=X.dtype))
        sd = (X / big).std(0, unbiased=False)
        X = X / big / torch.where(sd > 0, sd, torch.ones((), dtype=X.dtype))
    # One comparison per family name (the report keys its nulls and roles by it): a family named twice, or the layer's own
    # group also among the random families, was merged into one without a word, and the report showed one comparison
    # where two were asked for (the same bases in both: a family's bases come from its own stream of the seed)
    families: dict = {}
    for g in resolve_bases(bases, X.shape[1]):
        if g.name in families:
            raise InvalidOptionError(f"bases names the family {g.name!r} twice; each family is compared once (the same "
                                     f"seed draws the same bases): name it once.")
        families[g.name] = (g, "random")
    if group is not None:
        own = resolve_group(group, X.shape[1])
        if own.name in families:
            raise InvalidOptionError(
                f"group={group if isinstance(group, str) else own.name!r} is the {own.name!r} family, which bases "
                f"names too; each family is compared once (the same seed draws the same bases in both), so the test "
                f"would make one comparison where two were asked for. Drop {own.name!r} from bases (group= compares "
                f"against it as the layer's own family, role 'architecture'), or drop group=.")
        families[own.name] = (own, "architecture")
    if not families:
        raise InvalidOptionError("no basis family to compare the neuron basis with: pass bases=['orthogonal'] (or "
                                 "another family of workbench.groups) or the layer's own group=.")
    observed = _finite(stat(X, Y, 1)[0], stat_name, names, "the neuron basis")
    null = {}
    with progress_bar(total=n_bases * len(families), desc="random bases", unit="basis", progress=progress) as bar:
        for name, (g, _) in families.items():
            if check is not None:
                check(name)
            bar.set_postfix_str(name, refresh=False)
            null[name] = _finite(null_distribution(X, Y, g, n_bases, seed, stat, bar=bar, check=check),
                                 stat_name, names, f"bases of {name!r}")
    return PrivilegedBasisTest(observed, null, {k: r for k, (_, r) in families.items()}, names, stat_name,
                               int(seed), alpha, len(X), bool(standardize))
