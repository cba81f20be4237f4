"""A transform's new bridge around a Hugging Face model: a deep copy of a never-run template, not a boot.

Booting a ``TransformerBridge`` costs 1.5-2 deep copies of the whole bridge in CPU time even with the
work ``_hf._boot`` skips (two scans of every attribute of ~600 modules for hook points, the adapter's
block templates deep-copied per layer, ``train()`` over both trees: 80-150 ms at 40-55M parameters). A transform's new bridge differs from a boot around the pushed weights only in its
weights, so it is built like native bridges are (``_layout._TEMPLATES``): a *template* is booted once per
(class, config, dtype, model name, training mode) around a blank model, never run and never handed out,
its parameters then meta tensors; a new bridge is ``copy.deepcopy(template)`` with fresh uninitialised
parameters in the memo (the caller writes every one through ``canonical_views``), the model's own
buffers copied in as ``_hf.blank`` copies them, and the model's tokenizer configured as a boot would.

A bridge that has run is never copied: its hooks may be closures over its own hook points. The template
is copied only where the copy provably is a boot's equal sharing nothing with it; otherwise
:func:`shell` gives None and the caller boots:

- the template has no hooks (OPT's fc-split MLP wires permanent hooks at boot, closures over the
  template's own components that a copy would keep calling: booted);
- every parameter is a Hugging Face parameter the layout reaches (a fused q/k/v's split q, k, v are
  derived from the weights at boot — GPT-2, GPT-NeoX: booted);
- a trial copy reaches no object of the template. ``copy.deepcopy`` shares what it treats as atomic —
  functions and their closures, weak references, bound built-in methods — so the check follows those
  on the copy too.
tests/test_hf_bridge_shell.py runs a bridge with hooks and a cache, transforms it and checks the new
bridge and the original against each other and against a plain boot, in float64.
"""
from __future__ import annotations

import enum
import gc
import types
import weakref
from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from ._quiet_build import as_template, fresh_copy

# Templates per key (see the module docstring); None records a configuration that is booted instead.
_TEMPLATES: "OrderedDict[tuple, object]" = OrderedDict()
_KEPT = 4
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def shell(model: nn.Module, dtype: torch.dtype) -> Optional[nn.Module]:
    """A bridge like ``model`` (a bridge around a Hugging Face model) in ``dtype`` whose parameters are
    uninitialised and its own, or None where a template cannot be copied safely (boot instead)."""
    from . import _hf

    key = _hf.config_key(model) + (str(dtype), str(model.cfg.model_name), bool(model.training))
    if key in _TEMPLATES:
        _TEMPLATES.move_to_end(key)
        entry = _TEMPLATES[key]
    else:
        entry = _TEMPLATES[key] = _template(model, dtype)
        while len(_TEMPLATES) > _KEPT:
            _TEMPLATES.popitem(last=False)
    return None if entry is None else _copy(entry, model)


def _params(bridge: nn.Module):
    """Every module of the bridge and of its Hugging Face model (not all of which the bridge's tree holds)."""
    seen = {}
    for root in (bridge, bridge.original_model):
        for m in root.modules():
            seen.setdefault(id(m), m)
    return list(seen.values())


def _template(model: nn.Module, dtype: torch.dtype):
    """``(template, devices)`` or None (see the module docstring)."""
    from . import _hf

    fresh = _hf.blank(model, dtype)
    T = _hf._boot(str(model.cfg.model_name), fresh, _hf._configured(model.tokenizer))
    modules = _params(T)
    if any(getattr(m, name, None) for m in modules for name in _HOOK_DICTS):
        return None
    if derived(T):
        return None
    entry = as_template(T, modules)  # meta parameters: any reference a copy kept to one would fail loudly
    trial = _copy(entry, model)  # (its config's weak reference to its bridge must name the copy)
    ref = getattr(trial.cfg, "_bridge_ref", None)
    if _reaches(trial, T) or _tokenizers(trial) != {id(trial.tokenizer)} or (ref is not None and ref() is not trial):
        return None
    return entry


