"""``wb.symmetry_map``: the sites of a model — hidden spaces with the group that acts on each."""
from __future__ import annotations

import dataclasses
import functools
import itertools
import re
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from .._errors import UnknownNameError, nearest
from .._report import Report, new_axes
from ..groups import Group, get_group
from ._lattice import CONSTRAINTS, generators, restrict


@dataclass(frozen=True)
class Observation:
    """A hook point where a site's activation can be read: module output, which call, at which level."""

    name: str
    call: int
    level: str  # "prebn"/"perm": moved by the permutation part; "pre": by M; "post": by φ(M); "dual": by M⁻ᵀ
    block: int = 1  # features per channel when the value is flattened channel-major
    axis: int = -1  # transformers: the axis the element acts on
    heads: Optional[tuple] = None  # transformers: only these indices of the head axis (-2) move


@dataclass(frozen=True)
class Port:
    """A parameterised module touching a site: ``level``/``block`` describe the tensor at its side.

    A writer whose output only a BatchNorm reads has level ``"prebn"`` and names that ``norm``.
    """

    name: str
    level: str
    block: int = 1
    norm: Optional[str] = None
    axis: int = 0  # transformers: the axis of the (canonical, per-head) weight that moves
    heads: Optional[tuple] = None  # transformers: only these heads (axis 0) move


@dataclass
class Site:
    """A hidden space of a model on which a group acts without changing the function.

    ``writers`` map into the space (their rows move by M), ``readers`` read from it (their columns
    move by φ(M)⁻¹), ``norms`` are BatchNorms inside it (permuted; on their output, scalings go on
    γ and β). ``hook_name`` is where its activation is best observed.
    """

    name: str
    n: int
    group: Group
    activation: str
    hook_name: str
    writers: list[Port]
    readers: list[Port]
    norms: list[tuple[str, str]]  # (BatchNorm name, "output" | "input")
    observed: list[Observation]
    notes: list[str] = field(default_factory=list)
    affine: bool = False  # uses the affine extension (offsets absorbed by readers' biases)
    # Zero-padding shortcuts: (site embedded or None, first channel, channels, level) — on those
    # channels this site's element is the embedded site's element (identity when it is no site).
    embeds: list[tuple[Optional[str], int, int, str]] = field(default_factory=list)
    # BatchNorms reading the site ("input" norms): the level of what they read ("pre", or "post": φ(M) moves it)
    norm_levels: dict = field(default_factory=dict)

    @property
    def privileged(self) -> bool:
        """True when every symmetry maps neurons to neurons (no continuous part)."""
        return not self.group.continuous

    def __repr__(self) -> str:
        return f"Site({self.name!r}, n={self.n}, group={self.group.name}, activation={self.activation})"


@dataclass(repr=False)
class SymmetryMap(Report):
    """The sites of a model and the places that are not sites, with the reason."""

    model: str
    sites: list[Site]
    skipped: list[tuple[str, str]]  # (place, reason)
    trace_error: Optional[str] = None  # why the model could not be traced or run on the example, if so

    def __iter__(self):
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def __getitem__(self, name) -> Site:
        if isinstance(name, int):
            return self.sites[name]
        for s in self.sites:
            if s.name == name or s.hook_name == name:
                return s
        close = nearest(str(name), [s.name for s in self.sites])
        raise UnknownNameError(f"no site named {name!r} in this symmetry map ({len(self.sites)} sites)."
                               + (f" Nearest: {close}." if close else ""))

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    def summary(self) -> str:
        cont = sum(not s.privileged for s in self.sites)
        return f"{self.model}: {len(self.sites)} sites ({cont} with a continuous group), {len(self.skipped)} places skipped"

    def to_frame(self):
        import pandas as pd

        rows = [(s.name, s.n, s.group.name, s.group.label or "", _phi(s.group), s.activation, s.privileged,
                 ", ".join(p.name for p in s.writers), ", ".join(p.name for p in s.readers), "; ".join(s.notes))
                for s in self.sites]
        return pd.DataFrame(rows, columns=["site", "n", "group", "label", "phi", "activation", "privileged",
                                           "writers", "readers", "notes"])

    def skipped_frame(self):
        import pandas as pd

        return pd.DataFrame(self.skipped, columns=["place", "reason"])

    def _repr_html_(self) -> str:
        skipped = self.skipped_frame().to_html(index=False, border=0) if self.skipped else "<p>none</p>"
        return super()._repr_html_() + f"<p><b>Skipped</b></p>{skipped}"

    def plot(self, ax=None):
        import seaborn as sns

        ax = new_axes(ax)
        frame = self.to_frame()
        sns.barplot(data=frame, x="site", y="n", hue="group", dodge=False, ax=ax)
        ax.set_ylabel("dimension")
        ax.set_title("sites and their groups")
        ax.tick_params(axis="x", rotation=60)
        return ax


