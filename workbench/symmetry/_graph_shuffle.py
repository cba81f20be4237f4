"""Graph rules for channel layouts: ``torch.cat`` read by a channel shuffle, the shuffle itself and ``chunk``/``split``
of the channels (ShuffleNet; docs/DERIVATIONS.md §8).

A tensor made by these ops carries, per channel, which space and which channel of it it holds; the rules follow
that layout op by op and turn it into a host space (embedding what it carries) only where another op reads it. A
space that hosts carry only in part keeps its channel classes (:class:`ClassPermutations`, §8's route classes).
The concatenation rule itself lives in ``_graph_vision.py``, the host elements and groups in ``_host_group.py``.
"""
from __future__ import annotations

from typing import Optional

from torch import fx

from ._channel_families import ClassPermutations


def _feeds_shuffle(graph, node: fx.Node) -> bool:
    """Whether only ops that follow layouts read ``node`` (a concatenation about to be shuffled or chunked)."""
    return bool(node.users) and all(
        layout_aware(graph, u) and getattr(u.target, "__name__", u.target) not in ("cat", "concat", "concatenate")
        for u in node.users)



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
