"""``wb.harvest``: capture a dataset's activations into an :class:`~._store.ActivationStore` on disk.

The writing half of the store (the reading half, ``ActivationStore``, is in ``_store.py``): the manifest's
fingerprint of the model, the data stream and every setting (``resume=True`` refuses to mix harvests), one
digest per batch, the writer's lock, the rank folders of a distributed harvest. The format is in ``_disk.py``.
"""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np
import torch
from torch import nn

from .._errors import InvalidOptionError, ResumeMismatchError
from .._progress import ProgressLike, progress_bar, show_progress
from .._repr import parse_bytes
from .._threads import WriteBehind
from ..models import no_grad_analysis, unrunnable_explained
from ._capture import _Capture
from ._disk import TARGETS, ShardWriter, ensure_parent, shard_name
from ._fingerprint import batch_digest, callable_id, model_fingerprint
from ._guard import quiet as _quiet
from ._points import NameFilter
from ._reduce import Reduce
from ._store import ActivationStore, _Chunk, _Segment



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


# How many owners a tensor storage has (tensors, views and storage objects sharing it); a private torch
# function, so its absence (another torch) only means every value held by reference is copied.
_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _sole_owner(calls: dict[str, list[torch.Tensor]], by_reference: set[int]) -> set[int]:
    """``id`` of the values held by reference whose memory nothing outside the capture shares.

    No module, buffer, input or other tensor holds such memory, so no later forward can write into it: its
    rows need no copy before they wait for the writer thread. Anything else sharing it (the model keeping
    its output, a buffer it returns a view of, the batch itself) makes the count larger, and it is copied.
    (Measured: the defensive copy of every such value was about a tenth of a harvest's CPU time.)
    """
    if _USE_COUNT is None:
        return set()
    groups: dict[int, dict[int, torch.Tensor]] = {}
    with _quiet():
        for ts in calls.values():
            for t in ts:
                if id(t) in by_reference:
                    groups.setdefault(t.untyped_storage().data_ptr(), {})[id(t)] = t
        # each of ours is one owner; the storage object asked for in the count is one more
        return {i for ts in groups.values() if _USE_COUNT(next(iter(ts.values())).untyped_storage()._cdata) == len(ts) + 1
                for i in ts}


def _to_numpy(t: torch.Tensor, copy: bool = True) -> np.ndarray:
    """``t`` as a C-contiguous NumPy array; ``copy=False`` where ``t`` is private to the capture (a copy it
    made: a clone before an in-place write, a reduction, a conversion, a device-to-host copy)."""
    with _quiet():
        t = t.detach()
        if t.device.type != "cpu":
            t, copy = t.cpu(), False
        if t.dtype == torch.bfloat16:  # NumPy has no bfloat16
            t, copy = t.float(), False
        a = t.numpy()
    # A copy otherwise: a value captured by reference may share memory the model writes again in its next
    # forward, after the capture stopped watching it.
    return np.array(a, copy=True, order="C") if copy else np.ascontiguousarray(a)


