"""The capture verbs: ``capture`` (a context manager) and ``run_with_cache``, thin over the one capture core.

How values are kept exact while the user's forward runs once (the write guard, version counters, roll-back
of a forward that raised) is ``_capture_core.py``'s subject; this file is the user-facing part: arguments,
entering and leaving the context, and what the cache says about names that got no value.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

from .._errors import InvalidOptionError
from ..models import unrunnable_failure
from ._cache import ActivationCache
# Re-exported: harvest, tests and benchmarks import _Capture and the per-model copy lists from here, and
# hooks/__init__ inherit_copy_list (as before the core moved to its own file).
from ._capture_core import (_COPY_AT_CAPTURE, _COPY_SEEN, _Capture, _StopForward, _describe,  # noqa: F401
                            default_budget, inherit_copy_list)
from ._points import NameFilter
from ._reduce import Reduce


class capture:
    """Capture activations of ``model`` while the context is open.

    ``with wb.capture(model, names=["layer1.*"]) as cache: model(x)`` fills ``cache`` (an
    :class:`ActivationCache`) as the model runs; hooks are removed when the block ends, also on an
    exception or KeyboardInterrupt, and hooks that were on the model before stay untouched. The
    model's forward runs exactly once per call: values about to be overwritten in place are copied
    just before the write, and a forward that raises leaves none of its values behind
    (``cache.failures`` says what it did not reach). Every forward of ``model`` while the block is open
    is recorded, including those a verb runs on it on your data (``verify``'s): call those outside the
    block. ``model.generate(...)`` inside the block runs one forward per new token: each name then has one
    value per step in ``cache.calls(name)``, in order (with a KV cache the first holds every prompt position
    and each later one the new token only; a Hugging Face head may compute the last position only). Not
    recorded: the symmetry map's own one-example run (inside ``symmetry_map``, ``random_intertwiner``,
    ``apply_transform``), and the forwards of a copy of the model made inside the block (``copy.deepcopy``,
    ``random_intertwiner``'s new model).

    Args:
        model: any ``torch.nn.Module`` (hook names = ``named_modules()`` paths) or a TransformerLens
            model (its own hook names, aliases included).
        names: None (every name), an exact name, a glob (``"blocks.*.hook_resid_post"``), a compiled
            regex (search semantics), a callable ``name -> bool``, or a list mixing them.
        reduce: None, ``"spatial_mean"``, ``"spatial_max"``, ``"token_mean"`` or a callable, applied
            inside the hook before anything is stored, to every captured name. A module output that is no
            tensor (a Hugging Face attention layer's ``(output, weights)`` tuple, a ``ModelOutput``) is not
            stored (``cache.skipped`` says why) unless a callable reduce picks a tensor from it.
        device: where activations are stored (``"cpu"``; None keeps each where it was computed, e.g. on
            the GPU or on every device of a dispatched model). CUDA values bound for the CPU are copied
            asynchronously into pinned memory; the capture waits for them at the end of each forward.
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
                 strict: bool = False, names_filter: NameFilter = None):
        if names_filter is not None:  # TransformerLens's name for the same argument
            if names is not None:
                raise InvalidOptionError("pass names= or names_filter= (TransformerLens's name for it), not both.")
            names = names_filter
        self._core = _Capture(model, names, reduce=reduce, device=device, dtype=dtype, budget=budget,
                              stop_at=stop_at, strict=strict)
        self.cache = ActivationCache({})
        self.stopped = False

    def __enter__(self) -> ActivationCache:
        core = self._core
        if core._handles:  # entered again inside its own block: the hooks and the guard would be attached twice
            raise InvalidOptionError("this wb.capture(...) object is already open (entered and not yet left); "
                                     "open a new wb.capture(...) to nest captures.")
        core.reset()  # a capture object entered twice starts empty; the first cache keeps its values
        core.attach()
        # The cache handed out now is filled in place as forwards run, and settled when the block ends.
        self.cache = ActivationCache(core.calls, core._aliases(), skipped=core.skipped, failures=core.failures,
                                     model=core.model, listed=core.selected)
        # Reads inside the block refuse a value an op the guard could not see has written (the version check
        # of the block's end, done early for the value read).
        self.cache._live = core.held_version
        self.stopped = False
        return self.cache

    def __exit__(self, exc_type, exc, tb) -> bool:
        # Only this capture's own stop_at ends its block quietly; another capture's passes through it.
        core, stopped = self._core, exc_type is _StopForward and getattr(exc, "core", None) is self._core
        self.stopped = stopped
        ok = exc_type is None or stopped
        try:
            if core._forward is not None and not stopped:  # the block was left inside a forward
                core._abandon(_describe(exc) if exc is not None else "the capture ended inside it")
            if stopped and core._forward is not None:
                core.finish_forward()
            else:  # also catches overwrites of values captured outside a root forward (sub-module calls)
                core.check(raise_errors=ok)
        finally:
            core.detach()
            # Values held by reference that share memory with the model's weights or the caller's input and output
            # may be written after the block (an optimizer step, the next forward, out.add_()): the cache refuses a
            # read of one whose version counter moved since. Intermediates only the cache holds are the caller's.
            self.cache._settle(core.unfired(stopped), held=core.shared_after())
        if ok and not stopped:
            core.report_unfired()
        failure = None if ok else unrunnable_failure(core.model, exc)  # (a mixture's experts that cannot run: why)
        if failure is not None:
            raise failure from exc
        return stopped


def run_with_cache(model: nn.Module, x: Any, names: NameFilter = None, **options):
    """Run ``model(x)`` once and return ``(output, cache)``; ``output`` is None if ``stop_at`` ended it.

    Takes every option of :class:`capture` (``names_filter=`` too, TransformerLens's name for ``names=``).
    On a TransformerLens model the cache has TransformerLens's keys (aliases included) and methods
    (``cache["resid_post", 0]``, ``accumulated_resid``, ``decompose_resid``, …), with its numbers.

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
