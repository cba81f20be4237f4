"""Function-preserving transforms: one group element per site, pushed into writers and readers."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .._errors import InvalidOptionError
from .._report import Report, new_axes
from .._threads import threads
from ..hooks._capture import inherit_copy_list
from ..groups import Dense, Group, GroupElement, ScaledPermutation, element_from_dict, get_group
from ._lattice import generators
from ._map import Site, SymmetryMap, symmetry_map


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
    ``sites`` picks site names (default: all sites of ``wb.symmetry_map(model)``); ``scale_sigma`` is
    the σ of the log-normal scalings. ``group`` forces another group at the chosen sites; one that is
    not a symmetry there (a rotation at a ReLU site) needs ``allow_non_symmetry=True``: the negative
    control, which must change the function.

    Example:
        >>> import torch, workbench as wb
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> new, t = wb.random_intertwiner(mlp, seed=1)
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(mlp(x), new(x), atol=1e-5), torch.allclose(mlp[0].weight, new[0].weight)
        (True, False)
    """
    smap = symmetry_map(model, example, affine=affine)
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
    groups = {name: G.name for name, G in drawn.items()}
    transform = Transform(elements, groups, forced, seed, type(model).__name__, affine)
    return _push_all(model, smap, transform, inplace), transform


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
    """A new model with ``transform``'s elements pushed into ``model`` (which is not modified)."""
    smap = symmetry_map(model, example, affine=transform.affine)
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
@dataclass
class _Plan:
    rows: Optional[GroupElement] = None  # acts on axis 0 (the module writes the site)
    cols: Optional[GroupElement] = None  # acts on axis 1 (the module reads a site): F⁻ᵀ
    block: int = 1  # features per channel on axis 1 (a flatten between the site and this reader)
    offset: Optional[torch.Tensor] = None  # c absorbed by the bias: b ← b − W'c (affine extension)


def _push_all(model: nn.Module, smap: SymmetryMap, transform: Transform, inplace: bool) -> nn.Module:
    from ._transformer import is_transformer_model, push_transformer

    if is_transformer_model(model):
        return push_transformer(model, smap, transform, inplace)
    old_modules = dict(model.named_modules())
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
    plans: dict[str, _Plan] = {}
    folded: set[str] = set()
    with torch.no_grad():
        for name, element in transform.elements.items():
            site = smap[name]
            offset = site.group.offset(element) if site.affine and name not in transform.forced else None
            _plan_site(modules, site, element, offset, plans, folded)
        scratch: dict = dict(_SCRATCH)
        for module_name, plan in plans.items():
            src = modules[module_name] if (inplace or module_name in folded) else old_modules[module_name]
            _apply_plan(src, modules[module_name], plan, scratch)
    return new


def _rewritten(smap: SymmetryMap, transform: Transform) -> set[str]:
    """Modules whose weight and bias :func:`_apply_plan` writes in full from the original's."""
    names, folded = set(), set()
    for site_name, element in transform.elements.items():
        site = smap[site_name]
        for w in site.writers:
            names.add(w.name)
            if w.level == "prebn" and not isinstance(element, ScaledPermutation):
                folded.add(w.name)  # folding edits the copy's weight in place: it must be copied
        names.update(r.name for r in site.readers)
    return names - folded


def _perm_part(e: GroupElement) -> Optional[ScaledPermutation]:
    return ScaledPermutation(e.perm, None, e.phi_kind, e.group) if isinstance(e, ScaledPermutation) else None


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


def _plan_site(modules: dict, site: Site, element: GroupElement, offset, plans: dict, folded: set) -> None:
    """Record what each weight of ``site`` needs; BatchNorm vectors (small) are updated right away."""
    perm = _perm_part(element)
    for w in site.writers:
        rows = element
        if w.level == "prebn":
            bn = modules[w.norm]
            if perm is None:  # a dense (forced) map cannot pass BatchNorm: fold the norm into the writer
                _fold_batchnorm(modules[w.name], bn)
                folded.add(w.name)
            else:
                rows = perm
                for t in (bn.running_mean, bn.running_var):
                    _set(t, perm.act(t.double(), 0))
                for t in (bn.weight, bn.bias):
                    _set(t, element.act(t.double(), 0))
        plans.setdefault(w.name, _Plan()).rows = rows
    for bn_name, mode in site.norms:
        if mode == "input":
            if perm is None or element.scale is not None:
                raise InvalidOptionError(f"site {site.name!r}: only a permutation can pass BatchNorm {bn_name!r}'s input exactly.")
            bn = modules[bn_name]
            for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias):
                _set(t, perm.act(t.double(), 0))
    for r in site.readers:
        level = {"prebn": perm, "pre": element, "post": element.phi()}[r.level]
        plan = plans.setdefault(r.name, _Plan())
        plan.cols, plan.block = level.inverse().transpose(), r.block  # W ↦ W F⁻¹ is F⁻ᵀ on the input axis
        if offset is not None and r.level == "post":
            plan.offset = offset


def _apply_plan(src: nn.Module, dst: nn.Module, plan: _Plan, scratch: dict) -> None:
    W, out = src.weight, dst.weight
    shape = W.shape
    if plan.block > 1:  # [out, n·block] read as [out, n, block]
        W, out = W.reshape(shape[0], -1, plan.block), out.view(shape[0], -1, plan.block)
    _act_into(W, out, plan.rows, plan.cols, scratch)
    if src.bias is not None:
        _act_into(src.bias, dst.bias, plan.rows, None, scratch)
    if plan.offset is not None:
        c = plan.offset.to(out.dtype).reshape(1, -1, *([1] * (out.ndim - 2)))
        dst.bias.sub_((out * c).sum(dim=tuple(range(1, out.ndim))))


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
    if not all(isinstance(e, (ScaledPermutation, type(None))) for e in (rows, cols)):
        value = src.double()  # a dense element: do it in float64 (rare, and small groups)
        if rows is not None:
            value = rows.act(value, 0)
        if cols is not None:
            value = cols.act(value, 1)
        _set(out, value)
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


def _fold_batchnorm(writer: nn.Module, bn: nn.Module) -> None:
    """Fold an eval-mode BatchNorm into the writer before it, leaving the norm as the identity."""
    s = torch.sqrt(bn.running_var.double() + bn.eps)
    g = bn.weight.double() / s
    W = writer.weight.double()
    _set(writer.weight, W * g.reshape(-1, *([1] * (W.ndim - 1))))
    b = writer.bias.double() if writer.bias is not None else torch.zeros_like(g)
    new_b = g * (b - bn.running_mean.double()) + bn.bias.double()
    if writer.bias is None:
        writer.bias = nn.Parameter(new_b.to(writer.weight.dtype))
    else:
        _set(writer.bias, new_b)
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)
    bn.weight.fill_(1.0)
    bn.bias.zero_()
