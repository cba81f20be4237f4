"""Graph rules for per-channel parameters: layer scales in products (docs/DERIVATIONS.md §4) and fixed depthwise
filters in functional convolutions (§3, BlurPool).

A *layer scale* is a floating ``nn.Parameter`` with one axis longer than 1, owned by a container (not a layer),
every use of which is a product with one traced tensor, broadcasting along that tensor's channel axis only:
torchvision's ConvNeXt ``layer_scale * x`` (``[C, 1, 1]``), timm's ``LayerScale`` ``x * gamma`` (``[C]`` on a
channels-last tensor), timm's ConvNeXt ``x.mul(gamma.reshape(1, -1, 1, 1))``. A view or reshape of such a parameter
to another shape with that one axis longer than 1 keeps its C numbers in order (a reshape of a vector laid out
along one axis), so it is read as the parameter itself, broadcast another way.

Per channel the product is ``y = γ ⊙ x``: a scaled permutation D·P of x passes it with γ permuted
(``γ ⊙ D·P·x = D·P·(P⁻¹γ ⊙ x)``, so ``γ ↦ P·γ``), output in x's space and level; a map that mixes channels does
not (``channel_scale``: scaled permutations only). γ is a *parameter port* of x's site moved by the element's
permutation part, on the parameter's own long axis.

A *fixed depthwise filter* is a floating tensor ``k`` of shape ``[C, 1, *kernel]`` (a buffer or a parameter of a
container), every use of which is the weight of ``F.conv1d/2d/3d(x, k, groups=C)`` without a bias (timm's
``BlurPool2d``: ``F.conv2d(F.pad(x, …, mode="reflect"), self.filt, stride=2, groups=C)``). Per channel
``y_c = k_c ⋆ x_c``, so x moving by D·P passes with ``k ↦ P·k`` (``k_π(c) ⋆ d_c·x_π(c) = d_c·y_π(c)``): a port of x's
site moved by the permutation part on axis 0; a map mixing channels does not, for filters that differ.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

_PRODUCTS = (operator.mul, torch.mul)
_VIEWS = ("view", "reshape")


def _long_axis(shape) -> int:
    return next(i for i, d in enumerate(shape) if d > 1)


def _only_scales(graph, node: fx.Node, n: int) -> bool:
    """Whether every use of ``node`` (a parameter with one axis of length ``n`` > 1, or a view of it) multiplies it
    into one other tensor, directly or through views keeping that one axis; not an in-place product writing it."""
    for u in node.users:
        if u.kwargs:
            return False
        product = len(u.args) == 2 and u.args[0] is not u.args[1]
        if product and u.op == "call_function" and u.target in _PRODUCTS:
            continue
        if product and u.op == "call_method" and (u.target == "mul" or (u.target == "mul_" and u.args[1] is node)):
            continue  # x.mul(γ), γ.mul(x), x.mul_(γ) (x overwritten, γ kept)
        if u.op == "call_method" and u.target in _VIEWS and u.args[0] is node:
            shape = graph.shape(u)
            if shape is not None and sum(d > 1 for d in shape) == 1 and max(shape) == n and _only_scales(graph, u, n):
                continue
        return False
    return True


def scale_parameter(graph, node: fx.Node, value) -> bool:
    """``get_attr`` of a layer scale (module docstring): remembered, for :func:`layer_scale` to place once it sees what
    it multiplies."""
    from ._graph_stream import _owned_by_container

    if not (isinstance(value, nn.Parameter) and value.is_floating_point() and _owned_by_container(graph, node)):
        return False
    if sum(d > 1 for d in value.shape) != 1 or not _only_scales(graph, node, max(value.shape)):
        return False
    graph.scales[node] = (node.target, value)
    return True


def scale_view(graph, node: fx.Node) -> None:
    """``γ.view(…)`` / ``γ.reshape(…)`` of a layer scale (checked by :func:`_only_scales`): the same parameter."""
    graph.scales[node] = graph.scales[node.args[0]]


def layer_scale(graph, node: fx.Node, x: fx.Node, g: fx.Node) -> None:
    """``γ * x`` with γ (the layer scale node ``g``, broadcast as its shape says) along ``x``'s channel axis only: same
    space and level as x, γ moved by the element's permutation part (module docstring)."""
    from ._graph_stream import param_port

    target, value = graph.scales[g]
    xs, ps = graph.shape(x) or (), graph.shape(g) or tuple(value.shape)
    c, off = graph.channel_axis(x) if xs else 1, len(xs) - len(ps)
    ok = off >= 0 and 0 <= c - off < len(ps) and ps[c - off] == xs[c] and graph.info[x].block == 1 \
        and all(d == 1 for i, d in enumerate(ps) if i != c - off)
    if not ok:
        return graph._fresh(node, f"a product with parameter {target!r} {tuple(ps)} that does not scale the channels of "
                                  f"{tuple(xs)} one by one")
    sp = graph.space(x)
    sp.constraints.append(("channel_scale", node))
    sp.offsets_ok = False
    sp.ports.append(("writer", param_port(target, "perm", _long_axis(value.shape)), x))
    # one place per product: a scale multiplying two spaces makes them take one element (_shared.share_parameters)
    graph.record_use(f"{target}@{node.name}", target, value, graph.info[x].space, None, node, x, mode="scale")
    graph._out(node, x)


_CONVS = {"conv1d": 1, "conv2d": 2, "conv3d": 3}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _conv_call(u: fx.Node) -> dict:
    """The arguments of a ``F.convNd`` call by name (empty for any other node)."""
    if u.op != "call_function" or getattr(u.target, "__name__", None) not in _CONVS:
        return {}
    return {**dict(zip(_CONV_ARGS, u.args)), **u.kwargs}


def fixed_filter(graph, node: fx.Node, value) -> bool:
    """``get_attr`` of a fixed depthwise filter (module docstring): remembered, for :func:`fixed_depthwise`."""
    from ._graph_stream import _owned_by_container

    if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim >= 3 and value.shape[1] == 1
            and value.shape[0] > 1 and _owned_by_container(graph, node)):
        return False
    for u in node.users:
        a = _conv_call(u)
        if not (a and a.get("weight") is node and a.get("input") is not node and a.get("bias") is None
                and a.get("groups") == value.shape[0] and _CONVS[u.target.__name__] == value.ndim - 2):
            return False
    graph.filters[node] = (node.target, value)
    return True


def fixed_depthwise(graph, node: fx.Node, x: fx.Node) -> None:
    """``F.convNd(x, k, groups=C)`` with a fixed depthwise filter k: same space and level as x, k moved by the element's
    permutation part (module docstring); only scaled permutations pass (``fixed_depthwise``)."""
    from ._graph_stream import param_port

    target, value = graph.filters[_conv_call(node)["weight"]]
    xs = graph.shape(x) or ()
    if graph.last(x) or graph.info[x].block != 1 or len(xs) != value.ndim or xs[1] != value.shape[0]:
        return graph._fresh(node, f"a depthwise convolution by {target!r} {tuple(value.shape)} of a tensor of shape "
                                  f"{tuple(xs)} whose channels are not its axis 1, one by one")
    sp = graph.space(x)
    sp.constraints.append(("fixed_depthwise", node))
    sp.offsets_ok = False
    sp.ports.append(("writer", param_port(target, "perm", 0), x))
    graph.record_use(f"{target}@{node.name}", target, value, graph.info[x].space, None, node, x, mode="scale")
    graph._out(node, x)
