"""Tiny TransformerLens decoders: one weight format, loadable by TransformerLens 4.x and 3.9.

Weights are stored in the ``TransformerBridge`` format (``blocks.0.attn.q.weight``, nn.Linear
layout). On TransformerLens 3.x they are converted to ``HookedTransformer``'s per-head format
(``blocks.0.attn.W_Q``: [n_heads, d_model, d_head]) — the inverse of TransformerLens 4's own
``convert_tl_checkpoint``, written here so that 3.9 users load the same files.
"""
from __future__ import annotations

from typing import Any

import torch

from ..models import has_hooked_transformer, to_canonical as to_hooked_transformer, write_weights

VARIANTS = {"gelu": "gelu", "relu": "relu", "solu": "solu_ln"}


def config(variant: str, d_vocab: int, n_ctx: int, seed: int = 0, **overrides) -> dict[str, Any]:
    """The config shared by both TransformerLens versions: 2 layers, pre-LayerNorm, d_model 64."""
    cfg = dict(d_model=64, d_head=16, n_heads=4, n_layers=2, d_mlp=256, n_ctx=n_ctx, d_vocab=d_vocab,
               act_fn=VARIANTS[variant], normalization_type="LN", seed=seed)
    cfg.update(overrides)
    return cfg


def build(cfg: dict[str, Any], state_dict: dict[str, torch.Tensor] | None = None):
    """A ``TransformerBridge`` (4.x) or ``HookedTransformer`` (3.x) from ``cfg``, with weights if given."""
    if has_hooked_transformer():
        import warnings

        from transformer_lens import HookedTransformer, HookedTransformerConfig

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            model = HookedTransformer(HookedTransformerConfig(**cfg))
        if state_dict is not None:
            write_weights(model, to_hooked_transformer(state_dict, cfg))
        return model.eval()
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_native(TransformerBridgeConfig(**cfg))
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model.eval()
