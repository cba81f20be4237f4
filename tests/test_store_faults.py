"""Activation stores under real faults: SIGKILL mid-write, two writers, flipped bytes, truncated files,
missing shards, resumes with other inputs. Every store is checked row for row against activations
computed by hand (tests/test_store.py's ``reference``), never against the store's own opinion.
"""
import hashlib
import json
import zlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import workbench as wb
from workbench._errors import (ResumeMismatchError, StoreCorruptError, StoreFormatError, StoreLockedError)
from workbench.hooks import _disk

from test_store import cnn_model, harvest_as_rank, make_batches, reference

HERE = Path(__file__).parent
CHILD = HERE / "store_child.py"
NAMES = ["1", "4"]  # as in store_child.py


def opened(path):
    """Open a store that may be incomplete, without the warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return wb.ActivationStore.open(path)


def assert_exact(store, batches, model=None, names=NAMES, rows=None):
    """The store's rows equal activations computed by hand, batch for batch (the first ``rows`` only)."""
    ref = reference(model or cnn_model(), batches, names)
    n = len(store) if rows is None else rows
    for name in names:
        np.testing.assert_array_equal(store.array(name)[:n], ref[name][:n])
    np.testing.assert_array_equal(store.targets[:n], torch.cat([y for _, y in batches]).numpy()[:n])
    np.testing.assert_array_equal(store.batch_index[:n], np.repeat(np.arange(len(batches)), 5)[:n])


def run_child(path, mode, *extra, wait=True):
    cmd = [sys.executable, str(CHILD), str(path), mode, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def reported_rows(stdout: str) -> int:
    rows = [int(line.split()[1]) for line in stdout.splitlines() if line.startswith("written")]
    return max(rows, default=0)


# ------------------------------------------------------------------ SIGKILL mid-write, then resume
@pytest.mark.slow
@pytest.mark.parametrize("point", ["file:5", "fsync:9", "fsync:10", "manifest:3"])
def test_sigkill_mid_write_loses_nothing_reported_and_resumes_exactly(tmp_path, point):
    """file:5 dies inside chunk 1's second file; fsync:9 after chunk 2 is renamed into place but
    before the manifest lists it; fsync:10 right after that manifest; manifest:3 halfway through it."""
    path = tmp_path / "acts"
    result = run_child(path, point)
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr
    reported = reported_rows(result.stdout)
    partial = opened(path)
    assert not partial.complete and len(partial) >= reported  # nothing reported written is lost
    partial.verify()  # every listed chunk is whole
    batches = make_batches(8)
    assert_exact(partial, batches)
    store = wb.harvest(cnn_model(), batches, names=NAMES, path=path, progress=False, resume=True, chunk_bytes=1)
    assert store.complete and len(store) == 40
    assert_exact(store.verify(), batches)
    assert not list(path.glob("*.tmp*")) and len(list(path.glob("chunk-*"))) == 8


@pytest.mark.slow
def test_sigkill_from_outside_at_an_unknown_moment(tmp_path):
    path = tmp_path / "acts"
    proc = run_child(path, "slow", wait=False)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait for the second chunk, then kill whatever it is doing
            m = path / "manifest.json"
            if m.exists() and len(json.loads(m.read_text())["chunks"]) >= 2:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    partial = opened(path)
    assert len(partial) >= max(reported_rows(stdout), 10)
    batches = make_batches(8)
    assert_exact(partial.verify(), batches)
    store = wb.harvest(cnn_model(), batches, names=NAMES, path=path, progress=False, resume=True, chunk_bytes=1)
    assert store.complete and len(store) == 40
    assert_exact(store, batches)


# ------------------------------------------------------------------ two writers
@pytest.mark.slow
def test_two_processes_racing_one_fails_at_once_one_waits_nothing_lost(tmp_path):
    path, gate = tmp_path / "acts", tmp_path / "go"
    first = run_child(path, f"gate:{gate}", wait=False)
    waiter = None
    try:
        deadline = time.monotonic() + 120
        while not (path / "manifest.json").exists() or not json.loads((path / "manifest.json").read_text())["chunks"]:
            assert time.monotonic() < deadline and first.poll() is None, first.stderr.read() if first.poll() else ""
            time.sleep(0.02)
        # `first` holds the lock and waits at the gate. A second writer fails at once; a third, asked to
        # wait, waits until `first` is done, then finds the store complete.
        second = run_child(path, "plain", "--resume", wait=False)
        waiter = run_child(path, "plain", "--resume", "--lock-timeout", "none", wait=False)
        out_second, err_second = second.communicate(timeout=120)
        assert second.returncode == 3 and "is being written by another harvest" in out_second, err_second
        assert waiter.stdout.readline().strip() == "blocked"
        gate.touch()
        out_first, err_first = first.communicate(timeout=120)
        out_waiter, err_waiter = waiter.communicate(timeout=120)
    finally:
        gate.touch()
        first.kill()
        if waiter is not None:
            waiter.kill()
    assert first.returncode == 0 and "done 40" in out_first, err_first
    assert waiter.returncode == 0 and "done 40" in out_waiter and "written" not in out_waiter, err_waiter
    store = wb.ActivationStore.open(path)
    assert store.complete and len(store) == 40
    assert_exact(store.verify(), make_batches(8))


def test_a_second_harvest_into_a_store_being_written_fails_at_once(tmp_path, cnn):
    path, seen = tmp_path / "acts", []

    def batches():
        for i, b in enumerate(make_batches(4)):
            if i == 2:
                for timeout in (0, 0.05):
                    with pytest.raises(StoreLockedError, match="being written by another harvest") as err:
                        wb.harvest(cnn, make_batches(4), names=NAMES, path=path, progress=False, resume=True,
                                   lock_timeout=timeout)
                    seen.append(err.value)
            yield b

    store = wb.harvest(cnn, batches(), names=NAMES, path=path, progress=False, chunk_bytes=1)
    assert len(seen) == 2 and isinstance(seen[0], TimeoutError) and "waited 0.05 s" in str(seen[1])
    assert store.complete and len(store) == 20
    assert_exact(store, make_batches(4))


# ------------------------------------------------------------------ property: random interrupt points
class Crash(Exception):
    pass


@pytest.mark.slow
@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 7), chunk=st.sampled_from([1, 300, 700, 10**6]),
       faults=st.lists(st.tuples(st.sampled_from(["iterable", "file", "rename", "manifest"]), st.integers(1, 12)),
                       min_size=1, max_size=3))
