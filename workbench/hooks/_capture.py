"""The one capture core: every verb that reads or replaces activations registers its hooks here.

Correctness before speed: a captured value is exactly what the module produced. Stored tensors are
references (no copy) together with their autograd version counter; when a later in-place operation
(``ReLU(inplace=True)``, ``x += ...``) bumps the counter, the value was overwritten, so the forward is
run again from the same inputs with those names copied at capture time, and the model remembers to
copy them from then on. The re-run restores the RNG state and the buffers (BatchNorm statistics),
so the model ends exactly as one plain forward would leave it.
"""
from __future__ import annotations

import os
import warnings
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn

from .._errors import (ActivationOverwrittenError, CacheBudgetError, HookNotFiredError,
                       InvalidOptionError)
from .._repr import human_bytes, parse_bytes
from ._cache import ActivationCache, storage_key
from ._points import NameFilter, _GLOB_CHARS, gate_reason, hook_points
from ._reduce import Reduce, resolve_reduce

# Hook names whose values a later in-place op overwrote, per model: copied at capture from then on.
_COPY_AT_CAPTURE: "weakref.WeakKeyDictionary[nn.Module, set[str]]" = weakref.WeakKeyDictionary()


def inherit_copy_list(source: nn.Module, copy: nn.Module) -> None:
    """Give ``copy`` (same module tree as ``source``) the names ``source`` must copy at capture."""
    if source in _COPY_AT_CAPTURE:
        _COPY_AT_CAPTURE[copy] = set(_COPY_AT_CAPTURE[source])


def default_budget() -> int:
    """Default memory budget of a capture: ``$WORKBENCH_CACHE_BUDGET`` or a quarter of physical RAM."""
    env = os.environ.get("WORKBENCH_CACHE_BUDGET")
    if env:
        return parse_bytes(env)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


class _StopForward(Exception):
    """Raised inside a hook to end the forward pass early (``stop_at``); never escapes a capture."""


def _is_explicit(item) -> bool:
    return isinstance(item, str) and not (_GLOB_CHARS & set(item))


def _explicit_names(names: NameFilter) -> set[str]:
    items = names if isinstance(names, (list, tuple, set, frozenset)) else [names]
    return {i for i in items if _is_explicit(i)}


