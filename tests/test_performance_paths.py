"""The fast paths of issue 21 give the same answers as the slow ones, and fail as loudly.

Nothing here is timed (benchmarks/performance.py measures; this machine is shared). Each fast path is
checked against a reference computed another way: np.save's own bytes, hashlib, a capture per batch.
"""
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

import workbench as wb
from workbench import _memory
from workbench._errors import ActivationOverwrittenError, StoreCorruptError
from workbench._threads import WriteBehind
from workbench.hooks import _disk

from test_store import cnn_model, make_batches, reference

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ .npy files written in parts
@pytest.mark.parametrize("shapes", [[(3, 4)], [(2, 3, 2), (0, 3, 2), (1, 3, 2)], [(5,), (7,)]])
def test_parts_are_written_byte_for_byte_as_np_save_writes_their_concatenation(tmp_path, shapes):
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    parts[0] = np.asfortranarray(parts[0]) if parts[0].ndim == 2 else parts[0]  # non-C-contiguous input too
    meta = _disk.save_npy(tmp_path / "a.npy", parts)
    np.save(tmp_path / "b.npy", np.ascontiguousarray(np.concatenate(parts)))  # written in C order
    data = (tmp_path / "a.npy").read_bytes()
    assert data == (tmp_path / "b.npy").read_bytes()
    assert meta == {"bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    assert _disk.file_problem(tmp_path / "a.npy", meta) is None


def test_parts_of_different_rows_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"cannot form one array"):
        _disk.save_npy(tmp_path / "a.npy", [np.zeros((2, 3)), np.zeros((2, 4))])


def test_blake2b_checksums_of_earlier_stores_are_still_verified(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.arange(10.0))
    data = path.read_bytes()
    meta = {"bytes": len(data), "blake2b-128": hashlib.blake2b(data, digest_size=16).hexdigest()}
    assert _disk.file_problem(path, meta) is None
    raw = bytearray(data)
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    assert "checksum mismatch" in _disk.file_problem(path, meta)
    assert "names no checksum" in _disk.file_problem(path, {"bytes": len(data), "md4": "00"})


