"""Exceptions a user would guess, and the one place that writes "did you mean" messages."""
from __future__ import annotations

import difflib
from typing import Iterable, Sequence


class WorkbenchError(Exception):
    """Base class of every error workbench raises on purpose."""


class UnknownNameError(WorkbenchError, KeyError, ValueError):
    """A hook name or a name filter matched nothing. A ``KeyError`` and a ``ValueError``."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class CacheBudgetError(WorkbenchError, MemoryError):
    """A capture would store more than its memory budget allows. A ``MemoryError``."""


class ActivationOverwrittenError(WorkbenchError, RuntimeError):
    """A captured activation was overwritten in place and could not be recovered."""


class HookNotFiredError(WorkbenchError, RuntimeError):
    """A requested hook never ran during the forward pass (``strict=True``)."""


class InvalidOptionError(WorkbenchError, ValueError, TypeError):
    """An option got a value outside its declared list of valid values."""


class UnsupportedModelError(WorkbenchError, ValueError):
    """A model (or part of one) workbench cannot read: the message names the construct and what is supported."""


class IncompatibleWeightsError(WorkbenchError, ValueError):
    """Weights that do not fit the model they are written into (names or shapes differ). A ``ValueError``."""


class OutOfRangeError(WorkbenchError, IndexError, ValueError):
    """An index outside the valid range, which the message states. An ``IndexError``."""


class MissingDependencyError(WorkbenchError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it. An ``ImportError``."""


class UntraceableModelError(WorkbenchError, ValueError):
    """A plain model could not be traced with ``torch.fx`` or run on its example, so no symmetry of
    it can be granted or checked. A ``ValueError`` (like torch.fx's own ``TraceError``)."""


class ResumeMismatchError(WorkbenchError, ValueError):
    """``resume=True`` was asked to continue a store with another model, data stream or settings."""


class StoreLockedError(WorkbenchError, TimeoutError):
    """Another harvest is writing into this store (its lock is held). A ``TimeoutError``."""


class StoreCorruptError(WorkbenchError, OSError):
    """A store's file does not match what its manifest recorded (checksum, size, rows). An ``OSError``."""


class StoreFormatError(WorkbenchError, ValueError):
    """A folder holds no store this workbench can read (another format, or a newer format version)."""


def nearest(word: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidates closest to ``word``, best first (for "did you mean" messages)."""
    candidates = list(candidates)
    close = difflib.get_close_matches(word, candidates, n=n, cutoff=0.5)
    if len(close) < n:
        # Substring hits catch "resid_post" → "blocks.0.hook_resid_post" where ratios are low.
        bare = word.strip("*?[]^$.")
        close += [c for c in candidates if bare and bare in c and c not in close][: n - len(close)]
    return close


def check_option(param: str, value, valid: Sequence, *, allow_callable: bool = False):
    """Return ``value`` if it is one of ``valid``; otherwise raise a message listing them."""
    if allow_callable and callable(value):
        return value
    if value in valid:
        return value
    extra = " or a callable" if allow_callable else ""
    hint = nearest(str(value), [str(v) for v in valid], n=1)
    tip = f" Did you mean {hint[0]!r}?" if hint else ""
    raise InvalidOptionError(
        f"{param}={value!r} is not a valid option; expected one of {list(valid)!r}{extra}.{tip}"
    )