def _phi(group: Group) -> str:
    phi = group.phi
    return "M" if phi == "identity" else ("abs(M)" if phi == "abs" else f"M^⊙{phi[1]}")


# ---------------------------------------------------------------------- building a map
def is_activation(obj: Any) -> bool:
    """Whether the activation catalogue knows ``obj`` (a module, a function, or a function with its
    arguments bound, as :func:`workbench.groups.activation_call` makes)."""
    from ..groups import intertwiner_group

    if isinstance(obj, nn.Module):
        if list(obj.children()) or (list(obj.parameters(recurse=False)) and not isinstance(obj, nn.PReLU)):
            return False
    elif not callable(obj):
        return False
    try:
        intertwiner_group(obj, obj.num_parameters if isinstance(obj, nn.PReLU) else 1)
    except (ValueError, TypeError, KeyError):
        return False
    return True


def default_examples(model: nn.Module) -> list[torch.Tensor]:
    """One-example inputs to try, inferred from the first layer (common image sizes for conv nets)."""
    for m in model.modules():
        p = next(m.parameters(recurse=False), None)
        kw = {"dtype": p.dtype, "device": p.device} if p is not None else {}
        if isinstance(m, nn.Conv2d):
            return [torch.zeros(1, m.in_channels, s, s, **kw) for s in (32, 28, 8, 16, 64, 224)]
        if isinstance(m, nn.Conv1d):
            return [torch.zeros(1, m.in_channels, s, **kw) for s in (64, 32, 128, 16, 256)]
        if isinstance(m, nn.Conv3d):
            return [torch.zeros(1, m.in_channels, s, s, s, **kw) for s in (16, 8, 32)]
        if isinstance(m, nn.Linear):
            return [torch.zeros(1, m.in_features, **kw)]
    return []


# Maps of a model, keyed by everything a map depends on (see _memo_key); a few per model, because
# a transform made on a guessed input size is then verified at the user's.
_MEMO: "weakref.WeakKeyDictionary[nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
_MEMO_PER_MODEL = 4


def _plain(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str)) or (isinstance(v, tuple) and all(map(_plain, v)))


def _memo_key(model: nn.Module, example: Optional[torch.Tensor], affine: bool) -> tuple:
    """What a map depends on: the module tree (objects, classes, a ``forward`` set on an instance,
    plain attributes such as a slope or a padding), which tensors every parameter and buffer is (tying
    shows here), the values of activation parameters (a PReLU's slope picks its group), the
    example's shape, dtype and device, and ``affine``. Not covered: state a ``forward`` reads from
    outside the model (globals); call with a fresh model object after changing such state."""
    from ._shared import _view

    mods = tuple((name, id(m), type(m), id(vars(m).get("forward")),
                  tuple(sorted((k, v) for k, v in vars(m).items() if not k.startswith("_") and k != "training"
                               and _plain(v))))
                 for name, m in model.named_modules(remove_duplicate=False))
    tensors = tuple((name, id(t), _view(t)) for name, t in itertools.chain(
        model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)) if t is not None)
    slopes = tuple(tuple(m.weight.detach().flatten().tolist()) for m in model.modules() if isinstance(m, nn.PReLU))
    ex = None if example is None else (tuple(example.shape), example.dtype, example.device)
    return mods, tensors, slopes, ex, affine


def one_example(inputs: Any) -> Optional[torch.Tensor]:
    """The first example of an input batch (what a map is traced on), or None for non-tensor inputs."""
    if isinstance(inputs, torch.Tensor) and inputs.ndim >= 1 and len(inputs) >= 1:
        return inputs[:1]
    return None


