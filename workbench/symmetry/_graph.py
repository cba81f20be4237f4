"""Find the hidden spaces of a model by tracing it with ``torch.fx``.

Every tensor in the traced graph gets a *space* (a union-find class of tensors whose channel axis
must carry one group element) and a *level*: ``"prebn"`` (a writer's output that only a BatchNorm
reads: moved by the permutation part), ``"pre"`` (moved by the element M) or ``"post"`` (after the
nonlinearity: moved by φ(M)). Linear/conv modules end one space (as readers) and start the next (as
writers); BatchNorm, activations, pooling, dropout, flatten and residual additions keep the space.
Anything not understood freezes the spaces it touches, with the reason — never transformed wrongly.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import fx, nn

from ._modes import eval_mode

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PASS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_AVG = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_MAX = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_ADD = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}
_ACT_METHODS = {"relu": torch.relu, "relu_": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
                "tanh_": torch.tanh, "sigmoid_": torch.sigmoid}
_IGNORED_METHODS = {"size", "dim"}


@dataclass
class Space:
    """One hidden space under construction (a union-find class)."""

    id: int
    frozen: list[str] = field(default_factory=list)
    writers: list[tuple[str, fx.Node]] = field(default_factory=list)  # (module name, its output node)
    readers: list[tuple[str, fx.Node]] = field(default_factory=list)  # (module name, its input node)
    norms: list[tuple[str, str, fx.Node]] = field(default_factory=list)  # (BatchNorm, "output"|"input", its input)
    activations: list[tuple[Any, Optional[str], fx.Node]] = field(default_factory=list)
    constraints: list[tuple[str, fx.Node]] = field(default_factory=list)
    observed: list[tuple[str, int, fx.Node]] = field(default_factory=list)  # (module, call index, node)
    offsets_ok: bool = True  # a constant per-channel offset survives every reader (affine extension)
    n: Optional[int] = None
    # Zero-padding ("option A") shortcuts: (space embedded, first channel, channels) — this space's
    # element must carry that space's element on those channels, unmixed with the rest.
    embeds: list[tuple[int, int, int, fx.Node]] = field(default_factory=list)
    embedded: bool = False  # read by a zero-padding shortcut of another space
    label: str = ""  # the op that made it, for spaces no writer starts

    def absorb(self, other: "Space") -> None:
        for f in ("frozen", "writers", "readers", "norms", "activations", "constraints", "observed", "embeds"):
            getattr(self, f).extend(getattr(other, f))
        self.offsets_ok &= other.offsets_ok
        self.embedded |= other.embedded
        self.n = self.n or other.n
        self.label = self.label or other.label


@dataclass
class TensorInfo:
    space: int
    level: str  # "prebn" | "pre" | "post"
    block: int = 1  # features per channel after a flatten (channel-major blocks)


class Graph:
    """The traced model with a space and level for every tensor node."""

    def __init__(self, model: nn.Module, example: torch.Tensor, is_activation):
        self.model = model
        self.modules = dict(model.named_modules())
        self.is_activation = is_activation  # callable(obj) -> bool
        self.gm = fx.GraphModule(model, _Tracer(is_activation).trace(model))
        with eval_mode(model), torch.no_grad():
            from torch.fx.passes.shape_prop import ShapeProp

            ShapeProp(self.gm).propagate(example)
        self.parent: dict[int, int] = {}
        self.spaces: dict[int, Space] = {}
        self.info: dict[fx.Node, TensorInfo] = {}
        self.calls: dict[str, int] = {}
        for node in self.gm.graph.nodes:
            self._visit(node)

    # ------------------------------------------------------------------ union-find
    def new_space(self, reason: Optional[str] = None) -> int:
        sid = len(self.parent)
        self.parent[sid] = sid
        self.spaces[sid] = Space(sid, [reason] if reason else [])
        return sid

    def find(self, sid: int) -> int:
        while self.parent[sid] != sid:
            self.parent[sid] = self.parent[self.parent[sid]]
            sid = self.parent[sid]
        return sid

    def space(self, node: fx.Node) -> Space:
        return self.spaces[self.find(self.info[node].space)]

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            self.spaces[ra].absorb(self.spaces.pop(rb))
        return ra

    def freeze(self, node: Any, reason: str) -> None:
        if isinstance(node, fx.Node) and node in self.info:
            self.space(node).frozen.append(reason)

    # ------------------------------------------------------------------ helpers
    def shape(self, node: fx.Node) -> Optional[tuple]:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def _out(self, node: fx.Node, like: fx.Node, level: Optional[str] = None, block: Optional[int] = None):
        src = self.info[like]
        self.info[node] = TensorInfo(src.space, level or src.level, src.block if block is None else block)

    def _tensor_args(self, node: fx.Node) -> list[fx.Node]:
        flat = list(node.args) + list(node.kwargs.values())
        return [a for a in flat if isinstance(a, fx.Node) and a in self.info]

    def _fresh(self, node: fx.Node, reason: str) -> None:
        """An op we do not understand: freeze what it reads and what it makes."""
        for a in self._tensor_args(node):
            self.freeze(a, reason)
        if self.shape(node) is not None:
            sid = self.new_space(reason)
            self.spaces[sid].label = node.target if node.op == "call_module" else node.name
            self.info[node] = TensorInfo(sid, "pre")

    def _observe(self, node: fx.Node, name: str) -> None:
        k = self.calls.get(name, 0)
        self.calls[name] = k + 1
        if node in self.info:
            self.space(node).observed.append((name, k, node))

    # ------------------------------------------------------------------ the rules
    def _visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            if self.shape(node) is not None:
                self.info[node] = TensorInfo(self.new_space("the model's input"), "pre")
        elif node.op == "get_attr":
            self.info[node] = TensorInfo(self.new_space(f"parameter {node.target!r} used directly in forward"), "pre")
        elif node.op == "output":
            for a in self._tensor_args(node) or _flatten_nodes(node.args, self.info):
                self.freeze(a, "the model's output")
        elif node.op == "call_module":
            self._module(node, self.modules[node.target])
            if isinstance(self.modules[node.target], nn.Module):
                self._observe(node, node.target)
        elif node.op == "call_function":
            self._function(node, node.target)
        elif node.op == "call_method":
            self._method(node)

    def _module(self, node: fx.Node, m: nn.Module) -> None:
        name = node.target
        args = self._tensor_args(node)
        x = args[0] if args else None
        if x is None:
            return self._fresh(node, f"{name} ({type(m).__name__}) reads no traced tensor")
        xs = self.shape(x)
        if isinstance(m, nn.Linear) or (isinstance(m, _CONV) and m.groups == 1 and m.padding_mode == "zeros"):
            if isinstance(m, nn.Linear) and (xs is None or len(xs) != 2):
                self.freeze(x, f"{name} reads a rank-{len(xs or ())} tensor (only [batch, features] is understood)")
            else:
                sp = self.space(x)
                sp.readers.append((name, x))
                if m.bias is None:
                    sp.offsets_ok = False  # no bias to absorb a constant (affine extension)
                if isinstance(m, _CONV) and any(p != 0 for p in _tuple(m.padding)):
                    sp.offsets_ok = False  # zero padding turns a constant offset into a border effect
            sid = self.new_space()
            self.spaces[sid].writers.append((name, node))
            self.spaces[sid].n = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            self.info[node] = TensorInfo(sid, "pre")
        elif isinstance(m, _BN):
            if not (m.affine and m.track_running_stats):
                return self._fresh(node, f"{name}: BatchNorm without affine parameters or running statistics")
            if x.op == "call_module" and len(x.users) == 1 and self.space(x).writers and self.info[x].level == "pre" \
                    and any(w_node is x for _, w_node in self.space(x).writers):
                self.info[x].level = "prebn"  # the writer feeds only this BatchNorm: scalings go on γ, β
                self.space(x).norms.append((name, "output", x))
                self.space(x).constraints.append(("batchnorm", node))
            else:
                self.space(x).norms.append((name, "input", x))
                self.space(x).constraints.append(("batchnorm_input", node))
            self._out(node, x, level="pre")
        elif isinstance(m, _PASS):
            self._out(node, x)
        elif self.is_activation(m):
            self._activation(node, x, m, name)
        elif isinstance(m, _AVG):
            if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)) and any(p != 0 for p in _tuple(m.padding)):
                self.space(x).offsets_ok = False
            self._out(node, x)
        elif isinstance(m, _MAX):
            self.space(x).constraints.append(("max_pool", x))
            self.space(x).offsets_ok = False
            self._out(node, x)
        elif isinstance(m, nn.Flatten):
            self._flatten(node, x, m.start_dim, m.end_dim)
        else:
            self._fresh(node, f"{name} ({type(m).__name__}) is not understood by the symmetry rules")

    def _activation(self, node: fx.Node, x: fx.Node, act: Any, name: Optional[str]) -> None:
        if self.info[x].level == "post":
            return self._fresh(node, f"two nonlinearities in a row at {name or node.name}")
        self.space(x).activations.append((act, name, node))
        self._out(node, x, level="post")

    def _flatten(self, node: fx.Node, x: fx.Node, start: int, end: int) -> None:
        xs = self.shape(x)
        if start == 1 and end in (-1, len(xs) - 1):
            self._out(node, x, block=self.info[x].block * math.prod(xs[2:]))
        else:
            self._fresh(node, f"flatten(start_dim={start}, end_dim={end}) mixes the channel axis")

    def _function(self, node: fx.Node, fn: Any) -> None:
        args = self._tensor_args(node)
        if fn is getattr and args:  # x.shape and friends read no values
            return
        fname = getattr(fn, "__name__", str(fn))
        if fn in _ADD:
            return self._add(node)
        if fn in (operator.mul, torch.mul) and len(args) == 1 and isinstance(node.args[1] if node.args[0] is args[0] else node.args[0], (int, float)):
            return self._out(node, args[0])
        if fname in ("flatten",) and args:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self._flatten(node, args[0], start, end)
        if args and self.is_activation(fn):
            return self._activation(node, args[0], fn, None)
        if args and ("avg_pool" in fname):
            return self._out(node, args[0])
        if args and ("max_pool" in fname):
            self.space(args[0]).constraints.append(("max_pool", args[0]))
            self.space(args[0]).offsets_ok = False
            return self._out(node, args[0])
        if args and fname in ("dropout", "dropout2d", "dropout1d"):
            return self._out(node, args[0])
        if fn is operator.getitem and args and _spatial_index(node.args[1]):
            return self._out(node, args[0])  # x[:, :, ::2, ::2]: subsampling positions keeps channels
        if fname == "pad" and args:
            return self._channel_pad(node, args[0])
        self._fresh(node, f"the function {fname} is not understood by the symmetry rules")

    def _method(self, node: fx.Node) -> None:
        args = self._tensor_args(node)
        name = node.target
        if not args or node.args[0] is not args[0]:
            return self._fresh(node, f"the method .{name}() is not understood")
        x = args[0]
        if name in _IGNORED_METHODS:
            return
        if name in _ADD_METHODS:
            return self._add(node)
        if name in _ACT_METHODS:
            return self._activation(node, x, _ACT_METHODS[name], None)
        if name in ("view", "reshape", "flatten"):
            xs, ys = self.shape(x), self.shape(node)
            if ys is not None and xs is not None and len(ys) == 2 and len(xs) >= 2 and ys[1] == math.prod(xs[1:]):
                return self._out(node, x, block=self.info[x].block * math.prod(xs[2:]))
            return self._fresh(node, f".{name}() to shape {ys} mixes the channel axis")
        if name in ("mean", "amax"):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
            xs = self.shape(x)
            if dims and xs and all(d % len(xs) >= 2 for d in dims):
                if name == "amax":
                    self.space(x).constraints.append(("max_pool", x))
                    self.space(x).offsets_ok = False
                return self._out(node, x)
        if name in ("contiguous", "clone", "detach"):
            return self._out(node, x)
        self._fresh(node, f"the method .{name}() is not understood by the symmetry rules")

    def _channel_pad(self, node: fx.Node, x: fx.Node) -> None:
        """F.pad with zeros on the channel axis (CIFAR ResNets' option-A shortcut)."""
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", 0)
        xs = self.shape(x)
        if mode != "constant" or value not in (0, 0.0, None) or xs is None or pad is None:
            return self._fresh(node, "a padding that is not zeros")
        pad = list(pad) + [0] * (2 * len(xs) - len(pad))  # pairs from the last axis backwards
        channel = 2 * (len(xs) - 2)
        if any(pad[:channel]) or len(pad) > 2 * (len(xs) - 1) and any(pad[channel + 2:]):
            return self._fresh(node, "a padding of spatial axes")
        before = pad[channel]
        sid = self.new_space()
        self.spaces[sid].n = xs[1] + before + pad[channel + 1]
        self.spaces[sid].embeds.append((self.info[x].space, before, xs[1], node))
        self.space(x).embedded = True
        self.info[node] = TensorInfo(sid, self.info[x].level)

    def _add(self, node: fx.Node) -> None:
        tensors = self._tensor_args(node)
        others = [a for a in list(node.args) + list(node.kwargs.values()) if not isinstance(a, fx.Node)]
        if len(tensors) == 2:
            a, b = tensors
            if self.shape(a) != self.shape(b):
                return self._fresh(node, "a broadcasting addition")
            if self.info[a].block != self.info[b].block:
                return self._fresh(node, "an addition of differently flattened tensors")
            if {self.info[a].level, self.info[b].level} - {"pre"}:
                self.space(a).constraints.append(("mixed_levels", node))
            self.union(self.info[a].space, self.info[b].space)
            return self._out(node, a, level="pre")
        if len(tensors) == 1 and others:
            self.space(tensors[0]).constraints.append(("constant_add", node))
            return self._out(node, tensors[0])
        self._fresh(node, "an addition that is not understood")


def _spatial_index(index) -> bool:
    """True for an index like ``[:, :, ::2, ::2]`` that leaves the batch and channel axes whole."""
    if not isinstance(index, tuple) or len(index) < 2:
        return False
    full = slice(None, None, None)
    return index[0] == full and index[1] == full and all(isinstance(i, slice) or i is Ellipsis for i in index[2:])


def _tuple(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _flatten_nodes(args, info) -> list:
    out = []
    for a in args:
        if isinstance(a, fx.Node) and a in info:
            out.append(a)
        elif isinstance(a, (tuple, list)):
            out += _flatten_nodes(a, info)
        elif isinstance(a, dict):
            out += _flatten_nodes(list(a.values()), info)
    return out


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping every catalogued activation module a leaf (custom ones too)."""

    def __init__(self, is_activation):
        super().__init__()
        self._is_activation = is_activation

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return super().is_leaf_module(m, qualname) or self._is_activation(m)
