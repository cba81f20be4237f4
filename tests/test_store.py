"""harvest and ActivationStore: streaming to disk, atomic chunks, resume, distributed shards."""
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import workbench as wb

from conftest import randomise_bn


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return randomise_bn(nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                                      nn.Flatten(), nn.Linear(6 * 36, 4))).eval()


def make_batches(n, size=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, 4, (size,), generator=g)) for _ in range(n)]


def reference(model, batches, names, reduce=None):
    out = {n: [] for n in names}
    for x, _ in batches:
        _, cache = wb.run_with_cache(model, x, names=names, reduce=reduce)
        for n in names:
            out[n].append(cache[n].numpy())
    return {n: np.concatenate(v) for n, v in out.items()}


def test_in_memory_store_equals_stacked_captures(cnn):
    batches = make_batches(4)
    store = wb.harvest(cnn, batches, names=["1", "4"], reduce="spatial_mean", progress=False)
    ref = reference(cnn, batches, ["1", "4"], reduce="spatial_mean")
    assert len(store) == 20 and store.path is None and store.complete
    for n in ["1", "4"]:
        np.testing.assert_array_equal(store.array(n), ref[n])
    np.testing.assert_array_equal(store.targets, torch.cat([y for _, y in batches]).numpy())
    assert (store.array("1") < 0).any()  # BatchNorm outputs, not overwritten by the in-place ReLU
    assert store["4"].shape == (20, 4)


def test_disk_store_is_plain_numpy_and_reopens(cnn, tmp_path):
    batches = make_batches(6)
    store = wb.harvest(cnn, batches, names=["1", "2"], path=tmp_path / "acts", progress=False, chunk_bytes=4000)
    ref = reference(cnn, batches, ["1", "2"])
    reopened = wb.ActivationStore.open(tmp_path / "acts")
    for s in (store, reopened):
        assert s.complete and len(s) == 30
        for n in ["1", "2"]:
            np.testing.assert_array_equal(s.array(n), ref[n])
    manifest = json.loads((tmp_path / "acts" / "manifest.json").read_text())
    assert len(manifest["chunks"]) > 1  # chunk_bytes forced several chunks
    # Each chunk is a plain .npy file that NumPy memory-maps without workbench.
    first = np.load(tmp_path / "acts" / manifest["chunks"][0]["dir"] / "1.npy", mmap_mode="r")
    assert isinstance(first, np.memmap)
    np.testing.assert_array_equal(first, ref["1"][: len(first)])
    pieces = list(reopened.iter_chunks("2"))
    assert len(pieces) == 6 and sum(len(p) for p in pieces) == 30
    np.testing.assert_array_equal(reopened.batch_index, np.repeat(np.arange(6), 5))


class Interrupt(Exception):
    pass


def interrupted(batches, at):
    for i, b in enumerate(batches):
        if i == at:
            raise Interrupt(f"stopped at batch {i}")
        yield b


def test_resume_after_interruption_has_no_duplicate_or_missing_rows(cnn, tmp_path):
    batches = make_batches(10)
    path = tmp_path / "acts"
    with pytest.raises(Interrupt):
        wb.harvest(cnn, interrupted(batches, 7), names="4", path=path, progress=False, chunk_bytes=150)
    with pytest.warns(UserWarning, match="is incomplete: the harvest stopped before batch"):
        partial = wb.ActivationStore.open(path)
    assert not partial.complete and 0 < len(partial) < 50
    assert len(partial) % 5 == 0  # whole batches only
    with pytest.raises(FileExistsError, match="resume=True"):
        wb.harvest(cnn, batches, names="4", path=path, progress=False)
    store = wb.harvest(cnn, batches, names="4", path=path, progress=False, resume=True, chunk_bytes=150)
    assert store.complete
    np.testing.assert_array_equal(store.array("4"), reference(cnn, batches, ["4"])["4"])
    np.testing.assert_array_equal(store.targets, torch.cat([y for _, y in batches]).numpy())


def test_half_written_chunk_is_invisible_and_cleaned_on_resume(cnn, tmp_path):
    batches = make_batches(4)
    path = tmp_path / "acts"
    with pytest.raises(Interrupt):
        wb.harvest(cnn, interrupted(batches, 2), names="4", path=path, progress=False, chunk_bytes=1)
    # Simulate a crash in the middle of writing the next chunk: files exist, manifest does not list them.
    for leftover in ("chunk-000002", "chunk-000003.tmp"):
        (path / leftover).mkdir()
        np.save(path / leftover / "4.npy", np.full((5, 4), np.nan, dtype=np.float32))
    with pytest.warns(UserWarning, match="incomplete"):
        reader = wb.ActivationStore.open(path)
    assert len(reader) == 10 and not np.isnan(reader.array("4")).any()
    store = wb.harvest(cnn, batches, names="4", path=path, progress=False, resume=True, chunk_bytes=1)
    assert not (path / "chunk-000003.tmp").exists()
    np.testing.assert_array_equal(store.array("4"), reference(cnn, batches, ["4"])["4"])


