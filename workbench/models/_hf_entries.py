"""Entries of a Hugging Face model's canonical layout (``_hf.py``) that walking TransformerLens's component mapping does
not give: heads the mapping leaves out (BERT's pooler, classifiers, a decoder's score), a ViT's embeddings, which
the mapping gives as one component (``embed``) whose parameters the canonical layout places one by one, a sparse
mixture of experts (Mixtral), which the mapping gives as one module delegating to its own forward, and the parts of a
fused projection (q/k/v, gate/up), measured through the adapter's own split as strided views.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .._errors import UnsupportedModelError

# BERT's encoder (word, position and token-type embeddings into a LayerNorm, post-LN blocks, a pooler on the first
# token) under its own family names: RoBERTa is BERT's modules with positions counted from padding_idx + 1 (which rows
# of the position table a token reads: no channel) and its own heads (docs/DERIVATIONS.md §10, BERT and RoBERTa).
BERT_FAMILIES = frozenset({"bert", "roberta", "xlm-roberta"})
# Each BERT-like family's MLM head bias (read by nothing when the head is untied) and its decoder's own.
_MLM_BIASES = {"bert": ("cls.predictions.bias", "cls.predictions.decoder.bias"),
               "roberta": ("lm_head.bias", "lm_head.decoder.bias"), "xlm-roberta": ("lm_head.bias", "lm_head.decoder.bias")}
# Families whose embeddings are a ViT's (patches, a class token, learned positions): docs/DERIVATIONS.md §10, ViT.
# (DeiT: ViT's modules and a distillation token; DINOv2: a mask token in its configuration, registers, layer scales)
# CLIP's vision tower: a class embedding [d], a bias-free patch projection, positions in an nn.Embedding; SigLIP's: no
# class token, a patch projection with bias, positions in an nn.Embedding)
VISION_FAMILIES = frozenset({"vit", "deit", "dinov2", "dinov2_with_registers", "clip_vision_model", "siglip_vision_model"})
# Families whose blocks scale each output channel before the residual add (DINOv2's layer_scale1/2.lambda1, mapped as
# ``ls1``/``ls2`` by ``_hf_adapters``) and whose classifier reads [class token, mean of the patch tokens] (2·d_model
# columns): docs/DERIVATIONS.md §10, DINOv2.
DINO_FAMILIES = frozenset({"dinov2", "dinov2_with_registers"})
# A ViTEmbeddings' parameters (under the module TransformerLens maps to ``embed``) -> bridge-layout key. Each writes the
# residual stream: the patch projection is a Conv2d whose output channel (dim 0) is the stream's; the class token
# [1, 1, d] and the position embeddings [1, 1 + patches, d] are added along it (``_layout.to_canonical`` drops the
# leading 1s).
_VIT_EMBEDDINGS = {"patch_embeddings.projection.weight": "patch_embed.weight",
                   "patch_embeddings.projection.bias": "patch_embed.bias",
                   "cls_token": "cls_token.weight", "position_embeddings": "pos_embed.weight",
                   "distillation_token": "dist_token.weight",  # DeiT's second token [1, 1, d], after the class token
                   # DINOv2's mask token [1, d] (replaces the masked patches' embeddings where bool_masked_pos says so)
                   # and its registers [1, registers, d] (inserted after the class token, with no position): writers
                   "mask_token": "mask_token.weight", "register_tokens": "reg_tokens.weight",
                   # CLIP's (CLIPVisionEmbeddings): its class embedding [d], its bias-free patch Conv2d, its position
                   # table [1 + patches, d] (an nn.Embedding read at position_ids, all of them in order)
                   "class_embedding": "cls_token.weight", "patch_embedding.weight": "patch_embed.weight",
                   "position_embedding.weight": "pos_embed.weight",
                   "patch_embedding.bias": "patch_embed.bias"}  # SigLIP's patch Conv2d has a bias

# Families whose MLP is a sparse mixture of experts read here (docs/DERIVATIONS.md §10, Mixtral, OLMoE, Qwen3-MoE,
# Qwen2-MoE, GPT-OSS): a router reading the stream and experts stored as fused 3-D tensors, each expert a SwiGLU
# (GPT-OSS's clamped, with biases: ``_gpt_oss_experts``).
MOE_FAMILIES = frozenset({"mixtral", "olmoe", "qwen3_moe", "qwen2_moe", "gpt_oss"})
# The modules such a block holds, by attribute and class: anything else in it (a router bias, another module) is
# refused. Qwen2-MoE's adds a shared expert (a gated MLP every token meets) scaled by sigmoid(shared_expert_gate(x)).
_MOE_MODULES = {
    "mixtral": {"gate": "MixtralTopKRouter", "experts": "MixtralExperts"},
    "olmoe": {"gate": "OlmoeTopKRouter", "experts": "OlmoeExperts"},
    "qwen3_moe": {"experts": "Qwen3MoeExperts", "gate": "Qwen3MoeTopKRouter"},
    "qwen2_moe": {"gate": "Qwen2MoeTopKRouter", "experts": "Qwen2MoeExperts", "shared_expert": "Qwen2MoeMLP",
                  "shared_expert_gate": "Linear"},
    "gpt_oss": {"router": "GptOssTopKRouter", "experts": "GptOssExperts"},
}
# GPT-OSS's experts' activation, as the layout's facts name it (``act_fn``): per hidden unit, with g = min(gate, limit)
# and u = clamp(up, -limit, limit), (u + 1)·g·sigmoid(alpha·g); its group is the permutations only (docs/DERIVATIONS.md
# §10, GPT-OSS: neither branch takes a scale).
CLAMPED_SWIGLU = "clamped_swiglu"
# GPT-OSS's block (GptOssMLP): a router with a bias, and experts stored input-major, [experts, d_model, 2·d_mlp] with
# gate and up interleaved (``gate_up[..., ::2]``, ``gate_up[..., 1::2]``), each with a bias, and a down projection
# [experts, d_mlp, d_model] with a bias: its parameters, exactly.
_GPT_OSS_PARAMS = sorted(["router.weight", "router.bias", "experts.gate_up_proj", "experts.gate_up_proj_bias",
                          "experts.down_proj", "experts.down_proj_bias"])
# A family's dense MLP, which a layer holds in place of the mixture (Qwen's ``mlp_only_layers``, ``decoder_sparse_step``):
# act(gate_proj(x)) ⊙ up_proj(x) through down_proj, no biases — a Llama MLP.
_DENSE_MLP = {"qwen3_moe": "Qwen3MoeMLP", "qwen2_moe": "Qwen2MoeMLP"}
_GATED_MLP = {"gate_proj.weight": "gate.weight", "up_proj.weight": "in.weight", "down_proj.weight": "out.weight"}


@dataclass(frozen=True)
class Entry:
    key: str  # bridge-layout key, e.g. "blocks.0.attn.q.weight"
    param: str  # the Hugging Face parameter's name
    transpose: bool = False  # Conv1D stores [in, out]
    strided: Optional[tuple] = None  # part of a fused tensor: (size, stride, offset) of its view


def vision_embeddings(path: str, embeddings: nn.Module) -> list[Entry]:
    """The entries of a ViT's embeddings module at ``path``; a parameter of it not in ``_VIT_EMBEDDINGS`` is refused by
    name (a model built with ``use_mask_token=True`` is refused before: ``ViTModel(config)`` builds no mask token, so
    a transformed model could not have one, ``_hf_check.unread``)."""
    names = [n for n, _ in embeddings.named_parameters()]
    other = [n for n in names if n not in _VIT_EMBEDDINGS]
    if other:
        raise UnsupportedModelError(f"the ViT embeddings' parameters {[f'{path}.{n}' for n in other]} have no derived "
                                    f"place in the residual stream's writers; nothing is transformed.")
    return [Entry(_VIT_EMBEDDINGS[n], f"{path}.{n}") for n in names]


def layer_scale(key: str, path: str, scale: Optional[nn.Module]) -> list[Entry]:
    """A DINOv2 layer scale at ``path`` (``Dinov2LayerScale``: ``x * lambda1``, one gain per stream channel), component
    key ``key`` (``blocks.0.ls1``): its ``lambda1`` under ``{key}.weight``. Any other parameter in it is refused."""
    names = [] if scale is None else [n for n, _ in scale.named_parameters()]
    if names != ["lambda1"]:
        raise UnsupportedModelError(f"the layer scale {path} holds {names}, not one lambda1; not read.")
    return [Entry(f"{key}.weight", f"{path}.lambda1")]


def patch_mean_classifier(path: str, classifier: Optional[nn.Module]) -> list[Entry]:
    """DINOv2's classifier at ``path``: a Linear of ``[class token ; mean of the patch tokens]`` (2·d_model inputs) after
    the final LayerNorm. Its two column halves read the stream (the mean over positions commutes with any map of the
    channels), as ``unembed`` (the class token's) and ``unembed_patches`` (the patch mean's), strided views of its
    weight; its bias is in no site's space. An Identity (num_labels=0) has none: ``_hf`` refuses it by name."""
    if not isinstance(classifier, nn.Linear):
        return []
    n, two_d = classifier.weight.shape
    d = two_d // 2
    half = ((n, d), (two_d, 1))
    out = [Entry("unembed.weight", f"{path}.weight", False, (*half, 0)),
           Entry("unembed_patches.weight", f"{path}.weight", False, (*half, d))]
    return out + ([Entry("unembed.bias", f"{path}.bias")] if classifier.bias is not None else [])


