"""Graph rules for transformer streams in vision models (docs/DERIVATIONS.md §2): LayerNorm over the
channels, attention as one leaf, and parameters a ``forward`` uses directly (class token, position table).

Why here, in the graph backend, and not by presenting a ViT in the layout backend's canonical transformer
layout: the layout backend reads TransformerLens/Hugging Face configs, rebuilds models of those kinds and
compares log-probabilities at TransformerLens hook names; a torchvision or timm ViT has none of these, and
its patch embedding (a conv), class token and pooled heads do not fit that layout. The graph backend
already traces these models, maps their MLP sites and observes module outputs; what it lacked was four
rules, which live here:

- **LayerNorm** over the channel axis (``nn.LayerNorm`` and timm's ``LayerNorm`` on ``[…, C]``,
  ``LayerNorm2d`` on ``[B, C, H, W]``) is a leaf that *reads a stream and stays in it*: its output moves
  by the stream's element M when its gain γ follows the permutation part of M and its bias β follows M.
  With a gain that is not all ones this holds for permutations only; with gain 1 (folded, or no affine
  part) for every rotation fixing 1 (Lemma 1). The exact group is larger, s·R·(I + 1·aᵀ) (a global
  sign and a shear); the site's note says so. The shear moves the stream and the normalised stream
  by different maps (M and its isometric part), which a site of this backend (one element per
  observed tensor) does not express; the sign needs a family {±1}×S_n the registry does not have.
- **Attention** (``nn.MultiheadAttention`` with one packed ``in_proj_weight``; timm's ``Attention`` with
  a fused ``qkv``, no q/k norms and no gate) is a leaf: the packed projection reads the stream (columns),
  the output projection writes the next space (rows, bias). Inside, per head h: ``qk.h`` GL(d_head) (Q rows
  and bias by A, K rows and bias by A⁻ᵀ), ``ov.h`` GL(d_head) (V rows and bias by B, out-projection
  columns of head h by B⁻¹), and ``heads``, permutations of the heads (Q, K, V rows and out-projection
  columns of a head together). No hook sees inside the leaf: verify checks these through the outputs.
  Swin's (v1) window attention, torchvision's and timm's, is the same leaf, its relative position bias table
  moving with the heads (window partition, shifts and the bias act on positions only; timm's shifts and paddings
  are ops of its block, ``_graph_vision.roll`` and the channels-last padding there).
- **Parameter tables** (``get_attr`` of a floating ``nn.Parameter`` owned by a container, not by a layer):
  the class token ``[1, 1, C]`` and the position table ``[1, T, C]`` write the stream along their last
  axis (``E ↦ E·Mᵀ``); a per-channel scale (ConvNeXt's and timm's layer scale) takes the permutation part
  (its rules are in ``_graph_scales``).
- **Swin's patch merging** is a leaf reading a stage like a LayerNorm over 4C (its element tiled four times)
  and writing the next stage through ``reduction``'s rows (``_graph_swin``).

ConvNeXt needs nothing more (its depthwise convs are couplers, ``_graph_vision``); MLP-Mixer's token MLP
is a Linear over positions (``Graph._position_linear``).

Weights these rules move are *parameter ports*: a :class:`Port` named ``module.attribute`` (optionally
``[start:stop]``, a slice of the axis it moves), with ``axis`` the axis that moves. Several sites may move one
tensor (the packed projection's columns by the stream, its row blocks by the heads), composed in site order,
each a symmetry of the model as it then is: ``_port_moves.Moves`` composes them per axis first and writes the
result once into the new model (one gather and one batched product for a packed projection; the precision each
product runs in is argued there).
"""
from __future__ import annotations

import functools
import re
import weakref
from collections import OrderedDict
from typing import Optional

import torch
from torch import fx, nn

from .._errors import InvalidOptionError
from .._offload import served
from ..groups import Dense, Group, ScaledPermutation, get_group
from ._layout_gathers import HeadPermutation
from ._port_moves import _Tiled
from ._sites import Port

