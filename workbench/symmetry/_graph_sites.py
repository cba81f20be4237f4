"""The graph backend's maps: sites of a plain ``nn.Module`` from its torch.fx trace (``_graph.py``)."""
from __future__ import annotations

import functools
import re
from typing import Any, Optional

import torch
from torch import nn

from ..groups import get_group, phi_positive
from ..models import TraceFailure
from ._lattice import CONSTRAINTS, generators, restrict
from ._graph_stream import (CONSTRAINTS as STREAM_CONSTRAINTS, CONVNEXT_NOTE, LN_NOTE, MIXER_NOTE, SIMPLENORM_NOTE,
                            SWIN_NOTE, extra_site, is_simple_norm, with_sign)
from ._channel_families import grouped
from ._graph_swin import POSTNORM_NOTE, writes_stream
from ._graph_vision import COUPLER_NOTE, CONSTRAINTS as VISION_CONSTRAINTS
from ._graph_groupnorm import CONSTRAINTS as GROUPNORM_CONSTRAINTS, site_group as group_norm_group
from ._graph_grn import CONSTRAINTS as GRN_CONSTRAINTS
from ._sites import Observation, Port, Site, SymmetryMap

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

def graph_map(model: nn.Module, example: Optional[torch.Tensor], affine: bool) -> SymmetryMap:
    """The map of a plain module traced and run once on ``example`` (guessed when None)."""
    from ._graph import Graph

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
    if graph is not None:
        return _build(graph, type(model).__name__, affine)
    if not candidates:
        why = "cannot guess an input for this model; pass example= (one input batch)"
    elif example is None and not errors[-1].startswith("torch.fx could not trace"):
        why = (f"no guessed input worked (tried shapes {[tuple(c.shape) for c in candidates]}); pass example=. "
               f"Last: {errors[-1]}")
    else:
        why = errors[-1]
    return SymmetryMap(type(model).__name__, [], [(type(model).__name__, why)], trace_error=why)


