"""``wb.verify``: is the function unchanged, and did the representation move as the group says?

Its report (``InvarianceReport``, ``SiteCheck``) is in ``_verify_report.py``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional

import torch
from torch import nn

from .._errors import InvalidOptionError, UnknownNameError
from .._offload import offloaded_modules
from .._progress import ProgressLike, progress_bar
from ..hooks import first_tensor, run_with_cache, watch
from ..models import eval_mode, has_layout, no_grad_analysis, refuse_unrunnable
from ._backend import Move, backend_for
from ._map import symmetry_map
from ._sites import Site
from ._transform import Transform, apply_transform
from ._verify_floor import (FLOOR_ROWS, _chosen, _Comparison, _fails, _floor_rows, _own_rounding, beyond_units,
                            site_tolerances, trivial_floor, unit_tolerances)
from ._verify_kernel import OnePass, one_pass
from ._verify_fields import Fields, beyond_text
from ._verify_report import InvarianceReport, SiteCheck, rows_text
from . import _verify_routing as routing

# Relative tolerances by dtype: what an exact symmetry achieves with random weights, with margin.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def tolerance_for(dtype: torch.dtype) -> float:
    return TOLERANCES.get(dtype, 1e-5)


@no_grad_analysis
def verify(model: nn.Module, new_model: nn.Module, inputs: torch.Tensor, transform: Optional[Transform] = None,
           dtype: Optional[torch.dtype] = None, *, tolerance: Optional[float] = None,
           progress: ProgressLike = None) -> InvarianceReport:
    """Compare ``model`` and ``new_model`` on ``inputs``: outputs, and per site the representation.

    Both models run in eval mode, which is restored afterwards; neither is modified. Outputs are
    compared element by element, each against a scale of its own output unit (a plain model's
    output column, a decoder's position: see the report's ``rule``), and a classifier's top-1 must
    agree on every row except float ties. With ``transform``, every observable hook point of every
    transformed site is checked for equivariance ‖h' − F h‖/‖h‖ (F = the site's element at that
    level, φ(M) after the nonlinearity) and for how far it moved, ‖h' − h‖/‖h‖; the sites come from
    the map of ``model`` traced on the first example of ``inputs``. Without a transform, or when no
    site could be checked, the verdict is ``"NOT CHECKED"``, never ``"PASS"``.
    ``dtype=torch.float64`` re-applies ``transform`` to a float64 copy of ``model`` for an exactness
    check; ``new_model`` must then be what ``transform`` makes of ``model`` (its weights are compared with the
    transform's replay, and a new model edited after the draw, or made by another transform, is refused). The
    tolerance comes from the dtype.

    TransformerLens decoders are compared by log-probabilities (logits may shift by a constant),
    with the mean KL divergence and top-1 agreement over all positions; ``inputs`` are tokens.

    ``progress``: a bar of the steps (the float64 copy, the symmetry map, each model's forward, each
    site checked): True, False, or None (the default) for a bar in a Jupyter notebook only. Nothing
    records an autograd graph (``torch.no_grad()``).
    """
    steps = 2 + (dtype is not None) + (0 if transform is None else 1 + len(transform.elements))
    with progress_bar(total=steps, desc="verify", unit="step", progress=progress) as bar:
        return _verify(model, new_model, inputs, transform, dtype, tolerance, bar)


# A float64 model's float32 parts round its outputs by 1e-8 to 2e-6 relative (GPT-Neo's q·kᵀ the most, measured); a
# "floor" above this is not rounding but a measuring copy that computes something else (a trivial symmetry applied to
# a model rebuilt from a configuration edited after building moved GPT-2's log-probabilities by 0.1, which became a
# tolerance of 1 and a PASS for a changed function). Such a measurement is not used.
_NOT_ROUNDING = 1e-4


def _verify(model, new_model, inputs, transform, dtype, tolerance, bar) -> InvarianceReport:
    if new_model is model:
        raise InvalidOptionError(
            f"verify was given the same {type(model).__name__} object as model and as new_model: it would compare the "
            f"model with itself (outputs equal whatever was done to it, and every transformed site reads 'not "
            f"equivariant': its activations did not move), a verdict about nothing. A transform applied in place "
            f"(apply_transform(..., inplace=True), or one's own code editing the model and returning it) leaves no "
            f"original: apply it to a copy (wb.apply_transform(model, transform) returns a new model) and verify "
            f"the original against that.")
    backend = backend_for(model)
    if isinstance(inputs, Mapping) and backend.name == "layout":  # (a Hugging Face model's forward took the dict as ids)
        raise InvalidOptionError(
            f"verify runs model(inputs) on one tensor (token ids, or a vision model's pixel values); it was given a "
            f"{type(inputs).__name__} of keyword arguments ({', '.join(map(str, list(inputs)[:4]))}). Pass the "
            f"input_ids (or pixel_values) tensor itself: an attention mask or other keyword inputs are not supported "
            f"(sequences of one length need none).")
    if dtype is not None and not isinstance(inputs, torch.Tensor):
        raise InvalidOptionError(
            f"verify(dtype={dtype}) casts the inputs to a {dtype} copy of the model's, which takes one tensor; it was "
            f"given {type(inputs).__name__}. Give a tensor (token ids: tokenize first), or verify in the model's own "
            f"dtype (dtype=None).")
    example = backend.example(inputs)
    if dtype is not None and offloaded_modules(model):
        own = {p.dtype for p in model.parameters() if p.is_floating_point()}  # (an offloaded meta parameter keeps it)
        advice = (f"The model is already {dtype}: dtype=None verifies in it." if own == {dtype} else
                  f"Verify in the model's own dtype (dtype=None), or load the model in {dtype} first.")
        raise InvalidOptionError(
            f"verify(dtype={dtype}) re-applies the transform to a {dtype} copy, which a model whose weights accelerate "
            f"offloaded ({offloaded_modules(model)[0][0]!r}, …) cannot give: its offloaded weights keep their stored "
            f"dtype. {advice}")
    if dtype is not None:
        bar.set_postfix_str(f"{str(dtype).replace('torch.', '')} copy")
        if transform is not None:
            _check_made_by(model, new_model, transform, example)
        model = backend.clone(model, dtype)
        inputs = inputs.to(dtype) if inputs.is_floating_point() else inputs
        example = backend.example(inputs)
        if transform is not None:
            new_model = apply_transform(model, transform, example=example)
        else:
            new_model = backend.clone(new_model, dtype)
        bar.update()
    for m, which in ((model, "model"), (new_model, "new_model")):  # the two it runs (a dtype= copy in place of each)
        refuse_unrunnable(m, which)
    run_dtype = _param_dtype(model)
    tol = tolerance if tolerance is not None else tolerance_for(run_dtype)
    if transform is not None:
        bar.set_postfix_str("symmetry map")
    sites, not_checked, smap = _sites(model, transform, example)
    if transform is not None:
        bar.update()
    extra = backend.output_names(model)
    last = extra[0] if extra else None
    names = sorted({o.name for s in sites for o in s.observed} | set(extra))
    # Nothing here needs gradients (no graph is recorded), and activations stay on the devices that computed
    # them (device=None): the checks run there, on a GPU or across the devices of a dispatched model.
    # A mixture of experts' routers: at a top-k tie within rounding the original is evaluated with the new model's
    # choice, and both run again (_verify_routing)
    routers = routing.routers_of(model) if transform is not None else []
    new_routers = routing.routers_of(new_model) if routers else []
    labels = routing.labels(backend, smap, transform, routers) if routers else {}
    force, routing_ties = {}, 0
    with eval_mode(model, new_model), torch.no_grad():
        for _ in range(1 + routing.MAX_ROUNDS):
            bar.set_postfix_str("model")
            # first_tensor: a Hugging Face layer may return (hidden_states, ...) — GPT-Neo's does — and its stream is the first
            with routing.Choices(routers, force) as old_choices:
                out, cache = (run_with_cache(model, inputs, names=names or None, budget=None, device=None, reduce=first_tensor)
                              if names else (model(inputs), None))
            bar.set_postfix_str("new model")
            # The new model's activations are compared with F·h as its modules produce them (``watch``), not
            # captured: nothing of it is copied before an in-place op or held, and each is compared while in cache.
            expected = _expected(backend, sites, transform, cache)
            measured: dict[tuple[str, int], torch.Tensor] = {}
            with watch(new_model, _measure(expected, cache, measured), reduce=first_tensor), \
                    routing.Choices(new_routers) as new_choices:
                new_out, new_cache = (run_with_cache(new_model, inputs, names=extra, budget=None, device=None, reduce=first_tensor) if extra
                                      else (new_model(inputs), None))
            more, found = routing.ties(old_choices.seen, new_choices.seen, labels, tol) if routers else ({}, 0)
            if not more:
                break
            force, routing_ties = routing.merged(force, more), routing_ties + found
        bar.update(2)
    also = backend.also_compared(model, out, new_out)  # (a ModelOutput's other fields, before its logits are taken)
    out, new_out = backend.output(out), backend.output(new_out)  # a Hugging Face model's logits
    for value, which in ((out, "model"), (new_out, "new_model")):
        if not isinstance(value, torch.Tensor):
            raise InvalidOptionError(f"verify compares tensor outputs; {which} returned {type(value).__name__}.")
    raw_out, raw_new = out.detach(), new_out.detach()
    out, new_out, compared, per_row, kl = backend.compared(model, smap, transform, raw_out, raw_new, cache, new_cache)
    cmp = _Comparison(out, new_out, per_row, run_dtype)
    head = backend.head_output(model, raw_out, raw_new, smap, transform, cache, new_cache) if last else None
    if head is not None:  # an encoder compared by its stream also answers for the head it returns (logits)
        cmp_head = _Comparison(head[0], head[1], True, run_dtype)
        if cmp_head.max_rel > tol or not cmp_head.finite:
            out, new_out, compared, per_row, cmp = head[0], head[1], head[2], True, cmp_head
    # what the float64 branch's rounded runs are measured against: the outputs as compared (a rounded run returns these)
    scored = (out, new_out, per_row)
    # Any other output the models return that must agree as it is (a loss, a pooler's output) is judged too, beside the
    # outputs, never instead of them (_verify_fields)
    fields = Fields(also, run_dtype, tol, tolerance)
    bar.set_postfix_str("sites")
    checks = _site_checks(sites, transform, expected, measured, bar)
    bar.update(max(0, bar.total - bar.n))  # sites that could not be checked (an untraceable model) are steps done
    floor, floored, units = None, None, None  # units: each output unit's own tolerance, where rounding raised them

    def above(t: float) -> bool:  # outputs or sites beyond tolerance t (top-1 aside: _fails adds it)
        return cmp.max_rel > t or any(c.equivariance_error > t for c in checks)

    strict_fail = above(tol) or bool(fields.failing)
    # A floor is the rounding of one function: where the model routes, every run that measures one makes the choices the
    # compared run made (a copy choosing another expert at a near tie measured the experts' difference: tolerance ~1)
    choose_old = routing.following(old_choices.seen) if routers else None
    choose_new = routing.following(new_choices.seen) if routers else None
    if tolerance is None and run_dtype == torch.float64 and strict_fail:
        # The parts named as computing in float32 first; where that floor does not carry the verdict (or none is
        # named) and the model is a transformer, the rounding of an exact, trivial symmetry through its arithmetic:
        # GPT-Neo's float32 q·kᵀ moves later activations more than rounding its attention's output does.
        # Last, the same trivial symmetry on the transformed model: it rounds more where its element left a float32 part
        # worse conditioned (a GL map A of a head's query/key space: q' = A·q and k' = A⁻ᵀ·k round with errors
        # ~ eps·|q'|·|k'|). GPT-Neo's exact transforms FAILed in 3 of 60 random models (2.75e-6 against a tolerance of
        # 7e-7 measured on the original) before it was measured.
        old_ref = cache[last].flatten(0, -2) if last else scored[0]  # the original's output, in its own basis
        # (the original's rounded run makes every choice the comparison's original made: its routing ties' too)
        measures = [(lambda: _chosen(choose_old, model, lambda: backend.floor(model, inputs, cache, last)), old_ref)]
        if has_layout(model):
            measures.append((lambda: trivial_floor(backend, model, inputs, cache, last), old_ref))
            measures.append((lambda: trivial_floor(backend, new_model, inputs, new_cache, last),
                             new_cache[last].flatten(0, -2) if last else scored[1]))
        # Each output unit is judged against its own rounding too, as in the float32 branch (unit_tolerances), never below
        # float32's tolerance (the precision of those parts): one ill-conditioned unit's floor carried every other unit,
        # a logit direction cancelling at one position of a float64 Llama raised the tolerance to 3e-4, and a token's
        # embedding changed by 1e-3, 5e-5 at its own position (its rounding 1e-7), PASSed (tests/test_verify_adversary3.py).
        # Each site likewise: one tolerance let a claimed GL element 1e-4 off one row (its site 3e-5 from the new model's
        # activations, 500× their rounding) read equivariant under that Llama's 3e-4 (tests/test_verify_adversary3.py).
        unit_floor, hooks = None, {}

        def own_sites() -> list:  # each site's tolerance: 10× its own activations' rounding, float32's at least, ≤ tol
            return ([min(tol, t) for t in site_tolerances(sites, hooks, tolerance_for(torch.float32), tol)] if hooks
                    else [tol] * len(checks))

        for measure, reference in measures:
            if not _fails(cmp, checks, tol, last, units, own_sites()) and not fields.beyond(tol):
                break
            floors = measure()
            if floors is None:
                continue
            rounded, changes = floors  # the rule: within 10× the floor measured for this model
            site_floor = max(changes.values(), default=0.0)
            rounding_of = _Comparison(reference, rounded, scored[2], run_dtype)
            rounding = rounding_of.max_rel
            if not rounding <= _NOT_ROUNDING or not site_floor <= _NOT_ROUNDING:
                continue  # the measuring copy computes something else than the model: that is no rounding floor
            floor = max(floor or 0.0, (rounded - reference).abs().max().item())
            tol = max(tol, 10 * rounding, 10 * site_floor)
            floored = "float32"
            for key, change in changes.items():
                hooks[key] = max(hooks.get(key, 0.0), change)
            if last is None and rounding_of.rel.numel():  # (a stream in the new basis: no units, as below)
                unit_own = rounding_of.rel.amax(1 if scored[2] else 0, keepdim=True)
                unit_floor = unit_own if unit_floor is None else torch.maximum(unit_floor, unit_own.to(unit_floor.device))
                units = unit_tolerances(unit_floor, tolerance_for(torch.float32))
        if floored:
            for check, own in zip(checks, own_sites()):
                check.tolerance = own
    elif tolerance is None and run_dtype != torch.float64 and strict_fail and not offloaded_modules(model):
        # A deep float32 model's own rounding can exceed the dtype's tolerance (a 7-layer CNN with BatchNorm
        # and a random P·D: 1.5e-5 against 1e-5), and an exact transform must not FAIL for it. The floor is
        # measured, not assumed: the model's float32 outputs against those of its float64 copy; the
        # tolerance becomes 10x that (two float32 evaluations, each off by about the floor, plus margin).
        # A transform that is not a symmetry changes outputs by orders of magnitude more (tested).
        # The float64 forward costs 3-4 float32 ones on a CPU (no float64 convolution kernels), so the floor is
        # first measured on the batch's worst rows only (FLOOR_ROWS): a verdict that passes on that floor is
        # final; one that still fails is judged again on the whole batch's floor, so a FAIL never rests on the
        # smaller sample (and a model that mixes rows never uses it: see _own_rounding).
        # The transformed model has its own rounding too, larger where a dense element leaves its weights worse
        # conditioned (an identity MLP with a GL element: 1.14e-5 against an original's floor under 1e-6):
        # when the original's floor does not carry the verdict, the new model's is measured the same way
        # (its float32 outputs against its own float64 copy's) and the larger one counts. A transform that is
        # not a symmetry computes another function in both precisions, so its own floor stays small (tested).
        # The rows are measured first without the watched activations (their capture and comparison cost
        # a fifth of the rows' floor on CNN-26): the floor of the outputs alone, with no site floor, can only
        # be lower, so a PASS on it is final; anything else is measured again with them.
        # Each output unit is judged against its own rounding (_verify_floor.unit_tolerances), the single raised
        # tolerance only bounding them all: an ill-conditioned unit's floor must not carry the others. Not where the
        # output is compared in the new basis (an encoder's stream: a dense element mixes the original's columns).
        rows = _floor_rows(backend, cmp, inputs, per_row)
        base = tol

        def units_of(f) -> Optional[torch.Tensor]:
            return unit_tolerances(f[2], base) if last is None else None

        def sites_of(f) -> list:  # each site's own tolerance (an output's rounding carries no site, nor a site another)
            return site_tolerances(sites, f[3], base, 10 * max(f[:2]))  # (the outputs' floor alone: each site's base)

        def fails(f) -> bool:
            t = 10 * max(f[:2])
            return _fails(cmp, checks, t, last, units_of(f), sites_of(f)) or bool(fields.beyond(max(t, base)))

        floors = None
        samples = ([(rows, False), (rows, True)] if rows is not None else []) + [(None, True)]
        for sample, with_sites in samples:
            if sample is not None and with_sites and rows is None:
                continue  # the rows alone were refused (a model that mixes rows): the whole batch
            measured_floor = _own_rounding(backend, model, smap, inputs, raw_out, cache, names if with_sites else None,
                                           run_dtype, rows=sample, cmp=cmp, choose=choose_old)
            if not with_sites:
                if measured_floor is None:
                    rows = None
                elif not fails(measured_floor):
                    floors = measured_floor
                    break
                continue
            if measured_floor is not None and fails(measured_floor):
                new_floor = _own_rounding(backend, new_model, smap, inputs, None, None, names, run_dtype,
                                          rows=sample, cmp=cmp, reference=cmp.new, choose=choose_new)
                if new_floor is not None:
                    measured_floor = _larger(measured_floor, new_floor)
            if measured_floor is None or (sample is not None and fails(measured_floor)):
                continue  # a PASS on the rows' floor is final; anything else is judged on the whole batch's
            floors, rows = measured_floor, sample
            break
        if floors is not None:
            out_floor, site_floor = floors[:2]
            floor = out_floor
            if 10 * max(out_floor, site_floor) > tol:  # the rule names a raise only when there was one
                tol, floored = 10 * max(out_floor, site_floor), ("own" if rows is None else "own-rows")
                units = units_of(floors)
                for check, own in zip(checks, sites_of(floors)):
                    check.tolerance = own
    # The report's headline: the outputs where they fail (the model's function changed: what a researcher asks first),
    # else the first other field that fails; every failing field is named (summary, rule). The rule and the rows are
    # the outputs' either way: a field heading the report was described as 'aux_loss on the 1 rows', column over rows.
    ties, top1 = cmp.top1(tol, units) if cmp.classifier and not last else (0, None)
    n_inputs = len(inputs) if isinstance(inputs, torch.Tensor) and inputs.ndim >= 1 else None
    unit_base = None if units is None else tolerance_for(torch.float32 if floored == "float32" else run_dtype)
    rows, zero = cmp.old.shape[0], cmp.zero  # (the outputs', whatever heads the report)
    rule = _rule(compared, per_row, tol, run_dtype, cmp.classifier and not last, floored, bool(routers), unit_base,
                 rows) + fields.rule()
    beyond = fields.beyond(tol)
    if beyond:
        outputs_fail = _fails(cmp, [], tol, last, units)
        rule += f"; {'also ' if outputs_fail else ''}beyond their tolerance: {beyond_text(beyond)}"
        if not outputs_fail:
            cmp, compared, units, ties, top1 = beyond[0][0], beyond[0][1], None, 0, None
    return InvarianceReport(cmp.max_abs, cmp.max_rel, top1, tol, str(run_dtype).replace("torch.", ""), checks,
                            compared, kl, floor, rule, cmp.worst(units), ties, not_checked, cmp.finite,
                            outputs_zero=zero, routing_ties=routing_ties,
                            units_beyond_rounding=beyond_units(cmp, units) if units is not None else 0,
                            inputs=n_inputs, rows=rows, fields_beyond=[(w, c.max_rel, t) for c, w, t in beyond])


def _check_made_by(model: nn.Module, new_model: nn.Module, transform: Transform, example) -> None:
    """``verify(dtype=...)`` judges ``transform`` re-applied to a copy of ``model`` in that dtype, never running
    ``new_model``: its verdict speaks for ``new_model`` only if ``new_model`` is what the transform makes of
    ``model``. Checked here on the weights: the transform replayed on ``model`` in its own dtype against
    ``new_model``'s tensors, name by name, to a few units of rounding (a replay gives the same bits). A new model
    edited after its transform was drawn, or made by another draw, is refused, naming the first tensor that
    differs."""
    replay = apply_transform(model, transform, example=example)
    want = replay.state_dict()
    got = new_model.state_dict()
    if set(want) != set(got):
        raise InvalidOptionError(
            f"verify(dtype=...): new_model is not what the transform makes of model: their tensors have different "
            f"names (only in new_model: {sorted(set(got) - set(want))[:3]}, only in the transform's replay: "
            f"{sorted(set(want) - set(got))[:3]}). verify(dtype=...) checks the transform re-applied to a copy of "
            f"model and never runs new_model; verify without dtype to compare new_model itself.")
    for name, a in want.items():
        b = got[name]
        if not (a.is_floating_point() and b.is_floating_point()):
            continue  # counters (a BatchNorm's num_batches_tracked) and masks: no part of the function in eval mode
        b = b.to(device=a.device, dtype=a.dtype)
        if a.shape != b.shape:
            differs = f"shape {tuple(b.shape)} where the replay has {tuple(a.shape)}"
        elif torch.equal(a, b):
            continue
        else:
            gap = (a.double() - b.double()).abs().max().item()
            peak = a.double().abs().max().item()
            if gap <= 8 * torch.finfo(a.dtype).eps * max(peak, torch.finfo(a.dtype).tiny):
                continue
            differs = f"values up to {gap:.3g} away from the replay's (largest |value| {peak:.3g})"
        raise InvalidOptionError(
            f"verify(dtype=...): new_model is not what the transform makes of model: its {name!r} has {differs} "
            f"(edited after the transform was drawn, or made by another transform?). verify(dtype=...) checks the "
            f"transform re-applied to a copy of model and never runs new_model, so its verdict would not be about "
            f"new_model; verify without dtype compares new_model itself, or pass the transform that made it.")


def _sites(model: nn.Module, transform: Optional[Transform], example) -> tuple[list[Site], list, object]:
    """The transform's sites in the map of ``model`` (traced on the user's own example), and (site,
    why) for those that cannot be checked."""
    if transform is None:
        return [], [], None
    smap = symmetry_map(model, example, affine=transform.affine)
    if smap.trace_error is not None:
        why = f"the model could not be traced on the inputs: {smap.trace_error}"
        return [], [(name, why) for name in transform.elements], smap
    sites = []
    for name in transform.elements:
        try:
            sites.append(smap[name])
        except UnknownNameError as exc:
            raise UnknownNameError(f"the transform names site {name!r}, which {type(model).__name__} does not have "
                                   f"(was the transform made for another model?): {exc}") from None
    return sites, [], smap


def _rule(compared: str, per_row: bool, tol: float, dtype: torch.dtype, classifier: bool,
          floored: Optional[str], routed: bool = False, unit_base: Optional[float] = None, rows: Optional[int] = None
          ) -> str:
    unit = (f"the row's (a position's or an input's {compared})" if per_row else "its output unit's (column over rows)")
    raised = {"float32": ", raised to 10× the float32 floor",
              "own": ", raised to 10× this model's own rounding: its outputs against its float64 copy's",
              "own-rows": f", raised to 10× this model's own rounding: its outputs against its float64 copy's on the "
                          f"batch's {FLOOR_ROWS} most different rows"}.get(floored, "")
    text = (f"{compared}{'' if rows is None else f' on the {rows_text(rows)} of the given inputs only'}, element-wise: "
            f"|new − old| ≤ tol·s with s = max |old| over {unit}, at least "
            f"eps·max|old|; tol = {tol:.1e} ({str(dtype).replace('torch.', '')}{raised})")
    if unit_base is not None:
        what = ("float32's tolerance, the precision of its float32 parts" if floored == "float32" else
                f"the {str(dtype).replace('torch.', '')} tolerance")
        text += (f"; each output unit also within 10× its own rounding (relative to s), or {what}, {unit_base:.0e}, "
                 f"where larger")
    if classifier:
        text += "; top-1 must agree on every row except float ties (old[a] − old[b] ≤ tol·(s_a + s_b))"
    if routed:
        text += ("; at a top-k expert tie within rounding (the token's router logits within 10·tol·s of the original's, "
                 "the swapped experts' logits within 2δ + 8·eps32·s) the original is evaluated with the new model's choice, and a "
                 "load-balancing loss's own top k of the returned logits likewise")
    text += "; each site: ‖h' − F·h‖ ≤ tol·max(‖h‖, ‖F·h‖) at every observed hook point"
    if floored in ("own", "own-rows"):
        text += (f", tol the site's own: 10× its activations' rounding, or the {str(dtype).replace('torch.', '')} "
                 f"tolerance {tolerance_for(dtype):.0e} where larger")
    elif floored == "float32":
        text += (f", tol the site's own: 10× its activations' rounding, or float32's tolerance "
                 f"{tolerance_for(torch.float32):.0e} where larger, at most tol")
    return text


def _larger(a: tuple, b: tuple) -> tuple:
    """Two floors' larger parts: the outputs', the sites', each output unit's and each watched activation's."""
    units = a[2] if b[2] is None else b[2] if a[2] is None else torch.maximum(a[2], b[2].to(a[2].device))
    hooks = {k: max(a[3].get(k, 0.0), b[3].get(k, 0.0)) for k in {**a[3], **b[3]}}
    return max(a[0], b[0]), max(a[1], b[1]), units, hooks


