"""``ActivationCache``: what a capture returns — a read-only mapping from hook name to activation."""
from __future__ import annotations

import html
import weakref
from collections.abc import Mapping
from typing import Iterator, Optional

import torch

from .._errors import ActivationOverwrittenError, UnknownNameError, nearest
from .._repr import html_table, human_bytes
from ._cache_views import CacheViews
from ._guard import quiet as _quiet


def unique_nbytes(tensors) -> int:
    """Bytes of memory held by ``tensors``: a storage shared by several names or views counts once."""
    seen: dict[int, int] = {}
    for t in tensors:
        seen.setdefault(*storage_key(t))
    return sum(seen.values())


def storage_key(t: torch.Tensor) -> tuple[int, int]:
    """``(storage address, storage bytes)``: what keeping ``t`` alive really costs."""
    if t.layout != torch.strided:  # sparse: no one storage (the capture keeps such values as private copies)
        return -id(t), sparse_nbytes(t)
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def storage_addresses(tensors) -> set[int]:
    """The storage addresses of the dense ``tensors`` (sparse, meta and storage-less ones have none)."""
    out = set()
    with _quiet():
        for t in tensors:
            if t.layout == torch.strided and not t.is_meta:
                try:
                    out.add(t.untyped_storage().data_ptr())
                except (RuntimeError, NotImplementedError):  # a torch.func wrapper (vmap, grad): no memory of its own
                    pass
    return out


def sparse_nbytes(t: torch.Tensor) -> int:
    """Bytes of a sparse tensor's indices and values."""
    if t.layout == torch.sparse_coo:
        parts = (t._indices(), t._values())
    elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
        parts = (t.crow_indices(), t.col_indices(), t.values())
    elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
        parts = (t.ccol_indices(), t.row_indices(), t.values())
    else:
        return t.numel() * t.element_size()
    return sum(p.numel() * p.element_size() for p in parts)


