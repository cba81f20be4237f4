"""The layout backend's transforms: group elements pushed into a transformer's canonical weights.

Each weight is read in the canonical per-head layout (``workbench.models``), moved by every element
that touches it, and written into a freshly built model of the same kind — never a deep copy, since a
bridge that has run may carry hooks pointing at the original. See ``_layout_sites.py`` for how each
site moves its writers and readers.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from .._errors import InvalidOptionError, UnsupportedModelError
from .._threads import in_parallel, threads
from ..groups import GroupElement, ScaledPermutation, rotary_inverse
from ..models import blank, canonical_views, finish, read_weights, rebuild, tied_keys, views_like, write_weights
from ._layout_gathers import HeadPermutation, _cols_run, _fused_halves, _gather_run, _gathered, _gathered_cols  # noqa: F401  (tests import them here)
from ._layout_refused import unsupported
from ._sites import Observation, Site, SymmetryMap


def push_transformer(model: nn.Module, smap: SymmetryMap, transform, inplace: bool) -> nn.Module:
    """A rebuilt model (or ``model`` itself when ``inplace``) with ``transform`` in its weights.

    Per-head maps go first, all heads of a weight in one batched product (they act on the head's
    own axes, before the head permutation moves heads); every other element acts on a whole axis.
    Each weight is read from the original and written into the new model's own tensor, one weight
    (or one slice of a large one) at a time.
    """
    from ..models import ModelKind, model_kind

    kind = model_kind(model)
    if reason := unsupported(model):
        raise UnsupportedModelError(reason)  # the map was empty for this reason: nothing is written
    if inplace and kind == ModelKind.HF_BRIDGE:
        raise InvalidOptionError("inplace=True cannot transform a live bridge around a Hugging Face model: the bridge "
                                 "keeps split copies of fused q/k/v made at boot, which would not follow. Use the "
                                 "returned model (inplace=False), or transform the Hugging Face model itself.")
    return _pushed(model, _weight_ops(smap, transform), inplace)


def clone(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """An independent copy (rebuilt, sharing no state with ``model``), optionally cast to ``dtype``."""
    return _pushed(model, {}, False, dtype)


def observe(site: Site, element: GroupElement, obs: Observation, h: torch.Tensor) -> Optional[torch.Tensor]:
    """How ``element`` at ``site`` moves the activation ``h`` seen at ``obs`` (None: not comparable)."""
    if obs.level == "heads":  # a permutation of the head axis, lifted (see HeadPermutation)
        perm = element.perm_part()
        return None if perm is None else HeadPermutation(perm, obs.block, obs.heads).act(h, obs.axis)
    F = {"pre": element, "post": element.phi(), "perm": element.perm_part() or element,
         "dual": element.inverse().transpose()}[obs.level]
    if obs.block > 1:  # a raw projection's output: [..., heads·d_head] flattened
        return _act_obs(h.unflatten(-1, (-1, obs.block)), F, obs).flatten(-2)
    return _act_obs(h, F, obs)


def _act_obs(h: torch.Tensor, F: GroupElement, obs: Observation) -> torch.Tensor:
    if obs.heads is None:
        return F.act(h, obs.axis)
    idx = torch.tensor(obs.heads, device=h.device)
    out = h.clone()
    out.index_copy_(-2, idx, F.act(h.index_select(-2, idx), obs.axis))
    return out


def _weight_ops(smap: SymmetryMap, transform) -> dict[str, list]:
    """Canonical weight key -> the ``(axis, op)`` to apply in order: per-head ops (``{head: element on
    n dimensions}``, heads on axis 0) first, then whole-axis group elements."""
    per_head: dict[tuple[str, int], dict[int, torch.Tensor]] = {}
    whole: dict[str, list] = {}
    sites = {s.name: s for s in smap}  # smap[name] scans the list: quadratic over a model's ~100s of sites
    elements = _with_inverses(sites, transform.elements)
    duals = _duals(sites, elements)
    for name, e in elements.items():
        site = sites[name]
        perm = e.perm_part()
        heads: dict[tuple, HeadPermutation] = {}  # one lifted move per (block, heads): its index is made once

        def lifted(p, perm=perm, heads=heads):
            if perm is None:
                return None
            F = heads.get((p.block, p.heads))
            if F is None:
                F = heads[p.block, p.heads] = HeadPermutation(perm, p.block, p.heads)
            return F
        ops = [(p, {"pre": e, "perm": perm, "dual": duals.get((name, "inverse"))}.get(p.level) if p.level != "heads"
                else lifted(p)) for p in site.writers]
        ops += [(p, duals[name, p.level]) for p in site.readers]
        for port, F in ops:
            if F is None:  # the permutation part of a (forced) dense map: nothing moves
                continue
            if port.heads is None or port.level == "heads":
                whole.setdefault(port.name, []).append((port.axis, F))
            else:  # the element itself: its condition number decides the product's precision (``_jobs``)
                per_head.setdefault((port.name, port.axis), {}).update({h: F for h in port.heads})
        for key, level in site.norms:  # gains follow the permutation part (signs pass RMSNorm; a dense
            F = perm if level == "perm" else e  # group only acts where gains are 1); a bias after the
            if F is not None:  # normalisation is a vector in the stream's basis and moves by the element
                whole.setdefault(key, []).append((0, F))
    out: dict[str, list] = {}
    for (key, axis), mats in per_head.items():
        out.setdefault(key, []).append((axis, mats))
    for key, ops in whole.items():
        out.setdefault(key, []).extend(ops)
    return out


def _with_inverses(sites: dict[str, Site], elements: dict[str, GroupElement]) -> dict[str, GroupElement]:
    """``elements``, each rotary one (per pair s·R(θ), and any invertible block B on the dimensions no pair
    covers: a partial rotary dimension) given its inverse and its condition number, which its blocks say:
    (sR)⁻¹ = (sR)ᵀ/s², B⁻¹ by one batched LU over the draw (what its dual would take anyway), and cond =
    max / min over every block's singular values (s, twice, for a pair; B's own). With them its dual needs
    no LU of the whole map and its products may run in float32 (``_jobs``). The structure is checked on the
    matrix itself (a forced group at a rotary site draws something else); anything else, or a free block
    whose LU or singular values are not finite, is returned as it is."""
    from ..groups import Dense

    out, todo = dict(elements), {}
    for name, e in elements.items():
        G = sites[name].group
        if (getattr(G, "name", None) == "rotary" and getattr(G, "pairs", ()) and isinstance(e, Dense)
                and e.inv is None and not e.orthogonal and e.n == G.n):
            todo.setdefault((G.pairs, tuple(getattr(G, "free", ()))), []).append(name)
    for (pairs, free), names in todo.items():
        M = torch.stack([elements[k].M.double() for k in names])
        a, b = torch.tensor(pairs).T
        f = torch.tensor(free, dtype=torch.long)
        mask = torch.zeros(M.shape[1:], dtype=torch.bool)
        mask[a, a] = mask[a, b] = mask[b, a] = mask[b, b] = True
        mask[f[:, None], f[None, :]] = True
        ok = ((M * ~mask).abs().amax((1, 2)) == 0) & (M[:, a, a] == M[:, b, b]).all(1) & (M[:, a, b] == -M[:, b, a]).all(1)
        Binv = sv = None
        if len(free):
            B = M[:, f[:, None], f[None, :]]
            with threads(1):
                Binv, info = torch.linalg.inv_ex(B)
                sv = torch.linalg.svdvals(B)
            ok &= (info == 0) & torch.isfinite(Binv).all((1, 2)) & (sv[:, -1] > 0)
        inv, cond, s2 = rotary_inverse(M, pairs, free, Binv, sv)
        ok &= (s2 > 0).all(1) & torch.isfinite(s2).all(1)
        for k, name in enumerate(names):
            if ok[k]:
                e = elements[name]
                out[name] = Dense(e.M, e.phi_kind, e.group, False, inv[k].clone(), float(cond[k]))
    return out


def _duals(sites: dict[str, Site], elements: dict[str, GroupElement]) -> dict[tuple[str, str], GroupElement]:
    """F⁻ᵀ for every (site, reader level): readers move by the inverse transpose of the element (or of
    φ of it). A dense element whose inverse is known from its factors (a GL draw: ``Dense.inv``) uses
    it, keeping its condition number; the other dense, non-orthogonal ones are inverted in one batched
    call on one thread (see ``threads``): 288 separate 64×64 inverses on two threads took 2 s on a
    busy machine."""
    from ..groups import Dense

    out, batch = {}, []
    for name, e in elements.items():
        for level in {p.level for p in sites[name].readers}:
            F = e.phi() if level == "post" else e
            if level == "dual":  # reads a space moving by F⁻ᵀ (OPT-350m's output word space): by F itself
                out[name, level] = e
            elif isinstance(F, Dense) and not F.orthogonal and F.inv is None:  # else exact from its factors
                batch.append(((name, level), F))
            else:
                out[name, level] = F.inverse().transpose()
        if any(p.level == "dual" for p in sites[name].writers):  # writes it: by F⁻ᵀ
            out[name, "inverse"] = e.inverse().transpose()
    for n in {F.n for _, F in batch}:
        same = [(k, F) for k, F in batch if F.n == n]
        with threads(1):
            inv = torch.linalg.inv(torch.stack([F.M.double() for _, F in same]))
        for (k, F), M in zip(same, inv):
            out[k] = Dense(M.T.clone(), F.phi_kind, F.group)
    return out


# ---------------------------------------------------------------------- pushing: one weight at a time
# A large weight is pushed in slices of at most this many elements (32 MiB in float64), cut along an
# axis no element acts on (the vocabulary of W_E and W_U). Each slice is one job of ``in_parallel``:
# the peak stays near a slice per thread plus the new model, and on many cores no single-threaded
# job is much longer than the others (W_E whole would be a quarter of GPT-2 small's FLOPs).
# On one thread, a weight moved by one gather pass in its own dtype is whole (``_jobs``).
_SLICE = 2 ** 22


def _pushed(model: nn.Module, ops: dict[str, list], inplace: bool, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """``model`` (``inplace``) or a fresh copy in ``dtype`` with ``ops`` applied to its weights."""
    dtype = dtype or next(model.parameters()).dtype
    src = canonical_views(model)
    with torch.no_grad():
        if src is None:  # no views of its own tensors (a copying layout): through a dict of weights
            W = read_weights(model)
            out = dict(W)  # the untouched weights as they are: rebuild and write_weights copy them
            for key in ops:
                out[key] = torch.empty_like(W[key])
            in_parallel(*_jobs([(W[k], out[k], ops[k]) for k in ops], {}))
            if inplace:
                write_weights(model, out)
                return model
            return rebuild(model, out, dtype)
        new = model if inplace else blank(model, dtype)
        dst = src if inplace else views_like(src, model, new)
        # A tied parameter (Hugging Face's unembedding = embedding) is one tensor under two keys: it is
        # written once, after checking that both keys' maps agree on it.
        second = set()
        for a, b in tied_keys(dst):
            _check_tie(src, ops, a, b, type(model).__name__)
            second.add(b)
        # (interleaved halves of one tensor, GPT-OSS's gate and up, in one pass: _fused_halves)
        in_parallel(*_jobs(_fused_halves({k: (t, dst[k], ops.get(k, [])) for k, t in src.items()
                                          if k not in second and (ops.get(k) or t is not dst[k])}), {}))
    return new if inplace else finish(model, new)


def _check_tie(src: dict, ops: dict, a: str, b: str, what: str) -> None:
    """Keys ``a`` and ``b`` name one tensor of the new model: their pushed values must agree. Compared on
    a few entries along an axis no op acts on (the vocabulary), in float64 — unless the source keeps them
    apart, then on everything."""
    xa, xb = src[a], src[b]
    shared = xa.untyped_storage().data_ptr() == xb.untyped_storage().data_ptr() and xa.storage_offset() == xb.storage_offset()
    fa, fb = _free_axis(xa, ops.get(a, [])), _free_axis(xb, ops.get(b, []))
    if shared and fa is not None and fb is not None and xa.stride(fa) == xb.stride(fb):
        k = min(8, xa.shape[fa])
        xa, xb = xa.narrow(fa, 0, k), xb.narrow(fb, 0, k)
    elif not ops.get(a) and not ops.get(b) and shared:
        return
    ra, rb = _applied(xa, ops.get(a, [])), _applied(xb, ops.get(b, []))
    order = lambda x: sorted(range(x.ndim), key=lambda d: -x.stride(d))  # noqa: E731  (storage order)
    ra, rb = ra.permute(order(xa)), rb.permute(order(xb))
    scale = float(ra.abs().max()) if ra.numel() else 0.0
    if ra.shape != rb.shape or not torch.allclose(ra, rb, rtol=1e-9, atol=1e-12 * scale):
        raise InvalidOptionError(
            f"{a} and {b} are tied in this {what}, but the transform gives them different values (a map on the "
            f"residual stream that is not orthogonal). Untie them first (model = wb.untie_embeddings(model)), or use "
            f"the stream's own group.")


def _free_axis(x: torch.Tensor, ops: list) -> Optional[int]:
    used = {a % x.ndim for a, F in ops} | {0 for _, F in ops if isinstance(F, dict)}
    free = [d for d in range(x.ndim) if d not in used]
    return max(free, key=lambda d: x.shape[d]) if free else None


def _applied(x: torch.Tensor, ops: list) -> torch.Tensor:
    """``ops`` applied to ``x``, in float64."""
    out = torch.empty(x.shape, dtype=torch.float64)
    _push_slice(x.double(), out, ops, len(ops) - 1, {})
    return out


def _jobs(weights: list[tuple[torch.Tensor, torch.Tensor, list]], casts: dict) -> tuple[list, list]:
    """``in_parallel``'s calls and costs: ``dst = ops(src)`` for every ``(src, dst, ops)``, slice by
    slice (see ``_SLICE``), each op in the precision it needs (``casts``: see ``_along``).

    A dense map's product with a float32 weight runs in float32 where ``_port_moves.dense_ok`` allows it
    (its condition number known and at most ``COND_MAX``: the rounding argument is that module's
    docstring); a per-head dict where every head's map does. Any other general (GL) map — a condition
    number unknown (a hand-made element, a partial rotary map's LU-inverted dual) or too large — runs
    in float64, and every op before it too; orthogonal maps and (scaled, signed) permutations after
    the last such op run in the weight's dtype. An earlier finding that float32 GL products put an
    attention-only model (TL 3.9) above the float32 tolerance did not reproduce with the policy and
    today's verify (which measures the new model's own rounding floor too): over 8 seeds the largest
    relative difference was 2.0e-06 with float32 products against 7.1e-07 with float64 ones (tolerance
    1e-05); at d_model 256 (stream cond 175-396) 4.4e-07 against 2.5e-07.
    Other dtypes stay in float64 throughout; plain permutations never leave the weight's dtype.
    """
    from ..groups import Dense, ScaledPermutation
    from ._port_moves import dense_ok

    def general(F, dtype) -> bool:  # a product that must run in float64 for a ``dtype`` weight
        if isinstance(F, dict):  # (per-head scaled permutations are gathers: in the weight's dtype, as whole-axis ones)
            return not all(dense_ok(f, dtype) for f in F.values() if isinstance(f, Dense))
        return isinstance(F, Dense) and not dense_ok(F, dtype)

    calls, costs = [], []
    one_thread = torch.get_num_threads() == 1  # ``in_parallel`` then runs the calls in turn
    for src, dst, ops in weights:
        if all((isinstance(F, ScaledPermutation) and F.scale is None) or isinstance(F, HeadPermutation) for _, F in ops):
            last = -1  # exact in any dtype
        elif src.dtype == torch.float32:
            last = max((i for i, (_, F) in enumerate(ops) if general(F, src.dtype)), default=-1)
        else:
            last = len(ops) - 1
        used = {a % src.ndim for a, F in ops} | {0 for _, F in ops if isinstance(F, dict)}
        free = [a for a in range(src.ndim) if a not in used]
        # One gather pass in the weight's dtype needs no scratch memory to bound, and on one thread no jobs to
        # balance: whole (W_E's 4 slices were 4 gathers, each with its own index set-up)
        whole = last == -1 and one_thread and _gather_run(ops, 0, src) == len(ops)
        axis = max(free, key=lambda a: src.shape[a]) if free and src.numel() > _SLICE and not whole else None
        step = 1 if axis is None else max(1, _SLICE * src.shape[axis] // src.numel())
        for start in range(0, src.shape[axis] if axis is not None else 1, step):
            x = src if axis is None else src.narrow(axis, start, min(step, src.shape[axis] - start))
            out = dst if axis is None else dst.narrow(axis, start, x.shape[axis])
            calls.append(functools.partial(_push_slice, x, out, ops, last, casts))
            costs.append(x.numel() * (1 + len(ops)))
    return calls, costs


def _push_slice(x: torch.Tensor, out: torch.Tensor, ops: list, last: int, casts: dict) -> None:
    """``out = ops(x)``: ops up to index ``last`` in float64, the rest in ``x``'s dtype. An empty ``x`` (DINOv2 with
    ``num_register_tokens=0``: its register tokens [1, 0, d]) has nothing to move (a gather cannot reshape it)."""
    if x.numel() == 0:
        return
    dtype = x.dtype
    i = 0
    while i < len(ops):
        # .double() / .to() keep the strides: the model's own memory order
        x = x.double() if i <= last else x.to(dtype)
        j = _cols_run(ops, i, x)
        if j > i:  # per-head moves of the columns and the rows' moves: one compiled pass, where it runs
            y = _gathered_cols(x, ops[i:j], out if j == len(ops) else None, casts)
            if y is not None:
                x, i = y, j
                continue
        j = _gather_run(ops, i, x)
        if j > i:  # permutations: one pass (ops[last] is general, so never inside a run)
            x = _gathered(x, ops[i:j], out if j == len(ops) else None, casts)
            i = j
            continue
        a, F = ops[i]
        x = _along(x, F, a % x.ndim, out if i == len(ops) - 1 else None, casts)
        i += 1
    if x is not out:
        out.copy_(x)


def _stack(mats: dict[int, GroupElement], heads: int, n: int) -> torch.Tensor:
    """[heads, n, n] float64: ``mats[h]``'s matrix for the heads it names, the identity for the others."""
    eye = torch.eye(n, dtype=torch.float64)
    return torch.stack([mats[h].matrix() if h in mats else eye for h in range(heads)])


