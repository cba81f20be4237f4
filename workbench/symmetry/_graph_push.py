"""The graph backend's transforms: group elements pushed into a plain module's weights, module by module."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .._copy import deepcopy_module
from .._errors import InvalidOptionError
from ..groups import Dense, GroupElement, ScaledPermutation
from ..hooks import inherit_copy_list
from ._kernels import gather_scale_into
from ._graph_stream import plan_ports
from ._port_moves import Moves, dense_ok, fits, scale_range
from ._sites import Site, SymmetryMap


# ---------------------------------------------------------------------- pushing elements into weights
# Every weight gets at most one row element (it writes a site) and one column element (it reads one).
# Both are applied in a single pass from the original's tensor into the copy's, in the parameter's
# own dtype: permutations are exact and a scaling rounds once, so this loses nothing measurable
# while costing about one more copy of the transformed weights (see benchmarks/results/transforms.md).
# Everything is planned and range-checked first, then written: a refused transform writes nothing.
# A tensor shared by several modules (tied weights) is written once: the map gave its uses one element.
@dataclass
class _Plan:
    rows: Optional[GroupElement] = None  # acts on axis 0 (the module writes the site)
    cols: Optional[GroupElement] = None  # acts on axis 1 (the module reads a site): F⁻ᵀ
    block: int = 1  # features per channel on axis 1 (a flatten between the site and this reader)
    offset: Optional[torch.Tensor] = None  # c absorbed by the bias: b ← b − W'c (affine extension)
    weight: Optional[torch.Tensor] = None  # float64 source weight instead of the module's (a folded BatchNorm)
    zero_bias: bool = False  # the bias moved into the folded BatchNorm's β


def push_graph(model: nn.Module, smap: SymmetryMap, transform, inplace: bool, hint: str = "") -> nn.Module:
    """``model`` (``inplace``) or a copy with ``transform``'s elements in its modules' weights."""
    old_modules = dict(model.named_modules())
    plans: dict[str, _Plan] = {}
    small: dict[int, tuple[str, str, Moves]] = {}  # id(original tensor) → (module, attribute, its moves)
    sites = {s.name: s for s in smap.sites}  # smap[name] searches: 28 ms over ViT-B/16's 313 sites
    stacked: dict = {}  # dense blocks stacked for a weight, reused by its bias (_port_moves._stacked)
    with torch.no_grad():
        hosted = _with_hosts(smap, transform.elements)
        named: dict = {}  # (module, attribute) → its Moves, for this push (see _plan_site)
        for name, element in hosted.items():
            site = sites[name]
            offset = site.group.offset(element) if site.affine and name not in transform.forced else None
            _plan_site(old_modules, site, element, offset, plans, small, name in transform.forced, named)
        hint = hint or "the transform's elements move weights beyond the dtype's range"
        values = {k: moves.value(memo=stacked) for k, (_, _, moves) in small.items()} if inplace else {}
        _check_ranges(old_modules, plans, small, hint, weights=inplace, values=values)
    if inplace:
        new = model
    else:
        # Weights about to be rewritten are not copied first: the copy gets empty tensors for them.
        memo: dict = {}
        for name in _rewritten(sites, hosted, old_modules):
            for p in (old_modules[name].weight, old_modules[name].bias):
                if p is not None and id(p) not in memo:
                    memo[id(p)] = nn.Parameter(torch.empty_like(p), requires_grad=p.requires_grad)
        for module_name, attr, _ in small.values():  # rewritten whole below (attention weights, class tokens, norms)
            p = getattr(old_modules[module_name], attr)
            if isinstance(p, nn.Parameter) and id(p) not in memo:
                memo[id(p)] = nn.Parameter(torch.empty_like(p), requires_grad=p.requires_grad)
            elif type(p) is torch.Tensor and id(p) not in memo:  # a norm's running statistics: deepcopy costs 28 µs each
                memo[id(p)] = torch.empty_like(p)
        new = deepcopy_module(model, memo)  # copy.deepcopy's result, faster on the hook dicts
        # The copy has the same module tree: it overwrites the same activations in place.
        inherit_copy_list(model, new)
    # The copy's modules by name: the memo maps each original module to its copy (a walk of the copy's tree
    # costs ~0.5 ms on a ViT); a module deepcopy did not record (a custom __deepcopy__) means a walk after all.
    modules = old_modules if inplace else {name: memo.get(id(m)) for name, m in old_modules.items()}
    if not inplace and any(m is None for m in modules.values()):
        modules = dict(new.named_modules())
    with torch.no_grad():
        for key, (module_name, attr, moves) in small.items():
            dst = getattr(modules[module_name], attr)
            if inplace:
                _set(dst, values[key])
            else:  # computed into the copy's tensor, then checked (a refusal discards the copy)
                value = moves.value(out=dst, memo=stacked)
                if not (dst.is_floating_point() and moves.bound is not None
                        and moves.bound <= 0.5 * torch.finfo(dst.dtype).max):  # (½: the rounding on the way)
                    _check_small(hint, f"{module_name}.{attr}", value, dst)
        scratch: dict = dict(_SCRATCH)
        done: set[int] = set()
        known = scratch  # the elements' |scale| ranges, found once for the dtype checks and the bounds alike
        for module_name, plan in plans.items():
            peak, bias_peak = _apply_plan(old_modules[module_name], modules[module_name], plan, scratch, done)
            if not inplace:  # a copy: its weights are checked as they are made (see _check_ranges)
                _check_weight(old_modules, module_name, plan, hint, peak, known, bias_peak)
    return new


def _with_hosts(smap: SymmetryMap, elements: dict) -> dict:
    """``elements`` plus, for every site that embeds a moved site but was given no element of its own (a
    zero-padding shortcut's next stage, a concatenation), the element it must then carry: the embedded
    sites' elements on their channels, the identity elsewhere. Without it the embedded site's writers would
    move while the host's readers stay put (the function changed by 14% on a CIFAR ResNet)."""
    from ._host_group import implied_host

    out = dict(elements)
    for site in smap.sites:  # parents first: a host of a host sees its parent's implied element
        if site.embeds and site.name not in out and any(p in out for p, *_ in site.embeds):
            out[site.name] = implied_host(site, out)
    return out


def _rewritten(sites: dict, hosted: dict, modules: dict) -> set[str]:
    """Modules whose weight and bias :func:`_apply_plan` writes in full from the original's (``sites`` by name,
    ``hosted``: the push's elements with their hosts', :func:`_with_hosts`)."""
    names = set()
    for site_name in hosted:
        site = sites[site_name]
        names.update(w.name for w in site.writers)
        names.update(r.name for r in site.readers)
    return {n for n in names if n in modules}  # parameter ports (_graph_stream) are written through ``small``


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value)  # converts to param's dtype as it copies: the rounding of ``value.to(dtype)``, one pass


