"""``intervene`` and ``watch``: forward hooks that edit or observe activations as the model produces them.

Neither stores anything, so neither needs the capture core's write guard or bookkeeping (``_capture.py``);
both resolve names through the same hook points and convert TransformerBridge hook points the same way.
"""
from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from .._errors import HookNotFiredError, InvalidOptionError, UnsupportedModelError
from ..models import observing, unrunnable_explained
from ._cache import storage_addresses
from ._guard import quiet as _quiet
from ._points import hook_points, unfired_reason


@contextmanager
def intervene(model: nn.Module, edits: Mapping[Any, Any], *, strict: bool = False):
    """Replace activations while the context is open.

    ``edits`` maps a hook name (or any name filter) to a tensor, which replaces the activation
    (broadcast to its shape, cast to its dtype and device, shape-checked), or to ``fn(activation, name)``, whose
    result replaces it: a tensor of the activation's shape, dtype and device, or None to keep the activation (e.g.
    after editing it in place; where the module's output shares memory with its input or its weights, as an
    ``nn.Identity``'s or ``nn.Flatten``'s does, ``fn`` gets a copy, so an in-place edit changes only this
    activation).

    Which calls: every call of the module while the block is open, on any thread (a module called twice in one
    forward, e.g. shared weights or a recurrence, is edited at each call: ``fn`` sees each; a tensor replaces
    each). Order: edits of one module apply in the order given, and an ``intervene`` opened inside another applies
    its edit after the outer one's, to the value the outer one left; all of them run before any capture hook on
    the same name, so a capture in the same forward sees the edited value. A copy of the model made inside the
    block (``copy.deepcopy``) is not edited. On a model holding ``torch.compile``'d code, the block runs it eagerly
    (compiled code does not see hooks added after it was compiled); name the model you call (its names start
    with ``_orig_mod.``), not the module inside a compiled wrapper.

    An exact name whose module never ran while the model did is reported when the block ends: a warning, or
    :class:`HookNotFiredError` with ``strict=True`` (the edit had no effect). Hooks are removed when the block
    ends, also on an exception.
    """
    fired: set = set()
    make = lambda name, edit, convert: _edit_hook(name, edit, convert, fired)  # noqa: E731
    ran: list = []
    with _forward_hooks(model, edits, make, "intervene", prepend=True) as points:
        handle = _register(model, lambda module, args, output: ran.append(True), prepend=False, observes=True)
        try:
            yield model
        finally:
            handle.remove()
    exact = [k for k in edits if points.is_exact(k)]
    missing = [k for k in exact if k not in fired] if ran else []
    if missing:
        detail = "; ".join(f"{n!r} ({unfired_reason(model, n, points)})" for n in missing)
        msg = f"intervene: edits that had no effect, their hook never fired while the model ran: {detail}."
        if strict:
            raise HookNotFiredError(msg)
        warnings.warn(msg, stacklevel=3)


def first_tensor(output: Any) -> Any:
    """A module's output if it is a tensor, else the first element of a tuple or list output when that is a tensor
    (a Hugging Face layer that returns ``(hidden_states, ...)``: GPT-Neo's, OpenAI GPT's), else the output as is.
    For ``reduce=`` of a capture and of :func:`watch`."""
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return output


@contextmanager
def watch(model: nn.Module, fns: Mapping[str, Callable[[torch.Tensor, str], None]],
          reduce: Optional[Callable[[Any], Any]] = None):
    """Call ``fn(activation, name)`` on each activation of the named hook points as the model produces it,
    storing and replacing nothing, while the context is open.

    For checks that need a value only at the moment it exists: the hook runs before any later in-place op
    can overwrite the value, so nothing has to be copied (``verify`` compares the new model's activations
    this way instead of capturing them). Hooks run after those already on the module, as a capture's do;
    ``fn`` runs with torch-function modes off (a capture's write guard does not see its arithmetic), and
    only on tensor outputs: ``reduce(output)`` first where given (``first_tensor`` picks a layer's hidden states out
    of a tuple). The hooks are removed when the block ends, also on an exception.
    """
    make = _watch_hook if reduce is None else (lambda name, fn, convert: _watch_hook(name, fn, convert, reduce))
    with _forward_hooks(model, fns, make, "watch", prepend=False):
        yield model


@contextmanager
def _forward_hooks(model: nn.Module, items: Mapping[Any, Any], make: Callable, param: str, prepend: bool):
    """One forward hook ``make(name, item, conversion)`` per hook name each key of ``items`` selects,
    removed when the block ends (also on an exception): what ``intervene`` and ``watch`` register. Yields the
    model's hook points."""
    points = hook_points(model, probe=False)
    handles = []
    try:
        for key, item in items.items():
            for name in points.resolve(key, param=param):
                module = points.modules[points.canonical(name)]
                handles.append(_register(module, make(name, item, _conversion(module)), prepend))
        with _eager_if_compiled(model, param), unrunnable_explained(model):  # (experts that cannot run: why)
            yield points
    finally:
        for h in handles:
            h.remove()


