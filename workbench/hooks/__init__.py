"""Capture and edit activations of any ``torch.nn.Module`` or TransformerLens model, with one API."""
from ._cache import ActivationCache
from ._capture import capture, inherit_copy_list, intervene, run_with_cache
from ._names import HookNames, hook_names

__all__ = ["ActivationCache", "HookNames", "capture", "hook_names", "inherit_copy_list", "intervene",
           "run_with_cache"]
