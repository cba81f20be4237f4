"""Which uses of a traced tensor read its values: ``x.shape``, ``x.ndim``, ``x.size()`` and friends read none (timm's norms
assert on them), so the rules of the graph backend and of the fold do not count them as readers."""
from __future__ import annotations

from torch import fx

IGNORED_METHODS = {"size", "dim"}
META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}  # read no values


def reads_only_shape(u: fx.Node) -> bool:
    """Whether the node ``u`` reads only its argument's metadata (shape, dtype, ...), none of its values."""
    return ((u.op == "call_function" and u.target is getattr and len(u.args) == 2 and u.args[1] in META_ATTRS)
            or (u.op == "call_method" and u.target in IGNORED_METHODS))


def value_readers(x: fx.Node) -> list[fx.Node]:
    """The users of ``x`` that read its values."""
    return [u for u in x.users if not reads_only_shape(u)]
