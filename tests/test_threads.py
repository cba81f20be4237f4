"""The one thread helper: ``in_parallel`` runs every call once, propagates a failure and stops."""
import threading
import time

import pytest
import torch

from workbench._threads import in_parallel, threads


def test_in_parallel_runs_each_call_once_on_one_torch_thread_and_restores_the_count():
    before = torch.get_num_threads()
    seen, lock = [], threading.Lock()

    def call(i):
        with lock:
            seen.append((i, torch.get_num_threads()))

    in_parallel([lambda i=i: call(i) for i in range(7)], costs=[1, 5, 2, 7, 3, 6, 4])
    assert sorted(i for i, _ in seen) == list(range(7))
    if before > 1:
        assert {n for _, n in seen} == {1}
    assert torch.get_num_threads() == before


def test_in_parallel_raises_the_failure_and_cancels_what_had_not_started():
    started = []

    def ok(i):
        started.append(i)
        time.sleep(0.05)

    def bad():
        raise ValueError("weight 3 is broken")

    calls = [bad] + [lambda i=i: ok(i) for i in range(30)]
    with threads(2):
        with pytest.raises(ValueError, match="weight 3 is broken"):
            in_parallel(calls)
        assert torch.get_num_threads() == 2
    assert len(started) < 30  # the queue was dropped, not drained
