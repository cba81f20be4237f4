"""A store's rows are the very batches it says they are: a shard in another rank's folder, ranks that iterated
different lengths, a manifest that lost or repeated a chunk, and resumes whose model or settings differ in ways
the first fingerprint missed (a sub-module's train mode, a reduce= closing over other values). Every store is
checked row for row against activations computed by hand, as in tests/test_store_faults.py.
"""
import functools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import workbench as wb
from workbench._errors import ResumeMismatchError, StoreCorruptError, StoreFormatError

from test_store import cnn_model, harvest_as_rank, make_batches
from test_store_faults import NAMES, assert_exact, cnn, opened, written  # noqa: F401 (fixtures)


def test_a_shard_copied_into_another_ranks_folder_is_left_out_never_merged_twice(tmp_path, cnn):
    """Rank 0's folder copied to rank 1's has the parent's fingerprint; its batches 0, 2, 4 must not
    stand in for rank 1's 1, 3, 5 (the store was 'complete' with every even batch twice)."""
    path = tmp_path / "acts"
    harvest_as_rank(cnn, 0, 2, path, names=NAMES)
    shutil.copytree(path / "rank-00000-of-00002", path / "rank-00001-of-00002")
    with pytest.warns(UserWarning, match=r"rank 1 of 2: rank-00001-of-00002/manifest.json belongs to rank 0 of 2"):
        store = wb.ActivationStore.open(path)
    assert not store.complete and list(np.unique(store.batch_index, return_counts=True)[1]) == [5, 5, 5]
    assert sorted(set(store.batch_index)) == [0, 2, 4]
    manifest = json.loads((path / "rank-00001-of-00002" / "manifest.json").read_text())
    manifest["rank"] = 1  # relabelled too: its batches still belong to rank 0
    (path / "rank-00001-of-00002" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=r"lists batches \[0, 2, 4\] but a harvest stopping before batch 6 "
                                         r"writes batches \[1, 3, 5\]; its rows are left out"):
        store = wb.ActivationStore.open(path)
    assert sorted(set(store.batch_index)) == [0, 2, 4] and not store.complete


def test_complete_ranks_that_iterated_different_lengths_make_the_store_incomplete(tmp_path, cnn):
    """Same first batch (so the same fingerprint), but rank 1 was given 4 batches and rank 0 six:
    batch 5 was never harvested by anyone."""
    path = tmp_path / "acts"
    harvest_as_rank(cnn, 0, 2, path, names=NAMES)
    harvest_as_rank(cnn, 1, 2, path, batches=make_batches(4), names=NAMES)
    with pytest.warns(UserWarning, match=r"complete ranks ended at different batches \(rank 1 after 4; rank 0 "
                                         r"after 6\)"):
        store = wb.ActivationStore.open(path)
    assert not store.complete and sorted(set(store.batch_index)) == [0, 1, 2, 3, 4]
    assert_exact(store, make_batches(6), rows=25)


