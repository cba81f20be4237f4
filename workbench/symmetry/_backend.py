"""One symmetry interface, two backends, chosen once per model by :func:`backend_for`.

- the **graph** backend reaches any plain ``nn.Module`` through its torch.fx trace: sites from the
  graph's spaces (``_graph.py``, ``_graph_sites.py``), elements pushed module by module
  (``_graph_push.py``), outputs compared as they are;
- the **layout** backend reaches transformers through their canonical weight layout
  (``workbench.models``): sites from the config and the weights (``_layout_sites.py``), elements
  pushed weight by weight into a rebuilt model (``_layout_push.py``), decoders compared by
  log-probabilities, encoders by their last hidden state in the new basis.

A :class:`~workbench.symmetry.Site` and a :class:`~workbench.symmetry.Transform` mean the same thing
whichever backend made them; ``symmetry_map``, ``random_intertwiner``, ``apply_transform`` and
``verify`` ask the backend only for what differs.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..groups import GroupElement
from .._errors import InvalidOptionError, UnsupportedModelError
from ..models import ModelKind, eval_mode, global_hooks, has_layout, hf, hooked, model_kind
from ._sites import Observation, Site, SymmetryMap


class Backend:
    """What differs between kinds of model; see the module docstring."""

    name = ""
    #: whether a map may be memoised (a layout map is read from the weights each time: folding changes it)
    memoised = True

    def site_map(self, model: nn.Module, example: Optional[torch.Tensor], affine: bool) -> SymmetryMap:
        raise NotImplementedError

    def example(self, inputs: Any) -> Optional[torch.Tensor]:
        """What a map of this model is traced on, taken from the inputs a verb was given."""
        return None

    def push(self, model: nn.Module, smap: SymmetryMap, transform, inplace: bool, hint: str = "") -> nn.Module:
        raise NotImplementedError

    def clone(self, model: nn.Module, dtype: torch.dtype) -> nn.Module:
        """An independent copy in ``dtype`` sharing no state with ``model``."""
        raise NotImplementedError

    def observe(self, site: Site, element: GroupElement, obs: Observation, h: torch.Tensor,
                forced: bool) -> Optional[torch.Tensor]:
        """Where ``element`` at ``site`` moves the activation ``h`` seen at ``obs`` (None: nothing to compare)."""
        raise NotImplementedError

    # -- what verify compares
    def output(self, value: Any) -> Any:
        """The tensor a model's return value stands for: the model's own output, a Hugging Face ``ModelOutput``'s
        (:func:`model_output`)."""
        return model_output(value)

    def output_names(self, model: nn.Module) -> list[str]:
        """Hook names whose values are the output compared (beyond the model's return value)."""
        return []

    def head_output(self, model, out, new_out, smap=None, transform=None, cache=None, new_cache=None):
        """A second output pair that must agree as well (see LayoutBackend), or None."""
        return None

    def also_compared(self, model, value, new_value) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
        """``(old, new, what)``: the models' other returned tensors that must agree as they are (:func:`other_outputs`)."""
        return other_outputs(value, new_value)

    def compared(self, model, smap, transform, out, new_out, cache, new_cache) -> tuple:
        """``(old, new, what, per_row, kl)``: the two outputs as compared, what they are, whether each row
        (rather than each column) shares one scale, and the mean KL divergence where they are
        log-probabilities."""
        return out, new_out, "outputs", False, None

    def floor(self, model, inputs, cache, last: Optional[str]):
        """For a float64 model computing parts in float32: its output with those parts rounded, and each cached
        activation's relative change under that rounding (:func:`relative_changes`); None otherwise."""
        return None


#: the fields of a ``ModelOutput`` that stand for it, in order (:func:`model_output`)
OUTPUT_FIELDS = ("logits", "image_embeds", "last_hidden_state")
#: fields of a ``ModelOutput`` that hold representations, which a transform moves (into the new basis; heads and
#: experts permuted), never compared as they are: a pooled output is the stream's (a traced convolutional model's,
#: CLIP's and DINOv2's final norm's: compared through the stream; a BERT-like pooler's: ``LayoutBackend``)
REPRESENTATIONS = frozenset({"hidden_states", "attentions", "cross_attentions", "past_key_values", "cache", "last_hidden_state",
                             "pooler_output", "encoder_last_hidden_state", "encoder_hidden_states", "encoder_attentions",
                             "decoder_hidden_states", "decoder_attentions", "router_logits", "image_embeds",
                             "text_embeds", "vision_model_output", "text_model_output"})


def _is_model_output(value: Any) -> bool:
    return not isinstance(value, torch.Tensor) and "ModelOutput" in {c.__name__ for c in type(value).__mro__}


def model_output(value: Any) -> Any:
    """The tensor a return value stands for. A Hugging Face model returns a ``ModelOutput``: its logits are compared
    (CLIPVisionModelWithProjection's: its image embeddings; a base model's: its last hidden state; a traced
    convolutional base model's pooled output is its last hidden state pooled). Anything else: the value itself."""
    if not _is_model_output(value):
        return value
    for name in OUTPUT_FIELDS:
        found = getattr(value, name, None)
        if isinstance(found, torch.Tensor):
            return found
    return value


def other_outputs(value: Any, new_value: Any) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    """``(old, new, name)`` for each tensor field both ``ModelOutput`` s return besides the one that stands for them
    (:func:`model_output`) and the representations (:data:`REPRESENTATIONS`): a loss, a mixture's auxiliary loss, a
    model's own field. They are part of the function and must agree too: verify compared the logits alone, and a
    model's auxiliary loss five times larger in the new model (computed in the test) PASSed."""
    if not (_is_model_output(value) and _is_model_output(new_value)):
        return []
    chosen = next((n for n in OUTPUT_FIELDS if isinstance(getattr(value, n, None), torch.Tensor)), None)

    def fields(v) -> dict:
        found: dict = {}
        for n, t in v.items():
            if n != chosen and n not in REPRESENTATIONS:
                _leaves(t, n, found)
        return found

    olds, news = fields(value), fields(new_value)
    # A field one model returns and the other does not (a new model built with output_router_logits off: no aux_loss),
    # or of another shape, cannot be compared, and was left out without a word: verify PASSed on the logits alone.
    for name in sorted(olds.keys() ^ news.keys()):
        raise InvalidOptionError(f"verify compares every field the models return: {name!r} is returned by "
                                 f"{'model' if name in olds else 'new_model'} only (their configurations differ?).")
    for name, old in olds.items():
        if old.shape != news[name].shape:
            raise InvalidOptionError(f"verify compares every field the models return: {name!r} has shape "
                                     f"{tuple(old.shape)} in model and {tuple(news[name].shape)} in new_model.")
    # An empty field (of the same shape in both) holds nothing to compare: it agrees (it raised torch's reshape error)
    return [(old.detach(), news[name].detach(), name) for name, old in olds.items() if old.numel()]


def _leaves(value: Any, name: str, found: dict) -> None:
    """``found[name]`` = ``value`` for a tensor (a Python number as one), and every tensor inside a tuple, list or dict
    under its index (``extra[0]``, ``extra['a']``): a field ``extra=(t1, t2)`` was left out without a word, and a new
    model whose ``t1`` was tripled PASSed (tests/test_verify_adversary4.py). None inside one must be None in both (the
    names then differ: refused). Anything else cannot be compared, and is refused naming it."""
    if isinstance(value, torch.Tensor):
        found[name] = value
    elif any(c.__name__.endswith("Cache") and c.__module__.startswith("transformers.") for c in type(value).__mro__):
        return  # a key/value cache (transformers 5 returns it as ``cache``): representations, as past_key_values
    elif isinstance(value, (bool, int, float)):
        found[name] = torch.as_tensor(float(value), dtype=torch.float64)
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            _leaves(v, f"{name}[{i}]", found)
    elif isinstance(value, dict):
        for k, v in value.items():
            _leaves(v, f"{name}[{k!r}]", found)
    elif value is not None:
        raise UnsupportedModelError(
            f"verify compares every field the models return beside their outputs, as it is; {name!r} is of type "
            f"{type(value).__name__}, which it cannot compare. Return tensors (or tuples, lists or dicts of them) from "
            f"the model, or compare the field yourself.")


def relative_changes(reference, other, names) -> dict:
    """``{(name, call): ‖other − reference‖ / ‖reference‖}`` (float64) for ``names`` held by both caches, every call of
    a name (a module called twice): how far a rounding moved each activation."""
    norm = torch.linalg.vector_norm
    keys = [(n, i) for n in names if n in reference and n in other for i in range(min(len(reference.calls(n)),
                                                                                      len(other.calls(n))))]
    if not keys:
        return {}
    pairs = [(reference.calls(n)[i], other.calls(n)[i]) for n, i in keys]
    # one read-back for all (a float() each waits for the device, and costs a call on the CPU)
    norms = torch.stack([torch.stack([norm(b.double() - a.double()), norm(a.double())]).to(pairs[0][0].device)
                         for a, b in pairs]).tolist()
    return {k: d / max(r, 1e-30) for k, (d, r) in zip(keys, norms)}


def one_example(inputs: Any) -> Optional[torch.Tensor]:
    """The first example of an input batch (what a graph map is traced on), or None for non-tensor inputs."""
    if isinstance(inputs, torch.Tensor) and inputs.ndim >= 1 and len(inputs) >= 1:
        return inputs[:1]
    return None


# ---------------------------------------------------------------------- plain modules: the torch.fx graph
class GraphBackend(Backend):
    name = "graph"

    def site_map(self, model, example, affine):
        from ._graph_sites import graph_map

        return graph_map(model, example, affine)

    def example(self, inputs):
        return one_example(inputs)

    def push(self, model, smap, transform, inplace, hint=""):
        from ._graph_push import push_graph

        return push_graph(model, smap, transform, inplace, hint)

    def clone(self, model, dtype):
        return copy.deepcopy(model).to(dtype)

    def observe(self, site, element, obs, h, forced):
        move = self.move(site, element, obs, tuple(h.shape), forced)
        return None if move is None else move.apply(h)

    def move(self, site, element, obs, shape: tuple, forced) -> Optional["Move"]:
        """How :meth:`observe` moves an activation of ``shape`` (None: nothing to compare), as a recipe that
        verify's one-pass check can also follow without computing ``F·h`` (``_verify_kernel.py``)."""
        if obs.level == "prebn" and element.perm_part() is None:
            return None  # a dense map folded the BatchNorm into the writer: nothing to compare before it
        if obs.level == "pregn":  # a writer's output only a GroupNorm with a gain reads: S·P (DERIVATIONS §9)
            from ._graph_groupnorm import before_norm

            F = before_norm(element)
            if F is None:
                return None
        else:
            F = {"prebn": element.perm_part(), "pre": element, "post": element.phi()}[obs.level]
        view = (shape[0], site.n, math.prod(shape[1:]) // site.n) if obs.block > 1 else shape
        axis = obs.axis if obs.axis == 1 or len(shape) > 2 else 1  # token-wise sites: the last axis
        offset = site.group.offset(element) if site.affine and not forced and obs.level == "post" else None
        return Move(F, view, axis, offset, -1 if obs.axis == -1 and len(view) > 2 else 1)


@dataclass(frozen=True)
class Move:
    """``F`` acting on ``axis`` of an activation viewed as ``view``, plus ``offset`` along ``offset_axis``
    (the affine extension's constant, after the nonlinearity; None: none)."""

    F: GroupElement
    view: tuple
    axis: int
    offset: Optional[torch.Tensor]
    offset_axis: int

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        moved = self.F.act(h.reshape(self.view), self.axis)
        if self.offset is not None:
            shape = [1] * moved.ndim
            shape[self.offset_axis] = -1
            moved = moved + self.offset.to(device=h.device, dtype=h.dtype).reshape(shape)
        return moved.reshape(h.shape)


# ---------------------------------------------------------------------- transformers: the canonical layout
def _refuse_hooks(model: nn.Module) -> None:
    """A layout is read from the weights and the configuration; a forward hook (a TransformerLens hook added with
    ``is_permanent=True``, a torch hook on a Hugging Face module, a global one) may change what its module computes,
    which the layout does not see, and a transformed copy does not carry it in the new basis: a per-unit factor on
    an MLP's hidden units changed the transform's output by 7% (a Hugging Face GPT-2) and 39% (a bridge) while the
    map promised a symmetry. Refused, naming the hooks; workbench's own capture hooks only observe (``observing``)."""
    hook_names = getattr(model, "hook_dict", None)  # TransformerLens: a hook point by its hook name, not module path
    alias = {id(m): n for n, m in hook_names.items()} if isinstance(hook_names, dict) else {}
    named = list(dict.fromkeys(alias.get(id(m), n or type(model).__name__)
                               for n, m in model.named_modules(remove_duplicate=False) if hooked(m)))
    if global_hooks():
        named.append("torch's global forward hooks (register_module_forward_hook)")
    if named:
        more = f" and {len(named) - 3} more" if len(named) > 3 else ""
        raise UnsupportedModelError(
            f"{type(model).__name__} has forward hooks ({', '.join(map(repr, named[:3]))}{more}): a hook may change "
            f"what its module computes, which the layout (read from the weights) does not see, and a transformed "
            f"copy would not carry it in the new basis. Remove them first (TransformerLens: "
            f"model.reset_hooks(including_permanent=True); torch: handle.remove()) and transform outside any "
            f"wb.intervene block.")


class LayoutBackend(Backend):
    name = "layout"
    memoised = False

    def site_map(self, model, example, affine):
        from .._offload import all_onloaded
        from ._layout_sites import transformer_map

        _refuse_hooks(model)
        with all_onloaded(model):  # the layout reads weights (norm gains, rotary pairs): accelerate's offloaded ones too
            return transformer_map(model)

    def push(self, model, smap, transform, inplace, hint=""):
        from ._layout_push import push_transformer

        return push_transformer(model, smap, transform, inplace)

    def clone(self, model, dtype):
        from ._layout_push import clone

        return clone(model, dtype)

    def observe(self, site, element, obs, h, forced):
        from ._layout_push import observe

        return observe(site, element, obs, h)

    def _last(self, model) -> Optional[str]:
        """What is compared in the new basis, where the output is the stream itself: an encoder's last hidden state
        (MiniLM's MLM head is untrained), its last layer's output (a raw Hugging Face model: that layer module's
        output); a base model's output, its final norm's output (the last layer's where it has none); for a model
        returning embeddings (CLIPVisionModelWithProjection), its final norm's output, which the projection reads."""
        encoder = hf.is_encoder(model)
        if not encoder and not hf.is_base(model) and not hf.returns_embeddings(model):
            return None
        L = int(hf.config(model).n_layers)
        if model_kind(model) == ModelKind.HF:
            paths = hf.layout(model).paths
            return paths[f"blocks.{L - 1}"] if encoder else paths.get("ln_final", paths[f"blocks.{L - 1}"])
        return f"blocks.{L - 1}.hook_resid_post"

    def head_output(self, model, out, new_out, smap=None, transform=None, cache=None, new_cache=None):
        """An encoder with a head (MLM, classification) is compared by its stream in the new basis; its head's output
        must agree too: ``(old, new, what)``, both log-probabilities (a model's embeddings: both as they are), or None
        where the output is the stream itself (a base model). SigLIP's attention-pooling head: its output (the pooler
        output, one vector per input) in the new basis of its own residual (site ``pool.resid``)."""
        pool = hf.pooling_head(model)
        if pool is not None and cache is not None and pool in cache and new_cache is not None and pool in new_cache:
            old = cache[pool]
            if transform is not None and "pool.resid" in transform.elements:
                old = self.observe(smap["pool.resid"], transform.elements["pool.resid"], Observation(pool, 0, "pre"), old, False)
            return old.flatten(0, -2), new_cache[pool].flatten(0, -2), "pooled outputs"
        if hf.is_base(model) or out.shape != new_out.shape:
            return None
        if hf.returns_embeddings(model):  # CLIP's image_embeds: invariant, compared as they are (a softmax would pass a shift)
            return out.flatten(0, -2), new_out.flatten(0, -2), "embeddings"
        (old, what), (new, _) = self.scores(model, out), self.scores(model, new_out)
        return old, new, what

    def also_compared(self, model, value, new_value):
        """Besides :func:`other_outputs`, a base encoder's pooler output where a pooler of its own computes it (BERT's,
        RoBERTa's, ViT's: dense and tanh reading the first token, in no site's basis): compared as it is. verify compared
        a BertModel by its last hidden state alone, and a new model whose pooler's weight was doubled (pooler output 59%
        away, computed in the test) PASSed."""
        pairs = other_outputs(value, new_value)
        pooler = getattr(hf.hf_model(model), "pooler", None)
        old, new = getattr(value, "pooler_output", None), getattr(new_value, "pooler_output", None)
        if (hf.is_base(model) and isinstance(getattr(pooler, "dense", None), nn.Linear)
                and isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor)):
            pairs.append((old.detach(), new.detach(), "pooler outputs"))
        return pairs

    def scores(self, model, out: torch.Tensor) -> tuple[torch.Tensor, str]:
        """A head's output as compared, one row per position or input, and what it is: log-probabilities where the logits
        are a softmax's (a language model's, a single-label classifier's: a constant shift per row is no change); the
        logits themselves where each is a value of its own, which a shift changes — one per row (``num_labels=1``: a
        regression) or a multi-label classifier's (``problem_type``: a sigmoid each). A regression's one logit is 0 as a
        log-probability whatever it is: verify passed a score head scaled by −3, its outputs changed by 400%."""
        config = getattr(hf.hf_model(model), "config", None)
        if out.shape[-1] == 1 or getattr(config, "problem_type", None) in ("regression", "multi_label_classification"):
            return out.flatten(0, -2), "logits"
        return out.log_softmax(-1).flatten(0, -2), "log-probabilities"

    def output_names(self, model):
        last = self._last(model)
        pool = hf.pooling_head(model) if last else None  # SigLIP's pooling head: its output too (``head_output``)
        return [last] + ([pool] if pool else []) if last else []

    def compared(self, model, smap, transform, out, new_out, cache, new_cache):
        last = self._last(model)
        if last:  # compared in the new basis
            old = cache[last]
            if transform is not None and "resid" in transform.elements:
                old = self.observe(smap["resid"], transform.elements["resid"], Observation(last, 0, "pre"), old, False)
            # (a final norm read on one token per input, CLIP's post_layernorm: [batch, d_model], no positions)
            what = ("encoder outputs" if hf.is_encoder(model) else "pooled outputs" if old.ndim == 2 else "last hidden states")
            return old.flatten(0, -2), new_cache[last].flatten(0, -2), what, False, None
        # logits may shift by a constant per position (center_unembed): compare log-probabilities (``scores``)
        (old, what), (new, _) = self.scores(model, out), self.scores(model, new_out)
        kl = (old.exp() * (old - new)).sum(-1).mean().item() if what == "log-probabilities" else None
        return old, new, what, True, kl

    def floor(self, model, inputs, cache, last):
        """RMSNorm computes in float32 in TransformerLens's native models as in Hugging Face's, and so
        does the softmax of most Hugging Face eager attentions: rounding those parts to float32 measures
        the floor below which no comparison of a float64 model can go. TransformerLens models round the
        stream where the norms read it and the attention scores (when the model's own pattern is float32:
        measured); a raw Hugging Face model, which has only its modules' outputs, rounds the embedding's
        and every layer's output (the stream) and, under eager attention, each attention's output
        projection."""
        from ..hooks import first_tensor, intervene, run_with_cache

        kind = model_kind(model)
        if kind in (ModelKind.HF, ModelKind.HF_BRIDGE) and hf.unsupported(model):
            return None  # which parts compute in float32 is read from the layout: none for a refused family
        from ._layout_sites import final_norm

        rms = (str(getattr(hf.config(model), "normalization_type", "") or "").startswith("RMS")
               or (kind in (ModelKind.HF, ModelKind.HF_BRIDGE) and hf.facts(model)["family"] in hf.FLOAT32_NORM_FAMILIES))
        final_rms = str(final_norm(model) or "").startswith("RMS")  # TransformerLens's final_rms under other block norms
        names = _round_raw(model, rms) if kind == ModelKind.HF else _round_lens(model, inputs, rms, final_rms)
        if not names:
            return None  # verify then measures a trivial symmetry's rounding (_verify_floor.trivial_floor)
        rounding = {n: (lambda x, name: x.float().double()) for n in names}
        watched = list(cache.keys()) if cache is not None else []
        with eval_mode(model), intervene(model, rounding), torch.no_grad():
            rounded, rcache = run_with_cache(model, inputs, names=watched or None, budget=None, reduce=first_tensor) if watched else (model(inputs), None)
        rounded = rcache[last].flatten(0, -2) if last else self.scores(model, self.output(rounded).detach())[0]
        return rounded, relative_changes(cache, rcache, watched)


def _round_lens(model, inputs, rms: bool, final_rms: bool = False) -> list[str]:
    """TransformerLens hook names to round: the stream before each norm (RMSNorm; ``final_rms``: the final norm's
    only), the attention scores when the model's softmax computes in float32 (its pattern holds only float32 values)."""
    from ..hooks import hook_names, run_with_cache

    L = int(model.cfg.n_layers)
    points = hook_names(model)
    known = set(points) | set(points.aliases)
    names = []
    if rms:
        names += [f"blocks.{i}.hook_resid_{w}" for i in range(L) for w in ("pre", "mid")] + [f"blocks.{L - 1}.hook_resid_post"]
    elif final_rms:
        names.append(f"blocks.{L - 1}.hook_resid_post")
    if model_kind(model) == ModelKind.HF_BRIDGE and "blocks.0.attn.hook_pattern" in known:
        with eval_mode(model), torch.no_grad():
            _, cache = run_with_cache(model, inputs[:1], names=["blocks.0.attn.hook_pattern"], budget=None)
        p = cache["blocks.0.attn.hook_pattern"]
        if p.dtype == torch.float64 and torch.equal(p, p.float().double()):
            names += [f"blocks.{i}.attn.hook_attn_scores" for i in range(L)]
    return [n for n in names if n in known]


def _round_raw(model, rms: bool) -> list[str]:
    """A raw Hugging Face model's module outputs to round: the stream where each layer reads it (the
    embedding's and every layer's output: RMSNorm), each attention's output projection's under eager
    attention (its softmax upcasts), and DINOv2's embeddings' (an image of another size than its position table's
    resamples the table in float32: 5e-10 off in a float64 model, which verify FAILed against 1e-10)."""
    paths = hf.layout(model).paths
    L = int(hf.config(model).n_layers)
    names = [paths[k] for k in ["embed"] + [f"blocks.{i}" for i in range(L)] if rms and k in paths]
    if hf.facts(model)["family"] in hf.DINO_FAMILIES and "embed" in paths and paths["embed"] not in names:
        names.append(paths["embed"])
    if getattr(hf.hf_model(model).config, "_attn_implementation", None) == "eager":
        names += [p for k, p in paths.items() if k.endswith(".attn.o")]
    return names


_GRAPH, _LAYOUT = GraphBackend(), LayoutBackend()


def backend_for(model: nn.Module) -> Backend:
    """The backend that reaches ``model``: the layout one for transformers, the graph one otherwise."""
    return _LAYOUT if has_layout(model) else _GRAPH
