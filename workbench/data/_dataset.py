"""``ConceptDataset``: inputs, a training label, named concepts and (for images) per-pixel masks."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._errors import InvalidOptionError, OutOfRangeError, UnknownNameError, nearest
from .._random import SeedLike, as_generator
from .._repr import tensor_summary
from ._vocab import IGNORE_INDEX, decode, encode


class ConceptDataset(torch.utils.data.Dataset):
    """A data set whose every item carries known concepts; shared by images and text.

    Attributes:
        inputs: images ``float32 [N, C, H, W]`` with values in [0, 1] (not standardised; the channel
            mean/std are in ``meta["mean"]``/``meta["std"]``), or token ids ``int64 [N, T]``.
        labels: ``int64 [N]`` class of the training task (images); ``int64 [N, T]`` next-token
            targets (text), ``IGNORE_INDEX`` (-100) where there is none; or None.
        label_names: ``list[str]``, one name per class (text: the vocabulary).
        concept_names: ``list[str]``; names may carry a group, ``"shape:circle"``.
        concepts: ``bool [N, K]`` image-level, or ``bool [N, T, K]`` token-level.
        masks: ``bool [N, K, H, W]`` per-pixel masks (built on access from ``segments``), or None.
        segments: ``uint8 [N, H, W]`` region of each pixel (see ``meta["regions"]``), or None.
        mask_regions: ``int64 [K]`` the region each concept's mask covers, or None.
        vocab: ``list[str]`` for text, else None.
        meta: ``dict`` — generator name, seed, parameters.

    A mask is stored compactly: concept k of image n covers the pixels ``segments[n] ==
    mask_regions[k]`` when ``concepts[n, k]`` holds, so 50k images need 50 MB, not 1.5 GB.

    Example:
        >>> ds = ConceptDataset(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]), label_names=["a", "b"],
        ...                     concept_names=["odd"], concepts=torch.tensor([[0], [1], [0], [1]]).bool())
        >>> len(ds), ds[1][1].item(), ds.concept("odd").tolist()
        (4, 1, [False, True, False, True])
    """

    def __init__(self, inputs: torch.Tensor, labels: Optional[torch.Tensor], *, label_names: Sequence[str],
                 concept_names: Sequence[str], concepts: torch.Tensor, masks: Optional[torch.Tensor] = None,
                 segments: Optional[torch.Tensor] = None, mask_regions: Optional[torch.Tensor] = None,
                 vocab: Optional[Sequence[str]] = None, meta: Optional[dict] = None):
        n = len(inputs)
        self.inputs = inputs
        self.labels = labels
        self.label_names = list(label_names)
        self.concept_names = list(concept_names)
        self.concepts = concepts.bool()
        self.segments = segments
        self.mask_regions = mask_regions
        self._dense_masks = masks
        self.vocab = None if vocab is None else list(vocab)
        self.meta = dict(meta or {})
        if len(set(self.concept_names)) != len(self.concept_names):
            raise InvalidOptionError(f"concept names must be unique; got {self.concept_names}.")
        for what, t in [("labels", labels), ("concepts", concepts), ("masks", masks), ("segments", segments)]:
            if t is not None and len(t) != n:
                raise InvalidOptionError(f"{what} has {len(t)} rows but inputs has {n}.")
        if self.concepts.shape[-1] != len(self.concept_names):
            raise InvalidOptionError(f"concepts has {self.concepts.shape[-1]} columns for "
                                     f"{len(self.concept_names)} concept names.")
        if (segments is None) != (mask_regions is None):
            raise InvalidOptionError("segments and mask_regions come together.")

    # --- the Dataset protocol ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i):
        """``(inputs[i], labels[i])`` (or ``inputs[i]`` alone without labels); ``i`` may be a batch of indices."""
        if isinstance(i, (list, tuple)):
            i = torch.as_tensor(i, dtype=torch.long)
        if self.labels is None:
            return self.inputs[i]
        return self.inputs[i], self.labels[i]

    def loader(self, batch_size: int = 128, shuffle: bool = False, seed: SeedLike = 0,
               drop_last: bool = False) -> torch.utils.data.DataLoader:
        """A DataLoader of ``(x, y)`` batches, fetched a whole batch at a time (no per-item collate).

        Same ``seed``, same order. ``x``: ``[B, ...]`` like ``inputs``; ``y``: ``[B]`` (or ``[B, T]``).
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidOptionError(f"batch_size must be a positive int; got {batch_size!r}.")
        from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

        order = (RandomSampler(self, generator=as_generator(seed)[0]) if shuffle
                 else SequentialSampler(self))
        # batch_size=None: the sampler yields index lists and __getitem__ gathers them in one go.
        return DataLoader(self, sampler=BatchSampler(order, batch_size, drop_last), batch_size=None)

    # --- selecting --------------------------------------------------------------------------------
    def subset(self, idx) -> "ConceptDataset":
        """The items at ``idx`` (indices, a slice or a bool mask over items), as a new data set."""
        if isinstance(idx, slice):
            idx = torch.arange(len(self))[idx]
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx = idx.long().reshape(-1)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise OutOfRangeError(f"subset index out of range for a data set of {len(self)} items: valid are "
                                  f"{-len(self)} … {len(self) - 1}, a slice or a bool mask of length {len(self)}.")
        pick = (lambda t: None if t is None else t[idx])
        return ConceptDataset(self.inputs[idx], pick(self.labels), label_names=self.label_names,
                              concept_names=self.concept_names, concepts=self.concepts[idx],
                              masks=pick(self._dense_masks), segments=pick(self.segments),
                              mask_regions=self.mask_regions, vocab=self.vocab, meta=self.meta)

    def split(self, fraction: float = 0.8, seed: SeedLike = 0) -> tuple["ConceptDataset", "ConceptDataset"]:
        """``(train, test)``: a random ``fraction`` of the items and the rest (same seed, same split)."""
        if not (0 < fraction < 1):
            raise InvalidOptionError(f"fraction must lie strictly between 0 and 1; got {fraction!r}.")
        perm = torch.randperm(len(self), generator=as_generator(seed)[0])
        cut = int(round(fraction * len(self)))
        return self.subset(perm[:cut].sort().values), self.subset(perm[cut:].sort().values)

    # --- concepts ---------------------------------------------------------------------------------
    def _index(self, name: str) -> int:
        if name in self.concept_names:
            return self.concept_names.index(name)
        bare = [c for c in self.concept_names if c.split(":")[-1] == name]
        if len(bare) == 1:  # "circle" for "shape:circle" when unambiguous
            return self.concept_names.index(bare[0])
        near = nearest(name, self.concept_names, n=3)
        tip = f" Did you mean {' or '.join(map(repr, near))}?" if near else ""
        raise UnknownNameError(f"no concept named {name!r} in this data set; its concepts are "
                               f"{self.concept_names}.{tip}")

    def concept(self, name: str) -> torch.Tensor:
        """The labels of one concept: ``bool [N]`` (images) or ``[N, T]`` (text); ``"circle"`` finds
        ``"shape:circle"`` when only one group has it."""
        return self.concepts[..., self._index(name)]

    @property
    def concept_groups(self) -> dict[str, list[str]]:
        """Concept names by group: ``{"shape": ["shape:circle", ...], ...}`` (ungrouped names under "")."""
        groups: dict[str, list[str]] = {}
        for c in self.concept_names:
            groups.setdefault(c.split(":")[0] if ":" in c else "", []).append(c)
        return groups

    @property
    def masks(self) -> Optional[torch.Tensor]:
        """``bool [N, K, H, W]``: pixels of concept k in image n; built on each access (N·K·H·W bytes)."""
        if self._dense_masks is not None:
            return self._dense_masks
        if self.segments is None:
            return None
        region = self.segments[:, None].long() == self.mask_regions[None, :, None, None]
        return region & self.concepts[:, :, None, None]

    def mask(self, name: str) -> torch.Tensor:
        """The mask of one concept, ``bool [N, H, W]``."""
        k = self._index(name)
        if self._dense_masks is not None:
            return self._dense_masks[:, k]
        if self.segments is None:
            raise InvalidOptionError("this data set has no per-pixel masks (text or a data set without them).")
        return (self.segments.long() == self.mask_regions[k]) & self.concepts[:, k, None, None]

    def to_frame(self):
        """A pandas DataFrame, one row per concept: group, count and prevalence (per image or token)."""
        import pandas as pd

        c = self.concepts
        if c.dim() == 3 and self.meta.get("pad_id") is not None:
            c = c[self.inputs != self.meta["pad_id"]]  # prevalence among real tokens
        flat = c.reshape(-1, c.shape[-1])
        count = flat.sum(0)
        rows = [{"concept": n, "group": n.split(":")[0] if ":" in n else "", "count": int(count[k]),
                 "prevalence": float(count[k]) / max(len(flat), 1)} for k, n in enumerate(self.concept_names)]
        return pd.DataFrame(rows)

    # --- text -------------------------------------------------------------------------------------
    def encode(self, text) -> torch.Tensor:
        """Token ids ``int64 [T]`` of a string or list of tokens (text data sets only)."""
        return encode(text, self._need_vocab())

    def decode(self, ids) -> str:
        """The tokens of ``ids`` joined by spaces, padding dropped (text data sets only)."""
        return decode(ids, self._need_vocab(), pad_id=self.meta.get("pad_id"))

    def _need_vocab(self) -> list[str]:
        if self.vocab is None:
            raise InvalidOptionError("encode/decode need a text data set (this one has no vocab).")
        return self.vocab

    # --- notebook -----------------------------------------------------------------------------------
    def __repr__(self) -> str:
        kind = self.meta.get("generator", "ConceptDataset")
        masks = ", masks" if (self.segments is not None or self._dense_masks is not None) else ""
        return (f"ConceptDataset({kind!r}, n={len(self)}, inputs={tensor_summary(self.inputs)}, "
                f"{len(self.label_names)} labels, {len(self.concept_names)} concepts{masks})")

    def _repr_html_(self) -> str:
        from ._render import dataset_html
        return dataset_html(self)
