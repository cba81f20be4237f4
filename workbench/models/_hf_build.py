"""Building a Hugging Face model (or a TransformerLens bridge around one) afresh, for a transformed model and for
measurements: the layout itself is read in ``_hf.py``.

A transformed model is a fresh Hugging Face model — built without random initialisation, cast
*before* loading (float64 values loaded into float32 parameters were rounded), its weights written —
and, for a bridge, wrapped by a new ``boot_transformers`` *after* the weights are in (the bridge
copies the fused q/k/v into split tensors at boot) — or, where that is provably the same, the new bridge
is a copy of a never-run template (``_hf_shell.py``). A live bridge is never written: those split
copies would not follow.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from ._hf import hf_model, named_config
from ._hf_check import rope_state
from ._kind import ModelKind, model_kind


def blank(model: nn.Module, dtype: torch.dtype, untie: bool = False) -> nn.Module:
    """A fresh Hugging Face model of ``model``'s class and config, parameters uninitialised in
    ``dtype`` (the caller writes every one), persistent buffers copied; ``untie``: built with
    ``tie_word_embeddings=False`` (the parameter names stay the same). For a bridge, the bare model, which
    :func:`finish` boots a bridge around (``_layout.blank`` first tries a copy of a template: ``_hf_shell``)."""
    import warnings

    hf = hf_model(model)
    config = copy.deepcopy(hf.config)
    eager_experts(config, dtype)
    if untie and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    buffers = {k.replace("._original_component", ""): b for k, b in hf.named_buffers()}
    with warnings.catch_warnings(), no_hf_init():
        warnings.simplefilter("ignore")
        fresh = type(hf)(config)
        fresh.tie_weights()  # skipped under no_init_weights; a no-op when the config unties them
    with torch.no_grad():
        for p in fresh.parameters():  # parameters only: rotary inv_freq buffers stay float32, as HF keeps them
            p.data = p.data.to(dtype)
        for name, b in fresh.named_buffers():
            if name in buffers and buffers[name].shape == b.shape:
                b.copy_(buffers[name])
    copy_rope_state(hf, fresh)
    return fresh.train(model.training)


def eager_experts(config, dtype: torch.dtype) -> None:
    """A copy in ``dtype`` whose ``config`` (the copy's own, never the model's) names an experts implementation other
    than Hugging Face's ``eager`` runs ``eager`` where ``dtype`` is float64. ``grouped_mm``, the default a mixture of
    experts loads with (``PreTrainedModel.get_correct_experts_implementation``), computes in float32, bfloat16 or float16
    only ("Expected mat_a to be Float32, BFloat16 or Float16 matrix, got Double"), as do the GPU kernels; the float64
    copies workbench measures on (the rotary pairs, verify's floor, ``verify(dtype=torch.float64)``) would fail inside
    transformers. ``eager`` computes the same function one expert at a time (tests/test_hf_mixtral.py's own forward).
    A copy in float32 or lower keeps the model's implementation (a float32 model's transformed model runs grouped_mm as
    the model does); a float64 model's runs ``eager``, the model's own grouped_mm being unable to run in float64."""
    if dtype != torch.float64:
        return

    def named(c):  # the config's and its sub-configs' (a composite model's text config holds its experts')
        yield getattr(c, "_experts_implementation", None)
        for key in getattr(c, "sub_configs", {}) or {}:
            if getattr(c, key, None) is not None:
                yield from named(getattr(c, key))

    if any(impl not in (None, "eager") for impl in named(config)):
        config._experts_implementation = "eager"  # (transformers' setter sets the sub-configs' too)


def copy_rope_state(hf: nn.Module, fresh: nn.Module) -> None:
    """Give ``fresh`` (a new model of ``hf``'s class, its buffers copied from ``hf``) the state a dynamic rotary embedding
    keeps beside its buffers (``_hf_check.rope_state``): how long a sequence its inv_freq was grown for, per kind of
    layer where each kind has its own rotary parameters. The grown inv_freq is copied with the buffers; without the
    length the fresh model would keep it where the original resets it at the next short input (a Llama with rope_type
    "dynamic", after a 40-token forward, transformed: log-probabilities on 9 tokens changed by 3e-2), or would grow it
    again where the original, already grown, does not."""
    own = {n.replace("._original_component", ""): m for n, m in hf.named_modules()}  # a bridge: the wrapped module last
    for name, m in fresh.named_modules():
        name = name.replace("._original_component", "")
        if name in own:
            for attr in rope_state(own[name]) & vars(own[name]).keys():
                value = vars(own[name])[attr]
                setattr(m, attr, value.clone() if isinstance(value, torch.Tensor) else value)


@contextlib.contextmanager
def rope_state_kept(model: nn.Module):
    """Every rotary embedding of ``model`` left as it was by a forward run inside (a probe the user did not ask for):
    a dynamic one grown past max_position_embeddings resets at a short input, and would then compute an input of a
    length in between with other frequencies (a Llama bridge grown by a 40-token input, after symmetry_map's
    two-token probe of its hooks: log-probabilities on 20 tokens changed by 6.5e-2). Its ``rope_state`` and its
    buffers (longrope's inv_freq is written in place) are restored."""
    saved = []
    for m in model.modules():
        names = rope_state(m) & vars(m).keys()
        if names:
            saved.append((m, {k: vars(m)[k] for k in names},
                          {k: (b, b.clone()) for k, b in m._buffers.items() if b is not None}))
    try:
        yield
    finally:
        with torch.no_grad():
            for m, attrs, buffers in saved:
                for k in (rope_state(m) & vars(m).keys()) - attrs.keys():  # set by the forward inside
                    delattr(m, k)
                vars(m).update(attrs)
                for k, (b, values) in buffers.items():
                    m._buffers[k] = b
                    b.copy_(values)


def finish(model: nn.Module, fresh: nn.Module) -> nn.Module:
    """``fresh`` (a Hugging Face model whose weights are written) as the kind ``model`` is: wrapped by a
    new bridge for a bridge (unless ``fresh`` already is one: :func:`blank`'s ``shell``), itself for a raw
    model."""
    if model_kind(model) != ModelKind.HF_BRIDGE or model_kind(fresh) == ModelKind.HF_BRIDGE:
        return fresh
    new = boot(model.cfg.model_name, fresh, configured(model.tokenizer))
    return new.train(model.training)


def boot(name: str, fresh: nn.Module, tokenizer):
    """``TransformerBridge.boot_transformers`` around ``fresh``, without two pieces of work that make nothing
    the bridge keeps: the hook scan (run twice per boot) reads every public attribute of every module, and
    ``W_E_pos`` concatenates the token and position embeddings each time (a 66 MB copy for a 32,000-word
    vocabulary: some 40% of booting an OPT or GPT-2 bridge); and a fused q/k/v's split builds ``nn.Linear`` layers
    whose random initialisation is replaced by the split weights at once. What the skipped work would have
    made is checked bit for bit against a plain boot in tests/test_hf_bridge_boot.py."""
    import warnings

    from ._compat import require
    from ._quiet_build import _hidden, _no_random_init

    require("transformer_lens")
    from transformer_lens.model_bridge import TransformerBridge

    with warnings.catch_warnings(), _hidden(TransformerBridge, "W_E_pos"), _no_random_init():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers(name, hf_model=fresh, tokenizer=tokenizer,
                                                   dtype=next(fresh.parameters()).dtype)


def configured(tokenizer):
    """The original bridge's tokenizer, already configured by its boot (BOS added), as a copy that a second
    boot keeps as it is: booting reloads a tokenizer by its ``name_or_path`` with ``add_bos_token=True``
    unless it says it adds one — which fails offline for a hub name, and with a ``KeyError`` for a
    tokenizer built in memory (it has no such path)."""
    if tokenizer is None:
        return None
    tok = copy.copy(tokenizer)
    tok.init_kwargs = {**tokenizer.init_kwargs, "name_or_path": getattr(tokenizer, "name_or_path", ""), "add_bos_token": True}
    return tok


def scratch_bridge(model: nn.Module, fresh: nn.Module):
    """A bridge around ``fresh`` (a copy of the raw Hugging Face ``model``), with a throwaway word-level
    tokenizer: what measurements through TransformerLens hooks (rotary pairs) run on."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")
    fresh.config = named_config(fresh)  # (a copy: booting reads the architecture from it)
    return boot(f"local/{fresh.config.model_type}", fresh, tokenizer)


class no_hf_init:
    """Skip Hugging Face's random initialisation of a model whose parameters are all written next."""

    def __enter__(self):
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # transformers 4.x
            from transformers.modeling_utils import no_init_weights
        self.ctx = no_init_weights()
        return self.ctx.__enter__()

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)


def with_head(hf: nn.Module) -> nn.Module:
    """``hf`` itself if it is the language model the adapter reads, else that language model built around ``hf``'s
    base model (a base model, or one with a classification head): its own modules under the head class's prefix,
    every head parameter zero. What a measurement through a TransformerLens bridge runs on (a bridge boots language
    models only); the head's output is never read."""
    import transformers

    from transformer_lens.model_bridge.sources.transformers import source

    arch = source.determine_architecture_from_hf_config(named_config(hf))
    if type(hf).__name__ == arch:
        return hf
    base = hf.base_model
    with no_hf_init():
        lm = getattr(transformers, arch)(copy.deepcopy(base.config))
    setattr(lm, base.base_model_prefix, base)
    own = {id(p) for p in base.parameters()}
    with torch.no_grad():
        for p in lm.parameters():
            if id(p) not in own:
                p.zero_()
    return lm.to(next(base.parameters()).dtype).eval()
