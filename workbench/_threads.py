"""Running small tensor work on fewer torch threads."""
from __future__ import annotations

from contextlib import contextmanager

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