# What a LayerNorm reading a space allows (read by _graph_sites._build like _lattice.CONSTRAINTS).
CONSTRAINTS = {
    "layernorm": ({"perm"},
                  "a LayerNorm with its own gain reads this space: only permutations pass it with the gain and bias "
                  "following (γ ↦ P·γ, β ↦ P·β); wb.fold_layernorm(model) moves gains into readers that are linear "
                  "maps, after which this norm lets rotations fixing 1 pass"),
    "channel_scale": ({"perm", "pos_scale", "neg"},
                      "a per-channel parameter (layer scale) multiplies this space: it takes the permutation, so only "
                      "scaled permutations pass it"),
    "fixed_depthwise": ({"perm", "pos_scale", "neg"},
                        "a depthwise convolution by a fixed filter per channel (timm's BlurPool2d) reads this space: the "
                        "filters take the permutation, so only scaled permutations pass it"),
    "layernorm_folded": ({"perm", "rotation_ones"},
                         "LayerNorms with gain 1 read this space: rotations fixing 1 pass them (the bias moves with the "
                         "element; docs/DERIVATIONS.md Lemma 1)"),
}
LN_NOTE = ("a pre-LN residual stream; the exact group is larger (docs/DERIVATIONS.md §2): with gains folded into the readers s·R·(I + 1·aᵀ), "
           "R·1 = 1; with gains kept s·P·(I + 1·aᵀ). Not sampled: the shear I + 1·aᵀ (it moves the stream and the "
           "normalised stream by different maps, and a site here moves every tensor it holds by one element)")
CONVNEXT_NOTE = ("a ConvNeXt residual stream; the exact group is larger (docs/DERIVATIONS.md §4): s·P per stage, and each depthwise convolution's "
                 "output its own sign; not sampled: the depthwise outputs' own signs (one element acts on both sides "
                 "of a depthwise convolution here)")
MIXER_NOTE = ("a pre-LN residual stream; the exact group is larger (docs/DERIVATIONS.md §2, Mixer): s·P·(I + 1·aᵀ); the token MLP's activation "
              "acts on the channels too, so no rotation passes even with gains 1. Not sampled: the sign s and the shear")
SIMPLENORM_NOTE = ("a residual stream read by SimpleNorms (x/√(var(x) + ε)·w); the exact group is larger (docs/DERIVATIONS.md "
                   "§4, SimpleNorm): with gains 1 every M with Mᵀ·C·M = C, s·R·(I + 1·aᵀ), the norm's output moving by M "
                   "itself; with gains kept s·P·(I + 1·aᵀ). Not sampled: the shear I + 1·aᵀ (no family here has it)")
SWIN_NOTE = ("a pre-LN residual stream read by Swin's patch merging; the exact group (docs/DERIVATIONS.md §2, Swin) "
             "is s·R, R·1 = 1 with gains folded (s·P with gains kept), without the shear: all of it is sampled")
# timm's SimpleNorm (``x·rsqrt(var(x) + ε)·w``: the variance centred, x not; no bias) passes what a LayerNorm passes and
# more (docs/DERIVATIONS.md §4, SimpleNorm): read by the same rule, with its own note (SIMPLENORM_NOTE).
_SIMPLE = {"timm.layers.norm.SimpleNorm", "timm.layers.norm.SimpleNorm2d"}
_LN_LAST = {"torch.nn.modules.normalization.LayerNorm", "timm.layers.norm.LayerNorm", "timm.layers.norm.SimpleNorm"}
_LN_FIRST = {"torchvision.models.convnext.LayerNorm2d", "timm.layers.norm.LayerNorm2d", "timm.layers.norm.SimpleNorm2d"}
# Hugging Face's ConvNeXt LayerNorms (transformers/models/convnext*/modeling_convnext*.py): an nn.LayerNorm whose
# forward, for ``data_format == "channels_first"``, is ``permute(0, 2, 3, 1)``, nn.LayerNorm's forward, ``permute(0, 3, 1,
# 2)`` — a LayerNorm over axis 1 — and nn.LayerNorm's own otherwise: read by its data_format (checked when read).
_LN_BY_FORMAT = {"transformers.models.convnext.modeling_convnext.ConvNextLayerNorm",
                 "transformers.models.convnextv2.modeling_convnextv2.ConvNextV2LayerNorm"}


