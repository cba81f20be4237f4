"""Reductions applied inside a hook, before anything is stored (the one list of ``reduce=`` modes)."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from .._errors import InvalidOptionError, check_option


def _spatial_mean(x: torch.Tensor) -> torch.Tensor:
    # [batch, channels, *spatial] -> [batch, channels]; 2-D inputs have no spatial axes.
    return x if x.ndim <= 2 else x.mean(dim=tuple(range(2, x.ndim)))


def _spatial_max(x: torch.Tensor) -> torch.Tensor:
    return x if x.ndim <= 2 else x.amax(dim=tuple(range(2, x.ndim)))


def _token_mean(x: torch.Tensor) -> torch.Tensor:
    # [batch, pos, ...] -> [batch, ...]
    if x.ndim < 3:
        raise InvalidOptionError(
            f"reduce='token_mean' averages over the position axis of a [batch, pos, ...] activation, "
            f"but got shape {tuple(x.shape)}; use reduce=None or 'spatial_mean' for this name."
        )
    return x.mean(dim=1)


REDUCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "spatial_mean": _spatial_mean,
    "spatial_max": _spatial_max,
    "token_mean": _token_mean,
}

Reduce = Union[None, str, Callable[[torch.Tensor], torch.Tensor]]


def resolve_reduce(reduce: Reduce) -> Optional[Callable]:
    """The callable for a ``reduce=`` option (None means store the activation as it is)."""
    if reduce is None:
        return None
    if isinstance(reduce, str):
        return REDUCTIONS[check_option("reduce", reduce, [None, *REDUCTIONS])]
    return check_option("reduce", reduce, [None, *REDUCTIONS], allow_callable=True)
