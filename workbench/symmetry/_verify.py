"""``wb.verify``: is the function unchanged, and did the representation move as the group says?"""
from __future__ import annotations

import copy
import html
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .._errors import UnknownNameError
from .._report import Report, new_axes
from ..hooks import _hf, hook_names, run_with_cache
from ..hooks._tl import tl_kind
from ._map import Site, one_example, symmetry_map
from ._modes import eval_mode
from ._transform import Transform, _perm_part, apply_transform

# Relative tolerances by dtype: what an exact symmetry achieves with random weights, with margin.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def tolerance_for(dtype: torch.dtype) -> float:
    return TOLERANCES.get(dtype, 1e-5)


@dataclass
class SiteCheck:
    site: str
    group: str
    equivariance_error: float  # max over observations of ‖h' − F h − c‖ / max(‖h‖, ‖F h‖)
    representation_change: float  # max over observations of ‖h' − h‖ / max(‖h‖, ‖F h‖)
    observations: int  # hook points compared; 0: the site was not checked


@dataclass(repr=False)
class InvarianceReport(Report):
    """Output agreement of two models and, per site, equivariance and how far activations moved.

    The verdict (:attr:`verdict`) is ``"PASS"`` (the function is unchanged under :attr:`rule`, and
    every checked site moved as its element says), ``"FAIL"``, or ``"NOT CHECKED"`` (the outputs
    agree but no site was checked: no transform, or nothing of it observable — not a pass).
    """

    max_abs_diff: float
    max_rel_diff: float  # the largest |new − old| / scale over all elements (the scale: see ``rule``)
    top1_agreement: Optional[float]
    tolerance: float
    dtype: str
    sites: list[SiteCheck] = field(default_factory=list)
    compared: str = "outputs"  # or "log-probabilities" (TransformerLens decoders), "encoder outputs" (BERT)
    kl: Optional[float] = None  # mean KL(p ‖ p') per position, for log-probabilities
    floor: Optional[float] = None  # float64 model whose norms compute in float32: their rounding's effect
    rule: str = ""  # the comparison rule, in words
    worst: Optional[dict] = None  # the element with the largest relative difference: index, old, new, scale
    top1_disagreements: int = 0  # rows whose top-1 differs by more than a float tie
    not_checked: list = field(default_factory=list)  # (site, why) for sites of the transform not checked
    finite: bool = True  # every output of the new model is finite where the original's is

    @property
    def function_preserved(self) -> bool:
        return self.finite and self.max_rel_diff <= self.tolerance and self.top1_disagreements == 0

    @property
    def equivariant(self) -> bool:
        return all(s.equivariance_error <= self.tolerance for s in self.sites)

    @property
    def checked(self) -> list[SiteCheck]:
        """The site checks that compared at least one hook point."""
        return [s for s in self.sites if s.observations > 0]

    @property
    def representations_moved(self) -> bool:
        return bool(self.checked) and all(s.representation_change > 100 * self.tolerance for s in self.checked)

    @property
    def verdict(self) -> str:
        """``"PASS"``, ``"FAIL"`` or ``"NOT CHECKED"`` (outputs agree, but no site was checked)."""
        if not (self.function_preserved and self.equivariant):
            return "FAIL"
        return "PASS" if self.checked else "NOT CHECKED"

    @property
    def passed(self) -> bool:
        """The function is unchanged and every checked site moved exactly as its element says — with at
        least one site checked (nothing checked is not a pass: see :attr:`verdict`)."""
        return self.verdict == "PASS"

    def summary(self) -> str:
        what = {"log-probabilities": "log-probability", "encoder outputs": "encoder output"}.get(self.compared, "output")
        checked = self.checked
        moved = sum(s.representation_change > 100 * self.tolerance for s in checked)
        text = (f"{self.verdict}: max relative {what} difference {self.max_rel_diff:.2e} (tolerance "
                f"{self.tolerance:.0e}, {self.dtype})")
        if not self.finite:
            text += "; the new model's outputs are not finite"
        if self.top1_disagreements:
            text += f"; top-1 differs on {self.top1_disagreements} rows beyond float ties"
        elif self.top1_agreement is not None and self.top1_agreement < 1:
            text += f"; top-1 agreement {self.top1_agreement:.3f} (only float ties differ)"
        if self.worst is not None and not self.function_preserved:
            w = self.worst
            text += f"; worst at {list(w['index'])}: {w['old']:.4g} → {w['new']:.4g}"
        bad = [s.site for s in checked if s.equivariance_error > self.tolerance]
        if bad:
            text += f"; not equivariant at {', '.join(bad[:3])}{' …' if len(bad) > 3 else ''}"
        if self.verdict == "NOT CHECKED" or self.not_checked:
            why = "; ".join(f"{s}: {r}" for s, r in self.not_checked[:2]) or "no transform given"
            text += f"; sites checked {len(checked)}/{len(self.sites) + len(self.not_checked)} ({why})"
        return text + f"; representations moved at {moved}/{len(checked)} sites"

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([vars(s) for s in self.sites],
                            columns=["site", "group", "equivariance_error", "representation_change", "observations"])

    def plot(self, ax=None):
        import seaborn as sns

        ax = new_axes(ax)
        frame = self.to_frame().melt(id_vars=["site"], value_vars=["equivariance_error", "representation_change"],
                                     var_name="measure", value_name="relative error")
        frame["relative error"] = frame["relative error"].clip(lower=1e-18)
        sns.barplot(data=frame, x="site", y="relative error", hue="measure", ax=ax)
        ax.set_yscale("log")
        ax.axhline(self.tolerance, color="k", ls="--", lw=1, label="tolerance")
        ax.set_title(self.summary()[:80])
        ax.tick_params(axis="x", rotation=60)
        return ax

    def _repr_html_(self) -> str:
        colour = {"PASS": "#1a7f37", "FAIL": "#cf222e"}.get(self.verdict, "#6e7781")
        badge = f"<span style='background:{colour};color:white;padding:1px 6px;border-radius:4px'>{self.verdict}</span>"
        return badge + super()._repr_html_() + f"<p><i>rule: {html.escape(self.rule)}</i></p>"