def symmetry_map(model: nn.Module, example: Optional[torch.Tensor] = None, *, affine: bool = False) -> SymmetryMap:
    """The sites of ``model`` with their groups, writers and readers, and the places skipped with why.

    The model is traced with ``torch.fx`` and run once on one example (in eval mode, without
    gradients; it is not modified); anything the rules do not understand is listed in ``skipped``
    and never transformed. ``example`` is an input batch (its first example is used; inferred for
    plain CNNs and MLPs when omitted). A model that cannot be traced or run gets an empty map whose
    ``trace_error`` names the first call that failed. ``affine=True`` adds the affine extension where
    readers' biases can absorb a constant (sigmoid sign flips); those sites are labelled.

    Example:
        >>> import torch, workbench as wb
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> smap = wb.symmetry_map(mlp)
        >>> [(s.name, s.n, s.group.name) for s in smap]
        [('1', 8, 'scaled_permutation')]
    """
    from ._graph import Graph
    from ._trace import TraceFailure
    from ._transformer import is_transformer_model, transformer_map

    if not isinstance(model, nn.Module):
        raise TypeError(f"symmetry_map expects a torch.nn.Module; got {type(model).__name__}.")
    if is_transformer_model(model):  # read from the weights each time: folding changes the groups
        return transformer_map(model)
    if example is not None:
        if not isinstance(example, torch.Tensor):
            raise TypeError(f"symmetry_map: example must be an input tensor (a batch); got {type(example).__name__}.")
        example = one_example(example) if example.ndim >= 1 and len(example) > 1 else example
    key = _memo_key(model, example, affine)
    memo = _MEMO.setdefault(model, OrderedDict())
    if key in memo:
        memo.move_to_end(key)
        return _copy(memo[key])
    candidates = default_examples(model) if example is None else [example]
    graph, errors = None, []
    for candidate in candidates:
        try:
            graph = Graph(model, candidate, is_activation)
            break
        except TraceFailure as exc:  # untraceable control flow, a wrong input size: say so, transform nothing
            errors.append(str(exc))
            if str(exc).startswith("torch.fx could not trace"):
                break  # tracing does not depend on the input: other sizes fail the same way
    if graph is None:
        if not candidates:
            why = "cannot guess an input for this model; pass example= (one input batch)"
        elif example is None and not errors[-1].startswith("torch.fx could not trace"):
            why = (f"no guessed input worked (tried shapes {[tuple(c.shape) for c in candidates]}); pass example=. "
                   f"Last: {errors[-1]}")
        else:
            why = errors[-1]
        smap = SymmetryMap(type(model).__name__, [], [(type(model).__name__, why)], trace_error=why)
    else:
        smap = _build(graph, type(model).__name__, affine)
    memo[key] = smap
    while len(memo) > _MEMO_PER_MODEL:
        memo.popitem(last=False)
    return _copy(smap)


def _copy(smap: SymmetryMap) -> SymmetryMap:
    """A map the caller may edit without editing the memoised one."""
    return dataclasses.replace(smap, sites=list(smap.sites), skipped=list(smap.skipped))