def _build(graph, model_name: str, affine: bool) -> SymmetryMap:
    from ..groups import intertwiner_group

    from ._shared import clashes, one_port_per_tensor

    sites, skipped = [], []
    site_of_space: dict[int, str] = {}
    root_of: dict[int, Site] = {}
    for space in _parents_first(graph):
        reasons = list(dict.fromkeys(space.frozen))
        if not space.writers and not space.embeds and not any(r == "writer" for r, *_ in space.ports):
            if space.label and reasons:  # made by an op the rules do not know
                skipped.append((space.label, "; ".join(reasons)))
            continue
        # a concatenation's space has no writer of its own: its pieces' writers write it
        place = ", ".join(dict.fromkeys([w for w, _ in space.writers] + [p.name for r, p, _ in space.ports
                                                                         if r == "writer"])) or space.label
        if not reasons and not space.readers and not space.embedded and not any(r == "reader" for r, *_ in space.ports):
            reasons.append("its values are not used (no layer reads them)")
        n = space.n
        kinds = {_act_label(a) for a, _, _ in space.activations}
        notes = list(dict.fromkeys(space.shared))
        if n is None:  # a space no op gave a width (made by an op the rules do not know): nothing to draw on
            skipped.append((place, "; ".join(reasons or ["its width is not known"])))
            continue
        use_affine = affine and space.offsets_ok
        groups = [_activation_group(a, n, use_affine if affine else None) for a, _, _ in space.activations]
        if use_affine and len({g.centre or 0.0 for g in groups}) > 1:
            # One site has one offset c(M) = σ(0)(1 − φ(M)·1), which every reader's bias takes; sigmoid (σ(0) = ½)
            # and tanh (c = 0) on one space would each need their own, so only the linear group holds for both.
            groups = [_activation_group(a, n, None) for a, _, _ in space.activations]
            notes.append(f"affine extension off: activations with different σ(0) share it ({sorted(kinds)}), and "
                         f"the readers' biases can absorb one offset c(M) = σ(0)(1 − φ(M)·1), not one per activation")
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
                notes.append("affine extension off: a constant offset would not reach the readers' biases unchanged (zero "
                             "padding, a max pool, a scaling, a sum, a norm or a concatenation on the way)")
        else:
            group = get_group("gl", n)
            notes.append("no nonlinearity: a linear site")
        for kind, node in space.constraints:
            if kind == "max_pool" and graph.info[node].level == "post" and phi_positive(group.phi):
                continue  # φ(M) = abs(M) or an even power is already a positive scaled permutation
            allowed, why = {**CONSTRAINTS, **VISION_CONSTRAINTS, **STREAM_CONSTRAINTS, **GROUPNORM_CONSTRAINTS,
                            **GRN_CONSTRAINTS}[kind]
            if kind == "mixed_levels":
                if group.phi == "identity":
                    continue
                allowed, why = {"perm"}, ("pre- and post-activation values are added, so an element must equal its "
                                          "φ(M); the rules grant permutations")
            new = restrict(group, allowed)
            if new.name != group.name:
                notes.append(f"{group.name} → {new.name}: {why}")
                group = new
        if space.couplers:
            coupled = grouped(group, {g for _, g, _ in space.couplers})
            if coupled is None:
                skipped.append((place, "grouped convolutions with different numbers of groups read it: "
                                       + ", ".join(sorted({f"{c} ({g})" for c, g, _ in space.couplers}))))
                continue
            if coupled.name != group.name:
                notes.append(f"{group.name} → {coupled.name}: a grouped convolution keeps only permutations that map "
                             f"its groups onto each other")
            group = coupled
            notes.append(COUPLER_NOTE)
        group = group_norm_group(graph, space, group, notes)  # GroupNorms: whole groups, signs on their inputs
        if group is None:
            skipped.append((place, "GroupNorms or grouped convolutions with different numbers of groups read it"))
            continue
        group = with_sign(group, space)  # a LayerNorm stream: −I passes too (its bias takes the sign)
        if group.name == "trivial":
            skipped.append((place, "no map but the identity keeps the function: " + "; ".join(notes)))
            continue
        level_of = {node: graph.info[node] for node in graph.info}
        norm_of = {node: bn for bn, mode, node in space.norms if mode == "output" or mode.startswith("groupnorm_output")}
        writers = list(dict.fromkeys(Port(w, level_of[node].level, norm=norm_of.get(node)) for w, node in space.writers))
        readers = list(dict.fromkeys(Port(r, level_of[node].level, level_of[node].block) for r, node in space.readers))
        ports, tied = one_port_per_tensor(graph.model, list(dict.fromkeys((r, p) for r, p, _ in space.ports)))
        if tied:
            skipped.append((place, tied))
            continue
        writers += [p for r, p in ports if r == "writer"]
        readers += [p for r, p in ports if r == "reader"]
        if any(kind.startswith("layernorm") for kind, _ in space.constraints):
            merged = any(n.op == "call_module" and type(graph.modules.get(n.target)).__name__ == "PatchMerging"
                         for kind, n in space.constraints if kind.startswith("layernorm"))
            simple = all(n.op == "call_module" and is_simple_norm(graph.modules.get(n.target))
                         for kind, n in space.constraints if kind.startswith("layernorm"))
            order = {node: i for i, node in enumerate(graph.gm.graph.nodes)}  # (also below: where it starts)
            post = any(writes_stream(graph, n, order) for kind, n in space.constraints if kind.startswith("layernorm"))
            notes.append(CONVNEXT_NOTE if space.couplers else MIXER_NOTE if space.activations else POSTNORM_NOTE
                         if post else SWIN_NOTE if merged else SIMPLENORM_NOTE if simple else LN_NOTE)
        norms = list(dict.fromkeys((bn, mode) for bn, mode, _ in space.norms))
        if norm_of and group.continuous:
            notes.append(f"BatchNorm {', '.join(sorted(set(norm_of.values())))} folds into its writer for maps that "
                         f"are not scaled permutations: exact in eval mode (running statistics), as verify runs")
        offset = group.offset(group.identity()) if hasattr(group, "offset") else None
        is_affine = bool(affine and offset is not None)
        observed = [Observation(name, call, level_of[node].level, level_of[node].block,
                                axis=-1 if graph.last(node) else 1) for name, call, node in space.observed]
        act_nodes = {node for _, _, node in space.activations}
        bn_names = {bn for bn, _, _ in space.norms}
        if any(kind.startswith("layernorm") for kind, _ in space.constraints):  # a stream: named where it starts
            observed, space.observed = map(list, zip(*sorted(zip(observed, space.observed),
                                                               key=lambda p: order.get(p[1][2], 0)))) if observed else ([], [])
        ranked = ([o for o, (_, _, node) in zip(observed, space.observed) if node in act_nodes]
                  + [o for o in observed if o.name in bn_names and o.level == "pre"]
                  + [o for o in observed if o.level == "pre"] + observed)
        if any(kind.startswith("layernorm") for kind, _ in space.constraints):
            ranked = observed  # in graph order (above): where the stream starts
        primary = ranked[0] if ranked else Observation(place, 0, "pre")  # nothing observes it: named after the op
        label = primary.name + (f"#{primary.call}" if primary.call else "")
        embeds = [(site_of_space.get(graph.find(pid)), start, count, level_of[node].level)
                  for pid, start, count, node in space.embeds]
        if embeds and any(not isinstance(a, int) for _, a, *_ in embeds):  # channel by channel (chunk, shuffle: §8)
            notes.append("concatenation, channel shuffle or chunk: " + ", ".join(
                f"{c if isinstance(a, int) else len(a)} channels carry {p or 'an untransformed space'}"
                for p, a, c, _ in embeds))
        elif embeds:
            notes.append(("concatenation" if space.concat else "zero-padding shortcut") + ": channels " + ", ".join(
                f"{a}–{a + c - 1} carry {p or 'an untransformed space'}" for p, a, c, _ in embeds))
        site_of_space[space.id] = label
        norm_levels = {bn: level_of[node].level for bn, mode, node in space.norms if mode in ("input", "coupler")}
        sites.append(Site(label, n, group, ", ".join(sorted(kinds)) or "none", primary.name, writers, readers,
                          norms, observed, notes, is_affine, embeds, norm_levels))
        root_of[graph.find(space.id)] = sites[-1]
    sites += [extra_site(e) for e in graph.extra_sites]
    drop = clashes(graph, root_of)  # a shared tensor whose uses would need two different maps
    from ._graph_shuffle import settle_classes
    from ._graph_vision import settle_embedded
    from ._host_group import per_block

    drop.update(settle_embedded(graph, sites, root_of, site_of_space, drop))
    classed = settle_classes(sites, drop)  # after the hosts' restrictions: a classed group is restricted no further
    if classed:
        drop.update(classed)
        drop.update(settle_embedded(graph, sites, root_of, site_of_space, drop))
    per_block(sites, drop)  # last: a host's group is made of its pieces' final groups
    skipped += [(", ".join(dict.fromkeys(p.name for p in s.writers)) or s.name, drop[s.name]) for s in sites if s.name in drop]
    return SymmetryMap(model_name, [s for s in sites if s.name not in drop], skipped)


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


def _activation_group(act, n: int, affine: Optional[bool]):
    """The group of one activation on ``n`` units (``affine``: None for the linear group, else the affine extension's
    flag as the catalogue takes it); a PReLU whose slopes the site carries (``_graph_scales.CarriedSlopes``): P·D₊."""
    from ..groups import intertwiner_group
    from ._graph_scales import CarriedSlopes

    if isinstance(act, CarriedSlopes):
        return act.group(n)  # σ(0) = 0: the affine extension adds nothing
    return intertwiner_group(act, n) if affine is None else intertwiner_group(act, n, affine=affine)


def _act_label(act) -> str:
    from ._graph_scales import CarriedSlopes

    if isinstance(act, CarriedSlopes):
        return "PReLU"
    if isinstance(act, nn.Module):
        return type(act).__name__
    if isinstance(act, functools.partial):  # a functional call with its arguments: "leaky_relu(negative_slope=0.2)"
        from ..groups import intertwiner_group

        return re.sub(r"^(torch\.special\.|torch\.|F\.)", "", intertwiner_group(act, 1).activation)
    return getattr(act, "__name__", str(act))
