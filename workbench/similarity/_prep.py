"""Checking activation pairs and reshaping them the two ways the measures read a conv map.

Every measure takes ``[N, C]`` or ``[N, C, *spatial]`` activations (N examples, C units or channels)
and reads them in one of two ways:

- **per example** (kernel measures): example i is one point, its whole map ``[C, *spatial]``;
- **per position** (alignment measures): every (example, position) pair is one sample of the C
  units, so a symmetry that acts on channels as a 1×1 convolution — the same map at every position,
  which is how the intertwiner groups act in a conv net — acts on these ``[N·P, C]`` rows.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .._errors import InvalidOptionError, WorkbenchError


class DegenerateRepresentationError(WorkbenchError, ValueError):
    """A representation carries no signal for this measure (for example, it is constant). A ``ValueError``."""


def as_acts(acts, name: str = "acts") -> torch.Tensor:
    """``acts`` as a float64 tensor ``[N, C, *spatial]``, or a clear error."""
    if isinstance(acts, np.ndarray):
        if acts.dtype.kind not in "biufc":
            raise InvalidOptionError(f"{name} must hold numbers; got a numpy array of dtype {acts.dtype}.")
        # torch refuses non-native byte order (e.g. '>f8' read from a file) with its own error.
        acts = torch.from_numpy(acts.astype(acts.dtype.newbyteorder("="), copy=False))
    if not isinstance(acts, torch.Tensor):
        raise InvalidOptionError(f"{name} must be a torch tensor or numpy array of shape [N, C] or "
                                 f"[N, C, *spatial]; got {type(acts).__name__}.")
    if acts.ndim < 2:
        raise InvalidOptionError(f"{name} must have shape [N, C] or [N, C, *spatial] (examples first, units "
                                 f"second); got shape {tuple(acts.shape)}.")
    if acts.is_complex():
        raise InvalidOptionError(f"{name} must hold real numbers; got dtype {acts.dtype}.")
    acts = acts.detach().to("cpu", torch.float64)
    # One reduction instead of a boolean copy of a large map: a sum is finite whenever every entry is
    # (float64 does not overflow on activations); only a non-finite sum needs the entrywise look.
    if not bool(torch.isfinite(acts.sum())) and not bool(torch.isfinite(acts).all()):
        raise InvalidOptionError(f"{name} contains NaN or infinite values; a similarity of them would be "
                                 f"meaningless.")
    return acts


def as_pair(acts_a, acts_b, *, min_examples: int = 2, same_positions: bool = False):
    """Both activation sets checked against each other: the same examples (and positions, if asked).

    Each side is brought to a largest entry in [0.5, 1) by a power of two when it lies far outside
    that range: every measure is invariant to isotropic scaling and a power of two changes no
    rounding, so the numbers are unchanged — except that fourth powers (self-HSIC products) of
    entries near 1e±80 no longer overflow to inf or underflow to 0 (which read as 0.5, 0 or
    "degenerate" for inputs that are merely large or small).
    """
    a, b = _in_safe_range(as_acts(acts_a, "acts_a")), _in_safe_range(as_acts(acts_b, "acts_b"))
    if a.shape[0] != b.shape[0]:
        raise InvalidOptionError(f"acts_a and acts_b must describe the same examples: got {a.shape[0]} and "
                                 f"{b.shape[0]} rows (shapes {tuple(a.shape)} and {tuple(b.shape)}).")
    if a.shape[0] < min_examples:
        raise InvalidOptionError(f"this measure needs at least {min_examples} examples; got {a.shape[0]}.")
    if same_positions and a.shape[2:] != b.shape[2:]:
        raise InvalidOptionError(
            f"this measure pairs the two maps position by position, so their spatial shapes must match; got "
            f"{tuple(a.shape[2:])} and {tuple(b.shape[2:])} (shapes {tuple(a.shape)} and {tuple(b.shape)}).")
    return a, b


_SAFE_EXPONENT = 60  # |entries| in [2^-60, 2^60]: eighth powers and sums over 2^40 terms stay finite and normal


def _in_safe_range(acts: torch.Tensor) -> torch.Tensor:
    top = acts.abs().amax()
    if not top > 0:
        return acts
    _, exponent = torch.frexp(top)
    if abs(int(exponent)) <= _SAFE_EXPONENT:
        return acts  # no copy for ordinary activations
    return torch.ldexp(acts, -exponent)


def centred(H: torch.Tensor) -> torch.Tensor:
    """``H [M, F]`` with each column's mean over the M rows removed, a constant column to exactly 0.

    The first row is subtracted before the mean: a plain ``H − mean`` leaves rounding residue (1e-17)
    in a constant column such as 0.1, which the measures that normalise columns or whole maps would
    blow up into a unit (or a whole representation) of pure noise instead of reporting it as dead
    or degenerate; the shift also cancels a large common offset before the mean is rounded.
    """
    H = H - H[:1]  # a fresh tensor: the mean comes off in place, one copy of a large map rather than two
    return H.sub_(H.mean(0, keepdim=True))


def per_example(acts: torch.Tensor) -> torch.Tensor:
    """``[N, C, *spatial]`` → ``[N, C·P]``: one flattened map per example."""
    return acts.reshape(acts.shape[0], -1)


def per_position(acts: torch.Tensor) -> torch.Tensor:
    """``[N, C, *spatial]`` → ``[N·P, C]``: each (example, position) is a sample of the C units."""
    return acts.movedim(1, -1).reshape(-1, acts.shape[1])


def unit_normalise(H: torch.Tensor, *, centre: bool, name: str) -> torch.Tensor:
    """Columns of ``H [M, C]`` (optionally centred) scaled to norm 1; a constant (dead) unit stays 0.

    A representation whose every unit is dead carries no signal: it raises
    :class:`DegenerateRepresentationError`, as every other measure does for its own degenerate inputs
    (all zeros for the uncentred measures, constant over the samples for the centred ones), instead of
    scoring an arbitrary number (an all-dead layer against any live one would read 0.5 in
    G_ReLU-Procrustes, above two unrelated live layers).
    """
    if centre:
        H = centred(H)
    norms = H.norm(dim=0, keepdim=True)
    if not bool((norms > 0).any()):
        what = "constant over the samples" if centre else "all zeros"
        raise DegenerateRepresentationError(f"{name} is {what} (every unit is dead), so it carries no signal to "
                                            f"compare; this measure is undefined for it.")
    # Dividing a dead ReLU unit by its zero norm would poison every number; the paper leaves it at zero.
    return H / torch.where(norms > 0, norms, torch.ones_like(norms))


def standardised_channels(acts: torch.Tensor) -> torch.Tensor:
    """``[N, C, *spatial]`` → ``[C, N, P]`` (contiguous): each channel centred and scaled to norm 1 over
    (examples, positions); a constant channel stays 0.

    Written for large maps: one pass for the statistics, one into the channel-major buffer the
    batched products want, one in-place division (no separate transpose copy).
    """
    n, c = acts.shape[:2]
    X = acts.reshape(n, c, -1).transpose(0, 1)  # [C, N, P] view
    var, mean = torch.var_mean(X, dim=(1, 2), correction=0, keepdim=True)
    norm = (var * X[0].numel()).sqrt()
    H = torch.sub(X, mean, out=torch.empty(X.shape, dtype=X.dtype))
    return H.div_(torch.where(norm > 0, norm, torch.ones_like(norm)))


def score_from_distance(residual_sq: torch.Tensor, units: int) -> float:
    """The paper's report ``1 − d`` with ``d = sqrt(residual² / (4·units))`` (``units`` = 1 for global norms)."""
    return 1.0 - math.sqrt(max(float(residual_sq), 0.0) / (4 * units))
