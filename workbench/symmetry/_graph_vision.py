"""Graph rules for the constructs of today's vision models (docs/DERIVATIONS.md §1, §3, §5, §7).

- **Grouped and depthwise convolutions** (MobileNet, EfficientNet, ConvNeXt, RegNet) are *couplers*:
  a conv with g groups and as many output channels as input channels commutes with an element F that
  maps whole groups to groups (σ) and acts per channel (a scaled permutation), when its weight becomes
  F·W·F⁻¹ (a depthwise conv's kernels are permuted: the scalings cancel) and its bias F·b. So the
  space before it and the space after it are one space (one element acts on both). The derivation
  allows independent scalings (and, inside a group, independent maps) on the two sides; a site here is
  one element, so the two sides take the same one — a subgroup, stated in the site's notes.
- **Products of two tensors of one channel layout** (squeeze-excite's ``x * gate``): if both factors
  move by the same *permutation*, so does the product; scalings would square, and the gate's
  sigmoid is not homogeneous. The factors' spaces become one, restricted to permutations.
- **Stochastic depth** (``torchvision.ops.stochastic_depth``) scales a whole example (row mode) or the
  whole batch by one random number: it commutes with every channel map, in train mode too.
- **Token-wise linear maps** (``nn.Linear`` on ``[batch, …, features]``) act on the last axis; the
  graph records per tensor whether its channel axis is axis 1 or the last one (see ``_graph.py``).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import fx

from ..groups import Group, ScaledPermutation, get_group

# Constraints the couplers and products put on a space, read by _graph_sites._build like _lattice.CONSTRAINTS.
CONSTRAINTS = {
    "coupler": ({"perm", "pos_scale", "neg"},
                "a grouped or depthwise convolution reads and writes this space channel by channel, so only "
                "permutations and per-channel scalings keep its kernel grouped"),
    "product": ({"perm"},
                "two tensors of this space are multiplied (a gate): both move by one permutation; a scaling "
                "would be squared, and the gate's nonlinearity is not homogeneous"),
}
COUPLER_NOTE = ("a grouped or depthwise convolution couples the spaces before and after it into one site: both "
                "take the same element (the derivation also allows different scalings on the two sides)")


def grouped_conv(graph, node: fx.Node, m, x: fx.Node, name: str) -> bool:
    """A conv with ``groups > 1``: a coupler when it maps C channels to C channels; True when the
    transform writes its parameters."""
    if m.in_channels != m.out_channels:
        graph._fresh(node, f"{name}: a grouped convolution from {m.in_channels} to {m.out_channels} channels (a channel "
                           f"multiplier) is not understood by the symmetry rules")
        return False
    info = graph.info[x]
    sp = graph.space(x)
    sp.norms.append((name, "coupler", x))
    sp.constraints.append(("coupler", node))
    sp.couplers.append((name, m.groups, m.in_channels))
    sp.offsets_ok = False  # a constant offset would pass through the kernel's sum and the padding
    sp.n = sp.n or m.in_channels
    # Its output moves by what its input moves by (φ(M) after an activation), so it keeps the input's level;
    # a nonlinearity after it then needs φ(M) = M (see Graph._activation).
    graph.info[node] = type(info)(info.space, info.level, 1, coupled=True)
    place = graph._place(name)
    for pname in ("weight", "bias"):
        t = getattr(m, pname)
        if t is not None:
            graph.record_use(place, f"{name}.{pname}", t, info.space, None, node, x, mode="coupler")
    return True


def product(graph, node: fx.Node, a: fx.Node, b: fx.Node) -> None:
    """``a * b`` of two traced tensors: one space, permutations only, when their channels line up."""
    ia, ib = graph.info[a], graph.info[b]
    sa, sb = graph.shape(a), graph.shape(b)
    why = None
    if sa is None or sb is None or len(sa) != len(sb) or len(sa) < 2:
        why = "a product of tensors of different ranks"
    elif ia.block != 1 or ib.block != 1 or graph.last(a) != graph.last(b):
        why = "a product of tensors whose channels are laid out differently"
    else:
        c = graph.channel_axis(a)
        if sa[c] != sb[c] or any(p != q and 1 not in (p, q) for p, q in zip(sa, sb)) or sa[0] != sb[0]:
            why = "a product that broadcasts over the channel or batch axis"
    if why is not None:
        return graph._fresh(node, why)
    sid = graph.union(ia.space, ib.space)
    graph.spaces[sid].constraints.append(("product", node))
    graph.spaces[sid].offsets_ok = False
    big = a if len(sa) and tuple(graph.shape(node) or ()) == tuple(sa) else b
    graph._out(node, big, level="pre")


def token_index(index, rank: int) -> bool:
    """True for an index of a ``[batch, …, channels]`` tensor that keeps the batch and the last axis whole
    (``x[:, 0]``: the class token): it selects positions only."""
    if not isinstance(index, tuple) or len(index) < 2 or Ellipsis in index:
        return False
    full = slice(None, None, None)
    if index[0] != full or not all(isinstance(i, (int, slice)) for i in index):
        return False
    return len(index) < rank or index[-1] == full


class _ChannelPermutations(Group):
    """A base family's scaled permutations whose permutation keeps a structure on the channels: the scalings
    are the base family's (drawn first), the permutation the subclass's (``_perm``, ``_keeps``)."""

    continuous = False

    def __init__(self, base: Group, name: str, label: str, kind: str):
        super().__init__(base.n, phi=base.phi, source=getattr(base, "source", "family"))
        self.base, self.name, self.label = base, name, label
        self.generator_kinds = {kind} | (_kinds(base) - {"perm"})
        if hasattr(base, "sigma"):
            self.sigma = base.sigma

    def sample(self, generator=None, *, seed=None) -> ScaledPermutation:
        g = generator if generator is not None else torch.Generator().manual_seed(0 if seed is None else int(seed))
        base = copy.copy(self.base)
        if hasattr(self, "sigma"):
            base.sigma = self.sigma
        scale = base.sample(g).scale  # the base family's scalings (None for permutations)
        return ScaledPermutation(self._perm(g), scale, self.phi, self.name)

    def _contains(self, M, atol):
        if not self.base._contains(M, atol):
            return False
        return self._keeps((M.abs() > atol).float().argmax(dim=1))

    def _perm(self, g: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def _keeps(self, perm: torch.Tensor) -> bool:
        raise NotImplementedError


class GroupedPermutations(_ChannelPermutations):
    """Scaled permutations that map the g contiguous groups of a grouped convolution onto each other:
    ``(F·x)_c = d_c·x_π(c)`` with π(group j) = group σ(j) (the wreath product S_k ≀ S_g, times the scalings
    the base family allows). Its own generator kinds keep a full permutation out (see _lattice.generators)."""

    def __init__(self, base: Group, groups: int):
        super().__init__(base, f"grouped_{base.name}",
                         f"{base.label}, mapping the {groups} groups of {base.n // groups} channels onto each other",
                         "perm_groups")
        self.groups = groups

    def _perm(self, g):
        k = self.n // self.groups
        sigma = torch.randperm(self.groups, generator=g)
        within = torch.stack([torch.randperm(k, generator=g) for _ in range(self.groups)])
        return (sigma.unsqueeze(1) * k + within).reshape(-1)  # channel i of block j reads channel within[j, i] of σ(j)

    def _keeps(self, perm):
        return respects_groups(perm, self.groups)


def respects_groups(perm: torch.Tensor, groups: int) -> bool:
    """Whether the permutation maps every contiguous group of channels into one group."""
    k = len(perm) // groups
    src = (perm // k).reshape(groups, k)
    return bool((src == src[:, :1]).all())


def _kinds(group: Group) -> set:
    from ._lattice import generators

    return generators(group)


def grouped(group: Group, groups: set) -> Optional[Group]:
    """``group`` restricted to the couplers' groupings: itself when every coupler is depthwise (one channel
    per group) or has one group; the grouped family for one g; None (freeze) for several different g."""
    gs = {g for g in groups if 1 < g < group.n}
    if not gs or "perm" not in _kinds(group):  # depthwise, or scalings only: every grouping is kept
        return group
    if len(gs) > 1:
        return None
    return GroupedPermutations(group, gs.pop())


def conjugate_grouped(W: torch.Tensor, F, groups: int, site: str, conv: str, forced: bool) -> torch.Tensor:
    """A grouped conv's weight ``[C, C/g, *kernel]`` (float64) after its input and output both move by F:
    the blocks of F·W·F⁻¹. A scaled permutation F = D·P gives W′[c, i] = (d_c / d_col)·W[π(c), i′], where
    col = the i-th input channel of c's group and π(col) is input i′ of π(c)'s group (a depthwise kernel
    is only permuted: the scalings cancel). An element that maps a group across groups is no symmetry:
    refused, unless it was forced (a negative control), when the in-group part is kept."""
    from .._errors import InvalidOptionError

    C, a = W.shape[0], W.shape[1]
    grp = torch.arange(C) // a  # group of each channel (a = b: as many outputs as inputs per group)
    col = grp.unsqueeze(1) * a + torch.arange(a).unsqueeze(0)  # [C, a]: the input channel of W[c, i]
    perm, scale = F.perm_part().perm if F.perm_part() is not None else None, getattr(F, "scale", None)
    if perm is None:  # a dense element (only when forced): conjugate the full block-diagonal matrix
        full = torch.zeros(C, C, *W.shape[2:], dtype=W.dtype)
        full[torch.arange(C).unsqueeze(1), col] = W
        full = F.inverse().transpose().act(F.act(full, 0), 1)
        return full[torch.arange(C).unsqueeze(1), col]
    src_col = perm[col]  # [C, a]
    if not forced and not bool((src_col // a == grp[perm].unsqueeze(1)).all()):
        raise InvalidOptionError(f"site {site!r}: the element maps channels of grouped convolution {conv!r} into another "
                                 f"group; only permutations that map its {groups} groups onto each other are symmetries.")
    out = W[perm.unsqueeze(1), src_col % a]
    if scale is not None:
        s = scale.to(W.dtype)
        out = out * (s.unsqueeze(1) / s[col]).reshape(C, a, *([1] * (W.ndim - 2)))
    return out


def implied_host(site, elements: dict):
    """The element a host site carries when only sites it embeds moved: each embedded site's element (φ of it
    where the host reads that site after its activation) on its channels, the identity elsewhere."""
    from ..groups import Dense

    if any(not isinstance(start, int) for _, start, *_ in site.embeds):
        return _implied_layout_host(site, elements)
    blocks = []
    for parent, start, count, level in site.embeds:
        e = elements.get(parent) if parent is not None else None
        if e is not None:
            blocks.append((start, count, e.phi() if level == "post" else e))
    if all(isinstance(e, ScaledPermutation) for *_, e in blocks):
        perm, scale = torch.arange(site.n), torch.ones(site.n, dtype=torch.float64)
        for start, count, e in blocks:
            perm[start:start + count] = start + e.perm
            scale[start:start + count] = e.scale if e.scale is not None else 1.0
        return ScaledPermutation(perm, scale, site.group.phi, site.group.name)
    M = torch.eye(site.n, dtype=torch.float64)
    for start, count, e in blocks:
        M[start:start + count, start:start + count] = e.matrix()
    return Dense(M, site.group.phi, site.group.name)


def _feeds_shuffle(graph, node: fx.Node) -> bool:
    """Whether only ops that follow layouts read ``node`` (a concatenation about to be shuffled or chunked)."""
    return bool(node.users) and all(
        layout_aware(graph, u) and getattr(u.target, "__name__", u.target) not in ("cat", "concat", "concatenate")
        for u in node.users)


def concatenate(graph, node: fx.Node) -> None:
    """``torch.cat(pieces, dim)``. Along the channels it is a direct sum (DERIVATIONS §6): a new space whose
    element is block-diagonal, each piece's element on its channels (the ``embeds`` of a zero-padding
    shortcut, with no free channel). Along positions (or the batch) every piece must move alike: one space."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    pieces = [graph._val(t) for t in tensors] if isinstance(tensors, (list, tuple)) else []
    if not pieces or not isinstance(dim, int) or not all(isinstance(p, fx.Node) and p in graph.info for p in pieces):
        return graph._fresh(node, "a concatenation of something that is not a list of traced tensors")
    shapes = [graph.shape(p) for p in pieces]
    if any(s is None or len(s) != len(shapes[0]) or len(s) < 2 for s in shapes) or any(
            graph.info[p].block != 1 or graph.last(p) != graph.last(pieces[0]) for p in pieces):
        return graph._fresh(node, "a concatenation of tensors whose channels are laid out differently")
    rank, axis = len(shapes[0]), graph.channel_axis(pieces[0])
    if dim % rank == axis and (any(graph.info[p].layout is not None for p in pieces) or _feeds_shuffle(graph, node)):
        layouts = [_layout(graph, p) for p in pieces]
        # followed into a channel shuffle or a chunk (§8)
        if all(lay is not None for lay in layouts) and all(graph.info[p].split is None for p in pieces):
            return _layout_tensor(graph, node, sum(layouts, ()))
    for p in pieces:
        materialise(graph, p)
    if dim % rank != axis:
        sid = graph.info[pieces[0]].space
        for p in pieces[1:]:
            sid = graph.union(sid, graph.info[p].space)
        if len({graph.info[p].level for p in pieces}) > 1:
            graph.spaces[sid].constraints.append(("mixed_levels", node))
        return graph._out(node, pieces[0], level="pre" if len({graph.info[p].level for p in pieces}) > 1 else None)
    sid = graph.new_space()
    host = graph.spaces[sid]
    host.label, host.concat, start = node.name, True, 0
    for p, s in zip(pieces, shapes):
        host.embeds.append((graph.info[p].space, start, s[axis], p))  # p: its level says whether φ(M) moves it
        graph.space(p).embedded = True
        start += s[axis]
    host.n = start
    graph.info[node] = type(graph.info[pieces[0]])(sid, "pre", last=graph.last(pieces[0]))


