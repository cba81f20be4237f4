"""Graph rules for Swin's own constructs (docs/DERIVATIONS.md §2, Swin): the patch merging that ends a stage
(torchvision's and timm's v1 ``PatchMerging``: the channels of 2×2 neighbouring tokens concatenated, one LayerNorm
over the 4C vector, a Linear to the next stage), and the note of a *post-norm* stream (timm's Swin V2 CR blocks,
``x + LN(f(x))``), whose LayerNorms write the stream rather than read it. Swin's window attention is an attention
leaf (``_graph_stream``); its shifts (``torch.roll``) and window paddings are position ops (``_graph_vision``).
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from .._offload import served
from ._graph_stream import param_port

POSTNORM_NOTE = ("a post-norm residual stream (x + LN(f(x)): timm's Swin V2 blocks): a LayerNorm writes it, its input "
                 "f(x) (an out-projection's rows) moving by the same element, which passes the norm as for a pre-LN "
                 "stream (docs/DERIVATIONS.md §2, post-norm). The group sampled, s·P (s·R, R·1 = 1, with gains 1), "
                 "is a subgroup of the exact one, which is not derived here: the shear of a pre-LN stream does not "
                 "pass a norm writing the stream, and a norm's gain may scale its output where its input does not move")
_ADDS = {operator.add, operator.iadd, torch.add}


def patch_merging(graph, node: fx.Node, m: nn.Module, x: fx.Node, name: str) -> bool:
    """Swin's ``PatchMerging``: the channels of 2×2 neighbouring tokens concatenated (4C), one LayerNorm over them,
    ``reduction`` (4C → 2C). The 4C vector moves by blockdiag(M, M, M, M), which passes the norm exactly when M
    does (a permutation; a rotation fixing 1 when its gain is 1), so the stage's stream is read here like by
    a LayerNorm, its gain and bias and the reduction's columns tiled; the reduction's rows write the next
    stage (docs/DERIVATIONS.md §2, Swin: no shear, which the map does not sample anyway)."""
    xs = graph.shape(x) or ()
    C = xs[-1] if xs else 0
    norm, red = getattr(m, "norm", None), getattr(m, "reduction", None)
    if not (graph.last(x) and isinstance(norm, nn.LayerNorm) and isinstance(red, nn.Linear)
            and tuple(norm.normalized_shape) == (4 * C,) and red.in_features == 4 * C):
        graph._fresh(node, f"{name} (PatchMerging) on a tensor of shape {tuple(xs)} is not understood")
        return False
    sp = graph.space(x)
    folded = not norm.elementwise_affine or bool((served(norm, "weight") == 1).all())
    sp.constraints.append(("layernorm_folded" if folded else "layernorm", node))
    sp.offsets_ok = False
    level = graph.info[x].level
    if norm.elementwise_affine:
        sp.ports.append(("writer", param_port(f"{name}.norm.weight", "perm", 0, block=4), x))
        if norm.bias is not None:
            sp.ports.append(("writer", param_port(f"{name}.norm.bias", "post" if level == "post" else "pre", 0, block=4), x))
    sp.ports.append(("reader", param_port(f"{name}.reduction.weight", level, 1, block=4), x))
    out = graph.new_space()
    osp = graph.spaces[out]
    osp.n, osp.label = red.out_features, name
    osp.ports.append(("writer", param_port(f"{name}.reduction.weight", "pre", 0), node))
    if red.bias is not None:
        osp.ports.append(("writer", param_port(f"{name}.reduction.bias", "pre", 0), node))
    graph.info[node] = graph.tensor_info(out, "pre", last=True)
    place = graph._place(name)
    graph.record_use(place, f"{name}.reduction.weight", red.weight, out, graph.info[x].space, node, x, mode="attention")
    return True


def writes_stream(graph, norm: fx.Node, order: dict) -> bool:
    """Whether the LayerNorm call ``norm`` is a post-norm branch's, ``x + LN(f(x))``: its output reaches a residual
    addition (through ops that keep its space and are no module but a dropout or an identity) whose other operand
    was computed before it (``x``, of which ``f(x)`` is computed). A pre-LN stream's norms go to readers (Linears,
    attention), which make other spaces; an embedding's norm (a patch embedding's, ``order``: the trace's nodes in
    order) starts the stream, the branches added to it computed after it."""
    space = graph.find(graph.info[norm].space) if norm in graph.info else None
    todo, seen = [norm], set()
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in seen or u not in graph.info or graph.find(graph.info[u].space) != space:
                continue
            seen.add(u)
            if (u.op == "call_function" and u.target in _ADDS) or (u.op == "call_method" and u.target in ("add", "add_")):
                others = [a for a in u.args if isinstance(a, fx.Node) and a is not n]
                if others and all(order.get(a, 1 << 62) < order[norm] for a in others):
                    return True
                continue
            if u.op == "call_module" and not isinstance(graph.modules[u.target], (nn.Dropout, nn.Identity)):
                continue
            todo.append(u)
    return False
