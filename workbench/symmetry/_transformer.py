"""Sites of TransformerLens models, and pushing group elements into their weights.

The weights are read in one canonical per-head layout (``workbench/hooks/_tl.py``), transformed in
float64, and written into a freshly built model of the same kind — never a deep copy, since a bridge
that has run may carry hooks pointing at the original. Conventions (row vectors, as TransformerLens):

- residual stream x ↦ M x: writers (``W_E``, ``W_pos``, ``W_O``, ``b_O``, ``W_out``, ``b_out``) move
  by M along d_model, readers (``W_Q``, ``W_K``, ``W_V``, ``W_in``, ``W_gate``, ``W_U``) by M⁻ᵀ;
- a head's query/key space: q ↦ A q, k ↦ A⁻ᵀ k, so q·k is unchanged (``W_Q`` writes, ``W_K`` reads);
- a head's value space: v ↦ N v, and ``W_O`` reads it by N⁻ᵀ;
- MLP hidden units: ``W_in`` writes by M, ``W_out`` reads by φ(M)⁻ᵀ; a gated MLP's gate moves by the
  permutation part only, its up branch by the whole P·D;
- heads: one permutation of the head axis of every attention weight.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from .._threads import in_parallel, threads
from ..groups import GroupElement, get_group
from ..hooks import _hf
from ..hooks._tl import _blank, _canonical_views, read_weights, rebuild, shape_facts, tl_kind, write_weights
from ._map import Observation, Port, Site, SymmetryMap
from ._transform import _perm_part

_NORMS = {  # normalisation type -> (group with gains present, group once folded, what folding does)
    None: ("gl", "gl"),
    "LN": ("permutation", "orthogonal_ones"),
    "LNPre": ("orthogonal_ones", "orthogonal_ones"),
    "RMS": ("signed_permutation", "orthogonal"),
    "RMSPre": ("orthogonal", "orthogonal"),
}


def is_transformer_model(model: nn.Module) -> bool:
    return tl_kind(model) is not None


def _cfg(model, key, default=None):
    return getattr(model.cfg, key, default)


def norm_keys(weights: dict) -> list[str]:
    """Gain and bias keys of the LayerNorms on the residual stream (not SoLU's ``mlp.ln``); BERT's
    embedding LayerNorm and its MLM head's (whose space is tied to the stream's) included."""
    return [k for k in weights if k.rpartition(".")[0].rpartition(".")[2] in ("ln1", "ln2")
            or k.startswith("ln_final.") or k.startswith("embed_ln.")]


def is_folded(weights: dict) -> bool:
    """Every residual-stream norm has gain 1: its gain lives in the readers. A bias may stay: after
    normalising, it is a vector in the stream's basis and moves with any orthogonal map (R·n + R·b)."""
    return all(torch.equal(weights[k], torch.ones_like(weights[k])) for k in norm_keys(weights) if k.endswith(".w"))


