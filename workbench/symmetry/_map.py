"""``wb.symmetry_map``: the sites of a model — hidden spaces with the group that acts on each.

The backend that reaches the model (``_backend.py``) builds the map; this module memoises graph maps,
keyed on everything a map depends on.
"""
from __future__ import annotations

import dataclasses
import itertools
import weakref
from collections import OrderedDict
from typing import Any, Optional

import torch
from torch import nn

from .._errors import InvalidOptionError
from ._backend import backend_for, one_example
from ._sites import SymmetryMap


# Maps of a model, keyed by everything a map depends on (see _memo_key); a few per model, because
# a transform made on a guessed input size is then verified at the user's.
_MEMO: "weakref.WeakKeyDictionary[nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
_MEMO_PER_MODEL = 4


def _plain(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str)) or (isinstance(v, tuple) and all(map(_plain, v)))


def _memo_key(model: nn.Module, example: Optional[torch.Tensor], affine: bool) -> tuple:
    """What a map depends on: the module tree (objects, classes, a ``forward`` set on an instance,
    plain attributes such as a slope or a padding), which tensors every parameter and buffer is (tying
    shows here), the values of activation parameters (a PReLU's slope picks its group), whether each
    LayerNorm's gain is 1 (it decides between rotations and permutations of a stream), the
    example's shape, dtype and device, and ``affine``. Not covered: state a ``forward`` reads from
    outside the model (globals); call with a fresh model object after changing such state."""
    from ._shared import _view

    mods = tuple((name, id(m), type(m), id(vars(m).get("forward")),
                  tuple(sorted((k, v) for k, v in vars(m).items() if not k.startswith("_") and k != "training"
                               and _plain(v))))
                 for name, m in model.named_modules(remove_duplicate=False))
    tensors = tuple((name, id(t), _view(t)) for name, t in itertools.chain(
        model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)) if t is not None)
    slopes = tuple(tuple(m.weight.detach().flatten().tolist()) for m in model.modules() if isinstance(m, nn.PReLU))
    # whether each LayerNorm's gain is 1 (a folded stream takes rotations, one with gains only permutations)
    gains = tuple(bool((m.weight == 1).all()) for m in model.modules()
                  if isinstance(m, nn.LayerNorm) and m.weight is not None)
    ex = None if example is None else (tuple(example.shape), example.dtype, example.device)
    return mods, tensors, slopes, gains, ex, affine


def symmetry_map(model: nn.Module, example: Optional[torch.Tensor] = None, *, affine: bool = False) -> SymmetryMap:
    """The sites of ``model`` with their groups, writers and readers, and the places skipped with why.

    A plain module is traced with ``torch.fx`` and run once on one example (in eval mode, without
    gradients; it is not modified); anything the rules do not understand is listed in ``skipped``
    and never transformed. ``example`` is an input batch (its first example is used; inferred for
    plain CNNs and MLPs when omitted). A model that cannot be traced or run gets an empty map whose
    ``trace_error`` names the first call that failed. ``affine=True`` adds the affine extension where
    readers' biases can absorb a constant (sigmoid sign flips); those sites are labelled.
    TransformerLens models are read from their weights and configuration instead (no trace).

    Example:
        >>> import torch, workbench as wb
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> smap = wb.symmetry_map(mlp)
        >>> [(s.name, s.n, s.group.name) for s in smap]
        [('1', 8, 'scaled_permutation')]
    """
    if not isinstance(model, nn.Module):
        raise InvalidOptionError(f"symmetry_map expects a torch.nn.Module; got {type(model).__name__}.")
    backend = backend_for(model)
    if not backend.memoised:
        return backend.site_map(model, None, affine)
    if example is not None:
        if not isinstance(example, torch.Tensor):
            raise InvalidOptionError(f"symmetry_map: example must be an input tensor (a batch); got "
                                     f"{type(example).__name__}.")
        example = one_example(example) if example.ndim >= 1 and len(example) > 1 else example
    key = _memo_key(model, example, affine)
    memo = _MEMO.setdefault(model, OrderedDict())
    if key in memo:
        memo.move_to_end(key)
        return _copy(memo[key])
    smap = backend.site_map(model, example, affine)
    memo[key] = smap
    while len(memo) > _MEMO_PER_MODEL:
        memo.popitem(last=False)
    return _copy(smap)


def _copy(smap: SymmetryMap) -> SymmetryMap:
    """A map the caller may edit without editing the memoised one."""
    return dataclasses.replace(smap, sites=list(smap.sites), skipped=list(smap.skipped))