def _plan_site(modules: dict, site: Site, element: GroupElement, offset, plans: dict, small: dict,
               forced: bool = False, named: Optional[dict] = None) -> None:
    """Record what each weight of ``site`` needs, and the new values of BatchNorm vectors (small). ``named``: the
    push's Moves by (module, attribute), filled here (a packed attention weight takes a move from every head's
    site: one getattr through nn.Module's __getattr__ per tensor instead of one per move)."""
    perm = element.perm_part()
    named = {} if named is None else named

    def moves_for(module: str, attr: str) -> Moves:
        hit = named.get((module, attr))
        if hit is not None:
            return hit
        t = getattr(modules[module], attr)  # a tensor moves once (shared BatchNorm), all its moves composed
        if id(t) not in small:
            small[id(t)] = (module, attr, Moves(t))
        hit = named[module, attr] = small[id(t)][2]
        return hit

    def put(module: str, attr: str, fn) -> None:  # fn of the float64 value so far
        moves_for(module, attr).apply(fn)

    plan_ports(modules, site, element, moves_for, forced)  # parameters moved directly (class token, attention, LayerNorm)
    for w in site.writers:
        if w.name not in modules:
            continue
        rows = element
        if w.level == "pregn":  # its output only a GroupNorm with a gain reads (DERIVATIONS §9)
            from ._graph_groupnorm import plan_writer

            rows = plan_writer(modules, w, element, put, site.name, forced)
        elif w.level == "prebn":
            bn = modules[w.norm]
            if perm is None:  # not a scaled permutation: fold the norm into the writer, which then only adds β
                plan = plans.setdefault(w.name, _Plan())
                if plan.weight is None:
                    plan.weight, c = _fold_batchnorm(modules[w.name], bn)
                    plan.zero_bias = modules[w.name].bias is not None
                    put(w.norm, "running_mean", torch.zeros_like)
                    put(w.norm, "running_var", lambda v: torch.full_like(v, 1.0 - bn.eps))
                    put(w.norm, "weight", torch.ones_like)
                    put(w.norm, "bias", lambda v, c=c: element.act(c, 0))
            else:
                rows = perm
                for attr in ("running_mean", "running_var"):
                    put(w.norm, attr, lambda v: perm.act(v, 0))
                for attr in ("weight", "bias"):
                    put(w.norm, attr, lambda v: element.act(v, 0))
        plans.setdefault(w.name, _Plan()).rows = rows
    for bn_name, mode in site.norms:
        if mode == "coupler":  # a grouped conv inside the site: W ↦ F·W·F⁻¹, b ↦ F·b (F: what moves its input)
            from ._graph_vision import conjugate_grouped

            F = element.phi() if site.norm_levels.get(bn_name) == "post" else element
            conv = modules[bn_name]
            put(bn_name, "weight", lambda v, F=F, conv=conv: conjugate_grouped(v, F, conv.groups, site.name, bn_name, forced))
            if conv.bias is not None:
                put(bn_name, "bias", lambda v, F=F: F.act(v, 0))
        elif mode.startswith("groupnorm"):  # refuses what no GroupNorm passes (DERIVATIONS §9)
            from ._graph_groupnorm import check_element

            check_element(site.name, bn_name, mode, element, forced)
        elif mode == "input":  # BN(Fx) = F·BN(x) for F = D·P: μ, β take D·P; γ, σ² take P (derivation: ARCHITECTURE)
            if perm is None:
                raise InvalidOptionError(f"site {site.name!r}: only permutations and diagonal scalings pass BatchNorm "
                                         f"{bn_name!r}, which reads the site; got a {type(element).__name__} element.")
            F = element.phi() if site.norm_levels.get(bn_name) == "post" else element  # what moves its input
            for attr in ("running_var", "weight"):
                put(bn_name, attr, lambda v: perm.act(v, 0))
            for attr in ("running_mean", "bias"):
                put(bn_name, attr, lambda v, F=F: F.act(v, 0))
    moved: dict = {}  # level → F⁻ᵀ, once per site: a dense inverse costs n³, and readers of a level share it
    for r in site.readers:
        if r.name not in modules:
            continue
        if r.level not in moved:
            level = {"prebn": perm, "pre": element, "post": element.phi()}[r.level]
            moved[r.level] = level.inverse_transpose()  # W ↦ W F⁻¹ is F⁻ᵀ on the input axis
        plan = plans.setdefault(r.name, _Plan())
        plan.cols, plan.block = moved[r.level], r.block
        if offset is not None and r.level == "post":
            plan.offset = offset