class ActivationCache(CacheViews, Mapping):
    """Activations captured from a forward pass, by hook name.

    ``cache[name]`` is the activation of a name that fired once (aliases of a name work too, and the
    keys list them, as TransformerLens's do). A name that fired several times (a shared module or a
    recurrence in one forward; or several forwards in one ``wb.capture`` block, such as
    ``model.generate``'s one forward per new token) has every call in ``cache.calls(name)``, in call
    order; ``cache[name]`` then raises and points there, unless every call gave the same values.

    On a TransformerLens model it reads like TransformerLens's own cache, with its numbers:
    ``cache["resid_post", 0]``, ``cache.accumulated_resid()``, ``decompose_resid``,
    ``stack_activation``, ``apply_ln_to_stack``, ``logit_attrs``, ``stack_head_results`` …; on a plain
    module, tuple keys where layers are numbered (``cache["relu", 2]``) and ``stack_activation``.

    Example:
        >>> import torch, workbench as wb
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
        >>> out, cache = wb.run_with_cache(model, torch.ones(2, 3), names="1")
        >>> cache["1"].shape
        torch.Size([2, 4])
    """

    def __init__(self, calls: dict[str, list[torch.Tensor]], aliases: Optional[dict[str, str]] = None,
                 unfired: Optional[dict[str, str]] = None, skipped: Optional[dict[str, str]] = None,
                 failures: Optional[list[str]] = None, model=None, listed: Optional[set[str]] = None):
        # ``calls`` may still be filling (inside ``wb.capture``): aliases are resolved at lookup.
        self._calls = calls
        # A weak reference: a cache kept in a notebook must not keep a large model alive.
        self._model_ref = weakref.ref(model) if model is not None else None
        self._aliases = dict(aliases or {})
        # Aliases a lookup resolves but iteration leaves out: TransformerLens lists an alias only when the
        # names filter selects it (None: every alias is listed, as after a capture of every name).
        self._listed = None if listed is None else set(listed)
        #: requested names without a value, with why (never fired, or a failed forward never reached them)
        self.unfired: dict[str, str] = dict(unfired or {})
        #: names matched by a pattern but not stored (e.g. their module returned a tuple), with why
        self.skipped: dict[str, str] = skipped if skipped is not None else {}
        #: one line per forward that raised inside the capture: its values were discarded
        self.failures: list[str] = failures if failures is not None else []

    def _settle(self, unfired: dict[str, str], held=()) -> None:
        """The capture ended: record the names that got no value (the values themselves are in place).

        ``held``: the values kept by reference (sharing memory with the model's tensors, its output or its
        input), each with its version counter now; a read of one whose counter moved since is refused.
        """
        self.unfired = dict(unfired)
        self._held = {id(t): (t, t._version) for t in held}
        self._live = None

    _held: dict = {}
    #: inside ``wb.capture``: ``value -> (value, version at capture)`` for a value held by reference, else None
    _live = None

    def _check_held(self, name: str, tensors) -> None:
        """Refuse values written in place after the capture ended (their memory was shared, not copied), or,
        inside the block, by an op the write guard could not see."""
        live, held = self._live, self._held
        for t in tensors:
            rec = live(t) if live is not None else held.get(id(t))
            if rec is not None and rec[0]._version != rec[1]:
                if live is not None:
                    raise ActivationOverwrittenError(
                        f"{name!r} was overwritten in place after it was captured, by an op workbench's write guard "
                        f"could not see (run on another thread, or under torch._C.DisableTorchFunction): it is no "
                        f"longer the value its module produced. The capture drops it when the block ends.")
                raise ActivationOverwrittenError(
                    f"{name!r} is no longer the value its module produced: it shares memory with the model's "
                    f"tensors (its output, a parameter or buffer, or the input it was given), and an in-place op "
                    f"wrote into that memory after the capture ended (e.g. out.add_(...), an optimizer step, the "
                    f"next forward). Capture again, or clone what you will edit before writing into it "
                    f"(out = out.clone()).")

    @property
    def _has_model(self) -> bool:
        return self._model_ref is not None

    def _model(self):
        """The model the values came from (None when built by hand or when the model is gone)."""
        return self._model_ref() if self._model_ref is not None else None

    def _key(self, name: str) -> str:
        if name in self._calls:
            return name
        return self._aliases.get(name, name)

    # --------------------------------------------------------------- Mapping
    def __getitem__(self, name) -> torch.Tensor:
        if isinstance(name, tuple):
            key = self._tuple_key(name)
            if isinstance(key, tuple):  # a TransformerLens model: its own shorthand
                try:
                    return self._transformer_lens(f"cache[{name!r}]")[key]
                except (KeyError, ValueError, IndexError, AssertionError) as exc:
                    ours = self._several_calls_error(exc, f"cache[{name!r}]")
                    if ours is not None:
                        raise ours from None
                    raise UnknownNameError(f"{name!r} names no captured value ({exc}); captured names start with "
                                           f"{self.names[:4]}.") from None
            name = key
        elif self._key(name) not in self._calls and self._tl_shorthand(name):
            try:
                return self._transformer_lens(f"cache[{name!r}]")[name]
            except (KeyError, ValueError, IndexError, AssertionError):
                pass  # not TransformerLens shorthand either: our own message below
        calls = self.calls(name)
        # A module called several times with identical results (HookedTransformer 3.x runs ln1 once
        # per q/k/v input) reads as one activation; genuinely different calls must be chosen.
        if len(calls) > 1 and all(c.shape == calls[0].shape and torch.equal(c, calls[0]) for c in calls[1:]):
            return calls[0]
        if len(calls) != 1:
            raise UnknownNameError(
                f"{name!r} fired {len(calls)} times with different values while the capture was open (several "
                f"forwards, e.g. one per token of model.generate; or a shared module or a recurrence inside one "
                f"forward); use cache.calls({name!r}) for the list of activations, one per call, in call order."
            )
        return calls[0]

    def __iter__(self) -> Iterator[str]:
        """Every name with a value: the captured names, then their aliases (TransformerLens lists both)."""
        yield from list(self._calls)
        yield from [a for a, k in list(self._aliases.items()) if k in self._calls and a not in self._calls
                    and (self._listed is None or a in self._listed)]

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def _tl_shorthand(self, name) -> bool:
        """Whether ``name`` is not a hook name here but TransformerLens may resolve it (``"resid_post"``-style
        shorthand, or a value its cache computed, e.g. after ``compute_head_results``)."""
        from ..models import is_transformer_lens

        model = self._model()
        return isinstance(name, str) and model is not None and is_transformer_lens(model) and \
            self._key(name) not in self.unfired and self._key(name) not in self.skipped

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
        if self._held or self._live is not None:
            self._check_held(name, self._calls[key])
        return list(self._calls[key])

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache; one tensor stored under several names counts once."""
        return unique_nbytes(t for ts in self._calls.values() for t in ts)

    def to(self, *args, **kwargs) -> "ActivationCache":
        """A new cache with every activation moved or cast, as ``Tensor.to(*args, **kwargs)``."""
        moved = {n: [t.to(*args, **kwargs) for t in self.calls(n)] for n in self._calls}
        return ActivationCache(moved, self._aliases, self.unfired, dict(self.skipped), list(self.failures),
                               self._model(), self._listed)

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
        return f"ActivationCache({len(self._calls)} names, {human_bytes(self.nbytes)}{failed})"

    def _repr_html_(self) -> str:
        rows = [(n, "×".join(map(str, s)) or "scalar", d, c, human_bytes(b)) for n, s, d, c, b in self._rows()]
        caption = f"ActivationCache — {len(self._calls)} names, {human_bytes(self.nbytes)}"
        extra = ""
        if self.unfired:
            extra += f"<p>Requested but never fired: {', '.join(sorted(self.unfired))}</p>"
        if self.skipped:
            extra += f"<p>Skipped: {', '.join(sorted(self.skipped))}</p>"
        for line in self.failures:
            extra += f"<p>Failed forward: {html.escape(line)}</p>"
        return html_table(["name", "shape", "dtype", "calls", "size"], rows, caption) + extra