def _qualname(m) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def is_simple_norm(m) -> bool:
    """Whether ``m`` is timm's SimpleNorm or SimpleNorm2d (no centring of x, no bias)."""
    return _qualname(m) in _SIMPLE


def norm_axis(m: nn.Module) -> Optional[str]:
    """``"last"`` for a LayerNorm over its input's last axis, ``"first"`` for one over axis 1 of ``[B, C, H, W]``
    (``LayerNorm2d``), None for any other module (or a LayerNorm class whose forward is not known)."""
    q = _qualname(m)
    if q in _LN_BY_FORMAT:
        return {"channels_last": "last", "channels_first": "first"}.get(getattr(m, "data_format", None))
    return "last" if q in _LN_LAST else "first" if q in _LN_FIRST else None


_SWIN = "torchvision.models.swin_transformer."
_SWIN_TIMM = "timm.models.swin_transformer."  # timm's Swin v1 (its v2, cosine attention and post-norm, is another module)
_PATCH_MERGING = {_SWIN + "PatchMerging", _SWIN_TIMM + "PatchMerging"}


def is_leaf(m: nn.Module) -> bool:
    """Modules the trace keeps whole: LayerNorms whose forward is known, attention we understand, Swin's patch
    merging, ConvNeXt V2's GRN (``_graph_grn``)."""
    from ._graph_grn import is_grn

    q = _qualname(m)
    return norm_axis(m) is not None or q in _PATCH_MERGING or is_attention(m) or is_grn(m)


# ---------------------------------------------------------------------- parameter ports
def param_port(path: str, level: str, axis: int, start: Optional[int] = None, stop: Optional[int] = None,
               block: int = 1) -> Port:
    """A Port moving parameter ``path`` (``module.attr``) along ``axis``, optionally only ``[start:stop]``."""
    return Port(path + (f"[{start}:{stop}]" if start is not None else ""), level, block, axis=axis)


@functools.lru_cache(maxsize=1 << 14)  # a transform splits every port of every site: 1180 on ViT-B/16
def split_port(name: str) -> tuple[str, str, Optional[tuple[int, int]]]:
    """``("module", "attr", (start, stop) or None)`` of a parameter port's name."""
    m = re.fullmatch(r"(.*?)(?:\[(\d+):(\d+)\])?", name)
    path, a, b = m.group(1), m.group(2), m.group(3)
    module, _, attr = path.rpartition(".")
    return module, attr, (int(a), int(b)) if a is not None else None


def plan_ports(modules: dict, site, element, moves_for, forced: bool) -> None:
    """Record, in ``moves_for(module, attr)`` (a ``_port_moves.Moves``, composed per tensor in site order), what
    ``element`` at ``site`` does to every parameter port of the site. Writers move by the element (``"pre"``),
    φ of it (``"post"``), its permutation part (``"perm"``: LayerNorm gains), or permute units of ``block``
    (``"heads"``); readers by the inverse transpose of the element (or of φ of it)."""
    ports = _site_ports(site, modules)
    if not ports:
        return
    perm = element.perm_part()
    duals: dict = {}  # F⁻ᵀ per level, inverted once per site (a head's weight and bias share it)
    heads: dict = {}  # block → the head permutation, one per site (its index is computed per move it makes)
    for role, level, block, axis, module, attr, sl in ports:
        if level == "heads":
            if perm is None:
                continue  # a forced dense element at a permutation site: only its permutation part moves
            F = heads.get(block)
            if F is None:
                F = heads[block] = HeadPermutation(perm, block)
        elif level == "perm":
            F = perm
            if F is None:  # a dense element: the gain must be 1 already (the group says so), else refuse
                gain = getattr(modules[module], attr)
                if not forced and not bool((gain == 1).all()):
                    raise InvalidOptionError(f"site {site.name!r}: a dense element cannot pass {module!r}, whose gain "
                                             f"is not all ones; only permutations can.")
                continue
        else:
            F = element.phi() if level == "post" else element
            if role == "reader":
                F = duals[level] if level in duals else duals.setdefault(level, F.inverse_transpose())
        if block > 1 and level != "heads":
            F = _Tiled(F, block)
        moves_for(module, attr).add(F, axis, sl)


