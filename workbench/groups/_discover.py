"""An activation's intertwiner group found empirically: test the generators, take the largest group."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .._errors import InvalidOptionError, check_option
from .._report import Report, new_axes
from ._catalogue import GENERATORS, _build, activation_callable, affine_extension
from ._check import DEFAULT_SCALE, IntertwinerCheck, _apply, check_intertwiner, differs, draw_inputs, repeatable
from ._elements import GroupElement, ScaledPermutation
from ._families import GeneralLinear, Group, Orthogonal

DESCRIPTIONS = {
    "permutation": "σ(Px) = Pσ(x): swapping units",
    "positive_scaling": "σ(λx) = λ^d σ(x) for λ > 0 per unit",
    "nonzero_scaling": "σ(λx) = λ^d σ(x) for λ ≠ 0 of either sign",
    "negation": "σ(−x) = −σ(x): odd",
    "even_sign_flip": "σ(−x) = σ(x) with φ = abs: even",
    "affine_negation": "σ(−x) = −σ(x) + 2σ(0): odd about (0, σ(0))",
    "rotation": "σ(Qx) = Qσ(x) for a Haar Q in SO(n)",
    "gl": "σ(Ax) = Aσ(x) for a dense A in GL(n): linear",
}


def generator_element(name: str, n: int, *, degree: int = 1, seed: int = 0) -> GroupElement:
    """A random, non-identity element of the generator ``name`` (one of :data:`GENERATORS`) on n units.

    Scalings are diagonal (no permutation), so a per-unit activation can pass them while failing
    permutations; the permutation is a single n-cycle, moving every unit. ``degree`` d sets φ = A^{⊙d}
    for the two scaling generators.
    """
    check_option("generator", name, GENERATORS)
    g = torch.Generator().manual_seed(seed)
    eye = torch.arange(n)
    phi_d = "identity" if degree == 1 else ("power", degree)
    mag = torch.exp(0.5 * torch.randn(n, generator=g, dtype=torch.float64))  # [n], about 0.2 … 5
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    sign[0] = -1.0  # at least one flip
    if name == "permutation":
        # One n-cycle (Sattolo's shuffle): σ(Px) = Pσ(x) then makes every unit's function equal to the next
        # one's round the cycle, so all are equal. A permutation with a fixed point cannot tell a unit
        # there from the others (a ReLU layer with one linear unit would pass as P·D₊).
        perm = eye.clone()
        for i in range(n - 1, 0, -1):
            j = int(torch.randint(i, (1,), generator=g))
            perm[i], perm[j] = perm[j].clone(), perm[i].clone()
        return ScaledPermutation(perm, None, "identity", "permutation")
    if name == "rotation":
        return Orthogonal(n, special=True).sample(generator=g)
    if name == "gl":
        return GeneralLinear(n).sample(generator=g)
    scale, phi, group = {
        "positive_scaling": (mag, phi_d, "positive_diagonal"),
        "nonzero_scaling": (sign * mag, phi_d, "nonzero_diagonal"),
        "negation": (sign, "identity", "sign_diagonal"),
        "even_sign_flip": (sign, "abs", "sign_diagonal"),
        "affine_negation": (sign, "identity", "affine_sign_diagonal"),  # "affine_": c = σ(0)(1 − s)
    }[name]
    return ScaledPermutation(eye, scale, phi, group)


def _degree(fn, n: int, seed: int) -> int:
    """The homogeneity degree d with σ(2x) = 2^d σ(x), if the median ratio is an integer ≥ 1; else 1."""
    x = 3.0 * torch.randn(1024, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        a, b = fn(x.clone()).abs(), fn(2 * x).abs()  # clone: an in-place module would overwrite x
    ok = (a > 1e-12) & (b > 1e-12) & torch.isfinite(a) & torch.isfinite(b)
    if not bool(ok.any()):
        return 1
    d = torch.log2(b[ok] / a[ok]).median().item()
    return int(round(d)) if round(d) >= 1 and abs(d - round(d)) < 1e-3 else 1


def _decide(holds: dict, d: int) -> tuple[str, object]:
    """The largest catalogue family (and φ) consistent with the generators that hold."""
    phi_d = "identity" if d == 1 else ("power", d)
    if holds["gl"]:
        return "gl", "identity"
    if not holds["permutation"]:  # not exchangeable across units (e.g. one PReLU slope per channel)
        return ("positive_diagonal", phi_d) if holds["positive_scaling"] else ("trivial", "identity")
    if holds["nonzero_scaling"]:
        return "diagonal_permutation", phi_d
    if holds["positive_scaling"]:
        even = holds["even_sign_flip"] and d == 1  # c·|x|
        return ("diagonal_permutation", "abs") if even else ("scaled_permutation", phi_d)
    if holds["negation"]:
        return "signed_permutation", "identity"
    if holds["even_sign_flip"]:
        return "signed_permutation", "abs"
    return "permutation", "identity"


def _require_elementwise(fn, n: int, seed: int, scale, display: str) -> None:
    """Refuse a σ whose unit i reads other units' inputs. The generators decide G_σ only for an elementwise σ: one
    n-cycle passing makes every unit's function the next one's, hence every permutation passes; for a map that mixes
    units (x + roll(x)) a 3-cycle is a rotation of the units, which it can commute with while a swap changes it. So σ
    of inputs whose units are taken from two draws, unit by unit, must be those draws' σ, unit by unit."""
    x, y = (draw_inputs(256, n, scale, seed + k, torch.float64) for k in (1, 2))  # [256, n] each
    take = torch.rand(256, n, generator=torch.Generator().manual_seed(seed)) < 0.5  # [256, n]
    with torch.no_grad():
        sx = _apply(fn, x.clone(), display)
        repeatable(fn, x, sx, display)  # first: a random σ would look like a mixing one
        sy, sz = _apply(fn, y.clone(), display), _apply(fn, torch.where(take, x, y), display)
    bad = differs(sz, torch.where(take, sx, sy), torch.float64)
    if bool(bad.any()):
        raise InvalidOptionError(
            f"{display} is not elementwise: changing some units' inputs changed other units' outputs (at {int(bad.sum())} "
            f"of {bad.numel()} entries). discover_group reads the group of an elementwise activation from a few "
            f"generators, which says nothing about a map that mixes units (softmax, a normalisation, x + roll(x)); "
            f"test single elements with check_intertwiner instead.")


