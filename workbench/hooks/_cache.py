"""``ActivationCache``: what a capture returns — a read-only mapping from hook name to activation."""
from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Iterator, Optional

import torch

from .._errors import UnknownNameError, nearest
from .._repr import html_table, human_bytes


def unique_nbytes(tensors) -> int:
    """Bytes of memory held by ``tensors``: a storage shared by several names or views counts once."""
    seen: dict[int, int] = {}
    for t in tensors:
        seen.setdefault(*storage_key(t))
    return sum(seen.values())


def storage_key(t: torch.Tensor) -> tuple[int, int]:
    """``(storage address, storage bytes)``: what keeping ``t`` alive really costs."""
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


class ActivationCache(Mapping):
    """Activations captured from a forward pass, by hook name.

    ``cache[name]`` is the activation of a name that fired once (aliases of a name work too). A name
    that fired several times in one forward (a shared module, a recurrence) has every call in
    ``cache.calls(name)``; ``cache[name]`` then raises and points there, unless every call gave the
    same values.

    Example:
        >>> import torch, workbench as wb
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
        >>> out, cache = wb.run_with_cache(model, torch.ones(2, 3), names="1")
        >>> cache["1"].shape
        torch.Size([2, 4])
    """

    def __init__(self, calls: dict[str, list[torch.Tensor]], aliases: Optional[dict[str, str]] = None,
                 unfired: Optional[dict[str, str]] = None, skipped: Optional[dict[str, str]] = None,
                 failures: Optional[list[str]] = None):
        # ``calls`` may still be filling (inside ``wb.capture``): aliases are resolved at lookup.
        self._calls = calls
        self._aliases = dict(aliases or {})
        #: requested names without a value, with why (never fired, or a failed forward never reached them)
        self.unfired: dict[str, str] = dict(unfired or {})
        #: names matched by a pattern but not stored (e.g. their module returned a tuple), with why
        self.skipped: dict[str, str] = skipped if skipped is not None else {}
        #: one line per forward that raised inside the capture: its values were discarded
        self.failures: list[str] = failures if failures is not None else []

    def _settle(self, unfired: dict[str, str]) -> None:
        """The capture ended: record the names that got no value (the values themselves are in place)."""
        self.unfired = dict(unfired)

    def _key(self, name: str) -> str:
        if name in self._calls:
            return name
        return self._aliases.get(name, name)

    # --------------------------------------------------------------- Mapping
    def __getitem__(self, name: str) -> torch.Tensor:
        calls = self.calls(name)
        # A module called several times with identical results (HookedTransformer 3.x runs ln1 once
        # per q/k/v input) reads as one activation; genuinely different calls must be chosen.
        if len(calls) > 1 and all(c.shape == calls[0].shape and torch.equal(c, calls[0]) for c in calls[1:]):
            return calls[0]
        if len(calls) != 1:
            raise UnknownNameError(
                f"{name!r} fired {len(calls)} times in this forward pass (a shared module or a "
                f"recurrence); use cache.calls({name!r}) for the list of activations, one per call."
            )
        return calls[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._calls)

    def __len__(self) -> int:
        return len(self._calls)

    def __contains__(self, name) -> bool:
        return self._key(name) in self._calls

    # --------------------------------------------------------------- API
    @property
    def names(self) -> list[str]:
        """The captured hook names, in the order they first fired."""
        return list(self._calls)

    def calls(self, name: str) -> list[torch.Tensor]:
        """Every activation recorded at ``name`` in call order (one per call of its module)."""
        key = self._key(name)
        if key not in self._calls:
            if key in self.unfired:
                raise UnknownNameError(f"{name!r} was requested but has no value: {self.unfired[key]}.")
            if key in self.skipped:
                raise UnknownNameError(f"{name!r} was not stored: {self.skipped[key]}.")
            close = nearest(name, list(self._calls) + [a for a, k in self._aliases.items() if k in self._calls])
            raise UnknownNameError(
                f"{name!r} is not in this cache ({len(self._calls)} names)."
                + (f" Nearest names: {close}." if close else "")
            )
        return list(self._calls[key])

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache; one tensor stored under several names counts once."""
        return unique_nbytes(t for ts in self._calls.values() for t in ts)

    def to(self, *args, **kwargs) -> "ActivationCache":
        """A new cache with every activation moved or cast, as ``Tensor.to(*args, **kwargs)``."""
        moved = {n: [t.to(*args, **kwargs) for t in ts] for n, ts in self._calls.items()}
        return ActivationCache(moved, self._aliases, self.unfired, dict(self.skipped), list(self.failures))

    def to_frame(self):
        """One row per name: shape, dtype, calls and bytes (a pandas DataFrame)."""
        import pandas as pd

        return pd.DataFrame(self._rows(), columns=["name", "shape", "dtype", "calls", "bytes"])

    def _rows(self):
        for name, ts in self._calls.items():
            t = ts[0]
            yield name, tuple(t.shape), str(t.dtype).replace("torch.", ""), len(ts), sum(x.nbytes for x in ts)

    def __repr__(self) -> str:
        failed = f", {len(self.failures)} failed forward(s) discarded" if self.failures else ""
        return f"ActivationCache({len(self)} names, {human_bytes(self.nbytes)}{failed})"

    def _repr_html_(self) -> str:
        rows = [(n, "×".join(map(str, s)) or "scalar", d, c, human_bytes(b)) for n, s, d, c, b in self._rows()]
        caption = f"ActivationCache — {len(self)} names, {human_bytes(self.nbytes)}"
        extra = ""
        if self.unfired:
            extra += f"<p>Requested but never fired: {', '.join(sorted(self.unfired))}</p>"
        if self.skipped:
            extra += f"<p>Skipped: {', '.join(sorted(self.skipped))}</p>"
        for line in self.failures:
            extra += f"<p>Failed forward: {html.escape(line)}</p>"
        return html_table(["name", "shape", "dtype", "calls", "size"], rows, caption) + extra