def verify(model: nn.Module, new_model: nn.Module, inputs: torch.Tensor, transform: Optional[Transform] = None,
           dtype: Optional[torch.dtype] = None, *, tolerance: Optional[float] = None) -> InvarianceReport:
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
    check. The tolerance comes from the dtype.

    TransformerLens decoders are compared by log-probabilities (logits may shift by a constant),
    with the mean KL divergence and top-1 agreement over all positions; ``inputs`` are tokens.
    """
    from ._transformer import clone, is_transformer_model

    tl = is_transformer_model(model)
    encoder = tl and _hf.is_encoder(model)
    example = None if tl else one_example(inputs)
    if dtype is not None:
        model = clone(model, dtype) if tl else copy.deepcopy(model).to(dtype)
        inputs = inputs.to(dtype) if inputs.is_floating_point() else inputs
        example = None if tl else one_example(inputs)
        if transform is not None:
            new_model = apply_transform(model, transform, example=example)
        else:
            new_model = clone(new_model, dtype) if tl else copy.deepcopy(new_model).to(dtype)
    run_dtype = _param_dtype(model)
    tol = tolerance if tolerance is not None else tolerance_for(run_dtype)
    sites, not_checked, smap = _sites(model, transform, example)
    names = sorted({o.name for s in sites for o in s.observed})
    # An encoder's output is its last hidden state (MiniLM's MLM head is untrained): compared in the new basis.
    last = f"blocks.{int(model.cfg.n_layers) - 1}.hook_resid_post" if encoder else None
    if last:
        names = sorted(set(names) | {last})
    with eval_mode(model, new_model):
        out, cache = run_with_cache(model, inputs, names=names or None, budget=None) if names else (model(inputs), None)
        new_out, new_cache = run_with_cache(new_model, inputs, names=names or None, budget=None) if names else (new_model(inputs), None)
    for value, which in ((out, "model"), (new_out, "new_model")):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"verify compares tensor outputs; {which} returned {type(value).__name__}.")
    out, new_out = out.detach(), new_out.detach()
    kl = None
    if last:
        out, new_out = _in_new_basis(smap, transform, last, cache[last]).flatten(0, -2), new_cache[last].flatten(0, -2)
    elif tl:
        out, new_out = out.log_softmax(-1).flatten(0, -2), new_out.log_softmax(-1).flatten(0, -2)
        kl = (out.exp() * (out - new_out)).sum(-1).mean().item()
    per_row = tl and not last  # a position's log-probabilities share one scale: their logits' range
    cmp = _Comparison(out, new_out, per_row, run_dtype)
    checks = _composite_checks(sites, transform, cache, new_cache) if tl else [
        _site_check(s, transform, cache, new_cache) for s in sites]
    floor = None
    strict_fail = cmp.max_rel > tol or any(c.equivariance_error > tol for c in checks)
    if tl and tolerance is None and run_dtype == torch.float64 and strict_fail:
        reference = cache[last].flatten(0, -2) if last else out  # the original model's, in its own basis
        floors = _float32_floor(model, inputs, reference, cache, last)
        if floors is not None:  # the rule: within 10× the floor measured for this model
            rounded, site_floor = floors
            floor = (rounded - reference).abs().max().item()
            tol = max(tol, 10 * _Comparison(reference, rounded, per_row, run_dtype).max_rel, 10 * site_floor)
    ties, top1 = cmp.top1(tol) if cmp.classifier and not last else (0, None)
    compared = "encoder outputs" if last else "log-probabilities" if tl else "outputs"
    rule = _rule(compared, per_row, tol, run_dtype, cmp.classifier and not last, floor is not None)
    return InvarianceReport(cmp.max_abs, cmp.max_rel, top1, tol, str(run_dtype).replace("torch.", ""), checks,
                            compared, kl, floor, rule, cmp.worst(), ties, not_checked, cmp.finite)


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


class _Comparison:
    """Outputs compared element by element: |new − old| against a scale per output unit.

    ``old``/``new``: ``[rows, ...]``. The scale of an element is the largest |old| in its output unit
    (a column of ``[rows, units]``; with ``per_row``, a row of log-probabilities), never below
    eps(dtype)·max|old| so a unit that is ~0 everywhere does not divide by zero. One output unit a
    million times larger than the rest therefore no longer hides a change in the others.
    """

    def __init__(self, old: torch.Tensor, new: torch.Tensor, per_row: bool, dtype: torch.dtype):
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
        floor = max(torch.finfo(dtype).eps * top, torch.finfo(work).tiny)
        self.scale = mag.clamp_min(floor)
        self.max_abs = diff.max().item() if diff.numel() else 0.0
        self.rel = diff.div_(self.scale)
        self.max_rel = self.rel.max().item() if self.rel.numel() else 0.0
        self.classifier = len(self.shape) == 2 and self.shape[1] > 1

    def worst(self) -> Optional[dict]:
        if not self.rel.numel():
            return None
        flat = int(torch.nan_to_num(self.rel, nan=math.inf).flatten().argmax())
        i, j = divmod(flat, self.rel.shape[1])
        index = tuple(int(k) for k in torch.unravel_index(torch.tensor(flat), self.shape)) if self.shape else ()
        return {"index": index, "old": self.old[i, j].item(), "new": self.new[i, j].item(),
                "scale": self.scale[0 if self.scale.shape[0] == 1 else i, 0 if self.scale.shape[1] == 1 else j].item(),
                "relative": self.rel[i, j].item()}

    def top1(self, tol: float) -> tuple[int, float]:
        """(rows whose top-1 differs beyond a float tie, agreement). A row is a tie when the original's gap
        between the two classes is within the tolerance of both: old[a] − old[b] ≤ tol·(s_a + s_b)."""
        a, b = self.old.argmax(1), self.new.argmax(1)
        rows = torch.arange(len(a))
        differ = a != b
        s = self.scale.expand_as(self.old)
        gap = self.old[rows, a] - self.old[rows, b]
        tie = gap <= tol * (s[rows, a] + s[rows, b])
        return int((differ & ~tie).sum()), (~differ).double().mean().item()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[rows, units]``: the first axis is the batch (a 0-d or 1-d output is one unit per row)."""
    if x.ndim == 0:
        return x.reshape(1, 1)
    return x.reshape(x.shape[0], -1)