def _run(fn, n: int, seed: int, n_samples: int, scale, centre: float = 0.0) -> tuple[int, dict]:
    """The degree and one check per generator; with a ``centre`` σ(0), the checks of σ − σ(0) made on σ itself
    with the offset c(M) = σ(0)(1 − φ(M)·1). (Subtracting σ(0) first would cancel: x³ + 2 − 2 is exact to
    eps·2, not eps·x³, and each input's tolerance, relative to its own values, would fail it.)"""
    d = _degree((lambda x: fn(x) - centre) if centre else fn, n, seed)
    offset = affine_extension(GeneralLinear(n), centre) if centre else None
    names = GENERATORS if math.isfinite(_at_zero(fn, n)) else [g for g in GENERATORS if g != "affine_negation"]
    return d, {name: check_intertwiner(fn, generator_element(name, n, degree=d, seed=seed), seed=seed,
                                       n_samples=n_samples, scale=scale, group=offset) for name in names}


def _at_zero(fn, n: int) -> float:
    """σ(0), float64. Not finite for σ(x) = sin(x)/x or x·log|x| (0/0, 0·∞ in floating point): then the affine
    negation σ(−x) = −σ(x) + 2σ(0) and the affine extension are undefined, and neither is tested."""
    with torch.no_grad():
        return float(fn(torch.zeros(1, n, dtype=torch.float64))[0, 0])