def test_resumed_store_equals_one_go_row_for_row(n, chunk, faults):
    model, batches = cnn_model(), make_batches(n, seed=n)
    one_go = wb.harvest(model, batches, names=NAMES, progress=False)  # in memory, no faults
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "acts"
        for i, (kind, at) in enumerate(faults + [("none", 0)]):
            with crash_at(kind, at):
                try:
                    wb.harvest(model, interrupt(batches, at if kind == "iterable" else None), names=NAMES,
                               path=path, progress=False, resume=i > 0, chunk_bytes=chunk)
                except Crash:
                    pass
        store = opened(path).verify()
        assert store.complete and len(store) == 5 * n
        for name in NAMES:
            np.testing.assert_array_equal(store.array(name), one_go.array(name))
        np.testing.assert_array_equal(store.targets, one_go.targets)
        np.testing.assert_array_equal(store.batch_index, one_go.batch_index)
        assert not list(path.glob("*.tmp*"))


def interrupt(batches, at):
    for i, b in enumerate(batches):
        if i == at:
            raise Crash(f"interrupted at batch {i}")
        yield b


def crash_at(kind, at):
    """Raise Crash at the at-th npy file write, chunk rename or manifest write (in-process faults)."""
    count = [0]

    def counted(real):
        def wrapper(*args, **kwargs):
            count[0] += 1
            if count[0] == at:
                raise Crash(kind)
            return real(*args, **kwargs)
        return wrapper
    if kind == "file":
        return mock.patch.object(_disk, "save_npy", counted(_disk.save_npy))
    if kind == "rename":  # the chunk folder is in place, the manifest does not list it yet
        return mock.patch.object(_disk, "fsync_dir", counted(_disk.fsync_dir))
    if kind == "manifest":
        return mock.patch.object(_disk, "write_json_atomic", counted(_disk.write_json_atomic))
    return mock.patch.object(_disk, "FORMAT", _disk.FORMAT)  # a no-op context