class _Capture:
    """Capture hooks on one model, and the bookkeeping of each forward pass they see."""

    def __init__(self, model: nn.Module, names: NameFilter, *, reduce: Reduce = None,
                 device: Union[str, torch.device, None] = "cpu", dtype: Optional[torch.dtype] = None,
                 budget: Union[int, str, None] = "default", stop_at: Union[None, bool, str] = None,
                 strict: bool = False):
        self.model = model
        self.points = hook_points(model, probe=False)
        requested = self.points.resolve(names)
        explicit = _explicit_names(names)
        self.explicit = [n for n in requested if n in explicit]
        # Pattern-selected TransformerLens names gated off by config would never fire: skip them.
        self.skipped = {n: gate_reason(model, n) for n in requested if n not in explicit and gate_reason(model, n)}
        requested = [n for n in requested if n not in self.skipped]
        # One hook per module; the first requested name of a module is the key its values go under.
        self.key_of: dict[str, str] = {}  # canonical -> storage key
        for n in requested:
            self.key_of.setdefault(self.points.canonical(n), n)
        self.reduce_fn = resolve_reduce(reduce)
        self.device = torch.device(device) if device is not None else None
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise InvalidOptionError(f"dtype must be a torch.dtype such as torch.float32 or None; got {dtype!r}.")
        self.dtype = dtype
        self.budget = default_budget() if budget == "default" else (None if budget is None else parse_bytes(budget))
        self.strict = strict
        self.stop_keys = self._stop_keys(stop_at)
        self.calls: dict[str, list[torch.Tensor]] = {}
        self._records: list[list] = []  # [key, position in calls[key], tensor, version] to watch
        self._by_storage: dict[int, list[int]] = {}  # storage address -> indices into _records
        self._stored: dict[int, int] = {}  # storage address -> bytes, for the budget
        self.needed = 0  # bytes the captures would need, stored or not
        self._overflow = False
        self._forward: Optional[dict] = None  # the open root forward's args, RNG and marks
        self._rerunning = False
        self._handles: list = []

    def _stop_keys(self, stop_at) -> Optional[set[str]]:
        if stop_at is None or stop_at is False:
            return None
        if stop_at is True:
            return set(self.key_of.values())
        if isinstance(stop_at, str):
            canon = self.points.canonical(self.points.resolve(stop_at, param="stop_at")[0])
            if canon not in self.key_of:
                raise InvalidOptionError(f"stop_at={stop_at!r} must be one of the captured names; add it to names=.")
            return {self.key_of[canon]}
        raise InvalidOptionError(f"stop_at must be None, True (after every requested name) or a hook name; got {stop_at!r}.")

    # ------------------------------------------------------------------ hook lifetime
    def attach(self) -> None:
        try:
            for canon, key in self.key_of.items():
                module = self.points.modules[canon]
                self._handles.append(module.register_forward_hook(self._make_hook(canon, key)))
            # In-place modules (ReLU(inplace=True), ...) are about to overwrite their input: copy any
            # captured value living in that memory first. This spares a re-run in the common case.
            for module in self.model.modules():
                if getattr(module, "inplace", False) is True:
                    self._handles.append(module.register_forward_pre_hook(self._before_inplace))
            self._handles.append(self.model.register_forward_pre_hook(self._root_pre, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._root_post, with_kwargs=True))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ per-module hook
    def _make_hook(self, canon: str, key: str) -> Callable:
        convert = _conversion(self.points.modules[canon])

        def hook(module, args, output):
            self._store(canon, key, output if convert is None else convert.convert(output))
        return hook

    def _store(self, canon: str, key: str, output: Any) -> None:
        if self.reduce_fn is not None:
            with torch.no_grad():
                value = self.reduce_fn(output)
            if not isinstance(value, torch.Tensor):
                raise InvalidOptionError(f"reduce returned {type(value).__name__} for {key!r}; it must return a tensor.")
        elif isinstance(output, torch.Tensor):
            value = output
        else:
            self.skipped[key] = (f"its module returned {type(output).__name__}, not a tensor; pass "
                                 f"reduce=lambda out: out[0] (or similar) to pick a tensor")
            if key in self.explicit:
                raise InvalidOptionError(f"{key!r}: " + self.skipped[key] + ".")
            return
        t = value.detach()
        if self.device is not None or self.dtype is not None:
            t = t.to(device=self.device or t.device, dtype=self.dtype or t.dtype)
        if t.is_inference():
            # Inference tensors keep no version counter, so an overwrite cannot be detected: copy.
            t = t.clone()
        elif canon in _COPY_AT_CAPTURE.get(self.model, ()):
            t = t.clone()
        self._account(t)
        if not self._overflow:
            calls = self.calls.setdefault(key, [])
            calls.append(t)
            if not t.is_inference():
                self._by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(len(self._records))
                self._records.append([key, len(calls) - 1, t, t._version])
        if self.stop_keys is not None and self._forward is not None:
            self._forward["fired"].add(key)
            if self.stop_keys <= self._forward["fired"]:
                raise _StopForward()

    def _before_inplace(self, module, args):
        for a in args:
            if not isinstance(a, torch.Tensor) or a.is_inference():
                continue
            for i in self._by_storage.pop(a.untyped_storage().data_ptr(), ()):
                key, pos, t, version = self._records[i]
                if t._version == version:  # still intact: keep a copy, watch the copy instead
                    copy = t.clone()
                    self._account(copy)
                    self.calls[key][pos] = copy
                    self._records[i] = [key, pos, copy, copy._version]

    def _account(self, t: torch.Tensor) -> None:
        address, nbytes = storage_key(t)
        if address in self._stored:
            return  # one storage under several names (aliases, views, identity modules) counts once
        self._stored[address] = nbytes
        self.needed += nbytes
        if self.budget is not None and self.needed > self.budget and not self._overflow:
            # Free what is stored and keep counting, so the error can say how much was needed.
            self._overflow = True
            self.calls.clear()
            self._records.clear()
            self._by_storage.clear()

    # ------------------------------------------------------------------ root forward bookkeeping
    def _root_pre(self, module, args, kwargs):
        if self._rerunning:
            return None
        self._forward = {
            "args": args, "kwargs": kwargs, "fired": set(),
            "marks": {k: len(v) for k, v in self.calls.items()},
            "records": len(self._records),
            "rng": _rng_state(),
            "input_versions": _versions(args, kwargs),
        }
        return None

    def _root_post(self, module, args, kwargs, output):
        if not self._rerunning and self._forward is not None:
            self.finish_forward()
        return None

    def finish_forward(self) -> None:
        """Check this forward's captures for in-place overwrites and for the budget; re-run if needed."""
        fwd, self._forward = self._forward, None
        if self._overflow:
            raise self._budget_error()
        start = fwd["records"] if fwd else 0
        bad = {k for k, _, t, v in self._records[start:] if t._version != v}
        if not bad:
            self._forget_records(start)  # checked: nothing to watch any more
            return
        canon_bad = {c for c, k in self.key_of.items() if k in bad}
        _COPY_AT_CAPTURE.setdefault(self.model, set()).update(canon_bad)
        if fwd is None or _versions(fwd["args"], fwd["kwargs"]) != fwd["input_versions"]:
            raise ActivationOverwrittenError(
                f"{sorted(bad)} were overwritten in place after they were captured (by a later in-place "
                f"op such as ReLU(inplace=True) or `x += ...`), and the forward cannot be re-run to recover "
                f"them{' because its inputs were modified in place' if fwd else ' because the model itself was not called'}. "
                f"workbench now copies these names at capture time on this model: run the capture again."
            )
        self._rerun(fwd)
        start = fwd["records"]
        still = {k for k, _, t, v in self._records[start:] if t._version != v}
        self._forget_records(start)
        if still:  # pragma: no cover - a copy made at capture time cannot be overwritten
            raise ActivationOverwrittenError(f"{sorted(still)} changed even after being copied at capture.")

    def _rerun(self, fwd: dict) -> None:
        for k, n in fwd["marks"].items():
            del self.calls[k][n:]
        for k in [k for k in self.calls if k not in fwd["marks"]]:
            del self.calls[k]
        self._forget_records(fwd["records"])
        self._stored = dict(storage_key(t) for ts in self.calls.values() for t in ts)
        self.needed = sum(self._stored.values())
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        after = _rng_state()
        self._rerunning = True
        self._forward = {**fwd, "fired": set()}
        try:
            _set_rng_state(fwd["rng"])
            with torch.no_grad():
                self.model(*fwd["args"], **fwd["kwargs"])
        except _StopForward:
            pass
        finally:
            self._rerunning = False
            self._forward = None
            _set_rng_state(after)
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)

    def _forget_records(self, start: int) -> None:
        del self._records[start:]
        kept = ((a, [i for i in ix if i < start]) for a, ix in self._by_storage.items()) if start else ()
        self._by_storage = {a: ix for a, ix in kept if ix}

    def reset(self) -> None:
        """Forget everything captured so far (harvest empties the capture after every batch)."""
        self.calls.clear()
        self._records.clear()
        self._by_storage.clear()
        self._stored.clear()
        self.needed = 0

    def _budget_error(self) -> CacheBudgetError:
        return CacheBudgetError(
            f"capturing {len(self.key_of)} names needs {human_bytes(self.needed)}, over the memory budget of "
            f"{human_bytes(self.budget)}; nothing was kept. Narrow names= (e.g. 'blocks.*.hook_resid_post'), "
            f"shrink what is stored with reduce='spatial_mean' / 'token_mean', stream to disk with "
            f"wb.harvest(..., path=...), or raise budget= (None disables it)."
        )

    # ------------------------------------------------------------------ end of the context
    def build_cache(self, stopped: bool = False) -> ActivationCache:
        if stopped:  # names after the stop point were never meant to fire
            why = "the forward was ended by stop_at before it ran"
            return ActivationCache(self.calls, self._aliases(),
                                   {n: why for n in self.key_of.values() if n not in self.calls}, self.skipped)
        self.report_unfired()
        unfired = {n: self._unfired_reason(n) for n in self.key_of.values() if n not in self.calls}
        return ActivationCache(self.calls, self._aliases(), unfired, self.skipped)

    def _aliases(self) -> dict[str, str]:
        """Every other name of a captured module -> the key its values are stored under."""
        aliases = {a: self.key_of[c] for a, c in self.points.aliases.items() if c in self.key_of}
        aliases.update({c: k for c, k in self.key_of.items() if c != k})
        return aliases

    def _unfired_reason(self, name: str) -> str:
        return gate_reason(self.model, name) or "its module was not called during the forward pass"

    def report_unfired(self) -> None:
        missing = [n for n in self.explicit if self.key_of.get(self.points.canonical(n)) not in self.calls]
        if not missing:
            return
        detail = "; ".join(f"{n!r}: {self._unfired_reason(n)}" for n in missing)
        msg = f"requested hook(s) never fired: {detail}."
        if self.strict:
            raise HookNotFiredError(msg)
        warnings.warn(msg, stacklevel=4)


