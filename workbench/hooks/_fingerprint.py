"""Fingerprints of what a harvest was asked for: the model, the data stream and every setting.

A store records them in its manifest, so ``resume=True`` can refuse to continue with anything else
(a mixed-model store, a shuffled loader, another ``reduce=``). They are device-independent: a model or
a batch hashes the same on the GPU and the CPU. Hashes are BLAKE2b from ``hashlib`` (no dependency;
about 0.65 GB/s here, so fingerprinting a model costs ~1.5 s per GB of weights, once per harvest call).
"""
from __future__ import annotations

import hashlib
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
    return {"class": f"{cls.__module__}.{cls.__qualname__}",
            "architecture": hashlib.blake2b(arch.encode(), digest_size=8).hexdigest(),
            "dtype": ",".join(sorted(dtypes)) or "none",
            "mode": "train" if model.training else "eval",
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


def callable_id(fn: Optional[Callable]) -> Optional[str]:
    """A name for a ``reduce=`` or ``forward=`` option: strings as they are, callables by qualified name and code."""
    if fn is None or isinstance(fn, str):
        return fn
    code = getattr(fn, "__code__", None)
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    if code is None:
        return name
    body = hashlib.blake2b(code.co_code + repr(code.co_consts).encode(), digest_size=6).hexdigest()
    return f"{name}#{body}"


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