# ------------------------------------------------------------------ writing behind the model
def test_write_behind_runs_in_order_one_at_a_time_and_raises_on_the_callers_thread():
    order, running = [], []
    behind = WriteBehind()

    def job(i):
        def run():
            running.append(i)
            assert len(running) == 1  # never two at once
            time.sleep(0.01)
            order.append((i, threading.current_thread().name))
            running.pop()
        return run
    for i in range(4):
        behind.submit(job(i))
    behind.wait()
    assert [i for i, _ in order] == [0, 1, 2, 3] and all(n.startswith("workbench-writer") for _, n in order)
    behind.submit(lambda: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        behind.submit(lambda: None)  # the previous call's error surfaces at the next submit
    behind.close()


def test_a_chunk_write_that_fails_stops_the_harvest_and_leaves_the_store_resumable(tmp_path):
    model, batches, path = cnn_model(), make_batches(6), tmp_path / "acts"
    real, calls = _disk.save_npy, [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:  # chunk 1's second file (each chunk: "1", "4" and the labels)
            raise OSError("No space left on device")
        return real(*args, **kwargs)
    with mock.patch.object(_disk, "save_npy", failing), pytest.raises(OSError, match="No space left"):
        wb.harvest(model, batches, names=["1", "4"], path=path, progress=False, chunk_bytes=1)
    with pytest.warns(UserWarning, match="incomplete"):
        partial = wb.ActivationStore.open(path)
    assert len(partial) == 5 and [p.name for p in path.glob("*.tmp")] == ["chunk-000001.tmp"]  # invisible
    store = wb.harvest(model, batches, names=["1", "4"], path=path, progress=False, chunk_bytes=1, resume=True)
    ref = reference(model, batches, ["1", "4"])
    assert store.complete and not list(path.glob("*.tmp"))
    for name in ("1", "4"):
        np.testing.assert_array_equal(store.array(name), ref[name])


def test_durable_false_writes_the_same_store_without_fsync(tmp_path):
    model, batches = cnn_model(), make_batches(4)
    with mock.patch.object(os, "fsync", side_effect=AssertionError("fsync called")):
        fast = wb.harvest(model, batches, names=["1", "4"], path=tmp_path / "fast", progress=False, chunk_bytes=300,
                          durable=False)
    slow = wb.harvest(model, batches, names=["1", "4"], path=tmp_path / "slow", progress=False, chunk_bytes=300)
    assert fast.complete and slow.complete
    for name in ("1", "4"):
        np.testing.assert_array_equal(fast.array(name), slow.array(name))
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("fast", "slow"))
    assert a["chunks"] == b["chunks"] and a["checksum"] == "crc32"
    wb.ActivationStore.open(tmp_path / "fast").verify()


def test_private_values_are_stored_without_a_second_copy_and_shared_ones_are_copied(tmp_path):
    """BatchNorm's output is cloned by the write guard before the in-place ReLU: that clone is the array the
    store keeps (no copy of a copy); the Linear's output is the model's own memory: it is copied."""
    from workbench.hooks import _harvest

    model, batches = cnn_model(), make_batches(2)
    seen = []
    real = _harvest._to_numpy

    def spy(t, copy=True):
        a = real(t, copy)
        seen.append((copy, np.shares_memory(a, t.detach().numpy()) if t.dtype != torch.bfloat16 else None))
        return a
    with mock.patch.object(_harvest, "_to_numpy", spy):
        store = wb.harvest(model, batches, names=["1", "4"], progress=False)
    ref = reference(model, batches, ["1", "4"])
    for name in ("1", "4"):
        np.testing.assert_array_equal(store.array(name), ref[name])
    assert (False, True) in seen and (True, False) in seen  # "1" shared without copying, "4" copied


def test_an_overwrite_the_guard_cannot_see_is_refused_in_a_harvest(tmp_path):
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            h = self.a(x)
            with torch._C.DisableTorchFunction():  # hidden from the write guard: only the version counter sees it
                h.mul_(2)
            return self.b(h)

    with pytest.raises(ActivationOverwrittenError):
        wb.harvest(Sneaky(), [torch.randn(4, 3)], names="a", path=tmp_path / "s", progress=False)


# ------------------------------------------------------------------ the capture's quiet bookkeeping
def test_the_write_guard_still_sees_every_kind_of_write_after_the_bookkeeping_went_quiet():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 6), nn.Hardtanh(inplace=True))
    x = torch.randn(3, 4)
    with torch.no_grad():
        h0 = model[0](x)
        h2 = model[2](torch.relu(h0))
    _, cache = wb.run_with_cache(model, x, names=["0", "2"])
    assert torch.equal(cache["0"], h0) and torch.equal(cache["2"], h2)  # both were overwritten in place after


def test_freed_memory_is_kept_once_per_process_and_can_be_opted_out():
    code = ("import os, workbench._memory as m; print(m.keep_freed_memory(), m.keep_freed_memory(), "
            "m.release_memory() in (True, False))")
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, WORKBENCH_KEEP_FREED_MEMORY="0"))
    glibc = _memory._libc() is not None
    assert on.stdout.split() == [str(glibc), str(glibc), "True"], on.stderr
    assert off.stdout.split() == ["False", "False", "True"], off.stderr


# ------------------------------------------------------------------ verify reads its numbers back once
def test_verify_site_checks_equal_a_direct_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double().eval()
    x = torch.randn(6, 5, dtype=torch.float64)
    new, t = wb.random_intertwiner(model, seed=2)
    report = wb.verify(model, new, x, transform=t)
    with torch.no_grad():
        h, h_new = model[:2](x), new[:2](x)
    want = t.elements["1"].phi().act(h, 1)
    scale = max(float(h.norm()), float(want.norm()))
    check = {c.site: c for c in report.sites}["1"]
    # observed at "0" (pre) and "1" (post); the post level is this one
    assert check.equivariance_error >= float((h_new - want).norm()) / scale
    assert check.representation_change >= float((h_new - h).norm()) / scale
    assert report.passed and check.observations == 2


# ------------------------------------------------------------------ the GPU script, on a CPU
@pytest.mark.slow
def test_the_gpu_check_runs_on_a_cpu_in_small_mode(tmp_path):
    out = tmp_path / "gpu.md"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--small",
                             "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    text = out.read_text()
    assert "Sections that failed" not in text, text
    for section in ("wb.capture every name", "wb.harvest durable=True", "wb.verify", "wb.random_intertwiner"):
        assert section in text
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert all(r["min_s"] > 0 and np.isfinite(r["ratio"]) for r in rows)
