"""The numerical intertwiner test: does σ(Mx) = φ(M)σ(x) + c hold on random inputs?

A numerical test sees only the inputs it draws: an activation that agrees with ReLU up to |x| = 20
(``clamp(x, 0, 20)``) is positively homogeneous there and nowhere else. So the inputs span several
orders of magnitude by default, and every verdict states the largest |x| it saw (``input_max``),
which the caller can widen with ``scale``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .._errors import InvalidOptionError
from .._report import Report, new_axes
from ._catalogue import activation_callable
from ._elements import GroupElement, ScaledPermutation
from ._families import Group, get_group


@dataclass(repr=False)
class IntertwinerCheck(Report):
    """The result of :func:`check_intertwiner`: the worst error over the samples, and the verdict.

    ``errors`` is ``[n_samples]``: per input x, max_i |σ(Mx) − φ(M)σ(x) − c|_i (NaN for an input
    left out because σ was not finite there). The verdict holds for inputs with |x|, |Mx| up to
    ``input_max`` only; ``n_checked`` of the ``n_samples`` inputs were compared.
    """

    activation: str
    element: str  # the element's repr
    group: str  # the family the element came from
    n: int
    max_abs_error: float
    max_rel_error: float  # max_abs_error / max|σ(Mx)|
    tolerance: float  # the tolerance of the input with the largest error / tolerance (see worst_ratio)
    passed: bool
    offset_used: bool  # whether c (an affine extension's offset) was added
    dtype: str
    n_samples: int
    seed: int
    scale: object  # a float (one Gaussian scale) or (low, high) (log-uniform scales per input)
    errors: torch.Tensor = field(default=None)  # [n_samples] float64
    tolerances: torch.Tensor = field(default=None)  # [n_samples] float64: 100·eps(dtype)·that input's largest |value|
    worst_ratio: float = math.nan  # max over inputs of error / that input's tolerance; passed ⇔ ≤ 1
    input_max: float = math.nan  # the largest |x| or |Mx| among the inputs compared
    n_checked: int = 0  # inputs compared; the rest gave a non-finite σ (an overflow) and are left out

    def summary(self) -> str:
        verdict, cmp = ("passed", "≤") if self.passed else ("FAILED", ">")
        c = " − c" if self.offset_used else ""
        left = (f"; {self.n_samples - self.n_checked} of {self.n_samples} inputs left out, σ not finite there"
                if self.n_checked < self.n_samples else "")
        return (f"{verdict}: |σ(Mx) − φ(M)σ(x){c}| {cmp} tolerance, worst error / tolerance {self.worst_ratio:.3g} "
                f"(max error {self.max_abs_error:.3g}; {self.activation}, {self.group} element, n={self.n}, {self.dtype}; "
                f"on inputs with |x| ≤ {self.input_max:.3g}{left}; widen with scale=)")

    def to_frame(self):
        import pandas as pd

        keys = ["activation", "group", "n", "max_abs_error", "max_rel_error", "tolerance", "worst_ratio", "passed",
                "offset_used", "dtype", "n_samples", "n_checked", "input_max", "seed", "scale"]
        return pd.DataFrame([{k: getattr(self, k) for k in keys}])

    def plot(self, ax=None):
        """Histogram of the per-sample error / tolerance on a log axis, 1 marked; returns the Axes."""
        import seaborn as sns

        ax = new_axes(ax)
        floor = 1e-6  # exact zeros are drawn at this floor
        ratio = self.errors / self.tolerances
        ratios = ratio[~ratio.isnan()].clamp_min(floor).numpy()
        sns.histplot(x=ratios, log_scale=True, ax=ax, color="C0" if self.passed else "C3")
        ax.axvline(1.0, color="k", ls="--", label="tolerance")
        ax.set_xlabel(f"max_i |σ(Mx) − φ(M)σ(x)|_i / tolerance per sample (zeros shown at {floor:.1g})")
        ax.set_title(self.summary().split(" (")[0][:80], fontsize=9)
        ax.legend()
        return ax


def _offset(activation_fn, element: GroupElement, group: Optional[Group], dtype) -> Optional[torch.Tensor]:
    if group is not None:
        return group.offset(element)
    if element.group.startswith("affine_"):
        # sampled from an affine extension: c(M) = σ(0)(1 − φ(M)·1), read off the activation itself
        centre = float(activation_fn(torch.zeros(1, element.n, dtype=dtype))[0, 0])
        if not math.isfinite(centre):  # (else every input's c is NaN, and the refusal below blames an overflow)
            raise InvalidOptionError(f"σ(0) = {centre} is not finite, so the offset c(M) = σ(0)(1 − φ(M)·1) of an element "
                                     f"of an affine extension ({element.group}) is undefined: the affine extension "
                                     f"needs σ defined at 0.")
        ones = torch.ones(element.n, dtype=torch.float64)
        return centre * (ones - element.phi().act(ones, dim=0).double())
    return None


#: the default input scales: log-uniform over nine decades, so a kink or a saturation anywhere up to
#: |x| ≈ 10³ (ReLU6, clamp(x, 0, 20), a ReLU shifted by 50) and a non-linearity down to |x| ≈ 10⁻⁶
#: (softplus with β = 10⁶, nearly ReLU) are inside the inputs drawn.
DEFAULT_SCALE = (1e-6, 1e3)


def _scale_option(scale) -> tuple[float, float]:
    """``scale`` as ``(low, high)``: a float is one Gaussian scale (low = high)."""
    pair = (scale, scale) if isinstance(scale, (int, float)) and not isinstance(scale, bool) else scale
    try:
        lo, hi = (float(v) for v in pair)
        ok = 0 < lo <= hi < math.inf
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InvalidOptionError(f"scale is the standard deviation of the Gaussian inputs: a positive finite number, "
                                 f"or (low, high) with 0 < low ≤ high for scales log-uniform between them; got {scale!r}.")
    return lo, hi


def draw_inputs(n_samples: int, n: int, scale, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """``[n_samples, n]`` Gaussian rows, each times its own scale, log-uniform over ``scale = (low, high)``
    (one scale for a float: the rows the checks drew before scales were ranges)."""
    lo, hi = _scale_option(scale)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_samples, n, generator=g, dtype=dtype)
    if lo == hi:
        return lo * z
    u = torch.rand(n_samples, 1, generator=g, dtype=torch.float64)
    return z * torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))).to(dtype)


def _apply(fn, x: torch.Tensor, display: str) -> torch.Tensor:
    """σ(x) for ``[N, n]`` inputs, or a clear error for a callable that cannot act on them elementwise."""
    try:
        y = fn(x)
    except (RuntimeError, TypeError, ValueError) as exc:  # e.g. a per-channel PReLU with another number of slopes
        raise InvalidOptionError(f"{display} could not be applied to inputs of shape {tuple(x.shape)} ({exc}); an "
                                 f"activation maps [inputs, n] elementwise (a per-channel module needs n = its "
                                 f"channels).") from exc
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise InvalidOptionError(f"{display} is not elementwise: it mapped inputs of shape {tuple(x.shape)} to {shape}.")
    return y


def differs(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where two evaluations of σ on the same scalar inputs disagree: beyond 100·eps(dtype) of the larger value or
    of the median |value| (a σ computed with a cancellation may round differently on another code path), and not
    both the same infinity or both NaN. ``[...]`` bool."""
    a, b = a.double(), b.double()
    mag = torch.maximum(a.abs(), b.abs())
    finite = mag[torch.isfinite(mag)]
    floor = float(finite.median()) if finite.numel() else 0.0
    close = (a - b).abs() <= 100 * torch.finfo(dtype).eps * mag.clamp_min(floor)
    return ~(close | (a == b) | (a.isnan() & b.isnan()))


