"""Keeping freed memory for reuse, so that holding activations does not cost a page fault per 4 KiB.

Why (measured, benchmarks/results/performance.md): capturing every activation of ResNet-20 at batch
128 holds 288 MiB. With glibc's default settings that memory is returned to the kernel when the cache
is dropped (``free`` trims the heap top above 2× the mmap threshold, at most 64 MiB) and faulted in
again, page by page and zeroed, by the next capture: 64,000 minor faults and 0.13 s of system time
per capture against 0.18 s for the forward itself. Hand-written hooks pay the same. Raising glibc's
trim threshold keeps that memory in the process for the next capture, as PyTorch's caching
allocator does on a GPU (and as jemalloc or tcmalloc do on a CPU); the mmap threshold at its
largest (32 MiB on 64-bit) puts tensors up to that size on the heap, where freed memory is reused.

This is a process-wide setting, applied once, on Linux with glibc only, by the first capture,
harvest or verify of the process. It is not a leak: the memory is reused by any later allocation,
and :func:`release_memory` hands it back to the kernel. ``WORKBENCH_KEEP_FREED_MEMORY=0`` opts out.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Optional

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc refuses more on 64-bit (HEAP_MAX_SIZE / 2)
_TRIM_THRESHOLD_MAX = 2**30  # at most this much freed memory at the heap top stays in the process

_state: dict = {"applied": None}


def _libc() -> Optional[ctypes.CDLL]:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Keep memory freed by a capture in the process for the next one (once per process; see the module
    docstring). Returns whether the setting is in effect."""
    if _state["applied"] is not None:
        return _state["applied"]
    ok = False
    if os.environ.get("WORKBENCH_KEEP_FREED_MEMORY", "1") != "0":
        libc = _libc()
        if libc is not None:
            try:
                pages = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            except (ValueError, OSError):
                pages = 16 * _TRIM_THRESHOLD_MAX
            trim = int(min(_TRIM_THRESHOLD_MAX, pages // 16))
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim))
    _state["applied"] = ok
    return ok


def release_memory() -> bool:
    """Hand memory the process keeps for reuse back to the kernel (glibc's ``malloc_trim``); True if any was."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