# A site's parameter ports as plain tuples ``(role, level, block, axis, module, attr, slice)``, in the order
# plan_ports visits them, by site: what they are depends only on the map (which the structure of the model
# decides, _map._structure_key), never on an element or a weight, and every transform with that map replays
# them (a Swin-T transform visits ~1200 ports: parsing each name and testing it against the modules was a
# tenth of its port planning). Keyed by the site object, which the map memo keeps alive and shares between
# the models of one structure, held weakly (an entry leaves with its site's map); the entry keeps the site's
# port lists and their lengths, so a list replaced or edited in place (a site is a plain dataclass) is seen.
_PORTS: "OrderedDict[int, tuple]" = OrderedDict()
_PORTS_SIZE = 8192


def _site_ports(site, modules: dict) -> tuple:
    key = id(site)
    hit = _PORTS.get(key)
    writers, readers = site.writers, site.readers
    if hit is not None and hit[0]() is site and hit[1] is writers and hit[2] is readers \
            and hit[3] == (len(writers), len(readers)):
        return hit[4]
    ports = []
    for role, group in (("writer", writers), ("reader", readers)):
        for p in group:
            if p.name in modules:  # a module port: _graph_push plans it
                continue
            module, attr, sl = split_port(p.name)
            ports.append((role, p.level, p.block, p.axis, module, attr, sl))
    ports = tuple(ports)
    # (the callback runs when the site dies, before its id can be reused; an entry replaced since is not its own)
    _PORTS[key] = (weakref.ref(site, lambda ref, key=key: _PORTS.pop(key, None) if _PORTS.get(key, (None,))[0] is ref
                               else None), writers, readers, (len(writers), len(readers)), ports)
    while len(_PORTS) > _PORTS_SIZE:
        _PORTS.popitem(last=False)
    return ports


def table_parameter(graph, node: fx.Node, value) -> bool:
    """``get_attr`` of a parameter: a table writing a space along its last axis (class token, position
    table) when it is a floating ``nn.Parameter`` whose owner is a container, not a layer (a layer's weight
    read directly keeps the old rule: the spaces it touches freeze)."""
    if not (isinstance(value, nn.Parameter) and value.is_floating_point() and value.ndim >= 2 and value.shape[-1] > 1
            and all(d == 1 for d in value.shape[:-2]) and _owned_by_container(graph, node)):
        return False  # a table is [1, C] / [1, 1, C] / [1, T, C]: rows of channel vectors
    sid = graph.new_space()
    sp = graph.spaces[sid]
    sp.n = value.shape[-1]
    sp.ports.append(("writer", param_port(node.target, "pre", value.ndim - 1), node))
    sp.label = node.target
    graph.info[node] = graph.tensor_info(sid, "pre", last=True)
    graph.record_use(node.target, node.target, value, sid, None, node)
    return True


# Constraints that pass a global sign: a LayerNorm's bias takes it (its gain the permutation part), a depthwise
# conv's kernel cancels it, a layer scale takes the permutation part. A constant added to every channel, an
# activation, max pooling do not (the sign would have to be undone somewhere nothing can).
SIGN_PASSES = {"layernorm", "layernorm_folded", "coupler", "channel_scale", "fixed_depthwise", "grn"}


