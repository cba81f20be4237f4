"""The layout backend's maps: sites of transformers read from their canonical weights and config.

The weights are read in the canonical per-head layout (``workbench.models``); ``_layout_push.py``
moves them. Conventions (row vectors, as TransformerLens):

- residual stream x ↦ M x: writers (``W_E``, ``W_pos``, ``W_O``, ``b_O``, ``W_out``, ``b_out``) move
  by M along d_model, readers (``W_Q``, ``W_K``, ``W_V``, ``W_in``, ``W_gate``, ``W_U``) by M⁻ᵀ;
- a head's query/key space: q ↦ A q, k ↦ A⁻ᵀ k, so q·k is unchanged (``W_Q`` writes, ``W_K`` reads);
  under grouped-query attention one A per key/value head, shared by the query heads of its group;
- a head's value space: v ↦ N v, and ``W_O`` reads it by N⁻ᵀ (one N per key/value head);
- MLP hidden units: ``W_in`` writes by M, ``W_out`` reads by φ(M)⁻ᵀ; a gated MLP's gate moves by the
  permutation part only, its up branch by the whole P·D;
- heads (level ``"heads"``): a permutation of the head axis of every attention weight; under
  grouped-query attention a permutation of the key/value groups (each query head moving with its
  group: ``block`` query heads per unit) and, per group, one of its query heads (``heads``: the
  indices it acts on) — together the wreath product S_r ≀ S_kv (docs/DERIVATIONS.md, §10);
- a sparse mixture of experts (Mixtral, OLMoE, Qwen3-MoE, Qwen2-MoE, GPT-OSS): the router reads the stream, each expert is a gated
  MLP with its own hidden units, and the experts permute together with the router's columns (``_layout_moe.py``);
- OPT-350m's word space (``project_in``/``project_out`` around a narrower tied embedding): Q on the
  input side (``W_E`` writes, ``project_in`` reads), Q⁻ᵀ on the output side (level ``"dual"``:
  ``project_out`` writes by Q⁻ᵀ, the tied ``W_U`` reads by Q).

A raw Hugging Face model is observed at its modules' outputs (its hook names): a decoder layer's
output is the stream, a projection's output ``[..., heads·d_head]`` a head space (``block`` = d_head).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .._errors import UnsupportedModelError
from ..groups import get_group
from ..models import ModelKind, canonical_views, hf, model_kind, read_weights, shape_facts
from . import _layout_moe as moe
from . import _layout_pool as pool
from ._lattice import generators, restrict
from ._layout_refused import unsupported
from ._rotary_pairs import layer_pairs
from ._sites import Observation, Port, Site, SymmetryMap

_NORMS = {  # normalisation type -> (group with gains present, group once folded, what folding does)
    None: ("gl", "gl"),
    "LN": ("permutation", "orthogonal_ones"),
    "LNPre": ("orthogonal_ones", "orthogonal_ones"),
    "RMS": ("signed_permutation", "orthogonal"),
    "RMSPre": ("orthogonal", "orthogonal"),
}
# What the LayerNorm groups above leave out (docs/DERIVATIONS.md, Lemma 1 and §10): sampled elements
# keep the listed family; the note says what else is exact.
_LN_MORE = ("the exact group is larger: a global sign s and the shear I + 1·aᵀ (every reader of the stream is a "
            "mean-subtracting norm), i.e. s·{}·(I + 1·aᵀ); those are not sampled here")
# A pre-LN stream whose first state is a LayerNorm's output γ⊙n(e) + β (CLIP's pre_layrnorm, BLOOM's embedding norm):
# a shear h + (h·a)·1 passes its readers but must be made by that norm's parameters, which add (n(e)·(γ⊙a))·1 only
# where γ⊙a ∝ 1 (then 0); a global sign negates the writers of e (n(−e) = −n(e)) or that norm's gain, and its bias.
_EMBED_LN_MORE = ("the exact group is larger: a global sign s, and the shears I + 1·aᵀ with a ∝ 1/γ of the embeddings' "
                  "norm (its bias takes (β·a)·1; with its inputs unmoved no other a can be made by its parameters, and "
                  "with them moved it is not derived); those are not sampled here")
_POST_LN_MORE = ("the exact group is larger: a sign per segment between norms and a shear along each norm's 1/γ "
                 "(docs/DERIVATIONS.md §10, OPT-350m); those are not sampled here")
_HF = (ModelKind.HF, ModelKind.HF_BRIDGE)


def norm_keys(weights: dict) -> list[str]:
    """Gain and bias keys of the LayerNorms on the residual stream (not SoLU's ``mlp.ln``); BERT's
    embedding LayerNorm and its MLM head's (whose space is tied to the stream's) included, and the norms on a block's
    outputs (``ln1_post``, ``ln2_post``: Gemma 2 and 3, OLMo 2), whose outputs join the stream: a gain there passes only what it
    commutes with, as a reader's does (``is_folded``), and moves by the element's permutation. DINOv2's layer scales
    (``ls1``, ``ls2``: λ ⊙ a block's output before the residual add) are such gains without a normalisation: for a
    writer moved by s·P·D, s·P·D·diag(λ) = diag(P·λ)·s·P·D, so λ ↦ P·λ; a dense map passes only where λ is 1."""
    return [k for k in weights if k.rpartition(".")[0].rpartition(".")[2] in ("ln1", "ln2", "ln1_post", "ln2_post", "ls1", "ls2")
            or k.startswith("ln_final.") or k.startswith("embed_ln.")]


def final_norm(model: nn.Module):
    """The kind of the final norm (a key of ``_NORMS``), as the blocks' unless a TransformerLens model's ``final_rms``
    makes it an RMSNorm: with a gain where the model has ``ln_final.w`` (TransformerLens 4's native models give one even
    with no block norms), else without (the blocks' norms have none), or none at all (TransformerLens 3 builds no final
    norm without block norms)."""
    cfg = hf.config(model)
    norm = getattr(cfg, "normalization_type", None)
    if model_kind(model) in _HF or not getattr(cfg, "final_rms", False):
        return norm
    if "ln_final.w" in (canonical_views(model) or read_weights(model)):
        return "RMS"
    return None if norm is None else "RMSPre"


def is_folded(weights: dict, offset: float = 0.0) -> bool:
    """Every residual-stream norm has gain 1 (stored weight ``1 − offset``: Gemma's gain is ``1 + w``):
    its gain lives in the readers. A bias may stay: after normalising, it is a vector in the stream's
    basis and moves with any orthogonal map (R·n + R·b)."""
    return all(bool((weights[k] == 1 - offset).all()) for k in norm_keys(weights) if k.endswith(".w"))


def transformer_map(model: nn.Module) -> SymmetryMap:
    """The sites of a TransformerLens model or a Hugging Face model (see the module docstring)."""
    name = type(model).__name__
    kind = model_kind(model)
    if reason := unsupported(model):
        return SymmetryMap(name, [], [(name, reason)])
    cfg = hf.config(model)
    pos = getattr(cfg, "positional_embedding_type", "standard")
    W = canonical_views(model) or read_weights(model)  # views: no copy of every weight
    f = shape_facts(cfg)
    L, H, K, dh = int(cfg.n_layers), f["n_heads"], f["n_kv"], f["d_head"]
    r = H // K
    see = _RawHooks(model, dh) if kind == ModelKind.HF else _LensHooks(bool(getattr(cfg, "ungroup_grouped_query_attention", False)),
                                                                      _router_name(model))
    sites = [_resid_site(model, cfg, W, L, see)]
    if "project_in.W" in W:
        sites.append(_word_site(W, see))
    skipped = []
    per_layer, unknown = [None] * L, [None] * L  # each layer's rotary pairs, or why its QK spaces are left alone
    if kind not in _HF and any(k.endswith(("attn.q_norm.w", "attn.k_norm.w")) for k in W):
        # TransformerLens 3's use_qk_norm: per head (Qwen3, Gemma 3) or over all heads at once (OLMo 2), chosen by its
        # architecture name, which a lens model's weights do not show; derived for Hugging Face's models (§10, Qwen3)
        unknown = [("norms on the queries and keys (TransformerLens's use_qk_norm): their group is derived for "
                    "Hugging Face's Qwen3, Gemma 3 and OLMo 2 (read those raw or in a TransformerLens 4 bridge); the "
                    "QK spaces are left unchanged")] * L
    elif pos == "rotary":  # measured per kind of layer (SmolLM3's NoPE layers apply none: pairs ())
        for layer, found in enumerate(layer_pairs(model, L)):  # (an error: the QK spaces are left alone there)
            per_layer[layer], unknown[layer] = (None, str(found)) if isinstance(found, Exception) else (found, None)
    # One group per kind of head space, built once and copied per site (a site may be edited on its own):
    # a rotary group checks its pairs on construction, O(d_head²) each time (~1 ms a map at d_head 64).
    qk_groups = {p: get_group("rotary", dh, pairs=p) if p else get_group("gl", dh) for p in set(per_layer)}
    ov_one = get_group("gl", dh)
    qk_norm = kind in _HF and hf.facts(model)["qk_norm"]
    act = hf.facts(model)["act_fn"] if kind in _HF else None  # the MLP's activation, where the layout knows it better
    normed_groups: dict = {}  # (pairs, rigid) -> the group, built once per map (each construction checks its pairs)
    balance_loss = kind in _HF and bool(getattr(hf.hf_model(model).config, "output_router_logits", False))
    for layer in range(L):
        a = f"blocks.{layer}.attn"
        pairs, qk_unknown = per_layer[layer], unknown[layer]
        if qk_norm and pairs == ():  # normed queries and keys with no rotary embedding after them: not derived
            qk_unknown = ("this layer applies no rotary embedding after its q/k norms; that group is not derived here: "
                          "the QK spaces are left unchanged")
        for k in range(K):
            heads = tuple(range(k * r, (k + 1) * r))
            qk_one = qk_groups[pairs]
            if qk_norm and pairs:
                qk_one, rigid_note = _normed_qk_group(W, a, dh, pairs, heads, k, normed_groups)
            qk_group = copy.copy(qk_one)
            notes = [f"query heads {list(heads)} share key head {k}"] if r > 1 else []
            if pairs:
                notes.append(f"rotary pairs {pairs[:2]}… (measured through the attention's hooks)")
            elif pairs == ():
                notes.append("no rotary embedding at this layer (measured through the attention's hooks: NoPE): any "
                             "invertible map")
            if qk_norm and pairs:
                notes.append(rigid_note)
            if qk_unknown:
                skipped.append((f"{a}.qk.{k}", qk_unknown))
            else:
                sites.append(Site(f"{a}.qk.{k}", dh, qk_group, "attention scores", f"{a}.hook_q",
                                  _present([Port(f"{a}.W_Q", "pre", axis=2, heads=heads), Port(f"{a}.b_Q", "pre", axis=1, heads=heads)], W),
                                  _present([Port(f"{a}.W_K", "pre", axis=2, heads=(k,)), Port(f"{a}.b_K", "pre", axis=1, heads=(k,))], W),
                                  [], see.qk(layer, heads, k), notes))
            sites.append(Site(f"{a}.ov.{k}", dh, copy.copy(ov_one), "linear (value → output)", f"{a}.hook_v",
                              _present([Port(f"{a}.W_V", "pre", axis=2, heads=(k,)), Port(f"{a}.b_V", "pre", axis=1, heads=(k,))], W),
                              _present([Port(f"{a}.W_O", "post", axis=1, heads=heads)], W), [],
                              see.ov(layer, heads, k), list(notes[:1])))
        if pos == "alibi":  # a bias m_h·(j − i) on head h's scores: no channel moves it (QK stays GL), but each head has
            # its own slope m_h, so permuting heads moves the biases (docs/DERIVATIONS.md §10, BLOOM)
            skipped.append((f"{a}.heads", "ALiBi gives each head its own slope: permuting heads would move the position "
                                          "biases, so heads are not permuted"))
        else:
            sites += _head_sites(a, H, K, W, see, skipped)
        if moe.is_moe(W, layer):  # a sparse mixture of experts (a dense layer among them is read below)
            sites += moe.sites(W, layer, act or str(getattr(cfg, "act_fn", "silu")), see, order=not balance_loss)
            if balance_loss:  # the model returns a loss coupling expert e of every layer: no per-layer order holds
                skipped.append((f"blocks.{layer}.mlp.experts", moe.BALANCE_LOSS))
        elif not getattr(cfg, "attn_only", False):
            mlp = _mlp_site(cfg, W, layer, see, act, hooked=kind == ModelKind.HOOKED)
            if isinstance(mlp, str):  # an activation whose group is not derived: these hidden units stay as they are
                skipped.append((f"blocks.{layer}.mlp", mlp))
            else:
                sites.append(mlp)
    if pool.is_pooled(W):  # SigLIP's attention-pooling head (a raw model: its layout has the head's path)
        sites += pool.sites(W, H, dh, act or str(getattr(cfg, "act_fn", "gelu")), hf.layout(model).paths["pool"])
    if kind != ModelKind.HF:  # a raw model's observations are its own module paths, from the layout
        names = _known(model)
        for site in sites:  # hook points differ between versions (a bridge's SoLU has no hook_mid)
            site.observed = [o for o in site.observed if o.name in names]
    else:  # where a raw model shows a site: its first module output (a TransformerLens hook name it has not)
        for site in sites:
            if site.observed:
                site.hook_name = site.observed[0].name
    return SymmetryMap(name, sites, skipped)


def _router_name(model: nn.Module) -> str:
    """A bridge's name for a mixture of experts' router, its adapter's: GPT-OSS's ``router``, else ``gate`` (Mixtral)."""
    if model_kind(model) != ModelKind.HF_BRIDGE:
        return "gate"
    blocks = hf.adapter(model).component_mapping.get("blocks")
    mlp = (getattr(blocks, "submodules", None) or {}).get("mlp")
    return "router" if "router" in (getattr(mlp, "submodules", None) or {}) else "gate"


def _normed_qk_group(W: dict, a: str, dh: int, pairs: tuple, heads: tuple, k: int, built: dict):
    """The QK group of key head ``k`` and its query ``heads`` where q and k are normalised before the rotary embedding
    (Qwen3 and Gemma 3: an RMSNorm per head with one gain for every head; OLMo 2: one RMSNorm over every head's values,
    a gain per head), and a note on it: a rotation on each pair whose gains are equal in every norm slice the site's
    element meets (each query head's and the key head's), ±I on the others (docs/DERIVATIONS.md §10, Qwen3). The
    norms' gains stay as they are; their own symmetries (a scale per pair, q's gain times it and k's divided, shared
    by every head a gain serves) are not sampled. ``built``: the map's groups so far, by (pairs, rigid pairs)."""
    gq, gk = W[f"{a}.q_norm.w"], W[f"{a}.k_norm.w"]
    slices = ([gq] if gq.ndim == 1 else [gq[h] for h in heads]) + ([gk] if gk.ndim == 1 else [gk[k]])
    rigid = tuple(p for p in pairs if not all(bool(g[p[0]] == g[p[1]]) for g in slices))
    if (pairs, rigid) not in built:
        built[pairs, rigid] = get_group("rotary_orthogonal", dh, pairs=pairs, rigid=rigid)
    width = "per head" if gq.ndim == 1 else "over every head at once"
    note = (f"q/k RMSNorm {width}: orthogonal maps only; {len(pairs) - len(rigid)} of {len(pairs)} rotary pairs rotate "
            f"(equal gains), {len(rigid)} only ±I (their q or k norm gains differ); the gains' own scalings are not sampled")
    return built[pairs, rigid], note


def _known(model: nn.Module) -> set:
    from ..hooks import hook_names

    names = hook_names(model)
    return set(names) | set(names.aliases)


def _head_sites(a: str, H: int, K: int, W: dict, see, skipped: list) -> list[Site]:
    """Permutations of heads: all heads together, or under grouped-query attention the key/value groups
    (query heads moving with their group) and the query heads within each group."""
    r = H // K
    # one q/k norm over every head's values (OLMo 2) has a gain per head, [heads, d_head]: it moves with its head
    # (a per-head norm's one gain, Qwen3's, serves every head and stays)
    q_norm, k_norm = (("q_norm.w",), ("k_norm.w",)) if W.get(f"{a}.q_norm.w", torch.empty(0)).ndim == 2 else ((), ())
    # attention sinks (GPT-OSS's, raw or TransformerLens 3's): a learned logit per query head, [heads], joining its softmax
    q_norm += ("sinks",) if f"{a}.sinks" in W else ()
    kv = ("W_K", "b_K", "W_V", "b_V", *k_norm)
    sites = []
    if K > 1:
        ports = [Port(f"{a}.{p}", "heads", axis=0, block=1 if p in kv else r)
                 for p in ("W_Q", "b_Q", *q_norm, *kv, "W_O")]
        label = "attention heads" if r == 1 else f"key/value head groups (each with its {r} query heads)"
        sites.append(Site(f"{a}.heads", K, get_group("permutation", K), label, f"{a}.hook_z", _present(ports, W), [], [],
                          see.heads(a, None, r)))
    elif r > 1:
        skipped.append((f"{a}.heads", "one key/value head (multi-query attention): its query heads are permuted "
                                      f"within the group, at {a}.heads.0"))
    if r > 1:
        for k in range(K):
            heads = tuple(range(k * r, (k + 1) * r))
            ports = [Port(f"{a}.{p}", "heads", axis=0, heads=heads) for p in ("W_Q", "b_Q", *q_norm, "W_O")]
            sites.append(Site(f"{a}.heads.{k}", r, get_group("permutation", r), f"query heads sharing key/value head {k}",
                              f"{a}.hook_z", _present(ports, W), [], [], see.heads(a, heads, 1)))
    return sites


def _resid_site(model, cfg, W: dict, L: int, see) -> Site:
    norm = getattr(cfg, "normalization_type", None)
    word = "project_in.W" in W  # OPT-350m: the embedding writes the word space, project_in the stream
    if norm not in _NORMS:
        raise UnsupportedModelError(f"normalization_type {norm!r} is not supported; supported: {list(_NORMS)}.")
    post_ln = hf.is_post_ln(model)
    offset = hf.gain_offset(model)
    folded = is_folded(W, offset) and not post_ln
    group = get_group("permutation" if post_ln else _NORMS[norm][folded], int(cfg.d_model))
    best = get_group(_NORMS[norm][1], int(cfg.d_model))  # with every gain 1
    final = final_norm(model)
    # Norms on the stream of another kind than the blocks': each passes only its own group (an RMSNorm no shear, a
    # LayerNorm no sign flip of one coordinate), so the stream takes what all of them pass
    others = ([final] if final != norm and final is not None else []) + (["LN"] if "embed_ln.w" in W else [])
    for other in others:
        group = restrict(group, generators(get_group(_NORMS[other][folded], group.n)))
        best = restrict(best, generators(get_group(_NORMS[other][1], group.n)))
    # (a TransformerLens model never ties W_U to W_E, whatever its config's tie_word_embeddings says: wb.untie_embeddings)
    tied = (model_kind(model) in _HF and bool(getattr(cfg, "tie_word_embeddings", False)) and "embed.W_E" in W
            and "project_in.W" not in W)
    notes = []
    if post_ln:
        notes.append("post-LayerNorm: every norm sits on the stream itself, so no folding can enlarge this group")
        if "mlm.W" in W:
            notes.append("the MLM head's hidden space takes the same permutation (its decoder is the tied embedding); "
                         "beyond P, a post-LN stream with such a head is not derived")
        else:
            notes.append(_POST_LN_MORE)
    elif best.name != group.name and "embed_ln.w" in W:  # a pre-LN stream whose first state is a norm's output
        # (CLIP's pre_layrnorm, BLOOM's word_embeddings_layernorm, TransformerLens 3's post_embedding_ln): no reader takes
        # its gain (docs/DERIVATIONS.md §10, CLIP)
        notes.append(f"the embeddings' norm (CLIP's pre_layrnorm, BLOOM's word_embeddings_layernorm) sits on the stream: "
                     f"its gain cannot be folded, so the stream takes {best.name} only where that gain is 1 and the "
                     f"other norms are folded")
    elif best.name != group.name:
        notes.append(f"wb.fold_layernorm(model) would enlarge this to {best.name}")
    if final != norm:
        notes.append(f"the final norm is {final or 'absent'} (final_rms), the blocks' {norm}: the stream takes what both pass")
    if norm in ("LN", "LNPre") and not post_ln and "embed_ln.w" in W:
        notes.append(_EMBED_LN_MORE)
    elif norm in ("LN", "LNPre") and final == norm and not post_ln:
        if tied and group.name == "permutation":
            notes.append("tied embeddings: the exact group is s·P (a global sign passes the final norm); the sign is "
                         "not sampled here")
        elif not tied:
            notes.append(_LN_MORE.format("P" if group.name == "permutation" else "R"))
    if offset:
        notes.append(f"norm gains are {offset:g} + w (Gemma, Nemotron); folded means w = {1 - offset:g}")
    writers = [] if word else [Port("embed.W_E", "pre", axis=1)]
    writers += [Port(k, "pre", axis=1) for k in ("pos_embed.W_pos", "token_type_embed.W_TT", "mlm.W", "project_in.W", "cls_token.W",
                                                 "dist_token.W", "mask_token.W", "reg_tokens.W")]
    # mlm.b; a ViT's patch projection (a Conv2d, [d_model, channels, p, p]: the stream is its output channel) and its bias
    writers += [Port(k, "pre", axis=0) for k in ("mlm.b", "patch_embed.W", "patch_embed.b")]
    # a classifier's score reads the stream, or where project_out maps it to the word space (OPT-350m) that space
    readers = [Port(k, "post", axis=0) for k in ("mlm.W", "project_out.W", "pooler.W") + (() if word else ("score.W",))]
    # SigLIP's attention-pooling head reads the final norm's output (every token) by its keys and values
    readers += [Port(f"pool.attn.{m}", "post", axis=1) for m in ("W_K", "W_V")]
    for layer in range(L):
        b = f"blocks.{layer}"
        writers += [Port(f"{b}.attn.W_O", "pre", axis=2), Port(f"{b}.attn.b_O", "pre", axis=0)]
        readers += [Port(f"{b}.attn.{m}", "post", axis=1) for m in ("W_Q", "W_K", "W_V")]
        if f"{b}.mlp.W_out" in W:
            writers += [Port(f"{b}.mlp.W_out", "pre", axis=1), Port(f"{b}.mlp.b_out", "pre", axis=0)]
            readers += [Port(f"{b}.mlp.{m}", "post", axis=0) for m in ("W_in", "W_gate") if f"{b}.mlp.{m}" in W]
        elif moe.is_moe(W, layer):
            writes, reads = moe.stream_ports(W, layer)
            writers, readers = writers + writes, readers + reads
    if not word:  # (DINOv2's classifier reads the class token by unembed, the patch tokens' mean by unembed_patches)
        readers += [Port(k, "post", axis=0) for k in ("unembed.W_U", "unembed_patches.W_U")]
    label = {None: "no normalisation", "LN": "post-LayerNorm" if post_ln else "LayerNorm", "LNPre": "LayerNorm (no gain)", "RMS": "RMSNorm",
             "RMSPre": "RMSNorm (no gain)"}[norm]
    return Site("resid", group.n, group, label + (" (folded)" if folded and norm in ("LN", "RMS") else ""),
                "blocks.0.hook_resid_pre", _present(writers, W), _present(readers, W),
                [(k, "perm" if k.endswith(".w") else "pre") for k in norm_keys(W)], see.resid(L), notes)


def _word_site(W: dict, see) -> Site:
    """OPT-350m's tied word-embedding space behind ``project_in``/``project_out``: any Q on the input side
    and Q⁻ᵀ on the output side (the tie E·Qᵀ = W_U ↦ Q·W_U forces it; docs/DERIVATIONS.md §10)."""
    n = W["project_in.W"].shape[0]
    return Site("word", n, get_group("gl", n), "linear (tied word embedding ↔ project_in / project_out)", "embed.hook_out",
                _present([Port("embed.W_E", "pre", axis=1), Port("project_out.W", "dual", axis=1)], W),
                _present([Port("project_in.W", "pre", axis=0), Port("unembed.W_U", "dual", axis=0),
                          Port("score.W", "dual", axis=0)], W), [],  # a sequence classifier's score reads project_out's output
                see.word(), ["the output side moves by Q⁻ᵀ: the tied unembedding (or a classifier's score) reads it by Q"])


def _present(ports: list[Port], W: dict) -> list[Port]:
    return [p for p in ports if p.name in W]


def _mlp_site(cfg, W: dict, layer: int, see, act=None, hooked: bool = False):
    """The MLP's hidden units as a site; or, where the model's activation is not in the catalogue (Hugging Face's
    ``gelu_10``, ``laplace``, ``sqrtsoftplus``…), why they are left alone. ``act``: the activation where the layout
    knows it better than the configuration (``_hf._ACTIVATIONS``). ``hooked``: a TransformerLens 3 HookedTransformer."""
    from .._errors import InvalidOptionError
    from ..groups import intertwiner_group

    m = f"blocks.{layer}.mlp"
    act = act or str(getattr(cfg, "act_fn", "gelu"))
    n = W[f"{m}.W_in"].shape[1]
    gated = f"{m}.W_gate" in W
    if gated and hooked and act.endswith("_ln"):  # TransformerLens 3's gated MLP with SoLU's LayerNorm (LayerNormPre
        # under other block norms) runs LN(solu(x·W_gate))·W_out and never reads W_in or b_in: SoLU's site on the gate
        # (W_in and b_in move alike, unread); no hook_pre_linear fires. (4's gated MLP bridge has no such norm.)
        group, label = get_group("permutation", n), f"{act} on the gate (W_in unread)"
        writers = [Port(f"{m}.W_gate", "pre", axis=1), Port(f"{m}.W_in", "pre", axis=1), Port(f"{m}.b_in", "pre", axis=0)]
        return Site(m, n, group, label, f"{m}.hook_post", _present(writers, W), _present([Port(f"{m}.W_out", "post", axis=0)], W),
                    [(k, "perm") for k in (f"{m}.ln.w", f"{m}.ln.b") if k in W], see.mlp(m, False, True))
    if gated:  # act(gate) ⊙ up: permute both, any nonzero diagonal on the up branch
        group, label = get_group("diagonal_permutation", n), f"gated {act}"
    elif act.startswith("solu"):
        group, label = get_group("permutation", n), act  # x·softmax(x) is only permutation-equivariant
    else:
        try:
            group, label = intertwiner_group(act, n), act
        except InvalidOptionError:  # the model's configuration names it, not the user: no "did you mean"
            return (f"the MLP activation {act!r} (the model's configuration) is not in the catalogue of activations whose "
                    f"intertwiner group is derived (wb.groups.CATALOGUE), so these hidden units are left unchanged; "
                    f"every other site still holds.")
    writers = [Port(f"{m}.W_in", "pre", axis=1), Port(f"{m}.b_in", "pre", axis=0)]
    if gated:
        writers += [Port(f"{m}.W_gate", "perm", axis=1), Port(f"{m}.b_gate", "perm", axis=0)]
    return Site(m, n, group, label, f"{m}.hook_post", _present(writers, W), _present([Port(f"{m}.W_out", "post", axis=0)], W),
                [(k, "perm") for k in (f"{m}.ln.w", f"{m}.ln.b") if k in W], see.mlp(m, gated, f"{m}.ln.w" in W))


# ---------------------------------------------------------------------- where each site is observed
class _LensHooks:
    """TransformerLens hook names (HookedTransformer and bridges). ``ungrouped``: TransformerLens 3's
    ungroup_grouped_query_attention, whose hook_k and hook_v show each key/value head once per query head of its group
    (``repeat_interleave``), so they are observed at those query heads."""

    def __init__(self, ungrouped: bool = False, router: str = "gate"):
        self.ungrouped, self.router_name = ungrouped, router

    def resid(self, L):
        return [Observation(f"blocks.{layer}.hook_resid_pre", 0, "pre") for layer in range(L)] + \
               [Observation(f"blocks.{L - 1}.hook_resid_post", 0, "pre")]

    def qk(self, layer, heads, k):
        a = f"blocks.{layer}.attn"
        return [Observation(f"{a}.hook_q", 0, "pre", axis=-1, heads=heads),
                Observation(f"{a}.hook_k", 0, "dual", axis=-1, heads=heads if self.ungrouped else (k,))]

    def ov(self, layer, heads, k):
        a = f"blocks.{layer}.attn"
        return [Observation(f"{a}.hook_v", 0, "pre", axis=-1, heads=heads if self.ungrouped else (k,)),
                Observation(f"{a}.hook_z", 0, "pre", axis=-1, heads=heads)]

    def heads(self, a, heads, r):
        """``heads`` given: a permutation within those query heads; else of groups of ``r`` query heads
        (one key/value head each)."""
        qs = [Observation(f"{a}.{h}", 0, "heads", axis=-2, block=r if heads is None else 1, heads=heads)
              for h in ("hook_q", "hook_z")] + \
             [Observation(f"{a}.hook_pattern", 0, "heads", axis=1, block=r if heads is None else 1, heads=heads)]
        kv = [Observation(f"{a}.{h}", 0, "heads", axis=-2, block=r if self.ungrouped else 1) for h in ("hook_k", "hook_v")
              ] if heads is None else []  # (within a group its query heads share one key and value: those do not move)
        return qs + kv

    def mlp(self, m, gated, solu):
        obs = [Observation(f"{m}.hook_pre", 0, "perm" if gated else "pre"), Observation(f"{m}.hook_post", 0, "post")]
        if gated:
            obs.append(Observation(f"{m}.hook_pre_linear", 0, "pre"))
        if solu:
            obs.append(Observation(f"{m}.hook_mid", 0, "perm"))
        return obs

    def router(self, m):  # a mixture of experts' router logits [tokens, experts]: the experts' order moves them
        return [Observation(f"{m}.{self.router_name}.hook_out", 0, "heads", axis=-1)]

    def shared(self, m):  # Qwen2-MoE's shared expert, a gated MLP bridge
        return self.mlp(f"{m}.shared_expert", True, False)

    def word(self):
        return [Observation(n, 0, "pre") for n in ("hook_embed", "embed.hook_out")] + \
               [Observation("project_out.hook_out", 0, "dual")]


class _RawHooks:
    """A raw Hugging Face model's module outputs (its only hook names): a decoder layer's output is the
    stream, a q/k/v projection's output ``[..., heads·d_head]`` a head space and the head axis (not
    for fused q/k/v), the MLP's input projections its hidden units before the activation. The
    activation's output is not observed (verify checks the outputs there)."""

    def __init__(self, model, dh):
        self.paths, self.dh = hf.layout(model).paths, dh
        self.kv = shape_facts(hf.config(model))["n_kv"]

    def _at(self, key, level, **kw):
        path = self.paths.get(key)
        return [] if path is None else [Observation(path, 0, level, **kw)]

    def resid(self, L):
        return [o for layer in range(L) for o in self._at(f"blocks.{layer}", "pre")]

    def qk(self, layer, heads, k):
        a = f"blocks.{layer}.attn"
        return self._at(f"{a}.q", "pre", heads=heads, block=self.dh) + self._at(f"{a}.k", "dual", heads=(k,), block=self.dh)

    def ov(self, layer, heads, k):
        return self._at(f"blocks.{layer}.attn.v", "pre", heads=(k,), block=self.dh)

    def heads(self, a, heads, r):
        """On ``[..., heads·d_head]``: units of ``r·d_head`` features (groups), or d_head (heads)."""
        if heads is not None:
            return self._at(f"{a}.q", "heads", axis=-1, block=self.dh, heads=heads)
        return self._at(f"{a}.q", "heads", axis=-1, block=r * self.dh) + \
            [o for p in "kv" for o in self._at(f"{a}.{p}", "heads", axis=-1, block=self.dh)]

    def mlp(self, m, gated, solu):
        return self._at(f"{m}.in", "pre") + (self._at(f"{m}.gate", "perm") if gated else [])

    def router(self, m):  # the router's first output, its logits [tokens, experts]
        return self._at(f"{m}.router", "heads", axis=-1)

    def shared(self, m):  # Qwen2-MoE's shared expert's up and gate projections
        return self.mlp(f"{m}.shared", True, False)

    def word(self):
        return self._at("embed", "pre") + self._at("project_out", "dual")