# Heads no layout reads, by module name, with why: refused naming the head before anything else is read (a class that
# holds its backbone under another prefix than the adapter's, LlamaForQuestionAnswering's ``transformer``, was refused
# listing every backbone parameter as unmapped, never the head).
_UNREAD_HEADS = {"qa_outputs": "a question-answering head: start and end logits per token, two outputs where verify "
                               "compares one"}


def unread_head(hf: nn.Module) -> None:
    """Refuse a model holding a head of ``_UNREAD_HEADS``, by name."""
    for name, why in _UNREAD_HEADS.items():
        if isinstance(getattr(hf, name, None), nn.Module):
            base = type(getattr(hf, "base_model", hf)).__name__
            raise UnsupportedModelError(f"its {name} is {why}; not read here, so nothing is transformed (its base model, "
                                        f"{base}, is read).")


def heads(hf: nn.Module, ref: nn.Module, base: str) -> list[Entry]:
    """Heads TransformerLens's mapping leaves out, where this class's forward is known: BERT's and ViT's pooler (a dense
    layer reading the first token's stream after the final norm, then tanh; ViT's activation is ``pooler_act``, its
    width ``pooler_output_size``: neither is in a site's space), whose output a ``BertForSequenceClassification``'s classifier
    reads (in no site's space: an entry only so that it is copied); a token classifier and a decoder's
    sequence-classification ``score``, which read the stream (the latter after the final norm, at the last token)."""
    def present(path: str) -> bool:
        try:
            ref.get_submodule(path)
            return True
        except AttributeError:
            return False

    entries = []
    family, cls = getattr(hf.config, "model_type", None), type(hf).__name__
    pooler = "pooler.dense" if base or not getattr(hf, "base_model_prefix", "") else f"{hf.base_model_prefix}.pooler.dense"
    if (family in BERT_FAMILIES or family in VISION_FAMILIES) and present(pooler):
        entries += [Entry(f"pooler.{leaf}", f"{pooler}.{leaf}") for leaf in ("weight", "bias")]
        if cls == "BertForSequenceClassification":  # reads the pooled (tanh) output, no site's space: copied as it is
            entries += [Entry(f"classifier.{leaf}", f"classifier.{leaf}") for leaf in ("weight", "bias")]
    if family in BERT_FAMILIES - {"bert"} and cls.endswith("ForSequenceClassification") and present("classifier.dense"):
        # RobertaClassificationHead: dense and tanh on the first token's final stream — the pooler's computation, so it
        # takes the pooler's place as a reader of the stream — then out_proj on that tanh output (no site's space: copied)
        entries += [Entry(f"pooler.{leaf}", f"classifier.dense.{leaf}") for leaf in ("weight", "bias")]
        entries += [Entry(f"classifier.{leaf}", f"classifier.out_proj.{leaf}") for leaf in ("weight", "bias")]
    names = dict(ref.named_parameters(remove_duplicate=False))
    own, decoder = _MLM_BIASES.get(family, ("", ""))
    if own in names and decoder in names and names[own] is not names[decoder]:
        # an untied MLM head (tie_word_embeddings=False, as wb.untie_embeddings leaves it): the decoder adds its own
        # bias, and cls.predictions.bias (tied to it otherwise) is read by nothing; a vector over the vocabulary, which
        # no site moves: copied as it is
        entries.append(Entry("mlm_vocab.bias", own))
    if family == "bert" and cls == "BertForTokenClassification":  # a label per token, read from its stream
        entries += [Entry(f"score.{leaf}", f"classifier.{leaf}") for leaf in ("weight", "bias")]
    if family != "bert" and cls.endswith("ForSequenceClassification") and present("score"):
        entries += [Entry(f"score.{leaf}", f"score.{leaf}") for leaf, _ in ref.score.named_parameters(recurse=False)]
    if family != "bert" and cls.endswith("ForTokenClassification"):  # a label per token, read from the final stream
        head = next((h for h in ("score", "classifier") if present(h)), None)  # (GPT-2, GPT-NeoX, GPT-Neo: classifier)
        if head is not None and isinstance(ref.get_submodule(head), nn.Linear):
            entries += [Entry(f"score.{leaf}", f"{head}.{leaf}") for leaf, _ in ref.get_submodule(head).named_parameters(recurse=False)]
    return entries


