"""The write guard of a capture: copy a captured value just before a torch call writes into it.

See ``_capture.py``'s module docstring for why a ``TorchFunctionMode`` (and not re-running the forward,
nor a ``TorchDispatchMode``). The mode lives only while a capture is attached, on the thread that
attached it; what it cannot see, the capture's version-counter check refuses.
"""
from __future__ import annotations

import inspect
from typing import Union

import torch
from torch.overrides import TorchFunctionMode

#: A block of the capture's own bookkeeping (storage addresses, version counters, detach): torch calls
#: in it skip every torch-function mode, the guard included, so they cost no Python dispatch.
quiet = torch._C.DisableTorchFunction

# In-place dunders (``x += y`` reaches a mode as ``add_``, ``x[i] = v`` as ``__setitem__``) and methods
# whose trailing underscore does not mean "writes the tensor's values".
_WRITE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                            "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__",
                            "__irshift__", "__imatmul__"})
# (``share_memory_`` is a write here: it moves the values to new memory, where the guard would no longer find them.)
_NOT_WRITES = frozenset({"requires_grad_", "retain_grad", "rename_", "record_stream"})


class _Writes:
    """Torch functions that write an argument other than the first, with no ``_`` in their name and no
    ``inplace=``/``out=``: the arguments at ``positions`` (or keywords ``names``) when the flag at
    ``flag`` (keyword ``flag_name``, default ``default``) is set. Running statistics do not even move a
    version counter (``F.batch_norm`` in training mode), so nothing else would catch these writes."""

    def __init__(self, positions: tuple, names: tuple, flag: int, flag_name: str, default):
        self.positions, self.names, self.flag, self.flag_name, self.default = positions, names, flag, flag_name, default

    def __call__(self, args: tuple, kwargs: dict) -> list:
        flag = args[self.flag] if len(args) > self.flag else kwargs.get(self.flag_name, self.default)
        if flag is None or flag is False:
            return []
        return [args[i] if len(args) > i else kwargs.get(n) for i, n in zip(self.positions, self.names)]


_KNOWN: dict = {}  # filled on first use (not an lru_cache: torch.compile traces into the guard and warns on one)


def _known_writers() -> dict:
    if _KNOWN:
        return _KNOWN
    import torch.nn.functional as F

    stats = ("running_mean", "running_var")
    _KNOWN.update({
        F.batch_norm: _Writes((1, 2), stats, 5, "training", False),
        F.instance_norm: _Writes((1, 2), stats, 5, "use_input_stats", True),
        torch.batch_norm: _Writes((3, 4), stats, 5, "training", False),
        torch.instance_norm: _Writes((3, 4), stats, 5, "use_input_stats", True),
        F.embedding: _Writes((1,), ("weight",), 3, "max_norm", None),  # renormalises rows of the weight
    })
    return _KNOWN


_RULES: dict = {}  # torch callable -> "first" | index of its ``inplace`` parameter | tuple of written args | None


def _rule(func) -> Union[None, str, int, tuple]:
    try:
        return _RULES[func]
    except KeyError:
        pass
    except TypeError:  # unhashable callable: work it out each time
        return _compute_rule(func)
    rule = _RULES[func] = _compute_rule(func)
    return rule


def _compute_rule(func) -> Union[None, str, int, tuple, _Writes]:
    known = _known_writers().get(func)
    if known is not None:
        return known
    if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        # torch.ops.aten.add_.Tensor(x, y): its name is "add_.Tensor", but its schema says exactly which
        # arguments it writes (``Tensor(a!) self``). A packet (torch.ops.mylib.scale(x)) is resolved to an
        # overload only past the guard: what any of its overloads writes. ``out=`` is handled with every
        # call's keywords.
        try:
            schemas = ([func._schema] if isinstance(func, torch._ops.OpOverload) else
                       [getattr(func, o)._schema for o in func.overloads()])
        except (AttributeError, RuntimeError):
            schemas = []
        written = tuple(sorted({(i, a.name) for schema in schemas for i, a in enumerate(schema.arguments)
                                if a.alias_info is not None and a.alias_info.is_write and a.name != "out"}))
        if written:
            return written
    name = getattr(func, "__name__", "")
    if name in _WRITE_DUNDERS or (name.endswith("_") and not name.endswith("__") and name not in _NOT_WRITES):
        return "first"  # Tensor.relu_, torch.relu_, copy_, index_put_, x[...] = v
    try:  # torch.nn.functional.relu(input, inplace=False), dropout(..., inplace), hardtanh, ...
        params = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") if "inplace" in params else None


def _written(func, args: tuple, kwargs: dict, rule: Union[None, str, int, tuple]) -> list:
    """The arguments a torch call is about to write into (``rule``: ``_rule(func)``)."""
    out = []
    if isinstance(rule, _Writes):
        out.extend(rule(args, kwargs))
        writes = False
    elif isinstance(rule, tuple):  # an aten operator: the arguments its schema marks as written
        for i, name in rule:
            arg = args[i] if i < len(args) else kwargs.get(name)
            if arg is not None:
                out.extend(arg if isinstance(arg, (list, tuple)) else (arg,))
        writes = False
    elif isinstance(rule, int):
        flag = kwargs.get("inplace", args[rule] if len(args) > rule else False)
        writes = flag is not None and flag is not False and not isinstance(flag, torch.Tensor) and bool(flag)  # True, 1, np.True_
    else:
        writes = rule == "first"
    if writes:  # a list for the _foreach_ ops an optimizer step uses
        first = args[0] if args else kwargs.get("input", kwargs.get("self"))  # torch.relu_(input=x)
        if first is not None:
            out.extend(first if isinstance(first, (list, tuple)) else (first,))
    target = kwargs.get("out") if kwargs else None
    if target is not None:
        out.extend(target if isinstance(target, (tuple, list)) else (target,))
    return out


class WriteGuard(TorchFunctionMode):
    """Calls ``core._before_write(tensor)`` for every tensor a torch call is about to write into."""

    def __init__(self, core):
        super().__init__()
        self.core = core

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Every torch call of the forward comes through here (about a hundred in a ResNet-20 forward), so
        # the common case, a call that writes nothing and has no ``out=``, is one dict lookup.
        core = self.core
        if core._watch:
            try:
                rule = _RULES[func]
            except (KeyError, TypeError):
                rule = _rule(func)
            if rule is not None or kwargs:
                for t in _written(func, args, kwargs or {}, rule):
                    core._before_write(t)
        return func(*args, **kwargs) if kwargs else func(*args)
