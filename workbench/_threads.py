"""Running small tensor work on fewer torch threads, and work behind the main thread."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Optional

import torch


@contextmanager
def threads(n: int = 1):
    """Run the block with ``n`` torch threads (restored after).

    Small ops — a 64×64 QR or inverse, sampling a group element, a bias — on two threads wait at a
    barrier for the other thread, which on a shared, busy machine is often descheduled: a 64×64
    float64 QR took 18 ms on two threads and 0.2 ms on one; a 256×256 one 0.48 s instead of 0.02 s.
    """
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def in_parallel(calls: list[Callable[[], None]], costs: Optional[list[float]] = None) -> None:
    """Run ``calls`` on as many Python threads as torch has threads, each on one torch thread, the
    costliest first (by ``costs``).

    For many independent products of different sizes (pushing a transform into every weight of a
    model): torch releases the GIL inside its kernels, so one thread's Python between products and
    its memory-bound copies run while the other computes, where a two-thread GEMM leaves a core idle
    at each of them. Measured on GPT-2-small-shaped weights, two single-threaded products at once
    reached 141-187 GFLOP/s where one two-threaded product at a time reached 116-158.
    An exception in a call (or an interrupt) cancels the calls not yet started and is raised here.
    """
    n = min(torch.get_num_threads(), len(calls))
    order = sorted(range(len(calls)), key=lambda i: -costs[i]) if costs is not None else range(len(calls))
    if n < 2:
        for i in order:
            calls[i]()
        return
    from concurrent.futures import ThreadPoolExecutor

    with threads(1):
        pool = ThreadPoolExecutor(n, thread_name_prefix="workbench")
        try:
            for future in [pool.submit(calls[i]) for i in order]:
                future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class WriteBehind:
    """Runs calls one at a time on one background thread, with at most one call in flight.

    ``submit(fn)`` first waits for the previous call (raising its exception here, on the caller's
    thread), then starts ``fn``: the caller prepares the next piece of work while the last one runs,
    and memory holds at most two pieces. Used by ``harvest`` to write a chunk to disk while the model
    computes the next batches: file writes, ``fsync`` and ``zlib.crc32`` release the GIL.
    ``close()`` waits for the call in flight (also on an error or interrupt of the caller, so a
    chunk is never left half-written by us) and stops the thread.
    """

    def __init__(self, name: str = "workbench-writer"):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._future = None

    def submit(self, fn: Callable[[], None]) -> None:
        self.wait()
        self._future = self._pool.submit(fn)

    def wait(self) -> None:
        """Wait for the call in flight; raise what it raised."""
        future, self._future = self._future, None
        if future is not None:
            future.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