# SigLIP's attention-pooling head (SiglipMultiheadAttentionPoolingHead) -> its parameters by bridge-layout key: the probe
# [1, 1, d] (the one query's input), the nn.MultiheadAttention's out_proj, the LayerNorm and the MLP (fc1, fc2); its
# fused in_proj_weight [3d, d] and in_proj_bias [3d] are split into q, k, v as strided views (rows [q; k; v], each head
# d_head consecutive rows, as F.multi_head_attention_forward reads them). docs/DERIVATIONS.md §10, SigLIP.
_POOL = {"probe": "pool.probe.weight", "attention.out_proj.weight": "pool.attn.o.weight",
         "attention.out_proj.bias": "pool.attn.o.bias", "layernorm.weight": "pool.ln.weight",
         "layernorm.bias": "pool.ln.bias", "mlp.fc1.weight": "pool.mlp.in.weight", "mlp.fc1.bias": "pool.mlp.in.bias",
         "mlp.fc2.weight": "pool.mlp.out.weight", "mlp.fc2.bias": "pool.mlp.out.bias"}
_POOL_MODULES = {"attention": "MultiheadAttention", "layernorm": "LayerNorm", "mlp": "SiglipMLP"}


def attention_pool(path: str, head: Optional[nn.Module]) -> list[Entry]:
    """The entries of SigLIP's attention-pooling head at ``path`` (``_POOL``; q, k and v of its fused in-projection as
    strided views). A head holding other modules or parameters (an nn.MultiheadAttention with separate q/k/v weights,
    bias_k/bias_v, no bias) is refused by name."""
    names = sorted(n for n, _ in head.named_parameters())
    modules = {n: type(m).__name__ for n, m in head.named_children()}
    want = sorted([*_POOL, "attention.in_proj_weight", "attention.in_proj_bias"])
    if names != want or modules != _POOL_MODULES:
        raise UnsupportedModelError(f"the attention-pooling head {path} holds {modules} with parameters {names}; only "
                                    f"{_POOL_MODULES} with parameters {want} is derived; nothing is transformed.")
    d = head.attention.in_proj_weight.shape[1]
    entries = [Entry(key, f"{path}.{name}") for name, key in _POOL.items()]
    for i, part in enumerate("qkv"):
        entries.append(Entry(f"pool.attn.{part}.weight", f"{path}.attention.in_proj_weight", False, ((d, d), (d, 1), i * d * d)))
        entries.append(Entry(f"pool.attn.{part}.bias", f"{path}.attention.in_proj_bias", False, ((d,), (1,), i * d)))
    return entries


