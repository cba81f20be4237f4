"""Cutting a model's graph at a site: a *head* that returns every value crossing the cut, and a
*tail* that takes them and finishes the forward pass.

A single hook that replaces one tensor gets residual networks wrong: cut inside a residual branch
and the skip stream still flows from the model that was hooked. Here the model is traced with
``torch.fx`` (the same tracer and rules as ``wb.symmetry_map``) and the cut is a position in the
execution order: every value computed before it and read after it crosses. Each crossing tensor
knows its *space* (the site whose group acts on its channel axis), so a stitch can map every one.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx, nn

from .._errors import InvalidOptionError, UnsupportedModelError
from ..models import hooked
from ..symmetry import Site, is_activation, space_graph, symmetry_map


def site_label(site: str, hook: str, side: str) -> str:
    """How results name where a layer went: the site, and the activation module whose ``side`` ("before" or
    "after") it is where that is not the site's own name (a site may be observed at several)."""
    return site if not hook or hook == site else f"{site} ({side} {hook})"


@dataclass(frozen=True)
class Crossing:
    """One tensor crossing the cut: its fx node name, the site its channel axis belongs to (None when
    it belongs to no site: it then passes unmapped), its shape for one example and its block size
    (features per channel after a channel-major flatten)."""

    node: str
    site: Optional[str]
    shape: tuple
    block: int = 1

    @property
    def channels(self) -> int:
        return self.shape[1] // self.block if len(self.shape) > 1 else 1


