"""Function-preserving transforms: one group element per site, pushed into writers and readers."""
from __future__ import annotations

import copy
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .._errors import InvalidOptionError, UntraceableModelError
from .._report import Report, new_axes
from .._threads import threads
from ..hooks._capture import inherit_copy_list
from ..groups import Dense, Group, GroupElement, ScaledPermutation, element_from_dict, get_group
from ._lattice import generators
from ._map import Site, SymmetryMap, one_example, symmetry_map


@dataclass(repr=False)
class Transform(Report):
    """One group element per site: a serialisable record that :func:`apply_transform` replays."""

    elements: dict[str, GroupElement]
    groups: dict[str, str]
    forced: list[str] = field(default_factory=list)  # sites given a map outside their group
    seed: Optional[int] = None
    model: str = ""
    affine: bool = False

    def summary(self) -> str:
        forced = f", {len(self.forced)} forced non-symmetries" if self.forced else ""
        return f"{len(self.elements)} sites of {self.model}, seed {self.seed}{forced}"

    def to_frame(self):
        import pandas as pd

        rows = [(name, e.n, self.groups[name], type(e).__name__, name in self.forced) for name, e in self.elements.items()]
        return pd.DataFrame(rows, columns=["site", "n", "group", "stored as", "forced"])

    def plot(self, ax=None, site: Optional[str] = None):
        """Heatmap of one site's element (the first by default)."""
        import seaborn as sns

        ax = new_axes(ax, figsize=(4.5, 4))
        name = site or next(iter(self.elements))
        sns.heatmap(self.elements[name].matrix().numpy(), cmap="vlag", center=0, ax=ax, square=True)
        ax.set_title(f"element at {name} ({self.groups[name]})")
        return ax

    def to_dict(self) -> dict:
        return {"format": "workbench-transform", "version": 1, "model": self.model, "seed": self.seed,
                "affine": self.affine, "forced": self.forced, "groups": self.groups,
                "elements": {k: e.to_dict() for k, e in self.elements.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Transform":
        if d.get("format") != "workbench-transform":
            raise ValueError("not a workbench transform record (format field missing or different).")
        return cls({k: element_from_dict(v) for k, v in d["elements"].items()}, d["groups"], d["forced"],
                   d["seed"], d["model"], d["affine"])

    def save(self, path: Union[str, Path]) -> None:
        """Write the record as JSON (elements as plain numbers; no pickle)."""
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Transform":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _is_subgroup(sub: Group, site: Site) -> bool:
    return generators(sub) <= generators(site.group)


def random_intertwiner(model: nn.Module, seed: int = 0, sites: Optional[Iterable[str]] = None,
                       scale_sigma: float = 1.0, *, group: Union[None, str, Group] = None,
                       allow_non_symmetry: bool = False, example: Optional[torch.Tensor] = None,
                       affine: bool = False, inplace: bool = False) -> tuple[nn.Module, Transform]:
    """A new model with a random element of each site's own group pushed into its weights.

    Returns ``(new_model, transform)``; the input model is not modified (unless ``inplace=True``).
    ``sites`` picks site names (default: all sites of ``wb.symmetry_map(model, example)``; ``example``
    is an input batch, needed when the input size cannot be guessed); ``scale_sigma`` is the σ of the
    log-normal scalings — a σ whose scalings the model's dtype cannot hold is refused. ``group``
    forces another group at the chosen sites; one that is not a symmetry there (a rotation at a ReLU
    site) needs ``allow_non_symmetry=True``: the negative control, which must change the function.
    A model that cannot be traced raises :class:`~workbench._errors.UntraceableModelError`.

    Example:
        >>> import torch, workbench as wb
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> new, t = wb.random_intertwiner(mlp, seed=1)
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(mlp(x), new(x), atol=1e-5), torch.allclose(mlp[0].weight, new[0].weight)
        (True, False)
    """
    smap = _traced_map(model, example, affine, "random_intertwiner")
    drawn: dict[str, Group] = {}  # site name -> the group its element comes from
    forced = []
    for site in _choose(smap, sites):
        G = site.group if group is None else get_group(group, site.n)
        if group is not None and not _is_subgroup(G, site):
            if not allow_non_symmetry:
                raise InvalidOptionError(
                    f"{G.name} is not a symmetry of site {site.name!r} ({site.activation}, group {site.group.name}: "
                    f"{site.group.label}); a map from it would change the function. Use group={site.group.name!r}, "
                    f"or pass allow_non_symmetry=True for a negative control."
                )
            forced.append(site.name)
        G = copy.copy(G)
        if hasattr(G, "sigma"):
            G.sigma = scale_sigma
        drawn[site.name] = G
    gen = torch.Generator().manual_seed(int(seed))
    elements = {}
    with threads(1):  # hundreds of small draws (QRs of 64×64 per head): see workbench._threads
        # Sites that embed no other site: one batched draw per group (a GPT-2-small transform's 288
        # per-head GL(64) maps are one QR call); then the embedding sites, which need their parents.
        same: dict[Group, list[str]] = {}
        for name, G in drawn.items():
            if not smap[name].embeds:
                same.setdefault(G, []).append(name)
        for G, names in same.items():
            elements.update(zip(names, G.sample_many(len(names), gen)))
        for name, G in drawn.items():
            if smap[name].embeds:
                elements[name] = _embedded(G, smap[name], elements, gen)
    elements = {name: elements[name] for name in drawn}  # in site order
    for name, element in elements.items():
        element.phi_kind = smap[name].group.phi  # readers undo φ of the site's own activation
        _check_element(name, element, scale_sigma)
    groups = {name: G.name for name, G in drawn.items()}
    transform = Transform(elements, groups, forced, seed, type(model).__name__, affine)
    hint = f"scale_sigma={scale_sigma:g} draws scalings the model's dtype cannot hold; use a smaller scale_sigma"
    return _push_all(model, smap, transform, inplace, hint), transform


def _traced_map(model: nn.Module, example, affine: bool, verb: str) -> SymmetryMap:
    smap = symmetry_map(model, one_example(example) if example is not None else None, affine=affine)
    if smap.trace_error is not None:
        raise UntraceableModelError(f"{verb}: no symmetry of {type(model).__name__} can be used: {smap.trace_error}")
    return smap


def _check_element(name: str, e: GroupElement, scale_sigma: float) -> None:
    """A drawn element must be an invertible map in float64 (a huge σ under- or overflows its scalings)."""
    values = e.scale if isinstance(e, ScaledPermutation) else getattr(e, "M", None)
    if values is None:
        return
    bad = not bool(torch.isfinite(values).all())
    if isinstance(e, ScaledPermutation) and values is not None:
        bad = bad or bool((values == 0).any()) or not bool(torch.isfinite(1 / values).all())
    if bad:
        raise InvalidOptionError(f"scale_sigma={scale_sigma:g}: the element drawn for site {name!r} is not an invertible "
                                 f"map in float64 (its scalings under- or overflow); use a smaller scale_sigma.")


def _embedded(G: Group, site: Site, elements: dict, gen: torch.Generator) -> GroupElement:
    """An element whose embedded channels carry the embedded sites' elements (zero-padding shortcuts)."""
    n = site.n
    covered = torch.zeros(n, dtype=torch.bool)
    blocks = []
    for parent, start, count, level in site.embeds:
        e = elements.get(parent) if parent is not None else None
        e = (e.phi() if level == "post" else e) if e is not None else None
        blocks.append((start, count, e))
        covered[start:start + count] = True
    free = torch.nonzero(~covered).flatten()
    f = G.with_n(len(free)).sample(gen) if len(free) else None
    if all(isinstance(e, (ScaledPermutation, type(None))) for *_, e in blocks) and isinstance(f, (ScaledPermutation, type(None))):
        perm, scale = torch.arange(n), torch.ones(n, dtype=torch.float64)
        if f is not None:
            perm[free] = free[f.perm]
            scale[free] = f.scale if f.scale is not None else 1.0
        for start, count, e in blocks:
            if e is not None:
                perm[start:start + count] = start + e.perm
                scale[start:start + count] = e.scale if e.scale is not None else 1.0
        return ScaledPermutation(perm, scale, G.phi, G.name)
    M = torch.eye(n, dtype=torch.float64)
    if f is not None:
        M[free.unsqueeze(1), free.unsqueeze(0)] = f.matrix()
    for start, count, e in blocks:
        if e is not None:
            M[start:start + count, start:start + count] = e.matrix()
    return Dense(M, G.phi, G.name)


def apply_transform(model: nn.Module, transform: Transform, *, example: Optional[torch.Tensor] = None,
                    inplace: bool = False) -> nn.Module:
    """A new model with ``transform``'s elements pushed into ``model`` (which is not modified).

    ``example`` is an input batch (needed when the input size cannot be guessed). A transform the
    model's dtype cannot hold (weights that would overflow) is refused before anything is written."""
    smap = _traced_map(model, example, transform.affine, "apply_transform")
    for name, e in transform.elements.items():
        site = smap[name]
        if site.n != e.n:
            raise InvalidOptionError(f"the transform's element for {name!r} acts on {e.n} dimensions; the site has {site.n}.")
    return _push_all(model, smap, transform, inplace)


def _choose(smap: SymmetryMap, sites) -> list[Site]:
    if sites is None:
        return list(smap.sites)
    names = [sites] if isinstance(sites, str) else list(sites)
    return [smap[n] for n in names]


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


def _push_all(model: nn.Module, smap: SymmetryMap, transform: Transform, inplace: bool, hint: str = "") -> nn.Module:
    from ._transformer import is_transformer_model, push_transformer

    if is_transformer_model(model):
        return push_transformer(model, smap, transform, inplace)
    old_modules = dict(model.named_modules())
    plans: dict[str, _Plan] = {}
    small: dict[int, tuple[str, str, torch.Tensor]] = {}  # id(original tensor) → (module, attribute, float64 value)
    with torch.no_grad():
        for name, element in transform.elements.items():
            site = smap[name]
            offset = site.group.offset(element) if site.affine and name not in transform.forced else None
            _plan_site(old_modules, site, element, offset, plans, small)
        _check_ranges(old_modules, plans, small, hint or "the transform's elements move weights beyond the dtype's range")
    if inplace:
        new = model
    else:
        # Weights about to be rewritten are not copied first: the copy gets empty tensors for them.
        memo: dict = {}
        for name in _rewritten(smap, transform):
            for p in (old_modules[name].weight, old_modules[name].bias):
                if p is not None and id(p) not in memo:
                    memo[id(p)] = nn.Parameter(torch.empty_like(p), requires_grad=p.requires_grad)
        new = copy.deepcopy(model, memo)
        # The copy has the same module tree: it overwrites the same activations in place.
        inherit_copy_list(model, new)
    modules = dict(new.named_modules())
    with torch.no_grad():
        for module_name, attr, value in small.values():
            _set(getattr(modules[module_name], attr), value)
        scratch: dict = dict(_SCRATCH)
        done: set[int] = set()
        for module_name, plan in plans.items():
            _apply_plan(old_modules[module_name], modules[module_name], plan, scratch, done)
    return new


def _rewritten(smap: SymmetryMap, transform: Transform) -> set[str]:
    """Modules whose weight and bias :func:`_apply_plan` writes in full from the original's."""
    names = set()
    for site_name in transform.elements:
        site = smap[site_name]
        names.update(w.name for w in site.writers)
        names.update(r.name for r in site.readers)
    return names


def _perm_part(e: GroupElement) -> Optional[ScaledPermutation]:
    return ScaledPermutation(e.perm, None, e.phi_kind, e.group) if isinstance(e, ScaledPermutation) else None


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


def _plan_site(modules: dict, site: Site, element: GroupElement, offset, plans: dict, small: dict) -> None:
    """Record what each weight of ``site`` needs, and the new values of BatchNorm vectors (small)."""
    perm = _perm_part(element)

    def put(module: str, attr: str, fn) -> None:
        t = getattr(modules[module], attr)
        value = small[id(t)][2] if id(t) in small else t.double()  # a tensor moves once (shared BatchNorm)
        small[id(t)] = (module, attr, fn(value))

    for w in site.writers:
        rows = element
        if w.level == "prebn":
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
        if mode == "input":  # BN(Fx) = F·BN(x) for F = D·P: μ, β take D·P; γ, σ² take P (derivation: ARCHITECTURE)
            if perm is None:
                raise InvalidOptionError(f"site {site.name!r}: only permutations and diagonal scalings pass BatchNorm "
                                         f"{bn_name!r}, which reads the site; got a {type(element).__name__} element.")
            F = element.phi() if site.norm_levels.get(bn_name) == "post" else element  # what moves its input
            for attr in ("running_var", "weight"):
                put(bn_name, attr, lambda v: perm.act(v, 0))
            for attr in ("running_mean", "bias"):
                put(bn_name, attr, lambda v, F=F: F.act(v, 0))
    for r in site.readers:
        level = {"prebn": perm, "pre": element, "post": element.phi()}[r.level]
        plan = plans.setdefault(r.name, _Plan())
        plan.cols, plan.block = level.inverse().transpose(), r.block  # W ↦ W F⁻¹ is F⁻ᵀ on the input axis
        if offset is not None and r.level == "post":
            plan.offset = offset


def _magnitude(e: Optional[GroupElement]) -> float:
    """‖M‖∞ (largest row of absolute values): max|M·x| ≤ ‖M‖∞·max|x| along the axis it acts on."""
    if e is None:
        return 1.0
    if isinstance(e, ScaledPermutation):
        return 1.0 if e.scale is None else float(e.scale.abs().max())
    return float(e.matrix().abs().sum(1).max())


# max|W| per parameter, remembered while the tensor is unchanged: the bound below then costs no pass over
# the weights on repeated transforms of one model (a pass cost a third of a ResNet-18 transform under
# load). The key adds two sampled values to the version counter, which ``p.data.copy_`` does not bump.
_PEAKS: dict = {}


def _peak(W: torch.Tensor) -> float:
    flat = W.detach().reshape(-1)
    key = (W._version, W.data_ptr(), W.dtype, flat.numel(), float(flat[0]), float(flat[-1])) if flat.numel() else None
    hit = _PEAKS.get(id(W))
    if key is not None and hit is not None and hit[0]() is W and hit[1] == key:
        return hit[2]
    lo, hi = torch.aminmax(flat) if flat.numel() else (torch.zeros(()), torch.zeros(()))
    peak = max(abs(float(lo)), abs(float(hi)))
    if key is not None:
        if len(_PEAKS) > 4096:  # drop entries of tensors that are gone
            for k in [k for k, v in _PEAKS.items() if v[0]() is None]:
                del _PEAKS[k]
        _PEAKS[id(W)] = (weakref.ref(W), key, peak)
    return peak


def _check_ranges(modules: dict, plans: dict, small: dict, hint: str) -> None:
    """Refuse a transform whose weights the parameters' dtype cannot hold (float16 overflows at 65504).

    A bound max|W|·‖rows‖∞·‖cols‖∞ clears almost every weight; only a weight whose bound exceeds the
    range is transformed in float64 to see whether it really does."""
    def refuse(what: str, value: float, dtype: torch.dtype):
        raise InvalidOptionError(f"{hint}: {what} would reach {value:.3g}, beyond {dtype}'s largest value "
                                 f"{torch.finfo(dtype).max:.3g}. Nothing was written.")

    for module, attr, value in small.values():
        t = getattr(modules[module], attr)
        peak = float(value.abs().max()) if value.numel() else 0.0
        if t.is_floating_point() and not peak <= torch.finfo(t.dtype).max:
            refuse(f"{module}.{attr}", peak, t.dtype)
    for name, plan in plans.items():
        m = modules[name]
        W = plan.weight if plan.weight is not None else m.weight
        top = torch.finfo(m.weight.dtype).max
        bound = _peak(W) * _magnitude(plan.rows) * _magnitude(plan.cols)
        if not bound <= top:  # NaN-safe
            shape = W.shape
            value = W.double().reshape(shape[0], -1, plan.block) if plan.block > 1 else W.double()
            value = plan.rows.act(value, 0) if plan.rows is not None else value
            value = plan.cols.act(value, 1) if plan.cols is not None else value
            peak = float(value.abs().max())
            if not peak <= top:
                refuse(f"{name}.weight", peak, m.weight.dtype)
        if m.bias is not None and plan.rows is not None and not plan.zero_bias:
            peak = float(plan.rows.act(m.bias.detach().double(), 0).abs().max())
            if not peak <= top:
                refuse(f"{name}.bias", peak, m.bias.dtype)


def _apply_plan(src: nn.Module, dst: nn.Module, plan: _Plan, scratch: dict, done: set) -> None:
    W, out = (plan.weight if plan.weight is not None else src.weight), dst.weight
    if id(out) not in done:  # a weight shared by several modules is written once
        done.add(id(out))
        shape = out.shape
        if plan.block > 1:  # [out, n·block] read as [out, n, block]
            W, out = W.reshape(shape[0], -1, plan.block), out.view(shape[0], -1, plan.block)
        if W.dtype != out.dtype:  # a float64 source (folded BatchNorm): computed in float64, like a dense map
            _set(out, _acted(W, plan.rows, plan.cols))
        else:
            _act_into(W, out, plan.rows, plan.cols, scratch)
    if dst.bias is not None and id(dst.bias) not in done:
        done.add(id(dst.bias))
        if plan.zero_bias:
            dst.bias.zero_()
        else:
            _act_into(src.bias, dst.bias, plan.rows, None, scratch)
        if plan.offset is not None:
            out = dst.weight
            c = plan.offset.to(out.dtype).reshape(1, -1, *([1] * (out.ndim - 2)))
            dst.bias.sub_((out * c).sum(dim=tuple(range(1, out.ndim))))


def _acted(value: torch.Tensor, rows, cols) -> torch.Tensor:
    value = value.double()
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


def _act_into(src: torch.Tensor, out: torch.Tensor, rows, cols, scratch: dict) -> None:
    """``out = rows · src · colsᵀ`` along axes 0 and 1 (either may be None)."""
    if not all(isinstance(e, (ScaledPermutation, type(None))) for e in (rows, cols)) \
            or not all(_fits(e, out.dtype) for e in (rows, cols)):
        # A dense element, or scalings the dtype cannot hold on their own (float16: 1e5 is inf, though
        # 1e5·w may fit): do it in float64 (rare, and small groups).
        _set(out, _acted(src, rows, cols))
        return
    staged = src
    if rows is not None:
        target = out if cols is None and src.data_ptr() != out.data_ptr() else _buffer(scratch, src)
        torch.index_select(src, 0, rows.perm.to(src.device), out=target)
        staged = target
    if cols is not None:
        target = out if staged.data_ptr() != out.data_ptr() else _buffer(scratch, src)
        torch.index_select(staged, 1, cols.perm.to(src.device), out=target)
        staged = target
    if staged.data_ptr() != out.data_ptr():
        out.copy_(staged)
    for axis, e in ((0, rows), (1, cols)):
        if e is not None and e.scale is not None:
            shape = [1] * out.ndim
            shape[axis] = -1
            out.mul_(e.scale.to(device=out.device, dtype=out.dtype).reshape(shape))


def _fits(e: Optional[GroupElement], dtype: torch.dtype) -> bool:
    """Whether a scaled permutation's scales are normal numbers of ``dtype`` (so ``out.mul_`` is exact to
    one rounding)."""
    if not isinstance(e, ScaledPermutation) or e.scale is None:
        return True
    info = torch.finfo(dtype)
    mag = e.scale.abs()
    return bool(mag.max() <= info.max) and bool(mag.min() >= info.tiny)


def _fold_batchnorm(writer: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm folded into the writer before it: ``(W', c)`` in float64 with
    BN(W x + b) = W' x + c. The writer's weight becomes W' and its bias 0; the norm becomes the identity
    plus β = c (μ = 0, σ² = 1 − ε, γ = 1), so a writer without a bias needs no new parameter."""
    s = torch.sqrt(bn.running_var.double() + bn.eps)
    g = bn.weight.double() / s
    W = writer.weight.double()
    b = writer.bias.double() if writer.bias is not None else torch.zeros_like(g)
    return W * g.reshape(-1, *([1] * (W.ndim - 1))), g * (b - bn.running_mean.double()) + bn.bias.double()