# ------------------------------------------------------------------ integrity
@pytest.fixture
def cnn():
    return cnn_model()


@pytest.fixture
def written(tmp_path, cnn):
    path = tmp_path / "acts"
    wb.harvest(cnn, make_batches(4), names=NAMES, path=path, progress=False, chunk_bytes=1)
    return path


def chunk_file(path, chunk=1, name="4"):
    return path / f"chunk-{chunk:06d}" / f"{name}.npy"


def test_checksums_are_computed_while_writing_and_match_the_bytes(tmp_path, cnn):
    path = tmp_path / "acts"
    with mock.patch.object(_disk, "file_problem", side_effect=AssertionError("a file was read back")):
        wb.harvest(cnn, make_batches(3), names=NAMES, path=path, progress=False, chunk_bytes=1)
    m = json.loads((path / "manifest.json").read_text())
    for c in m["chunks"]:
        for name, meta in c["files"].items():
            data = (path / c["dir"] / f"{name}.npy").read_bytes()
            assert m["checksum"] == "crc32"  # BLAKE2b before issue 21 (still verified: see below)
            assert meta == {"bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}


@pytest.mark.parametrize("where", ["data", "header"])
def test_flipped_bytes_are_refused_on_first_read_and_by_verify(written, where):
    f = chunk_file(written)
    raw = bytearray(f.read_bytes())
    raw[-3 if where == "data" else 20] ^= 0x10
    f.write_bytes(bytes(raw))
    store = wb.ActivationStore.open(written)
    np.testing.assert_array_equal(store.array("1"), reference(cnn_model(), make_batches(4), ["1"])["1"])
    with pytest.raises(StoreCorruptError, match=r"chunk-000001/4\.npy: its bytes changed after they were written"):
        store.array("4")
    with pytest.raises(OSError, match=r"1 damaged file\(s\)(.|\n)*chunk-000001/4\.npy(.|\n)*batches 1-1"):
        store.verify()


def test_a_truncated_or_missing_file_is_refused(written):
    f = chunk_file(written, 2)
    f.write_bytes(f.read_bytes()[:-8])
    (written / "chunk-000003" / "__targets__.npy").unlink()
    store = wb.ActivationStore.open(written)
    with pytest.raises(StoreCorruptError, match=r"\d+ bytes on disk, \d+ written \(truncated or replaced\)"):
        store.array("4")
    with pytest.raises(StoreCorruptError, match=r"__targets__\.npy: missing"):
        store.targets
    with pytest.raises(StoreCorruptError, match=r"2 damaged file\(s\)"):
        store.verify()


def test_a_chunk_with_fewer_rows_than_the_manifest_is_refused_even_with_a_valid_checksum(written):
    f = chunk_file(written, 1)
    short = np.load(f)[:3]
    np.save(f, short)
    m = json.loads((written / "manifest.json").read_text())
    data = f.read_bytes()  # make the checksum agree: only the row check can catch it now
    m["chunks"][1]["files"]["4"] = {"bytes": len(data), "blake2b-128": hashlib.blake2b(data, digest_size=16).hexdigest()}
    (written / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreCorruptError, match=r"holds <f4\[3, 4\], but the manifest says <f4\[5, 4\]"):
        wb.ActivationStore.open(written).array("4")


def test_labels_shorter_than_inputs_are_refused_at_write_time(tmp_path, cnn):
    batches = make_batches(3)
    batches[1] = (batches[1][0], batches[1][1][:4])
    for path in (None, tmp_path / "acts"):
        with pytest.raises(ValueError, match=r"batch 1: the labels y have 4 rows but '1' has 5(.|\n)*misaligned labels "
                                             r"are never stored"):
            wb.harvest(cnn, batches, names=NAMES, path=path, progress=False, chunk_bytes=1)
    partial = opened(tmp_path / "acts")
    assert len(partial) == 5 and not partial.complete  # batch 0 only: nothing misaligned was kept


def test_an_empty_iterable_is_a_clear_error_and_writes_nothing(tmp_path, cnn):
    for path in (None, tmp_path / "acts"):
        with pytest.raises(wb.InvalidOptionError, match="yielded no batch"):
            wb.harvest(cnn, [], names=NAMES, path=path, progress=False)
    assert not (tmp_path / "acts").exists()


def test_a_newer_or_unknown_format_says_so(written):
    m = json.loads((written / "manifest.json").read_text())
    (written / "manifest.json").write_text(json.dumps({**m, "version": 3}))
    with pytest.raises(StoreFormatError, match="format version 3, newer than this workbench reads.*upgrade"):
        wb.ActivationStore.open(written)
    (written / "manifest.json").write_text(json.dumps({**m, "version": "beta"}))
    with pytest.raises(ValueError, match="version 'beta', which this workbench does not know"):
        wb.ActivationStore.open(written)
    (written / "manifest.json").write_text(json.dumps({**m, "format": "zarr"}))
    with pytest.raises(StoreFormatError, match="is not a workbench activation store"):
        wb.ActivationStore.open(written)


def test_a_format_1_store_still_opens_but_is_not_resumed(tmp_path, cnn):
    path, batches = tmp_path / "old", make_batches(2)
    wb.harvest(cnn, batches, names=NAMES, path=path, progress=False, chunk_bytes=1)
    m = json.loads((path / "manifest.json").read_text())
    for c in m["chunks"]:
        del c["files"], c["rows"]
    m = {k: v for k, v in m.items() if k not in ("fingerprint", "kind", "rank", "world_size", "checksum")}
    (path / "manifest.json").write_text(json.dumps({**m, "version": 1}))
    assert_exact(wb.ActivationStore.open(path).verify(), batches)
    with pytest.raises(ResumeMismatchError, match="older workbench"):
        wb.harvest(cnn, batches, names=NAMES, path=path, progress=False, resume=True)


# ------------------------------------------------------------------ resume checks what it resumes
def interrupted_store(path, model, n=6, at=3):
    with pytest.raises(RuntimeError):
        wb.harvest(model, crash_iter(make_batches(n), at), names=NAMES, path=path, progress=False, chunk_bytes=1)
    return (path / "manifest.json").read_bytes(), sorted(p.name for p in path.iterdir())


def crash_iter(batches, at):
    for i, b in enumerate(batches):
        if i == at:
            raise RuntimeError("interrupted")
        yield b


def other_weights():
    m = cnn_model()
    with torch.no_grad():
        m[4].weight.add_(0.01)
    return m


def other_architecture():
    m = cnn_model()  # the same weights and names; GELU where there was a ReLU
    m[2] = nn.GELU()
    return m


def wider():
    torch.manual_seed(0)
    from conftest import randomise_bn
    return randomise_bn(nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                                      nn.Flatten(), nn.Linear(6 * 36, 5))).eval()


