"""`workbench reproduce`: resumable runs, the committed results re-derived from their JSON, the layering.

The headline tests load each committed ``docs/results/<experiment>.json``, recompute its medians
with numpy (not with the code that wrote the page), regenerate the page and docs/results.md's
headline table from the JSON, and compare with what is committed: a number on a page that the
runs do not carry fails here.
"""
import ast
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from workbench import experiments as E
from workbench.experiments import _stats
from workbench.experiments._runs import RunStore, job_key, select_part

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
COMMITTED = [n for n in E.EXPERIMENTS if (RESULTS / f"{n}.json").exists()]


# ------------------------------------------------------------------------------------ statistics
def test_median_ci_is_the_median_with_a_distribution_free_interval_around_it():
    v = [3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.0, 6.0]
    s = _stats.median_ci(v)
    assert s["median"] == np.median(v) and s["n"] == 8
    assert (s["lo"], s["hi"]) == (1.0, 9.0)  # n = 8: only [x_(1), x_(8)] covers 95% (99.2%; [x_(2), x_(7)] 93%)
    twelve = _stats.median_ci(list(range(1, 13)))
    assert (twelve["lo"], twelve["hi"]) == (3.0, 10.0)  # 1 − 2·P(Bin(12, ½) ≤ 2) = 96.1%
    one = _stats.median_ci([2.5])
    assert one == {"n": 1, "median": 2.5, "lo": None, "hi": None} and _stats.fmt(one) == "2.5 (n = 1)"
    assert _stats.median_ci([]) ["median"] is None and _stats.fmt(_stats.median_ci([])) == "—"
    few = _stats.median_ci([4.0, 4.0, 4.0, 5.0, 6.0])  # n ≤ 5: no interval reaches 95%
    assert (few["lo"], few["hi"]) == (None, None) and _stats.excludes_zero(few) is None
    # the range instead, with how often a range of 5 holds the median: 1 − 2·(1/2)⁵ (never called a 95% interval)
    assert _stats.fmt(few) == "4.0 (range of 5: 4.0–6.0, 94%)" and _stats.range_coverage(5) == 1 - 2 * 0.5 ** 5
    assert _stats.fmt(_stats.median_ci([1.0, 3.0, 2.0])) == "2.0 (range of 3: 1.0–3.0, 75%)"


def test_a_verdict_is_the_sign_test_at_5_percent():
    from scipy.stats import quantile_test

    assert _stats.excludes_zero(_stats.median_ci([5.0, 6.0, 7.0, 8.0, 9.0, 10.0])) == 1  # sign test p = 0.031
    assert _stats.excludes_zero(_stats.median_ci([-5.0, -6.0, -7.0, -1.0, -2.0, -3.0])) == -1
    assert _stats.excludes_zero(_stats.median_ci([-1.0, 2, 3, 4, 5, 6, 7, 8])) == 0  # p = 0.07
    assert quantile_test([-1.0, 2, 3, 4, 5, 6, 7, 8], q=0).pvalue > 0.05
    assert _stats.excludes_zero(_stats.median_ci([5.0, 6.0, 7.0, 8.0, 9.0])) is None  # p = 0.0625 at best: no verdict
    assert _stats.paired({"a": 3.0, "b": 1.0, "c": 9.0}, {"a": 1.0, "b": 1.0}) == [2.0, 0.0]


# ------------------------------------------------------------------------------------ resumable runs
def test_reproduce_resumes_and_never_recomputes_a_finished_run(tmp_path, monkeypatch):
    gelu = E.module("gelu")
    calls = []
    real = gelu.run
    monkeypatch.setattr(gelu, "run", lambda job, p, ctx: calls.append(job) or real(job, p, ctx))
    logs = []
    path = E.reproduce("gelu", "smoke", tmp_path, progress=False, log=logs.append)
    n = len(gelu.jobs(gelu.protocol("smoke")))
    assert path == tmp_path / "gelu.json" and len(calls) == n
    records = sorted((tmp_path / ".runs" / "gelu-smoke").glob("*.json"))
    assert len(records) == n
    stamps = {p: p.stat().st_mtime_ns for p in records}
    calls.clear()
    E.reproduce("gelu", "smoke", tmp_path, progress=False, log=logs.append)
    assert calls == [] and f"ran 0 runs, {n} already finished" in logs[-2]
    assert {p: p.stat().st_mtime_ns for p in records} == stamps  # nothing rewritten
    # A crash mid-write leaves a torn record (or none): that run, and only that run, is done again.
    records[0].write_text(records[0].read_text()[:20])
    records[1].unlink()
    E.reproduce("gelu", "smoke", tmp_path, progress=False, log=logs.append)
    assert len(calls) == 2
    doc = json.loads(path.read_text())
    assert len([r for r in doc["runs"] if r["metric"] == "xi"]) == n
    assert (tmp_path / "gelu.md").read_text() == E.render(doc)


