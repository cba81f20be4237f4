"""workbench — does this neuron mean anything, or is it an artefact of the basis you look in?

The public face: the verbs a notebook uses. Heavy optional pieces (TransformerLens, widgets) are
imported lazily, so ``import workbench`` stays fast.
"""
from ._errors import (ActivationOverwrittenError, CacheBudgetError, HookNotFiredError,
                      InvalidOptionError, UnknownNameError, WorkbenchError)
from .hooks import ActivationCache, HookNames, capture, hook_names, intervene, run_with_cache
from .hooks._store import ActivationStore, harvest

__version__ = "0.1.0"

__all__ = [
    "ActivationCache", "ActivationOverwrittenError", "ActivationStore", "CacheBudgetError",
    "HookNames", "HookNotFiredError", "InvalidOptionError", "UnknownNameError", "WorkbenchError",
    "capture", "harvest", "hook_names", "intervene", "run_with_cache",
]