def _rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _versions(args, kwargs) -> list:
    flat = list(args) + list(kwargs.values())
    return [a._version for a in flat if isinstance(a, torch.Tensor) and not a.is_inference()]


# ====================================================================== public verbs
class capture:
    """Capture activations of ``model`` while the context is open.

    ``with wb.capture(model, names=["layer1.*"]) as cache: model(x)`` fills ``cache`` (an
    :class:`ActivationCache`) as the model runs; hooks are removed when the block ends, also on an
    exception or KeyboardInterrupt, and hooks that were on the model before stay untouched.

    Args:
        model: any ``torch.nn.Module`` (hook names = ``named_modules()`` paths) or a TransformerLens
            model (its own hook names, aliases included).
        names: None (every name), an exact name, a glob (``"blocks.*.hook_resid_post"``), a compiled
            regex (search semantics), a callable ``name -> bool``, or a list mixing them.
        reduce: None, ``"spatial_mean"``, ``"spatial_max"``, ``"token_mean"`` or a callable, applied
            inside the hook before anything is stored.
        device: where activations are stored (``"cpu"``; None keeps the model's device).
        dtype: cast stored activations (None keeps theirs).
        budget: bytes (or ``"2GB"``) the capture may hold; over it a :class:`CacheBudgetError` says how
            much was needed. Default: ``$WORKBENCH_CACHE_BUDGET`` or a quarter of RAM. None: no limit.
        stop_at: True ends the forward once every requested name fired; a hook name ends it after that
            name. The model call then returns nothing and the ``with`` block is left at that point.
        strict: raise :class:`HookNotFiredError` (instead of warning) when an explicitly requested name
            never fired.
    """

    def __init__(self, model: nn.Module, names: NameFilter = None, reduce: Reduce = None,
                 device: Union[str, torch.device, None] = "cpu", dtype: Optional[torch.dtype] = None,
                 stop_at: Union[None, bool, str] = None, *, budget: Union[int, str, None] = "default",
                 strict: bool = False):
        self._core = _Capture(model, names, reduce=reduce, device=device, dtype=dtype, budget=budget,
                              stop_at=stop_at, strict=strict)
        self.cache = ActivationCache({})
        self.stopped = False

    def __enter__(self) -> ActivationCache:
        self._core.attach()
        # The cache object handed out now is filled in place as forwards run.
        self.cache = ActivationCache(self._core.calls)
        return self.cache

    def __exit__(self, exc_type, exc, tb) -> bool:
        core = self._core
        try:
            if exc_type is _StopForward:
                self.stopped = True
                if core._forward is not None:
                    core.finish_forward()
            elif exc_type is None and (core._records or core._overflow):
                core.finish_forward()  # the model itself was not called: check what we can
            if exc_type is None or exc_type is _StopForward:
                final = core.build_cache(stopped=self.stopped)
                self.cache.__init__(final._calls, final._aliases, final.unfired, final.skipped)
        finally:
            core.detach()
        return exc_type is _StopForward


