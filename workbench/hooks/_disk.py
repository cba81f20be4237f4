"""The on-disk side of an activation store: manifests, checksummed chunks, the writer's lock.

Format (docs/ARCHITECTURE.md has the why): a folder with ``manifest.json`` and one folder per chunk,
``chunk-000000/<hook name>.npy``, plain NumPy files. A chunk is written to ``chunk-N.tmp/``, each file
checksummed (CRC-32; stores written before used BLAKE2b, still verified) *while* it is written and
fsynced, the folder renamed into place, and only then listed in the manifest (with the files' sizes
and checksums), which is replaced atomically. A reader trusts the manifest alone; a writer holds
``.writer.lock`` (``filelock``, an advisory ``flock``) for the whole harvest, so two harvests never
write into one folder.

Why CRC-32 (``zlib``) and no longer BLAKE2b: the checksum guards against damage (flipped bits,
truncation, a replaced file), which CRC-32 detects as well (every burst up to 32 bits, anything else
but one case in 2³²), and it runs at ~4 GB/s here against BLAKE2b's 0.8 GB/s, which cost a harvest
of every activation more than its disk writes did. Neither guards against someone who rewrites the
manifest too.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .._errors import InvalidOptionError, ResumeMismatchError, StoreCorruptError, StoreFormatError, StoreLockedError
from ._fingerprint import differences

FORMAT = "workbench-activations"
VERSION = 2  # 1: no fingerprint, no checksums (still readable); 2: both, plus a parent manifest for shards
CHECKSUM = "crc32"  # of new stores; CHECKSUMS lists every algorithm a store may name
TARGETS = "__targets__"  # file name of the labels of (x, y) batches, beside the activations
LOCK = ".writer.lock"


# ====================================================================== manifests
def read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreCorruptError(f"{path} is not valid JSON ({e}); it was damaged after it was written.") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise StoreFormatError(f"{folder} is not a workbench activation store (format {got!r}).")
    version = m.get("version")
    if version not in (1, VERSION):
        newer = isinstance(version, int) and version > VERSION
        raise StoreFormatError(
            f"{folder} was written in activation-store format version {version!r}, "
            + ("newer than this workbench reads (versions 1 to 2): upgrade workbench to open it."
               if newer else "which this workbench does not know (it reads versions 1 to 2).")
        )
    return m


def write_json_atomic(path: Path, obj: dict, durable: bool = True) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ====================================================================== checksummed files
class _Crc32:
    """CRC-32 with hashlib's interface (``update``, ``hexdigest``)."""

    def __init__(self):
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


#: checksum name in a manifest -> a new hasher (``update``, ``hexdigest``)
CHECKSUMS = {"crc32": _Crc32, "blake2b-128": lambda: hashlib.blake2b(digest_size=16)}


class _HashingFile:
    """A write-only file object that checksums what passes through it (so no file is read back)."""

    def __init__(self, f):
        self._f, self.nbytes = f, 0
        self.hash = CHECKSUMS[CHECKSUM]()

    def write(self, data) -> int:
        self.hash.update(data)
        self.nbytes += len(data)
        return self._f.write(data)


def save_npy(path: Path, arr: Union[np.ndarray, Sequence[np.ndarray]], durable: bool = True) -> dict:
    """Write ``arr`` as a ``.npy`` file; return its size and checksum, computed while writing.

    ``arr`` may be a list of arrays with one row shape and dtype: they are written one after the
    other as one array (their concatenation along axis 0), so a chunk of many batches is never
    concatenated in memory first.
    """
    parts = [arr] if isinstance(arr, np.ndarray) else list(arr)
    first = parts[0]
    header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False,
              "shape": (sum(len(p) for p in parts), *first.shape[1:])}
    with open(path, "wb") as f:
        w = _HashingFile(f)
        w.write(_npy_header(header))
        for part in parts:
            if part.dtype != first.dtype or part.shape[1:] != first.shape[1:]:
                raise InvalidOptionError(f"save_npy: parts of {first.dtype}{list(first.shape[1:])} and "
                                         f"{part.dtype}{list(part.shape[1:])} cannot form one array; every part "
                                         f"needs the first part's dtype and row shape.")
            if part.size:
                w.write(memoryview(np.ascontiguousarray(part)).cast("B"))
        f.flush()
        if durable:
            os.fsync(f.fileno())
    return {"bytes": w.nbytes, CHECKSUM: w.hash.hexdigest()}