def transformer_map(model: nn.Module) -> SymmetryMap:
    """The sites of a TransformerLens model (see the module docstring for how each moves)."""
    name = type(model).__name__
    kind = tl_kind(model)
    if kind == "hf" and (reason := _hf.unsupported(model)):
        return SymmetryMap(name, [], [(name, reason)])
    pos = _cfg(model, "positional_embedding_type", "standard")
    if pos not in ("standard", "rotary"):
        return SymmetryMap(name, [], [(name, f"positional embedding {pos!r} is not supported (standard, rotary are).")])
    W = _canonical_views(model) or read_weights(model)  # views: no copy of every weight
    f = shape_facts(model.cfg)
    L, H, K, dh = int(model.cfg.n_layers), f["n_heads"], f["n_kv"], f["d_head"]
    ratio = H // K
    sites = [_resid_site(model, W, L)]
    skipped = []
    pairs = rotary_pairs(model) if pos == "rotary" else None
    for layer in range(L):
        a = f"blocks.{layer}.attn"
        for k in range(K):
            heads = tuple(range(k * ratio, (k + 1) * ratio))
            qk_group = get_group("rotary", dh, pairs=pairs) if pairs is not None else get_group("gl", dh)
            notes = [f"query heads {list(heads)} share key head {k}"] if ratio > 1 else []
            if pairs is not None:
                notes.append(f"rotary pairs {pairs[:2]}… (measured through hook_q/hook_k)")
            obs = [Observation(f"{a}.hook_q", 0, "pre", axis=-1, heads=heads),
                   Observation(f"{a}.hook_k", 0, "dual", axis=-1, heads=(k,))]
            sites.append(Site(f"{a}.qk.{k}", dh, qk_group, "attention scores", f"{a}.hook_q",
                              _present([Port(f"{a}.W_Q", "pre", axis=2, heads=heads), Port(f"{a}.b_Q", "pre", axis=1, heads=heads)], W),
                              _present([Port(f"{a}.W_K", "pre", axis=2, heads=(k,)), Port(f"{a}.b_K", "pre", axis=1, heads=(k,))], W),
                              [], obs, notes))
            sites.append(Site(f"{a}.ov.{k}", dh, get_group("gl", dh), "linear (value → output)", f"{a}.hook_v",
                              _present([Port(f"{a}.W_V", "pre", axis=2, heads=(k,)), Port(f"{a}.b_V", "pre", axis=1, heads=(k,))], W),
                              _present([Port(f"{a}.W_O", "post", axis=1, heads=heads)], W), [],
                              [Observation(f"{a}.hook_v", 0, "pre", axis=-1, heads=(k,)),
                               Observation(f"{a}.hook_z", 0, "pre", axis=-1, heads=heads)], list(notes[:1])))
        if K == H:
            perm = _present([Port(f"{a}.{p}", "perm", axis=0) for p in ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O")], W)
            seen = [Observation(f"{a}.{h}", 0, "perm", axis=-2) for h in ("hook_q", "hook_k", "hook_v", "hook_z")]
            sites.append(Site(f"{a}.heads", H, get_group("permutation", H), "attention heads", f"{a}.hook_z", perm, [], [],
                              seen + [Observation(f"{a}.hook_pattern", 0, "perm", axis=1)]))
        else:
            skipped.append((f"{a}.heads", "grouped-query attention: permuting heads across key/value groups is not mapped"))
        if not _cfg(model, "attn_only", False):
            sites.append(_mlp_site(model, W, layer))
    from ..hooks import hook_names

    names = hook_names(model)
    known = set(names) | set(names.aliases)
    for site in sites:  # hook points differ between versions (a bridge's SoLU has no hook_mid)
        site.observed = [o for o in site.observed if o.name in known]
    return SymmetryMap(name, sites, skipped)


def _resid_site(model, W: dict, L: int) -> Site:
    norm = _cfg(model, "normalization_type", None)
    if norm not in _NORMS:
        raise NotImplementedError(f"normalization_type {norm!r}")
    post_ln = tl_kind(model) == "hf" and _hf.is_post_ln(model)
    folded = is_folded(W) and not post_ln
    group = get_group("permutation" if post_ln else _NORMS[norm][folded], int(model.cfg.d_model))
    notes = []
    if post_ln:
        notes.append("post-LayerNorm: every norm sits on the stream itself, so no folding can enlarge this group; "
                     "the MLM head's hidden space takes the same permutation (its decoder is the tied embedding)")
    elif _NORMS[norm][1] != group.name:
        notes.append(f"wb.fold_layernorm(model) would enlarge this to {_NORMS[norm][1]}")
    # Embeddings write the stream; BERT's MLM head dense reads it and writes a space tied to it.
    writers = [Port(k, "pre", axis=1) for k in ("embed.W_E", "pos_embed.W_pos", "token_type_embed.W_TT", "mlm.W")]
    writers.append(Port("mlm.b", "pre", axis=0))
    readers = [Port("mlm.W", "post", axis=0)]
    for layer in range(L):
        b = f"blocks.{layer}"
        writers += [Port(f"{b}.attn.W_O", "pre", axis=2), Port(f"{b}.attn.b_O", "pre", axis=0)]
        readers += [Port(f"{b}.attn.{m}", "post", axis=1) for m in ("W_Q", "W_K", "W_V")]
        if f"{b}.mlp.W_out" in W:
            writers += [Port(f"{b}.mlp.W_out", "pre", axis=1), Port(f"{b}.mlp.b_out", "pre", axis=0)]
            readers += [Port(f"{b}.mlp.{m}", "post", axis=0) for m in ("W_in", "W_gate") if f"{b}.mlp.{m}" in W]
    readers.append(Port("unembed.W_U", "post", axis=0))
    observed = [Observation(f"blocks.{layer}.hook_resid_pre", 0, "pre") for layer in range(L)]
    observed.append(Observation(f"blocks.{L - 1}.hook_resid_post", 0, "pre"))
    label = {None: "no normalisation", "LN": "post-LayerNorm" if post_ln else "LayerNorm", "LNPre": "LayerNorm (no gain)", "RMS": "RMSNorm",
             "RMSPre": "RMSNorm (no gain)"}[norm]
    return Site("resid", group.n, group, label + (" (folded)" if folded and norm in ("LN", "RMS") else ""),
                "blocks.0.hook_resid_pre", _present(writers, W), _present(readers, W),
                [(k, "perm" if k.endswith(".w") else "pre") for k in norm_keys(W)], observed, notes)


def _present(ports: list[Port], W: dict) -> list[Port]:
    return [p for p in ports if p.name in W]


def _mlp_site(model, W: dict, layer: int) -> Site:
    from ..groups import intertwiner_group

    m = f"blocks.{layer}.mlp"
    act = str(_cfg(model, "act_fn", "gelu"))
    n = W[f"{m}.W_in"].shape[1]
    gated = f"{m}.W_gate" in W
    if gated:  # act(gate) ⊙ up: permute both, any nonzero diagonal on the up branch
        group, label = get_group("diagonal_permutation", n), f"gated {act}"
    elif act.startswith("solu"):
        group, label = get_group("permutation", n), act  # x·softmax(x) is only permutation-equivariant
    else:
        group, label = intertwiner_group(act, n), act
    writers = [Port(f"{m}.W_in", "pre", axis=1), Port(f"{m}.b_in", "pre", axis=0)]
    observed = [Observation(f"{m}.hook_pre", 0, "perm" if gated else "pre"), Observation(f"{m}.hook_post", 0, "post")]
    if gated:
        writers += [Port(f"{m}.W_gate", "perm", axis=1), Port(f"{m}.b_gate", "perm", axis=0)]
        observed.append(Observation(f"{m}.hook_pre_linear", 0, "pre"))
    if f"{m}.ln.w" in W:
        observed.append(Observation(f"{m}.hook_mid", 0, "perm"))
    return Site(m, n, group, label, f"{m}.hook_post", _present(writers, W), _present([Port(f"{m}.W_out", "post", axis=0)], W),
                [(k, "perm") for k in (f"{m}.ln.w", f"{m}.ln.b") if k in W], observed)


# ---------------------------------------------------------------------- rotary pairing, read from the model
def rotary_pairs(model: nn.Module, layer: int = 0) -> tuple[tuple[int, int], ...]:
    """The dimension pairs that rotary embeddings rotate together, measured through the hooks.

    Example i writes e_i into ``hook_q`` at every position; key position m carries e_j for one j per
    position. The attention score of the last query on key m is e_iᵀ R(m − last) e_j: nonzero only
    when i = j or i is j's rotary partner. Dimensions without a partner are not rotated. Nothing is
    assumed about the layout (adjacent pairs, halves, or a partial rotary dimension).
    """
    from ..hooks import intervene, run_with_cache

    if next(model.parameters()).dtype != torch.float64:
        model = clone(model, torch.float64)  # small angles of slow frequencies need the precision
    dh, T = int(model.cfg.d_head), int(model.cfg.n_ctx)
    a = f"blocks.{layer}.attn"
    touches = torch.zeros(dh, dh, dtype=torch.float64)
    for start in range(0, dh, T - 1):
        js = list(range(start, min(start + T - 1, dh)))

        def queries(q, name):  # [batch, pos, head, d_head]: example i carries e_i at every position
            return torch.eye(dh, dtype=q.dtype, device=q.device)[:, None, None, :].expand(q.shape).clone()

        def keys(k, name, js=js):  # key position m carries e_{js[m]}; the others (the last too) zero
            new = torch.zeros_like(k)
            for m, j in enumerate(js):
                new[:, m, :, j] = 1
            return new

        tokens = torch.zeros(dh, T, dtype=torch.long, device=next(model.parameters()).device)
        with torch.no_grad(), intervene(model, {f"{a}.hook_q": queries, f"{a}.hook_k": keys}):
            _, cache = run_with_cache(model, tokens, names=[f"{a}.hook_pattern"], budget=None)
        # The pattern is softmax(scores); the last key is zero, so log p_m − log p_last is score m.
        logp = cache[f"{a}.hook_pattern"][:, 0, T - 1, :].double().log()
        touches[:, js] = (logp[:, :len(js)] - logp[:, T - 1:T]).abs()
    touches = touches > 1e-9 * touches.max()
    pairs = []
    for j in range(dh):
        partners = [i for i in torch.nonzero(touches[:, j]).flatten().tolist() if i != j]
        if len(partners) > 1:
            raise ValueError(f"rotary embedding at layer {layer} mixes dimension {j} with {partners}: not 2-D rotations.")
        if partners and j < partners[0]:
            pairs.append((j, partners[0]))
    return tuple(pairs)


# ---------------------------------------------------------------------- pushing elements into the weights
def push_transformer(model: nn.Module, smap: SymmetryMap, transform, inplace: bool) -> nn.Module:
    """A rebuilt model (or ``model`` itself when ``inplace``) with ``transform`` in its weights.

    Per-head maps go first, all heads of a weight in one batched product (they act on the head's
    own axes, before the head permutation moves heads); every other element acts on a whole axis.
    Each weight is read from the original and written into the new model's own tensor, one weight
    (or one slice of a large one) at a time.
    """
    return _pushed(model, _weight_ops(smap, transform), inplace)


def clone(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """An independent copy (rebuilt, sharing no state with ``model``), optionally cast to ``dtype``."""
    return _pushed(model, {}, False, dtype)


def observe(site: Site, element: GroupElement, obs: Observation, h: torch.Tensor) -> torch.Tensor:
    """How ``element`` at ``site`` moves the activation ``h`` seen at ``obs``."""
    F = {"pre": element, "post": element.phi(), "perm": _perm_part(element) or element,
         "dual": element.inverse().transpose()}[obs.level]
    return _act_obs(h, F, obs)


def _act_obs(h: torch.Tensor, F: GroupElement, obs: Observation) -> torch.Tensor:
    if obs.heads is None:
        return F.act(h, obs.axis)
    idx = torch.tensor(obs.heads, device=h.device)
    out = h.clone()
    out.index_copy_(-2, idx, F.act(h.index_select(-2, idx), obs.axis))
    return out


# ---------------------------------------------------------------------- pushing: one weight at a time
# A large weight is pushed in slices of at most this many elements (32 MiB in float64), cut along an
# axis no element acts on (the vocabulary of W_E and W_U). Each slice is one job of ``in_parallel``:
# the peak stays near a slice per thread plus the new model, and on many cores no single-threaded
# job is much longer than the others (W_E whole would be a quarter of GPT-2 small's FLOPs).
_SLICE = 2 ** 22


def _weight_ops(smap: SymmetryMap, transform) -> dict[str, list]:
    """Canonical weight key -> the ``(axis, op)`` to apply in order: per-head ops (``{head: [n, n]
    float64 matrix}``, heads on axis 0) first, then whole-axis group elements."""
    per_head: dict[tuple[str, int], dict[int, torch.Tensor]] = {}
    whole: dict[str, list] = {}
    duals = _duals(smap, transform)
    for name, e in transform.elements.items():
        site = smap[name]
        perm = _perm_part(e)
        ops = [(p, e if p.level == "pre" else perm) for p in site.writers]
        ops += [(p, duals[name, p.level]) for p in site.readers]
        for port, F in ops:
            if F is None:  # the permutation part of a (forced) dense map: nothing moves
                continue
            if port.heads is None:
                whole.setdefault(port.name, []).append((port.axis, F))
            else:
                M = F.matrix()
                per_head.setdefault((port.name, port.axis), {}).update({h: M for h in port.heads})
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


def _duals(smap: SymmetryMap, transform) -> dict[tuple[str, str], GroupElement]:
    """F⁻ᵀ for every (site, reader level): readers move by the inverse transpose of the element (or of
    φ of it). The dense, non-orthogonal ones are inverted in one batched call on one thread (see
    ``threads``): 288 separate 64×64 inverses on two threads took 2 s on a busy machine."""
    from ..groups import Dense

    out, batch = {}, []
    for name, e in transform.elements.items():
        for level in {p.level for p in smap[name].readers}:
            F = e.phi() if level == "post" else e
            if isinstance(F, Dense) and not F.orthogonal:
                batch.append(((name, level), F))
            else:
                out[name, level] = F.inverse().transpose()
    for n in {F.n for _, F in batch}:
        same = [(k, F) for k, F in batch if F.n == n]
        with threads(1):
            inv = torch.linalg.inv(torch.stack([F.M.double() for _, F in same]))
        for (k, F), M in zip(same, inv):
            out[k] = Dense(M.T.clone(), F.phi_kind, F.group)
    return out


def _pushed(model: nn.Module, ops: dict[str, list], inplace: bool, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """``model`` (``inplace``) or a fresh copy in ``dtype`` with ``ops`` applied to its weights."""
    dtype = dtype or next(model.parameters()).dtype
    src = _canonical_views(model)
    with torch.no_grad():
        if src is None:  # no views of its own tensors (a Hugging Face bridge): through a dict of weights
            W = read_weights(model)
            out = dict(W)  # the untouched weights as they are: rebuild and write_weights copy them
            for key in ops:
                out[key] = torch.empty_like(W[key])
            in_parallel(*_jobs([(W[k], out[k], ops[k]) for k in ops], {}))
            if inplace:
                write_weights(model, out)
                return model
            return rebuild(model, out, dtype)
        new = model if inplace else _blank(model, dtype)
        dst = src if inplace else _canonical_views(new)
        in_parallel(*_jobs([(t, dst[k], ops.get(k, [])) for k, t in src.items() if ops.get(k) or t is not dst[k]], {}))
    return new


def _jobs(weights: list[tuple[torch.Tensor, torch.Tensor, list]], casts: dict) -> tuple[list, list]:
    """``in_parallel``'s calls and costs: ``dst = ops(src)`` for every ``(src, dst, ops)``, slice by
    slice (see ``_SLICE``), each op in the precision it needs (``casts``: see ``_along``).

    General (GL) maps — per-head dicts, non-orthogonal dense maps — run in float64: computing a
    float32 model's GL maps in float32 put its equivariance error above the float32 tolerance
    (attention-only model, TL 3.9), since a product's rounding, relative to the result, grows with the
    map's condition number. Orthogonal maps and (scaled, signed) permutations of a float32 weight run
    in float32 once the last GL op is done: they are perfectly conditioned, so the result lies within
    a few float32 ulps of the float64 one, far inside the float32 tolerance — and the stream's
    rotation is nearly all the FLOPs. Per-head ops come first in ``ops``, so a weight with both
    (``W_Q``: its head's GL map, then the stream's rotation) drops to float32 after the cheap part.
    Other dtypes stay in float64 throughout; plain permutations never leave the weight's dtype.
    """
    from ..groups import Dense, ScaledPermutation

    def general(F) -> bool:
        return isinstance(F, dict) or (isinstance(F, Dense) and not F.orthogonal)

    calls, costs = [], []
    for src, dst, ops in weights:
        if all(isinstance(F, ScaledPermutation) and F.scale is None for _, F in ops):
            last = -1  # exact in any dtype
        elif src.dtype == torch.float32:
            last = max((i for i, (_, F) in enumerate(ops) if general(F)), default=-1)
        else:
            last = len(ops) - 1
        used = {a % src.ndim for a, F in ops} | {0 for _, F in ops if isinstance(F, dict)}
        free = [a for a in range(src.ndim) if a not in used]
        axis = max(free, key=lambda a: src.shape[a]) if free and src.numel() > _SLICE else None
        step = 1 if axis is None else max(1, _SLICE * src.shape[axis] // src.numel())
        for start in range(0, src.shape[axis] if axis is not None else 1, step):
            x = src if axis is None else src.narrow(axis, start, min(step, src.shape[axis] - start))
            out = dst if axis is None else dst.narrow(axis, start, x.shape[axis])
            calls.append(functools.partial(_push_slice, x, out, ops, last, casts))
            costs.append(x.numel() * (1 + len(ops)))
    return calls, costs


def _push_slice(x: torch.Tensor, out: torch.Tensor, ops: list, last: int, casts: dict) -> None:
    """``out = ops(x)``: ops up to index ``last`` in float64, the rest in ``x``'s dtype."""
    dtype = x.dtype
    for i, (a, F) in enumerate(ops):
        # .double() / .to() keep the strides: the model's own memory order
        x = x.double() if i <= last else x.to(dtype)
        x = _along(x, F, a % x.ndim, out if i == len(ops) - 1 else None, casts)
    if x is not out:
        out.copy_(x)


def _stack(mats: dict[int, torch.Tensor], heads: int, n: int) -> torch.Tensor:
    """[heads, n, n]: ``mats[h]`` for the heads it names, the identity for the others."""
    eye = torch.eye(n, dtype=torch.float64)
    return torch.stack([mats.get(h, eye) for h in range(heads)])


def _along(x: torch.Tensor, F, axis: int, out: Optional[torch.Tensor], casts: dict) -> torch.Tensor:
    """``x`` moved along ``axis`` by ``F``: a group element, or ``{head: [n, n]}`` (heads on axis 0).

    Done on ``x``'s dimensions in memory order (slowest first): a dense map is one GEMM (or one
    batched GEMM) on the weight as it lies in the model whichever canonical axis it acts on, a
    permutation gathers whole rows, and the result lies the same way, down to the final copy. A dense
    map writes straight into ``out`` (the new model's tensor) when it lies in the same order and dtype,
    saving a copy of the weight; otherwise the result is returned and the caller copies it.
    ``casts`` memoises a dense map's matrix per dtype across calls (the stream's 768×768 rotation
    meets some 200 weights and slices).
    """
    from ..groups import Dense

    order = sorted(range(x.ndim), key=lambda d: -x.stride(d))
    xm, back = x.permute(order), [order.index(d) for d in range(x.ndim)]
    if isinstance(F, dict):  # per-head maps: one batched product over the heads on axis 0
        names = "abcdefg"[:x.ndim]
        spec = "".join("y" if d == axis else names[d] for d in order)
        M = _stack(F, x.shape[0], x.shape[axis]).to(x.dtype)
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
