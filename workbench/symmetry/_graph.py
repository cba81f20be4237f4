"""Find the hidden spaces of a model by tracing it with ``torch.fx``.

Every tensor in the traced graph gets a *space* (a union-find class of tensors whose channel axis
must carry one group element) and a *level*: ``"prebn"`` (a writer's output that only a BatchNorm
reads: moved by the permutation part), ``"pre"`` (moved by the element M) or ``"post"`` (after the
nonlinearity: moved by φ(M)). Linear/conv modules end one space (as readers) and start the next (as
writers); BatchNorm, activations, pooling, dropout, flatten and residual additions keep the space.
Anything not understood freezes the spaces it touches, with the reason — never transformed wrongly.
Each tensor also records whether its channels are on axis 1 or on its last axis (a token-wise Linear's
output); the rules for grouped convs, gates, concatenations and paddings live in ``_graph_vision.py``, those
for channel shuffles and chunks in ``_graph_shuffle.py``.

Two things the graph alone does not show are followed explicitly: an op that overwrites its input in
place (``h.relu_()``, ``nn.ReLU(inplace=True)``) makes later reads of that input read its result
(``alias``); and a parameter used at several places (a module called twice, tied weights) must take
one element at all of them (``uses``, resolved by :func:`._shared.share_parameters`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import fx, nn

from .._errors import InvalidOptionError
from ..groups import activation_call
from ..models import hooked, propagate_shapes, trace_kept_whole
from ._graph_ops import TensorOps, _tuple

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PASS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_AVG = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_ZERO_PAD = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d)
_MAX = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


def computed_weights(m: nn.Module) -> str:
    """Why ``m`` (or a module inside it) has a weight computed at each forward rather than held as a parameter:
    a ``torch.nn.utils.parametrize`` parametrization (``parametrizations.weight_norm`` is one), or a weight set as a
    plain tensor attribute that a forward pre-hook recomputes (the hook-based ``weight_norm``, ``spectral_norm``, pruning).
    "" when every weight is a parameter."""
    from torch.nn.utils import parametrize

    for sub_name, sub in m.named_modules():
        where = f"{sub_name}." if sub_name else ""
        if parametrize.is_parametrized(sub):
            names = ", ".join(f"{where}{k}" for k in sub.parametrizations.keys())
            return f"{names} is computed by a parametrization (torch.nn.utils.parametrize)"
        for attr, value in vars(sub).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and attr in ("weight", "bias"):
                return (f"{where}{attr} is computed before each forward by a pre-hook (the hook-based weight_norm or "
                        f"spectral_norm, or torch.nn.utils.prune: {attr}_orig and its mask)")
    return ""


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
    shared: list[str] = field(default_factory=list)  # weight sharing that made this one space
    couplers: list[tuple[str, int, int]] = field(default_factory=list)  # grouped convs inside: (name, groups, channels)
    concat: bool = False  # made by a concatenation along the channels (its embeds are the pieces)
    # Parameter ports (_graph_stream): ("writer" | "reader", Port, the node at that side)
    ports: list = field(default_factory=list)

    def absorb(self, other: "Space") -> None:
        for f in ("frozen", "writers", "readers", "norms", "activations", "constraints", "observed", "embeds", "shared",
                  "couplers", "ports"):
            getattr(self, f).extend(getattr(other, f))
        self.offsets_ok &= other.offsets_ok
        self.embedded |= other.embedded
        self.concat |= other.concat
        self.n = self.n or other.n
        self.label = self.label or other.label


@dataclass
class TensorInfo:
    space: int
    level: str  # "prebn" | "pre" | "post"
    block: int = 1  # features per channel after a flatten (channel-major blocks)
    coupled: bool = False  # passed a grouped conv since its space's last nonlinearity (see _graph_vision)
    last: bool = False  # the channel axis is the last one ([batch, …, features]: a token-wise Linear wrote it)
    # A second space on the last axis of a channels-first tensor: a Linear over its positions wrote it (MLP-Mixer's
    # token MLP acts on [batch, channels, tokens]); see Graph._position_linear.
    token: Optional[int] = None
    token_level: str = "pre"
    # Channels carried from other spaces by concatenation, channel shuffle or chunk: per channel (space id, its channel,
    # the tensor whose level moves it); split: (groups, transposed) after a view splitting the channels (_graph_shuffle)
    layout: Optional[tuple] = None
    split: Optional[tuple] = None


@dataclass
class Use:
    """A parameter tensor that a transform writes, at one module call: rows move with ``rows``'s element,
    columns (weights only) with ``cols``'s."""

    place: str  # "fc" or "fc#1" (the second call)
    param: str  # "fc.weight"
    tensor: torch.Tensor
    rows: int
    cols: Optional[int]
    node: Optional[fx.Node] = None  # the call
    input: Optional[fx.Node] = None  # what it reads (weights), or the BatchNorm's mode ("output"/"input")
    mode: Optional[str] = None  # BatchNorm tensors: "output" or "input"


