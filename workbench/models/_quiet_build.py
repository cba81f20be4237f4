"""Building a model whose every parameter is overwritten at once: context managers that skip the work such
a build does that nothing keeps (the layout backend's rebuilds, ``_layout.py``, and the Hugging Face
bridges' boots, ``_hf.py``), and never-run templates whose copies get fresh parameters (native bridges in
``_layout.blank``, Hugging Face bridges in ``_hf_shell.py``)."""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Iterable, Optional

import torch
from torch import nn


def as_template(model: nn.Module, modules: Optional[Iterable[nn.Module]] = None):
    """``(model, devices)``: every parameter of ``modules`` (default: ``model``'s tree) replaced in place by a meta
    tensor of its shape (tied ones stay tied), so a copy that kept a reference to one fails loudly; ``devices``
    maps each meta parameter's id to the device its copies belong on."""
    meta: dict[int, nn.Parameter] = {}
    devices: dict[int, torch.device] = {}
    for module in model.modules() if modules is None else modules:
        for name, p in module._parameters.items():
            if p is not None:
                if id(p) not in meta:
                    meta[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                    devices[id(meta[id(p)])] = p.device
                module._parameters[name] = meta[id(p)]
    return model, devices


def fresh_copy(template: nn.Module, devices: dict, modules: Iterable[nn.Module], memo: Optional[dict] = None,
               *, copies: Optional[dict] = None):
    """A deep copy of ``template`` (from :func:`as_template`) whose parameters, those of ``modules``, are new
    uninitialised tensors on their devices; ``memo``: more objects to stand in (``copy.deepcopy``'s). A module's
    empty dicts (its hook dicts, 8 or more per module) are given as new ones: deep-copied one by one through
    ``__reduce_ex__`` they were two thirds of a copy. ``copies``: an empty dict that receives the copy's memo
    (id of a template object -> its copy), for a caller that re-binds what the copy shares (``_hf_shell``)."""
    given = memo or {}
    memo = copies if copies is not None else {}
    memo.update(given)
    for m in modules:
        for p in m._parameters.values():
            if p is not None and id(p) not in memo:
                memo[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=devices[id(p)]),
                                           requires_grad=p.requires_grad)
        for v in vars(m).values():
            if type(v) in (dict, OrderedDict) and not v:
                memo.setdefault(id(v), type(v)())
    return copy.deepcopy(template, memo)


class _no_random_init:
    """Skip ``torch.nn.init``'s random fills while a model is built whose every parameter is then
    overwritten (``write_weights`` checks that): they were 40% of rebuilding a GPT-2-sized bridge."""

    NAMES = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
             "xavier_normal_", "orthogonal_", "zeros_", "ones_", "constant_")

    def __enter__(self):
        self.saved = {n: getattr(torch.nn.init, n) for n in self.NAMES}
        for n in self.NAMES:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)

    def __exit__(self, *exc):
        for n, fn in self.saved.items():
            setattr(torch.nn.init, n, fn)


class _hidden:
    """Hide a class's property while a model is built. A bridge's hook scan reads every public
    attribute and keeps only the hook points; ``W_E_pos`` is a concatenated copy of the embeddings
    (157 MB for GPT-2 small), made twice per boot and thrown away: 10-20% of the boot, and the peak
    memory of a transform."""

    def __init__(self, cls: type, name: str):
        self.cls, self.name = cls, name

    def __enter__(self):
        self.saved = self.cls.__dict__.get(self.name)
        if isinstance(self.saved, property):
            setattr(self.cls, self.name, property(self._missing))

    def _missing(self, obj):
        raise AttributeError(f"{self.name} is hidden while the model is built")

    def __exit__(self, *exc):
        if isinstance(self.saved, property):
            setattr(self.cls, self.name, self.saved)