def run_with_cache(model: nn.Module, x: Any, names: NameFilter = None, **options):
    """Run ``model(x)`` once and return ``(output, cache)``; ``output`` is None if ``stop_at`` ended it.

    Takes every option of :class:`capture`.

    Example:
        >>> import torch, workbench as wb
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
        >>> out, cache = wb.run_with_cache(model, torch.randn(2, 3, 8, 8), names="*", reduce="spatial_mean")
        >>> sorted(cache), tuple(cache["0"].shape)
        (['0', '1'], (2, 8))
    """
    ctx = capture(model, names, **options)
    output = None
    with ctx as cache:
        output = model(x)
    return (None if ctx.stopped else output), cache


@contextmanager
def intervene(model: nn.Module, edits: Mapping[Any, Any]):
    """Replace activations while the context is open.

    ``edits`` maps a hook name (or any name filter) to a tensor, which replaces the activation
    (broadcast to its shape, shape-checked), or to ``fn(activation, name)``, whose result replaces it
    (return None to keep it, e.g. after editing it in place). Interventions run before any capture
    hook on the same name, so a capture in the same forward sees the edited value.
    """
    points = hook_points(model, probe=False)
    handles = []
    try:
        for key, edit in edits.items():
            for name in points.resolve(key, param="intervene"):
                module = points.modules[points.canonical(name)]
                hook = _edit_hook(name, edit, _conversion(module))
                handles.append(module.register_forward_hook(hook, prepend=True))
        yield model
    finally:
        for h in handles:
            h.remove()


