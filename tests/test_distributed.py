"""Harvest past one machine: 4 ranks harvest one dataset, are killed and resumed, and the merged store reads
exactly, in batch order, memory-mapped. Every row is compared with a capture of the same batch by one process."""
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import workbench as wb

from test_store import cnn_model, make_batches, reference

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "distributed.py"


class Crash(Exception):
    pass


def as_rank(rank, world, fn):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # incomplete until the last rank
            return fn()
    finally:
        del os.environ["RANK"], os.environ["WORLD_SIZE"]


def crashing(batches, at):
    for i, b in enumerate(batches):
        if i == at:
            raise Crash(f"rank died at batch {i}")
        yield b


def test_four_ranks_interrupted_and_resumed_merge_exactly_in_batch_order(tmp_path):
    """The logic, in one process (RANK/WORLD_SIZE without a process group): ranks 1 and 3 die part-way."""
    model, batches, path = cnn_model(), make_batches(11), tmp_path / "acts"
    for rank in range(4):
        stop = {1: 5, 3: 7}.get(rank)  # rank 1 dies after its batch 1, rank 3 after its batch 3
        run = (lambda: wb.harvest(model, crashing(batches, stop), names=["1", "4"], path=path, progress=False,
                                  chunk_bytes=1)) if stop else \
            (lambda: wb.harvest(model, batches, names=["1", "4"], path=path, progress=False, chunk_bytes=1))
        try:
            as_rank(rank, 4, run)
        except Crash:
            pass
    with pytest.warns(UserWarning, match=r"rank 1 of 4 stopped before batch 2(.|\n)*rank 3 of 4 stopped before batch 4"):
        partial = wb.ActivationStore.open(path)
    assert not partial.complete and sorted(set(partial.batch_index)) == [0, 1, 2, 3, 4, 6, 8, 10]
    for rank in (1, 3):  # resumed as the message says
        as_rank(rank, 4, lambda: wb.harvest(model, batches, names=["1", "4"], path=path, progress=False, chunk_bytes=1,
                                            resume=True))
    store = wb.ActivationStore.open(path)
    ref = reference(model, batches, ["1", "4"])
    assert store.complete and len(store) == 55
    for name in ("1", "4"):
        np.testing.assert_array_equal(store.array(name), ref[name])
    np.testing.assert_array_equal(store.batch_index, np.repeat(np.arange(11), 5))
    np.testing.assert_array_equal(store.targets, torch.cat([y for _, y in batches]).numpy())
    chunks = list(store.iter_chunks("4"))  # read in place: read-only memory maps of the chunk files, no copy
    assert len(chunks) == 11 and all(isinstance(c, np.memmap) and not c.flags.owndata and not c.flags.writeable
                                     for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks), ref["4"])
    # the same memory maps as one lazy dask array: nothing read to build it, each block the mapped file itself
    lazy = store.to_dask("4")
    assert lazy.shape == ref["4"].shape and lazy.numblocks[0] == 11 and lazy.dtype == ref["4"].dtype
    np.testing.assert_array_equal(lazy.compute(scheduler="sync"), ref["4"])
    np.testing.assert_array_equal(lazy[17:31].compute(scheduler="sync"), ref["4"][17:31])
    blocks = [d.compute(scheduler="sync") for d in lazy.to_delayed().ravel()]
    assert all(isinstance(b, np.memmap) and not b.flags.owndata and not b.flags.writeable for b in blocks)


@pytest.mark.slow
def test_four_gloo_ranks_sigkilled_and_resumed(tmp_path):
    """The real thing at small scale: 4 processes in a gloo group; one SIGKILLs itself after its first chunk,
    the launcher SIGKILLs the rest (as torchrun does), all resume; benchmarks/distributed.py at 8 ranks is the
    same run at scale."""
    result = subprocess.run([sys.executable, str(BENCH), "--ranks", "4", "--batches", "10", "--batch-size", "5",
                             "--kill-after", "1", "--folder", str(tmp_path), "--quick"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    r = json.loads(result.stdout.strip().splitlines()[-1])
    assert r["first_returncodes"][2] == -9 and all(c != 0 for c in r["first_returncodes"])  # killed, all stopped
    assert r["partial_rows"] < 50 and any("rank 2 of 4" in p for p in r["partial_problems"])
    assert r["resume_returncodes"] == [0, 0, 0, 0], r["resume_stderr"]
    assert r["complete"] and r["rows"] == 50 and r["batch_order"] and r["targets"] and r["memory_mapped_chunks"]
    # Exactness, checked here too: each row against a capture of its batch by this process.
    spec = importlib.util.spec_from_file_location("bench_distributed", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    store = wb.ActivationStore.open(tmp_path / "store")
    ref = bench.reference(10, 5)
    for name in bench.NAMES:
        np.testing.assert_array_equal(store.array(name), ref[name])


def test_a_dask_view_reads_nothing_until_computed_and_refuses_a_flipped_byte(tmp_path):
    """to_dask() must not check (or read) a chunk when it is built, and must refuse a damaged one when read."""
    model, batches, path = cnn_model(), make_batches(4), tmp_path / "acts"
    wb.harvest(model, batches, names=["4"], path=path, progress=False, chunk_bytes=1)
    victim = sorted(path.glob("chunk-*"))[2] / "4.npy"
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0xFF  # a byte of the data, past the .npy header
    victim.write_bytes(bytes(raw))
    lazy = wb.ActivationStore.open(path).to_dask("4")  # built: nothing read, so nothing noticed yet
    ref = reference(model, batches, ["4"])["4"]
    np.testing.assert_array_equal(lazy[:10].compute(scheduler="sync"), ref[:10])  # chunks 0 and 1 are whole
    with pytest.raises(wb.StoreCorruptError, match="checksum|cannot be trusted"):
        lazy[10:15].compute(scheduler="sync")
    with pytest.raises(wb.UnknownNameError):
        wb.ActivationStore.open(path).to_dask("no such name")
