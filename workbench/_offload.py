"""Models whose weights Hugging Face ``accelerate`` offloaded (``device_map`` with "cpu"/"disk", ``cpu_offload``,
``disk_offload``): their parameters sit on the ``meta`` device and an ``AlignDevicesHook`` loads them onto
the execution device for each forward.

Capture needs nothing special (activations are on the devices that computed them). What reads weights —
a transform, a fingerprint — reads them through accelerate's own ``align_module_device`` (the hook's
``pre_forward``/``post_forward``), one module at a time, and a transformed copy keeps the same layout:
its offloaded modules get a hook whose weights are the transformed ones (held in CPU memory).
accelerate is imported only when a module carries an accelerate hook.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from ._errors import UnsupportedModelError


def offloaded_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module whose weights accelerate offloaded (an offloading ``AlignDevicesHook``)."""
    # accelerate sets ``module._hf_hook`` with nn.Module's __setattr__, which keeps a non-tensor, non-module value
    # in the instance's __dict__: looked up there, not through hasattr (nn.Module.__getattr__ raises and catches
    # once per module without a hook; 12 → 4 µs on a 6-module MLP, on every transform)
    if not any("_hf_hook" in vars(m) for m in model.modules()):
        return []
    from accelerate.utils import has_offloaded_params

    return [(n, m) for n, m in model.named_modules() if has_offloaded_params(m)]


@contextlib.contextmanager
def onloaded(module: nn.Module) -> Iterator[None]:
    """The module's offloaded weights on its execution device while the block runs (``meta`` again after)."""
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield


@contextlib.contextmanager
def all_onloaded(model: nn.Module) -> Iterator[list[tuple[str, nn.Module]]]:
    """Every offloaded module of ``model`` onloaded at once (for a transform, which reads them all)."""
    modules = offloaded_modules(model)
    with contextlib.ExitStack() as stack:
        for _, m in modules:
            stack.enter_context(onloaded(m))
        yield modules


def offload_like(new: nn.Module, names: list[str]) -> None:
    """Offload the modules ``names`` of ``new`` (a copy of an offloaded model, its weights onloaded and then
    transformed): each hook now serves the copy's own weights, kept in CPU memory, and the parameters go
    back to ``meta``, as in the original."""
    from accelerate.utils import named_module_tensors

    for name in names:
        module = new.get_submodule(name)
        hook = module._hf_hook
        hook.weights_map = {key: t.detach().to("cpu") for key, t in named_module_tensors(
            module, include_buffers=hook.offload_buffers, recurse=hook.place_submodules, remove_non_persistent=True)}
        hook.tied_params_map, hook.tied_params_names = {}, set()  # the copy shares no tensor with the original
        hook.post_forward(module, None)  # every offloaded tensor to meta, as accelerate leaves them


def own_forward(module: nn.Module) -> bool:
    """Whether ``module`` computes its class's ``forward``: no ``forward`` set on the object, or only accelerate's
    hook around the class's own (``_hf_hook``, the module's forward kept in ``_old_forward``), which moves tensors
    between devices; not where ``_old_forward`` was itself replaced before the hook was added."""
    f = vars(module).get("forward")
    if f is None:
        return True
    if "_hf_hook" in vars(module) and "_old_forward" in vars(module):
        f = vars(module)["_old_forward"]
    return getattr(f, "__func__", None) is type(module).forward and getattr(f, "__self__", None) is module


def foreign_forward(module: nn.Module) -> Optional[str]:
    """Why ``module``'s instance ``forward`` may compute something other than its class's; None where it is only
    accelerate's wrapper around the class's own forward (its ``AlignDevicesHook``, alone or chained), which moves
    weights and inputs between devices and computes nothing."""
    if "forward" not in vars(module):
        return None
    hook = vars(module).get("_hf_hook")
    if hook is None:
        return "a forward set on the instance"
    if not own_forward(module):
        return "accelerate's hook around a forward set on the instance"
    kinds = {type(h).__name__ for h in getattr(hook, "hooks", (hook,))}
    if kinds != {"AlignDevicesHook"}:
        return f"accelerate hooks {sorted(kinds)} (only AlignDevicesHook, which moves tensors between devices, is read)"
    return None


