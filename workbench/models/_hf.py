"""Hugging Face models inside TransformerLens bridges: their own weights, in the bridge's key layout.

A bridge from ``TransformerBridge.boot_transformers`` wraps a Hugging Face model in place, and exposes
views of some weights next to the originals (GPT-2's joint ``c_attn`` *and* split q/k/v; writes to
those views are not reliably seen by the forward pass). We therefore never write into a live bridge:
the weights are read from the Hugging Face model's own parameters (``_original_component`` stripped
from the names, kept only if a freshly built model of the same class has them), renamed to the
bridge's key layout (``blocks.0.attn.q.weight``, ``nn.Linear`` layout), and a transformed model is a
fresh Hugging Face model — built from the config, loaded with the new weights — wrapped by a new bridge.

Families mapped (``config.model_type``): ``gpt2`` (Conv1D layouts, a joint ``c_attn``), ``llama``
(``nn.Linear``, grouped-query attention, gated MLP) and ``bert`` (``BertForMaskedLM``: post-LayerNorm,
token-type embeddings, an MLM head whose decoder is tied to the word embeddings).
"""
from __future__ import annotations

import copy
import re
from typing import Any, Optional

import torch
from torch import nn

from .._errors import IncompatibleWeightsError, InvalidOptionError, UnsupportedModelError

