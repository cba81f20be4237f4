"""``ActivationStore``: activations of datasets larger than memory (``wb.harvest`` writes them: ``_harvest.py``).

A store never reports ``complete`` for data that is not exactly what was asked for, and nothing
already written is lost. The manifest records a fingerprint of the model, the data stream and every
setting, so ``resume=True`` refuses to mix harvests (``ResumeMismatchError``); every batch's digest,
so a shorter or reordered iterable is refused; every chunk file's size and checksum, so damaged bytes
are refused on first read (``StoreCorruptError``). A writer holds the store's lock, so a second harvest
into the same folder fails at once (``StoreLockedError``) or waits. The format itself is in
``_disk.py`` and docs/ARCHITECTURE.md. A distributed harvest writes one folder per rank
(``rank-00001-of-00004/``) under a parent manifest that records how many ranks to expect.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
import torch

from .._errors import MissingDependencyError, StoreCorruptError, StoreFormatError, UnknownNameError, nearest
from .._repr import html_table, human_bytes
from ._disk import TARGETS, file_problem, read_manifest, shard_name
from ._fingerprint import differences


@dataclass
class _Chunk:
    """Rows of whole batches: a folder of ``.npy`` files on disk, or arrays in memory."""

    rows: int
    folder: Optional[Path] = None
    arrays: Optional[dict] = None
    files: Optional[dict] = None  # name -> {"bytes", checksum}; None for format-1 stores
    checked: set = field(default_factory=set)

    def read(self, name: str, info: dict) -> np.ndarray:
        if self.arrays is not None:
            return self.arrays[name]
        path = self.folder / f"{name}.npy"
        if name not in self.checked:  # checksum and size on first read only: later reads are memory-mapped
            problem = file_problem(path, None if self.files is None else self.files.get(name))
            if problem:
                raise StoreCorruptError(f"{path}: {problem}. {self._advice()}")
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise StoreCorruptError(f"{path} cannot be read as a .npy file ({e}). {self._advice()}") from None
        want = (self.rows, *info["shape"])
        if arr.shape != want or arr.dtype.str != info["dtype"]:
            raise StoreCorruptError(f"{path} holds {arr.dtype.str}{list(arr.shape)}, but the manifest says "
                                    f"{info['dtype']}{list(want)}. {self._advice()}")
        self.checked.add(name)
        return arr

    def _advice(self) -> str:
        return ("The rows of this chunk cannot be trusted: harvest into a new path (store.verify() lists every "
                "damaged chunk).")


@dataclass
class _Segment:
    """Rows of one batch: where they live and which batch of the iterable they came from."""

    batch: int
    start: int
    stop: int
    chunk: _Chunk

    def read(self, name: str, info: dict) -> np.ndarray:
        return self.chunk.read(name, info)[self.start:self.stop]


class ActivationStore:
    """Activations harvested over many batches, one row per example, in the order of the batches.

    ``store.array(name)`` loads one name as a NumPy array; ``store[name]`` as a tensor;
    ``store.iter_chunks(name)`` yields lazily memory-mapped pieces for data larger than memory, and
    ``store.to_dask(name)`` wraps the same pieces as one lazy ``dask.array``.
    ``store.targets`` holds the labels of ``(x, y)`` batches. ``store.verify()`` checks every file.
    """

    def __init__(self, names: list[str], segments: list[_Segment], info: dict[str, dict],
                 path: Optional[Path] = None, complete: bool = True, has_targets: bool = False,
                 fingerprint: Optional[dict] = None, problems: Optional[list[str]] = None):
        self.names = list(names)
        self._segments = sorted(segments, key=lambda s: s.batch)
        self._info = info  # name -> {"dtype": str, "shape": row shape}
        self.path = path
        #: False while a harvest is still writing, after an interruption, or with a shard missing
        self.complete = complete
        #: why the store is incomplete (which rank, which batch), empty when complete
        self.problems: list[str] = list(problems or [])
        #: what was harvested: {"model": ..., "data": ..., "settings": ...} (see wb.harvest)
        self.fingerprint: dict = fingerprint or {}
        self._has_targets = has_targets

    # ------------------------------------------------------------------ reading
    @classmethod
    def open(cls, path: Union[str, os.PathLike]) -> "ActivationStore":
        """Open a store written by :func:`harvest` (one folder, or the parent of per-rank shards).

        An incomplete store opens (its finished chunks are exact) with a warning saying why: the harvest
        stopped at some batch, or a rank's shard is missing, incomplete or from another harvest.
        """
        path = Path(path)
        if (path / "manifest.json").exists():
            m = read_manifest(path)
            if m.get("kind") == "sharded":
                store = cls._open_shards(path, m)
            else:
                wrong = _batches_problem(m)
                if wrong:
                    raise StoreCorruptError(f"{path / 'manifest.json'} {wrong}: it was edited or damaged after it "
                                            f"was written, so its rows cannot be trusted. Harvest into a new path.")
                names, segments, info, complete, targets = _load_folder(path, m)
                store = cls(names, segments, info, path, complete, targets, m.get("fingerprint"))
                if not m["complete"]:
                    store.complete = False
                    store.problems = [f"the harvest stopped before batch {m['next_batch']} of its iterable; "
                                      f"continue it with wb.harvest(..., resume=True)"]
        else:
            store = cls._open_shards(path, None)
        if not store.complete:
            warnings.warn(f"{path} is incomplete: " + "; ".join(store.problems) + ".", stacklevel=2)
        return store

    @classmethod
    def _open_shards(cls, path: Path, parent: Optional[dict]) -> "ActivationStore":
        if parent is None:  # format 1: no parent manifest; the folder names say how many ranks
            found = sorted(p for p in path.glob("rank-*-of-*") if (p / "manifest.json").exists())
            if not found:
                raise _no_manifest(path)
            if read_manifest(found[0]).get("version", 1) >= 2:
                # every rank of a format-2 harvest writes or checks the parent manifest before its own shard: read
                # without it, shards of other harvests (another model) were merged and reported complete
                raise StoreCorruptError(
                    f"{path / 'manifest.json'} is missing, but {path} holds the shards of a distributed harvest "
                    f"({found[0].name}, ...), whose ranks write that parent manifest (how many ranks, what they "
                    f"harvested) before their own: it was deleted, and without it the ranks cannot be checked against "
                    f"one harvest, so nothing is read. Restore it from a copy, or harvest into a new path.")
            world = int(found[0].name.split("-of-")[1])
        else:
            world = parent["world_size"]
        names, segments, info, targets, problems = parent["names"] if parent else None, [], {}, True, []
        ends: dict[int, list[int]] = {}  # where each complete rank's iterable ended -> those ranks
        for rank in range(world):
            folder = path / shard_name(rank, world)
            if not (folder / "manifest.json").exists():
                problems.append(f"rank {rank} of {world} is missing (no {folder.name}/manifest.json)")
                continue
            m = read_manifest(folder)
            if parent is not None:
                diffs = differences(parent["fingerprint"], m.get("fingerprint") or {})
                if diffs:
                    problems.append(f"rank {rank} of {world} was harvested from other inputs "
                                    f"({', '.join(d[0] for d in diffs)}); its rows are left out")
                    continue
            wrong = _batches_problem(m, rank, world)
            if wrong:
                problems.append(f"rank {rank} of {world}: {folder.name}/manifest.json {wrong}; its rows are left out")
                continue
            shard_names, shard_segments, shard_info, _, shard_targets = _load_folder(folder, m)
            clash = [f"{n!r}: {i['dtype']}{i['shape']} here, {info[n]['dtype']}{info[n]['shape']} in the ranks before"
                     for n, i in shard_info.items() if n in info and info[n] != i]
            if clash:  # e.g. sequences of another length: the ranks' rows cannot form one array
                problems.append(f"rank {rank} of {world} stored rows of another shape or dtype ({'; '.join(clash)}); "
                                f"every batch must give one row shape per name (variable-length sequences: pad "
                                f"them, or pass reduce='token_mean'), so its rows are left out")
                continue
            if m["complete"]:
                ends.setdefault(m["next_batch"], []).append(rank)
            names = names or shard_names
            segments += shard_segments
            info.update(shard_info)
            targets &= shard_targets
            if not m["complete"]:
                problems.append(f"rank {rank} of {world} stopped before batch {m['next_batch']}; resume it "
                                f"with WORLD_SIZE={world}, RANK={rank} and resume=True")
        if len(ends) > 1:  # every rank iterates the same batches, so complete ranks end at the same batch
            problems.append("complete ranks ended at different batches (" + "; ".join(
                f"rank{'s' * (len(r) > 1)} {', '.join(map(str, r))} after {n}" for n, r in sorted(ends.items()))
                + "): they harvested iterables of different lengths, so batches are missing")
        return cls(names or [], segments, info, path, not problems, targets and bool(segments),
                   parent["fingerprint"] if parent else None, problems)

    def __len__(self) -> int:
        return sum(s.stop - s.start for s in self._segments)

    def _check(self, name: str) -> dict:
        if name not in self.names and not (name == TARGETS and self._has_targets):
            close = nearest(name, self.names)
            raise UnknownNameError(f"{name!r} is not in this store ({len(self.names)} names)."
                                   + (f" Nearest names: {close}." if close else ""))
        if name not in self._info:
            raise UnknownNameError(f"{name!r} has no rows in this store yet, so its shape is unknown.")
        return self._info[name]

    def iter_chunks(self, name: str) -> Iterable[np.ndarray]:
        """The rows of ``name`` batch by batch, memory-mapped from disk where the store is on disk."""
        info = self._check(name)
        for seg in self._segments:
            yield seg.read(name, info)

    def to_dask(self, name: str):
        """``name`` as a lazy ``dask.array``, one block per batch in batch order, for data larger than memory.

        Nothing is read when it is built; computing a block reads that batch's memory-mapped file (its
        checksum checked on the first read, as :meth:`iter_chunks` does) and hands back a view of the map,
        not a copy. Needs ``dask[array]`` (``pip install "dask[array]"``)."""
        try:
            import dask
            import dask.array as da
        except ImportError:
            raise MissingDependencyError('store.to_dask() needs dask: pip install "dask[array]" '
                                         '(or read store.iter_chunks(name), the same memory maps)') from None
        info = self._check(name)
        dtype = np.dtype(info["dtype"])
        blocks = [da.from_delayed(dask.delayed(seg.read, pure=True)(name, info),
                                  shape=(seg.stop - seg.start, *info["shape"]), dtype=dtype)
                  for seg in self._segments]
        return da.concatenate(blocks, axis=0) if blocks else da.zeros((0, *info["shape"]), dtype=dtype)

    def array(self, name: str) -> np.ndarray:
        """All rows of ``name`` as one array ``[rows, *shape]`` (loads them into memory)."""
        info = self._check(name)
        parts = [seg.read(name, info) for seg in self._segments]
        if not parts:
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

    def verify(self) -> "ActivationStore":
        """Check every file of the store against its manifest (size, checksum, rows); return the store.

        Raises :class:`StoreCorruptError` listing every damaged file and the batches whose rows it holds.
        """
        bad, chunks = [], {id(s.chunk): s.chunk for s in self._segments if s.chunk.folder is not None}
        for chunk in chunks.values():
            for name in [*self.names, *([TARGETS] if self._has_targets else [])]:
                if name not in self._info:
                    continue
                chunk.checked.discard(name)
                try:
                    chunk.read(name, self._info[name])
                except StoreCorruptError as e:
                    batches = sorted(s.batch for s in self._segments if s.chunk is chunk)
                    bad.append(f"{str(e).split('. The rows')[0]} (batches {batches[0]}-{batches[-1]})")
        if bad:
            raise StoreCorruptError(f"{len(bad)} damaged file(s) in {self.path}:\n  " + "\n  ".join(bad)
                                    + "\nHarvest those batches into a new path.")
        return self

    @property
    def nbytes(self) -> int:
        rows = len(self)
        return sum(rows * int(np.prod(i["shape"], dtype=np.int64)) * np.dtype(i["dtype"]).itemsize
                   for n, i in self._info.items() if n in self.names)

    def to_frame(self):
        import pandas as pd

        rows = len(self)
        return pd.DataFrame([(n, (rows, *self._info[n]["shape"]), self._info[n]["dtype"])
                             for n in self.names if n in self._info], columns=["name", "shape", "dtype"])

    def __repr__(self) -> str:
        where = f", {self.path}" if self.path else ", in memory"
        model = self.fingerprint.get("model")
        who = f", model {model['class'].rsplit('.', 1)[-1]} {model['parameters'][:8]}" if model else ""
        state = ", complete" if self.complete else ", incomplete: " + "; ".join(self.problems)
        return f"ActivationStore({len(self.names)} names, {len(self):,} rows, {human_bytes(self.nbytes)}{where}{who}{state})"

    def _repr_html_(self) -> str:
        df = self.to_frame()
        return html_table(list(df.columns), df.itertuples(index=False), caption=repr(self))


def _no_manifest(path: Path) -> Exception:
    """The error for a folder without manifest.json (and no shards): its store's files without the manifest that
    lists them (deleted), or no store at all."""
    if not path.is_dir():
        return StoreFormatError(f"{path} is no folder, so it holds no activation store (wb.harvest(..., path=) writes one).")
    chunks = sorted(p.name for p in path.glob("chunk-*"))
    if chunks:  # a harvest writes its manifest before its first chunk: it was deleted
        return StoreCorruptError(f"{path / 'manifest.json'} is missing, but {path} holds {len(chunks)} chunk folder(s) "
                                 f"({chunks[0]}, ...): the manifest was deleted after it was written, and a reader "
                                 f"trusts only the manifest (which chunks are finished, their checksums, which batches "
                                 f"they hold), so nothing is read. Restore it from a copy, or harvest into a new path.")
    return StoreFormatError(f"{path} holds no activation store (no manifest.json, no chunk-* folders, no rank-*-of-* "
                            f"shards).")


def _batches_problem(m: dict, rank: int = 0, world: int = 1) -> Optional[str]:
    """What is wrong with the batches a store folder's manifest lists, or None.

    A harvest lists exactly the batches ``rank, rank + world, ...`` before ``next_batch``, each once and in
    order (rank 0 of 1: every batch), so a shard copied into another rank's folder, or a manifest that lost,
    repeated or reordered a chunk, is told apart from a store that merely stopped early.
    """
    if m.get("rank", rank) != rank or m.get("world_size", world) != world:
        return f"belongs to rank {m.get('rank')} of {m.get('world_size')}"
    if "next_batch" not in m:  # format 1 stores may lack it
        return None
    listed = [b[0] for c in m["chunks"] for b in c["batches"]]
    want = list(range(rank, m["next_batch"], world))
    if listed == want:
        return None
    return (f"lists batches {_span(listed)} but a harvest stopping before batch {m['next_batch']} writes batches "
            f"{_span(want)}")


def _span(batches: list) -> str:
    return "[" + ", ".join(map(str, batches[:8])) + (", ...]" if len(batches) > 8 else "]")


def _load_folder(folder: Path, m: dict):
    """names, segments, info, complete, has_targets of one store folder (a store or a rank's shard)."""
    segments = []
    for c in m["chunks"]:
        rows = sum(b[1] for b in c["batches"])
        if c.get("rows", rows) != rows:
            raise StoreCorruptError(f"{folder}/manifest.json: {c['dir']} lists {c['rows']} rows but batches of {rows}.")
        chunk, row = _Chunk(rows, folder / c["dir"], files=c.get("files")), 0
        for b in c["batches"]:
            segments.append(_Segment(b[0], row, row + b[1], chunk))
            row += b[1]
    return m["names"], segments, m["info"], m["complete"], bool(m["targets"])
