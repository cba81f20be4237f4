"""Architecture adapters of workbench's own, for checked Hugging Face families TransformerLens 4 has none for.

DINOv2 (``Dinov2Model``, ``Dinov2ForImageClassification``) and DINOv2 with registers are ViT encoders under other
module names, with two constructs ViT lacks: a per-channel **layer scale** after each block's attention and MLP
(``layer_scale1.lambda1``, ``layer_scale2.lambda1``: ``h + λ ⊙ block(norm(h))``) and, with ``use_swiglu_ffn``, a SwiGLU
MLP (``down_proj(silu(gate_proj(x)) ⊙ up_proj(x))``). TransformerLens 4.3 lists no adapter for them, so
``_hf.adapter`` builds this one: a subclass of TransformerLens's ViT adapter (its configuration: pre-LN, LayerNorm,
learned positions, no tokenizer) whose component mapping names DINOv2's modules, read from
``transformers/models/dinov2/modeling_dinov2.py`` (and ``dinov2_with_registers``): ``embeddings``, ``encoder.layer``,
``norm1``/``norm2``, ``attention.{q,k,v,o}_proj``, ``mlp.fc1``/``fc2`` or ``mlp.{gate,up,down}_proj``, ``layernorm``,
``classifier``; the layer scales as ``ls1``/``ls2``, which ``_hf`` places one by one (``_hf_entries.layer_scale``).
It maps a raw model only: TransformerLens cannot boot a bridge around one (its source finds no architecture), so
there is no DINOv2 bridge to read.

CLIP's vision tower (``CLIPVisionModel``, model_type ``clip_vision_model``) is a pre-LN ViT under other names too, read
from ``transformers/models/clip/modeling_clip.py``: ``embeddings`` (a bias-free patch Conv2d, a class embedding ``[d]``,
a position ``nn.Embedding``), ``pre_layrnorm`` (a LayerNorm on the embeddings before the first block: mapped as
``embed_ln``, BERT's embedding norm's key), ``encoder.layers`` with ``layer_norm1``/``layer_norm2``,
``self_attn.{q,k,v,out}_proj`` and ``mlp.fc1``/``fc2``, and ``post_layernorm`` (``ln_final``), which reads the class
token's row only (the pooler output; the last hidden state is the stream itself, not normalised).
``CLIPVisionModelWithProjection`` holds that model under ``vision_model`` and adds ``visual_projection`` (a Linear
without bias, mapped as ``unembed``) reading the pooler output: its ``image_embeds``.

SigLIP's vision tower (``SiglipVisionModel``, model_type ``siglip_vision_model``), read from
``transformers/models/siglip/modeling_siglip.py``, is a pre-LN ViT under CLIP's block names without a class token:
``embeddings`` (a patch Conv2d with bias, a position ``nn.Embedding`` of one row per patch), ``encoder.layers``,
``post_layernorm`` (``ln_final``) on every token (its output is the last hidden state). Its attention-pooling head
(``head``, with ``vision_use_head``: a learned probe attending over post_layernorm's output through an
``nn.MultiheadAttention``, a LayerNorm and an MLP added residually) is not in the mapping: ``_hf_entries.attention_pool``
places its parameters. The model is its own base model, held under its base_model_prefix (``vision_model``).

TransformerLens is imported only when an adapter is built (this module's classes are made then).
"""
from __future__ import annotations

import functools
from typing import Any

from .._errors import UnsupportedModelError

# model_type -> the attribute a classifier holds its base model under (Dinov2ForImageClassification.dinov2); a
# CLIPVisionModel's base_model_prefix is "clip" (_hf.base_prefix: it is its own base model, held under that name).
OWN_ADAPTER_FAMILIES = {"dinov2": "dinov2", "dinov2_with_registers": "dinov2_with_registers", "clip_vision_model": "clip",
                        "siglip_vision_model": "vision_model"}


