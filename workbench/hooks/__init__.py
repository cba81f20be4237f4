"""Capture and edit activations of any ``torch.nn.Module`` or TransformerLens model, with one API."""
from ._cache import ActivationCache
from ._fingerprint import batch_digest, model_fingerprint
from ._capture import capture, inherit_copy_list, run_with_cache
from ._intervene import first_tensor, intervene, watch
from ._names import HookNames, hook_names
from ._harvest import harvest
from ._store import ActivationStore

__all__ = ["ActivationCache", "ActivationStore", "HookNames", "batch_digest", "capture", "hook_names", "inherit_copy_list",
           "intervene", "model_fingerprint", "run_with_cache", "harvest", "watch"]
