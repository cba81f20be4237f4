"""Work done once per call of a verb (``one_call``): what a transform reads of one model for its map and again
for its push (the canonical views, the structure check of a Hugging Face model). Its own module because both
``_layout`` and ``_hf`` use it and ``_layout`` reads ``_hf``.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Optional


# What was computed so far in this call (``one_call``): {(what, id(model)): (model, value)}, or None outside one.
# Never kept across calls: a view is a view of that object's tensors as they are now, and a parameter a
# user replaces between two calls (``p.data = ...``, a new ``nn.Parameter``) would leave it stale.
_CALL_VIEWS: ContextVar[Optional[dict]] = ContextVar("workbench_canonical_views_this_call", default=None)


@contextmanager
def one_call():
    """Within it, ``_layout.canonical_views`` of one model object is computed once (a transform reads it for the
    map and again for the push: ~4 ms each for a 40M-parameter Hugging Face model), and so is each
    :func:`per_call` value (the structure check of a Hugging Face model, ``_hf.unsupported``). Only for code
    that replaces no parameter or module of the models it reads inside (writing into them is fine: the views
    see it)."""
    token = _CALL_VIEWS.set({})
    try:
        yield
    finally:
        _CALL_VIEWS.reset(token)


def per_call(model: object, what: str, compute):
    """``compute()`` (a function of ``model``'s structure or weights, or of another object's: a Hugging Face
    config) once per object and ``what`` inside :func:`one_call`; every time outside one."""
    memo = _CALL_VIEWS.get()
    if memo is None:
        return compute()
    hit = memo.get((what, id(model)))
    if hit is None or hit[0] is not model:
        hit = memo[(what, id(model))] = (model, compute())
    return hit[1]
