"""Hugging Face models — inside TransformerLens bridges or on their own — in one canonical key layout.

Which Hugging Face module holds which canonical component (``blocks.0.attn.q`` → ``model.layers.0.
self_attn.q_proj``) is not a table of ours: it is TransformerLens 4's own architecture adapter,
``adapter.component_mapping`` — a bridge's, or for a raw ``PreTrainedModel`` one built from its
config the way ``boot_transformers`` builds it. Walking that mapping over a weightless copy of the
model gives, for every parameter, its key in the bridge layout (``blocks.0.attn.q.weight``,
``nn.Linear`` orientation; a ``Conv1D`` is transposed) — as a **view** of the model's own tensor, so
a transform reads the original and writes a fresh model without intermediate copies.

A fused q/k/v projection (GPT-2's ``c_attn``: [q | k | v]; GPT-NeoX's ``query_key_value``: q, k, v
interleaved per head) is split by the adapter's own ``split_qkv_matrix``, **measured** once per
config: it is run on a weight whose entries are their own flat indices, and the indices that land
in q, k and v give each part as a strided view ``[heads, d_head, d_model]`` of the fused tensor
(a layout that is no strided view is refused). Every parameter must be reached — a construct the
mapping does not cover (Phi's ``qk_layernorm``) is refused, naming the parameter.

The few facts the adapter does not state in its mapping are read from the configs: Gemma's RMSNorm
gain is ``1 + w`` (the adapter's ``cfg.rmsnorm_uses_offset``); post-LayerNorm (BERT, OPT with
``do_layer_norm_before=False``); encoders (BERT); which parameters are tied (one tensor, by identity).
A checked family TransformerLens has no adapter for (DINOv2) is mapped by workbench's own (``_hf_adapters``: its
ViT adapter under DINOv2's module names), for raw models only.
Whether the layout describes the model itself (not only its class and config) is ``_hf_check.py``'s; how a
transformed model is built, ``_hf_build.py``'s.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from .._errors import UnsupportedModelError
from . import _hf_check as check
from ._call import per_call
from ._hf_adapters import OWN_ADAPTER_FAMILIES, own_adapter
from ._hf_entries import (BERT_FAMILIES, CLAMPED_SWIGLU, DINO_FAMILIES, MOE_FAMILIES, VISION_FAMILIES, Entry,
                          attention_pool, experts, fused_gate_up, fused_qkv, heads, layer_scale, patch_mean_classifier,
                          unread_head, vision_embeddings)
from ._kind import ModelKind, model_kind

# Canonical component keys the layout knows (``{i}``: a layer); a mapped component outside these has no
# place in the canonical layout and is refused.
_KNOWN = {"embed", "pos_embed", "token_type_embed", "embed_ln", "ln_final", "unembed", "mlm_head", "project_in",
          "project_out", "blocks.{i}.ln1", "blocks.{i}.ln2", "blocks.{i}.attn.q", "blocks.{i}.attn.k",
          "blocks.{i}.attn.v", "blocks.{i}.attn.o", "blocks.{i}.mlp.in", "blocks.{i}.mlp.out", "blocks.{i}.mlp.gate"}
# Norms on q and k (``blocks.0.attn.q_norm.weight``), known only in the families whose norm was checked against the
# model's forward (RMSNorms before the rotary embedding: per head with one gain for every head in Qwen3 and Gemma 3, one
# over all heads with a gain per head in OLMo 2; docs/DERIVATIONS.md §10, Qwen3 and OLMo 2). StableLM's, Phi's and
# Cohere's per-head LayerNorms, which the adapters map to the same keys, stay refused by name.
_QK_NORMS = {"blocks.{i}.attn.q_norm", "blocks.{i}.attn.k_norm"}
QK_NORM_FAMILIES = frozenset({"qwen3", "qwen3_moe", "gemma3_text", "olmo2", "olmo3", "olmoe"})  # (OLMo 2, OLMoE: one RMSNorm
# over every head's values)
# Norms on a block's outputs before they join the stream (Gemma 2 and 3: ``post_attention_layernorm``,
# ``post_feedforward_layernorm``), known only where checked: docs/DERIVATIONS.md §10, Gemma 2 and 3, OLMo 2 (which
# has no norm before its blocks).
_SANDWICH = {"blocks.{i}.ln1_post", "blocks.{i}.ln2_post"}
SANDWICH_FAMILIES = frozenset({"gemma2", "gemma3_text", "olmo2", "olmo3"})
# Attention sinks (``self_attn.sinks``: a learned logit per query head joining its softmax, GPT-OSS), known only where
# checked: docs/DERIVATIONS.md §10, GPT-OSS. The one parameter the attention module holds itself.
SINK_FAMILIES = frozenset({"gpt_oss"})


@dataclass
class Layout:
    """Where every bridge-layout key lives in a Hugging Face model of one class and config."""

    entries: list[Entry]
    tied: list[tuple[str, ...]]  # bridge keys naming one tensor (the unembedding tied to the embedding)
    facts: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)  # component key ("blocks.0.attn.q") -> Hugging Face module path
    # What ``type(model)(config)`` has, for checking a raw model against it (``unsupported``): module types, parameter
    # shapes, which parameter names share a tensor, and the parameters the layout reaches.
    modules: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)
    ties: frozenset = frozenset()
    reached: frozenset = frozenset()
    settings: dict = field(default_factory=dict)  # module name -> the settings its class took from the config (_hf_check.settings)
    absent: tuple = ()  # (key, path) of components the adapter maps, not optional, that this class and config do not build


# The Hugging Face families (``config.model_type``) whose layout facts have been checked against the model's own
# forward: tests/test_hf_families.py and tests/test_hf_symmetry.py compute each one's float64 function preservation
# directly, with negative controls, for the groups docs/DERIVATIONS.md §10 derives. A family outside it is refused
# even when TransformerLens's adapter maps every weight: the facts a transform rests on (activation, where the norms
# sit, parallel blocks) come from the adapter's config, and an adapter can state them wrongly. OpenAI GPT's reads
# its GELU as ReLU and its post-LN blocks as pre-LN; a transform built on them changed the float64 log-probabilities
# by 7e-4. Add a family only with its derivation and those tests.
CHECKED_FAMILIES = frozenset({"bert", "bloom", "clip_vision_model", "cohere", "deit", "dinov2", "dinov2_with_registers",
                              "falcon", "gemma", "gemma2", "gemma3_text", "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox",
                              "gpt_oss", "gptj", "granite", "llama", "mistral", "mixtral", "nemotron", "olmo", "olmo2",
                              "olmo3", "olmoe", "opt", "phi", "phi3", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "roberta",
                              "siglip_vision_model", "smollm3", "stablelm", "starcoder2", "vit", "xlm-roberta"})
# Families whose norms compute in float32 inside a float64 model although they are LayerNorms (every Hugging Face
# RMSNorm does; Cohere's LayerNorm too): verify rounds the stream where they read it to measure its floor.
FLOAT32_NORM_FAMILIES = frozenset({"cohere", "olmo"})  # (OLMo 1's parameter-free LayerNorm too)
# MLP activations a family's module runs while TransformerLens's adapter leaves ``act_fn`` at its default ("relu"):
# BLOOM's BloomGelu is the tanh-approximated GELU (tests/test_hf_bloom.py computes it from the module); Falcon's MLP
# runs its config's ``activation`` (``ACT2FN[config.activation]``): each family's activation, from its config.
# DINOv2's MLP runs ACT2FN[hidden_act], its SwiGLU MLP (use_swiglu_ffn) silu on the gate whatever hidden_act says.
_DINO_ACT = lambda config: "silu" if getattr(config, "use_swiglu_ffn", False) else config.hidden_act  # noqa: E731
_ACTIVATIONS = {"bloom": lambda config: "gelu_new", "falcon": lambda config: config.activation,
                "dinov2": _DINO_ACT, "dinov2_with_registers": _DINO_ACT,
                "clip_vision_model": lambda config: config.hidden_act,  # CLIPMLP: ACT2FN[hidden_act] (quick_gelu)
                "siglip_vision_model": lambda config: config.hidden_act,  # SiglipMLP: the same (gelu_pytorch_tanh)
                # GptOssExperts: (clamp(up, ±limit) + 1) ⊙ g·sigmoid(alpha·g), g = min(gate, limit); hidden_act unread
                "gpt_oss": lambda config: CLAMPED_SWIGLU}
# Checked families whose TransformerLens adapter is listed under one class only, with no fallback by ``model_type``: every
# class of the family is read through it (a checkpoint of RobertaForSequenceClassification names only that class), and
# the heads it does not map are read by ``_hf_entries.heads``. XLM-RoBERTa's modules are RoBERTa's under other class
# names (transformers generates one from the other), with the same attribute paths.
_ADAPTER_CLASSES = {"roberta": "RobertaForMaskedLM", "xlm-roberta": "RobertaForMaskedLM",
                    # (OLMoE's, Qwen3-MoE's and GPT-OSS's adapters too: an OlmoeModel or a Qwen3MoeForSequenceClassification built
                    # in code, or a checkpoint naming only its own class, found no adapter)
                    "olmoe": "OlmoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "gpt_oss": "GptOssForCausalLM"}
# The vision classes TransformerLens's ViT adapter is listed under (a config built in code names none).
_VISION_CLASSES = ("ViTModel", "ViTForImageClassification", "DeiTModel", "DeiTForImageClassification")
# Configuration switches of a checked family that change where the stream is read and are not derived: refused by name.
_UNDERIVED_SWITCHES = {
    "bloom": {"apply_residual_connection_post_layernorm": "changes which values the residual stream carries"},
    # clamps every query, key and value coordinate to [-c, c]: only maps that move coordinates whole (permutations,
    # signs) commute with it, not the GL and rotary maps of those spaces
    "olmo": {"clip_qkv": "clamps each query, key and value coordinate, which the maps of those spaces do not commute with"},
}
# Families of a checked one's model whose own sites are not derived, with why (refused before anything is read).
_UNDERIVED_FAMILIES = {
    "clip": "CLIPModel holds a text and a vision tower whose projections meet in one shared space (scored by a learned "
            "logit scale), and CLIPForImageClassification reads the patch tokens' mean; only the vision tower is "
            "checked (CLIPVisionModel, CLIPVisionModelWithProjection: model_type clip_vision_model)",
    "clip_text_model": "CLIP's text tower (causal attention, the end-of-text token's row pooled) is not checked; only "
                       "the vision tower is (CLIPVisionModel, CLIPVisionModelWithProjection)",
    "siglip": "SiglipModel holds a text and a vision tower whose pooled outputs meet in one shared space (scored by a "
              "learned logit scale and bias), and SiglipForImageClassification reads the mean of its vision tower's last "
              "hidden state while its configuration is the two towers' SiglipConfig; only the vision tower is checked "
              "(SiglipVisionModel: model_type siglip_vision_model)",
    "siglip_text_model": "SigLIP's text tower (the last token's row pooled, then a projection head) is not checked; only "
                         "the vision tower is (SiglipVisionModel)",
}
_UNDERIVED_SWITCHES["olmoe"] = _UNDERIVED_SWITCHES["olmo"]  # (the same clamp, after OLMoE's q/k norms)

# Layouts per (class, config): building one boots nothing, but walks a weightless model (~10 ms).
_LAYOUTS: "OrderedDict[tuple, object]" = OrderedDict()
_KEPT = 8


def hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model itself: a bridge's ``original_model``, or ``model``."""
    return model.original_model if model_kind(model) == ModelKind.HF_BRIDGE else model


