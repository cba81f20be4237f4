"""The shipped zoo: manifest, hash checks, loading, recorded metrics, and one regeneration."""
import shutil

import pytest
import torch

import workbench as wb
from workbench import zoo
from workbench.zoo.train import _data, evaluate, train
from workbench.zoo._recipes import RECIPES

MANIFEST = zoo.read_manifest()["models"]
SHIPPED = [(m["name"], m["seed"]) for m in MANIFEST]
CLASSIFIERS = [(m["name"], m["seed"]) for m in MANIFEST if m["family"] != "transformer"]
TRANSFORMERS = [(m["name"], m["seed"]) for m in MANIFEST if m["family"] == "transformer"]


def entry(name, seed):
    return next(m for m in MANIFEST if (m["name"], m["seed"]) == (name, seed))


def test_manifest_describes_every_shipped_file():
    assert SHIPPED, "the zoo ships no model"
    files = {p.name for p in zoo.zoo_dir().glob("*.safetensors")}
    assert files == {m["file"] for m in MANIFEST}
    total = sum(m["bytes"] for m in MANIFEST)
    assert total <= 50 * 2**20
    for m in MANIFEST:
        assert m["name"] in RECIPES and len(m["sha256"]) == 64 and m["train_seconds"] > 0
        assert set(m["recipe"]) >= {"epochs", "lr", "batch_size", "data"}


def test_list_shows_every_model_with_its_numbers():
    frame = zoo.list()
    assert set(zip(frame.name, frame.seed)) >= set(SHIPPED)
    assert "minilm" in set(frame.name)
    classifiers = frame[frame.family != "transformer"]
    assert classifiers.test_accuracy.notna().all()


@pytest.mark.parametrize("name, seed", CLASSIFIERS)
def test_classifiers_load_and_reproduce_their_recorded_metrics(name, seed):
    model = zoo.load(name, seed=seed)
    assert not model.training
    recipe = RECIPES[name]
    _, test = _data(recipe)
    metrics = evaluate(recipe, model, test)
    recorded = entry(name, seed)["metrics"]
    # Same weights, same data: equal up to a prediction or two flipped by kernel rounding.
    assert metrics["test_accuracy"] == pytest.approx(recorded["test_accuracy"], abs=0.002)
    assert recorded["test_accuracy"] > 0.8  # worth interpreting


@pytest.mark.transformer
@pytest.mark.parametrize("name, seed", TRANSFORMERS)
def test_tiny_transformers_load_in_either_transformer_lens_and_beat_unigram(name, seed):
    model = zoo.load(name, seed=seed)
    recipe = RECIPES[name]
    _, test = _data(recipe)
    metrics = evaluate(recipe, model, test.subset(torch.arange(200)))
    recorded = entry(name, seed)["metrics"]
    assert recorded["test_loss"] < recorded["unigram_entropy"] - 0.5
    assert metrics["test_loss"] == pytest.approx(evaluate(recipe, model, test.subset(torch.arange(200)))["test_loss"])
    assert abs(metrics["test_loss"] - recorded["test_loss"]) < 0.1  # a 200-sequence subset of the test set


def test_corrupted_or_missing_files_are_refused(tmp_path, monkeypatch):
    name, seed = CLASSIFIERS[0]
    shutil.copytree(zoo.zoo_dir(), tmp_path / "zoo")
    monkeypatch.setenv("WORKBENCH_ZOO", str(tmp_path / "zoo"))
    path = tmp_path / "zoo" / entry(name, seed)["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(zoo.ZooIntegrityError, match="does not match the manifest"):
        zoo.load(name, seed=seed)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="python -m workbench.zoo.train"):
        zoo.load(name, seed=seed)


def test_unknown_names_and_seeds_are_explained():
    name, _ = CLASSIFIERS[0]
    with pytest.raises(KeyError, match="no zoo model named"):
        zoo.load(name + "x")
    with pytest.raises(KeyError, match="is shipped with seeds"):
        zoo.load(name, seed=99)


def test_a_shipped_model_is_a_real_subject_for_the_symmetry_tools():
    name, seed = CLASSIFIERS[0]
    model = zoo.load(name, seed=seed)
    recipe = RECIPES[name]
    _, test = _data(recipe)
    x = test.inputs[:64]
    new, t = wb.random_intertwiner(model, seed=0)
    report = wb.verify(model, new, x, transform=t)
    assert report.passed and report.representations_moved and report.top1_agreement == 1.0


def test_the_zoo_is_package_data_and_training_writes_where_load_reads(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.delenv("WORKBENCH_ZOO", raising=False)
    assert zoo.zoo_dir() == Path(zoo.__file__).resolve().parent / "weights"
    assert (zoo.zoo_dir() / "manifest.json").is_file()
    shipped = zoo.load("mlp_relu", seed=0).state_dict()
    # Training with no out= writes into zoo_dir() (here redirected), and load reads the new entry.
    monkeypatch.setenv("WORKBENCH_ZOO", str(tmp_path / "zoo"))
    made = train("mlp_relu", 0, progress=False, epochs=1, limit=256)
    assert (tmp_path / "zoo" / made["file"]).is_file()
    assert [(m["name"], m["seed"]) for m in zoo.read_manifest()["models"]] == [("mlp_relu", 0)]
    fresh = zoo.load("mlp_relu", seed=0).state_dict()
    assert fresh.keys() == shipped.keys()
    assert not all(torch.equal(fresh[k], shipped[k]) for k in fresh)  # one epoch on 256 digits: not the shipped run


@pytest.mark.slow
def test_regenerating_the_digits_mlp_reaches_the_shipped_metrics(tmp_path):
    shipped = entry("mlp_relu", 0)
    regenerated = train("mlp_relu", 0, out=tmp_path, progress=False, record=False)
    assert regenerated["metrics"]["test_accuracy"] == pytest.approx(shipped["metrics"]["test_accuracy"], abs=0.02)
    assert regenerated["sha256"] and (tmp_path / regenerated["file"]).exists()


@pytest.mark.transformer
def test_minilm_loads_offline_and_caches_like_transformer_lens():
    model = zoo.load("minilm")
    tokens = model.to_tokens(["the red fox jumps over the lazy dog", "three small birds"])
    _, ours = wb.run_with_cache(model, tokens, names="blocks.*.hook_resid_post")
    _, theirs = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert len(ours) == 6  # six encoder layers
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0)
    assert ours["blocks.5.hook_resid_post"].shape[-1] == 384


def test_two_trainings_recording_at_once_lose_no_entry(tmp_path):
    """Seeds trained in parallel processes each add their manifest entry; none is lost to the other."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from workbench.zoo._registry import write_entry\n"
            "for i in range(25): write_entry({'name': 'm', 'seed': int(sys.argv[1]) * 100 + i}, Path(sys.argv[2]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(k), str(tmp_path)]) for k in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    from workbench.zoo import read_manifest

    assert sorted(m["seed"] for m in read_manifest(tmp_path)["models"]) == sorted(k * 100 + i for k in range(3) for i in range(25))
