"""Fingerprints of what a harvest was asked for: the model, the data stream and every setting.

A store records them in its manifest, so ``resume=True`` can refuse to continue with anything else
(a mixed-model store, a shuffled loader, another ``reduce=``). They are device-independent: a model or
a batch hashes the same on the GPU and the CPU. Hashes are BLAKE2b from ``hashlib`` (no dependency;
about 0.65 GB/s here, so fingerprinting a model costs ~1.5 s per GB of weights, once per harvest call).
"""
from __future__ import annotations

import functools
import hashlib
from types import CodeType, ModuleType
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from .._offload import offloaded_tensor

#: elements hashed per batch after the first (evenly strided; the first batch is hashed in full)
SAMPLE = 16384


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type == "meta" or t.is_sparse:
        return memoryview(b"")
    # As raw bytes, so bfloat16 and other dtypes NumPy lacks hash too.
    return memoryview(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())


def model_fingerprint(model: nn.Module) -> dict:
    """``{"class", "architecture", "dtype", "mode", "parameters"}`` of a model.

    ``mode`` is ``"train"`` or ``"eval"``, followed by the sub-modules in the other mode, if any.
    ``parameters`` hashes every parameter and buffer (name, dtype, shape and bytes); ``architecture``
    hashes every module's path, class and ``extra_repr`` (so a Tanh swapped for a ReLU shows even
    with identical weights).
    """
    h = hashlib.blake2b(digest_size=16)
    dtypes = set()
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            h.update(f"{kind} {name} {t.dtype} {tuple(t.shape)};".encode())
            h.update(_tensor_bytes(offloaded_tensor(model, name, t)))  # accelerate-offloaded: its stored value
            dtypes.add(str(t.dtype).replace("torch.", ""))
    arch = "\n".join(f"{n}: {type(m).__module__}.{type(m).__qualname__}({m.extra_repr()})"
                     for n, m in model.named_modules())
    cls = type(model)
    # model.eval() then one sub-module's .train() (a BatchNorm using batch statistics) computes otherwise:
    # the modules in the other mode are named after the model's own.
    mode = "train" if model.training else "eval"
    other = [n for n, m in model.named_modules() if m.training != model.training]
    if other:
        mode += f" ({'eval' if model.training else 'train'}: {', '.join(other)})"
    return {"class": f"{cls.__module__}.{cls.__qualname__}",
            "architecture": hashlib.blake2b(arch.encode(), digest_size=8).hexdigest(),
            "dtype": ",".join(sorted(dtypes)) or "none",
            "mode": mode,
            "parameters": h.hexdigest()}


def batch_digest(batch: Any, full: bool = False) -> str:
    """A hash of one batch (tensors, arrays, numbers, strings and containers of them).

    ``full=False`` hashes each tensor's dtype and shape and up to :data:`SAMPLE` evenly strided
    elements (cheap even for large batches on a GPU); ``full=True`` hashes every byte.
    """
    h = hashlib.blake2b(digest_size=8 if not full else 16)
    _feed(h, batch, full)
    return h.hexdigest()