def _config_key(hf: nn.Module) -> tuple:
    """What a layout depends on: the class and every config attribute (``repr`` of its ``__dict__``:
    ``to_dict`` deep-copies and was most of a layout lookup, which every verb makes several times). Inside
    ``one_call`` the ``repr`` is made once per config object (a transform looked it up ~11 times: 2.5 ms of a
    ViT transform, whose config carries 1,000 labels twice); outside one, every time (a config edited between
    two calls gives a new key)."""
    config = hf.config
    return type(hf).__module__, type(hf).__qualname__, per_call(config, "config_repr", lambda: _config_repr(config))


def _config_repr(config) -> str:
    return repr(sorted(vars(config).items(), key=lambda kv: kv[0]))


def config_key(model: nn.Module) -> tuple:
    """A hashable key of a Hugging Face model's class and config (raw or in a bridge)."""
    return _config_key(hf_model(model))


def _cached(key: tuple, build):
    if key in _LAYOUTS:
        _LAYOUTS.move_to_end(key)
        return _LAYOUTS[key]
    value = _LAYOUTS[key] = build()
    while len(_LAYOUTS) > _KEPT:
        _LAYOUTS.popitem(last=False)
    return value


def _reference(hf: nn.Module, config: Any = None) -> nn.Module:
    """A weightless model of the same class (on the meta device): its parameter names and modules."""
    with torch.device("meta"):
        return type(hf)(copy.deepcopy(config if config is not None else hf.config))


