"""``copy.deepcopy`` of a module tree, faster on the parts every ``nn.Module`` has.

Why: a transform copies the model it transforms. With the rewritten weights pre-seeded in the memo,
what remains of ``copy.deepcopy`` is Python: every module carries about a dozen hook dictionaries
(``OrderedDict``), which ``deepcopy`` rebuilds through the generic ``__reduce_ex__`` path, a few
microseconds each. On MobileNetV2 (150 modules) that was 16 ms of a 27 ms ``deepcopy``, and more
than the transform's own arithmetic (measured; benchmarks/results/transforms.md).

:func:`deepcopy_module` follows ``copy.deepcopy``'s own protocol step by step for a module whose class
keeps nn.Module's ``__getstate__`` and has no ``__deepcopy__``/``__reduce__`` of its own: ``cls.__new__``,
the memo entry, ``__getstate__``, a deep copy of the state, the class's own ``__setstate__`` (a conv's
restores ``padding_mode``, as under ``deepcopy``), the keep-alive list. A few kinds of value take a shortcut: a plain ``dict`` (copied key by key, as
``deepcopy`` does), an empty ``OrderedDict`` without attributes or an empty ``set`` (a new empty one,
which is what ``deepcopy`` makes of it), and numbers, strings and tuples of them (returned as they are,
as ``deepcopy`` returns them). Anything else, and any module of a class that customises copying, goes to
``copy.deepcopy`` with the same memo, so sharing between the original's objects is kept and nothing
is shared with the original that ``deepcopy`` would have copied.
"""
from __future__ import annotations

import copy
import copyreg
from collections import OrderedDict
from typing import Any

from torch import nn

_PLAIN: dict = {}  # class → whether deepcopy_module may take the shortcut for it


def _plain_class(cls: type) -> bool:
    hit = _PLAIN.get(cls)
    if hit is None:
        hit = _PLAIN[cls] = (issubclass(cls, nn.Module) and cls not in copyreg.dispatch_table
                             and cls not in copy._deepcopy_dispatch  # type: ignore[attr-defined]
                             and getattr(cls, "__deepcopy__", None) is None
                             and cls.__reduce_ex__ is object.__reduce_ex__ and cls.__reduce__ is object.__reduce__
                             and cls.__getstate__ is nn.Module.__getstate__ and cls.__new__ is object.__new__)
    return hit


def _keep_alive(x: Any, memo: dict) -> None:
    """As ``copy._keep_alive``: the memo holds the originals, so their ids are not reused during the copy.
    (Needed only for objects the copy itself made: the objects passed to :func:`_value` are held by the
    original model's modules for as long as the copy runs.)"""
    try:
        memo[id(memo)].append(x)
    except KeyError:
        memo[id(memo)] = [x]


# What copy.deepcopy returns unchanged (its _deepcopy_atomic), and tuples of them (it returns such a tuple
# itself, without a memo entry).
_ATOMIC = frozenset({int, float, bool, str, type(None), complex, bytes})


def deepcopy_module(x: Any, memo: dict | None = None) -> Any:
    """The same object ``copy.deepcopy(x, memo)`` returns, built faster where ``x`` is a plain module tree."""
    if memo is None:
        memo = {}
    d = id(x)
    if d in memo:
        return memo[d]
    cls = type(x)
    if not (isinstance(x, nn.Module) and _plain_class(cls)):
        return copy.deepcopy(x, memo)
    y = cls.__new__(cls)
    memo[d] = y
    state = x.__getstate__()  # a new dict: copied, not remembered (deepcopy's entry for it is never looked up)
    y.__setstate__({k: _value(v, memo) for k, v in state.items()})
    _keep_alive(x, memo)
    return y


def _value(v: Any, memo: dict) -> Any:
    cls = type(v)
    if cls in _ATOMIC or (cls is tuple and all(type(a) in _ATOMIC for a in v)):
        return v
    d = id(v)
    if d in memo:
        return memo[d]
    if cls is OrderedDict and not v and not vars(v):
        y = memo[d] = OrderedDict()
    elif cls is set and not v:
        y = memo[d] = set()
    elif cls is dict:
        y = memo[d] = {}
        for k, item in v.items():
            y[k if type(k) is str else copy.deepcopy(k, memo)] = _value(item, memo)
    elif isinstance(v, nn.Module):
        return deepcopy_module(v, memo)
    else:
        return copy.deepcopy(v, memo)
    return y
