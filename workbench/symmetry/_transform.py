"""Function-preserving transforms: one group element per site, pushed into writers and readers."""
from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
import torch
from torch import nn

from .._errors import InvalidOptionError, UnknownNameError, UntraceableModelError, WorkbenchError
from .._memory import keep_freed_memory
from .._offload import built_alike, offloaded_modules
from .._progress import ProgressLike, progress_bar, show_progress
from .._random import SeedLike, as_generator
from .._report import Report, new_axes
from .._threads import threads
from ..groups import Group, GroupElement, ScaledPermutation, element_from_dict, get_group
from ..models import one_call
from ._backend import backend_for, one_example
from ._kernels import abs_range
from ._lattice import generators
from ._map import symmetry_map
from ._sites import Site, SymmetryMap


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
        """The transform a :meth:`to_dict` record describes. A record that is no transform is refused, naming what
        is wrong: each element must be the invertible map it says it is (a permutation of its indices, finite
        nonzero scalings, an "orthogonal" matrix whose transpose is its inverse, an inverse that is M's), and
        every element needs its group's name (and every group name and forced site an element). Whether an element
        is a symmetry of a model is checked where it meets one (:func:`apply_transform`)."""
        if not isinstance(d, dict) or d.get("format") != "workbench-transform":
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise InvalidOptionError(f"not a workbench transform record: format {got!r}, expected 'workbench-transform' "
                                     f"(written by Transform.save / to_dict).")
        if d.get("version", 1) != 1:
            raise InvalidOptionError(f"a transform record of version {d.get('version')!r}; this workbench reads version 1.")
        missing = [k for k in ("elements", "groups") if not isinstance(d.get(k), dict)]
        if missing:
            raise InvalidOptionError(f"a transform record needs {' and '.join(map(repr, missing))} (a dict per site); "
                                     f"this one has {sorted(d)}.")
        elements, groups = d["elements"], d["groups"]
        if set(elements) != set(groups):
            raise InvalidOptionError(
                f"the record's elements and groups name different sites: elements without a group "
                f"{sorted(set(elements) - set(groups))}, groups without an element {sorted(set(groups) - set(elements))}. "
                f"Each site needs both (its group's name is what verify reports).")
        forced = list(d.get("forced", []))
        if not set(forced) <= set(elements):
            raise InvalidOptionError(f"the record's forced sites {sorted(set(forced) - set(elements))} have no element; "
                                     f"forced lists sites of the transform given a map outside their group.")
        seed = d.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidOptionError(f"the record's seed {seed!r} is not an int (or null).")
        from ._graph_groupnorm import with_input_signs  # a GroupNorm site's signs on its input (DERIVATIONS §9)

        return cls({k: with_input_signs(element_from_dict(v, f"the element for site {k!r}"), v)
                    for k, v in elements.items()}, dict(groups), forced, seed, d.get("model", ""), bool(d.get("affine", False)))

    def save(self, path: Union[str, Path]) -> None:
        """Write the record as JSON (elements as plain numbers; no pickle)."""
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Transform":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _is_subgroup(sub: Group, site: Site) -> bool:
    """Whether ``sub`` lies in the site's group. A family with parameters read from the model is judged on them too:
    a rotary group is its pairs (another pairing, or none — GL on every dimension — is no subgroup), and a normed
    rotary group's rigid pairs (±I only) must stay rigid."""
    if not generators(sub) <= generators(site.group):
        return False
    own = site.group
    if getattr(sub, "pairs", None) is not None and getattr(own, "pairs", None) is not None and sub.pairs != own.pairs:
        return False
    return set(getattr(sub, "rigid", ())) >= set(getattr(own, "rigid", ()))


def _named_group(group: Union[str, Group], site: Site) -> Group:
    """The group ``group`` names at ``site``. A name of the site's own family is the site's group: a family with
    parameters read from the model is not its default (``get_group("rotary", n)`` has no pairs, i.e. GL on every
    dimension; drawn at a rotary site it changed a Llama's log-probabilities by 0.2 with no refusal)."""
    G = get_group(group, site.n)
    return site.group if isinstance(group, str) and G.name == site.group.name else G


