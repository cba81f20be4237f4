"""``wb.symmetry_map``: the sites of a model — hidden spaces with the group that acts on each.

The backend that reaches the model (``_backend.py``) builds the map; this module memoises graph maps,
keyed on everything a map depends on: per model object (``_memo_key``), and per *structure*
(``_structure_key``), so that a new object of an architecture already seen (a reloaded checkpoint, a
model built again in a loop) reuses the trace instead of running it again (4 ms of a 10 ms first
transform of a 5M-parameter MLP; a ResNet's trace takes far longer).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import types
import weakref
from collections import OrderedDict
from typing import Any, Optional

import torch
from torch import nn

from .._errors import InvalidOptionError
from .._offload import served
from ..models import FORWARD_HOOKS, global_hooks, hooked
from ._backend import backend_for, one_example
from ._sites import SymmetryMap


# Maps of a model, keyed by everything a map depends on (see _memo_key); a few per model, because
# a transform made on a guessed input size is then verified at the user's.
_MEMO: "weakref.WeakKeyDictionary[nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
_MEMO_PER_MODEL = 4


def _plain(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str)) or (isinstance(v, tuple) and all(map(_plain, v)))


def _memo_key(model: nn.Module, example: Optional[torch.Tensor], affine: bool) -> tuple:
    """What a map depends on: the module tree (objects, classes, a ``forward`` set on an instance, whether it has
    forward hooks, and whether torch has global ones: a hooked module is left alone,
    plain attributes such as a slope, a padding or a private mode flag, and any other attribute a forward may read:
    ``_attr_key``), which tensors every parameter and buffer is (tying
    shows here), the values of activation parameters (a PReLU's slope picks its group), whether each
    LayerNorm's gain is 1 (it decides between rotations and permutations of a stream), the
    example's shape, dtype and device, and ``affine``. Not covered: state a ``forward`` reads from
    outside the model (globals); call with a fresh model object after changing such state."""
    from ._shared import _view

    # One walk of the tree for the modules, their parameters and buffers, and the values read: the same key as
    # named_modules, named_parameters and named_buffers (remove_duplicate=False) and modules() walked one by one,
    # which was four walks (~0.5 ms each on Swin-T's 180 modules, on every call).
    walk = list(model.named_modules(remove_duplicate=False))
    seen: dict = {}  # an object many modules hold (one config) keyed once
    mods = tuple((name, id(m), type(m), id(vars(m).get("forward")), hooked(m),
                  tuple(sorted((k, v if type(v) in _SCALARS or _plain(v) else _attr_key(v, seen)) for k, v in vars(m).items()
                               if k not in _NOT_KEYED)))
                 for name, m in walk)
    params, buffers = [], []
    for prefix, m in walk:  # as Module._named_members: "prefix.name", None skipped, every use of a shared tensor
        dot = prefix + "." if prefix else ""
        params.extend((dot + k, id(t), _view(t)) for k, t in m._parameters.items() if t is not None)
        buffers.extend((dot + k, id(t), _view(t)) for k, t in m._buffers.items() if t is not None)
    ex = None if example is None else (tuple(example.shape), example.dtype, example.device)
    return mods, tuple(params + buffers), _values_read(model, walk), ex, affine, global_hooks()


def _attr_key(v: Any, seen: Optional[dict] = None, depth: int = 4) -> Any:
    """A module attribute that is not a plain value, as the per-object key holds it: a container of plain values (a
    list, a dict) by value, so that one changed in place is a new key; an object with fields (a config namespace, a
    dataclass) by its fields, each keyed the same way down to ``depth`` objects deep (``self.cfg.block.act``); anything
    else (a submodule's registry, a function, a class), and an object deeper than that, by identity. A forward branching
    on ``self.cfg.act``, or calling ``self.fn``, got the map made before the change (a ReLU's scalings drawn at a tanh:
    the function moved by 0.14 to 0.66). ``seen``: keys made so far in this key, by id (a config every module holds)."""
    try:
        return _value_key(v)
    except _Unkeyable:
        pass
    hit = None if seen is None else seen.get(id(v))
    if hit is not None and hit[0] is v:
        return hit[1]
    fields = getattr(v, "__dict__", None)
    key: Any = ("object", id(v))
    if depth and type(fields) is dict and not isinstance(v, (nn.Module, torch.Tensor, type, types.FunctionType)):
        key = (type(v), tuple((k, _attr_key(a, seen, depth - 1)) for k, a in fields.items()))
    if seen is not None:
        seen[id(v)] = (v, key)
    return key


def _values_read(model: nn.Module, walk: Optional[list] = None) -> tuple:
    """The parameter values the rules decide by: each PReLU's slopes (they pick its group), whether each
    LayerNorm's gain is 1 (a folded stream takes rotations, one with gains only permutations). ``walk``:
    ``model.named_modules(remove_duplicate=False)`` already listed; each module is read once, in the order
    ``model.modules()`` gives (a module's first place in the walk)."""
    if walk is None:
        modules = model.modules()
    else:
        seen: set = set()
        modules = [m for _, m in walk if id(m) not in seen and not seen.add(id(m))]
    slopes, gains = [], []
    for m in modules:
        if isinstance(m, nn.PReLU):
            slopes.append(tuple(served(m, "weight").detach().flatten().tolist()))
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            gains.append(bool((served(m, "weight") == 1).all()))
    return tuple(slopes), tuple(gains)


# Maps by the structure of the model they were made for (see _structure_key): names, never module objects.
_BY_STRUCTURE: "OrderedDict[tuple, SymmetryMap]" = OrderedDict()
_BY_STRUCTURE_SIZE = 32

# A module's __dict__ entries that are nn.Module's own bookkeeping, not something its forward reads: the
# tensors and submodules are keyed one by one below; state-dict and backward hooks do not act on a forward.
_BOOKKEEPING = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_backward_pre_hooks",
                          "_backward_hooks", "_is_full_backward_hook", "_state_dict_hooks", "_state_dict_pre_hooks",
                          "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"})
# ... and those that change what a call computes (models.FORWARD_HOOKS): they must be empty for a structural key.
# One set for the key's filter (three membership tests per attribute were a tenth of the key's cost), and the
# plain types _plain accepts without a call
_NOT_KEYED = _BOOKKEEPING | frozenset(FORWARD_HOOKS) | {"training"}
_SCALARS = frozenset({type(None), bool, int, float, str})


class _Unkeyable(Exception):
    """Something the structural key cannot describe by value: such a model is keyed per object only."""


def _value_key(v: Any) -> Any:
    """A plain attribute as a key (its type with it: 1 and True and 1.0 must not meet), or _Unkeyable."""
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device)):
        return (type(v), v)
    if isinstance(v, (tuple, list)):
        return (type(v), tuple(_value_key(a) for a in v))
    if isinstance(v, (set, frozenset)):
        return (type(v), tuple(sorted(map(repr, v))))
    if type(v) is dict:  # in order (a forward may iterate it): timm's feature_info is a list of such dicts
        return (dict, tuple((_value_key(k), _value_key(a)) for k, a in v.items()))
    if type(v) is functools.partial and isinstance(v.func, (type, types.FunctionType, types.BuiltinFunctionType)):
        # a constructor argument kept as an attribute (torchvision ViT's ``norm_layer``): the callable itself
        # (kept alive by the key, as _class_key keeps classes) and its arguments by value
        return (functools.partial, v.func, tuple(map(_value_key, v.args)),
                tuple((k, _value_key(a)) for k, a in v.keywords.items()))
    raise _Unkeyable(type(v).__name__)