def _rule(compared: str, per_row: bool, tol: float, dtype: torch.dtype, classifier: bool, floored: bool) -> str:
    unit = "the row's (a position's log-probabilities)" if per_row else "its output unit's (column over rows)"
    text = (f"{compared}, element-wise: |new − old| ≤ tol·s with s = max |old| over {unit}, at least "
            f"eps·max|old|; tol = {tol:.1e} ({str(dtype).replace('torch.', '')}"
            f"{', raised to 10× the float32 floor' if floored else ''})")
    if classifier:
        text += "; top-1 must agree on every row except float ties (old[a] − old[b] ≤ tol·(s_a + s_b))"
    return text + "; each site: ‖h' − F·h‖ ≤ tol·max(‖h‖, ‖F·h‖) at every observed hook point"


def _in_new_basis(smap, transform: Optional[Transform], name: str, h: torch.Tensor) -> torch.Tensor:
    """``h`` (the residual stream at hook ``name``) moved by the transform's stream element, if any."""
    from ._map import Observation
    from ._transformer import observe

    if transform is None or "resid" not in transform.elements:
        return h
    return observe(smap["resid"], transform.elements["resid"], Observation(name, 0, "pre"), h)


def _param_dtype(model: nn.Module) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.get_default_dtype()


def _norm(x: torch.Tensor) -> float:
    return torch.linalg.vector_norm(x).item()


