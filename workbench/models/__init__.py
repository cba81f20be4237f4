"""What model is this, and how are its weights laid out? The one answer for every other package.

- :func:`model_kind` — plain ``nn.Module``, TransformerLens 3.x ``HookedTransformer``, 4.x
  ``TransformerBridge`` (native or around a Hugging Face model), or a Hugging Face ``PreTrainedModel``.
- the canonical transformer weight layout (per-head ``W_Q[h]``: ``[d_model, d_head]``): read, write,
  rebuild a fresh model around new weights, views of a model's own tensors;
- the torch.fx graph of plain modules, run once on the user's example;
- eval-mode contexts that leave no trace on the model, and ``no_grad_analysis`` (analyses record no graph).

Nothing here imports TransformerLens or transformers at import time.
"""
from . import _hf as hf
from . import _hf_build as hf_build
from ._call import one_call
from ._hf_check import refuse_unrunnable, unrunnable_explained, unrunnable_failure
from ._compat import ensure_torchvision_importable, require
from ._kind import ModelKind, has_hooked_transformer, has_layout, is_traced_hf, is_transformer_lens, model_kind
from ._layout import (blank, canonical_views, finish, from_canonical, read_weights, rebuild, shape_facts,
                      tied_keys, to_canonical, views_like, write_weights)
from ._modes import eval_mode, no_grad_analysis
from ._trace import (FORWARD_HOOKS, TraceFailure, describe, global_hooks, hooked, kept_call_name, observing,
                     propagate_shapes, trace, trace_kept_whole)

__all__ = ["FORWARD_HOOKS", "ModelKind", "TraceFailure", "blank", "canonical_views", "describe", "eval_mode", "from_canonical", "global_hooks",
           "ensure_torchvision_importable", "finish", "has_hooked_transformer", "has_layout", "hf", "hf_build", "hooked", "is_traced_hf", "is_transformer_lens", "kept_call_name",
           "model_kind", "no_grad_analysis", "observing", "one_call", "propagate_shapes", "read_weights", "rebuild", "refuse_unrunnable", "unrunnable_explained", "unrunnable_failure", "require", "shape_facts", "tied_keys", "to_canonical", "trace", "trace_kept_whole", "views_like", "write_weights"]
