"""``wb.harvest`` and ``ActivationStore``: activations of datasets larger than memory.

On-disk format (see docs/ARCHITECTURE.md for why): a folder with ``manifest.json`` and one folder per
chunk, ``chunk-000000/<hook name>.npy`` — plain NumPy arrays that ``np.load(..., mmap_mode="r")``
opens lazily and dask/xarray wrap without copying. A chunk holds whole batches. It is written to a
temporary folder and renamed into place (atomic), and only then listed in the manifest, which is
itself replaced atomically: a reader trusts the manifest alone, so it never sees a half-written chunk,
and ``resume=True`` continues after the last listed chunk. A distributed harvest writes one such
folder per rank (``rank-00001-of-00004/``); opening the parent folder merges them in batch order.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np
import torch
from torch import nn

from .._errors import InvalidOptionError, UnknownNameError, nearest
from .._repr import html_table, human_bytes, parse_bytes
from ._capture import _Capture
from ._points import NameFilter
from ._reduce import Reduce

FORMAT = "workbench-activations"
VERSION = 1
TARGETS = "__targets__"  # file name of the labels of (x, y) batches, beside the activations


@dataclass
class _Segment:
    """Rows of one batch: where they live and which batch of the iterable they came from."""

    batch: int
    start: int
    stop: int
    chunk: Any  # a folder Path (on disk) or a dict name -> np.ndarray (in memory)

    def read(self, name: str) -> np.ndarray:
        if isinstance(self.chunk, dict):
            arr = self.chunk[name]
        else:
            arr = np.load(self.chunk / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        return arr[self.start:self.stop]


class ActivationStore:
    """Activations harvested over many batches, one row per example, in the order of the batches.

    ``store.array(name)`` loads one name as a NumPy array; ``store[name]`` as a tensor;
    ``store.iter_chunks(name)`` yields lazily memory-mapped pieces for data larger than memory.
    ``store.targets`` holds the labels of ``(x, y)`` batches.
    """

    def __init__(self, names: list[str], segments: list[_Segment], info: dict[str, dict],
                 path: Optional[Path] = None, complete: bool = True, has_targets: bool = False):
        self.names = list(names)
        self._segments = sorted(segments, key=lambda s: s.batch)
        self._info = info  # name -> {"dtype": str, "shape": row shape}
        self.path = path
        #: False while a harvest is still writing (or was interrupted before its end)
        self.complete = complete
        self._has_targets = has_targets

    # ------------------------------------------------------------------ reading
    @classmethod
    def open(cls, path: Union[str, os.PathLike]) -> "ActivationStore":
        """Open a store written by :func:`harvest` (one folder, or the parent of per-rank shards)."""
        path = Path(path)
        if (path / "manifest.json").exists():
            shards = [path]
        else:
            shards = sorted(p for p in path.glob("rank-*-of-*") if (p / "manifest.json").exists())
            if not shards:
                raise FileNotFoundError(f"{path} holds no activation store (no manifest.json, no rank-*-of-* shards).")
        names, segments, info, complete, targets = None, [], {}, True, True
        for shard in shards:
            m = _read_manifest(shard)
            names = names or m["names"]
            info.update(m["info"])
            complete &= m["complete"]
            targets &= m["targets"]
            for c in m["chunks"]:
                folder = shard / c["dir"]
                row = 0
                for batch, rows in c["batches"]:
                    segments.append(_Segment(batch, row, row + rows, folder))
                    row += rows
        if len(shards) > 1:
            world = int(shards[0].name.split("-of-")[1])
            complete &= len(shards) == world
        return cls(names, segments, info, path, complete, targets)

    def __len__(self) -> int:
        return sum(s.stop - s.start for s in self._segments)

    def _check(self, name: str) -> str:
        if name not in self.names and not (name == TARGETS and self._has_targets):
            close = nearest(name, self.names)
            raise UnknownNameError(f"{name!r} is not in this store ({len(self.names)} names)."
                                   + (f" Nearest names: {close}." if close else ""))
        return name

    def iter_chunks(self, name: str) -> Iterable[np.ndarray]:
        """The rows of ``name`` batch by batch, memory-mapped from disk where the store is on disk."""
        self._check(name)
        for seg in self._segments:
            yield seg.read(name)

    def array(self, name: str) -> np.ndarray:
        """All rows of ``name`` as one array ``[rows, *shape]`` (loads them into memory)."""
        self._check(name)
        parts = [seg.read(name) for seg in self._segments]
        if not parts:
            info = self._info[name]
            return np.zeros((0, *info["shape"]), dtype=info["dtype"])
        return np.concatenate(parts, axis=0)

    def __getitem__(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self.array(name))

    @property
    def targets(self) -> Optional[np.ndarray]:
        """Labels of ``(x, y)`` batches, one per row, or None when the batches had none."""
        return self.array(TARGETS) if self._has_targets else None

    @property
    def batch_index(self) -> np.ndarray:
        """For every row, the index of the batch it came from in the harvested iterable."""
        return np.concatenate([np.full(s.stop - s.start, s.batch) for s in self._segments] or [np.zeros(0, int)])

    @property
    def nbytes(self) -> int:
        rows = len(self)
        return sum(rows * int(np.prod(i["shape"], dtype=np.int64)) * np.dtype(i["dtype"]).itemsize
                   for n, i in self._info.items() if n in self.names)

    def to_frame(self):
        import pandas as pd

        rows = len(self)
        return pd.DataFrame([(n, (rows, *self._info[n]["shape"]), self._info[n]["dtype"]) for n in self.names],
                            columns=["name", "shape", "dtype"])

    def __repr__(self) -> str:
        where = f", {self.path}" if self.path else ", in memory"
        state = "" if self.complete else ", incomplete"
        return f"ActivationStore({len(self.names)} names, {len(self)} rows, {human_bytes(self.nbytes)}{where}{state})"

    def _repr_html_(self) -> str:
        df = self.to_frame()
        return html_table(list(df.columns), df.itertuples(index=False), caption=repr(self))


# ====================================================================== writing
def _read_manifest(folder: Path) -> dict:
    m = json.loads((folder / "manifest.json").read_text())
    if m.get("format") != FORMAT:
        raise ValueError(f"{folder} is not a workbench activation store (format {m.get('format')!r}).")
    return m


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


class _ShardWriter:
    """Writes whole-batch chunks into one folder; the manifest lists only finished chunks."""

    def __init__(self, folder: Path, names: list[str], settings: dict, resume: bool):
        self.folder = folder
        if (folder / "manifest.json").exists():
            if not resume:
                raise FileExistsError(
                    f"{folder} already holds activations; pass resume=True to continue that harvest, "
                    f"or choose another path (nothing there is deleted or overwritten)."
                )
            self.manifest = _read_manifest(folder)
            if self.manifest["settings"] != settings or self.manifest["names"] != names:
                raise InvalidOptionError(
                    f"resume=True, but {folder} was harvested with names={self.manifest['names']} and "
                    f"{self.manifest['settings']}; this call asks for names={names} and {settings}."
                )
            # Chunk folders not in the manifest are leftovers of an interrupted write.
            listed = {c["dir"] for c in self.manifest["chunks"]}
            for p in folder.glob("chunk-*"):
                if p.name not in listed:
                    shutil.rmtree(p)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            self.manifest = {"format": FORMAT, "version": VERSION, "names": names, "settings": settings,
                             "info": {}, "targets": False, "chunks": [], "next_batch": 0, "complete": False}
            _write_json_atomic(folder / "manifest.json", self.manifest)

    @property
    def next_batch(self) -> int:
        return self.manifest["next_batch"]

    def write(self, batches: list[tuple[int, int]], arrays: dict[str, np.ndarray], next_batch: int) -> None:
        name = f"chunk-{len(self.manifest['chunks']):06d}"
        tmp = self.folder / (name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for key, arr in arrays.items():
            _save_npy(tmp / f"{key}.npy", arr)
        os.replace(tmp, self.folder / name)
        m = self.manifest
        m["chunks"].append({"dir": name, "batches": batches})
        m["next_batch"] = next_batch
        m["targets"] = TARGETS in arrays
        for key, arr in arrays.items():
            m["info"].setdefault(key, {"dtype": arr.dtype.str, "shape": list(arr.shape[1:])})
        _write_json_atomic(self.folder / "manifest.json", m)

    def close(self, next_batch: int) -> None:
        self.manifest["next_batch"] = next_batch
        self.manifest["complete"] = True
        _write_json_atomic(self.folder / "manifest.json", self.manifest)


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _split_batch(batch) -> tuple[Any, Any]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise InvalidOptionError(
        f"harvest: a batch must be a tensor or an (x, y) tuple; got {type(batch).__name__}. "
        f"Pass forward=lambda model, batch: model(...) to run other batches."
    )


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # NumPy has no bfloat16
        t = t.float()
    return t.numpy()


def harvest(model: nn.Module, batches: Iterable, names: NameFilter = None, reduce: Reduce = None,
            path: Union[str, os.PathLike, None] = None, dtype: Optional[torch.dtype] = None,
            progress: bool = True, resume: bool = False, *, chunk_bytes: Union[int, str] = "64MB",
            forward: Optional[Callable[[nn.Module, Any], Any]] = None,
            budget: Union[int, str, None] = "default") -> ActivationStore:
    """Capture ``names`` over every batch of ``batches`` into an :class:`ActivationStore`.

    Args:
        batches: a DataLoader or any iterable of tensors or ``(x, y)`` tuples; ``y`` is kept as
            ``store.targets``. With ``resume=True`` it must yield the same batches in the same order.
        names, reduce, dtype: as in :class:`capture` (``reduce="spatial_mean"`` keeps stores small).
        path: None keeps the store in memory; a folder writes chunks there (peak memory stays flat).
        progress: show a ``tqdm`` bar with rows/s.
        resume: continue an interrupted harvest at ``path`` after its last complete chunk.
        chunk_bytes: rows are flushed to disk once a chunk holds about this many bytes.
        forward: ``forward(model, batch)`` for batches that are not a tensor or an ``(x, y)`` tuple.

    Under ``torchrun`` (``RANK``/``WORLD_SIZE``, or an initialised process group) rank r harvests
    batches r, r+W, r+2W, … into ``path/rank-r-of-W``; ``ActivationStore.open(path)`` reads them as one
    store in the original batch order.
    """
    from tqdm.auto import tqdm

    rank, world = _rank_world()
    if world > 1 and path is None:
        raise InvalidOptionError("a distributed harvest (WORLD_SIZE > 1) needs path= to write its shard to.")
    chunk_limit = parse_bytes(chunk_bytes)
    core = _Capture(model, names, reduce=reduce, device="cpu", dtype=dtype, budget=budget)
    keys = list(core.key_of.values())
    writer = None
    if path is not None:
        root = Path(path)
        folder = root / f"rank-{rank:05d}-of-{world:05d}" if world > 1 else root
        settings = {"reduce": reduce if isinstance(reduce, str) or reduce is None else getattr(reduce, "__name__", "callable"),
                    "dtype": str(dtype), "world_size": world}
        writer = _ShardWriter(folder, keys, settings, resume)
    start = writer.next_batch if writer else 0
    dataset = getattr(batches, "dataset", None)
    bar = tqdm(total=len(dataset) if hasattr(dataset, "__len__") else None, unit="row", unit_scale=True,
               desc="harvest", disable=not progress)
    pending: dict[str, list[np.ndarray]] = {}
    pending_batches: list[tuple[int, int]] = []
    pending_bytes = 0
    memory: list[_Segment] = []
    info: dict[str, dict] = {}
    has_targets = False
    index = -1
    core.attach()
    try:
        for index, batch in enumerate(batches):
            if index < start or index % world != rank:
                if index < start and bar.total is not None:
                    bar.update(_batch_rows(batch))
                continue
            if forward is not None:
                y = None
                forward(model, batch)
            else:
                x, y = _split_batch(batch)
                model(x)
            core.check()  # refuses values an unseen in-place op overwrote, and the budget
            arrays = {}
            for key in keys:
                calls = core.calls.get(key, [])
                if len(calls) != 1:
                    raise InvalidOptionError(
                        f"harvest stores one activation per name per batch, but {key!r} fired {len(calls)} "
                        f"times in batch {index}; narrow names= or capture it with wb.capture(...)."
                    )
                arrays[key] = _to_numpy(calls[0])
            core.reset()
            rows = next(iter(arrays.values())).shape[0] if arrays else 0
            if y is not None and isinstance(y, torch.Tensor):
                arrays[TARGETS] = _to_numpy(y)
                has_targets = True
            for k, a in arrays.items():
                info.setdefault(k, {"dtype": a.dtype.str, "shape": list(a.shape[1:])})
            if writer is None:
                memory.append(_Segment(index, 0, rows, arrays))
            else:
                for k, a in arrays.items():
                    pending.setdefault(k, []).append(a)
                pending_batches.append((index, rows))
                pending_bytes += sum(a.nbytes for a in arrays.values())
                if pending_bytes >= chunk_limit:
                    writer.write(pending_batches, {k: np.concatenate(v) for k, v in pending.items()}, index + 1)
                    pending, pending_batches, pending_bytes = {}, [], 0
            bar.update(rows)
        if writer is not None:
            if pending_batches:
                writer.write(pending_batches, {k: np.concatenate(v) for k, v in pending.items()}, index + 1)
            writer.close(index + 1)
    finally:
        core.detach()
        bar.close()
    if writer is None:
        return ActivationStore(keys, memory, info, None, True, has_targets)
    import torch.distributed as dist

    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()  # every shard is complete before anyone opens the whole store
    return ActivationStore.open(path)


def _batch_rows(batch) -> int:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.ndim else 0