def experts(key: str, path: str, block: Optional[nn.Module], family: str) -> tuple[list[Entry], dict[str, str]]:
    """The entries of a sparse mixture-of-experts block (Mixtral's ``MixtralSparseMoeBlock``, OLMoE's, Qwen's) at
    ``path``, component key ``key`` (``blocks.0.mlp``), and the module paths where its parts are seen: the router
    ``{key}.router`` (``gate.weight`` [experts, d_model], a reader of the stream; its output's first element is its
    logits) and every expert's SwiGLU at once, 3-D with the expert first: ``{key}.experts.gate`` and ``{key}.experts.in``
    [experts, d_mlp, d_model] as strided views of the fused ``experts.gate_up_proj`` [experts, 2·d_mlp, d_model]
    (each expert's rows: gate first, then up, as its forward's ``chunk(2)`` reads them), ``{key}.experts.out`` the
    ``experts.down_proj`` [experts, d_model, d_mlp] itself. Qwen2-MoE's shared expert is a gated MLP at
    ``{key}.shared`` (gate, in, out) and its gate ``{key}.shared_gate`` [1, d_model], one more reader of the stream.
    A layer whose ``mlp`` is the family's dense MLP (``_DENSE_MLP``) is read as a Llama MLP (``{key}.gate``, ``in``,
    ``out``). GPT-OSS's block is read by ``_gpt_oss_experts``. Any other module or parameter in the block is refused."""
    if block is None:
        raise UnsupportedModelError(f"the mixture-of-experts block {path} that the adapter maps is not in this model.")
    if type(block).__name__ == _DENSE_MLP.get(family):  # a dense layer among the sparse ones
        return _linears(key, path, block, _GATED_MLP, "a dense MLP"), {key: path, f"{key}.in": f"{path}.up_proj",
                                                                       f"{key}.gate": f"{path}.gate_proj"}
    want = _MOE_MODULES[family]
    found = {n: type(m).__name__ for n, m in block.named_children()}
    if family == "gpt_oss":
        return _gpt_oss_experts(key, path, block, found, want)
    shared = "shared_expert" in want
    params = sorted(n for n, _ in block.named_parameters())
    expected = sorted(["experts.down_proj", "experts.gate_up_proj", "gate.weight"]
                      + ([f"shared_expert.{p}" for p in _GATED_MLP] + ["shared_expert_gate.weight"] if shared else []))
    if found != want or params != expected:
        raise UnsupportedModelError(f"the mixture-of-experts block {path} holds {found} with parameters {params}; only "
                                    f"{want} with parameters {expected} is derived.")
    E, two_n, d = block.experts.gate_up_proj.shape
    n = two_n // 2
    if two_n != 2 * n or tuple(block.experts.down_proj.shape) != (E, d, n) or tuple(block.gate.weight.shape) != (E, d):
        raise UnsupportedModelError(f"the experts of {path} have shapes {tuple(block.experts.gate_up_proj.shape)} and "
                                    f"{tuple(block.experts.down_proj.shape)}, not [experts, 2·d_mlp, d_model] and "
                                    f"[experts, d_model, d_mlp]; not read.")
    fused = f"{path}.experts.gate_up_proj"
    half = ((E, n, d), (two_n * d, d, 1))  # one half of every expert's rows, a strided view of the fused tensor
    entries = [Entry(f"{key}.router.weight", f"{path}.gate.weight"),
               Entry(f"{key}.experts.gate.weight", fused, False, (*half, 0)),
               Entry(f"{key}.experts.in.weight", fused, False, (*half, n * d)),
               Entry(f"{key}.experts.out.weight", f"{path}.experts.down_proj")]
    paths = {key: path, f"{key}.router": f"{path}.gate"}
    if shared:
        if tuple(block.shared_expert_gate.weight.shape) != (1, d):
            raise UnsupportedModelError(f"the shared expert's gate of {path} has shape "
                                        f"{tuple(block.shared_expert_gate.weight.shape)}, not [1, d_model]; not read.")
        entries += _linears(f"{key}.shared", f"{path}.shared_expert", block.shared_expert, _GATED_MLP, "a shared expert")
        entries.append(Entry(f"{key}.shared_gate.weight", f"{path}.shared_expert_gate.weight"))
        paths.update({f"{key}.shared.in": f"{path}.shared_expert.up_proj", f"{key}.shared.gate": f"{path}.shared_expert.gate_proj"})
    return entries, paths


