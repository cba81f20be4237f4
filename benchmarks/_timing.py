"""The one timing loop every benchmark uses: variants interleaved per repetition, wall and CPU clocks.

Import it as ``from benchmarks._timing import timed`` (the scripts put the repository root first on
``sys.path``; this folder is a namespace package). Why both clocks: this machine has 2 cores shared with
other users' jobs, so a wall clock of a compute-bound call mostly measures the scheduler; the process's
CPU time (user + system, page faults included) measures the work. Work overlapped on a background thread
(harvest's writes) only shows on the wall clock. Each caller says which clock it judges on.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Optional

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(variants: dict[str, Callable[[], object]], reps: int, warmup: int = 2,
          device: torch.device = torch.device("cpu"), after: Optional[Callable[[], None]] = None) -> dict:
    """``{variant: {"wall": [s, ...], "cpu": [s, ...]}}``: ``warmup`` untimed calls of each, then ``reps``
    repetitions, each running every variant once in an order rotated from one repetition to the next (a
    burst of load hits all of them). ``after()``, untimed, follows every call (cleaning up files)."""
    after = after or (lambda: None)
    for fn in variants.values():
        for _ in range(warmup):
            fn()
            after()
    synchronize(device)
    keys, out = list(variants), {k: {"wall": [], "cpu": []} for k in variants}
    for r in range(reps):
        gc.collect()
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
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
