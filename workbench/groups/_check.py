"""The numerical intertwiner test: does σ(Mx) = φ(M)σ(x) + c hold on random inputs?"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .._errors import InvalidOptionError
from .._report import Report, new_axes
from ._catalogue import activation_callable
from ._elements import GroupElement
from ._families import Group, get_group


@dataclass(repr=False)
class IntertwinerCheck(Report):
    """The result of :func:`check_intertwiner`: the worst error over the samples, and the verdict.

    ``errors`` is ``[n_samples]``: per input x, max_i |σ(Mx) − φ(M)σ(x) − c|_i.
    """

    activation: str
    element: str  # the element's repr
    group: str  # the family the element came from
    n: int
    max_abs_error: float
    max_rel_error: float  # max_abs_error / max|σ(Mx)|
    tolerance: float
    passed: bool
    offset_used: bool  # whether c (an affine extension's offset) was added
    dtype: str
    n_samples: int
    seed: int
    scale: float
    errors: torch.Tensor = field(default=None)  # [n_samples] float64

    def summary(self) -> str:
        verdict, cmp = ("passed", "≤") if self.passed else ("FAILED", ">")
        c = " − c" if self.offset_used else ""
        return (f"{verdict}: max |σ(Mx) − φ(M)σ(x){c}| = {self.max_abs_error:.3g} {cmp} tolerance "
                f"{self.tolerance:.3g} ({self.activation}, {self.group} element, n={self.n}, {self.dtype})")

    def to_frame(self):
        import pandas as pd

        keys = ["activation", "group", "n", "max_abs_error", "max_rel_error", "tolerance", "passed",
                "offset_used", "dtype", "n_samples", "seed", "scale"]
        return pd.DataFrame([{k: getattr(self, k) for k in keys}])

    def plot(self, ax=None):
        """Histogram of the per-sample errors on a log axis, with the tolerance marked; returns the Axes."""
        import seaborn as sns

        ax = new_axes(ax)
        floor = self.tolerance * 1e-6  # exact zeros are drawn at this floor
        errs = self.errors.clamp_min(floor).numpy()
        sns.histplot(x=errs, log_scale=True, ax=ax, color="C0" if self.passed else "C3")
        ax.axvline(self.tolerance, color="k", ls="--", label=f"tolerance {self.tolerance:.2g}")
        ax.set_xlabel(f"max_i |σ(Mx) − φ(M)σ(x)|_i per sample (zeros shown at {floor:.1g})")
        ax.set_title(self.summary().split(" (")[0][:80], fontsize=9)
        ax.legend()
        return ax


def _offset(activation_fn, element: GroupElement, group: Optional[Group], dtype) -> Optional[torch.Tensor]:
    if group is not None:
        return group.offset(element)
    if element.group.startswith("affine_"):
        # sampled from an affine extension: c(M) = σ(0)(1 − φ(M)·1), read off the activation itself
        centre = float(activation_fn(torch.zeros(1, element.n, dtype=dtype))[0, 0])
        ones = torch.ones(element.n, dtype=torch.float64)
        return centre * (ones - element.phi().act(ones, dim=0).double())
    return None


def check_intertwiner(activation, element: GroupElement, *, n_samples: int = 4096, seed: int = 0,
                      dtype: torch.dtype = torch.float64, scale: float = 3.0,
                      group: Union[Group, str, None] = None) -> IntertwinerCheck:
    """Test σ(Mx) = φ(M)σ(x) + c numerically, on rows x of a ``[n_samples, n]`` Gaussian times ``scale``.

    Args:
        activation: any elementwise activation: a catalogue name, an ``nn.Module``, or a callable
            mapping ``[n_samples, n]`` to ``[n_samples, n]`` (lambdas are fine here).
        element: the group element M (``n`` = ``element.n``); φ(M) is ``element.phi()``.
        n_samples, seed, scale: the random inputs (same seed, same inputs).
        dtype: the dtype of the computation; the tolerance is ``100·eps(dtype)·max(1, max|σ(Mx)|,
            max|φ(M)σ(x)|)``.
        group: the group M came from, a :class:`Group` or a registry name. Its ``offset(M)`` is the
            affine c (None: c = 0). Without it, an element sampled from an affine extension (its
            ``group`` starts with ``"affine_"``) gets c = σ(0)(1 − φ(M)·1).

    Returns:
        an :class:`IntertwinerCheck` (``passed``, ``max_abs_error``, ``errors`` ``[n_samples]``, …).

    >>> from workbench.groups import get_group
    >>> g = get_group("relu", 8).sample(seed=0)
    >>> check_intertwiner("relu", g).passed
    True
    >>> check_intertwiner("gelu", g).passed     # GELU is not positively homogeneous
    False
    """
    if not isinstance(element, GroupElement):
        raise InvalidOptionError(f"check_intertwiner needs a group element (e.g. G.sample(seed=0)); got "
                                 f"{type(element).__name__}.")
    fn, display = activation_callable(activation, dtype)
    n = element.n
    if group is not None:
        group = get_group(group, n)
    x = scale * torch.randn(n_samples, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)  # [N, n]
    with torch.no_grad():
        lhs = fn(element.act(x, dim=-1))  # σ(Mx)       [N, n]
        if lhs.shape != x.shape:
            raise InvalidOptionError(f"{display} is not elementwise: it mapped inputs of shape {tuple(x.shape)} "
                                     f"to {tuple(lhs.shape)}.")
        rhs = element.phi().act(fn(x.clone()), dim=-1)  # φ(M)σ(x)  [N, n]; clone: in-place modules
        c = _offset(fn, element, group, dtype)
    if c is not None:
        rhs = rhs + c.to(dtype)
    err = (lhs - rhs).abs().double()
    errors = torch.nan_to_num(err.amax(dim=1), nan=float("inf"))  # [N]
    finite = bool(torch.isfinite(lhs).all() and torch.isfinite(rhs).all())  # an overflow never passes
    peak = max(lhs.abs().max().item(), rhs.abs().max().item()) if finite else 1.0
    tol = 100 * torch.finfo(dtype).eps * max(1.0, peak)
    max_abs = errors.max().item()
    return IntertwinerCheck(
        activation=display, element=repr(element), group=element.group, n=n, max_abs_error=max_abs,
        max_rel_error=max_abs / max(lhs.abs().max().item(), torch.finfo(dtype).tiny),
        tolerance=tol, passed=finite and max_abs <= tol, offset_used=c is not None,
        dtype=str(dtype).replace("torch.", ""), n_samples=n_samples, seed=seed, scale=scale, errors=errors,
    )