def _gpt_oss_experts(key: str, path: str, block: nn.Module, found: dict, want: dict) -> tuple[list[Entry], dict[str, str]]:
    """GPT-OSS's mixture of experts at ``path`` (``GptOssMLP``) in the experts' canonical entries (``experts``): the
    router's weight [experts, d_model] and its bias [experts]; each expert's gate and up ``[experts, d_mlp, d_model]`` as
    strided views of the input-major ``gate_up_proj`` [experts, d_model, 2·d_mlp] (unit i's gate at column 2i, its up at
    2i + 1, as ``_apply_gate`` reads ``[..., ::2]`` and ``[..., 1::2]``), their biases likewise of ``gate_up_proj_bias``
    [experts, 2·d_mlp]; the down projection ``[experts, d_model, d_mlp]`` a transposed view of ``down_proj`` [experts,
    d_mlp, d_model], its bias [experts, d_model] as it is. Any other module, parameter or shape is refused."""
    params = sorted(n for n, _ in block.named_parameters())
    if found != want or params != _GPT_OSS_PARAMS:
        raise UnsupportedModelError(f"the mixture-of-experts block {path} holds {found} with parameters {params}; only "
                                    f"{want} with parameters {_GPT_OSS_PARAMS} is derived.")
    ex = block.experts
    E, d, two_n = ex.gate_up_proj.shape
    n = two_n // 2
    shapes = {"gate_up_proj_bias": (E, two_n), "down_proj": (E, n, d), "down_proj_bias": (E, d)}
    if two_n != 2 * n or any(tuple(getattr(ex, k).shape) != v for k, v in shapes.items()) or \
            tuple(block.router.weight.shape) != (E, d) or tuple(block.router.bias.shape) != (E,):
        raise UnsupportedModelError(f"the experts of {path} have shapes {tuple(ex.gate_up_proj.shape)} and "
                                    f"{tuple(ex.down_proj.shape)}, not [experts, d_model, 2·d_mlp] and [experts, d_mlp, "
                                    f"d_model]; not read.")
    fused, bias = f"{path}.experts.gate_up_proj", f"{path}.experts.gate_up_proj_bias"
    half = ((E, n, d), (d * two_n, 2, two_n))  # every expert's gate (offset 0) or up (offset 1) rows, [experts, d_mlp, d_model]
    half_b = ((E, n), (two_n, 2))
    entries = [Entry(f"{key}.router.weight", f"{path}.router.weight"), Entry(f"{key}.router.bias", f"{path}.router.bias"),
               Entry(f"{key}.experts.gate.weight", fused, False, (*half, 0)),
               Entry(f"{key}.experts.in.weight", fused, False, (*half, 1)),
               Entry(f"{key}.experts.gate.bias", bias, False, (*half_b, 0)),
               Entry(f"{key}.experts.in.bias", bias, False, (*half_b, 1)),
               Entry(f"{key}.experts.out.weight", f"{path}.experts.down_proj", False, ((E, d, n), (n * d, 1, d), 0)),
               Entry(f"{key}.experts.out.bias", f"{path}.experts.down_proj_bias")]
    return entries, {key: path, f"{key}.router": f"{path}.router"}


