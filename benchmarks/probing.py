"""Benchmark of the privileged-basis test's random-basis null against scikit-learn and the matmul bound.

Rerun with ``.venv/bin/python benchmarks/probing.py`` (nice it on a shared machine); ``--quick`` is a
smoke test with a smaller problem that prints the table and writes no files.

Problem (the issue's): N = 10,000 examples, d = 256 units, 20 binary concepts, 200 Haar rotations;
the statistic is each concept's best unit's |AUROC − 0.5| in every rotated basis.
  (a) workbench: ``wb.probing.privileged_basis_test(bases=["orthogonal"], n_bases=200)`` — everything,
      from sampling the rotations to the p-values. Minimum over ``reps`` runs.
  (b) the loop a user would write: for each rotation, project, then ``sklearn.metrics.roc_auc_score``
      for every unit and concept. Measured on a subsample (``loop_bases`` rotations × ``loop_units``
      units × 20 concepts, min over ``reps``) and scaled to 200 × 256 × 20 calls; projections scaled
      to 200 rotations. Ratio = scaled loop time / workbench time.
  (c) projection step: the workbench's stream of rotated activations (sampling, stacking, the one
      matmul per chunk) against the bare ``torch.matmul`` of the same shapes with pre-made matrices in
      the same run (the machine's matmul bound). Min over ``reps`` each, measured side by side.
  (d) peak RSS (``VmHWM``) of fresh child processes running (a) with different ``n_bases``: streaming
      means the peak must not grow with the number of bases. The first few dozen bases warm the
      allocator (freed 20 MB buffers are reused from the heap), so the target compares the two largest
      counts, and the smallest is listed to show the warm-up.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import workbench as wb  # noqa: E402
from workbench.probing import privileged_basis_test  # noqa: E402
from workbench.probing._null import chunk_size, family_generator, projected  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MISS_NOTE = (
    "- **peak RSS growth**: the null is streamed one chunk at a time (here one basis per chunk, "
    "`chunk_size(10000, 256, ·) = 1`), and an instrumented loop over the same stream and statistic kept "
    "its peak flat at 594 MiB through 300 bases; yet whole-test child processes peak higher with more "
    "bases and vary between runs (200 bases: 632, 707 MiB; 300 bases: 631 and once 1,742 MiB). With "
    "`MALLOC_MMAP_THRESHOLD_=4194304` (large buffers mmapped, returned on free) 50 → 200 bases still "
    "went +146 → +320 MiB, so it is not glibc heap fragmentation alone. Cause not found yet; open.")


def problem(N: int, d: int, K: int, seed: int = 0):
    """ReLU-like activations with a few concept-carrying units (ties at zero, as real layers have)."""
    g = torch.Generator().manual_seed(seed)
    Y = torch.rand(N, K, generator=g) < 0.3
    X = torch.randn(N, d, generator=g, dtype=torch.float64)
    X[:, :K] += 1.0 * Y
    return X.relu().float(), Y


def best_of(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_null(X, Y, n_bases: int, reps: int) -> float:
    return best_of(lambda: privileged_basis_test(X, Y, bases=["orthogonal"], n_bases=n_bases, seed=0), reps)


def bench_loop(X, Y, n_bases: int, loop_bases: int, loop_units: int, reps: int) -> tuple[float, float]:
    """Scaled seconds of the sklearn loop, and the measured per-call time."""
    from sklearn.metrics import roc_auc_score

    d, K = X.shape[1], Y.shape[1]
    Xd, y = X.double(), Y.numpy()
    Qs = [wb.get_group("orthogonal", d).sample(seed=s) for s in range(loop_bases)]

    def project():
        return [Q.act(Xd, dim=1).numpy() for Q in Qs]

    def loop():
        for Z in project():
            for j in range(loop_units):
                for k in range(K):
                    roc_auc_score(y[:, k], Z[:, j])

    t_proj, t_all = best_of(project, reps), best_of(loop, reps)
    per_call = (t_all - t_proj) / (loop_bases * loop_units * K)
    return per_call * n_bases * d * K + t_proj / loop_bases * n_bases, per_call


def bench_projection(X, n_bases: int, reps: int) -> tuple[float, float]:
    Xd = X.double()
    N, d = Xd.shape
    G = wb.get_group("orthogonal", d)

    def stream():
        for _ in projected(Xd, G, n_bases, family_generator(0, G)):
            pass

    c = chunk_size(N, d, n_bases)
    Xt = Xd.T.contiguous()
    mats = [torch.randn(m * d, d, dtype=torch.float64) for m in [c] * (n_bases // c) + ([n_bases % c] if n_bases % c else [])]

    def bound():
        for W in mats:
            W @ Xt

    # side by side: alternate so load changes hit both
    ts, tb = [], []
    for _ in range(reps):
        ts.append(best_of(stream, 1))
        tb.append(best_of(bound, 1))
    return min(ts), min(tb)


def peak_rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def rss_child(n_bases: int, N: int, d: int, K: int) -> None:
    X, Y = problem(N, d, K)
    before = peak_rss_kb()
    privileged_basis_test(X, Y, bases=["orthogonal"], n_bases=n_bases, seed=0)
    print(before, peak_rss_kb())


def bench_rss(counts, N, d, K) -> list[tuple[int, int, int]]:
    out = []
    for n in counts:
        res = subprocess.run([sys.executable, __file__, "--rss-child", str(n), str(N), str(d), str(K)],
                             capture_output=True, text=True, check=True)
        before, peak = map(int, res.stdout.split())
        out.append((n, before, peak))
    return out


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    import sklearn

    return (f"{os.cpu_count()} CPUs ({cpu}), torch threads {torch.get_num_threads()}, Python "
            f"{sys.version.split()[0]}, torch {torch.__version__}, numpy {np.__version__}, scikit-learn "
            f"{sklearn.__version__}, workbench {wb.__version__}")


def fmt_s(t: float) -> str:
    return f"{t:.3g} s" if t < 100 else f"{t:,.0f} s"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke test: small problem, prints only")
    p.add_argument("--reps", type=int, help="repetitions of each timing (default 3; min is reported)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    p.add_argument("--rss-child", nargs=4, type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rss_child:
        return rss_child(*a.rss_child)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    s = (dict(N=2000, d=64, K=5, n_bases=20, reps=2, loop_bases=1, loop_units=8, rss=(5, 20, 60)) if a.quick else
         dict(N=10_000, d=256, K=20, n_bases=200, reps=3, loop_bases=2, loop_units=16, rss=(10, 50, 200)))
    if a.reps:
        s["reps"] = a.reps
    if a.threads:
        torch.set_num_threads(a.threads)
        s["threads"] = a.threads
    load = os.getloadavg()[0]
    X, Y = problem(s["N"], s["d"], s["K"])
    print("running (a) workbench null ...", flush=True)
    t_wb = bench_null(X, Y, s["n_bases"], s["reps"])
    print("running (b) sklearn loop on a subsample ...", flush=True)
    t_loop, per_call = bench_loop(X, Y, s["n_bases"], s["loop_bases"], s["loop_units"], s["reps"])
    print("running (c) projection vs matmul bound ...", flush=True)
    t_proj, t_bound = bench_projection(X, s["n_bases"], s["reps"])
    print("running (d) peak RSS ...", flush=True)
    rss = bench_rss(s["rss"], s["N"], s["d"], s["K"])
    s["load"] = (round(load, 2), round(os.getloadavg()[0], 2))
    speedup, proj_ratio = t_loop / t_wb, t_proj / t_bound
    # growth after warm-up: the allocator's pools settle within the first few dozen bases (+~60 MiB at
    # this size, whatever follows), so the target compares the last two counts; the first is listed too
    rss_ratio = (rss[-1][2] - rss[-1][1]) / max(1, rss[-2][2] - rss[-2][1])
    calls = s["n_bases"] * s["d"] * s["K"]
    rows = [
        ("(a) workbench null, min of runs", fmt_s(t_wb), "", "", ""),
        (f"(b) sklearn roc_auc_score loop, {calls:,} calls ({per_call * 1e3:.2f} ms each, scaled from "
         f"{s['loop_bases'] * s['loop_units'] * s['K']})", fmt_s(t_loop), f"{speedup:.0f}× faster", ">= 50×",
         "PASS" if speedup >= 50 else "MISS"),
        ("(c) projection step (sample, stack, matmul)", fmt_s(t_proj), f"{proj_ratio:.2f}× the bound", "<= 5×",
         "PASS" if proj_ratio <= 5 else "MISS"),
        ("(c) bare torch.matmul of the same shapes (bound)", fmt_s(t_bound), "", "", ""),
        *[(f"(d) peak RSS, n_bases = {n} (before the test: {b / 1024:.0f} MiB)", f"{pk / 1024:.0f} MiB",
           f"+{(pk - b) / 1024:.0f} MiB", "", "") for n, b, pk in rss],
        (f"(d) growth of the test's peak from n_bases = {rss[-2][0]} to {rss[-1][0]}", "", f"{rss_ratio:.2f}×",
         "<= 1.1×", "PASS" if rss_ratio <= 1.1 else "MISS"),
    ]
    table = "\n".join(["| measurement | time / memory | ratio | target | result |", "|---|---|---|---|---|"]
                      + ["| " + " | ".join(r) + " |" for r in rows])
    print(table)
    if a.quick:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "probing.md").write_text("\n".join([
        "# Privileged-basis test benchmark", "",
        f"- Date: {started}", f"- Machine: {machine()}",
        "- Rerun: `nice -n 10 .venv/bin/python benchmarks/probing.py`; method in the script's docstring.",
        f"- Settings: {s}",
        f"- Load average (1 min) at start / end: {s['load'][0]} / {s['load'][1]} (above {os.cpu_count()}: other "
        "processes were competing for the CPUs)", "",
        f"Where the time goes: the projection is {t_proj / t_wb:.0%} of the workbench's null; the rest is "
        "ranking (one argsort per unit and basis) and the rank-sum product.", "",
        table, "", "## Misses", "",
        *([MISS_NOTE] if rss_ratio > 1.1 else []), *(["None."] if rss_ratio <= 1.1 and speedup >= 50
                                                      and proj_ratio <= 5 else []), ""]))
    print(f"wrote {RESULTS / 'probing.md'}")


if __name__ == "__main__":
    main()
