"""Capture and edit activations of any ``torch.nn.Module`` or TransformerLens model, with one API."""
from ._cache import ActivationCache
from ._capture import capture, inherit_copy_list, run_with_cache
from ._intervene import first_tensor, intervene, watch
from ._names import HookNames, hook_names
from ._harvest import harvest
from ._store import ActivationStore

__all__ = ["ActivationCache", "ActivationStore", "HookNames", "capture", "hook_names", "inherit_copy_list", "intervene",
           "run_with_cache", "harvest", "watch"]
