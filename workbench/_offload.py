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
from typing import Iterator

import torch
from torch import nn


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


def offloaded_tensor(model: nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    """The value of parameter or buffer ``name`` of ``model``: ``t`` itself unless it is an offloaded ``meta``
    tensor, then the value accelerate keeps for it (its hook's weights map)."""
    if t.device.type != "meta":
        return t
    owner, _, local = name.rpartition(".")
    path = owner
    while True:
        module = model.get_submodule(path) if path else model
        hook = getattr(module, "_hf_hook", None)
        weights = getattr(hook, "weights_map", None)
        key = name[len(path) + 1:] if path else name
        if weights is not None and getattr(hook, "offload", False) and key in weights:
            return weights[key]
        if not path:
            return t
        path = path.rpartition(".")[0]