def settle_embedded(graph, sites: list, root_of: dict, site_of_space: dict, drop: dict) -> dict:
    """Sites that must not move, with the reason, because a space carrying their channels (a concatenation,
    a zero-padding shortcut) cannot move; and the groups of sites carried by another restricted to what that
    host allows (a piece of a concatenation read by BatchNorm and ReLU takes D₊·P, not GL)."""
    from ._lattice import generators, restrict

    by_name = {s.name: s for s in sites}
    out: dict = {}
    stack = [(site_of_space.get(graph.find(pid)), sp.label or "a space")
             for sp in graph.spaces.values() if sp.embeds and graph.find(sp.id) not in root_of for pid, *_ in sp.embeds]
    stack += [(p, h) for h in drop for p, *_ in by_name[h].embeds] if drop else []
    while stack:
        name, host = stack.pop()
        if name is None or name in out or name in drop:
            continue
        out[name] = f"its channels are carried (concatenated or zero-padded) into {host}, which cannot move"
        stack += [(p, name) for p, *_ in by_name[name].embeds]
    changed = True
    while changed:  # a host's restriction passes to its pieces, and on to theirs
        changed = False
        for host in sites:
            for parent, *_ in host.embeds:
                p = by_name.get(parent)
                if p is None or parent in out:
                    continue
                new = restrict(p.group, generators(host.group))
                if new.name != p.group.name:
                    p.notes.append(f"{p.group.name} → {new.name}: its channels are part of {host.name}, whose group is "
                                   f"{host.group.name}")
                    p.group, changed = new, True
    return out