def _conversion(module: nn.Module):
    """A TransformerBridge hook point's view conversion (e.g. ``[b, p, d_model] -> [b, p, head, d_head]``).

    TransformerLens shows hook functions and caches the converted activation; so do we.
    """
    return getattr(module, "hook_conversion", None)


def _edit_hook(name: str, edit, convert=None) -> Callable:
    if not (isinstance(edit, torch.Tensor) or callable(edit)):
        raise InvalidOptionError(f"intervene: the edit for {name!r} must be a tensor or a callable; got {type(edit).__name__}.")

    def hook(module, args, output):
        if not isinstance(output, torch.Tensor):
            raise InvalidOptionError(f"intervene: {name!r} produces {type(output).__name__}, not a tensor.")
        act = output if convert is None else convert.convert(output)
        new = _replacement(name, edit, act)
        if new is None:
            return None
        return new if convert is None else convert.revert(new)
    return hook


def _replacement(name: str, edit, act: torch.Tensor) -> Optional[torch.Tensor]:
    if isinstance(edit, torch.Tensor):
        try:
            new = torch.broadcast_to(edit.detach(), act.shape)
        except RuntimeError:
            raise InvalidOptionError(
                f"intervene: the tensor for {name!r} has shape {tuple(edit.shape)}, which does "
                f"not broadcast to the activation's shape {tuple(act.shape)}."
            ) from None
        # A copy: downstream in-place ops must not write into the caller's tensor.
        return new.to(device=act.device, dtype=act.dtype).clone()
    new = edit(act, name)
    if new is not None and (not isinstance(new, torch.Tensor) or new.shape != act.shape):
        got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
        raise InvalidOptionError(
            f"intervene: the function for {name!r} returned {got}; it must return a tensor of the "
            f"activation's shape {tuple(act.shape)} (or None to keep the activation)."
        )
    return new