class WithSign(Group):
    """``s·G``: an element of ``base`` (permutations, or rotations fixing 1) times a global sign s = ±1 — a
    LayerNorm stream's group up to the shear (docs/DERIVATIONS.md Lemma 1: −I passes a LayerNorm, its bias
    taking the sign; ConvNeXt §4: the depthwise kernels cancel it). The registry has no such family; this one
    lives here, like ``_channel_families.GroupedPermutations``."""

    def __init__(self, base: Group):
        super().__init__(base.n, phi=base.phi, source=getattr(base, "source", "family"))
        self.base, self.continuous = base, base.continuous
        self.name = f"{base.name}_with_sign"
        self.label = ("s·P, s = ±1" if base.name == "permutation" else "s·R, R ∈ O(n), R·1 = 1, s = ±1")
        from ._lattice import generators

        self.generator_kinds = generators(base) | {"global_sign"}

    def sample(self, generator=None, *, seed=None):
        g = generator if generator is not None else torch.Generator().manual_seed(0 if seed is None else int(seed))
        e = self.base.sample(g)
        sign = -1.0 if bool(torch.randint(0, 2, (1,), generator=g)) else 1.0
        if isinstance(e, ScaledPermutation):
            scale = None if sign > 0 else torch.full((self.n,), sign, dtype=torch.float64)
            return ScaledPermutation(e.perm, scale, self.phi, self.name)
        return Dense(sign * e.M, self.phi, self.name, e.orthogonal)

    def _contains(self, M, atol):
        return self.base._contains(M, atol) or self.base._contains(-M, atol)

    def _contains_monomial(self, perm, scale, atol):
        found = [self.base._contains_monomial(perm, s, atol) for s in (scale, -scale)]
        return None if None in found else any(found)


def with_sign(group: Group, space) -> Group:
    """``group`` times a global sign when every constraint on a LayerNorm stream passes one."""
    kinds = {k for k, _ in space.constraints}
    if group.name in ("permutation", "orthogonal_ones") and kinds & {"layernorm", "layernorm_folded"} \
            and kinds <= SIGN_PASSES and not space.activations and not space.embeds and not space.embedded:
        return WithSign(group)
    return group


def _owned_by_container(graph, node: fx.Node) -> bool:
    owner = graph.modules.get(node.target.rpartition(".")[0])
    return owner is not None and not any(isinstance(owner, t) for t in (
        nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LayerNorm, nn.MultiheadAttention, nn.BatchNorm1d, nn.BatchNorm2d))


# ---------------------------------------------------------------------- LayerNorm
def layer_norm(graph, node: fx.Node, m: nn.Module, x: fx.Node, name: str) -> bool:
    """A LayerNorm leaf reading ``x``: same space and level; γ by the permutation part, β by the element."""
    first = norm_axis(m) == "first"
    xs = graph.shape(x) or ()
    shape = tuple(m.normalized_shape)
    on_channels = (graph.last(x) or len(xs) == 2) if not first else (not graph.last(x) and len(xs) >= 2)
    if len(shape) != 1 or not on_channels or xs[graph.channel_axis(x)] != shape[0] or graph.info[x].block != 1:
        graph._fresh(node, f"{name} (LayerNorm over {shape}) does not normalise exactly the channel axis of its input "
                           f"(shape {tuple(xs)})")
        return False
    sp = graph.space(x)
    gain = served(m, "weight") if m.elementwise_affine else None
    folded = gain is None or bool((gain == 1).all())
    sp.constraints.append(("layernorm_folded" if folded else "layernorm", node))
    sp.offsets_ok = False
    sp.n = sp.n or shape[0]
    level = graph.info[x].level
    graph._out(node, x)
    place = graph._place(name)
    for attr, lvl in (("weight", "perm"), ("bias", "post" if level == "post" else "pre")):
        t = getattr(m, attr, None)
        if t is not None:
            sp.ports.append(("writer", param_port(f"{name}.{attr}", lvl, 0), x))
            graph.record_use(place, f"{name}.{attr}", t, graph.info[x].space, None, node, x, mode="layernorm")
    return True


