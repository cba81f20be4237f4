"""The two sweeps (benchmarks/sweep_timm.py, benchmarks/sweep_text.py) run one model each in a fresh interpreter, as
their own loops do, and classify what they see: a script that stops building models, or a classification that
calls a wrong transform exact, would leave their pages saying nothing is wrong."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("timm")


def row(script: str, name: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--one", name], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    found = [line[4:] for line in out.stdout.splitlines() if line.startswith("ROW ")]
    assert found, out.stderr[-3000:]
    return json.loads(found[-1])


def test_the_timm_sweep_transforms_a_model_and_checks_it_itself():
    r = row("sweep_timm.py", "test_resnet")
    assert r["status"] == "exact" and r["sites"] > 0 and r["direct64"] <= 1e-10, r


@pytest.mark.transformer
def test_the_text_sweep_transforms_a_checked_family_and_reports_an_unchecked_one():
    r = row("sweep_text.py", "gpt2")
    assert r["status"] == "exact" and r["sites"] > 0, r
    r = row("sweep_text.py", "mpt")
    assert r["status"] == "no sites" and "mpt" in r["error"], r


def test_a_transform_is_judged_against_the_models_own_floor_only_above_exact():
    import importlib.util

    # loaded by path: benchmarks/ on sys.path would shadow the transformers package with benchmarks/transformers.py
    spec = importlib.util.spec_from_file_location("sweep_timm", ROOT / "benchmarks" / "sweep_timm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    judge = module.judge

    r = {}
    judge(r, 1e-12, lambda: pytest.fail("the floor is measured only above 1e-10"))
    assert r["status"] == "exact"
    r = {}
    judge(r, 1e-6, lambda: 1e-7)  # within ten times what rounding alone moves the model by
    assert r["status"] == "at its floor" and r["floor"] == 1e-7
    r = {}
    judge(r, 1e-6, lambda: 1e-8)
    assert r["status"] == "WRONG"
