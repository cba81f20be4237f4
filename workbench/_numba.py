"""The one way workbench loads its optional compiled loops (numba, the ``fast`` extra).

Three places run a compiled loop with a torch fallback that gives the same result: a transform's
gather-and-scale (symmetry/_kernels.py), verify's one-pass site check (symmetry/_verify_kernel.py) and the
Haar draws' reflections (groups/_haar.py). Each keeps a ``state`` dict ``{key: loop or None, "tried": bool}`` of its
own (tests replace it to force a path); this module fills it once, lazily (importing numba costs ~0.3 s,
paid only by the first caller that needs it), and turns it off for good after a failure, with one
message in the log. ``WORKBENCH_NUMBA=0`` turns every compiled loop off.
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Any, Callable

log = logging.getLogger(__name__)


def compiled(state: dict, key: str, module: str, pick: Callable[[Any], Any], uses: str) -> Any:
    """``state[key]``, filled on the first call with ``pick(module)`` (``module`` imported by its full name), or
    None without numba, with ``WORKBENCH_NUMBA=0``, or where the import fails (logged: ``uses`` says what runs
    instead, e.g. "transforms use torch's gathers")."""
    if not state["tried"]:
        state["tried"] = True
        if os.environ.get("WORKBENCH_NUMBA", "1") != "0":
            try:
                state[key] = pick(importlib.import_module(module))
            except ImportError:
                log.debug("numba is not installed: %s", uses)
            except Exception as exc:  # noqa: BLE001 — a numba that does not import (a NumPy it does not support)
                log.warning("numba did not import (%s: %s); %s", type(exc).__name__, exc, uses)
    return state[key]


def give_up(state: dict, key: str, what: str, exc: BaseException, uses: str) -> None:
    """``what`` failed with ``exc`` (a numba/llvmlite that cannot compile or run it): off for the rest of the
    process, said once in the log."""
    log.warning("%s failed (%s: %s); %s from now on", what, type(exc).__name__, exc, uses)
    state[key] = None