def _linears(key: str, path: str, mlp: nn.Module, names: dict, what: str) -> list[Entry]:
    """A gated MLP's three bias-free projections at ``path`` as entries under ``key`` (``names``: parameter -> key)."""
    params = sorted(n for n, _ in mlp.named_parameters())
    if params != sorted(names):
        raise UnsupportedModelError(f"{what} at {path} has parameters {params}; only {sorted(names)} is derived.")
    return [Entry(f"{key}.{k}", f"{path}.{p}") for p, k in names.items()]


def fused_gate_up(comp, prefix: str, path: str, fused: Optional[nn.Module]) -> dict[str, Entry]:
    """A fused gate/up projection's gate and up (``mlp.gate``, ``mlp.in``) as strided views, measured through the
    adapter's own split as ``_fused`` measures q/k/v."""
    if fused is None:
        raise UnsupportedModelError(f"a fused gate/up projection at {path} that this model does not build.")
    return _measured_split(path, fused, lambda holder: comp.split_gate_up_matrix(holder), ("gate", "in"), prefix, None)


def fused_qkv(comp, prefix: str, path: str, qkv: Optional[nn.Module], cfg) -> dict[str, Entry]:
    """q, k and v of a fused projection as strided views, measured through the adapter's own split."""
    if qkv is None or not hasattr(comp, "split_qkv_matrix"):
        raise UnsupportedModelError(f"a fused q/k/v projection at {path} without a split the adapter defines.")
    return _measured_split(path, qkv, comp.split_qkv_matrix, ("q", "k", "v"), prefix, int(cfg.d_head))


