"""Graph rules for GroupNorm (``nn.GroupNorm``, ``F.group_norm``; docs/DERIVATIONS.md §9).

GroupNorm(g) normalises each of g contiguous groups of c = C/g channels over (channels × positions) per
example, then applies a per-channel gain γ and bias β. Let ``n(x)`` be the normalised tensor. A map M of its
input passes the normalisation, ``n(M·x) = K·n(x)``, when M maps whole groups onto groups, permutes channels
within them and multiplies each group by one sign (the group's mean and sum of squared deviations are then
kept up to that sign); every other map changes some group's statistics (a per-channel scaling, a permutation
across groups) or is exact only as ε → 0 (a positive uniform scaling of a group). So:

- **A writer feeding only the norm** (``conv → GN``: the norm *reads the writer's output*). Its output moves
  by S·P — P mapping groups onto groups, S one sign per group — and the norm's output by D·P with any
  nonzero D: ``γ ↦ S·D·P·γ`` (γ absorbs both the sign and D), ``β ↦ D·P·β``. D·P is what the next layer
  sees, so the activation after the norm decides D (ReLU: D₊; GELU, SiLU: 1; nothing: any D≠0). Both are one
  element here: the site's element is D·P (the norm's output, which the readers undo); the drawn element of
  :class:`GroupSigns` also carries S (``InputSigned.signs``), which only the writer's rows, γ and the
  observations of the writer's output use (level ``"pregn"``). Without a gain there is nothing to absorb S
  or D: the element is P, the writer's output moving by it too.
- **Anything else reading the norm** (a residual stream, a post-activation tensor): the norm's output
  moves by what its input moves by when that is a permutation mapping groups onto groups, with γ and β
  permuted. (The derivation also lets a sign per group pass, β taking it; not sampled: the space's other
  readers would have to take it too.)
"""
from __future__ import annotations

import math
from functools import reduce
from typing import Optional

import torch
from torch import fx, nn

from .._errors import InvalidOptionError
from ..groups import Group, ScaledPermutation
from ._channel_families import OnBase

# What a GroupNorm reading a space allows (read by _graph_sites._build like _lattice.CONSTRAINTS); the
# permutation is restricted further to maps of whole groups (see ``site_group``).
CONSTRAINTS = {
    "groupnorm": ({"perm"},
                  "a GroupNorm reads this space and its output moves by the same element (no gain to absorb a "
                  "scaling, or another reader): only permutations mapping its groups onto each other pass it, γ "
                  "and β permuted (docs/DERIVATIONS.md §9)"),
    "groupnorm_output": ({"perm", "pos_scale", "neg"},
                         "a GroupNorm with a gain writes this space from its writer's output: its γ and β take any "
                         "per-channel scaling of its output; no rotation passes its per-channel gain "
                         "(docs/DERIVATIONS.md §9)"),
}


class InputSigned(ScaledPermutation):
    """``D·P`` on a GroupNorm's output, with ``signs`` S (±1 per channel, one value per group, indexed like the
    scale) on its input: the writer before the norm moves by S·P, γ by S·D·P (docs/DERIVATIONS.md §9). Every
    other use of the element (readers, the norm's output, composition, inversion) sees D·P."""

    def __init__(self, perm, scale, phi_kind, group, signs: torch.Tensor):
        super().__init__(perm, scale, phi_kind, group)
        self.signs = signs.double()

    def to_dict(self) -> dict:
        return {**super().to_dict(), "input_signs": self.signs.tolist()}


def with_input_signs(element, record: dict):
    """``element`` rebuilt from a :meth:`InputSigned.to_dict` record (``Transform.load`` replays the signs)."""
    signs = record.get("input_signs")
    if signs is None or not isinstance(element, ScaledPermutation):
        return element
    signs = torch.as_tensor(signs, dtype=torch.float64)
    if signs.shape != (element.n,) or not bool((signs.abs() == 1).all()):
        raise InvalidOptionError(f"a GroupNorm site's input_signs must be {element.n} values, each +1 or -1; got "
                                 f"{signs.tolist()[:12]}.")
    return InputSigned(element.perm, element.scale, element.phi_kind, element.group, signs)


