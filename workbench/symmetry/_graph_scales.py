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

*PReLU slopes* (``nn.PReLU(C)``, or ``F.prelu(x, a)`` with ``a`` a parameter or buffer of the model, ``[C]``, read only by
such calls): ``y_c = max(0, x_c) + a_c·min(0, x_c)`` on axis 1. Each channel is positively homogeneous, and a channel
permutation passes when the slopes follow it: ``PReLU_{P·a}(D·P·x) = D·P·PReLU_a(x)`` for D positive diagonal (docs/
DERIVATIONS.md §3, PReLU). So the site's group is P·D₊ (φ = identity), with ``a ↦ P·a`` a port of the site moved by
the permutation part. A single functional slope (``a`` of one element) takes the same group with nothing to move.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ..groups import get_group

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


# ---------------------------------------------------------------------- PReLU slopes (module docstring)
class CarriedSlopes:
    """A per-channel PReLU whose slopes move with its site's permutation: what ``Space.activations`` holds for it
    (the catalogue's group for the activation alone, its slopes fixed, is D₊: no permutation)."""

    def __init__(self, label: str):
        self.label = label

    def group(self, n: int):
        G = get_group("scaled_permutation", n)
        G.source, G.activation = "catalogue", f"{self.label}, slopes permuted with the channels"
        return G


def carried_slopes(graph, node: fx.Node, x: fx.Node, target: str, value: torch.Tensor, place: str, label: str) -> bool:
    """A PReLU applying ``value`` (``target``, one slope per channel or one in all) along axis 1 of ``x``: the activation
    rule, with the slopes a port of x's site moved by the permutation part. False (``node`` made fresh) where axis 1
    is not x's channels one by one, or the rule refused the activation."""
    from ._graph_stream import param_port

    xs = graph.shape(x) or ()
    if value.numel() > 1 and (graph.last(x) or len(xs) < 2 or graph.info[x].block != 1 or xs[1] != value.numel()):
        # nn.PReLU reads its slopes along axis 1: positions here, or a flattened channel's features
        graph._fresh(node, f"{label}: a PReLU with {value.numel()} slopes applies them along axis 1 of its input, but axis "
                           f"1 of this tensor (shape {tuple(xs)}) is not its channels one by one (channels last, or "
                           f"flattened)")
        return False
    graph._activation(node, x, CarriedSlopes(label), label)
    if node not in graph.info or graph.find(graph.info[node].space) != graph.find(graph.info[x].space):
        return False  # refused (two nonlinearities in a row): frozen, nothing moves
    if value.numel() > 1:
        graph.space(x).ports.append(("writer", param_port(target, "perm", 0), x))
        graph.record_use(place, target, value, graph.info[x].space, None, node, x, mode="scale")
    return True


def slope_parameter(graph, node: fx.Node, value) -> bool:
    """``get_attr`` of a floating tensor of the model, 1-D, every value read of which is the weight of an ``F.prelu``
    call on another tensor: remembered, for :func:`functional_prelu`."""
    from ._graph_reads import value_readers

    if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim == 1):
        return False
    users = value_readers(node)
    if not users or not all(u.op == "call_function" and u.target is torch.prelu and not u.kwargs and len(u.args) == 2
                            and u.args[1] is node and u.args[0] is not node for u in users):
        return False
    graph.slopes[node] = (node.target, value)
    return True


def functional_prelu(graph, node: fx.Node, x: fx.Node) -> None:
    """``F.prelu(x, a)`` with ``a`` remembered by :func:`slope_parameter`: the PReLU rule (:func:`carried_slopes`)."""
    target, value = graph.slopes[node.args[1]]
    carried_slopes(graph, node, x, target, value, f"{target}@{node.name}", f"prelu({target})")