def repeatable(fn, x: torch.Tensor, first: torch.Tensor, display: str) -> None:
    """Refuse a σ that gives other values on the same inputs (``first`` is σ(x)): a random activation (``nn.RReLU``
    draws its slopes, ``nn.Dropout`` its mask, in training mode) satisfies σ(Mx) = φ(M)σ(x) at best in distribution,
    and a verdict from one draw would be about its noise: RReLU in training mode failed the P·D₊ it has."""
    with torch.no_grad():
        again = _apply(fn, x.clone(), display)
    bad = differs(first, again, x.dtype)
    if bool(bad.any()):
        raise InvalidOptionError(
            f"{display} is not a function of its input: two calls on the same inputs gave different values at "
            f"{int(bad.sum())} of {bad.numel()} entries (a random activation, e.g. nn.RReLU or nn.Dropout in training "
            f"mode), so a verdict on σ(Mx) = φ(M)σ(x) would be about its noise; call .eval() on it first.")


def _check_element(element: GroupElement) -> None:
    """Refuse what is not an invertible finite matrix: G_σ ⊂ GL(n), and a singular M passes any σ with
    σ(0) = 0 (0 = 0·σ(x)) or any elementwise σ (a repeated index: σ(x₀) = σ(x₀)), so its verdict would say
    nothing about a symmetry."""
    what = f"the element {element!r}"
    if isinstance(element, ScaledPermutation):
        if not bool(torch.equal(torch.sort(element.perm).values, torch.arange(element.n))):
            raise InvalidOptionError(f"{what} has perm {element.perm.tolist()}, which is not a permutation of "
                                     f"0..{element.n - 1}: the matrix is not invertible, so it is in no intertwiner group.")
        if element.scale is not None:
            if not bool(torch.isfinite(element.scale).all()):
                raise InvalidOptionError(f"{what} has non-finite scales ({element.scale.tolist()}); an element is a finite "
                                         f"invertible matrix.")
            zero = torch.nonzero(element.scale == 0).flatten().tolist()
            if zero:
                raise InvalidOptionError(f"{what} has a zero scale (units {zero}): the matrix is singular, so it is "
                                         f"in no intertwiner group; scales must be nonzero.")
        return
    M = element.matrix(torch.float64)
    if not bool(torch.isfinite(M).all()):
        raise InvalidOptionError(f"{what} has non-finite entries; an element is a finite invertible matrix.")
    s = torch.linalg.svdvals(M)
    if not bool(s[-1] > s[0] * element.n * torch.finfo(torch.float64).eps):
        cond = math.inf if float(s[-1]) == 0 else float(s[0] / s[-1])
        raise InvalidOptionError(f"{what} is singular to float64 precision (condition number {cond:.3g}): it is in no "
                                 f"intertwiner group, which holds invertible maps only.")


