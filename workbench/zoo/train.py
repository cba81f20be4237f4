"""Regenerate zoo models: ``python -m workbench.zoo.train NAME [--seed S | --all-seeds]``.

Same seed and recipe give the same metrics within a small tolerance (bit-identical weights across
machines are not promised: CPU kernels differ). The manifest records data, recipe, metrics, time.
"""
from __future__ import annotations

import argparse
import datetime
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ._recipes import RECIPES, Recipe
from ._registry import build, sha256, write_entry, zoo_dir


_DATA: dict = {}


def _data(recipe: Recipe):
    """``(train, test)`` of a recipe; generated once per process (every CNN shares one data set)."""
    import json

    key = json.dumps(recipe.data, sort_keys=True)
    if key not in _DATA:
        _DATA[key] = _make_data(recipe)
    return _DATA[key]


def _make_data(recipe: Recipe):
    from .. import data

    d = recipe.data
    if d["generator"] == "shapes":
        return (data.shapes(size=d["size"], difficulty=d["difficulty"], **d["train"]),
                data.shapes(size=d["size"], difficulty=d["difficulty"], **d["test"]))
    if d["generator"] == "digits":
        return data.digits(size=d["size"]).split(d["split"], seed=d["split_seed"])
    if d["generator"] == "synthetic_language":
        return (data.synthetic_language(seq_len=d["seq_len"], **d["train"]),
                data.synthetic_language(seq_len=d["seq_len"], **d["test"]))
    raise InvalidOptionError(f"unknown data generator {d['generator']!r} in the recipe; known: shapes, digits, synthetic_language.")


def _entry_shape(recipe: Recipe, train) -> dict:
    if recipe.family == "transformer":
        from ._transformers import config

        cfg = config(recipe.kwargs["variant"], len(train.vocab), train.inputs.shape[1])
        return {"config": cfg}
    x = train.inputs
    return {"classes": len(train.label_names), "in_ch": x.shape[1], "d_in": int(x[0].numel())}


def _model(recipe: Recipe, shape: dict, seed: int):
    torch.manual_seed(seed)
    if recipe.family == "transformer":
        from ._transformers import build as build_transformer

        return build_transformer({**shape["config"], "seed": seed})
    return build({"architecture": recipe.architecture, "kwargs": recipe.kwargs, **shape})


def _loss(recipe: Recipe, model, x, y):
    out = model(x)
    if recipe.family == "transformer":
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=-100), None
    return F.cross_entropy(out, y), (out.argmax(1) == y).sum().item()


@torch.no_grad()
def evaluate(recipe: Recipe, model, dataset, batch_size: int = 256) -> dict:
    """Test loss (and accuracy for classifiers) in eval mode."""
    model.eval()
    total, correct, n = 0.0, 0, 0
    for x, y in dataset.loader(batch_size):
        loss, right = _loss(recipe, model, x, y)
        total += loss.item() * len(x)
        correct += right or 0
        n += len(x)
    metrics = {"test_loss": total / n}
    if recipe.family != "transformer":
        metrics["test_accuracy"] = correct / n
    return metrics


def train(name: str, seed: int = 0, *, out: Optional[Path] = None, progress: bool = True,
          epochs: Optional[int] = None, limit: Optional[int] = None, record: bool = True) -> dict:
    """Train ``name`` with ``seed`` by its recipe, save weights and a manifest entry; return the entry.

    ``epochs`` and ``limit`` (training examples) shrink the run for smoke tests; ``record=False``
    keeps the result out of the manifest.
    """
    from tqdm.auto import tqdm

    recipe = RECIPES[name]
    epochs = epochs or recipe.epochs
    start = time.perf_counter()
    train_set, test_set = _data(recipe)
    if limit:
        train_set = train_set.subset(torch.arange(min(limit, len(train_set))))
    shape = _entry_shape(recipe, train_set)
    model = _model(recipe, shape, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    loader = train_set.loader(recipe.batch_size, shuffle=True, seed=seed)
    steps = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    bar = tqdm(total=steps, desc=f"{name} seed {seed}", disable=not progress)
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            loss, _ = _loss(recipe, model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    metrics = evaluate(recipe, model, test_set)
    if recipe.family == "transformer":
        from ..data import unigram_entropy

        metrics["unigram_entropy"] = unigram_entropy(test_set)
        metrics["entropy_rate"] = test_set.meta.get("entropy_rate")
    seconds = time.perf_counter() - start
    entry = {"name": name, "seed": seed, "family": recipe.family, "architecture": recipe.architecture,
             "kwargs": recipe.kwargs, **shape, "recipe": {**recipe.to_dict(), "epochs": epochs, "limit": limit},
             "metrics": metrics, "params": sum(p.numel() for p in model.parameters()),
             "train_seconds": round(seconds, 1), "torch": torch.__version__,
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    from safetensors.torch import save_file

    folder = out or zoo_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-seed{seed}.safetensors"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    entry.update(file=path.name, sha256=sha256(path), bytes=path.stat().st_size)
    if record:
        write_entry(entry, folder)
    return entry


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.zoo.train", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", help=f"recipes: {sorted(RECIPES)} or 'all'")
    parser.add_argument("--seed", type=int, default=None, help="one seed (default: every seed of the recipe)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder (default: $WORKBENCH_ZOO or the package's own workbench/zoo/weights)")
    args = parser.parse_args(argv)
    names = sorted(RECIPES) if args.names == ["all"] else args.names
    for name in names:
        if name not in RECIPES:
            parser.error(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
        for seed in ([args.seed] if args.seed is not None else RECIPES[name].seeds):
            entry = train(name, seed, out=args.out)
            print(f"{name} seed {seed}: {entry['metrics']} in {entry['train_seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
