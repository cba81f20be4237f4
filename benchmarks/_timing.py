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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(variants: dict[str, Callable[[], object]], reps: int, warmup: int = 2,
          device: torch.device = torch.device("cpu"), after: Optional[Callable[[], None]] = None) -> dict:
    """``{variant: {"wall": [s, ...], "cpu": [s, ...]}}``: ``warmup`` untimed calls of each, then ``reps``
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
    keys, out = list(variants), {k: {"wall": [], "cpu": []} for k in variants}
    order = random.Random(0)
    for _ in range(reps):
        gc.collect()
        order.shuffle(keys)
        for k in keys:
            w0, c0 = time.perf_counter(), time.process_time()
            variants[k]()
            synchronize(device)
            out[k]["wall"].append(time.perf_counter() - w0)
            out[k]["cpu"].append(time.process_time() - c0)
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