def _magnitude(e: Optional[GroupElement], known: Optional[dict] = None) -> float:
    """‖M‖∞ (largest row of absolute values): max|M·x| ≤ ‖M‖∞·max|x| along the axis it acts on. ``known``:
    the values found so far in this push, by element id (a site's element bounds all of its weights)."""
    if e is None:
        return 1.0
    if known is not None and id(e) in known:
        return known[id(e)]
    if isinstance(e, ScaledPermutation):
        value = 1.0 if e.scale is None else scale_range(e, known)[1] if e.scale.numel() else 1.0
    else:
        value = float(e.matrix().abs().sum(1).max())
    if known is not None:
        known[id(e)] = value
    return value


def _peak(W: torch.Tensor) -> float:
    """max|W| (NaN if W holds one), read now. Not remembered between transforms: a write through ``p.data``
    changes a tensor without bumping its version, and a remembered maximum then let a float16 transform
    write inf unrefused. A copy's weights get theirs from the compiled kernel that writes them (_kernels)."""
    if not W.numel():
        return 0.0
    lo, hi = torch.aminmax(W.detach().reshape(-1))
    return max(abs(float(lo)), abs(float(hi)))


def _check_ranges(modules: dict, plans: dict, small: dict, hint: str, weights: bool = True,
                  values: Optional[dict] = None) -> None:
    """Refuse a transform whose weights the parameters' dtype cannot hold (float16 overflows at 65504).

    A bound max|W|·‖rows‖∞·‖cols‖∞ clears almost every weight; only a weight whose bound exceeds the
    range is transformed in float64 to see whether it really does. ``weights=False`` checks only the
    small tensors: a transform into a copy checks each weight as it is made (``_check_weight`` after
    ``_apply_plan``, with the maximum the kernel read on the way), so a refusal leaves the model untouched
    and no pass over the weights is spent on the bound. ``values``: the small tensors' new values by key of
    ``small`` (an in-place push computes them first; a copy checks each as it writes it, ``_check_small``)."""
    for key, value in (values or {}).items():
        module, attr, _ = small[key]
        _check_small(hint, f"{module}.{attr}", value, getattr(modules[module], attr))
    if weights:
        known: dict = {}
        for name, plan in plans.items():
            _check_weight(modules, name, plan, hint, known=known)