def test_ranks_whose_rows_differ_in_shape_are_named_not_blamed_on_damage(tmp_path):
    """Variable-length batches split over two ranks: each rank is consistent on its own, so only opening the
    whole store sees that rank 1's rows (length 7) cannot join rank 0's (length 5). It was 'complete', and
    reading blamed a damaged file."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    batches = [torch.randn(2, 5 if i % 2 == 0 else 7, 4) for i in range(4)]
    for rank in range(2):
        harvest_as_rank(model, rank, 2, tmp_path / "acts", batches=batches, names="0")
    with pytest.warns(UserWarning, match=r"rank 1 of 2 stored rows of another shape or dtype \('0': <f4\[7, 3\] "
                                         r"here, <f4\[5, 3\] in the ranks before\).*pad them"):
        store = wb.ActivationStore.open(tmp_path / "acts")
    assert not store.complete and list(store.batch_index) == [0, 0, 2, 2]
    with torch.no_grad():
        np.testing.assert_array_equal(store.array("0"), torch.cat([model(batches[0]), model(batches[2])]).numpy())


@pytest.mark.parametrize("edit", ["drop", "repeat", "swap_batches"])
def test_a_manifest_that_lost_repeated_or_reordered_a_chunk_is_refused_naming_it(written, edit):
    manifest = json.loads((written / "manifest.json").read_text())
    chunks = manifest["chunks"]
    if edit == "drop":
        del chunks[2]
    elif edit == "repeat":
        chunks[2] = chunks[1]
    else:  # chunk 1 now claims batch 2's index and chunk 2 batch 1's: the rows would be read out of order
        chunks[1]["batches"][0][0], chunks[2]["batches"][0][0] = 2, 1
    (written / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreCorruptError, match=rf"{written / 'manifest.json'} lists batches .* but a harvest "
                                                r"stopping before batch 4 writes batches \[0, 1, 2, 3\]"):
        wb.ActivationStore.open(written)


# ------------------------------------------------------------------ resume: what the first fingerprint missed
def interrupted(path, model, at=3, **kw):
    def batches():
        for i, b in enumerate(make_batches(6)):
            if i == at:
                raise RuntimeError("interrupted")
            yield b
    with pytest.raises(RuntimeError, match="interrupted"):
        wb.harvest(model, batches(), names=["4"], path=path, progress=False, chunk_bytes=1, **kw)


def column(k):
    return lambda out: out[:, k]


def activation(cls):
    return lambda out: cls()(out)


COLUMN = 0


def global_column(out):
    return out[:, COLUMN]


@pytest.mark.parametrize("change", [
    lambda: (column(0), column(1), column(0)),  # one code, another closed-over value (a new closure is the same)
    lambda: (functools.partial(torch.amax, dim=1), functools.partial(torch.amin, dim=1), None),
    lambda: (functools.partial(torch.norm, p=1, dim=1), functools.partial(torch.norm, p=2, dim=1), None),
    lambda: (global_column, "COLUMN=1", None),  # the module global the function reads changes between the runs
    lambda: (activation(nn.ReLU), activation(nn.Tanh), activation(nn.ReLU)),  # a closed-over class
], ids=["closure", "partial_function", "partial_argument", "global", "class"])
def test_resume_with_a_reduce_computing_otherwise_is_refused(tmp_path, cnn, monkeypatch, change):
    path = tmp_path / "acts"
    before, after, again = change()
    interrupted(path, cnn, reduce=before)
    with monkeypatch.context() as patch:
        if after == "COLUMN=1":
            patch.setattr(sys.modules[__name__], "COLUMN", 1)
            after = global_column
        with pytest.raises(ResumeMismatchError, match=r"settings.reduce"):
            wb.harvest(cnn, make_batches(6), names=["4"], path=path, progress=False, chunk_bytes=1, resume=True,
                       reduce=after)
    store = wb.harvest(cnn, make_batches(6), names=["4"], path=path, progress=False, chunk_bytes=1, resume=True,
                       reduce=again or before)
    assert store.complete and len(store) == 30
    with torch.no_grad():
        want = torch.cat([before(cnn(x)) for x, _ in make_batches(6)]).numpy()
    np.testing.assert_array_equal(store.array("4"), want)


ID_IN_A_CHILD = """
import torch
from workbench.hooks._fingerprint import callable_id
print(callable_id(lambda out: torch.stack([o.mean() for o in out]) if "a" in {"a", "b", "c"} else out))
"""


def test_a_reduce_with_a_comprehension_has_one_name_in_every_process():
    """Nested code (a comprehension) was hashed by its repr, which holds its address, and a set literal's
    order follows string hashing: a new process never matched, so resume=True always refused."""
    ids = {subprocess.run([sys.executable, "-c", ID_IN_A_CHILD], capture_output=True, text=True, check=True,
                          env=dict(os.environ, PYTHONHASHSEED=str(seed))).stdout for seed in (1, 2)}
    assert len(ids) == 1 and "<lambda>#" in ids.pop()


def test_resume_with_a_sub_module_in_another_mode_is_refused(tmp_path):
    """model.eval() then its BatchNorm's .train(): the first batches used batch statistics. The top-level
    mode and the architecture are the same, so only the modes of sub-modules tell the runs apart."""
    path, model = tmp_path / "acts", cnn_model()
    model[1].train()
    interrupted(path, model)
    with pytest.raises(ResumeMismatchError, match=r"model.mode: 'eval \(train: 1\)' in the store, 'eval' now"):
        wb.harvest(cnn_model(), make_batches(6), names=["4"], path=path, progress=False, chunk_bytes=1, resume=True)
    model = cnn_model()  # the same model set up the same way resumes, and every row is what that model gives
    model[1].train()
    store = wb.harvest(model, make_batches(6), names=["4"], path=path, progress=False, chunk_bytes=1, resume=True)
    model = cnn_model()
    model[1].train()
    with torch.no_grad():  # batch statistics: each batch's rows depend on that batch alone
        np.testing.assert_array_equal(store.array("4"), torch.cat([model(x) for x, _ in make_batches(6)]).numpy())


def test_a_first_manifest_left_half_written_by_a_killed_writer_is_cleaned_up(tmp_path, cnn):
    """SIGKILL while the very first manifest was written leaves only its temporary file (store_child.py's
    manifest:1); the next harvest there starts afresh, and used to keep that file for ever."""
    path = tmp_path / "acts"
    path.mkdir()
    (path / "manifest.json.tmp-12345").write_text('{"format": "workbench-acti')
    store = wb.harvest(cnn, make_batches(2), names=NAMES, path=path, progress=False, resume=True)
    assert store.complete and sorted(p.name for p in path.iterdir() if not p.name.startswith("chunk-")) == [
        ".writer.lock", "manifest.json"]
    assert_exact(store, make_batches(2))


def test_a_deleted_manifest_is_our_error_naming_it_never_a_bare_file_error(tmp_path, written):
    """A harvest writes its manifest before its first chunk, so chunk folders without it mean it was deleted: the
    reader trusts only the manifest, and said FileNotFoundError about 'no activation store'. A path with nothing
    there, or an empty folder (a first manifest's writer killed), holds no store: StoreFormatError."""
    (written / "manifest.json").unlink()
    with pytest.raises(StoreCorruptError, match=r"manifest\.json is missing, but .* holds \d+ chunk folder\(s\) "
                                                r"\(chunk-000000, \.\.\.\): the manifest was deleted.*Restore it"):
        wb.ActivationStore.open(written)
    for empty in (tmp_path / "nowhere", tmp_path / "empty"):
        if empty.name == "empty":
            empty.mkdir()
        with pytest.raises(StoreFormatError, match="holds no activation store"):
            wb.ActivationStore.open(empty)


def test_shards_without_their_parent_manifest_are_refused_never_merged_unchecked(tmp_path, cnn):
    """Rank 1 harvested from another model and copied in: the parent manifest's fingerprint leaves its rows out.
    With that parent deleted, the shards were read as a format-1 store (no parent to check against) and reported
    complete, 30 rows from two models."""
    other = cnn_model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    harvest_as_rank(cnn, 0, 2, tmp_path / "acts", names=NAMES)
    harvest_as_rank(other, 1, 2, tmp_path / "other", names=NAMES)
    shutil.copytree(tmp_path / "other" / "rank-00001-of-00002", tmp_path / "acts" / "rank-00001-of-00002")
    with pytest.warns(UserWarning, match="rank 1 of 2 was harvested from other inputs"):
        assert not wb.ActivationStore.open(tmp_path / "acts").complete
    (tmp_path / "acts" / "manifest.json").unlink()
    with pytest.raises(StoreCorruptError, match=r"manifest\.json is missing, but .* holds the shards of a distributed "
                                                r"harvest \(rank-00000-of-00002, \.\.\.\)"):
        wb.ActivationStore.open(tmp_path / "acts")
