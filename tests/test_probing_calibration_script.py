"""benchmarks/probing_calibration.py, the script behind the privileged-basis test's quoted calibration figures:
its --quick mode runs end to end and writes the structure the results page is read from."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration")
    # one section only: a smoke run of the whole table is the script's --quick without --only
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "probing_calibration.py"), "--quick",
                             "--only", "Null with unequal", "--no-progress", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out


@pytest.mark.slow
def test_quick_run_writes_json_and_markdown_with_every_row(quick):
    data = json.loads((quick / "probing_calibration.json").read_text())
    assert data["quick"] and "--quick" in data["command"] and data["machine"] and data["date"]
    rows = data["rows"]
    # the unequal-scale null: two statistics, raw and standardized, on the same data sets
    assert {(r["statistic"], r["standardize"]) for r in rows} == {(s, z) for s in ("auroc", "mean_difference")
                                                                  for z in (True, False)}
    assert len({r["data_seed"] for r in rows}) == 1
    for r in rows:
        assert r["measure"] in ("privileged", "p<=0.05") and r["section"] and r["label"]
        assert 0 <= r["count_privileged"] <= r["count_p_le_005"] <= r["sets"]  # q < 0.05 implies p ≤ 0.05
        want = r["count_privileged"] if r["measure"] == "privileged" else r["count_p_le_005"]
        assert r["count"] == want and r["rate"] == want / r["sets"]
        ci = stats.binomtest(want, r["sets"]).proportion_ci(0.95)
        assert r["ci95"] == pytest.approx([ci.low, ci.high])
    text = (quick / "probing_calibration.md").read_text()
    assert text.startswith("# Calibration simulations") and data["command"] in text
    assert text.count("| auroc, ") == 2 and text.count("| mean_difference, ") == 2


def test_full_protocol_rows_quote_the_docstring_figures():
    from benchmarks import probing_calibration as pc
    from tests.test_probing import planted

    rows = pc.rows(quick=False)
    assert all(r["sets"] in (300, 1500) for r in rows)
    heavy = [r for r in rows if r["data"] == "iid_null"]
    assert {r["data_kw"]["units"] for r in heavy} == set(pc.UNITS)
    # the power protocol draws the suite's own planted data, draw for draw
    X, y = pc.planted(7, 80, 16, strength=1.5, relu=True)
    X2, y2 = planted(7, n=80, d=16, strength=1.5, relu=True)
    assert (X == X2.numpy()).all() and (y == y2.numpy()).all()