@pytest.mark.parametrize("change, fields", [
    (lambda: dict(model=other_weights()), ["model.parameters"]),
    (lambda: dict(model=other_architecture()), ["model.architecture", "model.mode"]),  # a new GELU is in train mode
    (lambda: dict(model=wider()), ["model.architecture", "model.parameters"]),  # a width change at '4'
    (lambda: dict(model=cnn_model().train()), ["model.mode"]),
    (lambda: dict(batches=make_batches(6, seed=1)), ["data.first_batch"]),
    (lambda: dict(batches=make_batches(6, size=4)), ["data.batch_size", "data.first_batch"]),
    (lambda: dict(reduce="spatial_mean"), ["settings.reduce"]),
    (lambda: dict(dtype=torch.float64), ["settings.dtype"]),
])
def test_resume_with_other_inputs_is_refused_naming_each_field(tmp_path, change, fields):
    path = tmp_path / "acts"
    before = interrupted_store(path, cnn_model())
    kw = dict(model=cnn_model(), batches=make_batches(6), names=NAMES, path=path, progress=False, resume=True)
    kw.update(change())
    with pytest.raises(ResumeMismatchError, match=r"harvested from other inputs") as err:
        wb.harvest(kw.pop("model"), kw.pop("batches"), **kw)
    listed = [line.split(":")[0].strip(" -") for line in str(err.value).splitlines() if line.startswith("  - ")]
    assert listed == fields
    assert "resume=False" in str(err.value) and "another path" in str(err.value)
    after = ((path / "manifest.json").read_bytes(), sorted(p.name for p in path.iterdir()))
    assert after == before  # nothing written, nothing deleted
    assert_exact(opened(path), make_batches(6))