def _float32_floor(model: nn.Module, inputs: torch.Tensor, reference: torch.Tensor, cache, last: Optional[str]):
    """For a float64 model that computes parts in float32 — RMSNorm, in TransformerLens's native models
    as in Hugging Face's, and the softmax of Hugging Face LLaMA's eager attention — how much its
    output and its activations move when those parts' inputs are rounded to float32: the floor below
    which no comparison can go. Returns ``(the output with those parts rounded, largest relative
    activation floor over the cached hooks)``, or None for models that compute in float64 throughout. ``reference`` is
    the unrounded output it is measured against (log-probabilities, or the encoder output at ``last``).
    """
    from ..hooks import intervene

    rms = str(getattr(model.cfg, "normalization_type", "") or "").startswith("RMS")
    softmax32 = tl_kind(model) == "hf" and _hf.family(model) == "llama"
    if not (rms or softmax32):
        return None
    L = int(model.cfg.n_layers)
    points = hook_names(model)
    known = set(points) | set(points.aliases)
    names = [f"blocks.{i}.hook_resid_{w}" for i in range(L) for w in ("pre", "mid")] + [f"blocks.{L - 1}.hook_resid_post"]
    if softmax32:
        names += [f"blocks.{i}.attn.hook_attn_scores" for i in range(L)]
    rounding = {n: (lambda x, name: x.float().double()) for n in names if n in known}
    watched = list(cache.keys()) if cache is not None else []
    with eval_mode(model), intervene(model, rounding), torch.no_grad():
        rounded, rcache = run_with_cache(model, inputs, names=watched or None, budget=None) if watched else (model(inputs), None)
    rounded = rcache[last].flatten(0, -2) if last else rounded.detach().log_softmax(-1).flatten(0, -2)
    site_floor = max((_norm(rcache[n] - cache[n]) / max(_norm(cache[n]), 1e-30) for n in watched), default=0.0)
    return rounded, site_floor


def _composite_checks(sites: list[Site], transform: Transform, cache, new_cache) -> list[SiteCheck]:
    """Per-site checks where several sites move one hook (a head's map and the head permutation).

    The expected activation at each hook applies every site's element in the transform's order.
    """
    from ._transformer import observe

    expected: dict[str, torch.Tensor] = {}
    for s in sites:
        for o in s.observed:
            expected[o.name] = observe(s, transform.elements[s.name], o, expected.get(o.name, cache[o.name]))
    checks = []
    for s in sites:
        eq = change = 0.0
        for o in s.observed:
            h, h_new, want = cache[o.name], new_cache[o.name], expected[o.name]
            norm = max(_norm(h), _norm(want), 1e-30)
            eq, change = max(eq, _norm(h_new - want) / norm), max(change, _norm(h_new - h) / norm)
        checks.append(SiteCheck(s.name, transform.groups[s.name], eq, change, len(s.observed)))
    return checks


def _site_check(site: Site, transform: Transform, cache, new_cache) -> SiteCheck:
    element = transform.elements[site.name]
    perm = _perm_part(element) or element
    offset = site.group.offset(element) if site.affine and site.name not in transform.forced else None
    eq, change, count = 0.0, 0.0, 0
    for o in site.observed:
        if o.level == "prebn" and not hasattr(element, "perm"):
            continue  # a forced dense map folded the BatchNorm: nothing to compare before it
        # In the activations' own dtype: its rounding (~1e-7 in float32) is far below the dtype's
        # tolerance, and float64 copies or accumulations of large activations cost more than the forward.
        h = cache.calls(o.name)[o.call]
        h_new = new_cache.calls(o.name)[o.call]
        F = {"prebn": perm, "pre": element, "post": element.phi()}[o.level]
        hb = h.reshape(h.shape[0], site.n, -1) if o.block > 1 else h
        expected = F.act(hb, 1)
        if offset is not None and o.level == "post":
            expected = expected + offset.to(h.dtype).reshape(1, -1, *([1] * (expected.ndim - 2)))
        expected = expected.reshape(h.shape)
        # Relative to the larger of h and F·h: a large scaling makes h' big, and its rounding with it.
        norm = max(_norm(h), _norm(expected), 1e-30)
        eq = max(eq, _norm(h_new - expected) / norm)
        change = max(change, _norm(h_new - h) / norm)
        count += 1
    return SiteCheck(site.name, transform.groups[site.name], eq, change, count)
