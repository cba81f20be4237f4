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

from typing import Optional

import torch
from torch import fx


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


def concatenate(graph, node: fx.Node) -> None:
    """``torch.cat(pieces, dim)``. Along the channels it is a direct sum (DERIVATIONS §6): a new space whose
    element is block-diagonal, each piece's element on its channels (the ``embeds`` of a zero-padding
    shortcut, with no free channel). Along positions (or the batch) every piece must move alike: one space."""
    from ._graph_shuffle import _feeds_shuffle, _layout, _layout_tensor, materialise

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


def unite_aligned_pieces(graph) -> None:
    """Pieces that claim the same channels of one space take one element: ``cat(a₁, b₁) + s`` and then ``cat(a₂, b₂) + …``
    in one stream (GhostNetV3's blocks) make its element blockdiag(M_a₁, M_b₁) and blockdiag(M_a₂, M_b₂) at once, so
    a₁ and a₂ (and b₁ and b₂) are one site. United only where the claims line up exactly — the same offset in pieces
    of the same size, read at the same level, neither piece a space that itself carries pieces or the host itself —
    else the space stays overdetermined and is frozen (:func:`settle_embedded`)."""
    while (pair := _aligned_pair(graph)) is not None:
        graph.union(*pair)  # the spaces change: look again from the start


def _aligned_pair(graph) -> Optional[tuple[int, int]]:
    """Two piece spaces (roots) that claim one channel of one host at the same offset, size and level, or None."""
    hosts: dict[int, list] = {}
    for sp in graph.spaces.values():
        for pid, start, count, node in sp.embeds:
            hosts.setdefault(graph.find(sp.id), []).append((graph.find(pid), start, count, node))
    for root, embeds in hosts.items():
        claims: dict[int, tuple] = {}
        for piece, start, count, node in embeds:
            if not isinstance(start, int) or piece == root or graph.spaces[piece].embeds:
                continue
            level = graph.info[node].level if node in graph.info else None
            for k in range(count):
                first = claims.setdefault(start + k, (piece, k, count, level))
                if first[0] != piece and first[1:] == (k, count, level):
                    return first[0], piece
    return None


OVERDETERMINED = ("two concatenations (or zero-padding shortcuts) meet in it through an addition, laying different "
                  "pieces on the same channels at different offsets or sizes: no element of the pieces gives both "
                  "block-diagonals, so it cannot move (docs/DERIVATIONS.md §6)")


def _overdetermined(sites: list) -> list[str]:
    """Sites whose channels two different pieces still claim after :func:`unite_aligned_pieces` (their claims did not
    line up): the element would have to be two different block-diagonals at once. Drawn independently, such pieces
    changed a two-block miniature's outputs by 0.8 (tests/test_graph_functional_norms.py)."""
    out = []
    for host in sites:
        claims: dict[int, tuple] = {}
        for piece, start, count, _level in host.embeds:
            channels = range(start, start + count) if isinstance(start, int) else start  # chunk, shuffle: a list
            if any(claims.setdefault(int(ch), (piece, k)) != (piece, k) for k, ch in enumerate(channels)):
                out.append(host.name)
                break
    return out


