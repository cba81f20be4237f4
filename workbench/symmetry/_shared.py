"""Parameters used at several places must take one group element at all of them.

A transform rewrites each parameter tensor once. When one tensor serves several module calls — the
same ``nn.Linear`` called twice, a weight tied to another module's (``lin2.weight = lin1.weight``), a
parameter also read directly in ``forward`` — every place it serves has to agree on that rewrite.
Tensors are compared by identity of their memory (storage, offset, shape, strides), not by module
name, so tying through a second ``nn.Parameter`` over the same storage counts too.

For a weight W used as rows·W·cols⁻¹ at each call, agreement means the spaces it writes take one
element and the spaces it reads take one element: those spaces are united. When a united space
cannot move (it contains the model's input, say — a module applied to its own output reads the
input at its first call), nothing in it moves, and the reason says which sharing froze it.
"""
from __future__ import annotations

from collections import defaultdict

import torch


def _view(t: torch.Tensor) -> tuple:
    """Identity of a tensor's values in memory: equal keys read and write the same numbers."""
    ptr = t.untyped_storage().data_ptr() if t.numel() else 0
    if ptr == 0:  # no storage to compare (empty or meta tensors): only the same object is the same tensor
        return ("object", id(t))
    return (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def share_parameters(graph) -> None:
    """Unite (or freeze) the spaces of ``graph`` whose written parameters are shared."""
    uses, refs = defaultdict(list), defaultdict(list)
    for u in graph.uses:
        uses[_view(u.tensor)].append(u)
    for what, t, sids in graph.refs:
        refs[_view(t)].append((what, sids))

    def freeze(sids, reason: str) -> None:
        for sid in sids:
            if sid is not None:
                graph.spaces[graph.find(sid)].frozen.append(reason)

    # The same memory seen through different views (a transpose, a slice): which entries move together
    # is not worth guessing; freeze every space such a tensor touches.
    by_storage = defaultdict(set)
    for key in [*uses, *refs]:
        if key[0] != "object":
            by_storage[key[0]].add(key)
    for keys in by_storage.values():
        written = [k for k in keys if k in uses]
        if len(keys) > 1 and written:
            names = sorted({u.param for k in written for u in uses[k]} | {w for k in keys for w, _ in refs.get(k, [])})
            freeze([s for k in written for u in uses[k] for s in (u.rows, u.cols)],
                   f"parameters share memory in different layouts ({', '.join(names)})")

    for key, us in uses.items():
        if key in refs:  # read by something the transform does not write: it must keep its value
            what = refs[key][0][0]
            freeze([s for u in us for s in (u.rows, u.cols)], f"{us[0].param} is also {what}")
        places = sorted({u.place for u in us})
        if len(places) < 2:
            continue
        params = ", ".join(sorted({u.param for u in us}))
        note = f"{params} is shared by {len(places)} calls ({', '.join(places)})"
        for sids in ([u.rows for u in us], [u.cols for u in us if u.cols is not None]):
            roots = list(dict.fromkeys(graph.find(s) for s in sids))
            if len(roots) < 2:
                continue
            blocked = [r for r in roots if graph.spaces[r].frozen]
            reason = graph.spaces[blocked[0]].frozen[0] if blocked else None
            root = roots[0]
            for other in roots[1:]:
                root = graph.union(root, other)
            space = graph.spaces[graph.find(root)]
            if blocked and len(blocked) < len(roots):
                space.frozen.insert(0, f"{note}: one element must serve all of them, and one of their spaces cannot "
                                    f"move ({reason})")
            else:
                space.shared.append(f"{note}: they take one element")


def clashes(graph, sites: dict) -> dict:
    """``{site name: reason}`` for sites whose shared tensors would need two different maps.

    United spaces give every use of a tensor one element, but not yet one *map*: a weight tied
    between a writer that feeds a BatchNorm (rows move by the permutation part) and one that does not
    (rows move by the whole element) or feeds another BatchNorm (its own γ/σ folds into the rows), or read before and after a nonlinearity with φ(M) ≠ M, or a
    BatchNorm used on a writer's output and on a stream. ``sites``: space root → its Site.
    """
    def describe(u) -> tuple:
        root = graph.find(u.rows)
        site = sites.get(root)
        perm_only = site is None or site.group.name == "permutation"
        if u.mode is not None:  # a BatchNorm tensor: its mode, and the level it reads where φ(M) ≠ M
            same = perm_only or site.group.phi == "identity"
            return ("norm", root, None if perm_only else u.mode, None if same else graph.info[u.input].level)
        info = graph.info[u.node]
        # a writer feeding a BatchNorm has that BatchNorm folded into its rows (its own γ/σ): two calls feeding
        # different BatchNorms need different rows even with one element
        norm = next((p.norm for p in site.writers if p.name == u.place), None) if site is not None else None
        rows = (root, "pre" if perm_only or info.level not in ("prebn", "pregn") else ("feeds a norm", norm))
        if u.cols is None or u.input is None:
            return rows
        croot = graph.find(u.cols)
        cinfo = graph.info[u.input]
        csite = sites.get(croot)
        level = "pre" if cinfo.level == "post" and (csite is None or csite.group.phi == "identity") else cinfo.level
        return rows + (croot, level, cinfo.block)

    uses = defaultdict(list)
    for u in graph.uses:
        uses[_view(u.tensor)].append(u)
    out: dict = {}
    for us in uses.values():
        kinds = {}
        for u in us:
            kinds.setdefault(describe(u), []).append(u.place)
        if len(kinds) < 2:
            continue
        reason = (f"{us[0].param} is shared by {', '.join(sorted({u.place for u in us}))}, which would need different "
                  f"maps (one call feeds a BatchNorm and another does not or feeds another one, or reads it before "
                  f"and after a nonlinearity): a tensor is rewritten once")
        for u in us:
            for sid in (u.rows, u.cols):
                if sid is not None and graph.find(sid) in sites:
                    out.setdefault(sites[graph.find(sid)].name, reason)
    return out


def one_port_per_tensor(model, ports: list) -> tuple[list, "str | None"]:
    """A site's parameter ports, one per tensor moved: ``(ports, None)``, or ``(ports, why)`` where two would need
    different moves.

    A parameter tied between modules (``ln2.weight = ln1.weight``, two PReLUs or GRNs sharing their γ) is named by
    each module that reads it, and the uses unite their spaces (:func:`share_parameters`), so one site holds a port
    under each name. The push composes every move of a tensor, however named, into one (``_graph_push``): both
    ports would apply the site's element to it, P·P·a for a permutation. Ports naming one tensor (by its memory,
    as above) on one axis and range are one port; where they disagree on the move (level, block, role), one tensor
    would need two maps."""
    from ._graph_stream import split_port

    kept, seen = [], {}
    for role, p in ports:
        module, attr, sl = split_port(p.name)
        owner = model.get_submodule(module) if module else model
        t = getattr(owner, attr, None)
        if not isinstance(t, torch.Tensor):
            kept.append((role, p))
            continue
        key = (_view(t), sl, p.axis)
        move = (role, p.level, p.block, p.heads)
        if key not in seen:
            seen[key] = (p.name, move)
            kept.append((role, p))
        elif seen[key][1] != move:
            return kept, (f"{seen[key][0]} and {p.name} are one tensor, moved differently at this site ({seen[key][1][0]} "
                          f"at level {seen[key][1][1]!r}, {role} at level {p.level!r}): a tensor is rewritten once")
    return kept, None
