"""``wb.fold_layernorm``: move LayerNorm/RMSNorm gains and biases into the weights that read them."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._errors import InvalidOptionError, UnsupportedModelError
from .._offload import built_alike
from ..models import ModelKind, has_layout, hf, model_kind, read_weights, rebuild

# Each residual-stream norm and the weights that read its output (canonical layout: d_model axis). A
# parallel block with one norm (Phi: attention and MLP read the same ln1) has no ln2: ln1 feeds both.
_READERS = {"ln1": ("attn", ("Q", "K", "V")), "ln2": ("mlp", ("in", "gate"))}
# Layer scales (DINOv2's ls1, ls2) and the writers whose output they scale.
_SCALED = {"ls1": ("attn.W_O", "attn.b_O"), "ls2": ("mlp.W_out", "mlp.b_out")}
_HF = (ModelKind.HF, ModelKind.HF_BRIDGE)


def fold_layernorm(model: nn.Module, example: Optional[torch.Tensor] = None) -> nn.Module:
    """A new model whose residual-stream norms have gain 1 (and bias 0), their affine part folded into
    the readers (``W_Q``/``W_K``/``W_V``, ``W_in``/``W_gate``, ``W_U`` and their biases); the input
    model is not modified.

    The function is unchanged (computed in float64, then cast to the model's dtype), and the residual
    stream's group grows: from permutations to rotations fixing the all-ones direction (LayerNorm), or
    from signed permutations to all rotations (RMSNorm) — see ``wb.symmetry_map(folded)["resid"]``.
    A bias with no reader bias to absorb it (Hugging Face GPT-2's final LayerNorm: its unembedding
    has none) stays on the norm, divided by the gain; after the normalisation it is a vector that
    rotations move with the stream. Tied embeddings (GPT-2) are untied: the unembedding takes the final norm's gain.
    Post-LayerNorm models (BERT, OPT-350m) cannot be folded: their norms sit on the stream itself.
    Gemma's gains are ``1 + w``: folded, its norms store w = 0. DINOv2's layer scales λ (each block adds
    λ ⊙ its output) are folded into the writers they scale (``W_O``, ``b_O``, ``W_out``, ``b_out``), leaving λ = 1. Hugging Face models, raw or in a
    bridge, come back as the same kind.

    Any other ``nn.Module`` (torchvision's or timm's ``VisionTransformer``, ConvNeXt, …) is traced with
    torch.fx as ``symmetry_map`` traces it, run once on ``example`` (an input batch; guessed from the first
    layer when None; transformers above need none and ignore it), and every ``nn.LayerNorm`` over the
    channels whose output is read *only* by linear maps
    that can absorb it is folded into them in float64: ``nn.Linear`` (also after a token selection such as
    ``x[:, 0]``, a token mean, dropout or identity, or a flatten of ``[B, C, 1, 1]``), ``nn.MultiheadAttention``
    called as self-attention (``in_proj_weight`` columns, ``in_proj_bias``) and timm's ``Attention`` (its
    ``qkv``). Other norms stay as they are — read by a convolution (ConvNeXt's downsampling), added to the
    stream, read over positions (Mixer's token MLP), returned, or called or sharing weights more than once —
    and nothing says so beyond their unchanged gains (``symmetry_map`` then keeps their stream at
    ``permutation_with_sign``); an ``InvalidOptionError`` lists each norm's reason only when the model has
    LayerNorms with an affine part and none of them folds. A model without any returns as a plain copy.
    For a folded ViT the stream site's group grows from ``permutation_with_sign`` to
    ``orthogonal_ones_with_sign``. Dropout commutes with the fold only in eval mode (in training mode it
    would drop entries of β too), like every symmetry of the workbench.

    Example:
        >>> import torch, workbench as wb
        >>> model = torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.mul_(3.0)
        >>> folded = wb.fold_layernorm(model)
        >>> folded[0].weight.tolist(), model[0].weight.tolist()
        ([1.0, 1.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0])
        >>> x = torch.randn(5, 4)
        >>> torch.allclose(folded(x), model(x), atol=1e-6)
        True
    """
    kind = model_kind(model)
    if not has_layout(model):
        from ._fold_graph import fold_graph

        return fold_graph(model, example)
    if kind in _HF and (reason := hf.unsupported(model)):
        raise InvalidOptionError(f"fold_layernorm cannot read this model: {reason}")
    if hf.is_post_ln(model):
        raise InvalidOptionError(f"fold_layernorm: {type(hf.hf_model(model)).__name__} is post-LayerNorm — every norm sits on "
                                 f"the residual stream itself, so there is nothing to fold into; its stream group stays "
                                 f"the permutations.")
    if hf.is_base(model):
        raise InvalidOptionError(f"fold_layernorm: {type(hf.hf_model(model)).__name__} is a base model — its final norm's "
                                 f"output is the model's output, so that norm's gain has no reader to move into and the "
                                 f"stream keeps its group; fold the language model (with its head) instead.")
    return built_alike(model, lambda: _fold_layout(model))  # weights accelerate offloaded: read onloaded, and the
    # folded model offloaded alike


def _fold_layout(model: nn.Module) -> nn.Module:
    offset = hf.gain_offset(model)
    W = {k: v.double().clone() for k, v in read_weights(model).items()}
    for layer in range(int(hf.config(model).n_layers)):
        for ln, (part, mats) in _READERS.items():
            readers = [(f"blocks.{layer}.{part}.W_{m}", f"blocks.{layer}.{part}.b_{m}") for m in mats]
            if ln == "ln1" and f"blocks.{layer}.ln2.w" not in W:  # parallel attention and MLP behind one norm
                readers += [(f"blocks.{layer}.mlp.W_{m}", f"blocks.{layer}.mlp.b_{m}") for m in ("in", "gate")]
            if ln == "ln2":  # a mixture of experts: its router and every expert's gate and up read ln2's output (Qwen2-MoE's
                # shared expert and its gate too)
                readers += [(f"blocks.{layer}.mlp.{w}", "") for w in ("W_router", "experts.W_in", "experts.W_gate",
                                                                      "shared.W_in", "shared.W_gate", "W_shared_gate")]
            _fold(W, f"blocks.{layer}.{ln}", [r for r in readers if r[0] in W], heads=lambda key: ".attn." in key,
                  offset=offset)
        for ls, writers in _SCALED.items():  # a layer scale (DINOv2) into the writers it scales
            _fold_scale(W, f"blocks.{layer}.{ls}.w", [f"blocks.{layer}.{w}" for w in writers])
    # the final norm's reader: the unembedding, or a sequence classifier's score (LlamaForSequenceClassification);
    # DINOv2's classifier reads it twice, the class token by unembed and the patch tokens' mean by unembed_patches, one bias
    _fold(W, "ln_final", [r for r in (("unembed.W_U", "unembed.b_U"), ("unembed_patches.W_U", "unembed.b_U"),
                                      ("score.W", "score.b")) if r[0] in W], heads=lambda key: False, offset=offset)
    return rebuild(model, W, untie=True)


def _fold_scale(W: dict, key: str, writers: list[str]) -> None:
    """Fold a layer scale λ (``key``: the block's output is λ ⊙ (x·W + b)) into its writers' d_model axis (the last:
    ``W_O`` [h, d_head, d_model], ``W_out`` [d_mlp, d_model], their biases), leaving λ = 1."""
    if key not in W:
        return
    lam = W[key]
    for w in writers:
        if w in W:
            W[w] = W[w] * lam
    W[key] = torch.ones_like(lam)


def _fold(W: dict, ln: str, readers: list[tuple[str, str]], heads, offset: float = 0.0) -> None:
    """Fold norm ``ln``'s gain (its stored weight + ``offset``) into the readers' rows, its bias into their
    biases (or keep bias/gain on the norm where a reader has no bias); ``heads(key)``: a per-head weight."""
    if f"{ln}.w" not in W:
        return
    w, b = W[f"{ln}.w"] + offset, W.get(f"{ln}.b")
    keep_bias = b is not None and bool(b.ne(0).any()) and any(bkey not in W for _, bkey in readers)
    for wkey, bkey in readers:
        M = W[wkey]  # [d_model, out] or per head [h, d_model, d_head] (per expert [e, d_model, d_mlp]: w[:, None] fits)
        per_head = heads(wkey)
        if b is not None and not keep_bias:
            W[bkey] = W[bkey] + (torch.einsum("d,hde->he", b, M) if per_head else b @ M)
        W[wkey] = M * (w[:, None] if not per_head else w[None, :, None])
    W[f"{ln}.w"] = torch.ones_like(w) - offset
    if keep_bias:  # w⊙n + b = w⊙(n + b/w): the gain went to the readers, b/w stays
        if bool(w.eq(0).any()):
            raise UnsupportedModelError(f"cannot fold {ln}: a zero gain, and a bias with no reader bias to absorb it.")
        W[f"{ln}.b"] = b / w
    elif b is not None:
        W[f"{ln}.b"] = torch.zeros_like(b)


def untie_embeddings(model: nn.Module) -> nn.Module:
    """A copy of a Hugging Face model (raw or in a bridge) whose unembedding is a tensor of its own, no longer the word
    embedding (same values, same function): needed before a map on the residual stream that is not
    orthogonal, which moves the two differently. The input model is not modified.

    Example:
        >>> import torch, workbench as wb
        >>> wb.untie_embeddings(torch.nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        workbench._errors.InvalidOptionError: untie_embeddings expects a Hugging Face model, raw or in a bridge (TransformerLens's own models never tie W_U to W_E); got Linear.
    """
    if model_kind(model) not in _HF:
        raise InvalidOptionError(f"untie_embeddings expects a Hugging Face model, raw or in a bridge (TransformerLens's own "
                                 f"models never tie W_U to W_E); got {type(model).__name__}.")
    if reason := hf.unsupported(model):
        raise InvalidOptionError(f"untie_embeddings cannot read this model: {reason}")
    def untied() -> nn.Module:
        W = dict(read_weights(model))
        if hf.facts(model)["family"] in hf.BERT_FAMILIES and "unembed.b_U" in W:  # BERT's (RoBERTa's) MLM head: untied, its own bias is
            W.setdefault("mlm_vocab.b", W["unembed.b_U"])  # a tensor of its own (read by nothing): the value it was tied to
        return rebuild(model, W, untie=True)
    return built_alike(model, untied)