def _param_dtype(model: nn.Module) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.get_default_dtype()


def _expected(backend, sites: list[Site], transform: Optional[Transform], cache) -> dict[tuple[str, int], object]:
    """Where each observed activation of the new model must be: ``(name, call) -> F·h``, or the backend's
    recipe for it (a :class:`~._backend.Move`), which the comparison follows when the new activation
    exists, without holding a moved copy of every activation meanwhile.

    Where several sites move one hook (a head's QK map and the head permutation both move ``hook_q``), the
    expected activation applies every site's element in the transform's order (computed here). In the
    activations' own dtype: its rounding (~1e-7 in float32) is far below the dtype's tolerance.
    """
    moves: dict[tuple[str, int], list] = {}
    for s in sites:
        for o in s.observed:
            moves.setdefault((o.name, o.call), []).append((s, o))
    recipe = getattr(backend, "move", None)
    expected: dict[tuple[str, int], object] = {}
    memo: dict = {}
    for key, seen in moves.items():
        h = cache.calls(key[0])[key[1]]
        if recipe is not None and len(seen) == 1:
            s, o = seen[0]
            move = recipe(s, transform.elements[s.name], o, tuple(h.shape), s.name in transform.forced)
            if move is not None:
                expected[key] = one_pass(move, h, memo=memo) or move
            continue
        for s, o in seen:
            moved = backend.observe(s, transform.elements[s.name], o, expected.get(key, h), s.name in transform.forced)
            if moved is not None:
                expected[key] = moved
    return expected