def test_resume_with_a_shorter_iterable_is_refused_and_never_duplicates(tmp_path, cnn):
    path, batches = tmp_path / "acts", make_batches(6)
    wb.harvest(cnn, batches, names=NAMES, path=path, progress=False, chunk_bytes=1)
    with pytest.raises(ResumeMismatchError, match="ended after 4 batches while the store already holds batches up to 5"):
        wb.harvest(cnn, batches[:4], names=NAMES, path=path, progress=False, resume=True, chunk_bytes=1)
    store = wb.ActivationStore.open(path)  # still complete, still 6 batches
    assert store.complete and len(store) == 30
    again = wb.harvest(cnn, batches, names=NAMES, path=path, progress=False, resume=True, chunk_bytes=1)
    assert len(again) == 30
    assert_exact(again, batches)


def test_resume_with_reordered_batches_is_refused(tmp_path, cnn):
    path, batches = tmp_path / "acts", make_batches(6)
    interrupted_store(path, cnn, at=4)
    shuffled = [batches[0], batches[2], batches[1], *batches[3:]]  # same first batch
    with pytest.raises(ResumeMismatchError, match="batch 1 of the iterable differs"):
        wb.harvest(cnn, shuffled, names=NAMES, path=path, progress=False, resume=True, chunk_bytes=1)
    store = wb.harvest(cnn, batches, names=NAMES, path=path, progress=False, resume=True, chunk_bytes=1)
    assert_exact(store, batches)


def test_a_row_shape_change_inside_one_harvest_is_refused_and_keeps_what_was_written(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3))
    batches = [torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.randn(2, 7, 4)]  # variable length
    with pytest.raises(wb.InvalidOptionError, match=r"'0' gave rows of shape \[7, 3\].*holds rows of shape \[5, 3\]"):
        wb.harvest(model, batches, names="0", progress=False)
    path = tmp_path / "acts"
    with pytest.raises(wb.InvalidOptionError, match="variable-length sequences"):
        wb.harvest(model, batches, names="0", path=path, progress=False, chunk_bytes=1)
    partial = opened(path)
    assert len(partial) == 4 and not partial.complete
    with torch.no_grad():
        np.testing.assert_array_equal(partial.array("0"), model(torch.cat(batches[:2])).numpy())


def test_rows_captured_by_reference_are_not_rewritten_by_later_batches(tmp_path):
    """A module returning a buffer it overwrites each forward: every batch keeps its own rows."""
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("out", torch.zeros(3, 2))
            self.inner = nn.Identity()

        def forward(self, x):
            self.out.copy_(x)
            return self.inner(self.out)

    batches = [torch.full((3, 2), float(i)) for i in range(4)]
    for path in (None, tmp_path / "acts"):
        store = wb.harvest(Reuse(), batches, names="inner", path=path, progress=False)
        np.testing.assert_array_equal(store.array("inner"), torch.cat(batches).numpy())