def random_intertwiner(model: nn.Module, seed: SeedLike = 0, sites: Optional[Iterable[str]] = None,
                       scale_sigma: float = 1.0, *, group: Union[None, str, Group] = None,
                       allow_non_symmetry: bool = False, example: Optional[torch.Tensor] = None,
                       affine: bool = False, inplace: bool = False,
                       progress: ProgressLike = None) -> tuple[nn.Module, Transform]:
    """A new model with a random element of each site's own group pushed into its weights.

    Returns ``(new_model, transform)``; the input model is not modified (unless ``inplace=True``).
    ``seed`` is an int, None, a ``torch.Generator`` or a NumPy ``Generator`` (one draw is taken from a
    generator, which advances); the transform records the effective int seed, which reproduces it.
    ``inplace=True`` rewrites the values of the model's own parameters (the same objects): their ``.grad``
    and any optimizer state (Adam's moments) stay in the old basis — zero them, or make a new optimizer.
    ``sites`` picks site names (default: all sites of ``wb.symmetry_map(model, example)``; ``example``
    is an input batch, needed when the input size cannot be guessed); ``scale_sigma`` is the σ of the
    log-normal scalings — a σ whose scalings the model's dtype cannot hold is refused. ``group``
    forces another group at the chosen sites; one that is not a symmetry there (a rotation at a ReLU
    site) needs ``allow_non_symmetry=True``: the negative control, which must change the function.
    A model that cannot be traced raises :class:`~workbench._errors.UntraceableModelError`.
    ``progress``: a bar of the three steps (the symmetry map, drawing the elements, pushing them into
    the weights): True, False, or None (the default) for a bar in a Jupyter notebook only.

    Example:
        >>> import torch, workbench as wb
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> new, t = wb.random_intertwiner(mlp, seed=1)
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(mlp(x), new(x), atol=1e-5), torch.allclose(mlp[0].weight, new[0].weight)
        (True, False)
    """
    shown = show_progress(progress)  # (a bad value is refused here)
    # one_call: the layout backend's views of the model's weights, read by the map and the push, made once
    with _no_values_refused(model, "random_intertwiner"), progress_bar(total=3, desc="random_intertwiner", unit="step", progress=True) if shown else _QUIET as bar, one_call():
        bar.set_postfix_str("symmetry map")
        gen, seed = as_generator(seed)  # the effective int seed is what the Transform records
        smap = _traced_map(model, example, affine, "random_intertwiner")
        bar.update()
        bar.set_postfix_str("draw elements")
        transform = _draw(model, smap, seed, gen, sites, scale_sigma, group, allow_non_symmetry, affine)
        bar.update()
        bar.set_postfix_str("push into weights")
        hint = f"scale_sigma={scale_sigma:g} draws scalings the model's dtype cannot hold; use a smaller scale_sigma"
        new_model = _push(model, smap, transform, inplace, hint)
        bar.update()
    return new_model, transform