def _build(graph, model_name: str, affine: bool) -> SymmetryMap:
    from ..groups import intertwiner_group

    from ._shared import clashes

    sites, skipped = [], []
    site_of_space: dict[int, str] = {}
    root_of: dict[int, Site] = {}
    for space in _parents_first(graph):
        reasons = list(dict.fromkeys(space.frozen))
        if not space.writers:
            if space.label and reasons:  # made by an op the rules do not know
                skipped.append((space.label, "; ".join(reasons)))
            continue
        place = ", ".join(dict.fromkeys(w for w, _ in space.writers))
        if not reasons and not space.readers and not space.embedded:
            reasons.append("its values are not used (no layer reads them)")
        n = space.n
        kinds = {_act_label(a) for a, _, _ in space.activations}
        notes = list(dict.fromkeys(space.shared))
        use_affine = affine and space.offsets_ok
        groups = [intertwiner_group(a, n, affine=use_affine) if affine else intertwiner_group(a, n)
                  for a, _, _ in space.activations]
        if len({g.phi for g in groups}) > 1:
            reasons.append(f"activations with different homomorphisms φ share it ({sorted(kinds)})")
        if reasons:
            skipped.append((place, "; ".join(reasons)))
            continue
        if groups:
            group = groups[0]
            for other in groups[1:]:  # e.g. ReLU and LeakyReLU on one residual stream
                group = restrict(group, generators(other))
            if affine and not space.offsets_ok:
                notes.append("affine extension off: a reader with zero padding or a max pool cannot absorb a constant")
        else:
            group = get_group("gl", n)
            notes.append("no nonlinearity: a linear site")
        for kind, node in space.constraints:
            if kind == "max_pool" and graph.info[node].level == "post" and _phi_positive(group.phi):
                continue  # φ(M) = abs(M) or an even power is already a positive scaled permutation
            allowed, why = CONSTRAINTS[kind]
            if kind == "mixed_levels":
                if group.phi == "identity":
                    continue
                allowed, why = {"perm"}, ("pre- and post-activation values are added, so an element must equal its "
                                          "φ(M); the rules grant permutations")
            new = restrict(group, allowed)
            if new.name != group.name:
                notes.append(f"{group.name} → {new.name}: {why}")
                group = new
        if group.name == "trivial":
            skipped.append((place, "no map but the identity keeps the function: " + "; ".join(notes)))
            continue
        level_of = {node: graph.info[node] for node in graph.info}
        norm_of = {node: bn for bn, mode, node in space.norms if mode == "output"}
        writers = list(dict.fromkeys(Port(w, level_of[node].level, norm=norm_of.get(node)) for w, node in space.writers))
        readers = list(dict.fromkeys(Port(r, level_of[node].level, level_of[node].block) for r, node in space.readers))
        norms = list(dict.fromkeys((bn, mode) for bn, mode, _ in space.norms))
        if norm_of and group.continuous:
            notes.append(f"BatchNorm {', '.join(sorted(set(norm_of.values())))} folds into its writer for maps that "
                         f"are not scaled permutations: exact in eval mode (running statistics), as verify runs")
        offset = group.offset(group.identity()) if hasattr(group, "offset") else None
        is_affine = bool(affine and offset is not None)
        observed = [Observation(name, call, level_of[node].level, level_of[node].block)
                    for name, call, node in space.observed]
        act_nodes = {node for _, _, node in space.activations}
        bn_names = {bn for bn, _, _ in space.norms}
        ranked = ([o for o, (_, _, node) in zip(observed, space.observed) if node in act_nodes]
                  + [o for o in observed if o.name in bn_names and o.level == "pre"]
                  + [o for o in observed if o.level == "pre"] + observed)
        primary = ranked[0]
        label = primary.name + (f"#{primary.call}" if primary.call else "")
        embeds = [(site_of_space.get(graph.find(pid)), start, count, level_of[node].level)
                  for pid, start, count, node in space.embeds]
        if embeds:
            notes.append("zero-padding shortcut: channels " + ", ".join(
                f"{a}–{a + c - 1} carry {p or 'an untransformed space'}" for p, a, c, _ in embeds))
        site_of_space[space.id] = label
        norm_levels = {bn: level_of[node].level for bn, mode, node in space.norms if mode == "input"}
        sites.append(Site(label, n, group, ", ".join(sorted(kinds)) or "none", primary.name, writers, readers,
                          norms, observed, notes, is_affine, embeds, norm_levels))
        root_of[graph.find(space.id)] = sites[-1]
    drop = clashes(graph, root_of)  # a shared tensor whose uses would need two different maps
    skipped += [(", ".join(dict.fromkeys(p.name for p in s.writers)), drop[s.name]) for s in sites if s.name in drop]
    return SymmetryMap(model_name, [s for s in sites if s.name not in drop], skipped)


def _phi_positive(phi) -> bool:
    """Whether φ(M) has only non-negative entries for every M (abs, or an even power)."""
    return phi == "abs" or (isinstance(phi, tuple) and phi[0] == "power" and float(phi[1]) % 2 == 0)


def _parents_first(graph) -> list:
    """Spaces ordered so that a space embedded by a zero-padding shortcut comes before its host."""
    done, order = set(), []

    def visit(space):
        if space.id in done:
            return
        done.add(space.id)
        for pid, *_ in space.embeds:
            parent = graph.spaces.get(graph.find(pid))
            if parent is not None:
                visit(parent)
        order.append(space)

    for space in list(graph.spaces.values()):
        visit(space)
    return order


def _act_label(act) -> str:
    if isinstance(act, nn.Module):
        return type(act).__name__
    if isinstance(act, functools.partial):  # a functional call with its arguments: "leaky_relu(negative_slope=0.2)"
        from ..groups import intertwiner_group

        return re.sub(r"^(torch\.special\.|torch\.|F\.)", "", intertwiner_group(act, 1).activation)
    return getattr(act, "__name__", str(act))
