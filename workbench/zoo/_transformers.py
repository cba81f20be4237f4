"""Tiny TransformerLens decoders: one weight format, loadable by TransformerLens 4.x and 3.9.

Weights are stored in the ``TransformerBridge`` format (``blocks.0.attn.q.weight``, nn.Linear
layout). On TransformerLens 3.x they are converted to ``HookedTransformer``'s per-head format
(``blocks.0.attn.W_Q``: [n_heads, d_model, d_head]) — the inverse of TransformerLens 4's own
``convert_tl_checkpoint``, written here so that 3.9 users load the same files.
"""
from __future__ import annotations

from typing import Any

import torch

VARIANTS = {"gelu": "gelu", "relu": "relu", "solu": "solu_ln"}


def config(variant: str, d_vocab: int, n_ctx: int, seed: int = 0, **overrides) -> dict[str, Any]:
    """The config shared by both TransformerLens versions: 2 layers, pre-LayerNorm, d_model 64."""
    cfg = dict(d_model=64, d_head=16, n_heads=4, n_layers=2, d_mlp=256, n_ctx=n_ctx, d_vocab=d_vocab,
               act_fn=VARIANTS[variant], normalization_type="LN", seed=seed)
    cfg.update(overrides)
    return cfg


def has_hooked_transformer() -> bool:
    try:  # TransformerLens 4.x raises ImportError for the removed name
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def build(cfg: dict[str, Any], state_dict: dict[str, torch.Tensor] | None = None):
    """A ``TransformerBridge`` (4.x) or ``HookedTransformer`` (3.x) from ``cfg``, with weights if given."""
    if has_hooked_transformer():
        import warnings

        from transformer_lens import HookedTransformer, HookedTransformerConfig

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            model = HookedTransformer(HookedTransformerConfig(**cfg))
        if state_dict is not None:
            legacy = to_hooked_transformer(state_dict, cfg)
            missing, unexpected = model.load_state_dict(legacy, strict=False)
            missing = [k for k in missing if not k.endswith((".mask", ".IGNORE"))]
            if missing or unexpected:
                raise ValueError(f"weights do not fit HookedTransformer: missing {missing}, unexpected {unexpected}")
        return model.eval()
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_native(TransformerBridgeConfig(**cfg))
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model.eval()


def to_hooked_transformer(sd: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Bridge-format weights → ``HookedTransformer`` keys and per-head shapes."""
    h, dh = cfg["n_heads"], cfg["d_head"]
    out = {}
    for key, t in sd.items():
        stem, _, leaf = key.rpartition(".")
        owner = stem.rpartition(".")[2]
        if owner in ("q", "k", "v"):
            base = stem.rpartition(".")[0]
            name = owner.upper()
            out[f"{base}.{'W' if leaf == 'weight' else 'b'}_{name}"] = (
                t.reshape(h, dh, -1).transpose(1, 2) if leaf == "weight" else t.reshape(h, dh))
        elif owner == "o":
            base = stem.rpartition(".")[0]
            out[f"{base}.{'W_O' if leaf == 'weight' else 'b_O'}"] = (
                t.reshape(t.shape[0], h, dh).permute(1, 2, 0) if leaf == "weight" else t)
        elif owner in ("in", "out"):
            base = stem.rpartition(".")[0]
            out[f"{base}.{'W' if leaf == 'weight' else 'b'}_{owner}"] = t.T if leaf == "weight" else t
        elif stem == "embed":
            out["embed.W_E"] = t
        elif stem == "pos_embed":
            out["pos_embed.W_pos"] = t
        elif stem == "unembed":
            out["unembed.W_U" if leaf == "weight" else "unembed.b_U"] = t.T if leaf == "weight" else t
        else:  # LayerNorms: ln1, ln2, ln_final, mlp.ln (SoLU)
            out[f"{stem}.{'w' if leaf == 'weight' else 'b'}"] = t
    return {k: v.contiguous() for k, v in out.items()}