def adapter(model: nn.Module):
    """TransformerLens 4's architecture adapter of ``model``: a bridge's own, or for a raw Hugging Face
    model one built from its config as ``boot_transformers`` builds it (nothing is booted)."""
    if model_kind(model) == ModelKind.HF_BRIDGE:
        return model.adapter
    hf = hf_model(model)
    return _cached(("adapter",) + _config_key(hf), lambda: _build_adapter(hf))


def _build_adapter(hf: nn.Module):
    from ._compat import require

    require("transformer_lens")
    try:
        from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
        from transformer_lens.model_bridge.sources.transformers import source
    except ImportError:
        raise UnsupportedModelError(
            f"a raw Hugging Face {type(hf).__name__} is read through TransformerLens 4's architecture adapters; "
            f"the installed TransformerLens has none (3.x). Install transformer-lens>=4.") from None
    _check_family(hf)
    config = named_config(hf)
    dtype = next(hf.parameters()).dtype
    if config.model_type in OWN_ADAPTER_FAMILIES:  # a checked family TransformerLens has no adapter for (DINOv2): its
        # configuration read by TransformerLens as a ViT's, which it is under other module names (_hf_adapters)
        cfg = source.build_bridge_config_from_hf(config, "ViTModel", f"local/{config.model_type}", dtype)
        found = own_adapter(type(hf).__name__, config, cfg)
    else:
        try:
            arch = source.determine_architecture_from_hf_config(config)
        except ValueError as exc:  # TransformerLens lists every architecture it knows in this message: the first line says it
            raise UnsupportedModelError(f"TransformerLens 4 has no architecture adapter for {type(hf).__name__} "
                                        f"({str(exc).splitlines()[0][:120]}…)") from None
        cfg = source.build_bridge_config_from_hf(config, arch, f"local/{config.model_type}", dtype)
        found = ArchitectureAdapterFactory.select_architecture_adapter(cfg)
    prepare = getattr(found, "prepare_model", None)
    if prepare is not None:  # name fixes that depend on the model (NeoX's embed_out), on a weightless copy
        ref, base = _reference(hf), base_prefix(hf)
        if base:  # the adapter is written for the language-model class, which holds a base model under its prefix
            holder = nn.Module()  # (RoBERTa's reads hf_model.roberta.embeddings: a RobertaModel has no .roberta)
            holder.add_module(base, ref)
            ref = holder
        prepare(ref)
    return found


