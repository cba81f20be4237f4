"""Forwards a workbench verb runs on a user's model for its own purposes, which an open ``wb.capture`` on that model
must not record: the symmetry map's one-example run (a ``[1, ...]`` batch the user never passed) landed in the
cache of a capture open around ``random_intertwiner``. The captures open when such a forward starts are paused for
its length; captures a verb opens inside it record as usual. Here, below every package, because the forwards are
run in ``models`` and the captures live in ``hooks``.

Capture hooks ask :func:`paused` on every call, and ``torch.compile`` traces into hooks: there, looking the
capture's ``id()`` up broke dynamo ("___get_torch_function_mode_stack_at is not defined", tests/test_capture_adversary.py's
compiled models), so the set is tested for emptiness first (the case outside internal forwards), which dynamo takes
as a constant. The set is a module global: a verb's internal forward on one thread pauses the open captures for
every thread for its length.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager

_OPEN: "weakref.WeakSet" = weakref.WeakSet()  # captures attached now (hooks._capture_core registers them)
_PAUSED: frozenset = frozenset()  # ids of the captures paused now


def opened(capture) -> None:
    _OPEN.add(capture)


def closed(capture) -> None:
    _OPEN.discard(capture)


def paused(capture) -> bool:
    """Whether ``capture`` was open when the internal forward running now began."""
    return bool(_PAUSED) and id(capture) in _PAUSED


@contextmanager
def internal_forward():
    """Within it, captures open now record nothing."""
    global _PAUSED
    before = _PAUSED
    _PAUSED = before | frozenset(id(c) for c in _OPEN)
    try:
        yield
    finally:
        _PAUSED = before