def _npy_header(header: dict) -> bytes:
    """The ``.npy`` header for ``header``: format 1.0 unless it is too long (as ``np.save`` decides)."""
    buf = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buf, header)
    except ValueError:
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, header)
    return buf.getvalue()


def file_problem(path: Path, meta: Optional[dict]) -> Optional[str]:
    """What is wrong with a chunk file against its manifest entry, or None (format-1 entries: existence only)."""
    if not path.exists():
        return "missing"
    if meta is None:
        return None
    size = path.stat().st_size
    if size != meta["bytes"]:
        return f"{size} bytes on disk, {meta['bytes']} written (truncated or replaced)"
    algorithm = next((a for a in CHECKSUMS if a in meta), None)
    if algorithm is None:
        return f"its manifest entry names no checksum this workbench knows ({sorted(meta)})"
    h = CHECKSUMS[algorithm]()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    if h.hexdigest() != meta[algorithm]:
        return "its bytes changed after they were written (checksum mismatch)"
    return None


# ====================================================================== the writer
_HINTS = {
    "model.mode": " (model.train() vs model.eval(): dropout and BatchNorm differ)",
    "model.parameters": " (other weights, or BatchNorm statistics updated in train mode)",
    "data.first_batch": " (other data, or a shuffling loader: build it again with the same seed)",
}


def mismatch_message(folder: Path, diffs: list) -> str:
    lines = "\n".join(f"  - {field}: {_short(a)} in the store, {_short(b)} now{_HINTS.get(field, '')}"
                      for field, a, b in diffs)
    return (f"resume=True, but {folder} was harvested from other inputs; these differ:\n{lines}\n"
            f"Resuming would mix two harvests in one store, so nothing was written. Resume with exactly the "
            f"same model, batches and settings, or start over: harvest into another path (or delete {folder}) "
            f"with resume=False.")


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