class _Quiet:
    """The bar of a call that shows none: tqdm's own disabled bar costs a tenth of a millisecond to make
    (a lock, a registry entry), a tenth of a 5M-parameter MLP's whole copy; this costs nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "") -> None:
        pass


_QUIET = _Quiet()


def _draw(model: nn.Module, smap: SymmetryMap, seed: int, gen: torch.Generator, sites, scale_sigma: float, group,
          allow_non_symmetry: bool, affine: bool) -> Transform:
    """One random element of each chosen site's group (or of ``group``, checked against the site's)."""
    drawn: dict[str, Group] = {}  # site name -> the group its element comes from
    site_of: dict[str, Site] = {}  # looked up once (each ``smap[name]`` is a few µs, three per site)
    with_sigma: dict[Group, Group] = {}  # a group -> its copy with this call's σ, one per equal group
    forced = []
    for site in _choose(smap, sites):
        site_of.setdefault(site.name, site)
        G = site.group if group is None else _named_group(group, site)
        if group is not None and not _is_subgroup(G, site):
            if not allow_non_symmetry:
                raise InvalidOptionError(
                    f"{G.name} is not a symmetry of site {site.name!r} ({site.activation}, group {site.group.name}: "
                    f"{site.group.label}); a map from it would change the function. Use group={site.group.name!r}, "
                    f"or pass allow_non_symmetry=True for a negative control."
                )
            forced.append(site.name)
        if getattr(G, "sigma", scale_sigma) != scale_sigma:  # a copy with this call's σ; the map's group is shared
            copied = with_sigma.get(G)  # (Swin-T's 276 head sites carry equal groups: 276 copies were ~1 ms)
            if copied is None:
                copied = with_sigma[G] = copy.copy(G)
                copied.sigma = scale_sigma
            G = copied
        drawn[site.name] = G  # (no copy where σ already agrees: ~5 µs a site, 300 sites on Swin-T; nothing here writes to it)
    elements = {}
    from ._host_group import host_element

    with threads(1):  # hundreds of small draws (QRs of 64×64 per head): see workbench._threads
        # Sites that embed no other site: one batched draw per group (a GPT-2-small transform's 288
        # per-head GL(64) maps are one QR call); then the embedding sites, which need their parents.
        same: dict[Group, list[str]] = {}
        for name, G in drawn.items():
            if not site_of[name].embeds:
                same.setdefault(G, []).append(name)
        for G, names in same.items():
            elements.update(zip(names, G.sample_many(len(names), gen)))
        for name, G in drawn.items():
            if site_of[name].embeds:
                if group is not None:
                    _check_host_alone(site_of[name], G, drawn)
                elements[name] = host_element(G, site_of[name], elements, gen)
    elements = {name: elements[name] for name in drawn}  # in site order
    for name, element in elements.items():
        element.phi_kind = site_of[name].group.phi  # readers undo φ of the site's own activation
    _check_elements(elements, scale_sigma)
    groups = {name: G.name for name, G in drawn.items()}
    return Transform(elements, groups, forced, seed, type(model).__name__, affine)


def _push(model: nn.Module, smap: SymmetryMap, transform: Transform, inplace: bool, hint: str = "") -> nn.Module:
    """The backend's push, where every tensor stays on the device of the module that owns it. Modules whose
    weights accelerate offloaded (``meta`` parameters, loaded per forward by a hook) are onloaded while
    the push reads them, and the copy's are offloaded again, its hooks serving the transformed weights."""
    keep_freed_memory()  # once per process: a transform's new weights reuse freed memory, as captures do
    _check_whole_units(smap, transform)
    offloaded = offloaded_modules(model)
    if offloaded and inplace:
        raise InvalidOptionError(
            f"inplace=True cannot transform weights accelerate offloaded ({len(offloaded)} modules, e.g. "
            f"{offloaded[0][0]!r}): they live in its offload folder or map, not in the model. Use inplace=False "
            f"(the copy keeps the same device layout; its offloaded weights are held in CPU memory).")
    return built_alike(model, lambda: backend_for(model).push(model, smap, transform, inplace, hint))


def _check_whole_units(smap: SymmetryMap, transform: Transform) -> None:
    """Refuse an element that is not a plain permutation at a site that moves whole units: attention heads, a mixture's
    experts (every writer a ``"heads"`` port, which moves blocks of weights by a permutation). Its signs, scales or
    mixing have no place in those weights and were dropped in silence: a signed permutation forced on the experts'
    order for a negative control was pushed as its permutation alone, and verify called that control a PASS."""
    for name, element in transform.elements.items():
        site = smap[name]
        if not site.writers or any(p.level != "heads" for p in site.writers):
            continue
        plain = isinstance(element, ScaledPermutation) and (element.scale is None or bool((element.scale == 1).all()))
        if not plain:
            raise InvalidOptionError(
                f"site {name!r} moves whole units ({site.activation}): only a permutation of them acts on the "
                f"weights, so a {transform.groups.get(name, type(element).__name__)} element there would lose its "
                f"signs, scales or mixing and change nothing a permutation does not. For a negative control, force "
                f"a larger group on a space inside those units (a head's qk/ov site, an expert's hidden units) or on "
                f"the stream.")