def settle_embedded(graph, sites: list, root_of: dict, site_of_space: dict, drop: dict) -> dict:
    """Sites that must not move, with the reason, because a space carrying their channels (a concatenation,
    a zero-padding shortcut) cannot move; and the groups of sites carried by another restricted to what that
    host allows (a piece of a concatenation read by BatchNorm and ReLU takes D₊·P, not GL)."""
    from ._host_group import carried_width
    from ._lattice import generators, restrict

    by_name = {s.name: s for s in sites}
    out: dict = {host: OVERDETERMINED for host in _overdetermined(sites) if host not in drop}
    stack = [(site_of_space.get(graph.find(pid)), sp.label or "a space")
             for sp in graph.spaces.values() if sp.embeds and graph.find(sp.id) not in root_of for pid, *_ in sp.embeds]
    stack += [(p, h) for h in (*drop, *out) for p, *_ in by_name[h].embeds]
    while stack:
        name, host = stack.pop()
        if name is None or name in out or name in drop:
            continue
        out[name] = f"its channels are carried (concatenated or zero-padded) into {host}, which cannot move"
        stack += [(p, name) for p, *_ in by_name[name].embeds]
    changed = True
    while changed:  # every channel carried from a piece that cannot move: the identity is its only element
        changed = False
        for host in sites:
            if host.name in out or host.name in drop or not host.embeds:
                continue
            if carried_width(host) == host.n and all(p is None or p in out or p in drop for p, *_ in host.embeds):
                out[host.name] = ("no map but the identity keeps the function: each of its channels carries a space "
                                  "that cannot move")
                changed = True
    for host in sites:  # a host made of its pieces alone has their generators, no more (DERIVATIONS §6)
        if host.name in out or host.name in drop or not host.embeds or host.writers:
            continue
        pieces = [by_name[p] for p, *_ in host.embeds if p in by_name and p not in out and p not in drop]
        if carried_width(host) != host.n or not pieces:
            continue
        kinds = {"perm" if k.startswith("perm") else k for p in pieces for k in generators(p.group)}  # (classed, grouped)
        new = restrict(host.group, kinds)
        if new.name != host.group.name:  # (its element is the pieces', block by block: implied_host; its group: per_block)
            host.notes.append(f"{host.group.name} → {new.name}: its element is block-diagonal, each piece's element on "
                              f"its channels, so it has no generator its pieces lack")
            host.group = new
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
    """F.pad with zeros on the channel axis (CIFAR ResNets' option-A shortcut): a space embedding x's. Zeros on
    spatial axes only keep x's space: a map acting at each position sends the padded zeros to zeros; so does a
    reflect, replicate or circular padding of spatial axes (timm's BlurPool2d), which copies values between positions
    of one channel."""
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", 0)
    xs = graph.shape(x)
    copies = mode in ("reflect", "replicate", "circular")  # values copied between positions of one channel
    if not (mode == "constant" and value in (0, 0.0, None) or copies) or xs is None or not isinstance(pad, (list, tuple)):
        return graph._fresh(node, "a padding that is not zeros, or whose widths are computed in the forward")
    if graph.last(x):
        return _positions_pad(graph, node, x, list(pad), len(xs))
    pad = list(pad) + [0] * (2 * len(xs) - len(pad))  # pairs from the last axis backwards
    channel = 2 * (len(xs) - 2)
    spatial, ours = pad[:channel], pad[channel:]  # ours: the channel axis's pair, then the batch axis's
    if any(not isinstance(p, int) for p in ours):
        return graph._fresh(node, "a padding of the channel or batch axis whose width is computed in the forward")
    if any(ours[2:]):
        return graph._fresh(node, "a padding of the batch axis")
    if copies and any(ours):
        return graph._fresh(node, f"a {mode} padding of the channel axis")
    if all(isinstance(p, int) and p == 0 for p in pad):  # no width at all (TensorFlow "same" padding where the
        return graph._out(node, x)  # input's size needs none): the identity, not a channel padding by 0 and 0
    if any(not isinstance(p, int) or p for p in spatial):  # (a width computed in the forward: timm's "same" padding)
        if any(ours):
            return graph._fresh(node, "a padding of spatial axes and channels at once")
        graph.space(x).offsets_ok = False  # a constant offset would become a border effect
        return graph._out(node, x)
    before = pad[channel]
    sid = graph.new_space()
    graph.spaces[sid].label = node.name  # its name as a site (no writer of its own names it)
    graph.spaces[sid].n = xs[1] + before + pad[channel + 1]
    graph.spaces[sid].embeds.append((graph.info[x].space, before, xs[1], node))
    graph.space(x).embedded = True
    graph.info[node] = type(graph.info[x])(sid, graph.info[x].level)


def _positions_pad(graph, node: fx.Node, x: fx.Node, pad: list, rank: int) -> None:
    """F.pad of a tensor whose channels are on its last axis (``[B, H, W, C]``: timm's Swin pads its windows'
    positions, ``(0, 0, 0, pad_w, 0, pad_h)``): the first pair (the channel axis) must be zeros written in the code
    and the batch axis unpadded; the positions' widths may be computed in the forward. Zeros (or copies) at new
    positions of each channel: a map acting at each position keeps them, as for ``[B, C, H, W]``."""
    ours, batch = pad[:2], pad[2 * (rank - 1):2 * rank]
    if any(not isinstance(p, int) or p for p in ours):
        return graph._fresh(node, "a padding of the channel axis (the last) of a tensor whose channels are on its "
                                  "last axis, or one whose width is computed in the forward")
    if any(not isinstance(p, int) or p for p in batch):
        return graph._fresh(node, "a padding of the batch axis")
    if any(not isinstance(p, int) or p for p in pad):
        graph.space(x).offsets_ok = False  # a constant offset would become a border effect
    return graph._out(node, x)


def roll(graph, node: fx.Node, x: fx.Node) -> None:
    """``torch.roll(x, shifts, dims)`` along position axes only (Swin's shifted windows, ``dims=(1, 2)`` of
    ``[B, H, W, C]``): values move between positions of each channel, which every channel map commutes with. A roll
    without ``dims`` (of the flattened tensor) or along the batch or channel axis moves values between channels."""
    rank = len(graph.shape(x) or ())
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims")
    dims = (dims,) if isinstance(dims, int) else dims
    channel = graph.channel_axis(x) if rank else None
    if not (rank >= 3 and isinstance(dims, (tuple, list)) and dims and all(isinstance(d, int) for d in dims)
            and all(d % rank not in (0, channel) for d in dims) and graph.info[x].block == 1):
        return graph._fresh(node, f"torch.roll over dims {dims} of a tensor of shape {graph.shape(x)} (channels on axis "
                                  f"{channel}) moves values across the batch or the channel axis")
    graph._out(node, x)