def _class_key(cls: type, seen: dict) -> tuple:
    """A module class as a key: the class itself, and every class in its MRO above nn.Module with its own
    functions (the objects, so a method replaced on the class is a new key) and plain class attributes."""
    hit = seen.get(cls)
    if hit is None:
        parts = []
        for c in cls.__mro__:
            if c is nn.Module or not issubclass(c, nn.Module):
                break
            own = []
            for k, v in vars(c).items():
                if k.startswith("__") and k not in ("__init__", "__call__"):
                    continue
                if callable(v) or isinstance(v, (staticmethod, classmethod, property)):
                    own.append((k, v))
                else:
                    try:
                        own.append((k, _value_key(v)))
                    except _Unkeyable:
                        own.append((k, id(v)))  # the object itself decides: identity (kept alive by the class)
            parts.append((c, tuple(own)))
        hit = seen[cls] = (cls, tuple(parts))
    return hit


def _structure_key(model: nn.Module, example: Optional[torch.Tensor], affine: bool) -> Optional[tuple]:
    """What a graph map depends on, described without the model's objects: every module's qualified name
    (and which names are one module), class (with its methods, forward's among them) and plain attributes (sizes, a slope, a mode flag a
    forward may branch on, training), every parameter's and buffer's name, shape, strides, dtype, device,
    requires_grad and which other tensors it is (tied weights), the values the rules read (a PReLU's slope,
    whether a LayerNorm's gain is 1: as ``_memo_key``), the example's shape, dtype and device, and
    ``affine``. None where something cannot be described that way, and then nothing is cached by structure:
    a ``forward`` set on an instance, a forward hook (this module's or a global one), an attribute that is
    neither plain nor a module (a tensor that is not a buffer, a function, an object)."""
    if global_hooks():
        return None
    seen: dict = {}
    mods = []
    ids: dict = {}  # a module's id → the position of its first name (one module called at two places)
    try:
        for i, (name, m) in enumerate(model.named_modules(remove_duplicate=False)):
            d = vars(m)
            if "forward" in d or hooked(m):
                return None
            # (training is left out: a map is traced in eval mode whatever the flags say)
            attrs = tuple((k, _value_key(v)) for k, v in d.items()
                          if k not in _BOOKKEEPING and k not in FORWARD_HOOKS and k != "training")
            mods.append((name, ids.setdefault(id(m), i), _class_key(type(m), seen), attrs, tuple(d["_modules"]), tuple(d["_parameters"]),
                         tuple(d["_buffers"]), tuple(sorted(d.get("_non_persistent_buffers_set", ())))))
    except _Unkeyable:
        return None
    first: dict = {}  # a tensor's identity and its view of memory → the position of the first tensor that is it
    tensors = []
    from ._shared import _view

    for i, (name, t) in enumerate(itertools.chain(model.named_parameters(remove_duplicate=False),
                                                  model.named_buffers(remove_duplicate=False))):
        same = (first.setdefault(("id", id(t)), i), first.setdefault(("view", _view(t)), i))
        tensors.append((name, type(t), tuple(t.shape), tuple(t.stride()), t.dtype, t.device, t.requires_grad, same))
    ex = None if example is None else (tuple(example.shape), example.dtype, example.device)
    return tuple(mods), tuple(tensors), _values_read(model), ex, affine


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
    shape = _structure_key(model, example, affine)
    smap = _BY_STRUCTURE.get(shape) if shape is not None else None
    if smap is None:
        smap = backend.site_map(model, example, affine)
        if shape is not None:
            _BY_STRUCTURE[shape] = smap
            while len(_BY_STRUCTURE) > _BY_STRUCTURE_SIZE:
                _BY_STRUCTURE.popitem(last=False)
    else:
        _BY_STRUCTURE.move_to_end(shape)
    memo[key] = smap
    while len(memo) > _MEMO_PER_MODEL:
        memo.popitem(last=False)
    return _copy(smap)


def _copy(smap: SymmetryMap) -> SymmetryMap:
    """A map the caller may edit without editing the memoised one."""
    return dataclasses.replace(smap, sites=list(smap.sites), skipped=list(smap.skipped))
