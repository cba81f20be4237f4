"""Seeds, as scikit-learn's ``random_state``: an int, None, a ``torch.Generator`` or a NumPy ``Generator``.

Every verb that draws random numbers takes ``seed`` and turns it into one int here, the *effective
seed*, which it records in its report: passing that int back reproduces the result exactly, whatever
kind of seed was given first.

- an int is its own effective seed (``seed=0`` gives the same numbers as it always has);
- None draws a fresh one from the operating system's entropy (a different result each call);
- a ``torch.Generator`` or a ``numpy.random.Generator`` gives one draw from it (so the caller's
  generator advances, and a sequence of calls sharing one generator differs call by call, as in
  scikit-learn).
"""
from __future__ import annotations

import numbers
import secrets
from typing import Union

import numpy as np
import torch

from ._errors import InvalidOptionError

#: what ``seed=`` accepts everywhere
SeedLike = Union[None, int, torch.Generator, np.random.Generator]

# torch.Generator.manual_seed takes any int in [-2⁶³, 2⁶⁴); fresh seeds stay below 2⁶³ (plain int64).
_LOW, _HIGH = -(2 ** 63), 2 ** 64
_FRESH = 2 ** 63


def as_seed(seed: SeedLike, param: str = "seed") -> int:
    """The effective seed of ``seed`` (see the module docstring), or an error naming what is accepted.

    >>> as_seed(7)
    7
    >>> as_seed(np.random.default_rng(0)) == as_seed(np.random.default_rng(0))
    True
    >>> as_seed("0")
    Traceback (most recent call last):
    ...
    workbench._errors.InvalidOptionError: seed='0' is not a seed: pass an int (e.g. seed=0), None (fresh randomness), a torch.Generator or a numpy.random.Generator.
    """
    if isinstance(seed, (bool, np.bool_)):  # an int subclass, but True is never meant as seed 1
        pass
    elif isinstance(seed, numbers.Integral):
        value = int(seed)
        if _LOW <= value < _HIGH:
            return value
        raise InvalidOptionError(f"{param}={value} is outside the range a torch generator accepts "
                                 f"[-2**63, 2**64); pass a smaller int.")
    elif seed is None:
        return secrets.randbelow(_FRESH)
    elif isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            # A CUDA generator draws on its device; one int from it is all we need.
            return int(torch.randint(0, _FRESH - 1, (1,), generator=seed, device=seed.device).item())
        return int(torch.randint(0, _FRESH - 1, (1,), generator=seed).item())
    elif isinstance(seed, np.random.Generator):
        return int(seed.integers(0, _FRESH))
    elif isinstance(seed, np.random.RandomState):
        return int(seed.randint(0, 2 ** 31 - 1))  # legacy NumPy: its randint is 32-bit on some platforms
    raise InvalidOptionError(f"{param}={seed!r} is not a seed: pass an int (e.g. {param}=0), None (fresh randomness), "
                             f"a torch.Generator or a numpy.random.Generator.")


def as_generator(seed: SeedLike, param: str = "seed") -> tuple[torch.Generator, int]:
    """A fresh CPU ``torch.Generator`` seeded with the effective seed, and that seed (to record)."""
    value = as_seed(seed, param)
    return torch.Generator().manual_seed(value), value