def _activation(config) -> Optional[str]:
    """The MLP activation a family's module runs where TransformerLens's adapter does not say it (``_ACTIVATIONS``)."""
    act = _ACTIVATIONS.get(getattr(config, "model_type", None))
    return None if act is None else act(config)


def named_config(hf: nn.Module):
    """A copy of ``hf``'s config that names its architecture. A config built in code names none, and TransformerLens's
    fallback by ``model_type`` lacks some (``gemma3_text``, ``vit``, ``deit``): a language-model class, or a ViT or DeiT
    class (``_VISION_CLASSES``: the adapter is listed under those), is the architecture a checkpoint's config would name."""
    config = copy.deepcopy(hf.config)
    name = type(hf).__name__
    vision = getattr(config, "model_type", None) in VISION_FAMILIES and name in _VISION_CLASSES
    if not getattr(config, "architectures", None) and (name.endswith("ForCausalLM") or vision):
        config.architectures = [name]
    listed = _ADAPTER_CLASSES.get(getattr(config, "model_type", None))
    if listed and listed not in (config.architectures or []):  # tried after the classes the config names
        config.architectures = [*(config.architectures or []), listed]
    return config


def _check_family(hf: nn.Module) -> None:
    """Refuse a family whose layout facts are not checked here (``CHECKED_FAMILIES``), before anything reads them, a
    configuration whose own forward cannot run (``_hf_check.unrunnable``), a head no layout reads (``_hf_entries.
    unread_head``), and a configuration switch of a checked family that is not derived (``_UNDERIVED_SWITCHES``)."""
    family = getattr(hf.config, "model_type", None)
    why = check.unrunnable(hf.config) if family in CHECKED_FAMILIES else None
    if why:
        raise UnsupportedModelError(why)
    unread_head(hf)
    for switch, what in _UNDERIVED_SWITCHES.get(family, {}).items():
        value = getattr(hf.config, switch, None)
        if value not in (None, False):
            raise UnsupportedModelError(f"{switch}={value!r} {what}; its group is not derived here (docs/DERIVATIONS.md "
                                        f"§10), so nothing is transformed.")
    if family in _UNDERIVED_FAMILIES:
        raise UnsupportedModelError(f"its family {family!r} is not derived here: {_UNDERIVED_FAMILIES[family]}; nothing "
                                    f"is transformed (docs/DERIVATIONS.md §10, {'SigLIP' if family.startswith('siglip') else 'CLIP'}).")
    if family not in CHECKED_FAMILIES:
        raise UnsupportedModelError(
            f"its family {family!r} has not been checked against its own forward here (checked: "
            f"{', '.join(sorted(CHECKED_FAMILIES))}). The layout's facts (activation, norm placement, parallel "
            f"blocks) come from TransformerLens's adapter configuration, which can disagree with the model, so "
            f"nothing is transformed; docs/COVERAGE.md says what adding a family takes.")