def _check_small(hint: str, what: str, value: torch.Tensor, t: torch.Tensor) -> None:
    """Refuse ``value`` (the new value of ``t``, in ``t``'s dtype or wider) if ``t``'s dtype cannot hold it: an
    overflow in ``t``'s own dtype shows as inf."""
    if t.is_floating_point() and value.numel():
        peak = _peak(value)
        if not peak <= torch.finfo(t.dtype).max:
            _refuse(hint, what, peak, t.dtype)


def _refuse(hint: str, what: str, value: float, dtype: torch.dtype):
    raise InvalidOptionError(f"{hint}: {what} would reach {value:.3g}, beyond {dtype}'s largest value "
                             f"{torch.finfo(dtype).max:.3g}. Nothing was written.")


def _check_weight(modules: dict, name: str, plan: _Plan, hint: str, peak: Optional[float] = None,
                  known: Optional[dict] = None, bias_peak: Optional[float] = None) -> None:
    """The range check of one module's weight and bias (``peak``, ``bias_peak``: max|W|, max|b| when already known;
    ``known``: the elements' norms found so far in this push, see _magnitude)."""
    m = modules[name]
    W = plan.weight if plan.weight is not None else m.weight
    top = torch.finfo(m.weight.dtype).max
    bound = (_peak(W) if peak is None else peak) * _magnitude(plan.rows, known) * _magnitude(plan.cols, known)
    if not bound <= top:  # NaN-safe
        shape = W.shape
        value = W.double().reshape(shape[0], -1, plan.block) if plan.block > 1 else W.double()
        value = plan.rows.act(value, 0) if plan.rows is not None else value
        value = plan.cols.act(value, 1) if plan.cols is not None else value
        exact = float(value.abs().max())
        if not exact <= top:
            _refuse(hint, f"{name}.weight", exact, m.weight.dtype)
    if m.bias is not None and plan.rows is not None and not plan.zero_bias:
        # The same bound first (max|b|·‖rows‖∞, a fraction of the float64 product's cost): the exact value is
        # computed only where the bound does not clear the range (NaN-safe), as for the weight
        bound = (_peak(m.bias) if bias_peak is None else bias_peak) * _magnitude(plan.rows, known)
        if not bound <= top:
            exact = float(plan.rows.act(m.bias.detach().double(), 0).abs().max())
            if not exact <= top:
                _refuse(hint, f"{name}.bias", exact, m.bias.dtype)