# (Hugging Face name pattern, bridge name) per family; {i} is the layer, {p} the parameter leaf.
_RENAMES: dict[str, list[tuple[str, str]]] = {
    "gpt2": [
        (r"transformer\.wte\.weight", "embed.weight"),
        (r"transformer\.wpe\.weight", "pos_embed.weight"),
        (r"transformer\.h\.(\d+)\.ln_1\.(weight|bias)", r"blocks.\1.ln1.\2"),
        (r"transformer\.h\.(\d+)\.ln_2\.(weight|bias)", r"blocks.\1.ln2.\2"),
        (r"transformer\.h\.(\d+)\.attn\.c_attn\.(weight|bias)", r"blocks.\1.attn.qkv.\2"),  # split below
        (r"transformer\.h\.(\d+)\.attn\.c_proj\.(weight|bias)", r"blocks.\1.attn.o.\2"),
        (r"transformer\.h\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"blocks.\1.mlp.in.\2"),
        (r"transformer\.h\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"blocks.\1.mlp.out.\2"),
        (r"transformer\.ln_f\.(weight|bias)", r"ln_final.\1"),
        (r"lm_head\.weight", "unembed.weight"),
    ],
    "llama": [
        (r"model\.embed_tokens\.weight", "embed.weight"),
        (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
        (r"model\.layers\.(\d+)\.mlp\.gate_proj\.(weight|bias)", r"blocks.\1.mlp.gate.\2"),
        (r"model\.layers\.(\d+)\.mlp\.up_proj\.(weight|bias)", r"blocks.\1.mlp.in.\2"),
        (r"model\.layers\.(\d+)\.mlp\.down_proj\.(weight|bias)", r"blocks.\1.mlp.out.\2"),
        (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blocks.\1.ln1.weight"),
        (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blocks.\1.ln2.weight"),
        (r"model\.norm\.weight", "ln_final.weight"),
        (r"lm_head\.weight", "unembed.weight"),
    ],
    "bert": [
        (r"bert\.embeddings\.word_embeddings\.weight", "embed.weight"),
        (r"bert\.embeddings\.position_embeddings\.weight", "pos_embed.weight"),
        (r"bert\.embeddings\.token_type_embeddings\.weight", "token_type_embed.weight"),
        (r"bert\.embeddings\.LayerNorm\.(weight|bias)", r"embed_ln.\1"),
        (r"bert\.encoder\.layer\.(\d+)\.attention\.self\.query\.(weight|bias)", r"blocks.\1.attn.q.\2"),
        (r"bert\.encoder\.layer\.(\d+)\.attention\.self\.key\.(weight|bias)", r"blocks.\1.attn.k.\2"),
        (r"bert\.encoder\.layer\.(\d+)\.attention\.self\.value\.(weight|bias)", r"blocks.\1.attn.v.\2"),
        (r"bert\.encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.o.\2"),
        (r"bert\.encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias)", r"blocks.\1.ln1.\2"),
        (r"bert\.encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"blocks.\1.mlp.in.\2"),
        (r"bert\.encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"blocks.\1.mlp.out.\2"),
        (r"bert\.encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|bias)", r"blocks.\1.ln2.\2"),
        (r"cls\.predictions\.transform\.dense\.(weight|bias)", r"mlm_head.\1"),
        # In the bridge, ``ln_final`` is the MLM head's LayerNorm (after its dense + GELU).
        (r"cls\.predictions\.transform\.LayerNorm\.(weight|bias)", r"ln_final.\1"),
        (r"cls\.predictions\.decoder\.weight", "unembed.weight"),
        (r"cls\.predictions\.(decoder\.)?bias", "unembed.bias"),
    ],
}
#: the Hugging Face classes whose layout is mapped, per family
CLASSES = {"gpt2": ("GPT2LMHeadModel",), "llama": ("LlamaForCausalLM",), "bert": ("BertForMaskedLM",)}


def family(model: nn.Module) -> Optional[str]:
    """The mapped family of a bridge around a Hugging Face model, or None."""
    hf = getattr(model, "original_model", None)
    fam = getattr(getattr(hf, "config", None), "model_type", None)
    return fam if fam in CLASSES and type(hf).__name__ in CLASSES[fam] else None


def unsupported(model: nn.Module) -> Optional[str]:
    """Why the weights of this Hugging Face bridge cannot be mapped (None when they can)."""
    if family(model) is not None:
        return None
    hf = model.original_model
    mapped = ", ".join(c for cs in CLASSES.values() for c in cs)
    return (f"a bridge around Hugging Face {type(hf).__name__} (model_type "
            f"{getattr(hf.config, 'model_type', None)!r}): its weight layout is not mapped, so nothing is transformed; "
            f"mapped: {mapped}, native bridges and HookedTransformer.")


def is_post_ln(model: nn.Module) -> bool:
    """Post-LayerNorm (BERT): the norms sit on the residual stream itself and cannot be folded away."""
    return family(model) == "bert"


def is_encoder(model: nn.Module) -> bool:
    return family(model) == "bert"


def _reference(hf: nn.Module, config: Any = None) -> nn.Module:
    """A weightless model of the same class (on the meta device): its parameter names and modules."""
    with torch.device("meta"):
        return type(hf)(copy.deepcopy(config if config is not None else hf.config))


def _rename(fam: str, key: str) -> Optional[str]:
    for pattern, target in _RENAMES[fam]:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, target, key)
    return None


def _is_conv1d(ref: nn.Module, key: str) -> bool:
    return type(ref.get_submodule(key.rpartition(".")[0])).__name__ == "Conv1D"  # GPT-2: weight [in, out]


def _own_state(hf: nn.Module) -> dict[str, torch.Tensor]:
    """The wrapped Hugging Face model's state under its own names (the bridge's ``_original_component``
    levels removed), detached; bridge-only entries (split q/k/v views) are there too, unused."""
    return {k.replace("._original_component", ""): v.detach() for k, v in hf.state_dict().items()}


def read_bridge_layout(model: nn.Module) -> dict[str, torch.Tensor]:
    """The Hugging Face model's parameters under bridge names, in ``nn.Linear`` layout (detached)."""
    fam = family(model)
    hf = model.original_model
    own = _own_state(hf)
    ref = _reference(hf)
    out: dict[str, torch.Tensor] = {}
    for key, _ in ref.named_parameters(remove_duplicate=False):
        name = _rename(fam, key)
        if name is None:
            raise UnsupportedModelError(f"the {type(hf).__name__} parameter {key!r} has no place in the mapped {fam} layout.")
        t = own[key]
        if _is_conv1d(ref, key) and t.ndim == 2:
            t = t.T
        if name.endswith(".qkv.weight") or name.endswith(".qkv.bias"):  # GPT-2's joint c_attn: [3·d, d] rows
            stem, _, leaf = name.rpartition(".")
            for part, chunk in zip("qkv", t.chunk(3, dim=0)):
                out[f"{stem[:-3]}{part}.{leaf}"] = chunk
        elif name not in out:  # tied names (MLM decoder bias) map to one bridge key
            out[name] = t
    return out


def _hf_value(fam: str, ref: nn.Module, key: str, bridge: dict[str, torch.Tensor]) -> torch.Tensor:
    name = _rename(fam, key)
    stem, _, leaf = name.rpartition(".")
    if stem.endswith(".qkv"):
        t = torch.cat([bridge[f"{stem[:-3]}{p}.{leaf}"] for p in "qkv"], dim=0)
    else:
        t = bridge[name]
    return t.T if _is_conv1d(ref, key) and t.ndim == 2 else t


def rebuild(model: nn.Module, bridge: dict[str, torch.Tensor], dtype: torch.dtype, untie: bool = False) -> nn.Module:
    """A new bridge around a fresh Hugging Face model carrying ``bridge`` (bridge-layout weights).

    Tied weights (GPT-2's and BERT's unembedding = word embeddings) must still agree, or it is an
    error; ``untie=True`` builds the model with ``tie_word_embeddings=False`` (separate tensors).
    """
    import warnings

    from ._compat import require

    require("transformer_lens")
    from transformer_lens.model_bridge import TransformerBridge

    fam = family(model)
    hf = model.original_model
    config = copy.deepcopy(hf.config)
    ref = _reference(hf, config)
    values = {k: _hf_value(fam, ref, k, bridge) for k, _ in ref.named_parameters(remove_duplicate=False)}
    clash = None if untie else _tie_clash(ref, values)
    if clash:
        raise InvalidOptionError(f"{clash[0]} and {clash[1]} are tied in this {type(hf).__name__}, but the transform gives them "
                         f"different values (a map on the residual stream that is not orthogonal). Untie them first "
                         f"(model = wb.untie_embeddings(model)), or use the stream's own group.")
    if untie and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False  # the parameter names stay the same: ``values`` still fits
    buffers = _own_state(hf)
    with warnings.catch_warnings(), _no_hf_init():
        warnings.simplefilter("ignore")
        fresh = type(hf)(config)
        fresh.tie_weights()  # skipped under no_init_weights; a no-op when the config unties them
        with torch.no_grad():  # cast before loading, or float64 weights are rounded through float32 parameters
            for p in fresh.parameters():  # parameters only: rotary inv_freq buffers stay float32, as HF keeps them
                p.data = p.data.to(dtype)
        state = dict(values)
        state.update({k: buffers[k] for k in fresh.state_dict() if k not in state and k in buffers})
        missing, unexpected = fresh.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise IncompatibleWeightsError(f"weights do not fit {type(hf).__name__}: missing {missing}, unexpected {unexpected}")
        fresh.eval()
        new = TransformerBridge.boot_transformers(model.cfg.model_name, hf_model=fresh, tokenizer=model.tokenizer,
                                                  dtype=dtype)
    return new.train(model.training)


def _tie_clash(ref: nn.Module, values: dict[str, torch.Tensor]) -> Optional[tuple[str, str]]:
    """Two names of one tied parameter whose new values differ (beyond float64 rounding)."""
    first: dict[int, str] = {}
    for key, p in ref.named_parameters(remove_duplicate=False):
        if id(p) in first:
            a, b = values[first[id(p)]], values[key]
            if a.shape != b.shape or not torch.allclose(a.double(), b.double(), rtol=1e-9, atol=1e-12 * float(a.abs().max())):
                return first[id(p)], key
        else:
            first[id(p)] = key
    return None


class _no_hf_init:
    """Skip Hugging Face's random initialisation of a model whose parameters are all loaded next."""

    def __enter__(self):
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # transformers 4.x
            from transformers.modeling_utils import no_init_weights
        self.ctx = no_init_weights()
        return self.ctx.__enter__()

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)