# ---------------------------------------------------------------------- attention
# timm's plain attention (timm.layers since timm 1.0; vision_transformer before): the form _timm_attention reads.
_TIMM_ATTENTION = frozenset({"timm.layers.attention.Attention", "timm.models.vision_transformer.Attention"})


def _timm_attention(m: nn.Module) -> Optional[dict]:
    """timm's ``Attention`` in the form understood: fused qkv Linear, identity q/k/out norms, no gate."""
    if not _qualname(m).startswith("timm.") or type(m).__name__ != "Attention":
        return None
    qkv, proj = getattr(m, "qkv", None), getattr(m, "proj", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)):
        return None
    H, dh = getattr(m, "num_heads", None), getattr(m, "head_dim", None)
    if not isinstance(H, int) or not isinstance(dh, int) or qkv.out_features != 3 * H * dh or proj.in_features != H * dh:
        return None
    return {"in_w": "qkv.weight", "in_b": "qkv.bias" if qkv.bias is not None else None, "out": proj,
            "out_w": "proj.weight", "out_b": "proj.bias" if proj.bias is not None else None, "H": H, "dh": dh,
            "d": qkv.in_features, "tensors": [qkv.weight, qkv.bias, proj.weight, proj.bias]}


def _swin_attention(m: nn.Module) -> Optional[dict]:
    """Swin (v1) window attention, torchvision's ``ShiftedWindowAttention`` or timm's ``WindowAttention``: fused qkv
    and proj Linears, a relative position bias per head (a table ``[(2·Wh − 1)·(2·Ww − 1), heads]``); timm's takes the
    shifted windows' mask as an argument, broadcast over the heads in its forward (v2's cosine attention normalises q
    and k per head: not derived, left to the trace, which freezes it)."""
    if _qualname(m) not in (_SWIN + "ShiftedWindowAttention", _SWIN_TIMM + "WindowAttention"):
        return None
    qkv, proj, H = m.qkv, m.proj, m.num_heads
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and qkv.out_features % (3 * H) == 0):
        return None
    dh = qkv.out_features // (3 * H)  # (timm's head_dim may make H·d_head differ from the stream's width)
    table = m._parameters.get("relative_position_bias_table")  # (not getattr: fx's trace answers a parameter read
    # that way with a proxy)
    if proj.in_features != H * dh or not isinstance(table, nn.Parameter) or table.ndim != 2 or table.shape[1] != H:
        return None
    return {"in_w": "qkv.weight", "in_b": "qkv.bias" if qkv.bias is not None else None, "out": proj,
            "out_w": "proj.weight", "out_b": "proj.bias" if proj.bias is not None else None, "H": H, "dh": dh,
            "d": qkv.in_features, "table": "relative_position_bias_table",
            "tensors": [qkv.weight, qkv.bias, proj.weight, proj.bias]}


def _swin_mask_why(m: nn.Module, node: fx.Node, graph) -> Optional[str]:
    """Why a Swin window attention's call is not understood, or None: torchvision's takes its input alone; timm's its
    input and the shifted windows' mask, None or one of the model's buffers (a constant over positions that its
    forward broadcasts over the heads: every head sees it alike, so a head permutation passes it). A mask computed
    in the forward (timm's ``dynamic_mask``) is refused: what it depends on is not checked here."""
    if _qualname(m).startswith(_SWIN):
        return None if len(node.args) == 1 and not node.kwargs else "called with arguments beyond its input"
    extra = list(node.args[1:]) + [v for k, v in node.kwargs.items()]
    if len(node.args) > 2 or set(node.kwargs) - {"mask"} or len(extra) > 1:
        return "called with arguments beyond its input and mask"
    mask = extra[0] if extra else None
    if mask is None:
        return None
    if isinstance(mask, fx.Node) and mask.op == "get_attr" and _is_buffer(graph.model, mask.target):
        return None
    return "called with a mask that is not None or a buffer of the model (computed in the forward)"


