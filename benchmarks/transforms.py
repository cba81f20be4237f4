"""Benchmark of ``wb.random_intertwiner`` against ``copy.deepcopy`` and ``wb.verify`` against two plain forwards.

Rerun with ``.venv/bin/python benchmarks/transforms.py``; ``--quick`` is a smoke test with fewer
repetitions that prints the table and writes no files; ``--vision [MODEL …]`` measures only the cost of a
transform of issue 17's vision models against ``copy.deepcopy`` (see ``vision_costs``). Results go to ``benchmarks/results/transforms.md``
(and the raw samples to ``transforms.json``).

Method. Everything runs on the CPU with torch's default thread count, float32, eval mode. Two models:
a torchvision-style ResNet-18 (defined here, torchvision is not installed: 7x7 stem with BN,
``ReLU(inplace=True)`` and max-pool, BasicBlocks [2, 2, 2, 2] of widths 64-512 with 1x1-conv+BN
downsample, average pool, fc 1000; 11.69M parameters like torchvision's) and an MLP
1024-4096-4096-4096-10 with ReLU (37.8M parameters).
  (a, b) ``copy.deepcopy(model)`` against ``wb.random_intertwiner(model, seed=i)`` (a new seed each call),
      both at steady state (the model's symmetry map memoised by earlier calls) and as the first call on a
      fresh model object, whose per-object memo misses; it finds the map by the model's structure (a trace
      with torch.fx is paid once per architecture: benchmarks/performance.py's "never-seen architecture"
      row measures that). The fresh objects are made before timing
      by ``copy.deepcopy(model, memo)`` with a memo that maps every parameter and buffer to itself: new
      module objects (so the per-object memo misses) that share the weights (so nine of them cost no
      memory); random_intertwiner still copies all the weights, as on any model. A last row runs each
      model in fresh interpreters: one deep copy, then the first random_intertwiner of the process
      (which also pays the lazy import of ``workbench.symmetry`` and torch.fx); the ratio is per process.
  (c) ``wb.verify(model, new, x, transform=t)`` (called as a user would, without ``torch.no_grad``) against
      ``model(x); new(x)`` under ``torch.no_grad``, on ResNet-18 with x of 8x3x64x64 and the MLP with 256
      rows. ``model`` is the object of (a, b), so its map is memoised, and the same (new, t) pair is
      verified each time. An info row verifies pairs fresh from random_intertwiner (made before timing),
      the usual use, where capture meets the new model for the first time. verify traces ``model`` on the
      first example of x (64x64 for ResNet-18, where random_intertwiner guessed 32x32): the first verify
      of (c) pays that trace, untimed; the timed calls find the map memoised.
Within a group the variants are timed side by side with ``cache.interleaved`` (after two warm-up calls
each, every repetition runs every variant once, in an order shuffled per repetition). A ratio is the median
over repetitions of the row's time over the baseline's in the same repetition; "ratio of mins" divides the
fastest times. Each missed target is profiled afterwards (cProfile, one call, top 15 by cumulative time).
"""
from __future__ import annotations

import argparse
import cProfile
import copy
import datetime
import io
import itertools
import json
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch  # noqa: E402
from torch import nn  # noqa: E402

import workbench as wb  # noqa: E402
from workbench.zoo import resnet18  # noqa: E402
from cache import interleaved, machine, noise_hint, row, table  # noqa: E402  (the house helpers)

RESULTS = HERE / "results"


# ---------------------------------------------------------------------------------------- models
def make(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "resnet":
        return resnet18().eval()
    dims = [1024, 4096, 4096, 4096, 10]
    layers = [m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())][:-1]
    return nn.Sequential(*layers).eval()


MODELS = {"resnet": ("ResNet-18", (8, 3, 64, 64)), "mlp": ("MLP 1024-4096x3-10", (256, 1024))}


def shell(model: nn.Module) -> nn.Module:
    """A new module tree sharing ``model``'s parameters and buffers (a fresh object to the memo)."""
    return copy.deepcopy(model, {id(t): t for t in itertools.chain(model.parameters(), model.buffers())})