def _register(module: nn.Module, fn: Callable, prepend: bool, observes: bool = False):
    """Register ``fn`` as a forward hook of ``module`` only: ``copy.deepcopy`` copies a module's hook dicts, so a copy
    made while the hook is on (a user's deepcopy, ``random_intertwiner``'s new model) would run it for good (the
    handle removes it from the original only); the copy drops it at its first call instead. A prepended hook goes
    after the prepended hooks already there (nested ``intervene`` blocks and several edits of one module apply in
    the order they were given), before every other hook. ``observes``: ``fn`` returns None and changes nothing
    (``models.observing``)."""
    handle = None

    def hook(mod, args, output):
        if mod is not module:
            mod._forward_hooks.pop(handle.id, None)
            return None
        return fn(mod, args, output)

    hook._workbench_prepended = prepend
    if observes:
        observing(hook)
    handle = module.register_forward_hook(hook, prepend=prepend)
    if prepend:
        hooks = module._forward_hooks
        for key in reversed([k for k, h in hooks.items() if k != handle.id and getattr(h, "_workbench_prepended", False)]):
            hooks.move_to_end(key, last=False)
    return handle


@contextmanager
def _eager_if_compiled(model: nn.Module, verb: str):
    """Run ``torch.compile``'d code eagerly while hooks are on: a compiled graph does not see hooks added after it
    was compiled (Dynamo skips the guards on module hooks), so an edit would be silently ignored."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # nothing is compiled before Dynamo was imported
    optimized = getattr(eval_frame, "OptimizedModule", None)
    if optimized is None or not any(isinstance(m, optimized) or getattr(m, "_compiled_call_impl", None) is not None
                                    for m in model.modules()):
        yield
        return
    stance = getattr(getattr(torch, "compiler", None), "set_stance", None)
    if stance is None:
        raise UnsupportedModelError(
            f"{verb}: the model holds torch.compile'd code, which does not run hooks added after it was compiled, "
            f"and this torch ({torch.__version__}) cannot run it eagerly (torch.compiler.set_stance, torch 2.6+). "
            f"Pass the original module (compiled._orig_mod).")
    with stance("force_eager"):
        yield


def _watch_hook(name: str, fn: Callable, convert=None, reduce: Optional[Callable] = None) -> Callable:
    def hook(module, args, output):
        if reduce is not None:
            output = reduce(output)
        if isinstance(output, torch.Tensor):
            with _quiet():
                fn(output.detach() if convert is None else convert.convert(output).detach(), name)
    return hook


def _conversion(module: nn.Module):
    """A TransformerBridge hook point's view conversion (e.g. ``[b, p, d_model] -> [b, p, head, d_head]``).

    TransformerLens shows hook functions and caches the converted activation; so do we.
    """
    # TransformerLens sets it as an attribute of the hook point (or a property of its alias wrapper). On any
    # other module a plain getattr would go through nn.Module.__getattr__ and raise and catch an
    # AttributeError: a capture asks once per hooked module, on every entry.
    if "hook_conversion" not in module.__dict__ and not hasattr(type(module), "hook_conversion"):
        return None
    return getattr(module, "hook_conversion", None)


def _edit_hook(name: str, edit, convert=None, fired: Optional[set] = None) -> Callable:
    if not (isinstance(edit, torch.Tensor) or callable(edit)):
        raise InvalidOptionError(f"intervene: the edit for {name!r} must be a tensor or a callable; got {type(edit).__name__}.")

    def hook(module, args, output):
        if fired is not None:
            fired.add(name)
        if not isinstance(output, torch.Tensor):
            raise InvalidOptionError(f"intervene: {name!r} produces {type(output).__name__}, not a tensor.")
        # fn may edit in place and return None: on an output that shares memory with the module's input or weights
        # (nn.Identity, nn.Flatten, a view) that would write into those as well, so fn gets a copy there.
        source = output.clone() if callable(edit) and _shares_memory(output, module, args) else output
        act = source if convert is None else convert.convert(source)
        new = _replacement(name, edit, act)
        if new is None:
            return None if source is output else source
        return new if convert is None else convert.revert(new)
    return hook


def _shares_memory(output: torch.Tensor, module: nn.Module, args: tuple) -> bool:
    """Whether ``output`` shares memory with a tensor argument of ``module`` or with its parameters or buffers."""
    own = storage_addresses([output])
    return bool(own) and not own.isdisjoint(storage_addresses(
        t for t in (*args, *module.parameters(), *module.buffers()) if isinstance(t, torch.Tensor)))


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
    if new is not None and (new.dtype != act.dtype or new.device != act.device):
        # The rest of the forward would run in another dtype (or fail in the next layer with a torch error).
        raise InvalidOptionError(
            f"intervene: the function for {name!r} returned a {str(new.dtype).replace('torch.', '')} tensor on "
            f"{new.device}; the activation is {str(act.dtype).replace('torch.', '')} on {act.device}. Return "
            f"new.to(activation.dtype) (or the activation's device).")
    return new
