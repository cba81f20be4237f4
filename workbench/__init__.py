"""workbench — does this neuron mean anything, or is it an artefact of the basis you look in?

The public face: the verbs a notebook uses. The capture verbs load with the package; the rest load
on first use (``__getattr__``), and TransformerLens is never imported by workbench itself, so
``import workbench`` stays fast.
"""
from importlib import import_module

from ._errors import (ActivationOverwrittenError, CacheBudgetError, HookNotFiredError, IncompatibleWeightsError,
                      InvalidOptionError, MissingDependencyError, OutOfRangeError, ResumeMismatchError,
                      StoreCorruptError, StoreFormatError, StoreLockedError, UnknownNameError,
                      UnsupportedModelError, UntraceableModelError, WorkbenchError)
from .hooks import ActivationCache, ActivationStore, HookNames, capture, harvest, hook_names, intervene, run_with_cache

__version__ = "0.1.0"

# name -> module that defines it, imported on first access
_LAZY = {
    **dict.fromkeys(["intertwiner_group", "check_intertwiner", "discover_group", "geodesic", "get_group"],
                    "workbench.groups"),
    **dict.fromkeys(["symmetry_map", "random_intertwiner", "apply_transform", "verify", "match_neurons",
                     "interpretation_shift", "Transform", "SymmetryMap", "Site", "fold_layernorm", "untie_embeddings"], "workbench.symmetry"),
}
_SUBPACKAGES = {"data", "experiments", "groups", "hooks", "models", "probing", "similarity", "stitching", "symmetry",
                "widgets", "zoo"}

__all__ = [
    "ActivationCache", "ActivationOverwrittenError", "ActivationStore", "CacheBudgetError", "HookNames",
    "HookNotFiredError", "IncompatibleWeightsError", "InvalidOptionError", "MissingDependencyError", "OutOfRangeError",
    "ResumeMismatchError", "StoreCorruptError", "StoreFormatError", "StoreLockedError", "UnknownNameError",
    "UnsupportedModelError", "UntraceableModelError", "WorkbenchError",
    "capture", "harvest", "hook_names", "intervene", "run_with_cache", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:
        return import_module(f"workbench.{name}")
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | _SUBPACKAGES)