def _measure(expected: dict, cache, measured: dict) -> dict:
    """``watch`` callbacks that compare each new activation with its expected value as it is produced:
    ``measured[(name, call)]`` = [‖h' − F·h‖, ‖h' − h‖, ‖h‖, ‖F·h‖]: in one compiled pass where the
    expected value is a recipe the pass covers (``_verify_kernel.py``), else with torch's kernels, kept
    as a tensor on the activation's device (an ``.item()`` each would wait for the device every time),
    with one scratch difference, not two."""
    calls: dict[str, int] = {}
    norm = torch.linalg.vector_norm

    def compare(h_new: torch.Tensor, name: str) -> None:
        call = calls[name] = calls.get(name, -1) + 1
        want = expected.get((name, call))
        if want is None:
            return
        h = cache.calls(name)[call]
        if isinstance(want, OnePass):
            sums = want.sums(h_new, h)
            if sums is not None:
                measured[(name, call)] = sums
                return
            want = want.move
        if isinstance(want, Move):
            want = want.apply(h)
        diff = torch.sub(h_new, want)
        eq = norm(diff)
        change = norm(torch.sub(h_new, h, out=diff))
        measured[(name, call)] = torch.stack([eq, change, norm(h), norm(want)])
    return {name: compare for name in {n for n, _ in expected}}


def _site_checks(sites: list[Site], transform: Optional[Transform], expected: dict, measured: dict,
                 bar=None) -> list[SiteCheck]:
    """Per site: the largest ‖h' − F·h‖ and ‖h' − h‖ over its observed hook points, relative to the
    larger of ‖h‖ and ‖F·h‖ (a large scaling makes h' big, and its rounding with it). An expected
    activation the new model never produced counts as infinitely far (the models differ in structure).
    """
    # a tensor's first .tolist() waits for the device; the rest are ready (the compiled pass gave floats)
    values = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in measured.items()}
    missing = [math.inf, math.inf, 1.0, 1.0]
    checks = []
    for s in sites:
        keys = [k for k in ((o.name, o.call) for o in s.observed) if k in expected]
        rows = [(e, c, max(nh, nw, 1e-30)) for e, c, nh, nw in (values.get(k, missing) for k in keys)]
        eq = max((e / sc for e, _, sc in rows), default=0.0)
        change = max((c / sc for _, c, sc in rows), default=0.0)
        checks.append(SiteCheck(s.name, transform.groups[s.name], eq, change, len(rows)))
        if bar is not None:
            bar.update()
    return checks