def channel_pad(graph, node: fx.Node, x: fx.Node) -> None:
    """F.pad with zeros on the channel axis (CIFAR ResNets' option-A shortcut): a space embedding x's."""
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", 0)
    xs = graph.shape(x)
    if mode != "constant" or value not in (0, 0.0, None) or xs is None or pad is None:
        return graph._fresh(node, "a padding that is not zeros")
    pad = list(pad) + [0] * (2 * len(xs) - len(pad))  # pairs from the last axis backwards
    channel = 2 * (len(xs) - 2)
    if any(pad[:channel]) or len(pad) > 2 * (len(xs) - 1) and any(pad[channel + 2:]):
        return graph._fresh(node, "a padding of spatial axes")
    before = pad[channel]
    sid = graph.new_space()
    graph.spaces[sid].n = xs[1] + before + pad[channel + 1]
    graph.spaces[sid].embeds.append((graph.info[x].space, before, xs[1], node))
    graph.space(x).embedded = True
    graph.info[node] = type(graph.info[x])(sid, graph.info[x].level)


# ---------------------------------------------------------------------- channel shuffle and chunk (DERIVATIONS §8)
# A tensor made by torch.cat, a channel shuffle or a chunk of channels carries a *layout*: for each of its channels,
# (space id, channel of that space, the tensor whose level says whether φ(M) moves it). Elements pass these ops
# exactly as long as every space's element maps the channels one tensor carries onto themselves; so the layout is
# followed op by op and only becomes a space (a host embedding the spaces it carries) where something else reads it.
SHUFFLE_OPS = {"size", "dim", "contiguous", "view", "reshape", "transpose", "chunk", "split"}


