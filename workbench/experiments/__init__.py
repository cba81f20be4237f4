"""The studies behind ``workbench reproduce EXPERIMENT``: the paper's experiments on the zoo.

Each experiment module declares ``protocol(budget)`` (every setting), ``jobs(protocol)`` (one dict
per run), ``run(job, protocol, ctx)`` (the rows of one run), ``page(doc)`` (markdown generated
from the JSON document alone) and optionally ``settings(protocol, job)``: the part of the protocol a
run's result depends on (default: all of it), hashed into its record. ``reproduce`` runs the jobs that have no record yet (resumable: each
finished run is one atomic record carrying the protocol's hash), then writes
``<out>/<experiment>.json`` — ``{"experiment", "budget", "protocol", "timing", "runs": [rows]}`` — and
``<out>/<experiment>.md``. This package is on the top floor: it may use ``data`` and ``zoo``.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Callable, Optional

from .._errors import InvalidOptionError, check_option
from ._runs import (RunStore, collect, machines, protocol_hash, run_jobs, select_part, write_json_atomic,
                    write_text_atomic)

EXPERIMENTS = ["stitching", "insertion", "similarity", "dissection", "privileged", "gelu"]
BUDGETS = ["smoke", "quick", "paper"]
ROOT = Path(__file__).resolve().parents[2]

__all__ = ["BUDGETS", "EXPERIMENTS", "default_out", "load", "module", "render", "reproduce"]


def module(name: str):
    """The experiment module ``workbench.experiments.<name>``."""
    check_option("experiment", name, EXPERIMENTS)
    return importlib.import_module(f"{__name__}.{name}")


def default_out(budget: str) -> Path:
    """``docs/results`` for the paper budget (the committed results); ``report/reproduce-<budget>`` otherwise."""
    return ROOT / "docs" / "results" if budget == "paper" else ROOT / "report" / f"reproduce-{budget}"


def command(name: str, budget: str) -> str:
    return f"workbench reproduce {name} --budget {budget}"


def reproduce(name: str, budget: str = "quick", out: Optional[Path] = None, *, runs: Optional[Path] = None,
              part: Optional[str] = None, progress: Optional[bool] = None, report_only: bool = False,
              log: Callable[[str], None] = print) -> Optional[Path]:
    """Run ``name`` at ``budget`` (resuming), then write its JSON and page; the JSON's path, or None
    while runs are missing (another ``part`` still working, or ``report_only``).

    ``runs``: where the per-run records live (default ``<out>/.runs``); ``part="i/n"``: this process
    takes every n-th job from the i-th, so n processes share one experiment. ``progress``: a bar of the
    runs (True, False, or None, the default, for a bar in a Jupyter notebook only; the CLI shows one
    unless ``--quiet``).
    """
    check_option("budget", budget, BUDGETS)
    mod = module(name)
    proto = mod.protocol(budget)
    out = Path(out) if out is not None else default_out(budget)
    settings = getattr(mod, "settings", None)
    store = RunStore((Path(runs) if runs is not None else out / ".runs") / f"{name}-{budget}",
                     (lambda job: settings(proto, job)) if settings else (lambda job: proto))
    jobs = mod.jobs(proto)
    if not report_only:
        for folder in (out, store.folder):  # before the first run: a run of minutes must not end unable to write
            _writable(folder)
        ctx: dict = {}
        ran, skipped = run_jobs(store, select_part(jobs, part), lambda job: mod.run(job, proto, ctx),
                                progress=progress, log=log)
        log(f"{name} ({budget}): ran {ran} runs, {skipped} already finished")
    rows, missing, seconds, recs = collect(store, jobs)
    if missing:
        log(f"{name} ({budget}): {len(missing)} of {len(jobs)} runs not finished yet; {name}.json not written")
        return None
    doc = {"experiment": name, "budget": budget, "command": command(name, budget),
           "protocol": {**proto, "protocol_hash": protocol_hash(proto)},
           "timing": {"runs": len(jobs), "compute_seconds": round(seconds, 1),
                      "wall_seconds": round(max(r["finished_unix"] for r in recs) - min(r["started_unix"] for r in recs), 1),
                      "finished": max(r["finished_unix"] for r in recs),
                      "machine": machines(recs)},  # the parts' machines, not the one merging them
           "runs": rows}
    path = out / f"{name}.json"
    write_json_atomic(path, doc)
    write_text_atomic(out / f"{name}.md", mod.page(doc))
    log(f"wrote {path} and {name}.md")
    return path


def _writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidOptionError(f"{folder}: cannot create this folder ({exc.strerror}); give a writable one "
                                 "(--out, --runs).") from None
    if not os.access(folder, os.W_OK):
        raise InvalidOptionError(f"{folder}: this folder is not writable; give a writable one (--out, --runs).")


def load(name: str, folder: Optional[Path] = None) -> dict:
    """The committed JSON document of an experiment (``docs/results/<name>.json`` by default)."""
    import json

    check_option("experiment", name, EXPERIMENTS)
    path = Path(folder or ROOT / "docs" / "results") / f"{name}.json"
    if not path.exists():
        raise InvalidOptionError(f"{path} does not exist yet; run `{command(name, 'paper')}` first.")
    return json.loads(path.read_text())


def render(doc: dict) -> str:
    """The page of a JSON document (what ``reproduce`` wrote next to it)."""
    return module(doc["experiment"]).page(doc)


HEADLINES_START = "<!-- headlines: generated by workbench.experiments.headline_block() from docs/results/*.json -->"
HEADLINES_END = "<!-- end of generated headlines -->"


def headline_block(folder: Optional[Path] = None) -> str:
    """The headline table of docs/results.md: every experiment's quoted numbers, from its committed JSON."""
    from ._page import table

    folder = Path(folder or ROOT / "docs" / "results")
    rows = []
    for name in EXPERIMENTS:
        path = folder / f"{name}.json"
        if path.exists():
            import json

            doc = json.loads(path.read_text())
            # A smaller budget's numbers are not the paper protocol's: the row says so (its page says it too).
            budget = "" if doc["budget"] == "paper" else f" (**{doc['budget']} budget**, not the paper protocol)"
            rows += [[f"[{name}](results/{name}.md)", r["what"] + budget, r["ours"], r["paper"]]
                     for r in module(name).headlines(doc)]
    body = table(["experiment", "quantity", "ours: median [95% CI], or (the range of n < 6 values, how often such a range holds the median)", "paper"], rows) if rows else "(no results yet)"
    return "\n".join([HEADLINES_START, "", body, "", HEADLINES_END])