def _to_device(batch, device: Optional[torch.device]):
    """The tensors of ``batch`` (and of tuples, lists and dicts in it) moved to ``device``."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _batch_rows(batch) -> Optional[int]:
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.ndim else None


class _Rows:
    """Checks each batch's arrays before they are kept: one row per example for every name and the
    labels, and one row shape and dtype per name for the whole store."""

    def __init__(self, info: dict, targets: Optional[bool], from_disk: bool):
        self.info, self.targets, self.from_disk = dict(info), targets, from_disk

    def check(self, arrays: dict[str, np.ndarray], index: int) -> int:
        rows = None
        for key, a in arrays.items():
            what = "the labels y" if key == TARGETS else repr(key)
            if a.ndim == 0:
                raise InvalidOptionError(f"harvest stores one row per example, but {what} gave a scalar in batch "
                                         f"{index}; use a reduce= that keeps the batch axis.")
            if rows is None:
                rows, first = a.shape[0], what
            elif a.shape[0] != rows:
                raise InvalidOptionError(
                    f"batch {index}: {what} {'have' if key == TARGETS else 'has'} {a.shape[0]} rows but {first} has "
                    f"{rows}. A store keeps one row "
                    f"per example for every name" + (" and one label per example; misaligned labels are never "
                                                     "stored" if key == TARGETS else
                                                     "; a name whose first axis is not the batch axis cannot be "
                                                     "harvested (capture it with wb.capture)") + ".")
            want = self.info.get(key)
            got = {"dtype": a.dtype.str, "shape": list(a.shape[1:])}
            if want is not None and want != got:
                cls = ResumeMismatchError if self.from_disk else InvalidOptionError
                raise cls(
                    f"{what} gave rows of shape {got['shape']} ({got['dtype']}) in batch {index}, but the store "
                    f"holds rows of shape {want['shape']} ({want['dtype']}). "
                    + ("The model or data changed since the store was written: harvest into another path."
                       if self.from_disk else
                       "Every batch must give one row shape per name (variable-length sequences: pad them, or "
                       "pass reduce='token_mean').")
                )
            self.info.setdefault(key, got)
        has = TARGETS in arrays
        if self.targets is not None and has != self.targets:
            raise InvalidOptionError(f"batch {index} has {'' if has else 'no '}labels y, but earlier batches "
                                     f"{'had none' if has else 'had them'}; every batch must be (x, y), or none.")
        self.targets = has
        return rows or 0


@no_grad_analysis
def harvest(model: nn.Module, batches: Iterable, names: NameFilter = None, reduce: Reduce = None,
            path: Union[str, os.PathLike, None] = None, dtype: Optional[torch.dtype] = None,
            progress: ProgressLike = None, resume: bool = False, *, chunk_bytes: Union[int, str] = "64MB",
            forward: Optional[Callable[[nn.Module, Any], Any]] = None,
            budget: Union[int, str, None] = "default", lock_timeout: Optional[float] = 0,
            device: Union[str, torch.device, None] = None, durable: bool = True) -> ActivationStore:
    """Capture ``names`` over every batch of ``batches`` into an :class:`ActivationStore`.

    Args:
        batches: a DataLoader or any iterable of tensors or ``(x, y)`` tuples; ``y`` is kept as
            ``store.targets``. With ``resume=True`` it must yield the same batches in the same order.
        names, reduce, dtype: as in :class:`capture` (``reduce="spatial_mean"`` keeps stores small).
        path: None keeps the store in memory; a folder writes chunks there (peak memory stays flat).
        progress: a ``tqdm`` bar of batches (with a total when ``batches`` has a length): True, False, or
            None (the default) for a bar in a Jupyter notebook only (``workbench._progress``).
        resume: continue an interrupted harvest at ``path`` after its last complete chunk. Refused
            (:class:`ResumeMismatchError`, naming each field) unless the model's weights and
            architecture, the batches already harvested and every setting are the same as before.
        chunk_bytes: rows are flushed to disk once a chunk holds about this many bytes.
        forward: ``forward(model, batch)`` for batches that are not a tensor or an ``(x, y)`` tuple.
        lock_timeout: seconds to wait when another harvest is writing into ``path`` (0: raise
            :class:`StoreLockedError` at once; None: wait as long as it takes).
        device: move each batch (its tensors) there before the forward, e.g. ``"cuda"`` for a
            DataLoader's CPU batches (asynchronously from pinned memory); None runs batches as they
            come. Activations always land on the CPU: on a GPU they are copied asynchronously into
            pinned memory as each module produces them.
        durable: force every chunk to disk (``fsync``) before the manifest lists it, so that even a
            power cut loses nothing listed. False leaves writing back to the kernel, as ``np.save``
            does: a killed process still loses nothing listed (chunks appear whole, by rename), but
            after a power cut or kernel crash a listed chunk may be damaged, which reads then refuse
            by its checksum. Faster when the disk is slower than the model.

    Chunks are written by a background thread while the model computes the next batches (at most
    one chunk in flight, so memory stays at about two chunks); a reader opening the store meanwhile
    sees every chunk finished so far.

    Under ``torchrun`` (``RANK``/``WORLD_SIZE``, or an initialised process group) rank r harvests
    batches r, r+W, r+2W, … into ``path/rank-r-of-W``; ``ActivationStore.open(path)`` reads them as one
    store in the original batch order, and is incomplete (and says which rank) until every rank is.

    The forwards run under ``torch.no_grad()`` (no graph is recorded; see ``workbench.models.no_grad_analysis``).
    """
    progress = show_progress(progress)  # a bad value is refused before the store is locked
    rank, world = _rank_world()
    if world > 1 and path is None:
        raise InvalidOptionError("a distributed harvest (WORLD_SIZE > 1) needs path= to write its shard to.")
    chunk_limit = parse_bytes(chunk_bytes)
    core = _Capture(model, names, reduce=reduce, device="cpu", dtype=dtype, budget=budget)
    keys = list(core.key_of.values())
    stream = iter(batches)
    first = next(stream, _NOTHING)
    if first is _NOTHING:
        raise InvalidOptionError("harvest: `batches` yielded no batch, so there is nothing to harvest (an empty "
                                 "DataLoader or an exhausted iterator?). Nothing was written.")
    writer = None
    if path is not None:
        root = Path(path)
        fingerprint = {
            "model": model_fingerprint(model),
            "data": {"first_batch": batch_digest(first, full=True), "batch_size": _batch_rows(first)},
            "settings": {"names": keys, "reduce": callable_id(reduce), "dtype": str(dtype),
                         "forward": callable_id(forward), "world_size": world},
        }
        folder = root
        if world > 1:
            ensure_parent(root, keys, fingerprint, world)
            folder = root / shard_name(rank, world)
        writer = ShardWriter(folder, keys, fingerprint, resume=resume, lock_timeout=lock_timeout, rank=rank,
                             world=world, durable=durable)
    try:
        total = len(batches) if hasattr(batches, "__len__") else None
    except TypeError:
        total = None
    bar = progress_bar(total=total, unit="batch", desc="harvest", progress=progress)
    try:
        with unrunnable_explained(model):  # (a mixture's experts that cannot run: why, naming the fix)
            memory = _run(model, core, keys, itertools.chain([first], stream), writer, chunk_limit, forward,
                          rank, world, bar, None if device is None else torch.device(device))
    finally:
        bar.close()
        if writer is not None:
            writer.release()
    if writer is None:
        return memory
    import torch.distributed as dist

    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()  # every shard is complete before anyone opens the whole store
    return ActivationStore.open(path)


_NOTHING = object()


def _run(model, core: _Capture, keys: list[str], batches: Iterable, writer: Optional[ShardWriter],
         chunk_limit: int, forward, rank: int, world: int, bar, device=None) -> Optional[ActivationStore]:
    """The harvest loop: skip (and check) what the store holds, capture the rest, hand whole chunks to a
    background thread that writes them while the next batches run."""
    start = writer.next_batch if writer else 0
    recorded = writer.recorded() if writer else {}
    manifest = writer.manifest if writer else {"info": {}, "targets": None}
    rows_check = _Rows(manifest["info"], manifest["targets"] if manifest["chunks"] else None, bool(recorded)) \
        if writer else _Rows({}, None, False)
    pending: dict[str, list[np.ndarray]] = {}
    pending_batches: list = []
    pending_bytes, memory, index = 0, [], -1
    behind = WriteBehind() if writer is not None else None

    def flush(next_batch: int) -> None:
        chunk, chunk_batches, info = pending.copy(), list(pending_batches), dict(rows_check.info)
        behind.submit(lambda: writer.write(chunk_batches, chunk, next_batch, info))

    core.attach()
    try:
        for index, batch in enumerate(batches):
            if index % world != rank:
                continue
            if index < start:  # already in the store: it must be the very batch harvested then
                if index not in recorded or batch_digest(batch) != recorded[index][1]:
                    raise ResumeMismatchError(
                        f"resume=True, but batch {index} of the iterable differs from the batch harvested "
                        f"there before (other data, or another order: a shuffling DataLoader draws a new order "
                        f"each time it is iterated, so build it again with the same seed); nothing was written. "
                        f"Resume with the same batches in the same order, or harvest into another path.")
                bar.update(1)
                continue
            digest = batch_digest(batch) if writer is not None else None
            run = _to_device(batch, device)
            if forward is not None:
                y = None
                forward(model, run)
            else:
                x, y = _split_batch(run)
                model(x)
            core.check()  # refuses values an unseen in-place op overwrote, and the budget; waits for copies
            by_reference = core.by_reference()
            sole = _sole_owner(core.calls, by_reference)
            arrays = {}
            for key in keys:
                calls = core.calls.get(key, [])
                if not calls and key in core.skipped:  # it fired, but gave nothing storable (e.g. a tuple)
                    raise InvalidOptionError(f"harvest cannot store {key!r}: {core.skipped[key]}; or leave it out "
                                             f"of names=. Nothing of batch {index} was stored.")
                if len(calls) != 1:
                    raise InvalidOptionError(
                        f"harvest stores one activation per name per batch, but {key!r} fired {len(calls)} "
                        f"times in batch {index}; narrow names= or capture it with wb.capture(...)."
                    )
                if calls[0].layout != torch.strided:
                    raise InvalidOptionError(
                        f"{key!r} gave a {calls[0].layout} tensor in batch {index}; a store keeps dense rows. Pass "
                        f"reduce=lambda out: out.to_dense() to store its values densely, or capture it with wb.capture.")
                arrays[key] = _to_numpy(calls[0], copy=id(calls[0]) in by_reference and id(calls[0]) not in sole)
            core.reset()
            if isinstance(y, torch.Tensor):
                arrays[TARGETS] = _to_numpy(y)
            rows = rows_check.check(arrays, index)
            if writer is None:
                memory.append(_Segment(index, 0, rows, _Chunk(rows, arrays=arrays)))
            else:
                for k, a in arrays.items():
                    pending.setdefault(k, []).append(a)
                pending_batches.append([index, rows, digest])
                pending_bytes += sum(a.nbytes for a in arrays.values())
                if pending_bytes >= chunk_limit:
                    flush(index + 1)
                    pending, pending_batches, pending_bytes = {}, [], 0
            bar.update(1)
            bar.set_postfix_str(f"{rows} rows", refresh=False)
        if index + 1 < start:
            raise ResumeMismatchError(
                f"resume=True, but the iterable ended after {index + 1} batches while the store already holds "
                f"batches up to {start - 1}; a shorter or different iterable would leave the store wrong. "
                f"Nothing was written. Resume with the same batches, or harvest into another path.")
        if writer is not None:
            if pending_batches:
                flush(index + 1)
            behind.wait()
            writer.close(index + 1)
    finally:
        core.detach()
        if behind is not None:
            failing = sys.exc_info()[1] is not None
            try:
                behind.close()  # on an error too: the chunk in flight lands whole (or, failing, stays invisible)
            except Exception:
                if not failing:  # otherwise the error already on its way out is the one to report
                    raise
    if writer is not None:
        return None
    return ActivationStore(keys, memory, rows_check.info, None, True, bool(rows_check.targets))