# The classes of those families whose outputs are derived: the base model (its last hidden state is the stream after
# the final norm) and the classifier. A Dinov2Backbone returns the hidden states of chosen stages, optionally normalised
# and reshaped to [batch, d_model, h, w] (config.apply_layernorm, reshape_hidden_states): not read. CLIP's vision
# tower: the base model (last hidden state: the stream; pooler output: post_layernorm of the class token's row) and the
# model with its projection (image_embeds). SigLIP's: its one vision class (last hidden state: post_layernorm's output;
# pooler output: its attention-pooling head's, where it has one).
OWN_ADAPTER_CLASSES = ("Dinov2Model", "Dinov2ForImageClassification", "Dinov2WithRegistersModel",
                       "Dinov2WithRegistersForImageClassification", "CLIPVisionModel",
                       "CLIPVisionModelWithProjection", "SiglipVisionModel")


def own_adapter(name: str, config: Any, cfg: Any):
    """The adapter of a family in ``OWN_ADAPTER_FAMILIES`` for the class ``name``, on TransformerLens's bridge
    configuration ``cfg`` built from the Hugging Face ``config`` (its MLP width set from the config's ``mlp_ratio``,
    which TransformerLens does not read; CLIP's from ``intermediate_size``); another class of the family is refused by
    name."""
    if name not in OWN_ADAPTER_CLASSES and config.model_type == "clip_vision_model":
        raise UnsupportedModelError(f"{name}: of the CLIP vision classes only CLIPVisionModel and "
                                    f"CLIPVisionModelWithProjection are derived; nothing is transformed.")
    if name not in OWN_ADAPTER_CLASSES:
        raise UnsupportedModelError(f"{name}: of the {config.model_type} classes only {', '.join(OWN_ADAPTER_CLASSES)} are "
                                    f"derived (a backbone returns chosen stages' hidden states, normalised and reshaped "
                                    f"by its configuration: not read here); nothing is transformed.")
    if config.model_type in ("clip_vision_model", "siglip_vision_model"):
        cfg.d_mlp, cfg.gated_mlp = int(config.intermediate_size), False
        return _clip_adapter_class()(cfg, config.model_type == "clip_vision_model")
    cls = _dinov2_adapter_class()
    cfg.d_mlp = _mlp_width(config)
    cfg.gated_mlp = bool(getattr(config, "use_swiglu_ffn", False))
    return cls(cfg, OWN_ADAPTER_FAMILIES[config.model_type], bool(getattr(config, "use_swiglu_ffn", False)))


def _mlp_width(config: Any) -> int:
    """The MLP's hidden width as Dinov2MLP / Dinov2SwiGLUFFN build it: ``int(d·mlp_ratio)``, for SwiGLU two thirds of
    it rounded up to a multiple of 8."""
    n = int(config.hidden_size * config.mlp_ratio)
    return (int(n * 2 / 3) + 7) // 8 * 8 if getattr(config, "use_swiglu_ffn", False) else n


