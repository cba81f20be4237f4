"""``intervene`` and ``watch``: forward hooks that edit or observe activations as the model produces them.

Neither stores anything, so neither needs the capture core's write guard or bookkeeping (``_capture.py``);
both resolve names through the same hook points and convert TransformerBridge hook points the same way.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from .._errors import InvalidOptionError
from ._guard import quiet as _quiet
from ._points import hook_points


@contextmanager
def intervene(model: nn.Module, edits: Mapping[Any, Any]):
    """Replace activations while the context is open.

    ``edits`` maps a hook name (or any name filter) to a tensor, which replaces the activation
    (broadcast to its shape, shape-checked), or to ``fn(activation, name)``, whose result replaces it
    (return None to keep it, e.g. after editing it in place). Interventions run before any capture
    hook on the same name, so a capture in the same forward sees the edited value.
    """
    with _forward_hooks(model, edits, _edit_hook, "intervene", prepend=True):
        yield model


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
    removed when the block ends (also on an exception): what ``intervene`` and ``watch`` register."""
    points = hook_points(model, probe=False)
    handles = []
    try:
        for key, item in items.items():
            for name in points.resolve(key, param=param):
                module = points.modules[points.canonical(name)]
                handles.append(module.register_forward_hook(make(name, item, _conversion(module)), prepend=prepend))
        yield
    finally:
        for h in handles:
            h.remove()


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