def layout_aware(graph, node: fx.Node) -> bool:
    """Whether ``node`` is an op that follows layouts itself (others read a layout as a host space)."""
    import operator

    if node.op == "call_method":
        return node.target in SHUFFLE_OPS
    if node.op == "call_function":
        fname = getattr(node.target, "__name__", "")
        return fname in ("cat", "concat", "concatenate", "transpose", "chunk", "split") or (
            node.target is getattr and len(node.args) > 1 and node.args[1] in ("shape", "dtype", "device", "ndim"))\
            or (node.target is operator.getitem and bool(node.args) and node.args[0] in graph.chunks)
    return False


def _layout(graph, x: fx.Node) -> Optional[tuple]:
    """x's channels as a layout: its own, or its space's channels in order (channels on axis 1 only)."""
    info = graph.info[x]
    if info.layout is not None:
        return info.layout
    xs = graph.shape(x)
    if xs is None or len(xs) < 2 or info.block != 1 or graph.last(x) or info.token is not None:
        return None
    return tuple((info.space, i, x) for i in range(xs[1]))


def _layout_tensor(graph, node: fx.Node, layout: tuple, split=None) -> None:
    sid = graph.new_space()
    graph.spaces[sid].label = node.name
    graph.info[node] = graph.tensor_info(sid, "pre", layout=layout, split=split)