@functools.cache
def _dinov2_adapter_class():
    from transformer_lens.model_bridge.generalized_components import (BlockBridge, LinearBridge, MLPBridge,
                                                                       NormalizationBridge)
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
    from transformer_lens.model_bridge.supported_architectures.vit import ViTArchitectureAdapter

    class Dinov2ArchitectureAdapter(ViTArchitectureAdapter):
        """TransformerLens's ViT adapter with DINOv2's module names, layer scales and optional SwiGLU MLP."""

        def __init__(self, cfg: Any, base: str, swiglu: bool) -> None:
            self._base, self._swiglu = base, swiglu  # read by _build_component_mapping, which the parent's __init__ calls
            super().__init__(cfg)

        def _build_component_mapping(self, prefix: str, with_classifier: bool) -> dict:
            p = prefix
            norm = lambda name: NormalizationBridge(name=name, config=self.cfg, use_native_layernorm_autograd=True)  # noqa: E731
            if self._swiglu:
                mlp = {"gate": LinearBridge(name="gate_proj"), "in": LinearBridge(name="up_proj"),
                       "out": LinearBridge(name="down_proj")}
            else:
                mlp = {"in": LinearBridge(name="fc1"), "out": LinearBridge(name="fc2")}
            mapping = {
                "embed": GeneralizedComponent(name=f"{p}embeddings"),
                "blocks": BlockBridge(name=f"{p}encoder.layer", submodules={
                    "ln1": norm("norm1"),
                    "attn": GeneralizedComponent(name="attention", submodules={
                        "q": LinearBridge(name="q_proj"), "k": LinearBridge(name="k_proj"),
                        "v": LinearBridge(name="v_proj"), "o": LinearBridge(name="o_proj")}),
                    "ls1": GeneralizedComponent(name="layer_scale1"),
                    "ln2": norm("norm2"),
                    "mlp": MLPBridge(name="mlp", config=self.cfg, submodules=mlp),
                    "ls2": GeneralizedComponent(name="layer_scale2"),
                }),
                "ln_final": norm(f"{p}layernorm"),
            }
            if with_classifier:
                mapping["unembed"] = GeneralizedComponent(name="classifier")
            return mapping

        def prepare_model(self, hf_model: Any) -> None:
            """A classifier holds its base model under ``self._base`` (``dinov2``); a base model's components are at its root."""
            prefix = f"{self._base}." if hasattr(hf_model, self._base) else ""
            self.component_mapping = self._build_component_mapping(prefix, hasattr(hf_model, "classifier"))

    return Dinov2ArchitectureAdapter


@functools.cache
def _clip_adapter_class():
    from transformer_lens.model_bridge.generalized_components import (BlockBridge, LinearBridge, MLPBridge,
                                                                       NormalizationBridge)
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
    from transformer_lens.model_bridge.supported_architectures.vit import ViTArchitectureAdapter

    class CLIPVisionArchitectureAdapter(ViTArchitectureAdapter):
        """TransformerLens's ViT adapter with CLIP's vision module names and its norm before the first block; for
        SigLIP (``clip=False``) the same names without that norm."""

        def __init__(self, cfg: Any, clip: bool = True) -> None:
            self._clip = clip  # read by _build_component_mapping, which the parent's __init__ calls
            super().__init__(cfg)

        def _build_component_mapping(self, prefix: str, with_classifier: bool) -> dict:
            p = prefix
            norm = lambda name: NormalizationBridge(name=name, config=self.cfg, use_native_layernorm_autograd=True)  # noqa: E731
            mapping = {
                "embed": GeneralizedComponent(name=f"{p}embeddings"),
                "embed_ln": norm(f"{p}pre_layrnorm"),
                "blocks": BlockBridge(name=f"{p}encoder.layers", submodules={
                    "ln1": norm("layer_norm1"),
                    "attn": GeneralizedComponent(name="self_attn", submodules={
                        "q": LinearBridge(name="q_proj"), "k": LinearBridge(name="k_proj"),
                        "v": LinearBridge(name="v_proj"), "o": LinearBridge(name="out_proj")}),
                    "ln2": norm("layer_norm2"),
                    "mlp": MLPBridge(name="mlp", config=self.cfg, submodules={
                        "in": LinearBridge(name="fc1"), "out": LinearBridge(name="fc2")}),
                }),
                "ln_final": norm(f"{p}post_layernorm"),
            }
            if with_classifier:  # the projection reads post_layernorm's output (the class token's row)
                mapping["unembed"] = LinearBridge(name="visual_projection")
            if not self._clip:  # SigLIP: no norm before the first block
                del mapping["embed_ln"]
            return mapping

        def prepare_model(self, hf_model: Any) -> None:
            """A CLIPVisionModel is read under the holder ``_hf`` puts it in (its base_model_prefix, ``clip``); a
            CLIPVisionModelWithProjection holds it under ``vision_model``, and ``_hf`` puts a SiglipVisionModel there
            (its base_model_prefix)."""
            prefix = next((f"{b}." for b in ("clip", "vision_model") if hasattr(hf_model, b)), "")
            self.component_mapping = self._build_component_mapping(prefix, hasattr(hf_model, "visual_projection"))

    return CLIPVisionArchitectureAdapter
