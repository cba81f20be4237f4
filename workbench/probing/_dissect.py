"""Network Dissection: IoU of thresholded conv maps with concept masks, and its rotation sweep.

As in Bau et al. (2017): each unit's threshold T is its top quantile (P(a > T) = 0.005) over every
spatial location of its maps in the data set (the maps as captured, as their reference code does);
the maps are upsampled bilinearly to the mask resolution, thresholded at T, and the IoU with each
concept's masks is accumulated over the whole data set. A unit is a detector when its best IoU
exceeds 0.04; the unique detectors of a layer are the distinct concepts its detectors detect.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .._errors import InvalidOptionError
from .._progress import ProgressLike, progress_bar
from .._random import SeedLike, as_seed
from .._report import Report, new_axes
from ..groups import GroupElement, geodesic, get_group
from ._inputs import _tensor


def _mask_source(masks, names):
    """``(fetch(lo, hi) -> bool [b, K, H, W], K, (H, W), names)`` without building all masks at once."""
    if hasattr(masks, "concept_names"):  # a ConceptDataset: build each batch's masks from its region map
        ds, names = masks, list(masks.concept_names)
        if ds.segments is not None:
            regions = ds.mask_regions.long()[None, :, None, None]
            fetch = lambda lo, hi: (ds.segments[lo:hi, None].long() == regions) & ds.concepts[lo:hi, :, None, None]
            return fetch, len(names), tuple(ds.segments.shape[-2:]), names, len(ds.segments)
        masks = ds.masks
        if masks is None:
            raise InvalidOptionError("this ConceptDataset has no per-pixel masks; dissection needs masks "
                                     "(e.g. wb.data.shapes).")
    M = _tensor(masks, "masks")
    if M.ndim != 4:
        raise InvalidOptionError(f"masks must be bool [N, K, H, W]; got shape {tuple(M.shape)}.")
    if M.dtype != torch.bool:
        if not bool(((M == 0) | (M == 1)).all()):  # .bool() would read 0.3 (a soft mask) as True
            raise InvalidOptionError("masks must be binary (bool, or 0/1); got other values. Threshold soft masks "
                                     "first (e.g. masks > 0.5).")
        M = M.bool()
    names = [f"c{k}" for k in range(M.shape[1])] if names is None else list(names)
    if len(names) != M.shape[1]:
        raise InvalidOptionError(f"{len(names)} concept names for {M.shape[1]} mask channels.")
    return (lambda lo, hi: M[lo:hi]), M.shape[1], tuple(M.shape[-2:]), names, M.shape[0]


def unit_thresholds(maps: torch.Tensor, quantile: float = 0.005) -> torch.Tensor:
    """``[C]``: T_c with a fraction ``quantile`` of unit c's values (all images, all locations) above it.

    T_c is the value just below unit c's top ceil(quantile·n) of its n values, so exactly that many lie
    strictly above it when they are distinct (at least one, at most n − 1). Where values tie at T_c
    fewer do: a ReLU unit that is 0 on more than 1 − quantile of its locations has T_c = 0, and only
    its positive values count as on (``dissect`` compares with ``>``, as NetDissect-Lite does).
    """
    C = maps.shape[1]
    values = maps.transpose(0, 1).reshape(C, -1)
    above = min(max(1, math.ceil(quantile * values.shape[1])), values.shape[1] - 1)
    return values.kthvalue(max(1, values.shape[1] - above), dim=1).values


@dataclass(repr=False)
class Dissection(Report):
    """IoU of every unit with every concept.

    Attributes:
        iou: float64 ``[C, K]``.
        thresholds: ``[C]`` the units' top-quantile thresholds.
        concept_names: K names.
        iou_threshold: a unit whose best IoU exceeds it is a detector (0.04).
    """

    iou: torch.Tensor
    thresholds: torch.Tensor
    concept_names: list[str]
    iou_threshold: float = 0.04

    @property
    def best_concept(self) -> torch.Tensor:
        """``int64 [C]``: each unit's best concept."""
        return self.iou.argmax(1)

    @property
    def detectors(self) -> torch.Tensor:
        """``int64``: the units whose best IoU exceeds ``iou_threshold``."""
        return (self.iou.amax(1) > self.iou_threshold).nonzero().flatten()

    @property
    def unique_detectors(self) -> int:
        """How many distinct concepts the detectors detect."""
        return len(set(self.best_concept[self.detectors].tolist()))

    def summary(self) -> str:
        return (f"{len(self.detectors)}/{self.iou.shape[0]} units are detectors (IoU > {self.iou_threshold}), "
                f"{self.unique_detectors} unique concepts")

    def to_frame(self):
        """One row per unit: its best concept, that IoU, and whether it is a detector."""
        import pandas as pd

        best = self.best_concept
        top = self.iou.amax(1)
        return pd.DataFrame({"unit": np.arange(len(best)), "concept": [self.concept_names[b] for b in best.tolist()],
                             "iou": top.numpy(), "detector": (top > self.iou_threshold).numpy()})

    def plot(self, ax=None):
        """Each unit's best IoU, sorted, coloured by concept; the detector threshold dashed."""
        import seaborn as sns

        ax = new_axes(ax)
        f = self.to_frame().sort_values("iou", ascending=False).reset_index(drop=True)
        sns.barplot(f, x=f.index, y="iou", hue="concept", dodge=False, ax=ax)
        ax.axhline(self.iou_threshold, ls="--", c="k", lw=0.8)
        ax.set(xlabel="unit (sorted)", xticks=[])
        ax.legend(fontsize="x-small", ncol=2)
        return ax