def test_a_reader_during_a_harvest_sees_only_complete_chunks(cnn, tmp_path):
    path = tmp_path / "acts"
    batches = make_batches(6)
    seen, expected = [], reference(cnn, batches, ["4"])["4"]

    def watching():
        for i, b in enumerate(batches):
            if i:
                # chunk_bytes=1: one chunk per batch; the chunk of batch i - 1 may still be in flight (written
                # by the background thread), never half visible.
                with pytest.warns(UserWarning, match=f"stopped before batch ({i - 1}|{i}) "):
                    s = wb.ActivationStore.open(path)
                seen.append(len(s))
                assert not s.complete and len(s) in (5 * (i - 1), 5 * i)
                if len(s):
                    assert np.isfinite(s.array("4")).all()
                    np.testing.assert_array_equal(s.array("4"), expected[:len(s)])
            yield b

    store = wb.harvest(cnn, watching(), names="4", path=path, progress=False, chunk_bytes=1)
    assert seen == sorted(seen) and seen[-1] >= 20 and store.complete and len(store) == 30


def test_resume_with_other_settings_is_refused(cnn, tmp_path):
    path = tmp_path / "acts"
    wb.harvest(cnn, make_batches(2), names="4", path=path, progress=False)
    with pytest.raises(ValueError, match=r"resume=True, but(.|\n)*settings\.names: \['4'\] in the store, \['1'\] now"):
        wb.harvest(cnn, make_batches(2), names="1", path=path, progress=False, resume=True)


def test_bad_batches_and_multi_call_names_are_explained(cnn):
    with pytest.raises(wb.InvalidOptionError, match="forward=lambda model, batch"):
        wb.harvest(cnn, [{"x": torch.zeros(1)}], names="4", progress=False)
    store = wb.harvest(cnn, [{"x": torch.randn(2, 3, 8, 8)}], names="4", progress=False,
                       forward=lambda m, b: m(b["x"]))
    assert len(store) == 2 and store.targets is None

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(self.lin(x))

    with pytest.raises(wb.InvalidOptionError, match="fired 2 times"):
        wb.harvest(Twice(), [torch.randn(3, 2)], names="lin", progress=False)


def test_store_repr_and_frame(cnn, tmp_path):
    store = wb.harvest(cnn, make_batches(2), names="4", path=tmp_path / "a", progress=False)
    fp = store.fingerprint["model"]["parameters"]
    assert repr(store).startswith("ActivationStore(1 names, 10 rows")
    assert repr(store).endswith(f"model Sequential {fp[:8]}, complete)")
    assert store.to_frame().to_dict("records") == [{"name": "4", "shape": (10, 4), "dtype": "<f4"}]
    assert "<table>" in store._repr_html_()
    with pytest.raises(KeyError, match="Nearest names"):
        store.array("44")


DIST_SCRIPT = textwrap.dedent('''
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[2])
    from test_store import make_batches, cnn_model
    import workbench as wb
    dist.init_process_group("gloo")
    store = wb.harvest(cnn_model(), make_batches(7), names=["1", "4"], reduce="spatial_mean",
                       path=sys.argv[1], progress=False)
    assert store.complete and len(store) == 35, (store.complete, len(store))
    dist.destroy_process_group()
''')


def cnn_model():
    torch.manual_seed(0)
    return randomise_bn(nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                                      nn.Flatten(), nn.Linear(6 * 36, 4))).eval()


def test_distributed_harvest_with_two_gloo_processes(tmp_path):
    """Launched by torchrun, as a user would: each rank writes its shard, the store opens as one."""
    script = tmp_path / "worker.py"
    script.write_text(DIST_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2",
           str(script), str(tmp_path / "acts"), str(Path(__file__).parent)]
    result = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    shards = sorted(p.name for p in (tmp_path / "acts").iterdir())
    assert shards == ["manifest.json", "rank-00000-of-00002", "rank-00001-of-00002"]
    assert json.loads((tmp_path / "acts" / "manifest.json").read_text())["world_size"] == 2
    store = wb.ActivationStore.open(tmp_path / "acts")
    batches = make_batches(7)
    ref = reference(cnn_model(), batches, ["1", "4"], reduce="spatial_mean")
    assert store.complete and len(store) == 35
    for n in ["1", "4"]:
        np.testing.assert_array_equal(store.array(n), ref[n])  # one store, original batch order
    np.testing.assert_array_equal(store.targets, torch.cat([y for _, y in batches]).numpy())


def harvest_as_rank(model, rank, world, path, batches=None, names="4", **kw):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the whole store is incomplete until the last rank
            return wb.harvest(model, batches or make_batches(6), names=names, path=path, progress=False, **kw)
    finally:
        del os.environ["RANK"], os.environ["WORLD_SIZE"]


def test_a_missing_shard_makes_the_store_incomplete(tmp_path, cnn):
    for rank in range(2):
        harvest_as_rank(cnn, rank, 3, tmp_path / "acts")
    with pytest.warns(UserWarning, match=r"rank 2 of 3 is missing"):
        store = wb.ActivationStore.open(tmp_path / "acts")
    assert not store.complete and len(store) == 20  # batches 0,1,3,4 of 6; rank 2 never ran
    np.testing.assert_array_equal(np.unique(store.batch_index), [0, 1, 3, 4])
    assert "rank 2 of 3 is missing" in repr(store)
