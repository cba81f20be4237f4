"""Benchmark of the widgets' interactions on zoo models: every click should answer in under a second.

Rerun with ``.venv/bin/python benchmarks/widgets.py``; ``--quick`` is a smoke test with fewer
repetitions that prints the table and writes no files. Results go to ``benchmarks/results/widgets.md``.

Method. CPU, torch's default thread count, float32, eval mode, everything driven from code exactly
as a click would (setting a control's value runs the same observers; ``apply()`` runs the same work
as the Apply button, inline instead of in a worker thread). An interaction's time is from the call
until its panels hold their new content (HTML and PNG built), which is what the kernel sends to the
browser; the browser's drawing is not included. Each interaction is repeated and the **minimum** is
reported (the run least disturbed by other processes on this shared machine), with the median
beside it; the target is min < 1 s of wall time. Beside it, the minimum CPU time of the process (all
threads) over the same runs: with no waiting for I/O, an interaction's wall time on an idle machine
is at most its CPU time, so a CPU time under 1 s says the target holds where the machine is not
shared, whatever the load was during the run (contention inflates CPU time too, through cache
misses and spinning worker threads, so the bound stays on the safe side).

Setups: ``myrtle_relu`` seed 0 with 64 and with 256 ``shapes`` images (32×32, difficulty 0.3, seed 2),
and ``mlp_relu`` seed 0 on all 1797 ``digits`` (16×16). Interactions: opening the explorer (info: it
traces the model and scores every site's units once; first open in the process, then again), picking
a site, picking a unit, Apply with the site's own group at every site, Apply with a rotation (the
negative control) at every site, and Apply after a seed change (a new element each repetition). For
the CacheBrowser on a full cache of ``myrtle_relu`` on 64 images: opening, picking a name, switching
to the histogram and back, and picking an example. For the NeuronBasisProbe on the 256-image Myrtle and the
digits MLP: opening, the first Run at each layer (info), and the cached interactions (see ``bench_probe``).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import workbench as wb  # noqa: E402
from cache import machine  # noqa: E402  (the house helper)

RESULTS = HERE / "results"
TARGET = 1.0  # seconds


def timed(fn, reps: int, reset=None) -> list[tuple[float, float]]:
    """``(wall seconds, CPU seconds of the process)`` of each of ``reps`` calls (``reset()`` runs untimed before each)."""
    times = []
    for _ in range(reps):
        if reset is not None:
            reset()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def row(setup: str, interaction: str, times: list[tuple[float, float]], target: bool = True) -> dict:
    walls = [w for w, _ in times]
    r = {"setup": setup, "interaction": interaction, "min": min(walls), "median": statistics.median(walls),
         "cpu_min": min(c for _, c in times), "reps": len(times)}
    if target:
        r["pass"] = r["min"] < TARGET
    return r


def cycle(values):
    """A function returning ``values[0]``, ``values[1]``, … round and round; ``values[0]`` must differ from
    the widget's current value, so that every repetition really changes something."""
    state = {"i": -1}

    def nxt():
        state["i"] += 1
        return values[state["i"] % len(values)]
    return nxt


