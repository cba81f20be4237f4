"""verify's comparison of outputs, and the rounding floor of a float32 model it may be judged against.

The floor is measured, never assumed: a deep float32 model's own rounding can exceed the dtype's
tolerance, and an exact transform must not FAIL for it (see ``_verify``'s float32 branch for the rule).
It is first measured on the batch's worst rows, on a float32 and a float64 copy of the model that are
made once and reused while the model is unchanged (:func:`_copies`: checked on every call, values
included, never assumed from a version counter, which a write through ``.data`` does not move).
"""
from __future__ import annotations

import copy
import math
import weakref
from typing import Optional

import torch
from torch import nn

from ..hooks import first_tensor, run_with_cache
from ..models import eval_mode
from ._backend import relative_changes


class _Comparison:
    """Outputs compared element by element: |new − old| against a scale per output unit.

    ``old``/``new``: ``[rows, ...]``. The scale of an element is the largest |old| in its output unit
    (a column of ``[rows, units]``; with ``per_row``, a row of log-probabilities), never below
    eps(dtype)·max|old| so a unit that is ~0 everywhere does not divide by zero. One output unit a
    million times larger than the rest therefore no longer hides a change in the others.
    """

    def __init__(self, old: torch.Tensor, new: torch.Tensor, per_row: bool, dtype: torch.dtype,
                 scale: Optional[torch.Tensor] = None):
        """``scale``: the scale per unit of another comparison of more rows (instead of ``old``'s own)."""
        self.shape = tuple(old.shape)
        # float32 is exact enough to judge a 1e-5 tolerance and halves the memory of a decoder's
        # [positions, vocabulary] log-probabilities; float64 outputs stay float64.
        work = torch.float64 if torch.float64 in (old.dtype, new.dtype, dtype) else torch.float32
        self.old, self.new = _rows(old).to(work), _rows(new).to(work)
        diff = (self.new - self.old).abs()
        self.finite = bool(torch.isfinite(diff).all())
        ref = self.old
        if not self.finite:  # equal non-finite values agree; any other non-finite difference is infinite
            same = (self.old == self.new) | (self.old.isnan() & self.new.isnan())
            diff = torch.where(same, torch.zeros_like(diff), torch.nan_to_num(diff, nan=math.inf, posinf=math.inf))
            self.finite = bool(torch.isfinite(diff).all())
            ref = torch.nan_to_num(self.old, nan=0.0, posinf=0.0, neginf=0.0)
        dim = 1 if per_row else 0
        lo, hi = torch.aminmax(ref, dim=dim, keepdim=True) if ref.numel() else (ref, ref)
        mag = torch.maximum(lo.abs(), hi.abs())  # the largest |old| of each unit, without an |old| copy
        top = mag.max().item() if mag.numel() else 0.0
        self.zero = top == 0.0  # every output of the original is 0: comparing outputs checks nothing
        floor = max(torch.finfo(dtype).eps * top, torch.finfo(work).tiny)
        self.scale = mag.clamp_min(floor) if scale is None else scale.to(device=diff.device, dtype=work)
        self.max_abs = diff.max().item() if diff.numel() else 0.0
        self.rel = diff.div_(self.scale)
        self.max_rel = self.rel.max().item() if self.rel.numel() else 0.0
        self.classifier = len(self.shape) == 2 and self.shape[1] > 1

    def worst(self, units: Optional[torch.Tensor] = None) -> Optional[dict]:
        """The element with the largest relative difference; with ``units`` (each output unit's own tolerance), the
        one furthest beyond its unit's tolerance."""
        if not self.rel.numel():
            return None
        ratio = self.rel if units is None else self.rel / units
        flat = int(torch.nan_to_num(ratio, nan=math.inf).flatten().argmax())
        i, j = divmod(flat, self.rel.shape[1])
        index = tuple(int(k) for k in torch.unravel_index(torch.tensor(flat), self.shape)) if self.shape else ()
        return {"index": index, "old": self.old[i, j].item(), "new": self.new[i, j].item(),
                "scale": self.scale[0 if self.scale.shape[0] == 1 else i, 0 if self.scale.shape[1] == 1 else j].item(),
                "relative": self.rel[i, j].item()}

    def top1(self, tol: float, units: Optional[torch.Tensor] = None) -> tuple[int, float]:
        """(rows whose top-1 differs beyond a float tie, agreement). A row is a tie when the original's gap
        between the two classes is within the tolerance of both: old[a] − old[b] ≤ tol·(s_a + s_b) (with
        ``units``, each class's own tolerance instead of ``tol``)."""
        a, b = self.old.argmax(1), self.new.argmax(1)
        rows = torch.arange(len(a))
        differ = a != b
        s = self.scale.expand_as(self.old)
        if units is not None:
            s = s * units.to(s.device).expand_as(self.old)
            tol = 1.0
        gap = self.old[rows, a] - self.old[rows, b]
        tie = gap <= tol * (s[rows, a] + s[rows, b])
        return int((differ & ~tie).sum()), (~differ).double().mean().item()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[rows, units]``: the first axis is the batch (a 0-d or 1-d output is one unit per row)."""
    if x.ndim == 0:
        return x.reshape(1, 1)
    return x.reshape(x.shape[0], -1)


#: how far the float32 copy's outputs on the rows alone may be from the batch's outputs for them, in units of the
#: rows' floor, for that floor to stand for the batch's. Not 1: a batch of two rows may run other kernels than the
#: whole batch (ResNet-18 at 8x3x64x64: the two evaluations 4.8e-6 apart against a floor of 3.3e-6, each correctly
#: rounded), and two evaluations each within the floor of the exact value can be up to twice it apart; refusing
#: them sent the floor to the whole batch's float64 forward (5x a verify's cost). A row-mixing model's rows alone
#: are another function by orders of magnitude more (a batch mean: 7e-3 against 1e-5, tested), and anything within
#: 2x the floor is within the tolerance (10x it) anyway.
ALONE_SLACK = 2

#: rows of the batch the own-rounding floor is measured on first: the comparison's worst rows, where an exact
#: transform's rounding shows most. Two, not one: a batch of one row runs other kernels, which round otherwise.
#: On the benchmark's CNN-26 (4 seeds, batches of 8 and 32) two such rows gave 0.75-1.0 of the whole batch's floor.
FLOOR_ROWS = 2


def _floor_rows(backend, cmp: "_Comparison", inputs, per_row: bool) -> Optional[torch.Tensor]:
    """The FLOOR_ROWS rows of the batch whose outputs differ most (relative), sorted; None where the whole
    batch is measured: a small batch (cheap anyway), outputs that are not one row per input row, a per-row
    rule (a decoder's positions), outputs that are not finite, a transformer (its clone is no deepcopy)."""
    n = len(inputs) if isinstance(inputs, torch.Tensor) and inputs.ndim >= 1 else 0
    if backend.name != "graph" or per_row or not cmp.finite or n <= 2 * FLOOR_ROWS or cmp.rel.shape[0] != n:
        return None
    return cmp.rel.amax(1).topk(FLOOR_ROWS).indices.sort().values


def _fails(cmp: "_Comparison", checks: list, tol: float, last: Optional[str],
           units: Optional[torch.Tensor] = None, site_tols: Optional[list] = None) -> bool:
    """Whether the verdict at tolerance ``tol`` is FAIL on the comparison (outputs, sites, top-1); with ``units``
    (:func:`unit_tolerances`), an output unit beyond its own tolerance fails too; with ``site_tols``
    (:func:`site_tolerances`), each site is judged against its own tolerance instead of ``tol``."""
    site_tols = [tol] * len(checks) if site_tols is None else site_tols
    if cmp.max_rel > tol or any(c.equivariance_error > t for c, t in zip(checks, site_tols)):
        return True
    if units is not None and beyond_units(cmp, units):
        return True
    return bool(cmp.classifier and not last and cmp.top1(tol, units)[0])


def unit_tolerances(unit_floor: Optional[torch.Tensor], tol: float) -> Optional[torch.Tensor]:
    """Each output unit's tolerance where the model's own rounding raised it: 10× that unit's own rounding (its float32
    outputs against its float64 copy's, relative to the unit's scale), never below the dtype's ``tol``. One global
    raise let a single ill-conditioned unit carry all others: an output computed as the difference of two hidden
    units of ~30 (one unit, ~1e-4, rounding 4% of itself) raised the tolerance to 0.4, and a 30% change of another
    unit passed. None: no per-unit floor (the rule's single tolerance holds)."""
    return None if unit_floor is None else (10 * unit_floor).clamp_min(tol)


def site_tolerances(sites: list, hooks: dict, tol: float, bound: float) -> list:
    """Each site's tolerance where the model's own rounding raised it: 10× the largest rounding of the site's own
    observed activations (float32 against the float64 copy, relative), never below the dtype's ``tol``; ``bound`` (the
    single raised tolerance) where a site's activations were not measured. One global raise let one ill-conditioned
    output unit carry every site: the float32 MLP of tests/test_verify_adversary2.py (an output the difference of two
    near-twin hidden units) raised it to 8e-2, and its hidden units, moved by 1.2 of their norm, read "moved at 0/1
    sites" (moved means > 100× the tolerance), and a claimed element 10% off one unit's scale read equivariant.
    ``hooks`` empty (a floor of the outputs alone, no activation measured): every site at ``tol``."""
    out = []
    for s in sites:
        seen = [hooks[(o.name, o.call)] for o in s.observed if (o.name, o.call) in hooks]
        out.append(max(tol, 10 * max(seen)) if seen else tol if not hooks else bound)
    return out


def beyond_units(cmp: "_Comparison", units: torch.Tensor) -> int:
    """The output units (columns, or rows under a per-row rule) with an element beyond the unit's own tolerance."""
    over = torch.nan_to_num(cmp.rel, nan=math.inf) > units.to(cmp.rel.device)
    return int(over.any(0 if units.shape[0] == 1 else 1).sum())


def _own_rounding(backend, model, smap, inputs, raw_out, cache, names, dtype, rows: Optional[torch.Tensor] = None,
                  cmp: Optional["_Comparison"] = None, reference: Optional[torch.Tensor] = None, choose=None
                  ) -> Optional[tuple[float, float, Optional[torch.Tensor], dict]]:
    """How far ``model``'s own low-precision evaluation is from its float64 copy's: the largest relative
    output difference (same rule as the comparison), the largest relative change of a watched
    activation, each output unit's largest relative difference (``[1, units]``, or ``[rows, 1]`` under a
    per-row rule), and each watched activation's (``{(name, call): change}``, :func:`site_tolerances`). None when
    the model cannot be copied to float64.

    ``rows``: measure on those rows of the batch only (both models run on them), against the whole batch's
    output scales (``cmp.scale``, so a row's floor is what the comparison divides by). None too when the
    model's float32 outputs on those rows alone differ from its outputs for them in the whole batch by more
    than ALONE_SLACK times that floor: some op mixes rows (e.g. a batch statistic), and the rows alone are
    another function.

    ``raw_out``/``cache`` None (the new model, whose float32 activations verify compared as they were made and
    did not keep): the whole batch runs again on a same-dtype copy first. ``reference``: this model's compared
    float32 outputs on the whole batch (``cmp.new`` for the new model; ``cmp.old`` by default).

    ``choose(copy, run)``: runs a whole-batch copy's forward (``run()``) making the discrete choices ``model`` made
    (a mixture's routers, ``_verify_routing``): the floor is then the rounding of one function, not the difference of
    two experts a copy chose otherwise at a near tie. The rows' sub-batch runs are not given it (other token indices):
    verify measures a routed model on the whole batch (its rule is per row)."""
    reference = cmp.old if reference is None and cmp is not None else reference
    recalled = None
    if rows is not None:
        # The rows alone run on a float32 copy, not on the caller's model (a stateful module — a counter, a
        # cache — would see one more forward), and on a float64 copy (both from _copies). Anything going
        # wrong here (a model that needs its batch size) leaves the measurement to the whole batch.
        try:
            low, exact, outputs = _copies(model)
            inputs = inputs[rows.to(inputs.device)]
            recalled = None if names else _recall(outputs, inputs)
            if recalled is not None:
                raw_out, out64 = recalled
                cache = None
            else:
                with eval_mode(low), torch.no_grad():
                    raw_out, cache = (run_with_cache(low, inputs, names=names, budget=None, device=None, reduce=first_tensor) if names
                                      else (low(inputs), None))
                raw_out = backend.output(raw_out).detach()
        except Exception:  # noqa: BLE001 (see above: the whole batch's measurement follows)
            return None
    else:
        try:
            if raw_out is None:
                exact = backend.clone(model, dtype)
                with eval_mode(exact), torch.no_grad():
                    raw_out, cache = _chosen(choose, exact, lambda: (
                        run_with_cache(exact, inputs, names=names, budget=None, device=None, reduce=first_tensor) if names
                        else (exact(inputs), None)))
                raw_out = backend.output(raw_out).detach()
                model = exact
            exact = backend.clone(model, torch.float64)
        except (RuntimeError, TypeError):  # a model that cannot be deep-copied or cast keeps the dtype's tolerance
            return None
    if recalled is None:
        inputs64 = inputs.to(torch.float64) if isinstance(inputs, torch.Tensor) and inputs.is_floating_point() else inputs
        with eval_mode(exact), torch.no_grad():
            out64, cache64 = _chosen(choose if rows is None else None, exact, lambda: (
                run_with_cache(exact, inputs64, names=names, budget=None, device=None, reduce=first_tensor) if names
                else (exact(inputs64), None)))
        out64 = backend.output(out64)
        if rows is not None and not names:
            _remember(outputs, inputs, raw_out, out64)
    else:
        cache64 = None
    ref, _, _, per_row, _ = backend.compared(model, smap, None, raw_out, raw_out, cache, cache)
    ref64, _, _, _, _ = backend.compared(exact, smap, None, out64.detach(), out64.detach(), cache64, cache64)
    scale = None if rows is None else cmp.scale
    rounding = _Comparison(ref64, ref.to(torch.float64), per_row, dtype, scale=scale)
    out_floor = rounding.max_rel
    if rows is not None:
        alone = _Comparison(reference[rows.to(reference.device)], ref, per_row, dtype, scale=scale).max_rel
        if not alone <= ALONE_SLACK * out_floor:  # (a NaN too)
            return None
    # each output unit's own rounding (a column's over the rows measured; a row's under a per-row rule), and each
    # watched activation's
    units = rounding.rel.amax(1 if per_row else 0, keepdim=True) if rounding.rel.numel() else None
    hooks = relative_changes(cache64, cache, names or [])
    return out_floor, max(hooks.values(), default=0.0), units, hooks


def _chosen(choose, copy_, run):
    """``run()``, through ``choose(copy_, run)`` where given (see ``_own_rounding``)."""
    return run() if choose is None else choose(copy_, run)


#: a model whose parameters and buffers take more than this many bytes has its copies made afresh each time
#: instead of kept (a float32 and a float64 copy hold three times the model)
COPIES_MAX_BYTES = 256 * 2**20
#: id(model) -> (weak reference, structure, copies, versions, outputs): the last two models' (a verify measures
#: the original's floor and, where that does not carry the verdict, the new model's)
_COPIES: dict = {}
_COPIES_KEPT = 2
#: samples of input rows whose outputs (both copies') are kept with the copies, and the most bytes their inputs
#: may take together (the oldest go first): 16 samples of FLOOR_ROWS rows cover most rows of a batch of 32
OUTPUTS_KEPT = 16
OUTPUTS_MAX_BYTES = 16 * 2**20


def _copies(model: nn.Module) -> tuple[nn.Module, nn.Module, list]:
    """A copy of ``model`` in its own dtype and one in float64, for the worst rows' floor, and the outputs both
    computed on rows seen before (:func:`_recall`), kept with them and dropped with them.

    Two deep copies cost more than the rows' float32 forward on a small CNN (3.4 ms of verify's 20 ms floor
    on the benchmark's CNN-26), so the last model's are kept and reused while it is the same object with the
    same structure, the same hooks and plain attributes (:func:`_structure`), and the same values: each
    parameter and buffer is compared with its copy's (``torch.equal``: a version counter would miss a write
    through ``.data``), and the float64 copy's tensors must still be at the versions they were made at (a
    forward that updates a buffer). What none of this sees (a list attribute edited in place, a global hook)
    cannot carry a stale floor either: the rows' floor is used only when the float32 copy's outputs on the
    rows agree with the caller's model's within that floor (``_own_rounding``), else the whole batch is
    measured on fresh copies."""
    entry = _COPIES.pop(id(model), None)
    key = _structure(model)
    if entry is not None:
        ref, old_key, low, high, versions, outputs = entry
        if (ref() is model and old_key == key and _same_values(model, low)
                and [t._version for t in _tensors(high)] == versions):
            _COPIES[id(model)] = entry  # the most recently used last
            return low, high, outputs
    low = copy.deepcopy(model)
    high = copy.deepcopy(low).to(torch.float64)
    outputs: list = []
    if sum(t.numel() * t.element_size() for t in _tensors(model)) <= COPIES_MAX_BYTES:
        while len(_COPIES) >= _COPIES_KEPT:
            _COPIES.pop(next(iter(_COPIES)))
        ident = id(model)
        # dropped with the model (an id is reused after it dies: the callback removes only its own entry)
        forget = lambda ref: _COPIES.pop(ident) if ident in _COPIES and _COPIES[ident][0] is ref else None  # noqa: E731
        _COPIES[ident] = (weakref.ref(model, forget), key, low, high, [t._version for t in _tensors(high)], outputs)
    return low, high, outputs


# The rows' two forwards (the float32 copy's and the float64 copy's outputs) are most of the rows' floor (11.5 of
# verify's ~105 ms on the benchmark's CNN-26 at batch 32, the float64 one 7.6 ms: CPUs have no fast float64
# convolution, and it already runs near a core's float64 peak). They are a function of the copies and each row's
# input only, so they are kept with the copies, row by row, and recalled when the same copies (checked as above)
# see an input row equal to one seen before (torch.equal, same dtype, row shape and device): a verify repeated on
# the same models and batch, and also another transform on them, whose worst rows differ from call to call but are
# drawn from the same batch (on CNN-26, 33 transforms chose 33 different pairs out of 22 rows). Only when every row
# is found: then each row's two outputs come from the same earlier sample (both copies ran on the same rows), so
# each row's float32-against-float64 difference is the rounding of one function, as when computed now; a row's
# float32 output with float64 output of another sample would not be (a model that mixes rows computes another
# function in each company, and their difference would pass for a floor: tested). Where a row is missing, both
# copies run on all rows again. The floor is judged as before: against this call's outputs and scales, and refused
# when the float32 copy's outputs on the rows disagree with the caller's model's beyond it (the safety net that also
# catches a stale copy, a row that its earlier company made round otherwise, and a model that mixes rows). Only
# the outputs' floor is kept (the sites' stage, which also needs every watched activation of both copies, computes
# afresh); the thread count is part of the key, since a kernel may round differently with another.
def _recall(outputs: list, inputs) -> Optional[tuple]:
    """(float32 copy's outputs, float64 copy's outputs) on ``inputs``, each row's pair from one earlier sample with an
    equal row; None unless every row is found."""
    if not isinstance(inputs, torch.Tensor) or inputs.ndim < 1:
        return None
    threads = torch.get_num_threads()
    entries = [(seen, raw_out, out64) for seen, n, raw_out, out64 in outputs
               if n == threads and seen.dtype == inputs.dtype and seen.shape[1:] == inputs.shape[1:]
               and seen.device == inputs.device]
    found = []
    for row in inputs:
        pair = next(((raw_out[j], out64[j]) for seen, raw_out, out64 in entries for j in range(len(seen))
                     if torch.equal(seen[j], row)), None)
        if pair is None:
            return None
        found.append(pair)
    return torch.stack([f[0] for f in found]), torch.stack([f[1] for f in found])


def _remember(outputs: list, inputs, raw_out, out64) -> None:
    if not (isinstance(inputs, torch.Tensor) and isinstance(raw_out, torch.Tensor) and isinstance(out64, torch.Tensor)
            and inputs.ndim >= 1 and raw_out.ndim >= 1 and len(raw_out) == len(out64) == len(inputs)):
        return  # only outputs with one row per input row can be recalled row by row
    outputs.append((inputs.detach().clone(), torch.get_num_threads(), raw_out.detach(), out64.detach()))
    while len(outputs) > OUTPUTS_KEPT or (len(outputs) > 1 and sum(e[0].numel() * e[0].element_size()
                                                                   for e in outputs) > OUTPUTS_MAX_BYTES):
        outputs.pop(0)


def _tensors(model: nn.Module) -> list:
    return [t for m in model.modules() for d in (m._parameters, m._buffers) for t in d.values() if t is not None]


_PLAIN = (bool, int, float, str, bytes, type(None))


def _structure(model: nn.Module) -> list:
    """Each module's identity, class, children, parameter and buffer names and identities, hooks, and plain
    attributes (``eps``, ``stride``, ``inplace``, ``training``, a counter; anything else by identity)."""
    def value(v):
        if isinstance(v, _PLAIN) or (isinstance(v, tuple) and all(isinstance(x, _PLAIN) for x in v)):
            return v
        return ("id", id(v))

    key = []
    for m in model.modules():
        d = m.__dict__
        attrs = tuple((k, value(v)) for k, v in d.items()
                      if k not in ("_parameters", "_buffers", "_modules") and not k.endswith("hooks"))
        hooks = tuple((k, tuple(v)) for k, v in d.items() if k.endswith("hooks") and isinstance(v, dict))
        key.append((id(m), type(m), attrs, hooks,
                    tuple((k, id(c)) for k, c in d.get("_modules", {}).items()),
                    tuple((k, id(t)) for k, t in d.get("_parameters", {}).items()),
                    tuple((k, id(t)) for k, t in d.get("_buffers", {}).items())))
    return key


def _same_values(model: nn.Module, low: nn.Module) -> bool:
    a, b = _tensors(model), _tensors(low)
    return len(a) == len(b) and all(x.shape == y.shape and x.dtype == y.dtype and x.device == y.device
                                    and torch.equal(x, y) for x, y in zip(a, b))


def trivial_floor(backend, model: nn.Module, inputs, cache, last: Optional[str]):
    """For a transformer where no part known to compute in float32 can be named (a bridge whose hooks see float64
    values while the attention inside computes q·kᵀ in float32: GPT-J's, GPT-Neo's): the change that an exact and
    trivial symmetry makes through the model's own arithmetic, every query map ·c and key map ÷c (c = 1.3, which
    changes no score), as ``(outputs, each watched activation's relative change)`` like ``backend.floor``. Activations
    it scales (the queries and keys) are left out of the activations'. None without QK sites that take c·I. Where the arithmetic is exact the change is ~1e-16
    and raises nothing."""
    from ..groups import Dense
    from ._map import symmetry_map
    from ._transform import Transform, apply_transform

    c = 1.3
    qk = [s for s in symmetry_map(model) if ".qk." in s.name]
    scales = {s.n: Dense(c * torch.eye(s.n, dtype=torch.float64), cond=1.0) for s in qk}
    qk = [s for s in qk if s.group.contains(scales[s.n])]  # (behind q/k norms, Qwen3's, only orthogonal maps pass)
    if not qk:
        return None
    t = Transform({s.name: scales[s.n] for s in qk}, {s.name: s.group.name for s in qk}, model=type(model).__name__)
    scaled = apply_transform(model, t)
    moved = {o.name for s in qk for o in s.observed}
    watched = [n for n in (cache.keys() if cache is not None else []) if n not in moved]
    with eval_mode(scaled), torch.no_grad():
        out, rcache = (run_with_cache(scaled, inputs, names=watched, budget=None, reduce=first_tensor) if watched
                       else (scaled(inputs), None))
    rounded = rcache[last].flatten(0, -2) if last else backend.scores(model, backend.output(out).detach())[0]
    return rounded, relative_changes(cache, rcache, watched)