def _apply_plan(src: nn.Module, dst: nn.Module, plan: _Plan, scratch: dict, done: set) -> tuple:
    """Write ``dst``'s weight and bias from ``src``'s; returns max|source weight| and max|source bias| where the
    kernel measured them (else None)."""
    W, out = (plan.weight if plan.weight is not None else src.weight), dst.weight
    peak = bias_peak = None
    if id(out) not in done:  # a weight shared by several modules is written once
        done.add(id(out))
        shape = out.shape
        if plan.block > 1:  # [out, n·block] read as [out, n, block]
            W, out = W.reshape(shape[0], -1, plan.block), out.view(shape[0], -1, plan.block)
        if W.dtype != out.dtype:  # a float64 source (folded BatchNorm): like a dense map (_act_into)
            _set(out, _acted(W, plan.rows, plan.cols, _product_dtype(out.dtype, plan.rows, plan.cols, scratch)))
        else:
            peak = _act_into(W, out, plan.rows, plan.cols, scratch)
    if dst.bias is not None and id(dst.bias) not in done:
        done.add(id(dst.bias))
        if plan.zero_bias:
            dst.bias.zero_()
        else:
            bias_peak = _act_into(src.bias, dst.bias, plan.rows, None, scratch)
        if plan.offset is not None:
            out = dst.weight
            c = plan.offset.repeat_interleave(plan.block) if plan.block > 1 else plan.offset  # a flattened channel's
            c = c.to(out.dtype).reshape(1, -1, *([1] * (out.ndim - 2)))  # positions all carry its offset
            dst.bias.sub_((out * c).sum(dim=tuple(range(1, out.ndim))))
    return peak, bias_peak


def _acted(value: torch.Tensor, rows, cols, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    value = value.to(dtype)
    if rows is not None:
        value = rows.act(value, 0)
    if cols is not None:
        value = cols.act(value, 1)
    return value


# Fresh memory is the expensive part of a copy (page faults): scratch buffers outlive a call, up to
# this many bytes each, so repeated transforms (sweeps, widgets) reuse warm memory.
_SCRATCH_CAP = 256 * 2**20
_SCRATCH: dict = {}


def _buffer(scratch: dict, like: torch.Tensor) -> torch.Tensor:
    """A reusable scratch tensor shaped like ``like``."""
    key = (like.dtype, like.device)
    flat = scratch.get(key)
    if flat is None or flat.numel() < like.numel():
        flat = scratch[key] = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
        if flat.numel() * flat.element_size() <= _SCRATCH_CAP:
            _SCRATCH[key] = flat
    return flat[: like.numel()].view(like.shape)


def _act_into(src: torch.Tensor, out: torch.Tensor, rows, cols, scratch: dict) -> Optional[float]:
    """``out = rows · src · colsᵀ`` along axes 0 and 1 (either may be None); max|src| if the kernel measured it."""
    if not all(isinstance(e, (ScaledPermutation, type(None))) for e in (rows, cols)) \
            or not all(fits(e, out.dtype, scratch) for e in (rows, cols)):
        # A dense element, or scalings the dtype cannot hold on their own (float16: 1e5 is inf, though
        # 1e5·w may fit): in float64, or in a float32 weight's own dtype where _port_moves.dense_ok allows it.
        _set(out, _acted(src, rows, cols, _product_dtype(out.dtype, rows, cols, scratch)))
        return None
    return gather_scale_into(src, out, rows.perm if rows is not None else None, rows.scale if rows is not None else None,
                      cols.perm if cols is not None else None, cols.scale if cols is not None else None,
                      lambda like: _buffer(scratch, like), memo=scratch)


def _product_dtype(dtype: torch.dtype, rows, cols, scratch: Optional[dict] = None) -> torch.dtype:
    """The dtype a weight's products with ``rows`` and ``cols`` run in: its own where every dense element is
    well-conditioned and every scaling fits (``_port_moves``'s precision argument), else float64."""
    ok = all(e is None or (dense_ok(e, dtype) if isinstance(e, Dense) else fits(e, dtype, scratch))
             for e in (rows, cols))
    return dtype if ok and dtype == torch.float32 else torch.float64


def _fold_batchnorm(writer: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm folded into the writer before it: ``(W', c)`` in float64 with
    BN(W x + b) = W' x + c. The writer's weight becomes W' and its bias 0; the norm becomes the identity
    plus β = c (μ = 0, σ² = 1 − ε, γ = 1), so a writer without a bias needs no new parameter."""
    s = torch.sqrt(bn.running_var.double() + bn.eps)
    g = bn.weight.double() / s
    W = writer.weight.double()
    b = writer.bias.double() if writer.bias is not None else torch.zeros_like(g)
    return W * g.reshape(-1, *([1] * (W.ndim - 1))), g * (b - bn.running_mean.double()) + bn.bias.double()
