"""``wb.fold_layernorm`` for plain modules (the graph backend): torchvision's and timm's vision transformers,
ConvNeXt, and any traced model whose LayerNorms are read by linear maps.

Folding moves a LayerNorm's gain γ and bias β into the linear maps reading its output, ``W ↦ W·diag(γ)``,
``b ↦ b + W·β``, then γ = 1, β = 0: the function is unchanged because those readers see ``γ ⊙ n + β`` only
through ``W·(·) + b`` (docs/DERIVATIONS.md §2). Which maps read a norm is read from the same torch.fx trace
the graph backend uses (``Graph``'s tracer, with LayerNorms and attention as leaves), run once on an example
for the shapes. A norm is folded only when *every* path from its output ends in a reader that can absorb it:

- an ``nn.Linear`` reading the channels on its input's last axis, possibly after ops that commute with a
  per-channel affine map of that axis: a token selection (``x[:, 0]``, ``x[:, 1:]``), a mean over other axes
  (token pooling), dropout or identity (exact in eval mode, as every symmetry here), a flatten that keeps
  the channel axis whole (``[B, C, 1, 1] → [B, C]``), ``.contiguous()``;
- ``nn.MultiheadAttention`` called with query = key = value = that tensor and a packed ``in_proj_weight``
  (the packed projection's columns and ``in_proj_bias``), and timm's ``Attention`` (its fused ``qkv``).

Any other reader (a convolution, a residual addition of the norm's output, Mixer's Linear over positions,
the model's output, anything not listed) leaves the norm as it is, with the reason (:func:`fold_plan`).
So does a norm or a reader called more than once or sharing a parameter (one tensor would have to take two
folds). A reader without a bias cannot absorb β: then only γ is folded and ``β/γ`` stays on the norm
(as the layout backend does for GPT-2's final norm); a zero gain there leaves the norm unfolded.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx, nn

from .._errors import InvalidOptionError
from .._offload import built_alike, offloaded_tensor
from ..models import TraceFailure, describe, is_traced_hf, propagate_shapes, trace
from ._graph import _PASS
from ._graph_reads import reads_only_shape
from ._graph_sites import default_examples, is_activation
from ._graph_stream import _mha, _refuse_why, _timm_attention, is_leaf, norm_axis


@dataclass(frozen=True)
class Reader:
    """A linear map reading a norm's output: its weight's columns take γ, its bias (None: none) takes ``W·β``."""

    module: str  # the module called in the trace ("encoder.layers.0.mlp.0", "blocks.0.attn")
    weight: str  # parameter path from the root ("blocks.0.attn.qkv.weight")
    bias: Optional[str]


@dataclass
class FoldPlan:
    """What :func:`fold_plan` found: ``folds`` maps each foldable norm to its readers; ``left`` each other norm
    with an affine part to why it stays."""

    folds: dict[str, list[Reader]] = field(default_factory=dict)
    left: dict[str, str] = field(default_factory=dict)


class _NoAlias:
    """What ``_graph_stream._refuse_why`` asks of a graph: the node holding a value (no in-place aliasing here:
    an in-place op on a norm's output is a reader this module does not know, so the norm stays)."""

    @staticmethod
    def _val(a):
        return a


def _affine_norms(model: nn.Module) -> dict[str, nn.LayerNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.LayerNorm) and m.elementwise_affine
            and m.weight is not None}


