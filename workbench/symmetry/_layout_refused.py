"""Which models the layout backend does not read at all: its map is empty with the reason, and a transform raises it
(``_layout_sites.transformer_map``, ``_layout_push.push_transformer``)."""
from __future__ import annotations

from torch import nn

from ..models import ModelKind, hf, model_kind

_HF = (ModelKind.HF, ModelKind.HF_BRIDGE)


def unsupported(model: nn.Module) -> str | None:
    """Why this model is not read at all (its map is empty, a transform of it refused), or None: a Hugging Face model's
    reason from ``hf.unsupported``; a TransformerLens model's configuration switches that are not derived (refused by
    name, as a Hugging Face family's underived switches are: ``_hf._UNDERIVED_SWITCHES``)."""
    if model_kind(model) in _HF:
        return hf.unsupported(model)
    cfg = model.cfg
    pos = getattr(cfg, "positional_embedding_type", "standard")
    if pos not in ("standard", "rotary", "alibi"):
        return f"positional embedding {pos!r} is not supported (standard, rotary, alibi are)."
    if getattr(cfg, "clip_qkv", None) is not None:  # TransformerLens 3 (OLMo's): q, k, v clamped to [-c, c]
        return (f"clip_qkv={cfg.clip_qkv} clamps each query, key and value coordinate, which the maps of those spaces "
                f"do not commute with")
    if model_kind(model) == ModelKind.HOOKED and getattr(cfg, "num_experts", None):  # (4's native models build a dense
        # MLP whatever num_experts says)
        return (f"TransformerLens 3's mixture of experts (num_experts={cfg.num_experts}) is not read: its experts are "
                f"separate modules outside the canonical layout. Hugging Face's Mixtral, OLMoE, Qwen3-MoE, Qwen2-MoE and GPT-OSS are "
                f"(raw or in a TransformerLens 4 bridge)")
    return None
