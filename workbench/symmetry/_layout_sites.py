"""The layout backend's maps: sites of transformers read from their canonical weights and config.

The weights are read in the canonical per-head layout (``workbench.models``); ``_layout_push.py``
moves them. Conventions (row vectors, as TransformerLens):

- residual stream x ↦ M x: writers (``W_E``, ``W_pos``, ``W_O``, ``b_O``, ``W_out``, ``b_out``) move
  by M along d_model, readers (``W_Q``, ``W_K``, ``W_V``, ``W_in``, ``W_gate``, ``W_U``) by M⁻ᵀ;
- a head's query/key space: q ↦ A q, k ↦ A⁻ᵀ k, so q·k is unchanged (``W_Q`` writes, ``W_K`` reads);
- a head's value space: v ↦ N v, and ``W_O`` reads it by N⁻ᵀ;
- MLP hidden units: ``W_in`` writes by M, ``W_out`` reads by φ(M)⁻ᵀ; a gated MLP's gate moves by the
  permutation part only, its up branch by the whole P·D;
- heads: one permutation of the head axis of every attention weight.
"""
from __future__ import annotations

import torch
from torch import nn

from .._errors import UnsupportedModelError
from ..groups import get_group
from ..models import ModelKind, canonical_views, hf, model_kind, read_weights, shape_facts
from ._sites import Observation, Port, Site, SymmetryMap

_NORMS = {  # normalisation type -> (group with gains present, group once folded, what folding does)
    None: ("gl", "gl"),
    "LN": ("permutation", "orthogonal_ones"),
    "LNPre": ("orthogonal_ones", "orthogonal_ones"),
    "RMS": ("signed_permutation", "orthogonal"),
    "RMSPre": ("orthogonal", "orthogonal"),
}


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
    if model_kind(model) == ModelKind.HF_BRIDGE and (reason := hf.unsupported(model)):
        return SymmetryMap(name, [], [(name, reason)])
    pos = _cfg(model, "positional_embedding_type", "standard")
    if pos not in ("standard", "rotary"):
        return SymmetryMap(name, [], [(name, f"positional embedding {pos!r} is not supported (standard, rotary are).")])
    W = canonical_views(model) or read_weights(model)  # views: no copy of every weight
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
        raise UnsupportedModelError(f"normalization_type {norm!r} is not supported; supported: {list(_NORMS)}.")
    post_ln = model_kind(model) == ModelKind.HF_BRIDGE and hf.is_post_ln(model)
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
        from ._layout_push import clone

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
            raise UnsupportedModelError(f"rotary embedding at layer {layer} mixes dimension {j} with {partners}: not 2-D "
                                        f"rotations of dimension pairs, so its QK group is not known.")
        if partners and j < partners[0]:
            pairs.append((j, partners[0]))
    return tuple(pairs)