def _per_head_product(x: torch.Tensor, M: torch.Tensor, axis: int, out: Optional[torch.Tensor]) -> torch.Tensor:
    """``x`` ``[heads, ·, ·]`` with head h moved along ``axis`` by ``M[h]``: one batched GEMM on the heads, written into
    ``out`` (the new model's tensor) when it lies as ``x`` does, else into new memory laid out as ``x``.

    Why not ``torch.einsum`` (its first form): einsum returned new memory, which the caller then copied into the new
    model, and inside a transform (weights not in cache) it ran its ``[heads, 64, 512]`` products at 0.59-0.65 ms
    against 0.37 ms for this GEMM (ViT at the coverage table's shape, 24 such weights a transform)."""
    into = (out is not None and out.dtype == x.dtype and out.stride() == x.stride()
            and out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr())  # not in place
    res = out if into else torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    other = 3 - axis  # the axis neither the heads nor the map's
    # per head: y = M·x when the moved axis is x[h]'s rows, y = x·Mᵀ when it is its columns
    xh, rh = x.movedim(other, -1 if axis == 1 else 1), res.movedim(other, -1 if axis == 1 else 1)
    if axis == 1:
        torch.matmul(M, xh, out=rh)
    else:
        torch.matmul(xh, M.mT, out=rh)
    return res