def fold_plan(model: nn.Module, example: Optional[torch.Tensor] = None) -> FoldPlan:
    """Which LayerNorms of a plain module fold into which readers, and why the others do not.

    ``example``: an input batch to run the trace on (guessed from the first layer when None, as
    ``symmetry_map`` does). Raises :class:`~workbench.InvalidOptionError` when the model has affine
    LayerNorms but cannot be traced or run."""
    if example is not None and not (isinstance(example, torch.Tensor) and example.ndim >= 1 and len(example) >= 1):
        raise InvalidOptionError(f"fold_layernorm: example must be an input batch (a tensor with at least one example); "
                                 f"got {type(example).__name__}.")
    norms = _affine_norms(model)
    plan = FoldPlan()
    if not norms:
        return plan
    candidates = default_examples(model) if example is None else [example[:1]]
    errors = []
    leaves = lambda m: is_activation(m) or is_leaf(m)  # noqa: E731
    shaped = is_traced_hf(model)  # its trace reads each example's shapes; a plain module's is the same for every input
    try:
        gm = None if shaped else trace(model, leaves)
        for candidate in candidates:
            try:
                traced = trace(model, leaves, example=candidate) if shaped else gm
                propagate_shapes(traced, model, candidate)
                gm = traced
                break
            except TraceFailure as exc:
                errors.append(str(exc))
        else:
            raise TraceFailure(errors[-1] if errors else "cannot guess an input for this model")
    except TraceFailure as exc:
        raise InvalidOptionError(f"fold_layernorm cannot trace {type(model).__name__} to find what reads its "
                                 f"LayerNorms: {exc}; pass example= (one input batch).") from None
    modules = dict(gm.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    # parameters read directly (a get_attr some node uses; the tracer leaves unused ones beside leaf calls)
    attrs = {node.target for node in gm.graph.nodes if node.op == "get_attr" and node.users}
    owners: dict[int, list[str]] = {}  # a tensor → every name it goes by (tied or shared parameters)
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    names = {n for ns in owners.values() for n in ns}
    # a tensor that is not one plain parameter (tied, read directly, or computed by a parametrization) cannot be
    # rewritten for one fold alone
    shared = lambda path: path not in names or len(owners[id(_param(model, path))]) > 1 or path in attrs  # noqa: E731
    for name, m in norms.items():
        nodes = calls.get(name, [])
        why = None
        if norm_axis(m) is None:
            why = f"{type(m).__name__} is not a LayerNorm class whose forward is known"
        elif not nodes:
            why = "it is not called as a module of its own in the trace (it sits inside a module kept whole)"
        elif len(nodes) > 1:
            why = "it is called more than once"
        elif len(m.normalized_shape) != 1:
            why = f"it normalises more than one axis ({tuple(m.normalized_shape)})"
        elif any(shared(f"{name}.{a}") for a in ("weight", "bias") if getattr(m, a) is not None):
            why = "its gain or bias is shared with another module or read directly"
        if why is None:
            readers, why = _readers(nodes[0], m, modules, calls)
        if why is None:
            why = next((f"its reader {r.module} is called more than once or shares a parameter (tied, read directly, or "
                        f"computed by a parametrization)" for r in readers
                        if len(calls[r.module]) > 1 or shared(r.weight) or (r.bias and shared(r.bias))), None)
        if why is None and m.bias is not None and any(r.bias is None for r in readers) \
                and bool(_value(model, f"{name}.bias").ne(0).any()) and bool(_value(model, f"{name}.weight").eq(0).any()):
            why = "a zero gain, and a bias with no reader bias to absorb it"
        if why is None:
            plan.folds[name] = readers
        else:
            plan.left[name] = why
    return plan


def fold_graph(model: nn.Module, example: Optional[torch.Tensor] = None) -> nn.Module:
    """A deep copy of a plain module with every foldable LayerNorm folded (see the module docstring); the input
    is not modified. Raises :class:`~workbench.InvalidOptionError` when it has affine LayerNorms and none folds."""
    plan = fold_plan(model, example)
    if plan.left and not plan.folds:
        reasons = "; ".join(f"{n}: {why}" for n, why in plan.left.items())
        raise InvalidOptionError(f"fold_layernorm: no LayerNorm of {type(model).__name__} can be folded — each must be "
                                 f"read only by linear maps that absorb it (nn.Linear, packed self-attention, timm's "
                                 f"Attention), possibly after token selection, token means or dropout. {reasons}")

    def build() -> nn.Module:
        new = copy.deepcopy(model)
        with torch.no_grad():
            for name, readers in plan.folds.items():
                _fold_one(new, name, readers)
        return new
    # weights accelerate offloaded: copied and folded onloaded, and the copy offloaded alike (the plan ran the model,
    # whose hooks offload again after each forward: it is made first)
    return built_alike(model, build)


def _value(model: nn.Module, path: str) -> torch.Tensor:
    """Parameter ``path``'s value, where accelerate serves it if it offloaded it."""
    return torch.as_tensor(offloaded_tensor(model, path, _param(model, path)))


def _fold_one(model: nn.Module, name: str, readers: list[Reader]) -> None:
    """Fold norm ``name`` of ``model`` into ``readers`` in float64 (in place: ``model`` is the new copy)."""
    ln = model.get_submodule(name)
    gamma = ln.weight.double()
    beta = ln.bias.double() if ln.bias is not None else None
    keep_bias = beta is not None and bool(beta.ne(0).any()) and any(r.bias is None for r in readers)
    for r in readers:
        W = _param(model, r.weight)  # [out, C]: the columns read the norm's channels
        if beta is not None and not keep_bias:
            b = _param(model, r.bias)
            b.copy_((b.double() + W.double() @ beta).to(b.dtype))
        W.copy_((W.double() * gamma).to(W.dtype))
    if keep_bias:  # γ⊙n + β = γ⊙(n + β/γ): the gain went to the readers, β/γ stays (fold_plan refused zero gains)
        ln.bias.copy_((beta / gamma).to(ln.bias.dtype))
    elif ln.bias is not None:
        ln.bias.zero_()
    ln.weight.fill_(1.0)


def _param(model: nn.Module, path: str) -> torch.Tensor:
    module, _, attr = path.rpartition(".")
    return getattr(model.get_submodule(module) if module else model, attr)


# ---------------------------------------------------------------------- who reads a norm's output
def _shape(node: fx.Node) -> Optional[tuple]:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _readers(ln_node: fx.Node, m: nn.Module, modules: dict, calls: dict) -> tuple[list[Reader], Optional[str]]:
    """Every linear map reading ``ln_node``'s output through ops that commute with a per-channel affine map, or
    the first other reader, described (``([], why)``)."""
    shape = _shape(ln_node)
    if shape is None or len(shape) < 2 or len(ln_node.args) != 1 or ln_node.kwargs:
        return [], "its output's shape is not known (or it is called with extra arguments)"
    axis = 1 if norm_axis(m) == "first" else len(shape) - 1
    if shape[axis] != m.normalized_shape[0]:
        return [], f"it does not normalise the channel axis of its input (shape {shape})"
    readers, stack, seen = [], [(ln_node, axis)], set()
    while stack:
        node, ax = stack.pop()
        for user in node.users:
            if (user, ax) in seen:
                continue
            seen.add((user, ax))
            step = _step(user, node, ax, modules)
            if step is None:  # reads only its shape
                continue
            if isinstance(step, Reader):
                readers.append(step)
            elif isinstance(step, int):
                stack.append((user, step))
            else:
                return [], step
    if not readers:
        return [], "nothing reads its output"
    return readers, None


def _step(u: fx.Node, x: fx.Node, ax: int, modules: dict):
    """What ``u`` does with ``x`` (channels on axis ``ax``): a :class:`Reader`, the channel axis of ``u``'s output
    (an op that commutes with a per-channel affine map), None (it reads only the shape), or why not (a string)."""
    if reads_only_shape(u):
        return None
    shape = _shape(x) or ()
    nd, last = len(shape), ax == len(shape) - 1
    what = f"it is read by {describe(u, modules)}" if u.op != "output" else "its output is returned by the model"
    if u.op == "call_module":
        m = modules[u.target]
        if isinstance(m, _PASS) and u.args == (x,) and not u.kwargs:
            return ax
        if isinstance(m, nn.Linear) and u.args == (x,) and not u.kwargs and last:
            return Reader(u.target, f"{u.target}.weight", f"{u.target}.bias" if m.bias is not None else None)
        if isinstance(m, nn.Flatten) and u.args == (x,):
            return _flatten(x, ax, m.start_dim, m.end_dim, what)
        info = _mha(m) or _timm_attention(m)
        if info is not None and last and u.args and u.args[0] is x and _refuse_why(m, u, _NoAlias()) is None:
            return Reader(u.target, f"{u.target}.{info['in_w']}", f"{u.target}.{info['in_b']}" if info["in_b"] else None)
        if info is not None:
            return what + f" ({_refuse_why(m, u, _NoAlias()) or 'its channels are not on the last axis'})"
        return what + ", which cannot absorb a per-channel affine map"
    if u.op not in ("call_function", "call_method") or not u.args or u.args[0] is not x \
            or any(a is x for a in list(u.args[1:]) + list(u.kwargs.values())):
        return what
    fname = u.target if u.op == "call_method" else getattr(u.target, "__name__", "")
    if u.op == "call_method" and fname == "contiguous":
        return ax
    if u.target is operator.getitem and last:
        return _index(u, nd, what)
    if fname == "mean" and u.op == "call_method" or u.target is torch.mean:
        return _mean(u, ax, nd, what)
    if fname == "flatten" and (u.op == "call_method" or u.target is torch.flatten):
        start = u.args[1] if len(u.args) > 1 else u.kwargs.get("start_dim", 0)
        end = u.args[2] if len(u.args) > 2 else u.kwargs.get("end_dim", -1)
        return _flatten(x, ax, start, end, what)
    return what


def _index(u: fx.Node, nd: int, what: str):
    """``x[index]`` keeps the last (channel) axis whole and last: only ints and slices, the last axis untouched."""
    idx = u.args[1] if isinstance(u.args[1], tuple) else (u.args[1],)
    if not all(isinstance(i, (int, slice)) or i is Ellipsis for i in idx) or sum(i is Ellipsis for i in idx) > 1:
        return what + " (an index other than ints and slices)"
    full = slice(None, None, None)
    consumed = [i for i in idx if i is not Ellipsis]
    if Ellipsis in idx:
        tail = idx[idx.index(Ellipsis) + 1:]
        touches_last = bool(tail) and tail[-1] != full
    else:
        touches_last = len(consumed) >= nd and consumed[nd - 1] != full
    if touches_last or len(consumed) > nd:
        return what + " (it indexes the channel axis)"
    out = _shape(u)
    return len(out) - 1 if out and len(out) >= 1 else what


def _mean(u: fx.Node, ax: int, nd: int, what: str):
    """A mean over axes other than the channels (token pooling): γ and β pass it."""
    dim = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim")
    keep = u.args[2] if len(u.args) > 2 else u.kwargs.get("keepdim", False)
    if dim is None or any(k not in ("dim", "keepdim") for k in u.kwargs) or len(u.args) > 3:
        return what + " (a mean over every axis, or with a dtype)"
    dims = {int(d) % nd for d in (dim if isinstance(dim, (tuple, list)) else (dim,))}
    if ax in dims:
        return what + " (a mean over the channels)"
    return ax if keep else ax - sum(d < ax for d in dims)


def _flatten(x: fx.Node, ax: int, start: int, end: int, what: str):
    """A flatten keeps the channel axis whole when every other axis it merges with it has length 1."""
    shape = _shape(x) or ()
    nd = len(shape)
    s, e = start % nd, end % nd
    if ax < s:
        return ax
    if ax > e:
        return ax - (e - s)
    if all(shape[i] == 1 for i in range(s, e + 1) if i != ax):
        return s
    return what + " (it merges the channels with other axes)"