class Cut:
    """``model`` (deep-copied, frozen, eval mode) split at ``site``.

    ``site`` is a site (or its name), or the hook name of one of a site's activation modules: a ResNet
    stage is one site observed after every block, and ``"layer1.1.act2"`` cuts after the second
    block's. ``at`` is the hook name of the module the cut follows (or precedes).
    ``where="after"`` cuts right after that activation (stitching);
    ``where="before"`` cuts right before it, so the activation's *input* — the pre-activation —
    crosses (the insertion test). ``head(x)`` returns the crossing values in ``crossings`` order;
    ``tail(*values)`` returns the model's output.
    """

    def __init__(self, model: nn.Module, site, example: torch.Tensor, where: str = "after"):
        if not isinstance(model, nn.Module):
            raise InvalidOptionError(f"expected a torch.nn.Module; got {type(model).__name__}.")
        smap = symmetry_map(model, example)
        if not smap.sites:
            why = "; ".join(r for _, r in smap.skipped) or "no hidden space with a writer"
            raise InvalidOptionError(f"{type(model).__name__} has no sites to cut at ({why}).")
        self.site, self.at = _resolve(smap, site, model)
        self.model = copy.deepcopy(model).eval()  # the caller's model is never touched
        for p in self.model.parameters():
            p.requires_grad_(False)
        graph = space_graph(self.model, example)
        nodes = list(graph.gm.graph.nodes)
        cut_node = self._site_node(nodes)
        # A functional activation (F.leaky_relu(self.l1(x))) has no module: its site is observed at the module whose
        # output the activation takes, so "before" the activation is right after that module.
        pre_out = where == "before" and not (cut_node.op == "call_module" and is_activation(graph.modules[cut_node.target]))
        if pre_out and not any(u.op == "call_function" and u.args and u.args[0] is cut_node and is_activation(u.target)
                               for u in cut_node.users):  # F.relu(self.l1(x) + 1): l1's output is not the pre-activation
            raise InvalidOptionError(
                f"site {self.site.name!r} is observed at {self.at!r}, which is not an activation: there is no "
                f"pre-activation to insert into (no activation function takes its output directly; a linear site "
                f"absorbs any invertible map, and in F.relu(layer(x) + c) M would land before the + c).")
        pos = {n: i for i, n in enumerate(nodes)}
        after = where == "after" or pre_out
        c = pos[cut_node] + (1 if after else 0)
        #: the node whose input (before) or output (after) is the site's activation
        self.site_node = cut_node.name if after else cut_node.args[0].name
        site_of = self._site_of_space(graph, smap)
        head = [n for n in nodes[:c] if n.op != "get_attr"]  # parameters read directly are copied, not crossed
        crossing = [n for n in head if any(pos[u] >= c for u in n.users)]
        self.crossings: list[Crossing] = []
        for n in crossing:
            meta = n.meta.get("tensor_meta")
            if meta is None or not hasattr(meta, "shape"):
                raise InvalidOptionError(f"the value {n.name!r} crosses the cut at {self.site.name!r} but is not a "
                                         f"tensor (e.g. a size); this model cannot be cut there.")
            info = graph.info.get(n)
            site_name = site_of.get(graph.find(info.space)) if info is not None else None
            if site_name is not None and graph.last(n):  # a stitch maps axis 1; a token-wise site's channels are last
                raise InvalidOptionError(f"site {site_name!r} has its channels on the last axis of {n.name!r} (a "
                                         f"token-wise Linear's space); stitching maps axis 1 and cannot cut there yet.")
            self.crossings.append(Crossing(n.name, site_name, tuple(meta.shape), info.block if info else 1))
        self.head = _graph_module(self.model, nodes[:c], [], crossing)
        self.tail = _graph_module(self.model, nodes[c:], crossing, None, extra=[n for n in nodes[:c] if n.op == "get_attr"])
        self._check_faithful(example[:1], {n.target for n in nodes if n.op == "call_module"})

    @torch.no_grad()
    def _check_faithful(self, x: torch.Tensor, called: set) -> None:
        """``tail(head(x))`` must be ``model(x)``: the traced graph drops the root's forward hooks (fx calls its
        forward, not the module) and keeps a container's as the ops it traced once (a hook reading state, or
        removed later, differs), so a stitch with the identity would differ from the model itself."""
        from torch.utils._pytree import tree_flatten

        want, got = tree_flatten(self.model(x))[0], tree_flatten(self.tail(*self.head(x)))[0]
        if len(want) == len(got) and all(
                not isinstance(w, torch.Tensor) or isinstance(g, torch.Tensor) and w.shape == g.shape and
                torch.allclose(g, w, rtol=1e-5, atol=1e-6 * float(w.nan_to_num().abs().max().clamp_min(1)) if w.numel() else 0.0,
                               equal_nan=True)
                for w, g in zip(want, got)):
            return
        with_hooks = [name or type(self.model).__name__ for name, m in self.model.named_modules()
                      if name not in called and hooked(m)]
        why = (f"forward hooks on {with_hooks} change what it computes, and the traced graph does not run hooks on "
               f"modules it traces through; remove them (handle.remove()) or fold them into the model" if with_hooks
               else "its forward does something the traced graph does not record (e.g. control flow on values)")
        raise UnsupportedModelError(f"{type(self.model).__name__} cut at {self.site.name!r}: the cut model's output "
                                    f"differs from the model's own on the first example: {why}.")

    def _site_node(self, nodes) -> fx.Node:
        name, _, call = self.site.name.partition("#")
        hook, k = self.at, int(call or 0) if self.at == self.site.hook_name else 0
        hits = [n for n in nodes if n.op == "call_module" and n.target == hook]
        if len(hits) <= k:
            raise InvalidOptionError(f"site {self.site.name!r}: its hook {hook!r} is not a module call in the traced graph.")
        return hits[k]

    @staticmethod
    def _site_of_space(graph: Graph, smap) -> dict[int, str]:
        """Space root → site name, found through each site's observed module calls."""
        calls: dict[tuple[str, int], fx.Node] = {}
        count: dict[str, int] = {}
        for n in graph.gm.graph.nodes:
            if n.op == "call_module":
                k = count.get(n.target, 0)
                count[n.target] = k + 1
                calls[(n.target, k)] = n
        out = {}
        for s in smap.sites:
            for o in s.observed:
                node = calls.get((o.name, o.call))
                if node is not None and node in graph.info:
                    out[graph.find(graph.info[node].space)] = s.name
        return out

    @property
    def primary(self) -> int:
        """Index of the crossing that is the site's own activation (or pre-activation)."""
        return [c.node for c in self.crossings].index(self.site_node)

    @torch.no_grad()
    def run_head(self, x: torch.Tensor, batch_size: int = 256) -> list[torch.Tensor]:
        """The crossing values for every example of ``x``, computed once in batches: ``[N, ...]`` each."""
        parts = [self.head(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        return [torch.cat([p[j] for p in parts]) for j in range(len(self.crossings))]


def _resolve(smap, site, model: nn.Module) -> tuple[Site, str]:
    """``(site, hook name of the activation to cut at)`` from a site, a site name, or the hook name of
    an activation module observed by one site."""
    if isinstance(site, Site):
        return smap[site.name], smap[site.name].hook_name
    if not isinstance(site, str):  # smap[1] is the map's second site, not the module named "1"
        hint = f" (the module named {str(site)!r}?)" if isinstance(site, int) else ""
        raise InvalidOptionError(f"site must be a site name or a Site; got {type(site).__name__} {site!r}{hint}. "
                                 f"Sites here: {list(smap.names)}.")
    if isinstance(site, str) and site not in smap.names:
        owners = [s for s in smap.sites if any(o.name == site for o in s.observed)]
        module = dict(model.named_modules()).get(site)
        if len(owners) == 1 and module is not None and is_activation(module):
            return owners[0], site
    found = smap[site]  # the map's own error names the nearest sites
    return found, found.hook_name


def _graph_module(root: nn.Module, body, inputs, outputs, extra=()) -> fx.GraphModule:
    """A GraphModule running ``body`` (nodes of one traced graph) with ``inputs`` as placeholders."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in inputs:
        env[n] = g.placeholder(n.name)
    for n in list(extra) + list(body):
        env[n] = g.node_copy(n, lambda a: env[a])
    if outputs is not None:
        g.output(tuple(env[n] for n in outputs))
    return fx.GraphModule(root, g)
