"""``wb.fold_layernorm``: move LayerNorm/RMSNorm gains and biases into the weights that read them."""
from __future__ import annotations

import torch
from torch import nn

from ..hooks._tl import read_weights, rebuild, tl_kind

# Each residual-stream norm and the weights that read its output (canonical layout: d_model axis).
_READERS = {"ln1": ("attn", ("Q", "K", "V")), "ln2": ("mlp", ("in", "gate"))}


def fold_layernorm(model: nn.Module) -> nn.Module:
    """A new model whose residual-stream norms have gain 1 and bias 0, their affine part folded into
    the readers (``W_Q``/``W_K``/``W_V``, ``W_in``/``W_gate``, ``W_U`` and their biases); the input
    model is not modified.

    The function is unchanged (computed in float64, then cast to the model's dtype), and the residual
    stream's group grows: from permutations to rotations fixing the all-ones direction (LayerNorm), or
    from signed permutations to all rotations (RMSNorm) — see ``wb.symmetry_map(folded)["resid"]``.
    Post-LayerNorm models (BERT) cannot be folded: their norms sit on the stream itself.

    Example:
        >>> import torch, workbench as wb
        >>> wb.fold_layernorm(torch.nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        TypeError: fold_layernorm expects a TransformerLens model (HookedTransformer or a native TransformerBridge); got Linear.
    """
    kind = tl_kind(model)
    if kind not in ("hooked", "native"):
        what = f"a bridge around Hugging Face {type(model.original_model).__name__}" if kind == "hf" else type(model).__name__
        raise TypeError(f"fold_layernorm expects a TransformerLens model (HookedTransformer or a native "
                        f"TransformerBridge); got {what}.")
    W = {k: v.double().clone() for k, v in read_weights(model).items()}
    for layer in range(int(model.cfg.n_layers)):
        for ln, (part, mats) in _READERS.items():
            readers = [(f"blocks.{layer}.{part}.W_{m}", f"blocks.{layer}.{part}.b_{m}") for m in mats]
            _fold(W, f"blocks.{layer}.{ln}", [r for r in readers if r[0] in W], heads=part == "attn")
    _fold(W, "ln_final", [("unembed.W_U", "unembed.b_U")], heads=False)
    return rebuild(model, W)


def _fold(W: dict, ln: str, readers: list[tuple[str, str]], heads: bool) -> None:
    if f"{ln}.w" not in W:
        return
    w, b = W[f"{ln}.w"], W.get(f"{ln}.b")
    for wkey, bkey in readers:
        M = W[wkey]  # [d_model, out] or per head [h, d_model, d_head]
        if b is not None and bool(b.ne(0).any()):
            if bkey not in W:
                raise ValueError(f"cannot fold the bias of {ln}: {wkey} has no bias ({bkey}) to absorb it.")
            W[bkey] = W[bkey] + (torch.einsum("d,hde->he", b, M) if heads else b @ M)
        W[wkey] = M * (w[:, None] if not heads else w[None, :, None])
    W[f"{ln}.w"] = torch.ones_like(w)
    if b is not None:
        W[f"{ln}.b"] = torch.zeros_like(b)
