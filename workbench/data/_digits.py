"""``digits``: scikit-learn's shipped 8×8 handwritten digits, upsampled, with simple concept labels."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._errors import InvalidOptionError
from .._random import SeedLike, as_seed
from ._dataset import ConceptDataset

#: concept -> the digits that have it (by how the digit is usually written)
DIGIT_CONCEPTS = {
    "even": (0, 2, 4, 6, 8),
    "loop": (0, 6, 8, 9),          # a closed loop
    "straight": (1, 4, 7),         # drawn with straight strokes only
    "curvy": (0, 2, 3, 5, 6, 8, 9),  # has a curved stroke
    "symmetric": (0, 1, 3, 8),     # roughly mirror-symmetric (left-right or top-bottom)
    "large": (5, 6, 7, 8, 9),      # value >= 5
}
INK_THRESHOLD = 0.25  # a pixel is ink (in every concept's mask) above this intensity


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """``images [1797, 8, 8]`` (0..16) and ``target [1797]``, read from the CSV scikit-learn ships.

    Reading the file directly skips importing scikit-learn (seconds); ``load_digits`` is the fallback.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise ImportError("digits() reads the 8×8 digits shipped with scikit-learn: pip install scikit-learn")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
        data = np.loadtxt(path, delimiter=",", dtype=np.float32)
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # pragma: no cover - a layout scikit-learn might adopt

    raw = load_digits()
    return raw.images, raw.target


def digits(size: int = 32, seed: SeedLike = 0) -> ConceptDataset:
    """The 1797 digits of ``sklearn.datasets.load_digits`` (shipped, no download), one channel, upsampled.

    Concepts (image-level, from the digit's value): ``even``, ``loop`` (0 6 8 9), ``straight``
    (1 4 7), ``curvy`` (0 2 3 5 6 8 9), ``symmetric`` (0 1 3 8), ``large`` (>= 5). A present
    concept's mask is the digit's ink (pixels above 0.25).

    Args:
        size: image side (>= 8); the 8×8 originals are resized bilinearly.
        seed: the order of the images is a seeded permutation (same seed, same order).

    Returns:
        ``inputs`` float32 ``[1797, 1, size, size]`` in [0, 1], ``labels`` int64 ``[1797]`` (the digit),
        ``concepts`` bool ``[1797, 6]``, ``masks`` bool ``[1797, 6, size, size]``.

    Example:
        >>> ds = digits(size=16)
        >>> ds.inputs.shape, ds.label_names[:3]
        (torch.Size([1797, 1, 16, 16]), ['0', '1', '2'])
        >>> bool((ds.concept("loop") == (ds.labels == 8) | (ds.labels == 0) | (ds.labels == 6) | (ds.labels == 9)).all())
        True
    """
    if not isinstance(size, int) or size < 8:
        raise InvalidOptionError(f"size must be an int >= 8 (the originals are 8×8); got size={size!r}.")
    raw_images, target = _load_digits()
    images = torch.as_tensor(raw_images, dtype=torch.float32)[:, None] / 16.0  # [1797, 1, 8, 8], 0..16
    labels = torch.as_tensor(target, dtype=torch.long)
    seed = as_seed(seed)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    images, labels = images[order], labels[order]
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    names = list(DIGIT_CONCEPTS)
    concepts = torch.stack([torch.isin(labels, torch.tensor(DIGIT_CONCEPTS[c])) for c in names], 1)
    segments = (images[:, 0] > INK_THRESHOLD).to(torch.uint8)  # 1 = ink
    meta = dict(generator="digits", seed=seed, size=size, source="sklearn.datasets.load_digits",
                task="classify the digit (10 classes)", inputs="grey in [0, 1], not standardised",
                regions={0: "background", 1: "ink"}, concept_digits=DIGIT_CONCEPTS,
                mean=[images.mean().item()], std=[images.std().item()])
    return ConceptDataset(images, labels, label_names=[str(d) for d in range(10)], concept_names=names,
                          concepts=concepts, segments=segments, mask_regions=torch.ones(len(names), dtype=torch.long),
                          meta=meta)