def layout(model: nn.Module) -> Layout:
    """The :class:`Layout` of ``model`` (a bridge around a Hugging Face model, or a raw one); an
    :class:`UnsupportedModelError` naming what cannot be read."""
    hf = hf_model(model)
    found = _cached(("layout",) + _config_key(hf), lambda: _layout_or_error(model, hf))
    if isinstance(found, Exception):
        raise found
    return found


def _layout_or_error(model: nn.Module, hf: nn.Module):
    try:
        _check_family(hf)  # a bridge's adapter is its own: checked here too
        return _build_layout(adapter(model), hf)
    except UnsupportedModelError as exc:
        return exc


def base_prefix(hf: nn.Module) -> str:
    """For a base model without its head (``BertModel``, ``LlamaModel``: ``base_model`` is the model itself), the
    prefix its language-model class puts before every path the adapter maps (``"bert"``, ``"model"``); else ``""``."""
    prefix = getattr(hf, "base_model_prefix", "") or ""
    return prefix if prefix and getattr(hf, "base_model", None) is hf else ""


def _build_layout(ad, hf: nn.Module) -> Layout:
    ref = _reference(hf)
    base = base_prefix(hf)

    def local(path: str) -> str:
        """An adapter path (written for the language-model class) in this model: a base model drops the prefix."""
        return path[len(base) + 1:] if base and path.startswith(base + ".") else path
    n_layers = int(ad.cfg.n_layers)
    entries: dict[str, Entry] = {}
    unknown: list[str] = []

    family = getattr(hf.config, "model_type", None)
    qk_norms = family in QK_NORM_FAMILIES
    sandwich = family in SANDWICH_FAMILIES

    def known(key: str, leaf: str) -> bool:
        pattern = ".".join("{i}" if p.isdigit() else p for p in key.split("."))
        return pattern in _KNOWN or (qk_norms and pattern in _QK_NORMS) or (sandwich and pattern in _SANDWICH) or \
            (family in SINK_FAMILIES and pattern == "blocks.{i}.attn" and leaf == "sinks")

    def module(path: str) -> Optional[nn.Module]:
        try:
            return ref.get_submodule(path) if path else ref
        except AttributeError:
            return None  # a bridge-only component (the split q/k/v of a joint attention)

    paths: dict[str, str] = {}
    absent: list[tuple[str, str]] = []

    def walk(components: dict, prefix: str, path: str) -> None:
        for name, comp in components.items():
            if not prefix and name == "pooler":  # BERT's (ViT's) pooler, where the adapter maps it: read by heads as everywhere
                continue
            if not prefix and name == "embed" and family in VISION_FAMILIES:  # one module, its parameters placed one by one
                paths["embed"] = local(comp.name)
                entries.update((e.key, e) for e in vision_embeddings(paths["embed"], module(paths["embed"])))
                continue
            key, sub = f"{prefix}{name}", local(f"{path}.{comp.name}".strip(".")) if comp.name else path
            if family in MOE_FAMILIES and prefix and name == "mlp":  # the adapter's one MoE module: placed by its parts
                found, where = experts(key, sub, module(sub), family)
                entries.update((e.key, e) for e in found)
                paths.update(where)
                continue
            if family in DINO_FAMILIES and name in ("ls1", "ls2", "unembed"):  # a layer scale's lambda1; the classifier's
                paths[key] = sub  # two column halves (class token, patch mean) as strided views
                found = layer_scale(key, sub, module(sub)) if name != "unembed" else patch_mean_classifier(sub, module(sub))
                entries.update((e.key, e) for e in found)
                continue
            subs = dict(getattr(comp, "submodules", None) or {})
            if name == "blocks":
                for i in range(n_layers):
                    paths[f"{key}.{i}"] = f"{sub}.{i}"
                    walk(subs, f"{key}.{i}.", f"{sub}.{i}")
                continue
            if "qkv" in subs:
                qkv = subs.pop("qkv")
                for part in "qkv":
                    subs.pop(part, None)
                entries.update(fused_qkv(comp, f"{key}.", f"{sub}.{qkv.name}", module(f"{sub}.{qkv.name}"), ad.cfg))
            if hasattr(comp, "split_gate_up_matrix"):  # Phi-3's gate_up_proj: [gate | up], split by the adapter
                for part in ("gate", "in"):
                    subs.pop(part, None)
                path_ = f"{sub}.{comp.fused_attr}"
                entries.update(fused_gate_up(comp, f"{key}.", path_, module(path_)))
            m = module(sub)
            if m is None and comp.name is not None and not getattr(comp, "optional", False):
                absent.append((key, sub))
            if m is not None and comp.name is not None:
                paths[key] = sub
                for leaf, _ in m.named_parameters(recurse=False):
                    if not known(key, leaf):
                        unknown.append(f"{key} ({sub}.{leaf})")
                        continue
                    entries.setdefault(f"{key}.{leaf}", Entry(f"{key}.{leaf}", f"{sub}.{leaf}", type(m).__name__ == "Conv1D"))
            walk(subs, f"{key}.", sub)

    walk(ad.component_mapping, "", "")
    if getattr(hf.config, "model_type", None) == "bert" and paths.get("unembed") == "cls.seq_relationship":
        # BertForNextSentencePrediction: the adapter's "unembed" is the NSP head, which reads the pooler's tanh output
        # (like BertForSequenceClassification's classifier), not the stream: in no site's space, copied as it is. Read
        # as an unembedding, the stream's permutation moved its columns and changed the logits by 0.3.
        del paths["unembed"]
        for leaf in ("weight", "bias"):
            if f"unembed.{leaf}" in entries:
                entries[f"classifier.{leaf}"] = Entry(f"classifier.{leaf}", entries.pop(f"unembed.{leaf}").param)
    if family in VISION_FAMILIES and "unembed" in paths and "unembed.weight" not in entries:
        raise UnsupportedModelError(f"{type(hf).__name__} with num_labels=0: its classifier is an Identity, so its logits "
                                    f"are the class token's stream itself, in the basis a transform moves; not derived "
                                    f"here (read its base model, whose output is compared in the new basis).")
    for e in heads(hf, ref, base):
        entries.setdefault(e.key, e)
    if family == "siglip_vision_model" and module("head") is not None:  # its attention-pooling head (vision_use_head)
        paths["pool"] = "head"
        entries.update((e.key, e) for e in attention_pool("head", module("head")))
    if base and "project_out" in paths:
        raise UnsupportedModelError(f"a base {type(hf).__name__} with project_out returns the word space, not the stream "
                                    f"(OPT-350m); read it with its language-model head ({type(hf).__name__[:-5]}ForCausalLM).")
    if unknown:
        raise UnsupportedModelError(f"the components {unknown[:4]} have no place in the canonical "
                                    f"transformer layout (embeddings, norms, q/k/v/o, MLP in/gate/out, unembedding).")
    by_param: dict[int, list[str]] = {}
    names = dict(ref.named_parameters(remove_duplicate=False))
    check.qk_norm_sizes(ad.cfg, entries, names)
    reached = {id(names[e.param]) for e in entries.values() if e.param in names}
    for e in entries.values():
        if e.strided is None:
            by_param.setdefault(id(names[e.param]), []).append(e.key)
    tied = [tuple(keys) for keys in by_param.values() if len(keys) > 1]
    config = hf.config
    facts = {
        "family": getattr(config, "model_type", None),
        "gain_offset": 1.0 if getattr(ad.cfg, "rmsnorm_uses_offset", False) else 0.0,
        "post_ln": getattr(config, "model_type", None) in BERT_FAMILIES or getattr(config, "do_layer_norm_before", True) is False,
        "encoder": getattr(config, "model_type", None) in BERT_FAMILIES,
        "base": bool(base),  # no head: the model's output is the stream after the final norm (its last hidden state)
        # an embedding, not logits (CLIPVisionModelWithProjection's image_embeds: visual_projection of the pooled stream)
        "embeds": family == "clip_vision_model" and not base and "unembed" in paths,
        # SigLIP's attention-pooling head: its output (pooler_output) is compared in its own residual's new basis
        "pool": "pool" in paths,
        "parallel": bool(getattr(ad.cfg, "parallel_attn_mlp", False)),
        "qk_norm": any(e.key.endswith((".attn.q_norm.weight", ".attn.k_norm.weight")) for e in entries.values()),
        "act_fn": _activation(config),  # None: the adapter's configuration says it
    }
    fused = {e.key.rpartition('.')[0] for e in entries.values() if e.strided is not None}
    return Layout(list(entries.values()), tied, facts, {k: v for k, v in paths.items() if k not in fused},
                  modules={n: type(m) for n, m in ref.named_modules()}, settings={n: check.settings(m) for n, m in ref.named_modules()},
                  shapes={n: tuple(p.shape) for n, p in names.items()}, ties=check.ties(ref),
                  reached=frozenset(n for n, p in names.items() if id(p) in reached), absent=tuple(absent))


