"""The graph backend's rules for tensor functions and methods (``call_function`` / ``call_method`` nodes):
activations called as functions, reshapes and permutes, reductions, paddings, concatenations and residual
additions. A mixin of :class:`._graph.Graph` (split from it to keep each file readable in one sitting): the
methods read and write the graph's spaces through ``self`` exactly as the module rules there do.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx, nn

from ..models import kept_call_name
from ._graph_reads import IGNORED_METHODS, META_ATTRS, reads_only_shape

_ADD = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}
# Ops that carry a constant per-channel vector to itself on the same channels (in eval mode): the affine extension's
# offset rides through them to the reader whose bias absorbs it (Graph._offsets_follow).
_OFFSET_FUNCTIONS = {"getitem", "flatten", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
                     "feature_alpha_dropout", "stochastic_depth", "cat", "concat", "concatenate", "permute", "transpose",
                     "contiguous", "add", "iadd", "roll"}
_OFFSET_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "expand", "expand_as", "mean", "contiguous",
                   "clone", "detach", "to", "cpu", "cuda", "add", "add_", "__add__", "__iadd__"}
_OFFSET_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Flatten,
                   nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AvgPool1d, nn.AvgPool2d,
                   nn.AvgPool3d)
# Tensor methods that apply a catalogued activation (their arguments are read like a function's).
_ACT_METHODS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "abs": torch.abs,
                "square": torch.square, "clamp": torch.clamp, "clip": torch.clamp, "clamp_min": torch.clamp_min,
                "clamp_max": torch.clamp_max}


class TensorOps:
    """Rules for ``call_function`` and ``call_method`` nodes (see the module docstring)."""

    def _function(self, node: fx.Node, fn: Any) -> None:
        args = self._tensor_args(node)
        fname = getattr(fn, "__name__", str(fn))
        kept = self.kept_whole.get(kept_call_name(fn))
        if kept is not None:  # a function fx could not trace into, one recorded call (models/_trace.py): before the
            # rules below, which go by name (a user's "avg_pool" helper is no average pooling)
            return self._fresh(node, f"{fname}() is kept whole: torch.fx cannot trace into it ({kept}), so what it reads "
                                     f"and makes does not move")
        if fn is operator.getitem and node.args and node.args[0] in self.chunks:
            from ._graph_shuffle import chunk_piece

            return chunk_piece(self, node)
        if fname in ("transpose", "chunk", "split") and args and self._val(node.args[0]) is args[0]:
            from ._graph_shuffle import shuffle_rule

            if shuffle_rule(self, node, args[0]):
                return
        if fn is operator.getitem and node.args and node.args[0] in self.tuples:
            out = self.tuples[node.args[0]]
            if node.args[1] == 0 and out is not None:
                self.info[node] = out
            elif self.shape(node) is not None:
                self._fresh(node, f"output {node.args[1]} of {node.args[0].target} (attention weights) is not understood")
            return
        if fname == "batch_norm" and args:
            from ._graph_batchnorm import batch_norm_function

            if batch_norm_function(self, node):  # F.batch_norm with a BatchNorm module's own tensors (timm)
                return
        if fname == "group_norm" and args:
            from ._graph_groupnorm import group_norm_function

            return group_norm_function(self, node)  # F.group_norm, torch.group_norm (DERIVATIONS §9)
        if fn is getattr and args:
            if node.args[1] in META_ATTRS:  # x.shape and friends read no values
                return
            return self._fresh(node, f"the tensor attribute .{node.args[1]} is not understood by the symmetry rules")
        if fn in _ADD:
            self._add(node)
            if fn is operator.iadd and args:
                self._overwrite(args[0], node)
            return
        if fn in (operator.mul, torch.mul, operator.truediv, torch.div) and len(args) == 1 \
                and len(node.args) == 2 and self._val(node.args[0]) is args[0] and isinstance(node.args[1], (int, float)):
            return self._out(node, args[0])  # x * 2.0, x / 2.0: linear, per channel
        if fn in (operator.mul, torch.mul) and len(args) == 1 and len(node.args) == 2 \
                and isinstance(node.args[0], (int, float)):
            return self._out(node, args[0])  # 2.0 * x
        if fn in (operator.mul, torch.mul) and len(args) == 1 and len(node.args) == 2 and not node.kwargs \
                and any(a in self.scales for a in node.args):
            from ._graph_scales import layer_scale

            return layer_scale(self, node, args[0], next(a for a in node.args if a in self.scales))
        if fname == "permute" and args and self._val(node.args[0]) is args[0]:
            return self._permute(node, args[0])  # torch.permute(x, dims) (torchvision's Permute module)
        if fn in (operator.mul, torch.mul) and len(args) == 2 and len(node.args) == 2 and not node.kwargs:
            from ._graph_vision import product

            return product(self, node, *args)  # x * gate (squeeze-excite)
        if fname in ("conv1d", "conv2d", "conv3d") and args and self._val(node.args[0]) is args[0]:
            from ._graph_scales import _conv_call, fixed_depthwise

            if _conv_call(node).get("weight") in self.filters:
                return fixed_depthwise(self, node, args[0])  # timm's BlurPool2d: a fixed filter per channel
        if fn is torch.prelu and args:
            if len(node.args) == 2 and node.args[1] in self.slopes and self._val(node.args[0]) is args[0]:
                from ._graph_scales import functional_prelu

                return functional_prelu(self, node, args[0])  # F.prelu(x, a), a one of the model's tensors
            return self._fresh(node, "F.prelu with slopes that are not a 1-D floating tensor of the model read only as "
                                     "F.prelu's slopes (computed in forward, a constant, or read elsewhere too): no "
                                     "transform can carry them")
        if fname in ("cat", "concat", "concatenate"):
            from ._graph_vision import concatenate

            return concatenate(self, node)
        if fname == "stochastic_depth" and args and self._val(node.args[0]) is args[0] and len(args) == 1:
            return self._out(node, args[0])  # one random scalar per example or batch: commutes with channel maps
        if fname == "roll" and len(args) == 1 and node.args and self._val(node.args[0]) is args[0]:
            from ._graph_vision import roll

            return roll(self, node, args[0])  # Swin's shifted windows (positions only)
        if args and ("pool" in fname or fname == "flatten") and not self._channels_first(node, args[0], fname):
            return
        if fname in ("flatten",) and args:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self._flatten(node, args[0], start, end)
        base = getattr(torch, fname[:-1], None) if fname.endswith("_") and not fname.endswith("__") else None
        if args and (self.is_activation(fn) or (base is not None and self.is_activation(base))):
            return self._call_activation(node, fn if base is None else base, inplace=base is not None)
        if args and ("avg_pool" in fname):
            padding = node.args[3] if len(node.args) > 3 else node.kwargs.get("padding", 0)
            if "adaptive" not in fname and any(p != 0 for p in _tuple(padding)):
                self.space(args[0]).offsets_ok = False
            return self._out(node, args[0])
        if args and ("max_pool" in fname):
            return self._max_pool(node, args[0])
        if args and fname in ("dropout", "dropout2d", "dropout1d"):
            return self._out(node, args[0])
        if fn is operator.getitem and args and (_token_index(node.args[1], len(self.shape(args[0]) or ())) if self.last(args[0])
                                                else _spatial_index(node.args[1])):
            return self._out(node, args[0])  # x[:, :, ::2, ::2]: subsampling positions keeps channels
        if fname == "pad" and args:
            return self._channel_pad(node, args[0])
        from ._graph_groupnorm import standardised_weight

        self._fresh(node, standardised_weight(node) or f"the function {fname} is not understood by the symmetry rules")

    def _method(self, node: fx.Node) -> None:
        name = node.target
        x = self._val(node.args[0]) if node.args else None
        if x in self.scales and name in ("view", "reshape"):  # γ.reshape(1, -1, 1, 1): the layer scale, broadcast
            from ._graph_scales import scale_view

            return scale_view(self, node)
        if name in ("mul", "mul_") and len(node.args) == 2 and not node.kwargs:
            return self._method_product(node, x, self._val(node.args[1]))
        if not (isinstance(x, fx.Node) and x in self.info):
            return self._fresh(node, f"the method .{name}() is not understood")
        inplace = name.endswith("_") and not name.endswith("__")
        if name in IGNORED_METHODS:
            return
        from ._graph_shuffle import SHUFFLE_OPS, shuffle_rule

        if name in SHUFFLE_OPS and shuffle_rule(self, node, x):  # channel shuffle, chunk (DERIVATIONS §8)
            return
        if name in _ADD_METHODS:
            self._add(node)
        elif (name[:-1] if inplace else name) in _ACT_METHODS:
            return self._call_activation(node, _ACT_METHODS[name[:-1] if inplace else name], inplace=inplace)
        elif name in ("view", "reshape", "flatten") and self._keeps_channels(node, x):
            return self._reshaped(node, x)
        elif name in ("permute", "transpose"):
            return self._permute(node, x)
        elif name in ("expand", "expand_as") and self._keeps_channels(node, x):
            return self._reshaped(node, x)
        elif name in ("view", "reshape", "flatten") and not self._channels_first(node, x, f".{name}()"):
            return
        elif name in ("view", "reshape", "flatten"):
            xs, ys = self.shape(x), self.shape(node)
            if ys is not None and xs is not None and len(ys) == 2 and len(xs) >= 2 and ys[1] == math.prod(xs[1:]):
                return self._out(node, x, block=self.info[x].block * math.prod(xs[2:]))
            return self._fresh(node, f".{name}() to shape {ys} mixes the channel axis")
        elif name in ("mean", "amax") and self._spatial_reduction(node, x):
            if name == "amax":
                return self._max_pool(node, x)
            return self._out(node, x)
        elif name in ("mean", "amax", "sum"):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            return self._fresh(node, f".{name}(dim={dims}) reduces the batch or the channel axis (axis "
                                     f"{self.channel_axis(x) if self.shape(x) else 1}), not only positions")
        elif name in ("contiguous", "clone", "detach"):
            return self._out(node, x)
        elif name in ("to", "cpu", "cuda") and self._moves_only(node, x):
            return self._out(node, x)
        else:
            self._fresh(node, f"the method .{name}() is not understood by the symmetry rules")
        if inplace or name == "__iadd__":
            self._overwrite(x, node)

    def _method_product(self, node: fx.Node, a: Any, b: Any) -> None:
        """``a.mul(b)`` / ``a.mul_(b)``: by a number or by a layer scale (``_graph_scales``) as ``a * b`` is; in place,
        later reads of ``a`` read the product."""
        if isinstance(a, fx.Node) and a in self.info and isinstance(b, (int, float)):
            self._out(node, a)
        elif isinstance(a, fx.Node) and a in self.info and b in self.scales:
            from ._graph_scales import layer_scale

            layer_scale(self, node, a, b)
        elif node.target == "mul" and a in self.scales and isinstance(b, fx.Node) and b in self.info:
            from ._graph_scales import layer_scale

            return layer_scale(self, node, b, a)
        else:
            return self._fresh(node, f"the method .{node.target}() is not understood by the symmetry rules")
        if node.target == "mul_":
            self._overwrite(a, node)

    def _post_reads(self, node: fx.Node) -> list[fx.Node]:
        """The post-activation tensors whose values ``node`` reads (an affine site's offset rides on them)."""
        if reads_only_shape(node):
            return []
        return [a for a in self._tensor_args(node) if self.info[a].level == "post"]

    def _offsets_follow(self, node: fx.Node, posts: list[fx.Node]) -> None:
        """After ``node``'s rule: whether the affine extension's offset c(M) = σ(0)(1 − φ(M)·1), which rides on the
        post-activation values ``posts`` until a reader's bias absorbs it (``_graph_push``), still reaches such a
        reader unchanged. It does through a reader of the space (``Linear``, conv) and through an op that carries a
        constant per-channel vector to itself and keeps the space at its post level (a dropout, an average pool, a
        reshape, a constant added). A scaling (``2 * h``), a sum with another tensor, a concatenation, a BatchNorm, a
        Linear over positions, an attention leaf would each need the offset moved with it: that space then takes no
        affine extension (the rules move no offset but at readers)."""
        for a in posts:
            sp = self.space(a)
            if not sp.offsets_ok:
                continue
            if node.op == "call_module" and any(r is a and name == node.target for name, r in sp.readers):
                continue
            out = self.info.get(node)
            if (out is not None and self.find(out.space) == self.find(self.info[a].space) and out.level == "post"
                    and self._carries_offset(node)):
                continue
            sp.offsets_ok = False

    def _carries_offset(self, node: fx.Node) -> bool:
        """Whether ``node`` maps a constant per-channel vector to itself (see ``_offsets_follow``)."""
        if node.op == "call_module":
            m = self.modules[node.target]
            return isinstance(m, _OFFSET_MODULES) and getattr(m, "divisor_override", None) is None
        if node.op == "call_method":
            return node.target in _OFFSET_METHODS
        fname = getattr(node.target, "__name__", "")
        if "adaptive_avg_pool" in fname:
            return True
        if "avg_pool" in fname:  # a divisor other than the window's size scales a constant
            return (node.args[6] if len(node.args) > 6 else node.kwargs.get("divisor_override")) is None
        return fname in _OFFSET_FUNCTIONS

    def _moves_only(self, node: fx.Node, x: fx.Node) -> bool:
        """Whether ``.to()``/``.cpu()``/``.cuda()`` only moved ``x`` to another device (same shape, same dtype, as
        accelerate's hooks move inputs to a module's execution device): every channel map commutes with a copy.
        A change of dtype rounds (or truncates to integers), and stays not understood."""
        a, b = node.meta.get("tensor_meta"), x.meta.get("tensor_meta")
        return (a is not None and b is not None and getattr(a, "dtype", None) == getattr(b, "dtype", 0)
                and self.shape(node) == self.shape(x))

    def _keeps_channels(self, node: fx.Node, x: fx.Node) -> bool:
        """Whether a reshape or expand of ``x`` leaves its channel axis whole where it was, changing only the
        positions (``[B, C, h, w] → [B, C, h·w]``; ``[B, T, C] → [B·T, C]``; the class token expanded over the
        batch): every channel map then commutes with it."""
        xs, ys = self.shape(x), self.shape(node)
        if xs is None or ys is None or self.info[x].block != 1 or len(xs) < 2 or len(ys) < 2:
            return False
        if self.last(x) or len(xs) == 2:  # channels last: the last axis kept, whatever the rest becomes
            return ys[-1] == xs[-1]
        return len(ys) >= 3 and ys[:2] == xs[:2]  # channels on axis 1: batch and channels kept

    def _reshaped(self, node: fx.Node, x: fx.Node) -> None:
        """``node``: ``x`` reshaped keeping its channel axis whole (``_keeps_channels``). A rank-2 ``[B, C]`` made
        rank 3 or more (``view(B, 1, C)``) has its channels on its last axis, no longer on axis 1: read as axis 1,
        a mean over them passed for a mean over positions and the push indexed a reader of one column by C channels."""
        self._out(node, x)
        if len(self.shape(x)) == 2 and len(self.shape(node)) >= 3:
            self.info[node].last = True

    def _permute(self, node: fx.Node, x: fx.Node) -> None:
        """``permute``/``transpose``: follow the channel axis (axis 1 ↔ last); the batch axis must stay first."""
        xs = self.shape(x)
        rank = len(xs or ())
        args = [a for a in node.args[1:]] or list(node.kwargs.values())
        if len(args) == 1 and isinstance(args[0], (tuple, list)):
            args = list(args[0])
        if not (rank >= 3 and all(isinstance(a, int) for a in args) and self.info[x].block == 1):
            return self._fresh(node, f".{node.target}{tuple(args)} of a tensor of shape {xs} is not understood")
        if node.target == "transpose" and len(args) == 2:
            perm = list(range(rank))
            a, b = args[0] % rank, args[1] % rank
            perm[a], perm[b] = perm[b], perm[a]
        else:
            perm = [a % rank for a in args]
        c = self.channel_axis(x)
        to = perm.index(c) if sorted(perm) == list(range(rank)) else None
        if to is None or perm[0] != 0 or to not in (1, rank - 1):
            return self._fresh(node, f".{node.target}{tuple(args)} moves the channel axis (axis {c}) or the batch axis")
        self._out(node, x)
        self.info[node].last = to == rank - 1

    def _broadcast_ok(self, a: fx.Node, b: fx.Node) -> bool:
        """``a + b`` broadcasting over positions or the batch only (a position table added to every example):
        both channel axes whole, in one place."""
        sa, sb = self.shape(a), self.shape(b)
        if sa is None or sb is None or not _broadcastable(sa, sb) or self.last(a) != self.last(b):
            return False
        c = self.channel_axis(a)
        return sa[c] == sb[c] and self.info[a].block == self.info[b].block == 1

    def _spatial_reduction(self, node: fx.Node, x: fx.Node) -> bool:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        xs = self.shape(x)
        if not (dims and xs and all(isinstance(d, int) for d in dims)):
            return False
        if self.last(x):  # [batch, tokens…, channels]: any axis but the first and the last
            return all(0 < d % len(xs) < len(xs) - 1 for d in dims)
        return all(d % len(xs) >= 2 for d in dims)

    def _channel_pad(self, node: fx.Node, x: fx.Node) -> None:
        from ._graph_vision import channel_pad

        channel_pad(self, node, x)

    def _add(self, node: fx.Node) -> None:
        tensors = self._tensor_args(node)
        others = [a for a in list(node.args) + list(node.kwargs.values()) if not isinstance(a, fx.Node)]
        if len(tensors) == 2:
            a, b = tensors
            if self.shape(a) != self.shape(b) and not self._broadcast_ok(a, b):
                return self._fresh(node, "a broadcasting addition")
            if self.info[a].block != self.info[b].block or self.last(a) != self.last(b):
                return self._fresh(node, "an addition of tensors whose channels are laid out differently")
            if {self.info[a].level, self.info[b].level} - {"pre"}:
                self.space(a).constraints.append(("mixed_levels", node))
            self.union(self.info[a].space, self.info[b].space)
            return self._out(node, a if self.shape(a) == self.shape(node) else b, level="pre")
        if len(tensors) == 1 and others and all(isinstance(c, (int, float)) for c in others):
            self.space(tensors[0]).constraints.append(("constant_add", node))
            return self._out(node, tensors[0])
        self._fresh(node, "an addition that is not understood")


def _broadcastable(sa: tuple, sb: tuple) -> bool:
    return len(sa) == len(sb) and all(p == q or 1 in (p, q) for p, q in zip(sa, sb))


def _spatial_index(index) -> bool:
    """True for an index like ``[:, :, ::2, ::2]`` that leaves the batch and channel axes whole."""
    if not isinstance(index, tuple) or len(index) < 2:
        return False
    full = slice(None, None, None)
    return index[0] == full and index[1] == full and all(isinstance(i, slice) or i is Ellipsis for i in index[2:])


def _token_index(index, rank: int) -> bool:
    from ._graph_vision import token_index

    return token_index(index, rank)


def _tuple(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)
