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

from typing import Optional

import torch
from torch import nn

from ..groups import GroupElement, get_group
from ..hooks._tl import read_weights, rebuild, shape_facts, tl_kind, write_weights
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
    """Gain and bias keys of the LayerNorms on the residual stream (not SoLU's ``mlp.ln``)."""
    return [k for k in weights if k.rpartition(".")[0].rpartition(".")[2] in ("ln1", "ln2") or k.startswith("ln_final.")]


def is_folded(weights: dict) -> bool:
    """Every residual-stream norm has gain 1 and bias 0 (its affine part lives in the readers)."""
    for k in norm_keys(weights):
        target = 1.0 if k.endswith(".w") else 0.0
        if not torch.equal(weights[k], torch.full_like(weights[k], target)):
            return False
    return True


def transformer_map(model: nn.Module) -> SymmetryMap:
    """The sites of a TransformerLens model (see the module docstring for how each moves)."""
    name = type(model).__name__
    kind = tl_kind(model)
    if kind == "hf":
        arch = type(model.original_model).__name__
        return SymmetryMap(name, [], [(name, f"a bridge around Hugging Face {arch}: its weight layout is not mapped "
                                             f"yet (the bridge keeps split and joint copies of some weights), so nothing "
                                             f"is transformed; native bridges and HookedTransformer are supported.")])
    pos = _cfg(model, "positional_embedding_type", "standard")
    if pos not in ("standard", "rotary"):
        return SymmetryMap(name, [], [(name, f"positional embedding {pos!r} is not supported (standard, rotary are).")])
    W = read_weights(model)
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
    folded = is_folded(W)
    group = get_group(_NORMS[norm][folded], int(model.cfg.d_model))
    notes = []
    if _NORMS[norm][1] != group.name:
        notes.append(f"wb.fold_layernorm(model) would enlarge this to {_NORMS[norm][1]}")
    writers = [Port("embed.W_E", "pre", axis=1)] + ([Port("pos_embed.W_pos", "pre", axis=1)] if "pos_embed.W_pos" in W else [])
    readers = []
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
    label = {None: "no normalisation", "LN": "LayerNorm", "LNPre": "LayerNorm (no gain)", "RMS": "RMSNorm",
             "RMSPre": "RMSNorm (no gain)"}[norm]
    return Site("resid", group.n, group, label + (" (folded)" if folded and norm in ("LN", "RMS") else ""),
                "blocks.0.hook_resid_pre", _present(writers, W), _present(readers, W),
                [(k, "perm") for k in norm_keys(W)], observed, notes)


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
    """
    # In float64 whatever the model's dtype: computing a float32 model's dense (GL) maps in float32
    # put its equivariance error above the float32 tolerance (attention-only model, TL 3.9).
    W = {k: v.double() for k, v in read_weights(model).items()}
    per_head: dict[tuple[str, int], dict[int, torch.Tensor]] = {}
    whole = []
    for name, e in transform.elements.items():
        site = smap[name]
        perm = _perm_part(e)
        ops = [(p, e if p.level == "pre" else perm) for p in site.writers]
        ops += [(p, (e.phi() if p.level == "post" else e).inverse().transpose()) for p in site.readers]
        for port, F in ops:
            if port.heads is None:
                whole.append((port.name, F, port.axis))
            else:
                M = F.matrix()
                per_head.setdefault((port.name, port.axis), {}).update({h: M for h in port.heads})
        if perm is not None:  # norm gains and biases follow the permutation (signs pass RMSNorm)
            whole += [(key, perm, 0) for key, _ in site.norms]
    with torch.no_grad():
        for (key, axis), mats in per_head.items():
            t = W[key].movedim(axis, -1)  # [head, ..., n]
            Ms = torch.eye(t.shape[-1], dtype=t.dtype).repeat(t.shape[0], 1, 1)
            for h, M in mats.items():
                Ms[h] = M.to(t.dtype)
            W[key] = torch.einsum("h...j,hij->h...i", t, Ms).movedim(-1, axis)
        for key, F, axis in whole:
            W[key] = F.act(W[key], axis)
    if inplace:
        write_weights(model, W)
        return model
    return rebuild(model, W)


def clone(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """An independent copy (rebuilt, sharing no state with ``model``), optionally cast to ``dtype``."""
    return rebuild(model, read_weights(model), dtype)  # rebuild copies into fresh parameters


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