def test_a_page_names_the_machines_that_ran_its_parts_not_the_one_that_merged_them(tmp_path, monkeypatch):
    """Two parts on two machines, merged by a third: the page said "on <the merging machine>" for every run."""
    from workbench.experiments import _runs

    gelu = E.module("gelu")
    n = len(gelu.jobs(gelu.protocol("smoke")))
    for part, where in (("1/2", "64 CPU cores (aarch64)"), ("2/2", "2 CPU cores (x86_64)")):
        monkeypatch.setattr(_runs, "machine", lambda where=where: where)
        E.reproduce("gelu", "smoke", tmp_path, part=part, progress=False, log=lambda m: None)
    monkeypatch.setattr(_runs, "machine", lambda: "the merging machine")
    path = E.reproduce("gelu", "smoke", tmp_path, report_only=True, progress=False, log=lambda m: None)
    doc = json.loads(path.read_text())
    first, second = len(range(0, n, 2)), len(range(1, n, 2))
    assert doc["timing"]["machine"] == (f"2 machines: 64 CPU cores (aarch64) ({first} runs); "
                                        f"2 CPU cores (x86_64) ({second} runs)")
    assert f"on {doc['timing']['machine']}." in (tmp_path / "gelu.md").read_text()
    one = _runs.machines([{"machine": "m"}, {"machine": "m"}])
    assert one == "m" and _runs.machines([{"machine": "m"}, {}]) == (
        "2 machines: m (1 run); a machine not recorded (1 run from before records named theirs)")


def test_a_changed_setting_recomputes_and_a_dropped_job_keeps_the_rest(tmp_path):
    calls = []
    store = RunStore(tmp_path, lambda job: {"epochs": 3})
    jobs = [{"site": "2", "pair": "0-1"}, {"site": "5", "pair": "0-1"}]
    from workbench.experiments._runs import run_jobs

    assert run_jobs(store, jobs, lambda j: calls.append(j) or [{"metric": "m", "value": 1.0}],
                    progress=False, log=lambda m: None) == (2, 0)
    assert run_jobs(store, jobs[:1], lambda j: calls.append(j) or [], progress=False, log=lambda m: None) == (0, 1)
    changed = RunStore(tmp_path, lambda job: {"epochs": 4})
    assert changed.get(jobs[0]) is None and store.get(jobs[0]) is not None  # a stale record is never reused
    assert job_key({"site": "layer1.0.act1", "family": "low_rank:4"}) == "site=layer1.0.act1,family=low_rank_4"
    assert select_part(list(range(7)), "2/3") == [1, 4]
    with pytest.raises(ValueError, match="part='3/2'"):
        select_part([1], "3/2")


def test_a_retrained_zoo_model_recomputes_its_runs_and_only_those(tmp_path, monkeypatch):
    """A finished run is kept only while the zoo weights it used are the same: retraining one seed (its
    sha256 changes in the manifest) recomputes the runs that used it, never mixing old and new numbers."""
    import json
    import shutil

    from workbench.experiments._runs import run_jobs, zoo_weights
    from workbench.zoo import zoo_dir

    zoo = tmp_path / "zoo"
    zoo.mkdir()
    shutil.copy(zoo_dir() / "manifest.json", zoo / "manifest.json")
    monkeypatch.setenv("WORKBENCH_ZOO", str(zoo))
    store = RunStore(tmp_path / "runs", lambda job: {"epochs": 3})
    jobs = [{"model": "myrtle_relu", "site": "2", "pair": "0-1"}, {"model": "myrtle_relu", "site": "2", "pair": "2-3"}]
    assert set(zoo_weights(jobs[0])) == {"myrtle_relu-seed0", "myrtle_relu-seed1"}
    ok = lambda j: [{"metric": "m", "value": 1.0}]  # noqa: E731
    assert run_jobs(store, jobs, ok, progress=False, log=lambda m: None) == (2, 0)
    manifest = json.loads((zoo / "manifest.json").read_text())
    for m in manifest["models"]:
        if (m["name"], m["seed"]) == ("myrtle_relu", 1):
            m["sha256"] = "0" * 64  # seed 1 was retrained
    (zoo / "manifest.json").write_text(json.dumps(manifest))
    assert store.get(jobs[0]) is None and store.get(jobs[1]) is not None
    assert run_jobs(store, jobs, ok, progress=False, log=lambda m: None) == (1, 1)
    assert store.get(jobs[0])["weights"]["myrtle_relu-seed1"] == "0" * 64