def unsupported(model: nn.Module) -> Optional[str]:
    """Why this Hugging Face model (or bridge) cannot be read in the canonical layout; None when it can. Checked
    once per model inside ``_layout.one_call`` (a transform asks for the map and again for the push: ~1 ms each
    for a 40M-parameter model)."""
    return per_call(model, "unsupported", lambda: _unsupported(model))


def _unsupported(model: nn.Module) -> Optional[str]:
    try:
        why = check.unread(model, hf_model(model), layout(model))
    except (UnsupportedModelError, ImportError) as exc:
        why = str(exc)
    if why is None:
        return None
    return f"{type(hf_model(model)).__name__} (model_type {getattr(hf_model(model).config, 'model_type', None)!r}): {why}"


def facts(model: nn.Module) -> dict:
    return layout(model).facts


def family(model: nn.Module) -> Optional[str]:
    """The Hugging Face ``model_type`` of a readable model (raw or in a bridge), or None."""
    if model_kind(model) not in (ModelKind.HF, ModelKind.HF_BRIDGE) or unsupported(model):
        return None
    return facts(model)["family"]


def is_post_ln(model: nn.Module) -> bool:
    """Post-LayerNorm (BERT, OPT-350m): the norms sit on the residual stream and cannot be folded away."""
    return model_kind(model) in (ModelKind.HF, ModelKind.HF_BRIDGE) and facts(model)["post_ln"]


