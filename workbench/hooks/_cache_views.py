"""The cache the way TransformerLens users read it: ``cache["resid_post", 0]``, ``accumulated_resid``,
``decompose_resid``, ``stack_activation``, ``apply_ln_to_stack``, ``logit_attrs`` …

On a TransformerLens model these are TransformerLens's own: the captured values are handed to its
``ActivationCache`` with the model, so shapes, labels and numbers are exactly its (3.x and 4.x alike) —
not a reimplementation that could drift. On a plain module the generic subset works: tuple keys where
layers are numbered (``cache["relu", 2]`` is the ``relu`` inside layer 2) and ``stack_activation``; the
residual-stream methods explain that they need a transformer.
"""
from __future__ import annotations

import functools
import re
from typing import Optional

import torch

from .._errors import InvalidOptionError, UnknownNameError

#: TransformerLens ActivationCache methods handed over as they are (those a version lacks raise there)
TRANSFORMER_LENS_METHODS = (
    "accumulated_resid", "decompose_resid", "apply_ln_to_stack", "logit_attrs", "logit_lens", "stack_head_results",
    "compute_head_results", "get_neuron_results", "stack_neuron_results", "get_full_resid_decomposition",
    "apply_slice_to_batch_dim", "remove_batch_dim",
)


class CacheViews:
    """Mixin of :class:`~workbench.ActivationCache`: TransformerLens's conventions on its models, the
    generic subset elsewhere. Needs ``self._model()``, ``self.names``, ``self._calls``, ``self.calls``."""

    _tl_cache = None
    _tl_size = -1
    _tl_several: dict = {}  # names left out of TransformerLens's cache: fired several times -> how many

    # -------------------------------------------------------------- TransformerLens's own cache
    def _transformer_lens(self, what: str):
        from ..models import is_transformer_lens, require

        model = self._model()
        if model is None or not is_transformer_lens(model):
            kind = "a model that is gone" if model is None and self._has_model else (
                f"a {type(model).__name__}" if model is not None else "no model (built by hand)")
            raise InvalidOptionError(
                f"{what} reads the residual stream of a TransformerLens model (its layers, LayerNorms and "
                f"unembedding); this cache comes from {kind}. On other models use tuple keys where layers are "
                f"numbered (cache['relu', 2]) and cache.stack_activation('relu').")
        filled = sum(len(v) for v in self._calls.values())
        if self._held or self._live is not None:  # TransformerLens's cache below holds the same tensors: refuse any written since
            for n, ts in self._calls.items():
                self._check_held(n, ts)
        if self._tl_cache is None or self._tl_size != filled:  # a cache inside wb.capture may still be filling
            ActivationCache = require("transformer_lens").ActivationCache
            values, several = {}, {}
            for name in self:  # canonical names and their aliases, as TransformerLens lists them
                try:
                    values[name] = self[name]
                except UnknownNameError:  # fired several times with different values: no single value to hand over
                    several[name] = len(self.calls(name))
            self._tl_cache, self._tl_size, self._tl_several = ActivationCache(values, model), filled, several
        return self._tl_cache

    def _several_calls_error(self, exc: BaseException, what: str) -> Optional[UnknownNameError]:
        """Our error for TransformerLens's KeyError on a name this cache holds several different calls of (several
        forwards in one capture block, e.g. model.generate's): the name was captured, not missing."""
        key = exc.args[0] if isinstance(exc, KeyError) and exc.args else None
        several = self._tl_several
        if key not in several:
            return None
        return UnknownNameError(
            f"{what} needs {key!r}, which fired {several[key]} times with different values while the capture was open "
            f"(several forwards, e.g. one per token of model.generate): TransformerLens's cache holds one value per "
            f"name. Capture one forward, or read cache.calls({key!r}).")

    def __getattr__(self, name: str):
        if name in TRANSFORMER_LENS_METHODS:
            method = getattr(self._transformer_lens(f"cache.{name}"), name)

            @functools.wraps(method)
            def call(*args, **kwargs):
                try:
                    return method(*args, **kwargs)
                except KeyError as exc:
                    ours = self._several_calls_error(exc, f"cache.{name}")
                    if ours is None:
                        raise
                    raise ours from None
            return call
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: Optional[str] = None):
        """``[layers, ...]``: one activation name across layers (TransformerLens's, on its models; on a plain
        module, every captured ``<…>.<i>.<…>activation_name`` for i = 0, 1, … up to ``layer``)."""
        from ..models import is_transformer_lens

        model = self._model()
        if model is not None and is_transformer_lens(model):
            return self._transformer_lens("cache.stack_activation").stack_activation(activation_name, layer,
                                                                                      sublayer_type)
        layers = []
        while True:
            found = self._numbered(activation_name, len(layers))
            if found is None or (layer != -1 and len(layers) >= layer):
                break
            layers.append(self[found])
        if not layers:
            raise UnknownNameError(f"no captured name has {activation_name!r} in a numbered layer (e.g. "
                                   f"'blocks.0.{activation_name}'); captured: {self.names[:8]}…")
        shapes = {tuple(t.shape) for t in layers}
        if len(shapes) > 1:
            raise InvalidOptionError(f"{activation_name!r} has different shapes across layers ({sorted(shapes)}); "
                                     f"they cannot be stacked.")
        return torch.stack(layers)

    # -------------------------------------------------------------- tuple keys
    def _tuple_key(self, key: tuple) -> str:
        """The cached name a tuple key means, or an error listing what it could have meant."""
        from ..models import is_transformer_lens

        model = self._model()
        if model is not None and is_transformer_lens(model):
            return key  # TransformerLens resolves it (see __getitem__)
        if len(key) != 2 or not isinstance(key[0], str) or not isinstance(key[1], int):
            raise InvalidOptionError(f"a tuple key on a plain module is (name, layer), e.g. cache['relu', 2]; got {key!r}.")
        found = self._numbered(key[0], key[1])
        if found is None:
            raise UnknownNameError(f"no captured name has {key[0]!r} in layer {key[1]} (a name like "
                                   f"'layers.{key[1]}.{key[0]}'); captured: {self.names[:8]}…")
        return found

    def _numbered(self, fragment: str, layer: int) -> Optional[str]:
        """The one captured name with ``fragment`` in numbered layer ``layer``: ``<prefix>.<layer>.<…fragment>``
        or ``<…fragment>.<layer>`` (``cache["layers", 2]`` is ``layers.2``); an error if several match."""
        if layer < 0:  # from the last numbered layer, as TransformerLens counts
            layers = 0
            while self._numbered(fragment, layers) is not None:
                layers += 1
            layer += layers
        inside = re.compile(rf"(^|.*\.){layer}\.(.*\.)?{re.escape(fragment)}$")  # layers.2.relu, blocks.2.mlp.relu
        whole = re.compile(rf"^(.*\.)?{re.escape(fragment)}\.{layer}$")  # cache["layers", 2] is layers.2
        hits = [n for n in self if inside.match(n)] or [n for n in self if whole.match(n)]
        if len(hits) > 1:
            raise UnknownNameError(f"({fragment!r}, {layer}) matches several captured names: {hits}; use one of them.")
        return hits[0] if hits else None