def dispatch_like(new: nn.Module, model: nn.Module) -> None:
    """Give ``new`` (a model built afresh with ``model``'s module tree, every weight in memory) the accelerate hooks
    ``model`` has, module by module: what ``model`` offloads, ``new`` offloads too, its hooks serving ``new``'s own
    weights from CPU memory (as :func:`offload_like` leaves a transformed copy); what ``model`` places on a device,
    ``new``'s hooks place there. Weights ``new`` ties share one entry of a new tied-parameter map, as
    ``accelerate.dispatch_model`` gives them."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook, add_hook_to_module
    from accelerate.utils import find_tied_parameters

    # A tie is one parameter held by different modules (an unembedding tied to the embedding). A TransformerLens
    # bridge reaches one module by several paths (``attn.qkv`` and ``attn._original_component.c_attn``), which
    # ``find_tied_parameters`` also reports; accelerate keys its map by data pointer, and GPT-2's split q/k/v are
    # views starting at c_attn's pointer, so such a "tie" gave c_attn.weight the [32, 32] query view in place of
    # its [32, 96] self (tests/test_devices.py, the bridge around a dispatched model).
    tied = {new.get_parameter(n).data_ptr(): {} for group in find_tied_parameters(new)
            if len({id(new.get_submodule(n.rpartition(".")[0])) for n in group}) > 1 for n in group}

    def fresh(hook):
        if isinstance(hook, SequentialHook):
            return SequentialHook(*map(fresh, hook.hooks))
        if type(hook) is not AlignDevicesHook:  # foreign_forward refuses these before a transform
            raise UnsupportedModelError(f"an accelerate {type(hook).__name__} cannot be given to a transformed copy.")
        return AlignDevicesHook(execution_device=hook.execution_device, offload=hook.offload,
                                io_same_device=hook.io_same_device, offload_buffers=hook.offload_buffers,
                                place_submodules=hook.place_submodules, skip_keys=hook.skip_keys,
                                tied_params_map=None if hook.tied_params_map is None else tied)

    for name, m in model.named_modules():  # parents first, as accelerate attaches them
        hook = vars(m).get("_hf_hook")
        if hook is not None:
            add_hook_to_module(new.get_submodule(name), fresh(hook))
    if "hf_device_map" in vars(model):
        new.hf_device_map = dict(model.hf_device_map)


def built_alike(model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` (a new model made from ``model``'s weights: a transform, a fold) run with ``model``'s offloaded
    weights onloaded, and the new model offloaded as ``model`` is: a copy that carries ``model``'s hooks has them serve
    its own weights (:func:`offload_like`); one built afresh from a class and config gets them (:func:`dispatch_like`)."""
    offloaded = offloaded_modules(model)
    if not offloaded:
        return build()
    with all_onloaded(model):
        new = build()
    if any("_hf_hook" in vars(m) for m in new.modules()):
        offload_like(new, [name for name, _ in offloaded])
    else:
        dispatch_like(new, model)
    return new


def _hook_value(module: nn.Module, key: str):
    """The value ``module``'s offloading accelerate hook (alone or chained) serves for ``key``; None where none does."""
    hook = vars(module).get("_hf_hook")
    for h in getattr(hook, "hooks", (hook,)):
        weights = getattr(h, "weights_map", None)
        if getattr(h, "offload", False) and weights is not None and key in weights:
            return weights[key]
    return None


def served(module: nn.Module, attr: str) -> Optional[torch.Tensor]:
    """``module``'s own parameter or buffer ``attr`` as its forward sees it: the tensor itself, or, where accelerate
    offloaded it (a ``meta`` tensor), the value the module's hook serves (for rules that decide by a value: a
    LayerNorm's gain of 1, a PReLU's slope)."""
    t = getattr(module, attr)
    if t is None or t.device.type != "meta":
        return t
    value = _hook_value(module, attr)
    if value is None:
        raise UnsupportedModelError(f"{type(module).__name__}.{attr} is on the meta device and no accelerate hook of "
                                    f"the module serves it, so its value cannot be read.")
    return torch.as_tensor(value)


def offloaded_tensor(model: nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    """The value of parameter or buffer ``name`` of ``model``: ``t`` itself unless it is an offloaded ``meta``
    tensor, then the value accelerate keeps for it (the weights map of its module's hook, or of an ancestor's that
    placed its submodules)."""
    if t.device.type != "meta":
        return t
    path = name.rpartition(".")[0]
    while True:
        value = _hook_value(model.get_submodule(path) if path else model, name[len(path) + 1:] if path else name)
        if value is not None:
            return value
        if not path:
            return t
        path = path.rpartition(".")[0]
