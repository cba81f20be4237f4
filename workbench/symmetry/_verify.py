"""``wb.verify``: is the function unchanged, and did the representation move as the group says?"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .._report import Report, new_axes
from ..hooks import _hf, hook_names, run_with_cache
from ..hooks._tl import tl_kind
from ._map import Site, symmetry_map
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
    observations: int


@dataclass(repr=False)
class InvarianceReport(Report):
    """Output agreement of two models and, per site, equivariance and how far activations moved."""

    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: Optional[float]
    tolerance: float
    dtype: str
    sites: list[SiteCheck] = field(default_factory=list)
    compared: str = "outputs"  # or "log-probabilities" (TransformerLens decoders), "encoder outputs" (BERT)
    kl: Optional[float] = None  # mean KL(p ‖ p') per position, for log-probabilities
    floor: Optional[float] = None  # float64 model whose norms compute in float32: their rounding's effect

    @property
    def function_preserved(self) -> bool:
        return self.max_rel_diff <= self.tolerance

    @property
    def equivariant(self) -> bool:
        return all(s.equivariance_error <= self.tolerance for s in self.sites)

    @property
    def representations_moved(self) -> bool:
        return bool(self.sites) and all(s.representation_change > 100 * self.tolerance for s in self.sites)

    @property
    def passed(self) -> bool:
        """The function is unchanged (and every observed site moved exactly as its element says)."""
        return self.function_preserved and self.equivariant

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        moved = sum(s.representation_change > 100 * self.tolerance for s in self.sites)
        what = {"log-probabilities": "log-probability", "encoder outputs": "encoder output"}.get(self.compared, "output")
        return (f"{verdict}: max relative {what} difference {self.max_rel_diff:.2e} (tolerance {self.tolerance:.0e}, "
                f"{self.dtype}); representations moved at {moved}/{len(self.sites)} sites")

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
        colour = "#1a7f37" if self.passed else "#cf222e"
        badge = f"<span style='background:{colour};color:white;padding:1px 6px;border-radius:4px'>{'PASS' if self.passed else 'FAIL'}</span>"
        return badge + super()._repr_html_()


def verify(model: nn.Module, new_model: nn.Module, inputs: torch.Tensor, transform: Optional[Transform] = None,
           dtype: Optional[torch.dtype] = None, *, tolerance: Optional[float] = None) -> InvarianceReport:
    """Compare ``model`` and ``new_model`` on ``inputs``: outputs, and per site the representation.

    Both models run in eval mode, which is restored afterwards; neither is modified. With
    ``transform``, every observable hook point of every transformed site is checked for
    equivariance ‖h' − F h‖/‖h‖ (F = the site's element at that level, φ(M) after the nonlinearity)
    and for how far it moved, ‖h' − h‖/‖h‖. ``dtype=torch.float64`` re-applies ``transform`` to a
    float64 copy of ``model`` for an exactness check. The tolerance comes from the dtype.

    TransformerLens decoders are compared by log-probabilities (logits may shift by a constant),
    with the mean KL divergence and top-1 agreement over all positions; ``inputs`` are tokens.
    """
    from ._transformer import clone, is_transformer_model

    tl = is_transformer_model(model)
    encoder = tl and _hf.is_encoder(model)
    if dtype is not None:
        model = clone(model, dtype) if tl else copy.deepcopy(model).to(dtype)
        if transform is not None:
            new_model = apply_transform(model, transform)
        else:
            new_model = clone(new_model, dtype) if tl else copy.deepcopy(new_model).to(dtype)
        inputs = inputs.to(dtype) if inputs.is_floating_point() else inputs
    run_dtype = _param_dtype(model)
    tol = tolerance if tolerance is not None else tolerance_for(run_dtype)
    smap = symmetry_map(model, affine=transform.affine) if transform is not None else None
    sites = [smap[name] for name in transform.elements] if transform is not None else []
    names = sorted({o.name for s in sites for o in s.observed})
    # An encoder's output is its last hidden state (MiniLM's MLM head is untrained): compared in the new basis.
    last = f"blocks.{int(model.cfg.n_layers) - 1}.hook_resid_post" if encoder else None
    if last:
        names = sorted(set(names) | {last})
    with eval_mode(model, new_model):
        out, cache = run_with_cache(model, inputs, names=names or None, budget=None) if names else (model(inputs), None)
        new_out, new_cache = run_with_cache(new_model, inputs, names=names or None, budget=None) if names else (new_model(inputs), None)
    out, new_out = out.detach(), new_out.detach()
    kl = None
    if last:
        out, new_out = _in_new_basis(smap, transform, last, cache[last]).flatten(0, -2), new_cache[last].flatten(0, -2)
    elif tl:
        out, new_out = out.log_softmax(-1).flatten(0, -2), new_out.log_softmax(-1).flatten(0, -2)
        kl = (out.exp() * (out - new_out)).sum(-1).mean().item()
    diff = (out - new_out).abs().max().item()
    scale = max(out.abs().max().item(), 1e-30)
    top1 = None
    if out.ndim == 2 and out.shape[1] > 1 and not last:
        top1 = (out.argmax(1) == new_out.argmax(1)).double().mean().item()
    checks = _composite_checks(sites, transform, cache, new_cache) if tl else [
        _site_check(s, transform, cache, new_cache) for s in sites]
    floor = None
    strict_fail = diff / scale > tol or any(c.equivariance_error > tol for c in checks)
    if tl and tolerance is None and run_dtype == torch.float64 and strict_fail:
        reference = cache[last].flatten(0, -2) if last else out  # the original model's, in its own basis
        floors = _float32_floor(model, inputs, reference, cache, last)
        if floors is not None:  # the rule: within 10× the floor measured for this model
            floor, site_floor = floors
            tol = max(tol, 10 * floor / scale, 10 * site_floor)
    compared = "encoder outputs" if last else "log-probabilities" if tl else "outputs"
    return InvarianceReport(diff, diff / scale, top1, tol, str(run_dtype).replace("torch.", ""), checks, compared, kl, floor)


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
    which no comparison can go. Returns ``(output floor, absolute; largest relative activation floor
    over the cached hooks)``, or None for models that compute in float64 throughout. ``reference`` is
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
    return (rounded - reference).abs().max().item(), site_floor


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
