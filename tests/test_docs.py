"""The API reference (``make docs``): every public package's docstrings render, the verbs are on it."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def api_modules() -> list[str]:
    """The module list of the Makefile's ``docs`` target (one list, read here rather than repeated)."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    return re.search(r"^API_MODULES := (.*)$", text, re.M).group(1).split()


@pytest.mark.slow
def test_make_docs_renders_every_public_package(tmp_path):
    modules = api_modules()
    assert {"workbench", "workbench.symmetry", "workbench.hooks", "workbench.widgets"} <= set(modules)
    result = subprocess.run([sys.executable, "-m", "pdoc", "--docformat", "google", "--no-show-source", *modules,
                             "-o", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Warn" not in result.stderr, result.stderr[-2000:]
    pages = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.html")}
    assert {f"{m.replace('.', '/')}.html" for m in modules} <= pages
    symmetry = (tmp_path / "workbench" / "symmetry.html").read_text()
    for verb in ("symmetry_map", "random_intertwiner", "verify"):
        assert f'id="{verb}"' in symmetry
    assert 'id="NeuronBasisProbe"' in (tmp_path / "workbench" / "widgets.html").read_text()