# ------------------------------------------------------------------ distributed shards
def test_a_missing_rank_makes_a_two_rank_store_incomplete_and_says_which(tmp_path, cnn):
    harvest_as_rank(cnn, 0, 2, tmp_path / "acts", names=NAMES)
    with pytest.warns(UserWarning, match=r"rank 1 of 2 is missing"):
        store = wb.ActivationStore.open(tmp_path / "acts")
    assert not store.complete and store.problems == ["rank 1 of 2 is missing (no rank-00001-of-00002/manifest.json)"]
    harvest_as_rank(cnn, 1, 2, tmp_path / "acts", names=NAMES)
    store = wb.ActivationStore.open(tmp_path / "acts")
    assert store.complete and len(store) == 30
    assert_exact(store, make_batches(6))


def test_an_incomplete_rank_makes_the_store_incomplete(tmp_path, cnn):
    harvest_as_rank(cnn, 0, 2, tmp_path / "acts", names=NAMES)
    with pytest.raises(RuntimeError):
        harvest_as_rank(cnn, 1, 2, tmp_path / "acts", batches=crash_iter(make_batches(6), 4), chunk_bytes=1,
                        names=NAMES)
    with pytest.warns(UserWarning, match=r"rank 1 of 2 stopped before batch 4; resume it"):
        store = wb.ActivationStore.open(tmp_path / "acts")
    assert not store.complete and len(store) == 25  # batches 0, 2, 4 of rank 0; 1, 3 of rank 1
    harvest_as_rank(cnn, 1, 2, tmp_path / "acts", resume=True, chunk_bytes=1, names=NAMES)
    assert_exact(wb.ActivationStore.open(tmp_path / "acts"), make_batches(6))


def test_a_rank_with_another_model_is_refused_and_a_swapped_shard_is_left_out(tmp_path, cnn):
    path = tmp_path / "acts"
    harvest_as_rank(cnn, 0, 2, path)
    with pytest.raises(ResumeMismatchError, match="model.parameters"):
        harvest_as_rank(other_weights(), 1, 2, path)
    assert not (path / "rank-00001-of-00002" / "manifest.json").exists()
    # A shard copied in from another harvest (other weights) is named and its rows are left out.
    harvest_as_rank(other_weights(), 1, 2, tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "rank-00001-of-00002").rename(path / "rank-00001-of-00002")
    with pytest.warns(UserWarning, match=r"rank 1 of 2 was harvested from other inputs \(model.parameters\); its rows are left out"):
        store = wb.ActivationStore.open(path)
    assert not store.complete and len(store) == 15 and set(store.batch_index) == {0, 2, 4}


# ------------------------------------------------------------------ the tour, progress, repr
def test_the_tour_never_reports_another_runs_harvest(tmp_path):
    from workbench.experiments.tour import _harvest as _tour_harvest

    def model(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1)).eval()

    batches, folder = make_batches(3), tmp_path / "harvest-seed0"
    first = _tour_harvest(model(0), batches, folder, progress=False)
    again = _tour_harvest(model(0), batches, folder, progress=False)  # same inputs: resumed, unchanged
    assert again.fingerprint == first.fingerprint and len(again) == 15
    other = _tour_harvest(model(1), batches, folder, progress=False)  # other weights, same folder
    assert other.fingerprint["model"] != first.fingerprint["model"] and other.complete
    for name in ("1", "5"):
        np.testing.assert_array_equal(other.array(name), reference(model(1), batches, [name], "spatial_mean")[name])


def test_the_progress_bar_has_a_total_when_the_iterable_has_a_length(cnn, monkeypatch):
    import tqdm.auto

    bars = []

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *a, **kw):
            super().__init__(*a, **{**kw, "disable": True})
            bars.append(kw)
    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    wb.harvest(cnn, make_batches(3), names=NAMES, progress=True)
    wb.harvest(cnn, iter(make_batches(3)), names=NAMES, progress=True)
    assert [b["total"] for b in bars] == [3, None]


def test_repr_shows_fingerprint_completeness_and_rows(tmp_path, cnn):
    path = tmp_path / "acts"
    interrupted_store(path, cnn)
    store = opened(path)
    fp = store.fingerprint["model"]["parameters"]
    assert len(fp) == 32 and f"model Sequential {fp[:8]}" in repr(store)
    assert "15 rows" in repr(store) and "incomplete: the harvest stopped before batch 3" in repr(store)