def _is_buffer(model: nn.Module, target: str) -> bool:
    try:
        model.get_buffer(target)
    except AttributeError:
        return False
    return True


def _mha(m: nn.Module) -> Optional[dict]:
    if not isinstance(m, nn.MultiheadAttention):
        return None
    return {"in_w": "in_proj_weight", "in_b": "in_proj_bias" if m.in_proj_bias is not None else None,
            "out": m.out_proj, "out_w": "out_proj.weight", "out_b": "out_proj.bias" if m.out_proj.bias is not None else None,
            "H": m.num_heads, "dh": m.head_dim, "d": m.embed_dim,
            "tensors": [m.in_proj_weight, m.in_proj_bias, m.out_proj.weight, m.out_proj.bias]}


def _refuse_why(m: nn.Module, node: fx.Node, graph) -> Optional[str]:
    """Why an attention leaf is not understood, or None."""
    if isinstance(m, nn.MultiheadAttention):
        if not m._qkv_same_embed_dim or m.in_proj_weight is None:
            return "separate q/k/v projection weights (kdim/vdim differ) are not understood"
        if m.bias_k is not None or m.bias_v is not None or m.add_zero_attn:
            return "add_bias_kv / add_zero_attn are not understood"
        args = [graph._val(a) for a in node.args[:3]]
        if len(args) < 3 or not (args[0] is args[1] is args[2]):
            return "not self-attention (query, key and value are different tensors)"
        extra = {k: v for k, v in node.kwargs.items() if v is not None and k not in ("need_weights", "average_attn_weights")}
        if len(node.args) > 3 or extra:
            return f"called with arguments beyond query, key, value ({sorted(extra) or 'positional'})"
        return None
    if _swin_attention(m) is not None:
        return _swin_mask_why(m, node, graph)
    info = _timm_attention(m)
    if info is None:
        return "not understood"
    if _qualname(m) not in _TIMM_ATTENTION:
        # timm names several attention classes "Attention"; the one derived here computes softmax(q·kᵀ)·v from the
        # fused projection alone. SAM's (vision_transformer_sam) adds a bias computed from the queries and its own
        # relative position tables (rel_pos_h, rel_pos_w), or rotates q and k (rope): a head's GL on queries and keys
        # changed its function (random_intertwiner, float64: 9.8 relative).
        own = [k for k, v in list(m._parameters.items()) + list(m._buffers.items()) if v is not None]
        return (f"{_qualname(m)} is not the attention derived here ({' or '.join(sorted(_TIMM_ATTENTION))})"
                + (f": its own tensors {own} enter its scores" if own else ""))
    for part in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(m, part, nn.Identity()), nn.Identity):
            return f"its {part} ({type(getattr(m, part)).__name__}) is not derived here"
    if getattr(m, "gate", None) is not None:
        return "a gated attention output is not understood"
    if len(node.args) > 1 or any(v not in (None, False) and not isinstance(v, fx.Node) for v in node.kwargs.values()):
        return "called with a mask or other arguments"
    for a in list(node.args[1:]) + list(node.kwargs.values()):  # attn_mask / is_causal placeholders
        if isinstance(a, fx.Node) and (a.op != "placeholder" or a.meta.get("tensor_meta") is not None):
            return "called with a mask"
    return None


def is_attention(m: nn.Module) -> bool:
    return isinstance(m, nn.MultiheadAttention) or _timm_attention(m) is not None or _swin_attention(m) is not None