def _feed(h, obj: Any, full: bool) -> None:
    if isinstance(obj, torch.Tensor):
        h.update(f"T{obj.dtype}{tuple(obj.shape)};".encode())
        flat = obj.detach().reshape(-1)
        if not full and flat.numel() > SAMPLE:
            flat = flat[torch.arange(SAMPLE, device=flat.device) * (flat.numel() // SAMPLE)]
        h.update(_tensor_bytes(flat))
    elif isinstance(obj, np.ndarray):
        _feed(h, torch.from_numpy(np.ascontiguousarray(obj)) if obj.dtype != object else obj.tolist(), full)
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _feed(h, obj[k], full)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for item in obj:
            _feed(h, item, full)
        h.update(b"]")
    elif obj is None or isinstance(obj, (str, bytes, int, float, bool, complex)):
        h.update(repr(obj).encode())
    else:  # an object we cannot look into: its type only (documented as a limit)
        h.update(f"<{type(obj).__module__}.{type(obj).__qualname__}>".encode())


def callable_id(fn: Optional[Callable], _depth: int = 0) -> Optional[str]:
    """A name for a ``reduce=`` or ``forward=`` option: strings as they are, callables by qualified name and code,
    plus what the code reads besides its argument (so two callables that compute differently get two names).

    That is: a function's defaults, the values its closure holds, the plain values (numbers, strings,
    tensors, arrays, other functions) of the module globals it names, and the object a method is bound to;
    a ``functools.partial``'s function and arguments; a callable object's attributes (a module's weights).
    A lambda closing over ``k`` in ``lambda out: out[:, k]`` is one name per ``k``. The code of nested
    functions and comprehensions is hashed by its bytes, never by its address, so a name is the same in
    every process. Objects this cannot look into count by their type.
    """
    if fn is None or isinstance(fn, str):
        return fn
    if isinstance(fn, functools.partial):
        return (f"functools.partial({callable_id(fn.func, _depth + 1)})#"
                + _hash(_value_text((fn.args, fn.keywords), _depth)))
    code = getattr(fn, "__code__", None)
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    if code is None:  # a builtin (nothing more to read) or a callable object (its attributes)
        state = fn if isinstance(fn, nn.Module) else getattr(fn, "__dict__", None)
        return name if not state else f"{name}#{_hash(_value_text(state, _depth))}"
    body = hashlib.blake2b(code.co_code + _consts_text(code.co_consts).encode(), digest_size=6).hexdigest()
    reads = {}
    if getattr(fn, "__defaults__", None) or getattr(fn, "__kwdefaults__", None):
        reads["defaults"] = (fn.__defaults__, fn.__kwdefaults__)
    if getattr(fn, "__closure__", None):
        reads["closure"] = dict(zip(code.co_freevars, (_cell(c) for c in fn.__closure__)))
    scope = getattr(fn, "__globals__", {})
    named = {n: scope[n] for n in sorted(_names(code)) if n in scope and not isinstance(scope[n], (type, ModuleType))}
    if named:
        reads["globals"] = named
    if getattr(fn, "__self__", None) is not None and not isinstance(fn.__self__, ModuleType):
        reads["self"] = fn.__self__
    return f"{name}#{body}" + (f"+{_hash(_value_text(reads, _depth))}" if reads else "")


def _hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def _cell(cell) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not yet filled
        return "<empty cell>"


def _names(code) -> set:
    """Global names ``code`` and the code nested in it read."""
    out = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, CodeType):
            out |= _names(c)
    return out


def _consts_text(consts: tuple) -> str:
    """``repr(consts)``, but nested code (functions, comprehensions) by its bytes instead of its address
    and frozensets sorted (their order follows string hashing, which differs between processes)."""
    def plain(c) -> bool:
        return not isinstance(c, (CodeType, frozenset)) and (not isinstance(c, tuple) or all(map(plain, c)))

    def text(c) -> str:
        if isinstance(c, CodeType):
            return f"<code {c.co_code.hex()} {_consts_text(c.co_consts)}>"
        if isinstance(c, frozenset):
            return "frozenset({" + ", ".join(sorted(map(text, c))) + "})"
        if isinstance(c, tuple):
            return "(" + "".join(text(x) + ", " for x in c) + ")"
        return repr(c)
    return repr(consts) if plain(consts) else text(consts)  # (plain: as earlier stores recorded it)


def _value_text(v: Any, depth: int) -> str:
    """A process-independent text of a value a callable reads (its type only past a few levels of nesting)."""
    if v is None or isinstance(v, (bool, int, float, complex, str, bytes)):
        return repr(v)
    if isinstance(v, (torch.Tensor, np.ndarray)):
        return "tensor " + batch_digest(v, full=True)
    if isinstance(v, (type, ModuleType)):
        return f"{type(v).__name__} {getattr(v, '__module__', '')}.{getattr(v, '__qualname__', v.__name__)}"
    if depth > 3:
        return f"<{type(v).__module__}.{type(v).__qualname__}>"
    if isinstance(v, nn.Module):
        return "module " + repr(sorted(model_fingerprint(v).items()))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value_text(x, depth + 1) for x in v) + "]"
    if isinstance(v, (set, frozenset)):
        return "{" + ", ".join(sorted(_value_text(x, depth + 1) for x in v)) + "}"
    if isinstance(v, dict):
        return "{" + ", ".join(sorted(f"{_value_text(k, depth + 1)}: {_value_text(x, depth + 1)}"
                                      for k, x in v.items())) + "}"
    if callable(v) and not isinstance(v, type):
        return "callable " + str(callable_id(v, depth + 1))
    if isinstance(getattr(v, "__dict__", None), dict):
        return f"<{type(v).__module__}.{type(v).__qualname__} {_value_text(vars(v), depth + 1)}>"
    return f"<{type(v).__module__}.{type(v).__qualname__}>"


def differences(stored: dict, now: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(field, stored value, current value)`` for every leaf of two nested dicts that differs."""
    out = []
    for key in sorted(set(stored) | set(now)):
        a, b = stored.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out