def check_intertwiner(activation, element: GroupElement, *, n_samples: int = 4096, seed: int = 0,
                      dtype: torch.dtype = torch.float64, scale=DEFAULT_SCALE,
                      group: Union[Group, str, None] = None) -> IntertwinerCheck:
    """Test σ(Mx) = φ(M)σ(x) + c numerically, on rows x of a ``[n_samples, n]`` Gaussian, each row times a
    scale drawn log-uniformly from ``scale`` (default 10⁻⁶ … 10³).

    The verdict covers the inputs drawn and no others: ``input_max`` is the largest |x| or |Mx| compared
    (about 3.5·10³ by default). An activation that changes shape beyond it (a clamp at 10⁴) needs a
    wider ``scale``.

    Args:
        activation: any elementwise activation: a catalogue name, an ``nn.Module``, or a callable
            mapping ``[n_samples, n]`` to ``[n_samples, n]`` (lambdas are fine here).
        element: the group element M (``n`` = ``element.n``), a finite invertible matrix (a singular
            one is refused); φ(M) is ``element.phi()``.
        n_samples, seed: the random inputs (same seed, same inputs).
        scale: ``(low, high)``: each input row is a standard Gaussian times a scale log-uniform between
            them; a float: every row times that one scale.
        dtype: the dtype of the computation; each input's tolerance is ``100·eps(dtype)`` times its largest
            |value| (σ(Mx), φ(M)σ(x) or c), or the largest such value over inputs of size at most 1 where
            that is larger: a small input is held to σ's magnitude on unit inputs, not the largest input's.
        group: the group M came from, a :class:`Group` or a registry name. Its ``offset(M)`` is the
            affine c (None: c = 0). Without it, an element sampled from an affine extension (its
            ``group`` starts with ``"affine_"``) gets c = σ(0)(1 − φ(M)·1).

    Inputs where σ is not finite (an overflow: ``exp`` at x = 10³) are left out and counted
    (``n_checked``); with more than half of them left out the check is refused: pass a narrower ``scale``.

    Returns:
        an :class:`IntertwinerCheck` (``passed``, ``max_abs_error``, ``worst_ratio``, ``input_max``,
        ``errors`` ``[n_samples]``, …).

    >>> from workbench.groups import get_group
    >>> g = get_group("relu", 8).sample(seed=0)
    >>> check_intertwiner("relu", g).passed
    True
    >>> check_intertwiner("gelu", g).passed     # GELU is not positively homogeneous
    False
    >>> check_intertwiner(lambda x: x.clamp(0, 20), g).passed     # ReLU up to 20, not beyond
    False
    """
    if not isinstance(element, GroupElement):
        raise InvalidOptionError(f"check_intertwiner needs a group element (e.g. G.sample(seed=0)); got "
                                 f"{type(element).__name__}.")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise InvalidOptionError(f"n_samples is the number of random inputs, an integer ≥ 1; got {n_samples!r}.")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidOptionError(f"dtype is the floating dtype of the computation (torch.float64, torch.float32); "
                                 f"got {dtype!r}.")
    _check_element(element)
    fn, display = activation_callable(activation, dtype)
    n = element.n
    if group is not None:
        group = get_group(group, n)
    x = draw_inputs(n_samples, n, scale, seed, dtype)  # [N, n]
    with torch.no_grad():
        mx = element.act(x, dim=-1)
        lhs = _apply(fn, mx.clone(), display)  # σ(Mx) [N, n]; clone: an in-place module would overwrite mx, read below
        sx = _apply(fn, x.clone(), display)  # σ(x) [N, n]; clone: in-place modules
        repeatable(fn, x, sx, display)
        rhs = element.phi().act(sx, dim=-1)  # φ(M)σ(x)  [N, n]
        c = _offset(fn, element, group, dtype)
    size = torch.maximum(lhs.abs(), rhs.abs()).double()  # [N, n]
    if c is not None:
        rhs = rhs + c.to(dtype)
        size = torch.maximum(size, torch.maximum(rhs.abs().double(), c.abs().double()))
    # an overflow (σ = inf or NaN) says nothing about a symmetry either way: leave those inputs out, and say so
    kept = torch.isfinite(lhs).all(dim=1) & torch.isfinite(rhs).all(dim=1)  # [N]
    n_checked = int(kept.sum())
    if 2 * n_checked < n_samples:
        raise InvalidOptionError(
            f"{display} is not finite (inf or NaN) on {n_samples - n_checked} of {n_samples} inputs (scale={scale!r}, "
            f"|x| up to {float(x.abs().max()):.3g}): an overflow, or an activation not defined on every real; pass "
            f"a narrower scale=(low, high), or check in float64.")
    eps = torch.finfo(dtype).eps
    err = (lhs - rhs).abs().double().amax(dim=1)  # [N]
    # Each input is held to its own magnitude, so the large inputs a wide scale draws do not loosen the small
    # ones; but no tighter than σ's magnitude on inputs of size about 1 (|x|, |Mx| ≤ 1; the median input's
    # where none are drawn): a σ computed with a cancellation (sigmoid(x) − 1/2, x³ + 2 − 2 near 0) errs by
    # eps·(its intermediates), not eps·σ(x). Both scale with σ, so c·σ gets σ's verdict for any c > 0.
    peaks = size.amax(dim=1)  # [N]
    unit = kept & (torch.maximum(x.abs(), mx.abs()).amax(dim=1) <= 1)
    floor = float(peaks[unit].max()) if bool(unit.any()) else float(peaks[kept].median())
    tols = 100 * eps * peaks.clamp_min(max(floor, torch.finfo(dtype).tiny))  # [N]
    err[~kept] = math.nan
    ratio = torch.where(kept, err / tols, torch.zeros_like(err))
    worst = int(ratio.argmax())
    max_abs = float(err[kept].max())
    peak = float(lhs[kept].abs().max())
    input_max = float(torch.maximum(x.abs(), mx.abs())[kept].max())
    return IntertwinerCheck(
        activation=display, element=repr(element), group=element.group, n=n, max_abs_error=max_abs,
        max_rel_error=max_abs / max(peak, torch.finfo(dtype).tiny), tolerance=float(tols[worst]),
        passed=bool(ratio[worst] <= 1), offset_used=c is not None, dtype=str(dtype).replace("torch.", ""),
        n_samples=n_samples, seed=seed, scale=scale, errors=err, tolerances=tols, worst_ratio=float(ratio[worst]),
        input_max=input_max, n_checked=n_checked,
    )
