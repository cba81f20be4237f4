"""ConvNeXt V2's Global Response Normalization in the graph backend (docs/DERIVATIONS.md §4, GRN).

``GRN(x)_c = γ_c·x_c·N_c + β_c + x_c`` with ``G_c = ‖x_c‖₂`` over the spatial positions (per example) and
``N_c = G_c / (mean_c' G_c' + ε)``: Hugging Face's ``ConvNextV2GRN`` (channels last, γ and β ``[1, 1, 1, C]``, ε = 1e-6
in its code) and timm's ``GlobalResponseNorm`` (``channels_last`` picks ``[B, H, W, C]`` or ``[B, C, H, W]``; γ and β
``[C]``; ``x + addcmul(β, γ, x·N)``, the same function). A signed permutation ``F = S·P`` of x passes it with
``γ ↦ P·γ`` and ``β ↦ F·β``: G and N are permuted (‖±x_c‖ = ‖x_c‖, the mean over channels is kept), so
``GRN_{P·γ, F·β}(F·x) = F·GRN_{γ, β}(x)``. Nothing larger passes for γ ≠ 0: a per-channel scaling D scales ``G_c`` by
``|d_c|`` and the mean by something else, so ``N`` changes with x (unless D is constant); a common positive s turns
``N_c`` into ``s·G_c/(s·mean G + ε)``, ≠ N_c for ε > 0; a map mixing channels changes the per-channel norms. The GRN
is a leaf that reads a space and stays in it (like a LayerNorm, ``_graph_stream.layer_norm``): its output moves by
the element that moves its input, γ a parameter port moved by the permutation part, β one moved by that element.
"""
from __future__ import annotations

from typing import Optional

from torch import fx, nn

from ._sites import Port

CONSTRAINTS = {
    "grn": ({"perm", "neg"},
            "a Global Response Normalization (ConvNeXt V2's GRN) reads this space: each channel's norm over the positions "
            "is divided by their mean over the channels, so only signed permutations pass it, γ permuted and β moved "
            "with the element (a scaling changes the norms' ratios, a common scalar fails through ε; docs/DERIVATIONS.md "
            "§4, GRN)"),
}
_HF = "transformers.models.convnextv2.modeling_convnextv2.ConvNextV2GRN"
_TIMM = "timm.layers.grn.GlobalResponseNorm"


def _qualname(m) -> str:
    # (_graph_stream's own, not imported: _graph_stream.is_leaf imports this module, and tests/test_layers.py
    # refuses an import circle)
    return f"{type(m).__module__}.{type(m).__qualname__}"


def grn_axis(m: nn.Module) -> Optional[str]:
    """``"last"`` for a GRN over ``[B, H, W, C]``, ``"first"`` for one over ``[B, C, H, W]``, None for any other module
    (or a GRN whose axes are not one of those two layouts)."""
    q = _qualname(m)
    if q == _HF:
        return "last"
    if q == _TIMM:
        spatial, channel = tuple(getattr(m, "spatial_dim", ())), getattr(m, "channel_dim", None)
        return {((1, 2), -1): "last", ((2, 3), 1): "first"}.get((spatial, channel))
    return None


def is_grn(m: nn.Module) -> bool:
    return _qualname(m) in (_HF, _TIMM)


def grn(graph, node: fx.Node, m: nn.Module, x: fx.Node, name: str) -> bool:
    """The GRN leaf reading ``x``: same space and level; γ by the permutation part, β by the element (module docstring)."""
    axis, xs = grn_axis(m), graph.shape(x) or ()
    n = xs[graph.channel_axis(x)] if len(xs) == 4 else None
    params = [getattr(m, a, None) for a in ("weight", "bias")]
    shaped = all(isinstance(p, nn.Parameter) and p.numel() == n and p.shape[-1] == n for p in params)
    if axis is None or len(xs) != 4 or graph.last(x) != (axis == "last") or graph.info[x].block != 1 \
            or graph.info[x].token is not None or not shaped or len(node.args) != 1 or node.kwargs:
        graph._fresh(node, f"{name} ({type(m).__name__}) does not normalise exactly the channels of its input over its "
                           f"spatial axes (shape {tuple(xs)}, channels {'last' if graph.last(x) else 'on axis 1'})")
        return False
    sp = graph.space(x)
    sp.constraints.append(("grn", node))
    sp.offsets_ok = False  # a constant offset changes the norms
    sp.n = sp.n or n
    level = graph.info[x].level
    graph._out(node, x)
    place = graph._place(name)
    for attr, lvl in (("weight", "perm"), ("bias", "post" if level == "post" else "pre")):
        t = getattr(m, attr)
        sp.ports.append(("writer", Port(f"{name}.{attr}", lvl, 1, axis=t.ndim - 1), x))  # (a parameter port)
        graph.record_use(place, f"{name}.{attr}", t, graph.info[x].space, None, node, x, mode="grn")
    return True
