"""The dimension pairs a transformer's rotary embedding turns together, measured through its hooks (never assumed
from a layout: adjacent pairs, halves, a partial rotary dimension, a norm on q and k before the rotation), and checked:
a map commuting with rotations of those pairs must leave every attention pattern as it was. The layout backend's QK
sites (``_layout_sites.transformer_map``) take the rotary groups on these pairs."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._errors import UnsupportedModelError
from ..groups import get_group
from ..models import ModelKind, hf, hf_build, model_kind

_HF = (ModelKind.HF, ModelKind.HF_BRIDGE)

# Measured pairs per (class, config): they depend on the configuration only (the measurement replaces
# q and k), and measuring runs a float64 copy of the model.
_PAIRS: dict = {}


def rotary_pairs(model: nn.Module, layer: int = 0) -> tuple[tuple[int, int], ...]:
    """The dimension pairs that rotary embeddings rotate together, measured through the hooks.

    Example i writes e_i into ``hook_q`` at every position; key position m carries e_j for one j per
    position. The attention score of the last query on key m is e_iᵀ R(m − last) e_j: nonzero only
    when i = j or i is j's rotary partner. Dimensions without a partner are not rotated. Nothing is
    assumed about the layout (adjacent pairs, halves, or a partial rotary dimension). A raw Hugging
    Face model is measured through a bridge around a float64 copy of it.
    """
    key = _pairs_key(model, layer)
    if key is not None and key in _PAIRS:
        return _PAIRS[key]
    pairs = _measure_pairs(model, layer)
    if key is not None:
        _PAIRS[key] = pairs
    return pairs


def layer_pairs(model: nn.Module, n_layers: int) -> list:
    """Per layer, its measured rotary pairs (``()`` where the layer applies no rotary embedding: SmolLM3's NoPE layers),
    or the :class:`UnsupportedModelError` saying why they are not known there. Layers differ where the class builds
    their attention modules with different settings (SmolLM3's ``use_rope``; OLMo 3's and Gemma 3's ``attention_type``
    or sliding window, each type with its own rotary parameters): each kind of layer is measured at its first layer,
    and every layer of a kind takes that layer's pairs. A TransformerLens model's layers are all measured at layer 0."""
    kinds: dict = {}
    for layer in range(n_layers):
        kinds.setdefault(_layer_kind(model, layer), layer)
    found: dict = {}
    out = []
    for layer in range(n_layers):
        first = kinds[_layer_kind(model, layer)]
        if first not in found:
            try:
                found[first] = rotary_pairs(model, first)
            except UnsupportedModelError as exc:
                found[first] = exc
        out.append(found[first])
    return out


def _layer_kind(model: nn.Module, layer: int):
    """What a layer's rotary embedding can depend on: for a Hugging Face model, the settings its class takes from the
    configuration for that layer's attention module (all but its index), read from ``type(model)(config)``."""
    if model_kind(model) not in _HF:
        return None
    lay = hf.layout(model)
    path = lay.paths.get(f"blocks.{layer}.attn")
    return repr(sorted((k, v) for k, v in lay.settings.get(path, {}).items() if k != "layer_idx"))


def _pairs_key(model: nn.Module, layer: int):
    kind = model_kind(model)
    if kind in _HF:
        return ("hf",) + hf.config_key(model) + (layer,)
    cfg = {k: v for k, v in vars(model.cfg).items() if not k.startswith("_") and isinstance(v, (int, float, str, bool, type(None)))}
    return kind.value, repr(sorted(cfg.items())), layer


def _measure_pairs(model: nn.Module, layer: int) -> tuple[tuple[int, int], ...]:
    from ._layout_push import clone

    kind = model_kind(model)
    # Norms on q and k (Qwen3, Gemma 3, OLMo 2) sit between hook_q and the rotary embedding: the rotation is measured
    # after them, at hook_q_normed (see per_head for the layouts a bridge shows there). (A bridge
    # declares hook_q_normed wherever its adapter maps an optional q norm, StableLM's too: the layout says whether the
    # model has one.)
    normed = kind in _HF and hf.facts(model)["qk_norm"]
    if kind in _HF:
        rd = _hf_rotary_dim(hf.hf_model(model))
        if rd is not None and rd % 2:
            raise UnsupportedModelError(
                f"the rotary dimension is {rd}, an odd number: Hugging Face's rotary embedding then modulates the "
                f"unpaired dimension by absolute position (not a rotation of pairs), so the query/key group is not "
                f"known: the QK spaces are left unchanged.")
    # Always a float64 copy (small angles of slow frequencies need the precision), never the user's model even
    # when it is float64 already: hooks the user left on it (permanent ones, or on a HookPoint between hook_q
    # and hook_pattern) would run inside the measurement and could change what is read, and the pairs are
    # then kept for every model of this configuration (tests/test_rotary_measure.py).
    if kind == ModelKind.HF:
        try:
            fresh = hf.hf_model(clone(model, torch.float64))
            model = hf_build.scratch_bridge(model, hf_build.with_head(fresh))
        except Exception as exc:  # TransformerLens's boot of this configuration (an assert, a missing attribute)
            raise UnsupportedModelError(
                f"the rotary pairs are measured through a TransformerLens bridge, and TransformerLens could not boot "
                f"one around this configuration ({type(exc).__name__}: {str(exc)[:160] or 'no message'}): the QK "
                f"spaces are left unchanged.") from exc
    else:
        model = clone(model, torch.float64)
    dh, T = int(model.cfg.d_head), int(model.cfg.n_ctx)
    T = min(T, dh + 1)  # one query position plus at most one key position per dimension
    a = f"blocks.{layer}.attn"
    device = next(model.parameters()).device
    tokens = torch.zeros(dh, T, dtype=torch.long, device=device)
    hooks = (f"{a}.hook_q_normed", f"{a}.hook_k_normed") if normed else (f"{a}.hook_q", f"{a}.hook_k")

    def per_head(fn):
        """A hook writing ``fn(t, at)``, ``t`` the hook's value as [..., d_head] with its position axis ``at``: hook_q
        [batch, pos, head, d_head]; after a per-head norm [batch, head, pos, d_head]; after one norm over every head
        (OLMo 2) [batch, pos, heads·d_head], seen per head — told apart by their rank, not their width: under multi-query
        attention one key head's [batch, pos, 1·d_head] is d_head wide, and read as [batch, head, pos, d_head] its keys
        went to the wrong positions, which a sliding window's keys showed (an OLMo 3 with one key/value head)."""
        def hook(t, name):
            if t.ndim == 4:
                return fn(t, 2 if normed else 1)
            return fn(t.unflatten(-1, (-1, dh)), 1).flatten(-2)
        return hook

    @per_head
    def queries(q, at):  # example i carries e_i at every position and head
        return torch.eye(dh, dtype=q.dtype, device=q.device)[:, None, None, :].expand(q.shape).clone()

    def pattern(keys):  # the last query, head 0: [example, key]
        return _patterns(model, a, tokens, queries, keys, hooks)[:, 0, T - 1, :]

    # The keys the last query sees (a sliding window may hide the oldest): with every key zero, the
    # pattern is uniform over them.
    seen = [m for m in torch.nonzero(pattern(lambda k, name: torch.zeros_like(k))[0] > 0).flatten().tolist() if m != T - 1]
    if not seen:
        raise UnsupportedModelError(f"the last query at layer {layer} attends to no earlier position, so its rotary "
                                    f"pairs cannot be measured.")
    touches = torch.zeros(dh, dh, dtype=torch.float64)
    for start in range(0, dh, len(seen)):
        js = list(range(start, min(start + len(seen), dh)))

        def keys(k, at, js=js):  # key position seen[m] carries e_{js[m]}; the others (the last too) zero
            new = torch.zeros_like(k)
            for m, j in enumerate(js):
                new.select(at, seen[m])[..., j] = 1
            return new

        # The pattern is softmax(scores); the last key is zero, so log p_m − log p_last is score m.
        logp = pattern(per_head(keys)).log()
        touches[:, js] = (logp[:, seen[:len(js)]] - logp[:, T - 1:T]).abs()
    touches = touches > 1e-9 * touches.max()
    pairs = []
    for j in range(dh):
        partners = [i for i in torch.nonzero(touches[:, j]).flatten().tolist() if i != j]
        if len(partners) > 1:
            raise UnsupportedModelError(f"rotary embedding at layer {layer} mixes dimension {j} with {partners}: not 2-D "
                                        f"rotations of dimension pairs, so its QK group is not known.")
        if partners and j < partners[0]:
            pairs.append((j, partners[0]))
    pairs = tuple(pairs)
    # The pairing says which dimensions touch; that each pair turns by a rotation and that the other
    # dimensions do not depend on position is checked, not assumed: a random map commuting with such
    # rotations, applied to random queries (and its inverse transpose to the keys), must leave every
    # attention pattern as it was. (Phi with a rotary dimension of 1 pairs nothing yet modulates that
    # dimension by position: granting GL there changed its log-probabilities by 0.4.)
    M = get_group("rotary", dh, pairs=pairs).sample(seed=0).matrix(torch.float64).to(device)
    dual = torch.linalg.inv(M).T

    def random(seed, x):
        return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(x)

    plain = _patterns(model, a, tokens, lambda q, name: random(1, q), lambda k, name: random(2, k), hooks)
    moved = _patterns(model, a, tokens, per_head(lambda q, at: random(1, q) @ M.to(q)),
                      per_head(lambda k, at: random(2, k) @ dual.to(k)), hooks)
    change = (moved - plain).abs().max().item()
    # What the attention's own arithmetic moves the pattern by: q·c and k/c leave every score as it is, so any change
    # is rounding (GPT-J's and GPT-Neo's eager attention compute q·kᵀ in float32 even in a float64 model: ~1e-7).
    # A map that is no symmetry moves a pattern by 1e-1 or more (a wrong pairing: 0.17-0.81), far above 10³× that.
    c = 1.3
    scaled = _patterns(model, a, tokens, lambda q, name: random(1, q) * c, lambda k, name: random(2, k) / c, hooks)
    if change > max(1e-9, 1e3 * (scaled - plain).abs().max().item()):
        raise UnsupportedModelError(
            f"the positional embedding at layer {layer} is not 2-D rotations of dimension pairs (measured pairs "
            f"{pairs[:3]}{'…' if len(pairs) > 3 else ''} of {dh} dimensions; a map commuting with rotations of those "
            f"pairs changes the attention pattern by {change:.1e}), so the query/key group is not known: the QK "
            f"spaces are left unchanged.")
    return pairs


def _hf_rotary_dim(model: nn.Module) -> Optional[int]:
    """How many dimensions of a head Hugging Face's rotary embedding rotates: ``int(head_dim ·
    partial_rotary_factor)``, as its rope initialisation computes it (None when the config says nothing)."""
    c = model.config
    heads = getattr(c, "num_attention_heads", None)
    head_dim = getattr(c, "head_dim", None) or (c.hidden_size // heads if heads else None)
    rope = getattr(c, "rope_parameters", None) or {}
    factor = (rope.get("partial_rotary_factor") if isinstance(rope, dict) else None) \
        or getattr(c, "partial_rotary_factor", None) or getattr(c, "rotary_pct", None) or 1.0
    return int(head_dim * factor) if head_dim else None


def _patterns(model: nn.Module, a: str, tokens: torch.Tensor, queries, keys, hooks: tuple[str, str]) -> torch.Tensor:
    """Every attention pattern of ``a`` with its queries and keys (at ``hooks``) replaced (float64)."""
    from ..hooks import intervene, run_with_cache

    with torch.no_grad(), intervene(model, {hooks[0]: queries, hooks[1]: keys}):
        _, cache = run_with_cache(model, tokens, names=[f"{a}.hook_pattern"], budget=None)
    return cache[f"{a}.hook_pattern"].double()
