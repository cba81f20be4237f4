"""What kind of model is this? The one place in workbench that inspects model classes.

Nothing here imports TransformerLens or transformers: a model is recognised by its class's module and
names (its MRO), so asking costs nothing and works whichever versions are installed.
"""
from __future__ import annotations

from enum import Enum

from torch import nn


class ModelKind(str, Enum):
    """The kinds of model workbench knows; each has one way of naming hooks and of holding weights."""

    #: any other ``nn.Module``: hook names are ``named_modules()`` paths, the structure comes from torch.fx
    MODULE = "module"
    #: TransformerLens 3.x ``HookedTransformer``: per-head weights, TransformerLens hook names
    HOOKED = "hooked"
    #: TransformerLens 4.x ``TransformerBridge`` built natively (``boot_native``)
    NATIVE = "native"
    #: TransformerLens 4.x ``TransformerBridge`` around a Hugging Face model (``boot_transformers``)
    HF_BRIDGE = "hf_bridge"
    #: a Hugging Face ``PreTrainedModel`` on its own
    HF = "hf"


def _class_names(model: nn.Module) -> set[str]:
    return {c.__name__ for c in type(model).__mro__}


def model_kind(model: nn.Module) -> ModelKind:
    """The :class:`ModelKind` of ``model``.

    >>> import torch
    >>> model_kind(torch.nn.Linear(2, 2))
    <ModelKind.MODULE: 'module'>
    """
    names = _class_names(model)
    module = type(model).__module__
    if "HookedTransformer" in names and module.startswith("transformer_lens"):
        return ModelKind.HOOKED
    if "TransformerBridge" in names:
        # Not cfg.original_architecture: a bridge around Hugging Face GPT-2 leaves it None too.
        inner = type(getattr(model, "original_model", None))
        return ModelKind.NATIVE if inner.__module__.startswith("transformer_lens.") else ModelKind.HF_BRIDGE
    if "PreTrainedModel" in names and module.startswith("transformers."):
        return ModelKind.HF
    return ModelKind.MODULE


def is_transformer_lens(model: nn.Module) -> bool:
    """A TransformerLens model (3.x or 4.x): TransformerLens's own hook names and configuration."""
    return model_kind(model) in (ModelKind.HOOKED, ModelKind.NATIVE, ModelKind.HF_BRIDGE)


# What a Hugging Face configuration calls its number of attention heads (a list per stage in hierarchical models).
_HEAD_COUNTS = ("num_attention_heads", "num_heads", "n_head", "n_heads", "encoder_attention_heads")


def is_traced_hf(model: nn.Module) -> bool:
    """A raw Hugging Face model read through its torch.fx trace rather than the canonical transformer layout: an
    image model (``main_input_name == "pixel_values"``) with no attention — no head count in its configuration and
    no module whose class is named ``…Attention…`` — so of no family the layout reads. These are Hugging Face's
    convolutional networks (ResNet, ConvNeXt, MobileNet, EfficientNet, RegNet, …), the torchvision twins of which the
    graph backend reads; every model with attention keeps the layout (and its refusal where its family is not
    checked)."""
    if model_kind(model) != ModelKind.HF or getattr(model, "main_input_name", None) != "pixel_values":
        return False
    config = getattr(model, "config", None)
    # (every family the layout reads, ``_hf.CHECKED_FAMILIES``, has attention and a head count: tests/test_hf_vision_graph.py)
    if any(getattr(config, k, None) for k in _HEAD_COUNTS):
        return False
    return not any("attention" in c.__name__.lower() for m in model.modules() for c in type(m).__mro__
                   if c.__module__.startswith("transformers."))


def has_layout(model: nn.Module) -> bool:
    """Whether the model's weights are read in the canonical transformer layout (``_layout.py``), rather
    than its structure traced by torch.fx: every TransformerLens model, and a Hugging Face
    ``PreTrainedModel`` on its own (fx cannot trace a transformer's decorated ``forward`` and masks) unless it is
    an attention-free image model (:func:`is_traced_hf`), which is traced with its options fixed
    (``_trace.hf_root``)."""
    return is_transformer_lens(model) or (model_kind(model) == ModelKind.HF and not is_traced_hf(model))


def has_hooked_transformer() -> bool:
    """Whether the installed TransformerLens still has ``HookedTransformer`` (3.x); a
    :class:`~workbench.MissingDependencyError` when TransformerLens is not installed."""
    from ._compat import require

    require("transformer_lens")
    try:  # TransformerLens 4.x raises ImportError for the removed name
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True