def dissect(maps, masks, *, names: Optional[Sequence[str]] = None, quantile: float = 0.005,
            iou_threshold: float = 0.04, basis: Optional[GroupElement] = None, batch_size: int = 64) -> Dissection:
    """Network-Dissection IoU of every unit of conv maps with every concept's masks.

    Args:
        maps: ``[N, C, h, w]`` activations of a conv layer.
        masks: bool ``[N, K, H, W]`` or a ConceptDataset with masks (built a batch at a time).
        names: concept names for a plain mask tensor.
        quantile: fraction of each unit's values above its threshold (0.005).
        iou_threshold: best IoU above which a unit counts as a detector (0.04).
        basis: a group element M (``[C, C]``) to look through first: the maps become M·a per location.
        batch_size: images upsampled at once (memory: batch·C·H·W values of the maps' dtype).

    Returns:
        :class:`Dissection` with ``iou [C, K]``.

    >>> maps = torch.zeros(4, 2, 2, 2); maps[:2, 0, 0, 0] = 1.0; maps[2:, 1, 1, 1] = 1.0
    >>> masks = torch.zeros(4, 1, 8, 8, dtype=torch.bool); masks[:2, 0, :4, :4] = True
    >>> d = dissect(maps, masks, quantile=0.1)  # the top 2 of each unit's 16 values: its two 1.0s
    >>> d.detectors.tolist(), d.unique_detectors
    ([0], 1)
    """
    A = _tensor(maps, "maps")
    if A.ndim != 4 or not A.is_floating_point():
        raise InvalidOptionError(f"maps must be floating point conv activations [N, C, h, w]; got "
                                 f"{A.dtype} of shape {tuple(A.shape)}. For [N, d] activations use concept_scores.")
    if isinstance(quantile, (bool, np.bool_)) or not isinstance(quantile, numbers.Real) or not 0 < quantile < 1:
        raise InvalidOptionError(f"quantile must be a number in (0, 1); got {quantile!r} (Network Dissection uses 0.005).")
    # NaN compared false with every IoU (no detector at all, without a word), a negative one made every unit a detector
    if isinstance(iou_threshold, (bool, np.bool_)) or not isinstance(iou_threshold, numbers.Real) \
            or not 0 <= iou_threshold < 1:
        raise InvalidOptionError(f"iou_threshold must be a number in [0, 1) (a unit whose best IoU exceeds it is a "
                                 f"detector; Network Dissection uses 0.04); got {iou_threshold!r}.")
    if isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise InvalidOptionError(f"batch_size must be an int ≥ 1 (images upsampled at once); got {batch_size!r}.")
    fetch, K, size, names, n_masks = _mask_source(masks, names)
    if n_masks != A.shape[0]:
        raise InvalidOptionError(f"masks cover {n_masks} images but maps have {A.shape[0]}: pass one mask set per "
                                 f"image, in the maps' order.")
    if A.shape[1] == 0 or K == 0 or A.shape[0] == 0 or min(A.shape[2:]) == 0 or min(size) == 0:
        raise InvalidOptionError(f"maps {tuple(A.shape)} and masks ({n_masks}, {K}, {size[0]}, {size[1]}) need at least "
                                 f"one image, unit, concept and location.")
    if not bool(torch.isfinite(A).all()):
        raise InvalidOptionError("maps contain NaN or infinite values; thresholds and IoU would be meaningless.")
    if A.dtype not in (torch.float32, torch.float64):
        A = A.float()  # upsampling runs in the maps' own precision (float32 is ~4× faster than float64)
    if basis is not None:
        A = basis.act(A, dim=1)
    N, C = A.shape[:2]
    T = unit_thresholds(A, quantile)[None, :, None]  # [1, C, 1]
    inter = torch.zeros(C, K, dtype=torch.float64)
    unit_area, concept_area = torch.zeros(C, dtype=torch.float64), torch.zeros(K, dtype=torch.float64)
    for lo in range(0, N, batch_size):
        hi = min(N, lo + batch_size)
        up = F.interpolate(A[lo:hi], size=size, mode="bilinear", align_corners=False)
        # strictly above, as NetDissect-Lite (mask > threshold): with ≥, a unit that is 0 on more than
        # 1 − quantile of its locations (T = 0), a dead one included, was on at every pixel and scored
        # its largest concept's area as IoU, a "detector" of any concept covering over 4% of the images
        on = (up.flatten(2) > T).transpose(0, 1).reshape(C, -1).to(torch.float32)  # [C, b·H·W]
        L = fetch(lo, hi)
        if L.shape[0] != hi - lo:
            raise InvalidOptionError(f"masks cover {L.shape[0] + lo} images but maps have {N}.")
        L = L.transpose(0, 1).reshape(K, -1).to(torch.float32)  # [K, b·H·W]
        inter += (on @ L.T).double()  # counts below 2^24 per batch are exact in float32
        unit_area += on.sum(1).double()
        concept_area += L.sum(1).double()
    union = unit_area[:, None] + concept_area[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros((), dtype=torch.float64))
    return Dissection(iou, T.flatten(), names, float(iou_threshold))