def _traced_map(model: nn.Module, example, affine: bool, verb: str) -> SymmetryMap:
    smap = symmetry_map(model, one_example(example) if example is not None else None, affine=affine)
    if smap.trace_error is not None:
        raise UntraceableModelError(f"{verb}: no symmetry of {type(model).__name__} can be used: {smap.trace_error}")
    return smap


_SCREENED = (torch.float32, torch.float64)


def _check_elements(elements: dict, scale_sigma: float) -> None:
    """``_check_element`` of every element, in one pass per kind and dtype over all of them (a Swin-T draw has
    ~300 elements, and the per-element calls cost more than their arithmetic). Only where that pass finds a
    value that is not finite are the elements checked one by one, in order, so the refusal names the same
    (first) site as before."""
    scales: dict = {}  # dtype -> the scaled permutations' |scale| arrays
    dense: dict = {}  # dtype -> the dense maps' flattened matrices
    # (the loop is lean on purpose: Swin-T's 276 per-head maps spent 1.2 ms here on attribute and device lookups)
    for name, e in elements.items():
        perm = isinstance(e, ScaledPermutation)
        values = e.scale if perm else getattr(e, "M", None)
        if values is None:
            continue
        if not values.is_cpu or values.dtype not in _SCREENED:
            _check_element(name, e, scale_sigma)
            continue
        kind = scales if perm else dense
        kind.setdefault(values.dtype, []).append((values.detach() if values.requires_grad else values).numpy())
    bad = False
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        # A dense map's screen is the sum of its entries, which is finite only if every entry is (inf or NaN in a
        # sum of IEEE numbers stays inf or NaN); so is the sum of those sums, unless it overflows, and then every
        # map is checked exactly below. No concatenation: ViT-B/16's 576 GL(64) maps would be 19 MB of fresh memory.
        for parts in dense.values():
            bad = bad or not math.isfinite(sum(float(m.sum()) for m in parts))
        for parts in scales.values():  # one dtype per concatenation: 1/a must round in the element's own dtype
            # every |a| and 1/|a| finite ⟺ max|a| and 1/min|a| are (1/x rounds monotonically; NaN propagates)
            values = parts[0].reshape(-1) if len(parts) == 1 else np.concatenate([a.reshape(-1) for a in parts])
            if values.size:
                lo, hi = abs_range(values)
                one = values.dtype.type(1)
                bad = bad or not np.isfinite(hi) or not np.isfinite(one / values.dtype.type(lo))
    if bad:
        for name, e in elements.items():
            _check_element(name, e, scale_sigma)


def _check_element(name: str, e: GroupElement, scale_sigma: float) -> None:
    """A drawn element must be an invertible map in float64 (a huge σ under- or overflows its scalings)."""
    values = e.scale if isinstance(e, ScaledPermutation) else getattr(e, "M", None)
    if values is None:
        return
    values = values.detach()
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        # NumPy: one pass each, a fifth of torch's per-call cost on these small vectors; 1/0 is inf
        a = np.abs(values.numpy())
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            bad = not np.isfinite(a).all() or (isinstance(e, ScaledPermutation) and not np.isfinite(1 / a).all())
    else:
        bad = not bool(torch.isfinite(values).all())
        if isinstance(e, ScaledPermutation):
            bad = bad or bool((values == 0).any()) or not bool(torch.isfinite(1 / values).all())
    if bad:
        raise InvalidOptionError(f"scale_sigma={scale_sigma:g}: the element drawn for site {name!r} is not an invertible "
                                 f"map in float64 (its scalings under- or overflow); use a smaller scale_sigma.")


