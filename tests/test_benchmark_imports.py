"""The benchmark scripts build their TransformerLens models in a fresh interpreter.

On this project's CPU torch, ``import transformers`` (which TransformerLens does) imports the CUDA-linked
torchvision, which fails in its meta registrations unless ``ensure_torchvision_importable()`` ran first
(workbench/models/_compat.py). The test session's conftest runs it, so only a fresh interpreter shows a
script that forgets: ``make bench`` (benchmarks/cache.py) crashed that way until 2026-12-04.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("transformer_lens.model_bridge")  # the scripts use TransformerLens 4.x
pytest.importorskip("torchvision")


@pytest.mark.transformer
def test_benchmark_model_builders_run_in_a_fresh_interpreter():
    code = ("import benchmarks.cache as c, benchmarks.transformers as t\n"
            "a = c.make_bridge()\n"
            "b = t.make('quick')\n"
            "print(type(a).__name__, type(b).__name__)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["TransformerBridge", "TransformerBridge"]
