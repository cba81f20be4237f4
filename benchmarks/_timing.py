"""The one timing loop every benchmark uses: variants interleaved per repetition, wall and CPU clocks.

Import it as ``from benchmarks._timing import timed`` (the scripts put the repository root first on
``sys.path``; this folder is a namespace package). Why both clocks: this machine has 2 cores shared with
other users' jobs, so a wall clock of a compute-bound call mostly measures the scheduler; the process's
CPU time (user + system, page faults included) measures the work. Work overlapped on a background thread
(harvest's writes) only shows on the wall clock. Each caller says which clock it judges on.
"""
from __future__ import annotations

import gc
import random
import resource
import statistics
import time
from typing import Callable, Optional

import torch


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def machine_line(*packages: str) -> str:
    """This machine and the versions a results page states: CPUs, torch threads, Python, torch, NumPy and each of
    ``packages`` (importable names, e.g. "scipy", "sklearn"), and workbench."""
    import os
    import platform

    import numpy as np

    import workbench as wb

    extra = "".join(f", {name} {__import__(name).__version__}" for name in packages)
    return (f"{os.cpu_count()} CPUs ({cpu_name()}), torch threads {torch.get_num_threads()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}{extra}, workbench {wb.__version__}")


# glibc's mallopt parameter (malloc.h): how many allocations mmap may serve at once; 0 serves all from the heap
_M_MMAP_MAX = -4


def reuse_freed_memory() -> bool:
    """Serve every allocation of this process from glibc's heap and keep what is freed there, so that a call which
    allocates what an earlier call freed takes no page fault: workbench's own setting (``_memory.keep_freed_memory``,
    which a capture, harvest, verify or transform applies) plus no ``mmap`` at all. True where it is in effect
    (Linux with glibc).

    Why a benchmark sets it: glibc's largest mmap threshold is 32 MiB, so a larger tensor (a 32,000 × 512 float32
    embedding is 62.5 MiB) is mapped afresh by every call that makes one and unmapped when it is freed, and each
    call faults it in again page by page. What that costs depends on the host (transparent huge pages ``always``
    fault in 2 MiB pages, ``madvise`` in 4 KiB ones: GPT-2's embedding then costs 16,000 faults and about 20 ms on
    this project's machine, where its deepcopy takes 18 ms without them), and which calls pay it depended on the
    heap's layout: measured 2026-12-04 on one model in one process, ``random_intertwiner`` over ``copy.deepcopy``
    read 2.4 when both paid it and 3.9 when neither did. With this setting neither does, on any host; the faults
    per call are recorded (``timed``'s ``faults``) to show it, and :func:`release_freed_memory` gives the other
    regime, every call on fresh memory."""
    from workbench._memory import _libc, keep_freed_memory

    libc = _libc()
    return bool(keep_freed_memory() and libc is not None and libc.mallopt(_M_MMAP_MAX, 0))


def release_freed_memory() -> None:
    """Collect garbage and hand every freed page back to the kernel (glibc's ``malloc_trim``): the next call starts
    on fresh memory, as a process's first call does. Use as ``timed``'s ``after``."""
    from workbench._memory import release_memory

    gc.collect()
    release_memory()


def _faults() -> int:
    """Minor page faults of this process so far (memory the kernel had to map in)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(variants: dict[str, Callable[[], object]], reps: int, warmup: int = 2,
          device: torch.device = torch.device("cpu"), after: Optional[Callable[[], None]] = None) -> dict:
    """``{variant: {"wall": [s, ...], "cpu": [s, ...], "faults": [n, ...]}}`` (``faults``: minor page faults during
    the call): ``warmup`` untimed calls of each, then ``reps``
    repetitions, each running every variant once (a burst of load hits all of them), in an order shuffled
    anew each repetition by a generator seeded with 0. ``after()``, untimed, follows every call (cleaning up
    files).

    Why shuffled: what a call leaves in the caches is what the next one starts with. The rotated order used
    before (abc, bca, cab) keeps every variant behind the same neighbour in every repetition, so the bias a
    neighbour leaves was systematic and a minimum could not remove it: measured on the 5.3M-parameter MLP
    (21 MB, inside this CPU's 32 MB L3), ``random_intertwiner`` always ran right after a ``copy.deepcopy``
    whose 21 MB of new writes had evicted part of the model, while the deepcopy ran after a call that had
    just read the model and stored its output past the cache. Shuffled, each variant follows each other
    one in some repetitions; the seed keeps a run's order reproducible."""
    after = after or (lambda: None)
    for fn in variants.values():
        for _ in range(warmup):
            fn()
            after()
    synchronize(device)
    keys, out = list(variants), {k: {"wall": [], "cpu": [], "faults": []} for k in variants}
    order = random.Random(0)
    for _ in range(reps):
        gc.collect()
        order.shuffle(keys)
        for k in keys:
            f0, w0, c0 = _faults(), time.perf_counter(), time.process_time()
            variants[k]()
            synchronize(device)
            out[k]["wall"].append(time.perf_counter() - w0)
            out[k]["cpu"].append(time.process_time() - c0)
            out[k]["faults"].append(_faults() - f0)
            after()
    return out


def ratio(t: dict, base: dict, clock: str) -> tuple[float, float]:
    """(minimum over minimum, median of the per-repetition ratios) of ``t`` against ``base`` on ``clock``."""
    a, b = t[clock], base[clock]
    return min(a) / min(b), statistics.median(x / y for x, y in zip(a, b))


def matmul_seconds(dtype: torch.dtype, n: int = 768, rows: int = 16384, reps: int = 3, paired: bool = False) -> float:
    """Seconds per FLOP of [rows, n] @ [n, n] in ``dtype`` (min time of ``reps``); ``paired``: two such
    products at once, each single-threaded on its own Python thread (``in_parallel``)."""
    from workbench._threads import in_parallel

    a, b = torch.randn(rows, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        if paired:
            in_parallel([lambda: a @ b, lambda: a @ b])
        else:
            a @ b
        best = min(best, time.perf_counter() - t0)
    return best / (2 * rows * n * n * (2 if paired else 1))