def test_the_cli_reproduce_command(tmp_path):
    from workbench.cli import main

    assert main(["reproduce", "gelu", "--budget", "smoke", "--out", str(tmp_path), "--quiet"]) == 0
    doc = json.loads((tmp_path / "gelu.json").read_text())
    assert doc["command"] == "workbench reproduce gelu --budget smoke" and doc["budget"] == "smoke"
    assert "smoke budget" in (tmp_path / "gelu.md").read_text()
    assert main(["reproduce", "gelu", "--budget", "smoke", "--out", str(tmp_path / "x"), "--report-only", "--quiet"]) == 1
    with pytest.raises(SystemExit):
        main(["reproduce", "stiching"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stitching", "insertion", "similarity", "dissection", "privileged"])
def test_every_experiment_runs_end_to_end_at_the_smoke_budget(name, tmp_path):
    path = E.reproduce(name, "smoke", tmp_path, progress=False, log=lambda m: None)
    doc = json.loads(path.read_text())
    assert doc["experiment"] == name and doc["runs"] and doc["timing"]["runs"] == len(E.module(name).jobs(doc["protocol"]))
    for r in doc["runs"]:
        assert {"metric", "value"} <= set(r) and ("pair" in r or "seed" in r or name == "gelu")
    page = (tmp_path / f"{name}.md").read_text()
    assert page == E.render(doc) and "smoke budget" in page
    if name == "similarity":  # the function-preserving control: G_ReLU-invariant measures read 1, rotations do not
        ctrl = {(r["measure"], r["layer"]): r["value"] for r in doc["runs"] if r["kind"] == "control"}
        assert all(v == pytest.approx(1.0, abs=1e-5) for (m, _), v in ctrl.items() if m == "grelu_cka")
        assert all(v < 0.99 for (m, _), v in ctrl.items() if m == "orthogonal_procrustes")
    if name == "dissection":  # dissection counts are invariant to the layer's own group, exactly
        assert all(r["value"] == next(q["value"] for q in doc["runs"] if q["basis"] == "neuron" and q["metric"] == r["metric"]
                                      and q["seed"] == r["seed"] and q["layer"] == r["layer"])
                   for r in doc["runs"] if r["basis"] == "own_group")


# ------------------------------------------------------------------------------------ committed results
@pytest.mark.parametrize("name", COMMITTED)
def test_committed_page_is_regenerated_from_its_json(name):
    doc = json.loads((RESULTS / f"{name}.json").read_text())
    assert doc["experiment"] == name
    assert (RESULTS / f"{name}.md").read_text() == E.render(doc)


def _numpy_medians(doc, key_fields, metric="penalty", where=lambda r: True):
    groups = {}
    for r in doc["runs"]:
        if r["metric"] == metric and where(r):
            groups.setdefault(tuple(r.get(k) for k in key_fields), []).append(r["value"])
    return {k: float(np.median(v)) for k, v in groups.items()}


@pytest.mark.skipif("stitching" not in COMMITTED, reason="no committed stitching results")
def test_stitching_headlines_are_carried_by_the_runs():
    from workbench.experiments import stitching as st

    doc = json.loads((RESULTS / "stitching.json").read_text())
    p = doc["protocol"]
    if doc["budget"] == "paper":  # at least four pairs; the paper-mode ResNet-20 sites it lists are all run
        assert len(p["myrtle"]["pairs"]) >= 4 and set(p["resnet"]["sites"]) <= set(st.RESNET_SITES)
        assert {r["site"] for r in doc["runs"] if r.get("skip") == "unmapped"} == set(p["resnet"]["sites"])
        if len(p["resnet"]["sites"]) < len(st.RESNET_SITES):  # a shorter sweep says so on its page
            assert f"{len(p['resnet']['sites'])} of the {len(st.RESNET_SITES)}" in (RESULTS / "stitching.md").read_text()
    med = _numpy_medians(doc, ("model", "site", "family"), where=lambda r: r["family"] != "lasso" and "skip" not in r)
    page = (RESULTS / "stitching.md").read_text()
    for row in st.myrtle_table(doc):
        for site in p["myrtle"]["sites"]:
            if row["family"] == "lasso":
                continue
            assert row[site]["median"] == pytest.approx(med[(p["myrtle"]["model"], site, row["family"])])
            assert _stats.fmt(row[site]) in page
    for row in st.myrtle_table(doc):  # LASSO: α picked per pair and site on validation accuracy, recomputed here
        if row["family"] != "lasso":
            continue
        for site in p["myrtle"]["sites"]:
            by = {}
            for r in doc["runs"]:
                if r["family"] == "lasso" and r["site"] == site:
                    by.setdefault(r["pair"], {}).setdefault(r["alpha"], {})[r["metric"]] = r["value"]
            picked = [v[max(sorted(v), key=lambda a: v[a]["val_accuracy"])]["penalty"] for v in by.values()]
            assert row[site]["median"] == pytest.approx(float(np.median(picked)))


@pytest.mark.skipif("insertion" not in COMMITTED, reason="no committed insertion results")
def test_insertion_headlines_are_carried_by_the_runs():
    from workbench.experiments import insertion as ins

    doc = json.loads((RESULTS / "insertion.json").read_text())
    if doc["budget"] == "paper":
        assert len(doc["protocol"]["seeds"]) >= 3
    acc = {(r["seed"], r["site"], r["group"]): r["value"] for r in doc["runs"] if r["metric"] == "accuracy"}
    page = (RESULTS / "insertion.md").read_text()
    for row in ins.table_rows(doc):
        for g in ("relu", "orthogonal"):
            pen = [acc[s, row["site"], "trivial"] - acc[s, row["site"], g] for s in doc["protocol"]["seeds"]]
            assert row[g]["median"] == pytest.approx(float(np.median(pen)))
            assert _stats.fmt(row[g]) in page


@pytest.mark.skipif("similarity" not in COMMITTED, reason="no committed similarity results")
def test_similarity_headlines_are_carried_by_the_runs():
    from workbench.experiments import similarity as sim

    doc = json.loads((RESULTS / "similarity.json").read_text())
    med = _numpy_medians(doc, ("family", "layer", "measure"), metric="similarity", where=lambda r: r["kind"] == "diagonal")
    for m in sim.HEADLINE:
        for r in sim.diagonal(doc, "myrtle_relu", m):
            assert r["median"] == pytest.approx(med[("myrtle_relu", r["layer"], m)])


def test_results_md_quotes_exactly_the_generated_headlines():
    text = (ROOT / "docs" / "results.md").read_text()
    start, end = text.index(E.HEADLINES_START), text.index(E.HEADLINES_END) + len(E.HEADLINES_END)
    assert text[start:end] == E.headline_block()


# ------------------------------------------------------------------------------------ the layering
LIBRARY = ["groups", "models", "hooks", "symmetry", "probing", "similarity", "stitching"]


def test_library_packages_never_import_data_or_zoo():
    """DESIGN.md: library packages never import ``data`` or ``zoo``; the studies live in experiments/."""
    bad = []
    for pkg in LIBRARY:
        for path in (ROOT / "workbench" / pkg).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.ImportFrom):
                    mod = node.module or ""
                    names = [mod] + [f"{mod}.{a.name}" if mod else a.name for a in node.names]
                    if node.level >= 2 and not mod:
                        names = [a.name for a in node.names]
                    elif node.level >= 2:
                        names = [mod.split(".")[0]]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                for n in names:
                    if re.fullmatch(r"(workbench\.)?(data|zoo)(\..*)?", n) or n in ("data", "zoo"):
                        bad.append(f"{path.relative_to(ROOT)}: imports {n}")
    assert bad == []
    for pkg in ("probing", "similarity", "stitching"):
        assert not (ROOT / "workbench" / pkg / "study.py").exists()