def _check_host_alone(site: Site, G: Group, chosen) -> None:
    """Refuse a group named for a host site (a concatenation, a shuffled layout, a zero-padding shortcut) every
    channel of which carries a piece's element, chosen without any of its pieces: its element is its pieces' (the
    identity where they are not chosen), so nothing of ``G`` reaches the weights, yet the transform records ``G``
    there. A rotation forced on SqueezeNet's concatenated Fire output for a negative control was the identity, and
    verify called it a PASS. (Chosen with its pieces, the host carries their elements, drawn from ``G`` too; with
    no group named, a host chosen alone takes the identity, an element of its own group, and the function is kept.)"""
    from ._host_group import carried_width

    if carried_width(site) < site.n:
        return  # G acts on the channels nothing embeds
    if any(piece in chosen for piece, *_ in site.embeds):
        return  # the host carries those pieces' elements
    pieces = ", ".join(dict.fromkeys(repr(p) if p else "an untransformed space" for p, *_ in site.embeds))
    raise InvalidOptionError(
        f"site {site.name!r} carries its pieces' elements on every channel ({pieces}): an element of {G.name} there "
        f"alone would be theirs, the identity where they are not chosen, and change nothing. Choose the pieces in "
        f"sites= too (the group applies to them as well).")


def apply_transform(model: nn.Module, transform: Transform, *, example: Optional[torch.Tensor] = None,
                    inplace: bool = False) -> nn.Module:
    """A new model with ``transform``'s elements pushed into ``model`` (which is not modified).

    ``example`` is an input batch (needed when the input size cannot be guessed). A transform the
    model's dtype cannot hold (weights that would overflow) is refused before anything is written, and so
    is one that is not a symmetry of *this* model: each element (unless listed in ``transform.forced``)
    must be in its site's group here, with the site's φ — a transform drawn on another model whose map
    differs (another activation, a LayerNorm gain of 1 or not, a site frozen on one) is refused, naming
    the site."""
    with _no_values_refused(model, "apply_transform"), one_call():  # (see random_intertwiner)
        smap = _traced_map(model, example, transform.affine, "apply_transform")
        for name, e in transform.elements.items():
            try:
                site = smap[name]
            except UnknownNameError as exc:
                raise UnknownNameError(f"the transform names site {name!r}, which {type(model).__name__} does not have "
                                       f"(was the transform made for another model, or is the site frozen or skipped "
                                       f"here: wb.symmetry_map(model).skipped says why): {exc}") from None
            if site.n != e.n:
                raise InvalidOptionError(f"the transform's element for {name!r} acts on {e.n} dimensions; the site has {site.n}.")
            e.validate(f"the transform's element for site {name!r}")
            if site.embeds and name not in transform.forced:
                _check_host(site, e, transform.elements)
        members = [(smap[name], e) for name, e in transform.elements.items()
                   if name not in transform.forced and not smap[name].embeds]
        # Membership is checked before an in-place push (which must not write a refused element), and after a push
        # into a copy, so that the push's own, more specific refusals (a GroupNorm or a grouped conv that a
        # permutation crosses) speak first; a refused copy is dropped.
        if inplace:
            for site, e in members:
                _check_member(model, site, e, transform.groups.get(site.name, "?"))
        new_model = _push(model, smap, transform, inplace)
        if not inplace:
            for site, e in members:
                _check_member(model, site, e, transform.groups.get(site.name, "?"))
        return new_model