def derived(bridge: nn.Module) -> list[str]:
    """Parameters of ``bridge`` that are not the Hugging Face parameters its layout reaches (which the
    transform writes): tensors derived from the weights at boot, such as a fused q/k/v's split copies
    or views. A copy would leave them unwritten, so a template with any is not copied."""
    from . import _hf

    names = {e.param for e in _hf.layout(bridge).entries}
    own = {id(p) for k, p in bridge.original_model.named_parameters(remove_duplicate=False)
           if k.replace("._original_component", "") in names}
    out = []
    for m in _params(bridge):
        out += [f"{type(m).__name__}.{k}" for k, p in m._parameters.items() if p is not None and id(p) not in own]
    return out


def _copy(entry, model: nn.Module) -> nn.Module:
    from . import _hf
    from transformer_lens.model_bridge.sources._bridge_builder import configure_tokenizer

    T, devices = entry
    memo = {}
    if T.tokenizer is not None:  # the model's tokenizer, configured as a boot configures it (cfg's BOS flags)
        memo[id(T.tokenizer)] = configure_tokenizer(_hf._configured(model.tokenizer), T.cfg)
    new = fresh_copy(T, devices, _params(T), memo)
    buffers = {k.replace("._original_component", ""): b for k, b in _hf.hf_model(model).named_buffers()}
    with torch.no_grad():  # the model's own buffers, as ``_hf.blank`` copies them
        for name, b in new.original_model.named_buffers():
            own = buffers.get(name.replace("._original_component", ""))
            if own is not None and own.shape == b.shape:
                b.copy_(own)
    return new


_ATOMIC = (str, bytes, int, float, complex, bool, type(None), type, types.ModuleType, types.CodeType, torch.dtype,
           torch.device, torch.layout, torch.memory_format)


def _reach(root) -> dict[int, object]:
    """Every object reachable from ``root``, following what ``copy.deepcopy`` shares rather than copies:
    function closures and defaults, weak references' referents, built-in methods' ``__self__``."""
    seen, todo = {}, [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, _ATOMIC):
            continue
        seen[id(obj)] = obj
        if isinstance(obj, types.FunctionType):
            todo += [c.cell_contents for c in obj.__closure__ or () if _filled(c)]
            todo += list(obj.__defaults__ or ()) + list((obj.__kwdefaults__ or {}).values())
        elif isinstance(obj, weakref.ref):
            target = obj()
            if target is not None:
                todo.append(target)
        elif isinstance(obj, types.BuiltinMethodType):
            todo.append(obj.__self__)
        else:
            todo += gc.get_referents(obj)
    return seen


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _reaches(new: nn.Module, T: nn.Module) -> bool:
    """Whether ``new`` reaches any object of the template ``T`` (shared functions are fine: their
    closures are followed)."""
    own = _reach(T)
    for i in _reach(T.tokenizer) if T.tokenizer is not None else ():  # the user's tokenizer's state: a shallow
        own.pop(i, None)  # copy of it is what a boot gets too (``_hf._configured``)
    return any(i in own and not _immutable(o) for i, o in _reach(new).items())


def _immutable(o) -> bool:
    """What ``copy.deepcopy`` may share because nothing can change it: functions (their closures are
    followed by ``_reach``), descriptors, and tuples and frozensets of immutable things."""
    if isinstance(o, (tuple, frozenset)):
        return all(isinstance(x, _ATOMIC) or _immutable(x) for x in o)
    return isinstance(o, _ATOMIC + (enum.Enum, types.FunctionType, types.BuiltinFunctionType, types.MethodDescriptorType,
                                    types.WrapperDescriptorType, types.GetSetDescriptorType, property))


def _tokenizers(bridge: nn.Module) -> set[int]:
    """Ids of the tokenizers the bridge and its driver hold."""
    out = {id(bridge.tokenizer)}
    driver = getattr(bridge, "_driver", None)
    if getattr(driver, "tokenizer", None) is not None:
        out.add(id(driver.tokenizer))
    return out
