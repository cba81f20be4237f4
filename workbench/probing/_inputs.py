"""Turning what a user holds (tensors, arrays, a ConceptDataset, a Site) into checked float64 matrices."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .._errors import InvalidOptionError, check_option
from ..groups import GROUP_NAMES, Group, get_group


def _tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    try:
        a = np.asarray(x)
    except (TypeError, ValueError) as exc:  # e.g. ragged nested lists
        raise InvalidOptionError(f"{what} must be a tensor or an array; got {type(x).__name__}.") from exc
    if a.dtype.kind not in "biuf":  # strings, objects, complex: "must be a tensor or an array; got ndarray" before
        tip = " (labels must be bool or 0/1, e.g. labels == 'cat')" if a.dtype.kind in "USO" else ""
        raise InvalidOptionError(f"{what} must hold real numbers or bools; got {type(x).__name__} of dtype "
                                 f"{a.dtype}{tip}.")
    return torch.as_tensor(a)


def concept_matrix(concepts, names: Optional[Sequence[str]] = None) -> tuple[torch.Tensor, list[str]]:
    """``(labels bool [..., K], names)`` from a ConceptDataset, a ``{name: labels}`` dict or a bool array."""
    if hasattr(concepts, "concepts") and hasattr(concepts, "concept_names"):  # a ConceptDataset
        return concepts.concepts.bool(), list(concepts.concept_names)
    if isinstance(concepts, dict):
        names = list(concepts)
        columns = [_tensor(v, f"concept {k!r}") for k, v in concepts.items()]
        shapes = {k: tuple(c.shape) for k, c in zip(names, columns)}
        if len(set(shapes.values())) > 1:
            raise InvalidOptionError(f"every concept in the dict must label the same examples (one shape); got "
                                     f"shapes {shapes}.")
        if not columns:
            raise InvalidOptionError("concepts is an empty dict; pass at least one {name: labels} entry.")
        concepts = torch.stack(columns, dim=-1)
    Y = _tensor(concepts, "concepts")
    if Y.dtype != torch.bool:
        if not bool(((Y == 0) | (Y == 1)).all()):
            raise InvalidOptionError("concepts must be binary labels (bool, or 0/1); got other values.")
        Y = Y.bool()
    if Y.ndim == 1:
        Y = Y[:, None]
    names = [f"c{k}" for k in range(Y.shape[-1])] if names is None else list(names)
    if len(names) != Y.shape[-1]:
        raise InvalidOptionError(f"{len(names)} concept names for {Y.shape[-1]} concept columns.")
    return Y, names


def prepare(acts, concepts, where=None, names: Optional[Sequence[str]] = None, *, examples: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Checked ``(X float64 [M, d], Y bool [M, K], concept names)``.

    ``acts`` is ``[N, d]`` (one row per example) or ``[N, T, d]`` with token-level concepts
    ``[N, T, K]`` (flattened to tokens). ``where`` (bool ``[N]`` or ``[N, T]``) keeps some rows; for a
    text ConceptDataset with a pad token it defaults to the non-padding tokens. ``examples=True``
    appends int64 ``[M]``: the example (index along the first axis) each row comes from.
    """
    Y, names = concept_matrix(concepts, names)
    if where is None and hasattr(concepts, "meta") and concepts.meta.get("pad_id") is not None \
            and concepts.inputs.shape == Y.shape[:-1]:
        where = concepts.inputs != concepts.meta["pad_id"]
    X = _tensor(acts, "acts")
    if not X.is_floating_point():
        raise InvalidOptionError(f"acts must be floating point activations; got dtype {X.dtype}.")
    if X.ndim < 2:
        raise InvalidOptionError(f"acts must be [N, d] (examples × units); got shape {tuple(X.shape)}.")
    if X.ndim == 4 and Y.ndim == 2:
        raise InvalidOptionError(f"acts of shape {tuple(X.shape)} look like conv maps [N, C, H, W]; reduce them to "
                                 f"[N, C] first (e.g. maps.mean((2, 3))), or use dissect(maps, masks) for IoU.")
    if X.shape[:-1] != Y.shape[:-1]:
        raise InvalidOptionError(f"acts {tuple(X.shape)} and concepts {tuple(Y.shape)} must agree on every axis "
                                 f"but the last (examples{', tokens' if X.ndim > 2 else ''}).")
    if where is not None:
        keep = _tensor(where, "where")
        if keep.dtype != torch.bool:
            if not bool(((keep == 0) | (keep == 1)).all()):  # .bool() would keep every nonzero row, 0.3 included
                raise InvalidOptionError("where must be a bool mask of the rows to keep (or 0/1); got other values. "
                                         "Threshold it first (e.g. where=weights > 0.5).")
            keep = keep.bool()
        if keep.shape != X.shape[:-1]:
            raise InvalidOptionError(f"where must have shape {tuple(X.shape[:-1])}; got {tuple(keep.shape)}.")
    example = torch.arange(X.shape[0]).reshape(-1, *[1] * (X.ndim - 2)).expand(X.shape[:-1])
    if where is not None:
        X, Y, example = X[keep], Y[keep], example[keep]
    if X.shape[-1] == 0 or Y.shape[-1] == 0:
        raise InvalidOptionError(f"acts {tuple(X.shape)} and concepts {tuple(Y.shape)} need at least one unit and one "
                                 f"concept (a last axis of length ≥ 1).")
    X = X.reshape(-1, X.shape[-1]).to(torch.float64)
    Y = Y.reshape(-1, Y.shape[-1])
    example = example.reshape(-1)
    if not bool(torch.isfinite(X).all()):
        raise InvalidOptionError("acts contain NaN or infinite values; scores would be meaningless.")
    n1 = Y.sum(0)
    empty = [n for n, c in zip(names, n1.tolist()) if c == 0 or c == len(Y)]
    if empty:
        raise InvalidOptionError(f"concepts {empty} are all-true or all-false on these {len(Y)} examples, so no "
                                 f"score separates them; drop them (e.g. concepts[:, keep]) or use more examples.")
    return (X, Y, names, example) if examples else (X, Y, names)


def resolve_group(group, n: int) -> Group:
    """A group on ``n`` units from a registry name, a Group object or a ``Site`` of ``symmetry_map``."""
    site_group = getattr(group, "group", None)
    if isinstance(site_group, Group) and hasattr(group, "hook_name"):  # a Site: use its own group
        if group.n != n:
            raise InvalidOptionError(f"site {group.name!r} has {group.n} units but acts have {n}; pass the "
                                     f"activations observed at {group.hook_name!r}.")
        return site_group
    if isinstance(group, str):
        check_option("group", group.lower(), GROUP_NAMES)
    return get_group(group, n)


def resolve_bases(bases, n: int) -> list[Group]:
    """The basis families named in ``bases`` (registry names or Group objects), each on ``n`` units."""
    if isinstance(bases, (str, Group)):
        bases = [bases]
    try:
        bases = list(bases)
    except TypeError:
        raise InvalidOptionError(f"bases must be a list of family names or Group objects, e.g. ['orthogonal', "
                                 f"'gl']; got {bases!r}.") from None
    out = []
    for b in bases:
        if isinstance(b, str):
            check_option("bases", b.lower(), GROUP_NAMES)
        out.append(get_group(b, n))
    return out