@contextlib.contextmanager
def _no_values_refused(model: nn.Module, verb: str):
    """A model whose weights are on the ``meta`` device (built under ``torch.device("meta")``, never loaded) has no
    values to transform: torch's own error from deep inside the map or the push ("Tensor.item() cannot be called on
    meta tensors") becomes a refusal saying so. Looked at only when something failed (accelerate's offloaded
    weights are on ``meta`` too, and transform as they are served)."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as exc:
        if isinstance(exc, WorkbenchError):
            raise
        meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if not meta or offloaded_modules(model):
            raise
        raise InvalidOptionError(
            f"{verb}: {type(model).__name__}'s weights are on the meta device ({len(meta)} parameters, e.g. {meta[0]!r}): "
            f"they have shapes but no values, so there is nothing to transform. Load the weights first "
            f"(model.to_empty(device='cpu') and load_state_dict, or from_pretrained).") from exc


def _check_member(model: nn.Module, site: Site, e: GroupElement, drawn_from: str) -> None:
    """A transform replayed on a model (another one, the same one edited, one whose map differs: a LayerNorm gain
    of 1 gives rotations, a GELU only permutations) must be a symmetry of *that* model's site: its element in the
    site's group, and the readers undoing φ of the site's own activation (φ(M) = M for a ReLU, M^{⊙2} for x²).
    Otherwise the push changes the function while the transform says it is a symmetry."""
    phi = site.group.phi
    if e.phi_kind != phi and not (isinstance(e, ScaledPermutation) and e.scale is None):  # φ(P) = P for every φ
        raise InvalidOptionError(
            f"site {site.name!r} of {type(model).__name__}: the transform's element moves the activation after the "
            f"nonlinearity by φ = {_phi_text(e.phi_kind)}, but this model's site ({site.activation}, group "
            f"{site.group.name}) moves it by φ = {_phi_text(phi)}: the element was drawn for another activation (was "
            f"the transform made for another model?), and pushing it would change the function. Draw a transform "
            f"for this model (wb.random_intertwiner), or list the site in the transform's forced sites for a "
            f"negative control.")
    if not site.group.contains(e):
        raise InvalidOptionError(
            f"site {site.name!r} of {type(model).__name__}: the transform's element ({type(e).__name__}, drawn from "
            f"{drawn_from}) is not in the site's group {site.group.describe()}: it is not a symmetry "
            f"of this model, whose map differs from the one the transform was drawn on (another activation, a "
            f"LayerNorm gain that is or is not all ones, a site frozen or shared), or the record was edited. "
            f"Draw a transform for this model (wb.random_intertwiner), or list the site in the transform's forced "
            f"sites for a negative control.")


def _phi_text(phi) -> str:
    return {"identity": "M", "abs": "abs(M)"}.get(phi, f"M^{phi[1]}" if isinstance(phi, tuple) else str(phi))


def _check_host(site: Site, element: GroupElement, elements: dict) -> None:
    """A host site (a concatenation, a zero-padding shortcut, a shuffled layout) carries the elements of the
    sites it embeds on their channels: its element there must be theirs (the identity for a piece the
    transform leaves alone), or the pieces' writers and the host's readers would move by different maps and
    the function would change. random_intertwiner builds hosts that way; a hand-made Transform may not. On the
    channels nothing carries (a zero-padding shortcut's new channels) it must be in the host's own family: a
    rotation there, at a ReLU, was accepted unforced and moved a CIFAR ResNet's outputs by 1.4 (relative): nothing
    checked those channels."""
    from ._host_group import carries, implied_host

    if not carries(site, element, implied_host(site, elements)):
        pieces = ", ".join(dict.fromkeys(p or "an untransformed space" for p, *_ in site.embeds))
        raise InvalidOptionError(
            f"the element for {site.name!r} does not carry its pieces' elements on their channels ({pieces}): "
            f"a host site's element there must be theirs (the identity for a piece the transform leaves out), or "
            f"the pieces' writers and {site.name!r}'s readers move differently and the function changes. Give the "
            f"pieces' elements and build the host from them (wb.random_intertwiner does), or list {site.name!r} "
            f"in the transform's forced sites for a negative control.")
    free = getattr(site.group, "free", ())
    if free:
        from ._host_group import on_channels

        family = site.group.free_family()
        part = on_channels(element, free)
        if part is None or not family.contains(part):
            raise InvalidOptionError(
                f"the element for {site.name!r} is not in {family.describe()} on the {len(free)} channels "
                f"nothing carries into it (a zero-padding shortcut's new channels): it is no "
                f"symmetry of the model there. Draw them from {family.name} (wb.random_intertwiner does), or list "
                f"{site.name!r} in the transform's forced sites for a negative control.")


def _choose(smap: SymmetryMap, sites) -> list[Site]:
    if sites is None:
        return list(smap.sites)
    names = [sites] if isinstance(sites, str) else list(sites)
    return [smap[n] for n in names]