class Graph(TensorOps):
    """The traced model with a space and level for every tensor node.

    Raises :class:`workbench.models.TraceFailure` when the model cannot be traced or run on ``example``.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, is_activation):
        from ._graph_stream import is_leaf
        from ._shared import share_parameters

        self.model = model
        self.modules = dict(model.named_modules())
        self.is_activation = is_activation  # callable(obj) -> bool
        # LayerNorms and attention modules stay whole (leaves): their rules are in _graph_stream
        # Sub-modules fx cannot trace into are kept whole, and opaque: their name -> why (models/_trace.py)
        self.gm, self.kept_whole = trace_kept_whole(model, lambda m: is_activation(m) or is_leaf(m), example=example)
        propagate_shapes(self.gm, model, example)
        self.parent: dict[int, int] = {}
        self.spaces: dict[int, Space] = {}
        self.info: dict[fx.Node, TensorInfo] = {}
        self.calls: dict[str, int] = {}
        self.alias: dict[fx.Node, fx.Node] = {}  # a node overwritten in place → the node holding its value now
        self.uses: list[Use] = []  # parameters a transform writes, per module call
        self.refs: list[tuple[str, torch.Tensor, list[int]]] = []  # other reads of parameters: (what, tensor, spaces)
        self.tuples: dict[fx.Node, Optional[TensorInfo]] = {}  # a module returning a tuple → its output 0 (attention)
        self.extra_sites: list = []  # sites that are no space of the graph (inside an attention leaf)
        self.consumed: set[int] = set()  # second spaces read by a Linear over positions (not frozen by it)
        # get_attr of a per-channel scale (layer scale) used in products, and views of it → (its name, the parameter)
        self.scales: dict[fx.Node, tuple[str, torch.Tensor]] = {}
        self.filters: dict[fx.Node, tuple[str, torch.Tensor]] = {}  # get_attr of a fixed depthwise filter (BlurPool)
        self.slopes: dict[fx.Node, tuple[str, torch.Tensor]] = {}  # get_attr of F.prelu's slopes (_graph_scales)
        self.chunks: dict[fx.Node, list] = {}  # chunk / split of the channels → the layout of each piece
        for node in self.gm.graph.nodes:
            self._visit(node)
        from ._graph_vision import unite_aligned_pieces

        unite_aligned_pieces(self)  # pieces two concatenations lay on the same channels of one space: one site
        share_parameters(self)

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
            if self.info[node].layout is not None:  # what it carries must not move either (_graph_shuffle.materialise)
                from ._graph_shuffle import materialise

                materialise(self, node)
            self.space(node).frozen.append(reason)

    # ------------------------------------------------------------------ helpers
    def shape(self, node: fx.Node) -> Optional[tuple]:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def _val(self, a: Any) -> Any:
        """The node that holds ``a``'s value now (``a`` itself unless an in-place op overwrote it)."""
        while isinstance(a, fx.Node) and a in self.alias:
            a = self.alias[a]
        return a

    def _overwrite(self, x: fx.Node, node: fx.Node) -> None:
        """``node`` overwrote ``x`` in place: later reads of ``x`` read ``node``'s value."""
        if node in self.info and x is not node:
            self.alias[x] = node

    def _out(self, node: fx.Node, like: fx.Node, level: Optional[str] = None, block: Optional[int] = None):
        src = self.info[like]
        self.info[node] = TensorInfo(src.space, level or src.level, src.block if block is None else block,
                                     src.coupled and level is None, src.last)

    def last(self, node: fx.Node) -> bool:
        """Whether ``node``'s channels are on its last axis and that is not axis 1 (rank ≥ 3)."""
        return self.info[node].last and len(self.shape(node) or ()) >= 3

    def channel_axis(self, node: fx.Node) -> int:
        return len(self.shape(node)) - 1 if self.last(node) else 1

    def _channels_first(self, node: fx.Node, x: fx.Node, what: str) -> bool:
        """False (and ``node`` made fresh) when ``x``'s channels are on its last axis: ``what`` acts on axes
        from 2 on, which would include them."""
        if not self.last(x):
            return True
        self._fresh(node, f"{what} acts on the axes after axis 1 of a tensor whose channels are on its last axis")
        return False

    def _tensor_args(self, node: fx.Node) -> list[fx.Node]:
        """Every tensor the node reads, nested ones too (``torch.cat([a, b])``), as their current values."""
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(self._val(a)) or a)
        return [a for a in found if a in self.info]

    def _fresh(self, node: fx.Node, reason: str) -> None:
        """An op we do not understand: freeze what it reads and what it makes."""
        for a in self._tensor_args(node):
            self.freeze(a, reason)
        if self.shape(node) is not None:
            sid = self.new_space(reason)
            self.spaces[sid].label = node.target if node.op == "call_module" else node.name
            self.info[node] = TensorInfo(sid, "pre")

    def tensor_info(self, *args, **kwargs) -> TensorInfo:
        """A :class:`TensorInfo` (for the rule modules, which do not import this one)."""
        return TensorInfo(*args, **kwargs)

    def record_use(self, *args, **kwargs) -> None:
        """A parameter a transform writes at one module call (see :class:`Use`)."""
        self.uses.append(Use(*args, **kwargs))

    def _observe(self, node: fx.Node, name: str) -> None:
        k = self.calls.get(name, 0)
        self.calls[name] = k + 1
        if node in self.info and self.info[node].token is None:  # a tensor moved by two sites is checked by the outputs
            self.space(node).observed.append((name, k, node))

    def _place(self, name: str) -> str:
        k = self.calls.get(name, 0)  # the index this call gets (observed right after its rule ran)
        return name + (f"#{k}" if k else "")

    def _refer(self, what: str, m: nn.Module, node: fx.Node) -> None:
        """Parameters of a module the transform does not write: if a written one is among them, the
        spaces it touches must not move (see _shared)."""
        sids = [self.info[a].space for a in self._tensor_args(node)] + ([self.info[node].space] if node in self.info else [])
        for pname, t in [*m.named_parameters(), *m.named_buffers()]:
            self.refs.append((f"{what} ({node.target}.{pname})", t, sids))

    # ------------------------------------------------------------------ the rules
    def _visit(self, node: fx.Node) -> None:
        from ._graph_shuffle import layout_aware, materialise

        carried = {self.info[a].token for a in self._tensor_args(node) if self.info[a].token is not None}
        posts = self._post_reads(node)
        if not layout_aware(self, node):  # a layout read by anything else is read as a host space
            for a in self._tensor_args(node):
                materialise(self, a)
        self._rule(node)
        self._offsets_follow(node, posts)
        # A second space (on the last axis) survives only the rules that carry it on or read it; any other op may
        # move or reduce that axis.
        kept = self.info[node].token if node in self.info else None
        for t in carried - {kept} - self.consumed:
            self.spaces[self.find(t)].frozen.append(
                f"{node.target if node.op == 'call_module' else node.name} moves or reduces the last axis of a tensor "
                f"whose channels are on axis 1, which a Linear over positions wrote (after MLP-Mixer's token MLP that "
                f"axis is the stream's positions, no site: docs/DERIVATIONS.md §2, Mixer)")

    def _rule(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            if self.shape(node) is not None:
                self.info[node] = TensorInfo(self.new_space("the model's input"), "pre")
        elif node.op == "get_attr":
            from ._graph_scales import fixed_filter, scale_parameter, slope_parameter
            from ._graph_stream import table_parameter

            from ._graph_reads import value_readers

            if not value_readers(node):  # read and never used (fx records attribute reads near a leaf call), or only
                return  # its metadata read (``self.weight.requires_grad``): no value flows
            from ._graph_batchnorm import batch_norm_parameter
            from ._graph_groupnorm import group_norm_parameter

            if table_parameter(self, node, _attr(self.model, node.target)) or \
                    scale_parameter(self, node, _attr(self.model, node.target)) or \
                    fixed_filter(self, node, _attr(self.model, node.target)) or \
                    slope_parameter(self, node, _attr(self.model, node.target)) or \
                    group_norm_parameter(self, node, _attr(self.model, node.target)) or batch_norm_parameter(self, node):
                return
            sid = self.new_space(f"parameter {node.target!r} used directly in forward")
            self.info[node] = TensorInfo(sid, "pre")
            value = _attr(self.model, node.target)
            if isinstance(value, torch.Tensor):
                self.refs.append((f"read directly in forward ({node.target})", value, [sid]))
        elif node.op == "output":
            for a in self._tensor_args(node):
                self.freeze(a, "the model's output")
        elif node.op == "call_module":
            m = self.modules[node.target]
            if not self._module(node, m):
                self._refer(f"used by {type(m).__name__} {node.target!r}, which the transform does not write", m, node)
            self._observe(node, node.target)
        elif node.op == "call_function":
            self._function(node, node.target)
        elif node.op == "call_method":
            self._method(node)

    def _module(self, node: fx.Node, m: nn.Module) -> bool:
        """Apply the module rules; True when the transform will write ``m``'s parameters."""
        name = node.target
        args = self._tensor_args(node)
        x = args[0] if args else None
        if x is None:
            self._fresh(node, f"{name} ({type(m).__name__}) reads no traced tensor")
            return False
        if name in self.kept_whole:  # before any rule: its class may be a Linear or a norm whose forward was rewritten
            self._fresh(node, f"{name} ({type(m).__name__}) is kept whole: torch.fx cannot trace into its forward "
                              f"({self.kept_whole[name]}), so what it reads and makes does not move")
            return False
        computed = computed_weights(m)  # (before the hooks: the hook-based weight_norm and pruning are pre-hooks)
        if computed:
            self._fresh(node, f"{name}: {computed}, not a parameter a transform can write (the next forward would "
                              f"recompute it from its own parameters)")
            return False
        if hooked(m):  # before the class rules: a leaf is read by its class, and fx does not trace a leaf's hooks
            self._fresh(node, f"{name} ({type(m).__name__}) has forward hooks, which may change what it computes, and "
                              f"the symmetry rules read a module by its class, so what it reads and makes does not move")
            return False
        xs = self.shape(x)
        from ._graph_stream import attention, is_attention, is_leaf, layer_norm
        from ._graph_swin import patch_merging

        if is_attention(m):
            return attention(self, node, m, x, name)
        if type(m).__name__ == "PatchMerging" and is_leaf(m):
            return patch_merging(self, node, m, x, name)
        from ._graph_grn import grn, is_grn

        if is_grn(m):
            return grn(self, node, m, x, name)
        if is_leaf(m) and not self.is_activation(m):
            return layer_norm(self, node, m, x, name)
        if isinstance(m, _CONV) and m.groups > 1 and not self.last(x):
            from ._graph_vision import grouped_conv

            return grouped_conv(self, node, m, x, name)
        if isinstance(m, nn.Linear) and len(xs or ()) >= 3 and not self.last(x) and not self.space(x).frozen:
            # (a frozen space's layout may be unknown — the model's input [batch, tokens, features] — and it cannot
            # move anyway: the Linear then writes its last axis as usual)
            return self._position_linear(node, m, x, name)
        if isinstance(m, nn.Linear) or (isinstance(m, _CONV) and m.groups == 1 and m.padding_mode == "zeros"):
            rank = len(xs or ())
            # A Linear acts on the last axis: a reader of x's space when x's channels are there (rank 2, or a
            # token-wise Linear's output); a conv reads axis 1.
            wrong = (rank < 2 if isinstance(m, nn.Linear) else False) or (
                rank >= 3 and self.last(x) != isinstance(m, nn.Linear))
            if wrong:
                where = "its last axis" if isinstance(m, nn.Linear) else "axis 1"
                self.freeze(x, f"{name} reads {where} of a rank-{rank} tensor whose channels are on another axis")
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
            # A Linear on [batch, …, features] writes its last axis (token-wise), a conv axis 1.
            self.info[node] = TensorInfo(sid, "pre", last=isinstance(m, nn.Linear) and rank >= 3)
            place = self._place(name)
            self.uses.append(Use(place, f"{name}.weight", m.weight, sid, self.info[x].space, node, x))
            if m.bias is not None:
                self.uses.append(Use(place, f"{name}.bias", m.bias, sid, None, node))
            return True
        if isinstance(m, nn.GroupNorm):
            from ._graph_groupnorm import group_norm_module

            return group_norm_module(self, node, m, x, name)
        if isinstance(m, _BN):
            from ._graph_batchnorm import batch_norm

            return batch_norm(self, node, m, x, name)
        if isinstance(m, _PASS):
            self._out(node, x)
            self._carry_token(node, x)
        elif isinstance(m, nn.PReLU) and m.num_parameters > 1:  # its slopes move with the channels (_graph_scales)
            from ._graph_scales import carried_slopes

            return carried_slopes(self, node, x, f"{name}.weight", m.weight, self._place(name), name)
        elif self.is_activation(m):
            self._activation(node, x, m, name)
            if getattr(m, "inplace", False):
                self._overwrite(x, node)
        elif isinstance(m, _ZERO_PAD):
            if not self._channels_first(node, x, f"{name} ({type(m).__name__})"):
                pass
            elif len(_tuple(m.padding)) != 2 * (len(xs or ()) - 2):  # (ZeroPad2d on a rank-3 tensor pads its channels)
                self._fresh(node, f"{name} ({type(m).__name__}) pads other axes than the spatial ones")
            else:  # zeros at the border of each channel: a map acting at each position sends them to zeros
                self.space(x).offsets_ok = False  # (a constant offset would become a border effect)
                self._out(node, x)
        elif isinstance(m, (*_AVG, *_MAX, nn.Flatten)) and not self._channels_first(node, x, f"{name} ({type(m).__name__})"):
            pass
        elif isinstance(m, _AVG):
            if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)) and any(p != 0 for p in _tuple(m.padding)):
                self.space(x).offsets_ok = False
            self._out(node, x)
        elif isinstance(m, _MAX):
            self._max_pool(node, x)
        elif isinstance(m, nn.Flatten):
            self._flatten(node, x, m.start_dim, m.end_dim)
        else:
            self._fresh(node, f"{name} ({type(m).__name__}) is not understood by the symmetry rules")
        return False

    def _activation(self, node: fx.Node, x: fx.Node, act: Any, name: Optional[str]) -> None:
        if self.info[x].level == "post" and self.info[x].coupled:
            # σ₁ → grouped conv → σ₂ in one space: the conv passes φ(M) on, so σ₂ sees φ(M) and must pass it:
            # the element must equal its φ(M) (mixed_levels), and then σ₂'s group restricts it too.
            self.space(x).constraints.append(("mixed_levels", node))
        elif self.info[x].level == "post":
            return self._fresh(node, f"two nonlinearities in a row at {name or node.name}")
        self.space(x).activations.append((act, name, node))
        self._out(node, x, level="post")
        if self.info[x].token is not None:  # elementwise: the second space passes it too, after its activation
            token = self.spaces[self.find(self.info[x].token)]
            if self.info[x].token_level == "post":
                token.frozen.append(f"two nonlinearities in a row at {name or node.name}")
            token.activations.append((act, name, node))
            self._carry_token(node, x, "post")

    def _carry_token(self, node: fx.Node, x: fx.Node, level: Optional[str] = None) -> None:
        if node in self.info and self.info[x].token is not None:
            self.info[node].token = self.info[x].token
            self.info[node].token_level = level or self.info[x].token_level

    def _position_linear(self, node: fx.Node, m: nn.Module, x: fx.Node, name: str) -> bool:
        """``nn.Linear`` on the last axis of a tensor whose channels are on axis 1 ([batch, channels, tokens]: MLP-
        Mixer's token MLP after its transpose). Per channel it maps positions: ``Y = X·Wᵀ + 1·bᵀ``, so a channel map
        M passes it when ``M·1 = 1`` (the bias adds one number to every channel; no constraint without a bias),
        and the output keeps x's channel space. The axis it writes is a second space of the output, with this
        Linear as its writer; a Linear over positions reading such an axis is its reader (DERIVATIONS §2, Mixer)."""
        from ._graph_stream import param_port  # noqa: F401  (ports: module-named, planned by _graph_push)
        from ._sites import Port

        info = self.info[x]
        sp = self.space(x)
        if m.bias is not None:
            sp.constraints.append(("constant_add", node))
            sp.offsets_ok = False
        if info.token is not None:  # reads the second space of x
            reader = self.spaces[self.find(info.token)]
            reader.ports.append(("reader", Port(name, info.token_level), x))
            self.consumed.add(info.token)
            if m.bias is None:
                reader.offsets_ok = False
        tsid = self.new_space()
        token = self.spaces[tsid]
        token.n = m.out_features
        token.ports.append(("writer", Port(name, "pre"), node))
        self.info[node] = TensorInfo(info.space, info.level, 1, False, False, token=tsid, token_level="pre")
        place = self._place(name)
        self.uses.append(Use(place, f"{name}.weight", m.weight, tsid, info.token, node, x))
        if m.bias is not None:
            self.uses.append(Use(place, f"{name}.bias", m.bias, tsid, None, node))
        return True

    def _call_activation(self, node: fx.Node, fn: Any, inplace: bool = False) -> None:
        """A catalogued function (or tensor method) called with its own arguments: the group is read
        from their values (``F.leaky_relu(x, 1.0)`` is the identity, ``F.hardtanh(x, 0, 1)`` is not odd)."""
        if node.op == "call_method":
            x, rest, kwargs = node.args[0], node.args[1:], dict(node.kwargs)
        else:
            x = node.args[0] if node.args else node.kwargs.get("input")
            rest, kwargs = node.args[1:], {k: v for k, v in node.kwargs.items() if k != "input"}
        x = self._val(x)
        label = f".{node.target}()" if node.op == "call_method" else getattr(fn, "__name__", str(fn))
        if not (isinstance(x, fx.Node) and x in self.info):
            return self._fresh(node, f"{label} applied to something that is not a traced tensor")
        computed: list[fx.Node] = []
        fx.node.map_arg((rest, kwargs), computed.append)
        if computed:
            return self._fresh(node, f"{label} with an argument computed from tensors ({computed[0].name}): its "
                                     f"group cannot be read from the code")
        try:
            act = activation_call(fn, rest, kwargs)
        except InvalidOptionError as exc:
            return self._fresh(node, str(exc))
        self._activation(node, x, act, None)
        if inplace or act.keywords.get("inplace"):
            self._overwrite(x, node)

    def _max_pool(self, node: fx.Node, x: fx.Node) -> None:
        self.space(x).constraints.append(("max_pool", x))
        self.space(x).offsets_ok = False
        self._out(node, x)

    def _flatten(self, node: fx.Node, x: fx.Node, start: int, end: int) -> None:
        xs = self.shape(x)
        if xs is not None and start == 1 and end in (-1, len(xs) - 1):
            self._out(node, x, block=self.info[x].block * math.prod(xs[2:]))
        else:
            self._fresh(node, f"flatten(start_dim={start}, end_dim={end}) mixes the channel axis")

def _attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj
