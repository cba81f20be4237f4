"""verify's site check of one activation in one pass: ‖h' − (F·h + c)‖², ‖h' − h‖², ‖h‖², ‖F·h + c‖².

``F`` is a scaled permutation acting on one axis (what every graph site's element is at its hook points,
except a dense one's), ``c`` an offset along that axis (the affine extension's, after the nonlinearity).

Why a compiled loop (measured on this project's 2-core AMD EPYC, one thread, verify of the benchmark's
CNN-26 at batch 32, 25 observed activations, 11.7M values): torch computes ``F·h`` into new memory
(``index_select`` and a product, 10.5 ms, every result held until the new model produced its
counterpart), then two differences and four norms (26 ms): about ten passes over memory per activation,
against a forward of 35 ms. The loop below reads ``h'`` and ``h`` once, gathers ``h``'s channels as it
goes, accumulates in float64 and writes nothing: about 9 ms with every value cold in memory, less where
``h'`` was just written by its module. No well-kept library fuses a gather into several norms;
torch's kernels stay the fallback (``verify`` uses them wherever this does not apply), and the two
agree to float32 rounding (tests/test_verify_kernel.py).

numba is optional (as for :mod:`._kernels`): without it, with ``WORKBENCH_NUMBA=0``, or for anything
not covered here (not on the CPU, not float32/float64, not contiguous, too small to repay the call),
:func:`fused_sums` returns None.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .._numba import compiled, give_up
from ..groups import ScaledPermutation
from ._kernels import _checked_index

_state: dict = {"kernel": None, "tried": False}

# Below this many values torch's kernels run (a few tens of µs each, against ~10 µs for a call into the loop:
# the loop pays from a few thousand values on, and tiny checks stay bitwise what they were).
MIN_NUMEL = 4096


def _kernel():
    return compiled(_state, "kernel", f"{__package__}._verify_kernel_numba", lambda m: m.sums,
                    "verify compares activations with torch's kernels")


class OnePass:
    """The compiled check of one observed activation, prepared before the new model runs (the element's
    permutation, scale and offset as float64 NumPy arrays, the activation's ``[A, n, K]`` view), so that its
    hook only checks the new activation and calls the loop."""

    __slots__ = ("move", "perm", "scale", "shift", "shape", "dtype")

    def __init__(self, move, perm, scale, shift, shape, dtype):
        self.move, self.perm, self.scale, self.shift, self.shape, self.dtype = move, perm, scale, shift, shape, dtype

    def sums(self, h_new: torch.Tensor, h: torch.Tensor) -> Optional[list]:
        """``[‖h' − F·h − c‖, ‖h' − h‖, ‖h‖, ‖F·h + c‖]``, or None where the loop does not apply to ``h_new``
        (another shape, dtype or device, not contiguous: the caller then follows ``move`` with torch)."""
        kernel = _state["kernel"]
        if (kernel is None or h_new.dtype != self.dtype or h_new.device.type != "cpu" or not h_new.is_contiguous()
                or h_new.numel() != h.numel() or h_new.shape != h.shape):
            return None
        out = np.empty(4)
        try:
            kernel(h_new.detach().view(self.shape).numpy(), h.detach().view(self.shape).numpy(), self.perm,
                   self.scale, self.shift, out)
        except Exception as exc:  # noqa: BLE001 — a numba/llvmlite that cannot compile the loop: torch's kernels
            give_up(_state, "kernel", "verify's compiled check", exc, "verify compares activations with torch's kernels")
            return None
        return [math.sqrt(v) if v >= 0 else v for v in out.tolist()]  # a NaN stays NaN (math.sqrt would raise)


def one_pass(move, h: torch.Tensor, *, small: bool = False, memo: Optional[dict] = None) -> Optional[OnePass]:
    """The compiled check of ``move`` (a :class:`~._backend.Move`) on activations like ``h``, or None where it
    does not apply (no numba, not a scaled permutation, not float32/float64 on the CPU, not contiguous, too
    small to repay the call: ``small=True``, for tests, takes any size). ``memo``: a dict shared by the calls
    of one verify, so the element of a site seen at three hook points is converted once (keyed on its
    tensors' identities, which the moves hold alive meanwhile)."""
    F, view = move.F, tuple(move.view)
    if not isinstance(F, ScaledPermutation) or not view:
        return None
    d, n = move.axis % len(view), F.n
    if (h.device.type != "cpu" or h.dtype not in (torch.float32, torch.float64) or not h.is_contiguous()
            or (not small and h.numel() < MIN_NUMEL) or view[d] != n or math.prod(view) != h.numel()
            or (move.offset is not None and move.offset_axis % len(view) != d)):
        return None
    if _kernel() is None:
        return None
    key = (id(F.perm), id(F.scale), id(move.offset))
    arrays = memo.get(key) if memo is not None else None
    if arrays is None:
        arrays = _arrays(F, move.offset, n)
        if memo is not None:
            memo[key] = arrays
    if arrays is False:
        return None
    perm, scale, shift = arrays
    A = math.prod(view[:d])
    return OnePass(move, perm, scale, shift, (A, n, h.numel() // max(A * n, 1)), h.dtype)


def _arrays(F, offset, n: int):
    """(perm, scale, offset) as the loop reads them, or False where they are not ``n`` valid entries (an
    index outside [0, n) would be read unchecked; torch's gather, which then runs, raises for it)."""
    perm = _checked_index(F.perm, n)
    if perm is None or perm is False:
        return False
    scale = np.ones(n) if F.scale is None else F.scale.detach().to("cpu", torch.float64).contiguous().numpy()
    shift = np.zeros(n) if offset is None else offset.detach().to("cpu", torch.float64).contiguous().reshape(-1).numpy()
    return (perm, scale, shift) if scale.shape == (n,) and shift.shape == (n,) else False