class ShardWriter:
    """Writes whole-batch chunks into one folder under its lock; the manifest lists only finished chunks."""

    def __init__(self, folder: Path, names: list[str], fingerprint: dict, *, resume: bool,
                 lock_timeout: Optional[float], rank: int = 0, world: int = 1, durable: bool = True):
        from filelock import FileLock, Timeout

        # durable=False: nothing is forced to disk (like np.save); renames still make every chunk appear whole.
        self.folder, self.durable = folder, durable
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(folder / LOCK))
        try:
            self._lock.acquire(timeout=-1 if lock_timeout is None else lock_timeout)
        except Timeout:
            waited = "" if not lock_timeout else f" (waited {lock_timeout} s)"
            raise StoreLockedError(
                f"{folder} is being written by another harvest{waited}: its lock {folder / LOCK} is held. "
                f"Wait for it to finish, pass lock_timeout=SECONDS (or None) to wait for it, or harvest into "
                f"another path. Nothing was written."
            ) from None
        try:
            self._open(names, fingerprint, resume, rank, world)
        except BaseException:
            self.release()
            raise

    def _open(self, names, fingerprint, resume, rank, world) -> None:
        folder = self.folder
        if not (folder / "manifest.json").exists():
            self.manifest = {"format": FORMAT, "version": VERSION, "kind": "store" if world == 1 else "shard",
                             "rank": rank, "world_size": world, "checksum": CHECKSUM, "fingerprint": fingerprint,
                             "names": names, "info": {}, "targets": None, "chunks": [], "next_batch": 0,
                             "complete": False}
            for p in folder.glob("manifest.json.tmp*"):  # a first manifest whose writer was killed (we hold the lock)
                p.unlink()
            self._write_manifest()
            return
        if not resume:
            raise FileExistsError(
                f"{folder} already holds activations; pass resume=True to continue that harvest, "
                f"or choose another path (nothing there is deleted or overwritten)."
            )
        m = read_manifest(folder)
        if m["version"] < VERSION:
            raise ResumeMismatchError(
                f"{folder} was written by an older workbench (store format {m['version']}) that recorded no "
                f"fingerprint of its model and data, so resuming it cannot be checked. It stays readable with "
                f"ActivationStore.open; harvest into another path to continue."
            )
        if m.get("kind") == "sharded":
            raise ResumeMismatchError(f"{folder} holds a distributed store of {m['world_size']} ranks; resume it "
                                      f"with the same WORLD_SIZE, or harvest into another path.")
        diffs = differences(m["fingerprint"], fingerprint)
        if diffs:
            raise ResumeMismatchError(mismatch_message(folder, diffs))
        self.manifest = m
        # We hold the lock, so chunk folders the manifest does not list are leftovers of a write that was
        # interrupted (never visible to readers): remove them.
        listed = {c["dir"] for c in m["chunks"]}
        for p in folder.glob("chunk-*"):
            if p.name not in listed:
                shutil.rmtree(p)
        for p in folder.glob("manifest.json.tmp*"):
            p.unlink()

    @property
    def next_batch(self) -> int:
        return self.manifest["next_batch"]

    def recorded(self) -> dict[int, tuple[int, str]]:
        """batch index -> (rows, digest) of every batch already in the store."""
        return {b[0]: (b[1], b[2]) for c in self.manifest["chunks"] for b in c["batches"]}

    def write(self, batches: list, arrays: dict[str, Union[np.ndarray, list]], next_batch: int, info: dict,
              check=None) -> None:
        """Write one chunk (``arrays``: name -> array, or the list of its batches' arrays) and list it.

        ``check()``, when given, runs after the files are written and before the chunk becomes visible;
        it raises to abandon the chunk (the folder stays ``.tmp``, removed on resume)."""
        name = f"chunk-{len(self.manifest['chunks']):06d}"
        tmp = self.folder / (name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        files = {key: save_npy(tmp / f"{key}.npy", arr, self.durable) for key, arr in arrays.items()}
        if check is not None:
            check()
        if self.durable:
            fsync_dir(tmp)
        os.replace(tmp, self.folder / name)
        if self.durable:
            fsync_dir(self.folder)
        m = self.manifest
        m["chunks"].append({"dir": name, "rows": sum(b[1] for b in batches), "batches": batches, "files": files})
        m.update(next_batch=next_batch, complete=False, info=info, targets=TARGETS in arrays)
        self._write_manifest()

    def close(self, next_batch: int) -> None:
        self.manifest.update(next_batch=next_batch, complete=True)
        self._write_manifest()

    def _write_manifest(self) -> None:
        if self.durable:  # (called with two arguments then: tests/store_child.py instruments that signature)
            write_json_atomic(self.folder / "manifest.json", self.manifest)
        else:
            write_json_atomic(self.folder / "manifest.json", self.manifest, durable=False)

    def release(self) -> None:
        self._lock.release()


def ensure_parent(root: Path, names: list[str], fingerprint: dict, world: int) -> None:
    """The parent folder of a distributed store records how many ranks to expect, and what they harvest.

    Every rank calls this; the first creates the manifest (a hard link is an atomic create-if-absent),
    the others check that theirs matches it.
    """
    root.mkdir(parents=True, exist_ok=True)
    path = root / "manifest.json"
    if not path.exists():
        tmp = root / f"manifest.json.tmp-{os.getpid()}"
        write_json_atomic(tmp, {"format": FORMAT, "version": VERSION, "kind": "sharded", "world_size": world,
                                "names": names, "fingerprint": fingerprint})
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another rank was first
        finally:
            tmp.unlink()
    m = read_manifest(root)
    if m.get("kind") != "sharded":
        raise ResumeMismatchError(f"{root} holds a single (not distributed) store; a distributed harvest "
                                  f"(WORLD_SIZE={world}) needs another path.")
    diffs = differences(m["fingerprint"], fingerprint)
    if diffs:
        raise ResumeMismatchError(mismatch_message(root, diffs).replace("resume=True, but ", "", 1))


def shard_name(rank: int, world: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}"