@dataclass(repr=False)
class GroupDiscovery(Report):
    """The result of :func:`discover_group`: one numerical check per generator, and the group they imply."""

    activation: str
    n: int
    seed: int
    degree: int  # estimated homogeneity degree d (σ(λx) = λ^d σ(x)); 1 when there is none
    checks: dict  # generator name → IntertwinerCheck
    group: Group  # source="empirical"
    affine_checks: dict = field(default_factory=dict)  # with affine=True: the checks on σ − σ(0)
    scale: object = DEFAULT_SCALE  # the input scales the checks drew (see check_intertwiner)

    @property
    def input_max(self) -> float:
        """The largest |x| any check compared: nothing is claimed about σ beyond it."""
        return min(c.input_max for c in self.checks.values())

    @property
    def holds(self) -> dict:
        return {k: c.passed for k, c in self.checks.items()}

    @property
    def members(self) -> list:
        """The generators that hold, in :data:`GENERATORS` order."""
        return [k for k in GENERATORS if k in self.checks and self.checks[k].passed]

    def summary(self) -> str:
        held = ", ".join(self.members) or "no generator"
        return (f"{self.activation}: {held} hold → {self.group.describe()} [empirical, on inputs "
                f"with |x| ≤ {self.input_max:.3g}; widen with scale=]")

    def to_frame(self):
        import pandas as pd

        rounds = (("σ", self.checks), ("σ − σ(0)", self.affine_checks))
        rows = [{"on": on, "generator": k, "test": DESCRIPTIONS[k], "holds": c.passed,
                 "max_abs_error": c.max_abs_error, "tolerance": c.tolerance, "worst_ratio": c.worst_ratio,
                 "input_max": c.input_max}
                for on, checks in rounds for k, c in checks.items()]
        return pd.DataFrame(rows)

    def plot(self, ax=None):
        """Bars of error / tolerance per generator on a log axis (below 1 holds); returns the Axes."""
        import seaborn as sns

        ax = new_axes(ax)
        frame = self.to_frame()
        frame["error / tolerance"] = frame["worst_ratio"].clip(lower=1e-6)
        # Not barplot(log_scale=True): with seaborn 0.13.2 and matplotlib 3.11 it draws no bars.
        sns.barplot(data=frame, y="generator", x="error / tolerance", hue="on", ax=ax)
        ax.set_xscale("log")
        ax.axvline(1.0, color="k", ls="--")
        ax.set_title(f"{self.activation}: generators left of the line hold", fontsize=9)
        return ax


def discover_group(activation, n: int = 8, *, seed: int = 0, affine: bool = False,
                   n_samples: int = 2048, scale=DEFAULT_SCALE) -> GroupDiscovery:
    """Find the intertwiner group of any elementwise activation by testing generators numerically.

    Tests (float64, :func:`check_intertwiner`) permutations, positive and signed scalings with the
    estimated degree d, negation (odd), sign flips with φ = abs (even), affine negation, a rotation
    and a dense GL map, then builds the largest catalogue group consistent with what holds. It agrees
    with :func:`intertwiner_group` on every catalogue activation.

    The group is found on the inputs drawn (rows of a Gaussian, each times a scale log-uniform over
    ``scale``, by default 10⁻⁶ … 10³, so |x| up to about 3.5·10³): an activation that changes shape only
    beyond ``input_max`` (a clamp at 10⁴) is not seen, and a wider ``scale`` is the remedy.

    Args:
        activation: any callable mapping ``[n_samples, n]`` to ``[n_samples, n]``, a catalogue name,
            or an ``nn.Module`` (a per-channel ``nn.PReLU`` needs ``n`` = its number of slopes).
        n: the number of units to test on (≥ 2).
        seed: the random inputs and generator elements.
        affine: also test σ − σ(0); where its group is larger, return it as an affine extension
            (``offset`` c(M) = σ(0)(1 − φ(M)·1)). Where σ(0) is not finite (sin(x)/x), neither this nor the
            affine negation generator is tested: both are undefined.
        n_samples, scale: the random inputs (see :func:`check_intertwiner`).

    Returns:
        a :class:`GroupDiscovery` with ``.group`` (``source="empirical"``), ``.checks`` and ``.members``.

    >>> found = discover_group(lambda x: x ** 3 + x)
    >>> found.members
    ['permutation', 'negation', 'affine_negation']
    >>> found.group.name, found.group.source
    ('signed_permutation', 'empirical')
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise InvalidOptionError(f"discover_group needs n ≥ 2 units (with one unit a permutation cannot be told "
                                 f"from the identity); got n={n!r}.")
    fn, display = activation_callable(activation)
    _require_elementwise(fn, n, seed, scale, display)
    d, checks = _run(fn, n, seed, n_samples, scale)
    family, phi = _decide({k: c.passed for k, c in checks.items()}, d)
    group = _build(family, n, phi, 1.0, "empirical", display)
    affine_checks: dict[str, IntertwinerCheck] = {}
    if affine:
        centre = _at_zero(fn, n)
        if math.isfinite(centre) and centre != 0.0:
            d2, affine_checks = _run(fn, n, seed, n_samples, scale, centre)
            family2, phi2 = _decide({k: c.passed for k, c in affine_checks.items()}, d2)
            if (family2, phi2) != (family, phi):
                group = affine_extension(_build(family2, n, phi2, 1.0, "empirical", display), centre)
                group.source = "empirical"
    return GroupDiscovery(activation=display, n=n, seed=seed, degree=d, checks=checks, group=group,
                          affine_checks=affine_checks, scale=scale)