@dataclass(repr=False)
class DissectionSweep(Report):
    """Detectors as the basis turns along the geodesic Q^α from the neuron basis (α = 0) to a random one."""

    alphas: list[float]
    dissections: list[Dissection]
    seed: int

    def to_frame(self):
        """One row per α: detectors, unique detectors, mean best IoU."""
        import pandas as pd

        return pd.DataFrame({"alpha": self.alphas, "detectors": [len(d.detectors) for d in self.dissections],
                             "unique_detectors": [d.unique_detectors for d in self.dissections],
                             "mean_best_iou": [float(d.iou.amax(1).mean()) for d in self.dissections]})

    def summary(self) -> str:
        f = self.to_frame()
        return "unique detectors " + " → ".join(f"{u} (α={a:g})" for a, u in zip(f.alpha, f.unique_detectors))

    def plot(self, ax=None):
        """Unique detectors and detectors against α."""
        import seaborn as sns

        ax = new_axes(ax)
        f = self.to_frame().melt("alpha", ["detectors", "unique_detectors"], var_name="count", value_name="units")
        sns.lineplot(f, x="alpha", y="units", hue="count", marker="o", ax=ax)
        ax.set_xlabel("α (0 = neuron basis, 1 = random rotation)")
        return ax


def dissection_sweep(maps, masks, alphas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), *, seed: SeedLike = 0,
                     Q=None, progress: ProgressLike = None, **options) -> DissectionSweep:
    """:func:`dissect` in the bases Q^α (``geodesic(Q, α)``), Q a random rotation of SO(C) unless given.

    ``options`` go to :func:`dissect`. Same ``seed``, same Q. ``progress``: a bar of the α done (True, False,
    or None, the default, for a bar in a Jupyter notebook only).

    >>> maps = torch.rand(6, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    >>> masks = torch.rand(6, 2, 4, 4, generator=torch.Generator().manual_seed(1)) > 0.5
    >>> dissection_sweep(maps, masks, alphas=[0, 1], quantile=0.2).to_frame().alpha.tolist()
    [0.0, 1.0]
    """
    C = _tensor(maps, "maps").shape[1]
    seed = as_seed(seed)
    if Q is None:
        Q = get_group("special_orthogonal", C).sample(seed=seed)
    alphas = [float(a) for a in alphas]
    out = [dissect(maps, masks, basis=geodesic(Q, a), **options)
           for a in progress_bar(alphas, desc="geodesic Q^α", unit="α", progress=progress)]
    return DissectionSweep(alphas, out, int(seed))