def params(model: nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params"


# ---------------------------------------------------------------------------------------- groups
def bench_intertwiner(kind: str, reps: int, proc_reps: int) -> list[dict]:
    name, model = MODELS[kind][0], make(kind)
    print(f"  {name}: {params(model)} ({sum(p.numel() for p in model.parameters()):,})", flush=True)
    seeds, shells = itertools.count(1), [shell(model) for _ in range(reps + 2)]
    t = interleaved({"copy": lambda: copy.deepcopy(model),
                     "steady": lambda: wb.random_intertwiner(model, seed=next(seeds)),
                     "first": lambda: wb.random_intertwiner(shells.pop(), seed=next(seeds))}, reps)
    target = ("<=", 2.0)
    miss = "making a random function-preserving copy costs more than twice a plain deep copy"
    rows = [row(f"{name} copy.deepcopy ({params(model)})", t["copy"], t["copy"]),
            row(f"{name} wb.random_intertwiner, steady state (map memoised)", t["steady"], t["copy"], target,
                note=miss.capitalize() + ".", profile=lambda: wb.random_intertwiner(model, seed=99)),
            row(f"{name} wb.random_intertwiner, first call on a fresh model object (map found by structure)", t["first"],
                t["copy"], target, note=f"On a model it has not seen, {miss} (this includes the torch.fx trace).",
                profile=lambda s=shell(model): wb.random_intertwiner(s, seed=99))]  # shell made untimed
    if proc_reps:  # fresh interpreters: {"copy": s, "ri": s} from each
        runs = [json.loads(subprocess.run([sys.executable, __file__, "--first-child", kind], capture_output=True,
                                          text=True, check=True).stdout.strip().splitlines()[-1])
                for _ in range(proc_reps)]
        ri, cp = [d["ri"] for d in runs], [d["copy"] for d in runs]
        rows.append(row(f"{name} wb.random_intertwiner, first call in a fresh process incl. lazy imports "
                        f"(info; ratio over that process's deep copy)", ri, cp))
    return rows


def first_child(kind: str) -> None:
    """Runs in a fresh interpreter: one deep copy, then the process's first random_intertwiner."""
    model = make(kind)
    t0 = time.perf_counter()
    copy.deepcopy(model)
    t1 = time.perf_counter()
    wb.random_intertwiner(model, seed=0)  # first access also imports workbench.symmetry
    print(json.dumps({"copy": t1 - t0, "ri": time.perf_counter() - t1}))


def bench_verify(kind: str, reps: int) -> list[dict]:
    name, model = MODELS[kind][0], make(kind)
    x = torch.randn(*MODELS[kind][1], generator=torch.Generator().manual_seed(0))
    new, t = wb.random_intertwiner(model, seed=0)  # memoises model's map
    report = wb.verify(model, new, x, transform=t)
    assert report.passed, report.summary()
    pairs = [wb.random_intertwiner(model, seed=s) for s in range(1, reps + 3)]  # fresh (new, t), made untimed

    def plain():
        with torch.no_grad():
            model(x)
            new(x)

    def fresh():
        n, tr = pairs.pop()
        wb.verify(model, n, x, transform=tr)

    tv = interleaved({"plain": plain, "verify": lambda: wb.verify(model, new, x, transform=t), "fresh": fresh},
                     reps)
    shape = "x".join(map(str, x.shape))
    return [row(f"{name} two plain forwards, no_grad ({shape})", tv["plain"], tv["plain"]),
            row(f"{name} wb.verify, same pair ({len(report.sites)} sites)", tv["verify"], tv["plain"],
                ("<=", 2.0), note="Checking a transform costs more than 2x running the two models (issue 16's bound).",
                profile=lambda: wb.verify(model, new, x, transform=t)),
            row(f"{name} wb.verify, a pair fresh from random_intertwiner (info)", tv["fresh"], tv["plain"])]


# ---------------------------------------------------------------------------------------- report
def profile(fn) -> str:
    prof = cProfile.Profile()
    prof.runcall(fn)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(15)
    text = out.getvalue().replace(str(HERE.parent) + "/", "").replace(str(Path(torch.__file__).parent.parent) + "/", "")
    return text[text.index("   ncalls"):].rstrip()


def write(rows: list[dict], profiles: dict, settings: dict, started: str) -> None:
    m = machine()
    notes = [f"- **{r['measurement']}**: {r['note']} (ratio {r['ratio']:.3f}, target {r['target']}){noise_hint(r)}."
             for r in rows if r.get("pass") is False]
    prof = [f"### {label}\n\n```\n{text}\n```\n" for label, text in profiles.items()]
    (RESULTS / "transforms.md").write_text("\n".join([
        "# Transform benchmark: random_intertwiner and verify", "",
        f"- Date: {started}",
        f"- Machine: {m['nproc']} CPUs ({m['cpu']}), torch threads {m['torch_threads']}, Python {m['python']}, "
        f"torch {m['torch']}, workbench {m['workbench']}",
        "- Rerun: `.venv/bin/python benchmarks/transforms.py`; method in the script's docstring.",
        f"- Settings: {settings}",
        f"- Load average (1 min) at start and end: {settings['load'][0]:.2f}, {os.getloadavg()[0]:.2f} "
        f"on {m['nproc']} CPUs (other users' jobs share this machine)", "",
        "Times are per call. A ratio is the median over repetitions of the row's time over the first row of "
        "its group in the same repetition (ratio of mins: fastest over fastest, least touched by noise). "
        "PASS/MISS is judged on the ratio.", "",
        table(rows), "", "## Misses", "", *(notes or ["None."]), "",
        *(["## Profiles of the misses (one call each, cProfile, top 15 by cumulative time)", "", *prof]
          if prof else []),
    ]))
    (RESULTS / "transforms.json").write_text(json.dumps({"date": started, "machine": m, "settings": settings,
                                                         "rows": rows, "profiles": profiles}, indent=1))


def vision_costs(names, reps: int, out) -> None:
    """``--vision``: random_intertwiner against copy.deepcopy on issue 17's vision models (coverage_vision.py's
    constructors and random weights), CPU time on one torch thread, min over ``reps`` calls of each,
    alternating; the target is ≤ 3×. The cost column of benchmarks/results/coverage_vision.md, measured
    the way benchmarks/performance.py measures (process CPU time; wall time on this shared 2-core machine
    mostly measures the scheduler)."""
    import warnings

    if str(HERE) not in sys.path:  # cache.py took this folder off the path (its transformers.py shadows HF's):
        sys.path.append(str(HERE))  # at the end, coverage_vision is found and transformers still is HF's
    from coverage_vision import constructors, randomised

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    ctors = constructors()
    lines = ["| model | parameters | random_intertwiner | copy.deepcopy | ratio (min/min) | median ratio | ≤ 3× |",
             "|---|---|---|---|---|---|---|"]
    for name in names or list(ctors):
        torch.manual_seed(0)
        model = randomised(ctors[name][0]())
        wb.random_intertwiner(model, seed=0)  # the map memoised, the kernels compiled or loaded
        copy.deepcopy(model)
        ts, bs = [], []
        for i in range(reps):
            t0 = time.process_time()
            copy.deepcopy(model)
            bs.append(time.process_time() - t0)
            t0 = time.process_time()
            wb.random_intertwiner(model, seed=i + 1)
            ts.append(time.process_time() - t0)
        ratios = sorted(t / b for t, b in zip(ts, bs))
        ratio = min(ts) / min(bs)
        lines.append(f"| {name} | {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M | {min(ts) * 1e3:.1f} ms | "
                     f"{min(bs) * 1e3:.1f} ms | {ratio:.2f} | {ratios[len(ratios) // 2]:.2f} | "
                     f"{'PASS' if ratio <= 3 else 'MISS'} |")
        print(lines[-1], flush=True)
    if out:
        m = machine()
        head = [f"# random_intertwiner against copy.deepcopy on issue 17's vision models", "",
                f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; machine: {m}",
                f"- Command: `python benchmarks/transforms.py --vision --vision-reps {reps}`; method in `vision_costs`",
                f"- Load average at the end: {os.getloadavg()[0]:.2f}", ""]
        Path(out).write_text("\n".join(head + lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke test: few repetitions, prints only")
    p.add_argument("--first-child", choices=list(MODELS), help=argparse.SUPPRESS)
    p.add_argument("--vision", nargs="*", metavar="MODEL", help="only the vision cost table (all models, or those named)")
    p.add_argument("--vision-reps", type=int, default=7)
    p.add_argument("--vision-out", help="also write the vision table (markdown) to this file")
    args = p.parse_args()
    if args.first_child:
        return first_child(args.first_child)
    if args.vision is not None:
        return vision_costs(args.vision, args.vision_reps, args.vision_out)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    s = dict(reps=3, process_reps=1) if args.quick else dict(reps=9, process_reps=7)
    s["load"] = [round(v, 2) for v in os.getloadavg()]
    git = lambda *a: subprocess.run(["git", *a], cwd=HERE.parent,  # noqa: E731
                                    capture_output=True, text=True).stdout.strip()
    s["commit"] = git("rev-parse", "--short", "HEAD")  # and workbench/ files changed since it, if any:
    s["uncommitted"] = git("status", "--porcelain", "--", "workbench").splitlines()
    rows = []
    for title, fn in [("(a) ResNet-18 random_intertwiner",
                       lambda: bench_intertwiner("resnet", s["reps"], s["process_reps"])),
                      ("(b) MLP random_intertwiner",
                       lambda: bench_intertwiner("mlp", s["reps"], s["process_reps"])),
                      ("(c) ResNet-18 verify", lambda: bench_verify("resnet", s["reps"])),
                      ("(c) MLP verify", lambda: bench_verify("mlp", s["reps"]))]:
        print(f"running {title} ...", flush=True)
        rows += fn()
    profiles = {}
    for r in rows:
        fn = r.pop("profile", None)
        if fn is not None and r["pass"] is False and not args.quick:
            print(f"profiling {r['measurement']} ...", flush=True)
            profiles[r["measurement"]] = profile(fn)
    print(table(rows))
    for label, text in profiles.items():
        print(f"\n{label}\n{text}")
    if not args.quick:
        write(rows, profiles, s, started)
        print(f"wrote {RESULTS / 'transforms.md'} and transforms.json")


if __name__ == "__main__":
    main()
