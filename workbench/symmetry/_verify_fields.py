"""``wb.verify``'s judgement of the other fields the models return beside their outputs (a loss, a mixture's
``aux_loss``, a model's own field: ``_backend.other_outputs``), and their words in the report's rule.

Each field is judged beside the outputs, never instead of them: it once replaced them where it disagreed, and a float64
Mixtral whose router row was scaled by 1 + 1e-3 (log-probabilities 1.5e-3 away, aux_loss 1.5e-5, computed in the test)
PASSed on aux_loss alone at the tolerance its logits' floor raised (4e-5), the logits never compared
(tests/test_verify_adversary4.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._verify_floor import _Comparison

#: units of its own dtype's rounding (relative) a returned field computed in a coarser dtype than the model may differ by
ULPS = 8


class Fields:
    """The fields ``also`` (``(old, new, what)``) compared at the outputs' tolerance ``tol`` (``tolerance``: the user's,
    which binds every field as given)."""

    def __init__(self, also: list, run_dtype: torch.dtype, tol: float, tolerance: Optional[float]):
        self.names = [what for _, _, what in also]
        self.judged_at_own = tolerance is None
        self.failing, self.coarse = [], []  # (comparison, what, its own tolerance) of each field beyond its own tolerance
        for old_f, new_f, what in also:
            cmp_f = _Comparison(old_f, new_f, False, run_dtype)
            # a field computed in a coarser dtype than the model's agrees to a few of its own units of rounding at best
            # (Hugging Face's aux_loss sums in float32 in a float64 model: 6e-8 apart on an exact transform, a FAIL at
            # 1e-10); beyond that it is judged at the tolerance the outputs' floor raises where larger (not at float32's
            # 1e-5: a router row of a float64 Mixtral scaled by 1 + 1e-4 moved aux_loss by 1.2e-6 and nothing else)
            own = tol if tolerance is not None else max([tol] + [ULPS * torch.finfo(f.dtype).eps for f in (old_f, new_f)
                                                                 if f.is_floating_point()])
            if cmp_f.max_rel > own or not cmp_f.finite:
                self.failing.append((cmp_f, what, own))
            elif own > tol:
                self.coarse.append(f"{what} ({str(old_f.dtype).replace('torch.', '')}) within {own:.1e}")

    def beyond(self, t: float) -> list:
        """The fields that fail at the outputs' tolerance ``t`` (or their own, where larger): (comparison, what, tol)."""
        return [(c, what, max(own, t)) for c, what, own in self.failing if not c.finite or not c.max_rel <= max(own, t)]

    def rule(self) -> str:
        """How the fields are compared, for the report's rule ('' where the models return none)."""
        if not self.names:
            return ""
        text = (f"; the other fields the models return ({', '.join(self.names)}), each element-wise: |new − old| ≤ tol·s "
                f"with s = max |old| over its column (a single number: |old|)")
        if self.judged_at_own:
            text += f", tol the outputs' or {ULPS} units of the field's own dtype's rounding, where larger"
        if self.coarse:
            text += f"; computed in a coarser dtype than the model's, {', '.join(self.coarse)}"
        return text


def beyond_text(beyond: list) -> str:
    """``beyond`` (:meth:`Fields.beyond`) in words: "aux_loss changed by 7.0e-04 relative (tolerance 9.5e-07)"."""
    return ", ".join(f"{what} {'is not finite' if not c.finite else f'changed by {c.max_rel:.2e} relative'} "
                     f"(tolerance {t:.1e})" for c, what, t in beyond)