def before_norm(element) -> Optional[ScaledPermutation]:
    """What a writer feeding a GroupNorm with a gain moves by: S·P (P alone without drawn signs), None for a
    dense element (no GroupNorm passes one)."""
    perm = element.perm_part()
    if perm is None or not isinstance(element, InputSigned):
        return perm
    return ScaledPermutation(perm.perm, element.signs, element.phi_kind, element.group)


class GroupSigns(OnBase):
    """``base`` (the norm's output element D·P) times one sign per block of ``block`` channels on the norm's
    input (block: the least common multiple of the group sizes of the GroupNorms with a gain that read the
    site's writers' outputs, so the sign is constant on each of their groups)."""

    def __init__(self, base: Group, block: int):
        super().__init__(base)
        self.block, self.continuous = block, base.continuous
        self.name = f"{base.name}_with_group_signs"
        self.label = f"{base.label}; on the GroupNorm input one sign per {block} channels (γ takes it)"
        from ._lattice import generators

        self.generator_kinds = generators(base) | {"group_sign"}

    def flips_signs(self, level: str = "pre") -> bool:
        """The base family's answer, and at "pregn" (the writer's output the norm reads, moved by S·P) always: a
        sign per group is drawn there."""
        return level == "pregn" or super().flips_signs(level)

    def sample(self, generator=None, *, seed=None) -> InputSigned:
        g, e = self._draw_base(generator, seed)
        signs = torch.where(torch.rand(self.n // self.block, generator=g) < 0.5, -1.0, 1.0).double()
        return InputSigned(e.perm, e.scale, self.phi, self.name, signs.repeat_interleave(self.block))

    def _contains(self, M, atol):
        return self.base._contains(M, atol)

    def _contains_monomial(self, perm, scale, atol):
        return self.base._contains_monomial(perm, scale, atol)

    def contains(self, element, atol: float = 1e-9) -> bool:
        """The base family's element, with input signs (if any) ±1 and one value per block of the norm's groups."""
        if not super().contains(element, atol):
            return False
        signs = getattr(element, "signs", None)
        if signs is None:
            return True
        s = signs.double().reshape(-1, self.block)
        return bool((s.abs() == 1).all() and (s == s[:, :1]).all())


# ---------------------------------------------------------------------- the rules
def group_norm_module(graph, node: fx.Node, m: nn.GroupNorm, x: fx.Node, name: str) -> bool:
    """``nn.GroupNorm`` reading ``x``; True when the transform writes its γ and β."""
    return _rule(graph, node, x, name, m.num_groups,
                 f"{name}.weight" if m.affine else None, f"{name}.bias" if m.affine else None,
                 m.weight if m.affine else None, m.bias if m.affine else None, module=True)


def group_norm_function(graph, node: fx.Node) -> None:
    """``F.group_norm(x, num_groups, weight, bias, eps)`` / ``torch.group_norm``: γ and β must be parameters read
    only by group-norm calls (see :func:`group_norm_parameter`) or None."""
    names = ("input", "num_groups", "weight", "bias", "eps")
    args = dict(zip(names, node.args), **node.kwargs)
    x, g = graph._val(args.get("input")), args.get("num_groups")
    if not (isinstance(x, fx.Node) and x in graph.info and isinstance(g, int)):
        return graph._fresh(node, "group_norm of something that is not a traced tensor, or with a computed number of "
                                  "groups")
    params = []
    for key in ("weight", "bias"):
        a = args.get(key)
        if a is None:
            params.append((None, None))
        elif isinstance(a, fx.Node) and a.op == "get_attr" and a.meta.get("groupnorm_parameter") is not None:
            params.append((a.target, a.meta["groupnorm_parameter"]))
        else:
            return graph._fresh(node, f"group_norm with a {key} that is not a parameter of the model ({a}): what "
                                      f"moves it cannot be read from the code")
    (wpath, w), (bpath, b) = params
    _rule(graph, node, x, node.name, g, wpath, bpath, w, b, module=False)


def group_norm_parameter(graph, node: fx.Node, value) -> bool:
    """``get_attr`` of a 1-D floating parameter whose every use is the gain or bias of a group_norm call: no space of
    its own (the group-norm rule moves it as a parameter port); remembered in ``node.meta``."""
    if not (isinstance(value, nn.Parameter) and value.is_floating_point() and value.ndim == 1) or not node.users:
        return False
    for u in node.users:
        if not (u.op == "call_function" and getattr(u.target, "__name__", "") == "group_norm"):
            return False
        slots = [a for i, a in enumerate(u.args) if i in (2, 3)] + [u.kwargs.get(k) for k in ("weight", "bias")]
        if node not in slots or node in u.args[:2] or u.kwargs.get("input") is node:
            return False
    node.meta["groupnorm_parameter"] = value
    return True


def _rule(graph, node, x, name: str, groups: int, wpath, bpath, w, b, module: bool) -> bool:
    from ._graph_stream import param_port

    xs = graph.shape(x) or ()
    if not graph._channels_first(node, x, f"{name} (GroupNorm)"):
        return False
    if len(xs) < 2 or graph.info[x].block != 1 or xs[1] % groups:
        graph._fresh(node, f"{name} (GroupNorm, {groups} groups) on a tensor of shape {tuple(xs)} whose channels "
                           f"(axis 1) it does not split into groups")
        return False
    sp = graph.space(x)
    sp.n = sp.n or xs[1]
    info = graph.info[x]
    # The BatchNorm rule's test for "a writer whose output only this norm reads" (then scalings go on γ, β).
    from ._graph_reads import value_readers

    feeds_only = x.op == "call_module" and len(value_readers(x)) == 1 and info.level == "pre" and \
        any(w_node is x for _, w_node in sp.writers)
    output = feeds_only and w is not None  # a gain to absorb the signs and scalings (a missing bias is 0: D·0 = 0)
    node.meta["groupnorm"] = {"groups": groups, "channels": xs[1], "output": output, "gain": wpath, "name": name}
    sp.constraints.append(("groupnorm_output" if output else "groupnorm", node))
    # (an output-mode entry names the gain: the writer's Port.norm, which takes the signs in ``plan_writer``)
    sp.norms.append((wpath, f"groupnorm_output:{groups}", x) if output else (name, f"groupnorm:{groups}", x))
    place = graph._place(name)
    if output:
        info.level = "pregn"  # the writer's rows move by S·P (before_norm); γ, β take the element below
        graph.info[node] = graph.tensor_info(info.space, "pre")
        levels = {"weight": "pre", "bias": "pre"}
    else:
        sp.offsets_ok = False  # the norm removes a constant offset its readers' biases would absorb
        graph._out(node, x)
        levels = {"weight": "perm", "bias": "post" if info.level == "post" else "pre"}
    for attr, path, t in (("weight", wpath, w), ("bias", bpath, b)):
        if path is not None:
            sp.ports.append(("writer", param_port(path, levels[attr], 0), x))
            # one place per call (two calls of one norm unite their spaces); the mode tells the two cases apart,
            # so a norm used after its writer at one call and elsewhere at another is skipped (_shared.clashes)
            graph.record_use(place if module else node.name, path, t, info.space, None, node, x,
                             mode="groupnorm_output" if output else "groupnorm")
    return True


def site_group(graph, space, group: Group, notes: list) -> Optional[Group]:
    """``group`` restricted to permutations mapping every GroupNorm's groups onto each other, with the signs on
    the inputs of GroupNorms that have a gain; None when two different groupings would be needed (frozen)."""
    from ._channel_families import GroupedPermutations, grouped

    metas = [n.meta["groupnorm"] for kind, n in space.constraints if kind.startswith("groupnorm")]
    if not metas:
        return group
    gs = {m["groups"] for m in metas if 1 < m["groups"] < group.n}
    have = {group.groups} if isinstance(group, GroupedPermutations) else set()
    if len(gs | have) > 1:
        return None
    if gs and not have:
        new = grouped(group, gs)
        if new is None:
            return None
        if new.name != group.name:
            notes.append(f"{group.name} → {new.name}: a GroupNorm keeps only permutations that map its groups onto "
                         f"each other (docs/DERIVATIONS.md §9)")
        group = new
    signed = [m for m in metas if m["output"]]
    names = ", ".join(sorted({m["name"] for m in metas}))
    if signed:
        block = reduce(math.lcm, (m["channels"] // m["groups"] for m in signed))
        group = GroupSigns(group, block)
        notes.append(f"GroupNorm {names}: its writer's output takes one sign per group (γ absorbs it), its own output "
                     f"the element; exact group (docs/DERIVATIONS.md §9): permutations within and of whole groups, a "
                     f"sign per group on the input, the next layer's scalings on the output")
    else:
        notes.append(f"GroupNorm {names} reads this space: its output moves by the same element. Smaller than derived "
                     f"(docs/DERIVATIONS.md §9): the sign per group that β could take is not sampled")
    return group


def plan_writer(modules: dict, port, element, put, site: str, forced: bool):
    """The rows of a writer whose output only a GroupNorm with a gain reads (``port.level == "pregn"``): S·P; γ
    (``port.norm``) also takes S, on top of the element its parameter port gave it."""
    from .._errors import InvalidOptionError

    rows = before_norm(element)
    if rows is None:
        if forced:
            return element  # a negative control: the writer moves by the dense map, nothing absorbs it
        raise InvalidOptionError(f"site {site!r}: only scaled permutations pass the GroupNorm that reads "
                                 f"{port.name!r}; got a {type(element).__name__} element.")
    signed = put.__dict__.setdefault("groupnorm_signed", set())  # γ takes S once per site, however many writers
    if isinstance(element, InputSigned) and port.norm is not None and port.norm not in signed:
        from ._graph_stream import split_port

        signed.add(port.norm)
        module, attr, _ = split_port(port.norm)
        put(module, attr, lambda v, s=element.signs: v * s.to(v.dtype))
    return rows


def check_element(site: str, norm: str, mode: str, element, forced: bool) -> None:
    """Refuse (unless ``forced``: a negative control) an element that no GroupNorm of the site passes: a dense map,
    a permutation moving a channel into another group, signs that are not one per group, or — where the norm's
    output moves by the element itself (``mode`` ``groupnorm:g``) — any scaling but those signs. ``random_intertwiner``
    never draws one; a hand-made transform may."""
    from .._errors import InvalidOptionError
    from ._channel_families import respects_groups

    if forced:
        return
    kind, g = mode.split(":")
    groups = int(g)
    perm = element.perm_part()
    why = None
    if perm is None:
        why = f"a {type(element).__name__} element (only scaled permutations pass a GroupNorm)"
    elif not respects_groups(perm.perm, groups):
        why = f"a permutation that moves channels into another of its {groups} groups"
    else:
        signs = [element.scale] if kind == "groupnorm" and element.scale is not None else []
        if isinstance(element, InputSigned):
            signs.append(element.signs)
        for s in signs:
            s = s.double().reshape(groups, -1)
            if not (bool((s.abs() == 1).all()) and bool((s == s[:, :1]).all())):
                why = ("a scaling that is not one sign per group" if kind == "groupnorm" else
                       "input signs that are not one per group")
    if why is not None:
        raise InvalidOptionError(f"site {site!r}: GroupNorm {norm!r} does not pass {why}; its symmetries are "
                                 f"permutations within and of whole groups and one sign per group (docs/DERIVATIONS.md "
                                 f"§9). Nothing was written.")


def standardised_weight(node: fx.Node) -> Optional[str]:
    """Why a functional convolution is frozen when its weight is *standardised* (timm's ``StdConv2d`` and
    ``ScaledStdConv2d``, used with GroupNorm in BiT: the weight normalised per output channel by a
    ``batch_norm`` call before ``conv2d``), or None. Standardisation is not linear in the weight: a scaling of
    its rows or columns is undone by it (permutations would pass it; not implemented)."""
    if getattr(node.target, "__name__", "") not in ("conv1d", "conv2d", "conv3d"):
        return None
    stack = [node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")]
    for _ in range(8):  # a few reshapes between the parameter and the convolution
        if not stack:
            break
        a = stack.pop()
        if not isinstance(a, fx.Node) or a.op not in ("call_function", "call_method"):
            continue
        if getattr(a.target, "__name__", a.target) in ("batch_norm", "layer_norm", "group_norm", "instance_norm"):
            return (f"{node.name} convolves with a weight standardised per output channel (timm's StdConv: "
                    f"{a.target.__name__} of the weight), which is not linear in the weight: scalings of its rows or "
                    f"columns do not pass it (permutations would; not implemented, docs/DERIVATIONS.md §9)")
        stack.extend(a.all_input_nodes)
    return None
