"""The registry of similarity measures with their declared invariances, ``compare`` and its report.

Every flag in ``MEASURES`` is a claim the tests check in both directions on random data: a
transformation the measure declares is applied to one side and the number must not move (float64
rounding); a transformation it does not declare must move it clearly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Union

import torch

from .._errors import InvalidOptionError, nearest
from .._progress import ProgressLike, progress_bar
from .._random import SeedLike, as_generator
from .._report import Report, new_axes
from ..groups import get_group
from . import _alignment as al
from . import _kernels as ke
from ._prep import as_acts

#: Transformations of the units a measure may be invariant to (applied to one side only).
INVARIANCES = {
    "permutation": "reorder the units",
    "orthogonal": "rotate or reflect the units (an orthogonal map)",
    "isotropic_scaling": "multiply every unit by the same positive number",
    "unit_scaling": "multiply each unit by its own positive number (D₊)",
    "invertible_linear": "any invertible linear map of the units (GL)",
    "translation": "add a constant to each unit",
}
#: The invariances that are groups in ``workbench.groups``: tests and ``random_transform`` sample there.
INVARIANCE_GROUPS = {"permutation": "permutation", "orthogonal": "orthogonal", "unit_scaling": "positive_diagonal",
                     "invertible_linear": "gl"}

_KERNEL = "per example: the whole [C, *spatial] map is one point"
_CHANNEL = "per example; channels standardised over (examples, positions), inner products per channel over positions"
_POSITION = "per position: each (example, position) is a sample of the C units"


@dataclass(frozen=True)
class Measure:
    """A similarity measure ``fn(acts_a, acts_b) -> float`` and what it is declared invariant to."""

    name: str
    fn: Callable = field(repr=False)
    invariances: frozenset
    spatial: str = field(repr=False)
    description: str = field(repr=False)

    def __call__(self, acts_a, acts_b) -> float:
        return self.fn(acts_a, acts_b)

    def invariant_to(self, kind: str) -> bool:
        """Whether the measure is declared invariant to ``kind`` (a key of ``INVARIANCES``)."""
        return _check_kind(kind) in self.invariances

    @property
    def group(self) -> str:
        """The largest declared group of unit transformations, for tables and plot colours."""
        inv = self.invariances
        if "invertible_linear" in inv:
            return "GL"
        if "orthogonal" in inv:
            return "O(n)"
        return "P·D₊ (G_ReLU)" if "unit_scaling" in inv else "P"


def _measure(name, fn, invariances, spatial, description) -> Measure:
    unknown = set(invariances) - set(INVARIANCES)
    assert not unknown, unknown  # a typo in this file, not a user error
    return Measure(name, fn, frozenset(invariances), spatial, description)


_ALL = ("permutation", "isotropic_scaling")
MEASURES = {m.name: m for m in [
    _measure("linear_cka", ke.linear_cka, (*_ALL, "orthogonal", "translation"), _KERNEL,
             "linear CKA, biased HSIC (Kornblith et al. 2019)"),
    _measure("linear_cka_unbiased", lambda a, b: ke.linear_cka(a, b, unbiased=True),
             (*_ALL, "orthogonal", "translation"), _KERNEL, "linear CKA, unbiased HSIC (Song et al. 2012)"),
    _measure("rbf_cka", ke.rbf_cka, (*_ALL, "orthogonal", "translation"), _KERNEL,
             "CKA with a Gaussian kernel, bandwidth = median distance"),
    _measure("standardized_cka", ke.standardized_cka, (*_ALL, "unit_scaling", "translation"), _CHANNEL,
             "unbiased linear CKA of channel-standardised maps (the paper's 'orthogonal' CKA)"),
    _measure("grelu_cka", ke.grelu_cka, (*_ALL, "unit_scaling", "translation"), _CHANNEL,
             "the paper's G_ReLU-CKA: kernel = max over channels, unbiased HSIC"),
    _measure("orthogonal_procrustes", al.orthogonal_procrustes, (*_ALL, "orthogonal"), _POSITION,
             "1 − d, best orthogonal map, global normalisation"),
    _measure("permutation_procrustes", al.permutation_procrustes, _ALL, _POSITION,
             "1 − d, best permutation (Hungarian), global normalisation"),
    _measure("grelu_procrustes", al.grelu_procrustes, (*_ALL, "unit_scaling"), _POSITION,
             "the paper's G_ReLU-Procrustes: units normalised, Hungarian matching, 1 − d"),
    _measure("correlation_matching", al.correlation_matching, (*_ALL, "unit_scaling", "translation"), _POSITION,
             "mean correlation of units matched one-to-one (Hungarian)"),
    _measure("mean_cca", al.mean_cca, (*_ALL, "orthogonal", "unit_scaling", "invertible_linear", "translation"),
             _POSITION, "mean canonical correlation"),
    _measure("svcca", al.svcca, (*_ALL, "orthogonal", "translation"), _POSITION,
             "mean CCA of the top singular directions (99% of variance)"),
]}
MEASURE_ALIASES = {"cka": "linear_cka", "cka_unbiased": "linear_cka_unbiased", "procrustes": "orthogonal_procrustes",
                   "ortho_procrustes": "orthogonal_procrustes", "wreath_procrustes": "grelu_procrustes",
                   "g_relu_procrustes": "grelu_procrustes", "wreath_cka": "grelu_cka", "g_relu_cka": "grelu_cka",
                   "cca": "mean_cca", "ortho_cka": "standardized_cka"}


def get_measure(name: Union[str, Measure]) -> Measure:
    """A measure by registry name or alias, or a clear error naming the nearest ones."""
    if isinstance(name, Measure):
        return name
    if not isinstance(name, str):
        raise InvalidOptionError(f"a similarity measure is a name from wb.similarity.measures(); got "
                                 f"{type(name).__name__}.")
    key = MEASURE_ALIASES.get(name.lower(), name.lower())
    if key not in MEASURES:
        close = nearest(name.lower(), [*MEASURES, *MEASURE_ALIASES], n=3)
        tip = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise InvalidOptionError(f"unknown similarity measure {name!r}; the measures are {list(MEASURES)}.{tip}")
    return MEASURES[key]


def _check_kind(kind: str) -> str:
    if kind not in INVARIANCES:
        close = nearest(str(kind), INVARIANCES, n=2)
        tip = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise InvalidOptionError(f"unknown transformation {kind!r}; expected one of {list(INVARIANCES)}.{tip}")
    return kind


def measures():
    """Every registered measure with its invariance flags and how it reads conv maps (a DataFrame).

    Example:
        >>> frame = measures()
        >>> bool(frame.set_index("measure").loc["grelu_procrustes", "unit_scaling"])
        True
    """
    import pandas as pd

    return pd.DataFrame([{"measure": m.name, "group": m.group, **{k: k in m.invariances for k in INVARIANCES},
                          "spatial": m.spatial, "description": m.description} for m in MEASURES.values()])


def random_transform(acts, kind: str, *, seed: SeedLike = 0) -> torch.Tensor:
    """``acts`` moved by a random transformation of its units (axis 1, the same at every position).

    Groups (``INVARIANCE_GROUPS``) are sampled from the ``workbench.groups`` registry; isotropic
    scaling multiplies by a log-normal factor, translation adds an offset per unit of about twice the
    activations' spread. Same seed, same transformation (``seed``: an int, None, a ``torch.Generator`` or
    a NumPy ``Generator``).

    Args:
        acts: ``[N, C]`` or ``[N, C, *spatial]``.
        kind: a key of ``INVARIANCES``.

    Returns:
        float64, the shape of ``acts``.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(5, 3, generator=g, dtype=torch.float64)
        >>> y = random_transform(x, "orthogonal", seed=1)
        >>> bool(torch.allclose(x @ x.T, y @ y.T))
        True
    """
    x = as_acts(acts)
    kind, c = _check_kind(kind), x.shape[1]
    g, _ = as_generator(seed)
    if kind in INVARIANCE_GROUPS:
        return get_group(INVARIANCE_GROUPS[kind], c).sample(g).act(x, dim=1)
    if kind == "isotropic_scaling":
        return x * torch.exp(torch.randn((), generator=g, dtype=torch.float64))
    offset = 2 * (x.std() + 1) * torch.randn(c, generator=g, dtype=torch.float64)
    return x + offset.reshape(1, c, *[1] * (x.ndim - 2))


@dataclass(repr=False)
class SimilarityReport(Report):
    """Similarity of two activation sets under several measures (``report["grelu_cka"]`` reads one)."""

    values: dict  # measure name -> float
    shape_a: tuple
    shape_b: tuple

    def __getitem__(self, name: str) -> float:
        return self.values[get_measure(name).name]

    def summary(self) -> str:
        head = f"{len(self.values)} measures on {list(self.shape_a)} vs {list(self.shape_b)}"
        # NaN compares false with everything, so min/max would return whichever NaN came first as both.
        real = {k: v for k, v in self.values.items() if v == v}
        nan = f"; NaN: {', '.join(k for k in self.values if k not in real)}" if len(real) < len(self.values) else ""
        if not real:
            return head + nan
        lo, hi = min(real, key=real.get), max(real, key=real.get)
        return f"{head}; lowest {lo} {real[lo]:.3f}, highest {hi} {real[hi]:.3f}{nan}"

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([{"measure": k, "similarity": v, "invariant_to": MEASURES[k].group,
                              "spatial": MEASURES[k].spatial.split(":")[0]} for k, v in self.values.items()])

    def plot(self, ax=None):
        import seaborn as sns

        ax = new_axes(ax, figsize=(6, 0.35 * len(self.values) + 1))
        sns.barplot(data=self.to_frame(), y="measure", x="similarity", hue="invariant_to", dodge=False, ax=ax)
        ax.set_xlim(min(0.0, *self.values.values()), 1.0)
        ax.set_title("similarity by measure (colour: the group it is invariant to)")
        return ax


def compare(acts_a, acts_b, measures: Optional[Union[str, Iterable[str]]] = None, *,
            progress: ProgressLike = None) -> SimilarityReport:
    """Every requested measure (default: all of ``MEASURES``) on one pair of activation sets.

    Args:
        acts_a: ``[N, C_a]`` or ``[N, C_a, *spatial]`` (torch or numpy), N examples.
        acts_b: the same N examples in another layer or model. Per-position measures need the same
            spatial shape; per-example ones do not.
        measures: a name, a list of names (aliases such as ``"wreath_cka"`` accepted), or None.
        progress: a bar of the measures computed: True, False, or None (the default) for a bar in a
            Jupyter notebook only.

    Returns:
        A :class:`SimilarityReport`.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(30, 4, generator=g, dtype=torch.float64).relu()
        >>> report = compare(x, x[:, [1, 0, 3, 2]] * 2, measures=["grelu_procrustes", "linear_cka"])
        >>> [round(v, 9) for v in report.values.values()]
        [1.0, 1.0]
    """
    names = list(MEASURES) if measures is None else [measures] if isinstance(measures, str) else list(measures)
    chosen = [get_measure(n) for n in names]
    if not chosen:
        raise InvalidOptionError(f"measures is empty; pass None for all of them or names from {list(MEASURES)}.")
    a, b = as_acts(acts_a, "acts_a"), as_acts(acts_b, "acts_b")  # detached float64: no graph is recorded
    values = {}
    with progress_bar(chosen, desc="similarity", unit="measure", progress=progress) as bar:
        for m in bar:
            bar.set_postfix_str(m.name, refresh=False)
            values[m.name] = m(a, b)
    return SimilarityReport(values, tuple(a.shape), tuple(b.shape))