def _measured_split(path: str, fused: nn.Module, split, parts: tuple, prefix: str, dh: Optional[int]) -> dict[str, Entry]:
    """The adapter's ``split`` of the fused module at ``path``, run on a weight whose entries are their own flat indices:
    each part's indices (per head, ``[heads, d_head(, d_model)]``, where ``dh`` is given) as a strided view of the
    fused tensor; a split that is no strided view, or that does not cover every entry once, is refused."""
    holder, probe = nn.Module(), nn.Module()
    shapes = {leaf: p.shape for leaf, p in fused.named_parameters(recurse=False)}
    for leaf, shape in shapes.items():  # entries are their own flat indices (exact in float64 up to 2^53)
        setattr(probe, leaf, nn.Parameter(torch.arange(shape.numel(), dtype=torch.float64).reshape(shape), requires_grad=False))
    if "bias" not in shapes:  # an adapter's split may assume a bias (GPT-NeoX's asserts one): give it zeros, read none
        n_out = getattr(fused, "out_features", None) or getattr(fused, "nf", None) or shapes["weight"][0]
        probe.bias = nn.Parameter(torch.zeros(int(n_out), dtype=torch.float64), requires_grad=False)
    setattr(holder, path.rpartition(".")[2], probe)
    try:
        pieces = split(holder)
    except Exception as exc:  # the adapter's split assumes a layout this configuration does not have (GPT-BigCode's
        # assumes multi-query attention: with multi_query=False its split_with_sizes fails)
        raise UnsupportedModelError(f"TransformerLens's split of the fused projection {path} fails on this configuration "
                                    f"({type(exc).__name__}: {str(exc)[:160]}); its layout is not read.") from None
    out, seen = {}, {leaf: [] for leaf in shapes}
    for part, lin in zip(parts, pieces):
        for leaf in shapes:
            t = getattr(lin, leaf, None)
            if t is None:
                continue
            idx = t.detach().reshape(-1, dh, *t.shape[1:]) if dh else t.detach()  # [heads, d_head(, d_model)]
            strides = _strides(idx)
            if strides is None:
                raise UnsupportedModelError(f"the fused projection {path} splits into a {part} that is no strided view "
                                            f"of it; its layout is not supported.")
            seen[leaf].append(idx.flatten())
            out[f"{prefix}{part}.{leaf}"] = Entry(f"{prefix}{part}.{leaf}", f"{path}.{leaf}", False,
                                                   (tuple(idx.shape), strides, int(idx.flatten()[0])))
    for leaf, pieces in seen.items():
        got = torch.cat(pieces).sort().values if pieces else torch.empty(0)
        if not torch.equal(got, torch.arange(shapes[leaf].numel(), dtype=torch.float64)):
            raise UnsupportedModelError(f"the split of the fused projection {path}.{leaf} does not cover each entry once.")
    return out


def _strides(idx: torch.Tensor) -> Optional[tuple[int, ...]]:
    """The strides for which ``idx`` = offset + Σ iⱼ·strideⱼ, or None when it is no strided view."""
    flat0 = idx.flatten()[0]
    strides = []
    for d in range(idx.ndim):
        unit = [0] * idx.ndim
        if idx.shape[d] > 1:
            unit[d] = 1
        strides.append(int(idx[tuple(unit)] - flat0))
    grid = flat0 + sum(torch.arange(n, dtype=torch.float64).reshape([-1 if j == d else 1 for j in range(idx.ndim)]) * s
                       for d, (n, s) in enumerate(zip(idx.shape, strides)))
    return tuple(strides) if torch.equal(grid.expand(idx.shape), idx) else None