def bench_explorer(setup: str, model, data, reps: int, first: bool) -> list[dict]:
    rows = []
    explorer = None

    def open_explorer():
        nonlocal explorer
        explorer = wb.widgets.IntertwinerExplorer(model, data, progress=False)

    opened = timed(open_explorer, 1)
    if first:
        rows.append(row(setup, "open the explorer, first time in the process (info)", opened, target=False))
    rows.append(row(setup, "open the explorer again (info)",
                    timed(lambda: wb.widgets.IntertwinerExplorer(model, data, progress=False), max(2, reps // 2)),
                    target=False))
    sites = explorer.smap.names
    nxt_site = cycle(sites[1:] + sites[:1])
    rows.append(row(setup, "pick a site", timed(lambda: setattr(explorer, "site", nxt_site()), reps)))
    for group in ("own", "orthogonal"):
        explorer.group = group
        for site in sites:
            explorer.site = site
            label = "own group" if group == "own" else "rotation (negative control)"
            rows.append(row(setup, f"Apply, {label}, site {site} (n={explorer.smap[site].n})",
                            timed(explorer.apply, reps)))
    explorer.group = "own"
    seeds = iter(range(1, 10**6))
    rows.append(row(setup, f"change the seed and Apply, site {explorer.site}",
                    timed(lambda: (setattr(explorer, "seed", next(seeds)), explorer.apply()), reps)))
    nxt_unit = cycle(list(range(1, explorer.smap[explorer.site].n)) + [0])
    rows.append(row(setup, "pick a unit (after an Apply: three rows of examples)",
                    timed(lambda: setattr(explorer, "unit", nxt_unit()), reps)))
    return rows


def bench_browser(reps: int) -> list[dict]:
    setup = "CacheBrowser, myrtle_relu, all 18 names, 64 images"
    model = wb.zoo.load("myrtle_relu", 0)
    _, cache = wb.run_with_cache(model, wb.data.shapes(64, size=32, seed=2, difficulty=0.3).inputs)
    rows = [row(setup, "open the browser", timed(lambda: wb.widgets.CacheBrowser(cache), reps))]
    browser = wb.widgets.CacheBrowser(cache)
    nxt_name = cycle(cache.names[1:] + cache.names[:1])
    rows.append(row(setup, "pick a name (heatmap)", timed(lambda: setattr(browser, "name", nxt_name()), reps)))
    browser.name = cache.names[0]  # the largest: [64, 16, 32, 32]
    shape = tuple(cache[cache.names[0]].shape)
    for view, other in (("histogram", "heatmap"), ("heatmap", "histogram")):
        rows.append(row(setup, f"switch to the {view} of {cache.names[0]} {shape}",
                        timed(lambda: setattr(browser, "view", view), reps, reset=lambda: setattr(browser, "view", other))))
    nxt_example = cycle(list(range(1, 64)) + [0])
    rows.append(row(setup, "pick an example", timed(lambda: setattr(browser, "example", nxt_example()), reps)))
    return rows


def bench_probe(setup: str, model, data, reps: int) -> list[dict]:
    """NeuronBasisProbe: opening (captures every site once), the first Run of a layer (computes its null over
    all concepts: long work with progress, info), then what must be instant: picking a concept, a computed layer,
    a computed number of bases, and Run on a computed setting."""
    rows, probe = [], None

    def open_probe():
        nonlocal probe
        probe = wb.widgets.NeuronBasisProbe(model, data, progress=False)

    rows.append(row(setup, "open the neuron-basis probe (info: captures every site)", timed(open_probe, 1), target=False))
    layers = probe.data.layers
    for layer in layers:
        probe.layer = layer
        n = probe.data.acts[layer].shape[-1]
        rows.append(row(setup, f"first Run at layer {layer} (d={n}, {probe.n_bases} bases × 3 families, all concepts; info)",
                        timed(probe.run, 1), target=False))
    nxt_concept = cycle(probe.data.concept_names[1:] + probe.data.concept_names[:1])
    rows.append(row(setup, f"pick a concept (cached null, {len(probe.data.concept_names)} concepts)",
                    timed(lambda: setattr(probe, "concept", nxt_concept()), reps)))
    if len(layers) > 1:
        i = layers.index(probe.layer) + 1  # start from another layer than the one on show
        nxt_layer = cycle(layers[i:] + layers[:i])
        rows.append(row(setup, "pick a computed layer", timed(lambda: setattr(probe, "layer", nxt_layer()), reps)))
    probe.n_bases = 20
    probe.run()
    nxt_bases = cycle([50, 20])
    rows.append(row(setup, "switch between computed n_bases (50 / 20)",
                    timed(lambda: setattr(probe, "n_bases", nxt_bases()), reps)))
    rows.append(row(setup, "Run on a computed setting", timed(probe.run, reps)))
    return rows


PROBE_NOTES = """
## NeuronBasisProbe

Opening captures every site of `wb.symmetry_map(model)` once (spatial means of conv maps). The first Run at a
layer draws `n_bases` (default 50) bases of each family (orthogonal, GL, the site's own group) and computes the
null of *every* concept at once: one sort of the projected activations per basis serves all concepts, so this is
the only long step (a progress bar and Cancel in the widget; 0.6–1.6 s wall, 0.5–1.1 s CPU, for Myrtle layers on
256 images; 2.5–5.5 s wall, 3.0–3.5 s CPU, for an MLP layer on 1797 digits, where sorting 1797 rows per basis
dominates: lower `n_bases` for a quicker first look). The test is cached per
(layer, n_bases, seed); picking a concept, a computed layer or a computed n_bases then only slices it and
redraws. Those cached interactions take ~0.35 s of CPU (0.4–0.55 s wall under load), nearly all of it the matplotlib
histogram.
"""


def fmt(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def table(rows: list[dict]) -> str:
    lines = ["| setup | interaction | min | median | min CPU | runs | min < 1 s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = "" if "pass" not in r else ("PASS" if r["pass"] else "MISS")
        lines.append(f"| {r['setup']} | {r['interaction']} | {fmt(r['min'])} | {fmt(r['median'])} | {fmt(r['cpu_min'])} "
                     f"| {r['reps']} | {verdict} |")
    return "\n".join(lines)


def write(rows: list[dict], settings: dict, started: str) -> None:
    m = machine()
    misses = [r for r in rows if r.get("pass") is False]
    slowest = max((r for r in rows if "pass" in r), key=lambda r: r["min"])
    text = "\n".join([
        "# Widget benchmark: every interaction under a second", "",
        f"- Date: {started}",
        f"- Machine: {m['nproc']} CPUs ({m['cpu']}), torch threads {m['torch_threads']}, Python {m['python']}, "
        f"torch {m['torch']}, workbench {m['workbench']}",
        "- Rerun: `.venv/bin/python benchmarks/widgets.py`; method in the script's docstring.",
        f"- Settings: {settings}",
        f"- Load average (1 min) at start / end: {settings['load'][0]:.2f} / {settings['load'][1]:.2f} on "
        f"{m['nproc']} CPUs (other users' jobs share this machine; above {m['nproc']} they compete for the CPUs)", "",
        "Times are per interaction, from the call until the widget's panels hold their new content. "
        "PASS/MISS judges the minimum wall time over the runs against 1 s; rows marked (info) have no target. "
        "min CPU is the least CPU time of the process (all threads) over the same runs: without I/O waits it "
        "bounds the wall time the interaction would take on an idle machine of this kind.", "",
        table(rows), "",
        f"Slowest interaction with a target: {slowest['setup']} — {slowest['interaction']}: min {fmt(slowest['min'])}.", "",
        "## Misses", "",
        *([f"- {r['setup']} — {r['interaction']}: min {fmt(r['min'])} wall, {fmt(r['cpu_min'])} CPU"
            + (" (under 1 s of CPU, so within 1 s on an idle machine: the miss points to the shared machine's load)."
               if r["cpu_min"] < TARGET
               else " (the work itself takes over 1 s of CPU).") for r in misses] or ["None."]), "",
        "## Where the time goes", "",
        "An Apply is `wb.random_intertwiner` at one site (~20–40 ms), `wb.verify` on the first 32 examples (two "
        "forwards with the site's hooks), one forward of the new model over all examples that stops at the site "
        "(`stop_at=True`: a site near the input costs only the layers before it), the Hungarian matching "
        "(~10 ms) and the panels (small PNGs in HTML). The original model's unit scores at every site are "
        "computed once when the explorer opens. Measured while building it (load ~9 on 2 CPUs): the two heatmaps "
        "as a matplotlib figure took 0.65 s and the thumbnails as a matplotlib grid 0.75 s; as PNG-in-HTML they "
        "take 13 ms and 65 ms, which is why the panels are drawn that way.", "",
    ])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "widgets.md").write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke test: few repetitions, prints only")
    args = p.parse_args()
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    reps = 3 if args.quick else 7
    load = os.getloadavg()[0]
    myrtle = wb.zoo.load("myrtle_relu", 0)
    setups = [("myrtle_relu seed 0, 64 shapes images", myrtle, wb.data.shapes(64, size=32, seed=2, difficulty=0.3)),
              ("myrtle_relu seed 0, 256 shapes images", myrtle, wb.data.shapes(256, size=32, seed=2, difficulty=0.3)),
              ("mlp_relu seed 0, 1797 digits", wb.zoo.load("mlp_relu", 0), wb.data.digits(size=16))]
    rows = []
    for i, (setup, model, data) in enumerate(setups):
        print(f"running {setup} ...", flush=True)
        rows += bench_explorer(setup, model, data, reps, first=i == 0)
    print("running the CacheBrowser ...", flush=True)
    rows += bench_browser(reps)
    for setup, model, data in setups[1:]:
        print(f"running the NeuronBasisProbe on {setup} ...", flush=True)
        rows += bench_probe(setup, model, data, reps)
    print(table(rows))
    if not args.quick:
        write(rows, {"reps": reps, "load": (load, os.getloadavg()[0])}, started)
        with open(RESULTS / "widgets.md", "a") as f:
            f.write(PROBE_NOTES)
        print(f"wrote {RESULTS / 'widgets.md'}")


if __name__ == "__main__":
    main()