def attention(graph, node: fx.Node, m: nn.Module, x: fx.Node, name: str) -> bool:
    """An attention leaf reading ``x`` (channels on the last axis); True when the transform writes it."""
    why = _refuse_why(m, node, graph)
    if why is None and graph.calls.get(name, 0):
        why = "the module is called more than once (its heads would take one element per call)"
    if why is None and (not (graph.last(x) or len(graph.shape(x) or ()) == 2) or graph.info[x].block != 1):
        why = "its input's channels are not on the last axis"
    info = _mha(m) or _timm_attention(m) or _swin_attention(m)
    if why is not None:
        graph._fresh(node, f"{name} ({type(m).__name__}): {why}")
        if isinstance(m, nn.MultiheadAttention):
            graph.tuples[node] = None
        return False
    H, dh, d = info["H"], info["dh"], info["d"]
    D = H * dh
    p = lambda attr: f"{name}.{attr}"  # noqa: E731
    sp = graph.space(x)
    sp.ports.append(("reader", param_port(p(info["in_w"]), graph.info[x].level, 1), x))
    out = graph.new_space()
    osp = graph.spaces[out]
    osp.n = info["out"].out_features
    osp.ports.append(("writer", param_port(p(info["out_w"]), "pre", 0), node))
    if info["out_b"]:
        osp.ports.append(("writer", param_port(p(info["out_b"]), "pre", 0), node))
    osp.label = name
    result = graph.tensor_info(out, "pre", last=True)
    if isinstance(m, nn.MultiheadAttention):
        graph.tuples[node] = result  # returns (output, weights): getitem 0 is the output
    else:
        graph.info[node] = result
    place = graph._place(name)
    graph.record_use(place, p(info["in_w"]), info["tensors"][0], graph.info[x].space, graph.info[x].space, node, x,
                     mode="attention")
    graph.record_use(place, p(info["out_w"]), info["tensors"][2], out, None, node, x, mode="attention")
    # The heads: rows of the packed projection are [q; k; v], each H contiguous blocks of d_head rows.
    ins = [(p(info["in_w"]), 0)] + ([(p(info["in_b"]), 0)] if info["in_b"] else [])
    for h in range(H):
        q, k, v = (slice_ * D + h * dh for slice_ in range(3))
        graph.extra_sites.append((f"{name}.qk.{h}", dh, "gl", "attention scores", name,
                                  [param_port(t, "pre", a, q, q + dh) for t, a in ins],
                                  [param_port(t, "pre", a, k, k + dh) for t, a in ins],
                                  [f"head {h}: queries by A, keys by A⁻ᵀ (q·k unchanged)"]))
        graph.extra_sites.append((f"{name}.ov.{h}", dh, "gl", "linear (value → output)", name,
                                  [param_port(t, "pre", a, v, v + dh) for t, a in ins],
                                  [param_port(p(info["out_w"]), "pre", 1, h * dh, (h + 1) * dh)],
                                  [f"head {h}: values by B, the output projection's columns by B⁻¹ (the softmax "
                                   f"weights sum to 1, so the value bias passes)"]))
    graph.extra_sites.append((f"{name}.heads", H, "permutation", "attention heads", name,
                              [param_port(t, "heads", a, s * D, (s + 1) * D, block=dh) for t, a in ins for s in range(3)]
                              + [param_port(p(info["out_w"]), "heads", 1, 0, D, block=dh)]
                              + ([param_port(p(info["table"]), "heads", 1)] if info.get("table") else []), [],
                              ["a permutation of whole heads: their query, key and value rows and output columns"]))
    return True


def extra_site(entry):
    """A Site from an ``extra_sites`` entry (attention internals: no hook sees inside the leaf)."""
    from ._sites import Site

    name, n, family, label, module, writers, readers, notes = entry
    return Site(name, n, get_group(family, n), label, module, writers, readers, [], [], list(notes))
