"""BatchNorm in the graph backend: the module (``nn.BatchNorm1d/2d/3d``) and ``F.batch_norm`` called in eval mode with a
BatchNorm module's own four tensors, as timm's ``BatchNormAct2d`` (a BatchNorm subclass whose forward is
``F.batch_norm`` followed by an activation, which the tracer therefore enters) does. Both are the same per-channel
affine map ``(x − μ) / √(σ² + ε) · γ + β`` of the module's tensors, so both take the one rule below: permutations
and diagonal scalings of the channels pass it (DERIVATIONS §6, Lemma 4), written into γ, β, μ, σ².
"""
from __future__ import annotations

from typing import Optional

from torch import fx, nn
import torch.nn.functional as F

from ._graph_reads import value_readers

_SLOTS = ("running_mean", "running_var", "weight", "bias")  # F.batch_norm's arguments 1-4


def batch_norm(graph, node: fx.Node, m: nn.Module, x: fx.Node, name: str) -> bool:
    """The rule for one BatchNorm call reading ``x`` (``m``: the module whose tensors it uses, ``name`` its path)."""
    if not graph._channels_first(node, x, f"{name} (BatchNorm)"):
        return False
    if not (m.affine and m.track_running_stats):
        graph._fresh(node, f"{name}: BatchNorm without affine parameters or running statistics")
        return False
    if x.op == "call_module" and len(value_readers(x)) == 1 and graph.space(x).writers and graph.info[x].level == "pre" \
            and any(w_node is x for _, w_node in graph.space(x).writers):
        graph.info[x].level = "prebn"  # the writer feeds only this BatchNorm: scalings go on γ, β
        mode = "output"
    else:
        mode = "input"
        graph.space(x).constraints.append(("batchnorm_input", node))
    graph.space(x).norms.append((name, mode, x))
    # After its writer the norm turns P-moved values into M-moved ones; reading a stream, it keeps
    # the level it reads (post-activation values move by φ(M), and so does the norm's output).
    graph._out(node, x, level="pre" if mode == "output" else None)
    place = graph._place(name)
    for pname in _SLOTS[2:] + _SLOTS[:2]:
        graph.record_use(place, f"{name}.{pname}", getattr(m, pname), graph.info[x].space, None, node, x, mode=mode)
    return True


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def module_of_call(graph, call: fx.Node) -> Optional[tuple[str, nn.Module]]:
    """``(path, module)`` when ``call`` is ``F.batch_norm`` in eval mode whose running mean, running variance, weight
    and bias are that BatchNorm module's own four tensors, each read by ``get_attr`` for this call only; else None."""
    if not (call.op == "call_function" and call.target is F.batch_norm):
        return None
    if _arg(call, 5, "training", False) is not False:  # batch statistics: another map (and a traced flag is unknown)
        return None
    slots = [_arg(call, i + 1, s) for i, s in enumerate(_SLOTS)]
    if not all(isinstance(a, fx.Node) and a.op == "get_attr" and len(a.users) == 1 for a in slots):
        return None
    paths = {a.target.rpartition(".")[0] for a in slots}
    if len(paths) != 1 or [a.target.rpartition(".")[2] for a in slots] != list(_SLOTS):
        return None
    path = paths.pop()
    m = graph.modules.get(path)
    return (path, m) if isinstance(m, nn.modules.batchnorm._BatchNorm) else None


def batch_norm_parameter(graph, node: fx.Node) -> bool:
    """``get_attr`` of one of a BatchNorm module's tensors read only by an ``F.batch_norm`` call that
    :func:`module_of_call` resolves: no space of its own (the call's rule moves it)."""
    return len(node.users) == 1 and module_of_call(graph, next(iter(node.users))) is not None


def batch_norm_function(graph, node: fx.Node) -> bool:
    """The BatchNorm rule for a resolved ``F.batch_norm`` call; False (not handled) for any other."""
    found = module_of_call(graph, node)
    x = _arg(node, 0, "input")
    if found is None or not isinstance(x, fx.Node) or x not in graph.info:
        return False
    path, m = found
    batch_norm(graph, node, m, x, path)
    graph.calls[path] = graph.calls.get(path, 0) + 1  # the next call's place (a module call counts itself when observed)
    return True
