"""The data every experiment shares: the zoo's own image distribution, split three ways.

- train: the first ``n`` images of the zoo CNNs' training set (``shapes``, seed 1) — data the
  models were trained on, as the paper stitched on CIFAR-10's training set;
- val: a fresh draw (seed 3) that neither the zoo nor any test saw; it picks the best epoch;
- test: the first ``n`` images of the zoo's test set (seed 2), where accuracies are reported.
"""
from __future__ import annotations

from functools import lru_cache

import torch

VAL_SEED = 3


@lru_cache(maxsize=8)
def _shapes(n: int, seed: int):
    from .. import data, zoo

    d = zoo.RECIPES["myrtle_relu"].data
    return data.shapes(n, size=d["size"], seed=seed, difficulty=d["difficulty"])


def split(kind: str, n: int):
    """``kind`` in train / val / test; a ConceptDataset of ``n`` images."""
    from .. import zoo

    d = zoo.RECIPES["myrtle_relu"].data
    full, seed = {"train": (d["train"]["n"], d["train"]["seed"]), "test": (d["test"]["n"], d["test"]["seed"]),
                  "val": (n, VAL_SEED)}[kind]
    if n > full:
        from .._errors import OutOfRangeError
        raise OutOfRangeError(f"{kind}: asked for {n} images; the zoo's {kind} set has {full}, so n ≤ {full}.")
    ds = _shapes(full, seed)
    return ds if n == full else ds.subset(torch.arange(n))


def describe(protocol: dict) -> str:
    return (f"train: the first {protocol['n_train']} images of the zoo's training set (shapes seed 1); "
            f"val: {protocol['n_val']} fresh images (seed {VAL_SEED}); test: the first {protocol['n_test']} "
            f"of the zoo's test set (seed 2)")