def _read_fact(model: nn.Module, key: str) -> bool:
    """A layout fact of a Hugging Face model read here; False for any other model and for a refused one."""
    return model_kind(model) in (ModelKind.HF, ModelKind.HF_BRIDGE) and not unsupported(model) and facts(model)[key]


def is_base(model: nn.Module) -> bool:
    """A base model read here (``LlamaModel``): no unembedding, its output is ``last_hidden_state``."""
    return _read_fact(model, "base")


def returns_embeddings(model: nn.Module) -> bool:
    """A model whose output is an embedding read from the final norm's output (CLIPVisionModelWithProjection's
    ``image_embeds``): compared as it is (no softmax), beside that norm's output in the new basis."""
    return _read_fact(model, "embeds")


def pooling_head(model: nn.Module) -> Optional[str]:
    """The module path of an attention-pooling head whose output (SigLIP's pooler_output) ``verify`` compares in its
    residual's new basis (site ``pool.resid``), or None."""
    return layout(model).paths.get("pool") if _read_fact(model, "pool") else None


def is_encoder(model: nn.Module) -> bool:
    """An encoder whose layout is read here (BERT); False for a refused family (``verify`` then compares logits)."""
    return _read_fact(model, "encoder")


def gain_offset(model: nn.Module) -> float:
    """What a norm adds to its stored weight to make its gain: 1 for Gemma's ``(1 + w)``, else 0."""
    return facts(model)["gain_offset"] if model_kind(model) in (ModelKind.HF, ModelKind.HF_BRIDGE) else 0.0


def config(model: nn.Module):
    """The TransformerLens config of ``model`` (a raw Hugging Face model's comes from its adapter)."""
    return model.cfg if model_kind(model) != ModelKind.HF else adapter(model).cfg


def views(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter under its bridge-layout key, as a view of the model's own (detached) tensor."""
    hf = hf_model(model)
    own = {k.replace("._original_component", ""): p.detach() for k, p in hf.named_parameters(remove_duplicate=False)}
    out = {}
    for e in layout(model).entries:
        t = own[e.param]
        if e.strided is not None:
            if not t.is_contiguous():
                t = t.contiguous()  # a copy: writing it would not reach the model (only read so)
            size, stride, offset = e.strided
            out[e.key] = t.as_strided(size, stride, t.storage_offset() + offset)
        else:
            out[e.key] = t.T if e.transpose and t.ndim == 2 else t
    return out