def materialise(graph, x: fx.Node) -> None:
    """A layout read by an op that does not follow layouts: its space becomes a host embedding, for each space it
    carries, which of its channels sit where (the host's element is made of theirs, DERIVATIONS §6 and §8)."""
    info = graph.info[x]
    if info.layout is None:
        return
    sp = graph.space(x)
    if not sp.embeds and not sp.frozen:
        groups: dict = {}
        for h, (sid, c, src) in enumerate(info.layout):
            groups.setdefault((graph.find(sid), src), []).append((h, c))
        seen = [(graph.find(sid), c) for sid, c, _ in info.layout]
        for (sid, src), pairs in groups.items():
            sp.embeds.append((sid, tuple(h for h, _ in pairs), tuple(c for _, c in pairs), src))
            graph.spaces[sid].embedded = True
        sp.n, sp.concat = len(info.layout), True
        if len(set(seen)) != len(seen):
            sp.frozen.append(f"{x.name} carries a channel of one space twice")
        if info.split is not None:
            sp.frozen.append(f".view() of {x.name} splits its channel axis; only a channel shuffle (view(B, g, C/g, …) "
                             f"→ transpose(1, 2) → view(B, C, …)) is understood")
    graph.info[x] = graph.tensor_info(info.space, "pre")


def shuffle_rule(graph, node: fx.Node, x: fx.Node) -> bool:
    """view → transpose(1, 2) → view back (a channel shuffle), chunk / split of the channels, contiguous: the
    layout followed through them. False (x read as a host) when the op is not of that form."""
    info, name = graph.info[x], node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    xs, ys = graph.shape(x), graph.shape(node)
    if name in ("size", "dim"):
        return True
    if name == "contiguous":
        if info.layout is None:
            return False
        graph.info[node] = graph.tensor_info(info.space, "pre", layout=info.layout, split=info.split)
        return True
    if name in ("view", "reshape") and xs is not None and ys is not None:
        if info.split is None and len(xs) >= 3 and len(ys) == len(xs) + 1 and ys[0] == xs[0] and ys[3:] == xs[2:] \
                and ys[1] * ys[2] == xs[1]:
            layout = _layout(graph, x)
            if layout is not None:  # (B, C, …) → (B, g, C/g, …): channel c = (c // (C/g), c % (C/g))
                _layout_tensor(graph, node, layout, split=(ys[1], False))
                return True
        elif info.split is not None and len(ys) == len(xs) - 1 and ys[0] == xs[0] and ys[2:] == xs[3:] \
                and ys[1] == xs[1] * xs[2]:
            g, moved = info.split
            L = info.layout
            if moved:  # (B, C/g, g, …) → (B, C, …): channel j·g + i is channel i·(C/g) + j before the view
                k = len(L) // g
                L = tuple(L[(c % g) * k + c // g] for c in range(len(L)))
            _layout_tensor(graph, node, L)
            return True
    if name == "transpose" and info.split is not None and xs is not None:
        dims = sorted(a % len(xs) for a in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(a, int))
        if dims == [1, 2]:
            g, moved = info.split  # g: the groups of the first view, whichever way round the axes are now
            _layout_tensor(graph, node, info.layout, split=(g, not moved))
            return True
    if name in ("chunk", "split") and xs is not None:
        return _chunk(graph, node, x, name)
    materialise(graph, x)
    return False


def _chunk(graph, node: fx.Node, x: fx.Node, name: str) -> bool:
    args = list(node.args[1:])
    size = args[0] if args else node.kwargs.get("chunks" if name == "chunk" else "split_size_or_sections")
    dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
    layout = _layout(graph, x)
    import operator

    # the pieces are followed only through chunk(...)[i]: a tuple used whole would carry channels out of sight
    whole = any(u.op != "call_function" or u.target is not operator.getitem or not isinstance(u.args[1], int)
                for u in node.users)
    if layout is None or whole or not isinstance(dim, int) or dim % len(graph.shape(x)) != 1 \
            or graph.info[x].split is not None:
        materialise(graph, x)
        return False
    C = len(layout)
    if name == "chunk" and isinstance(size, int) and size > 0:
        step = -(-C // size)
        bounds = list(range(0, C, step)) + [C]
    elif name == "split" and isinstance(size, int) and size > 0:
        bounds = list(range(0, C, size)) + [C]
    elif name == "split" and isinstance(size, (list, tuple)) and all(isinstance(s, int) for s in size):
        bounds = [sum(size[:i]) for i in range(len(size) + 1)]
    else:
        materialise(graph, x)
        return False
    graph.chunks[node] = [layout[a:b] for a, b in zip(bounds, bounds[1:])]
    return True


def chunk_piece(graph, node: fx.Node) -> None:
    """``chunk(...)[i]``: the i-th piece's layout."""
    pieces, i = graph.chunks[node.args[0]], node.args[1]
    if not isinstance(i, int) or not -len(pieces) <= i < len(pieces):
        _layout_tensor(graph, node.args[0], sum(pieces, ()))  # what the chunk carries must not move
        graph.freeze(node.args[0], f"item {i!r} of a chunk of {len(pieces)} pieces")
        return graph._fresh(node, f"item {i!r} of a chunk of {len(pieces)} pieces")
    _layout_tensor(graph, node, pieces[i])


def _implied_layout_host(site, elements: dict):
    """The element of a host whose embeds name channels one by one (host channels ← a space's channels, §8): on host
    channel h carrying channel i of a space moved by D·P, ``(M·x)_h = d_i · x_(where π(i) is carried)``; a dense
    element (only where a space is carried whole) gives ``M[H, H] = E[I, I]``. Channels of no site stay put."""
    from .._errors import InvalidOptionError
    from ..groups import Dense

    blocks = []
    for parent, hosts, chans, level in site.embeds:
        if isinstance(hosts, int):  # a whole site on a range of channels (a zero-padding shortcut added to it)
            hosts, chans = range(hosts, hosts + chans), range(chans)
        e = elements.get(parent) if parent is not None else None
        if e is not None:
            e = e.phi() if level == "post" else e
            blocks.append((torch.tensor(list(hosts)), torch.tensor(list(chans)), e, parent))
    if all(isinstance(e, ScaledPermutation) for _, _, e, _ in blocks):
        perm, scale = torch.arange(site.n), torch.ones(site.n, dtype=torch.float64)
        for hosts, chans, e, parent in blocks:
            where = torch.full((e.n,), -1, dtype=torch.long)
            where[chans] = hosts
            src = where[e.perm[chans]]
            if bool((src < 0).any()):
                raise InvalidOptionError(f"site {site.name!r}: the element of {parent!r} maps channels it carries into "
                                         f"channels it does not (a chunk or channel shuffle keeps them apart); only "
                                         f"permutations within the classes of its group are symmetries.")
            perm[hosts] = src
            if e.scale is not None:
                scale[hosts] = e.scale[chans].double()
        return ScaledPermutation(perm, scale, site.group.phi, site.group.name)
    M = torch.eye(site.n, dtype=torch.float64)
    for hosts, chans, e, _ in blocks:
        M[hosts.unsqueeze(1), hosts.unsqueeze(0)] = e.matrix()[chans.unsqueeze(1), chans.unsqueeze(0)]
    return Dense(M, site.group.phi, site.group.name)


class ClassPermutations(_ChannelPermutations):
    """A family's scaled permutations that map each class of channels onto itself: the channels a chunk or channel
    shuffle keeps together (DERIVATIONS §8, route classes). ``labels[c]`` is channel c's class."""

    def __init__(self, base: Group, labels: tuple):
        labels = tuple(int(v) for v in labels)  # a tuple: Group.__eq__ compares __dict__
        sizes = sorted((labels.count(v) for v in set(labels)), reverse=True)
        super().__init__(base, f"classed_{base.name}",
                         f"{base.label}, within {len(sizes)} classes of channels kept together (sizes {sizes})",
                         "perm_classes")
        self.labels = labels
        self.centre = getattr(base, "centre", None)

    def _perm(self, g):
        labels = torch.tensor(self.labels)
        perm = torch.arange(self.n)
        for v in sorted(set(self.labels)):
            idx = torch.nonzero(labels == v).flatten()
            perm[idx] = idx[torch.randperm(len(idx), generator=g)]
        return perm

    def _keeps(self, perm):
        labels = torch.tensor(self.labels)
        return bool((labels[perm] == labels).all())


def settle_classes(sites: list, drop: dict) -> dict:
    """Restrict every site some host carries only in part (a chunk of its channels, §8) to the permutations that keep
    each class of channels (those carried together everywhere) in place; returns sites that must not move instead."""
    from ._lattice import generators, restrict

    by_name = {s.name: s for s in sites}
    member: dict = {}  # site → per channel, the (host, entry) pairs that carry it
    for host in sites:
        if host.name in drop:
            continue
        for k, (parent, hosts, chans, _) in enumerate(host.embeds):
            if parent is None or isinstance(hosts, int) or parent in drop:
                continue
            sig = member.setdefault(parent, [[] for _ in range(by_name[parent].n)])
            for c in chans:
                sig[c].append((host.name, k))
    out: dict = {}
    for name, sig in member.items():
        keys = [tuple(v) for v in sig]
        classes = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        if len(classes) == 1:
            continue
        site = by_name[name]
        if site.embeds:  # its element is made of its own pieces', which know nothing of these classes
            out[name] = "a chunk or channel shuffle carries part of its channels, and its element is made of its pieces'"
            continue
        group = site.group
        if group.continuous or not {"perm"} <= generators(group):
            new = restrict(group, {"perm", "pos_scale", "neg"})
            if "perm" not in generators(new):
                out[name] = (f"a chunk or channel shuffle carries part of its channels and its group {group.name} "
                             f"cannot keep them apart")
                continue
            site.notes.append(f"{group.name} → {new.name}: a chunk or channel shuffle carries part of its channels "
                              f"(the derivation allows a block-diagonal map over the classes; the rules grant scaled "
                              f"permutations)")
            group = new
        site.group = ClassPermutations(group, [classes[k] for k in keys])
        site.notes.append(f"{group.name} → {site.group.name}: chunks and channel shuffles carry its channels in "
                          f"{len(classes)} classes (DERIVATIONS §8); a permutation keeps each class in place")
    for host in sites:  # a host carried channel by channel moves by what its sites' elements make: say which family
        if any(not isinstance(e[1], int) for e in host.embeds) and host.name not in drop and host.name not in out:
            kinds = set()
            for parent, *_ in host.embeds:
                if parent is not None and parent in by_name and parent not in drop and parent not in out:
                    kinds |= {"perm" if k.startswith("perm") else k for k in generators(by_name[parent].group)}
            new = restrict(host.group, kinds | {"perm"})
            if new.name != host.group.name:
                host.notes.append(f"{host.group.name} → {new.name}: its element is made of the elements of the sites "
                                  f"it carries")
                host.group = new
    return out