def _along(x: torch.Tensor, F, axis: int, out: Optional[torch.Tensor], casts: dict) -> torch.Tensor:
    """``x`` moved along ``axis`` by ``F``: a group element, or ``{head: [n, n]}`` (heads on axis 0).

    Done on ``x``'s dimensions in memory order (slowest first): a dense map is one GEMM (or one
    batched GEMM) on the weight as it lies in the model whichever canonical axis it acts on, a
    permutation gathers whole rows, and the result lies the same way, down to the final copy. A dense
    map writes straight into ``out`` (the new model's tensor) when it lies in the same order and dtype,
    saving a copy of the weight; otherwise the result is returned and the caller copies it.
    ``casts`` memoises a dense map's matrix per dtype across calls (the stream's 768×768 rotation
    meets some 200 weights and slices), and a per-head dict's stacked matrices (keyed by its elements'
    ids: they stay alive in the ops for the whole push).
    """
    from ..groups import Dense

    order = sorted(range(x.ndim), key=lambda d: -x.stride(d))
    xm, back = x.permute(order), [order.index(d) for d in range(x.ndim)]
    if isinstance(F, dict) and order[0] == 0 and not any(isinstance(f, Dense) for f in F.values()):
        # per-head (scaled) permutations (a mixture's experts' hidden units, the heads the slowest axis in memory) gather
        # each head's slice as it lies, in place: as a batched product of dense matrices (the general path below, for
        # any layout) they cost E·n³ a weight (Mixtral at the coverage table's shape: 0.9 s of 1.1 s)
        res = torch.empty(xm.shape, dtype=x.dtype, device=x.device)
        for h in range(x.shape[0]):
            if h in F:
                F[h].act(xm[h], order.index(axis) - 1, out=res[h])
            else:
                res[h].copy_(xm[h])
        return res.permute(back)
    if isinstance(F, dict):  # per-head maps: one batched product over the heads on axis 0
        # the same heads' maps meet several weights (W_Q and b_Q; W_V, b_V and W_O's dual): stacked once a call
        key = ("stack", tuple((h, id(f)) for h, f in F.items()), x.shape[0], x.shape[axis], x.dtype)
        M = casts.get(key)
        if M is None:
            M = casts[key] = _stack(F, x.shape[0], x.shape[axis]).to(x.dtype)
        if x.ndim == 3:
            return _per_head_product(x, M, axis, out)
        # (a bias [heads, d_head]: one einsum in memory order)
        names = "abcdefg"[:x.ndim]
        spec = "".join("y" if d == axis else names[d] for d in order)
        return torch.einsum(f"{spec},azy->{spec.replace('y', 'z')}", xm, M).permute(back)
    if not isinstance(F, Dense):  # a (scaled) permutation: its own act, an index_select
        return F.act(xm, order.index(axis)).permute(back)
    key = (id(F), x.dtype)
    M = casts.get(key)
    if M is None:
        M = casts[key] = F.M.to(x.dtype)
    # x viewed as [L, n, R] around the acted axis: y = x·Mᵀ when R = 1, else y = M·x per L
    p = order.index(axis)
    L, R = xm.shape[:p].numel(), xm.shape[p + 1:].numel()
    into = (out is not None and out.dtype == x.dtype and out.permute(order).is_contiguous()
            and out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr())  # not in place
    res = out.permute(order) if into else torch.empty(xm.shape, dtype=x.dtype, device=x.device)
    if R == 1:
        torch.matmul(xm.reshape(L, -1), M.T, out=res.view(L, -1))
    else:
        torch.matmul(M, xm.reshape(L, -1, R), out=res.view(L, -1, R))
    return out if into else res.permute(back)

