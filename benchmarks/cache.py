"""Benchmark of workbench's activation capture against a plain forward pass and TransformerLens.

Rerun with ``make bench`` (that is, ``.venv/bin/python benchmarks/cache.py``); ``--quick`` is a smoke
test with fewer repetitions and batches that prints the table and writes no files.

Method. Everything runs on the CPU under ``torch.no_grad()`` with torch's default thread count.
  (a) ResNet-20 for CIFAR (width 16, 3 stages of 3 BasicBlocks, Conv-BN-ReLU, ``ReLU(inplace=True)``
      and ``out += identity`` as torchvision uses, which exercise workbench's write guard: captured
      values are copied just before an in-place op writes into them), eval mode, batch 128x3x32x32.
  (b) A TransformerLens 4 ``TransformerBridge.boot_native`` model (d_model 256, 4 layers), 32x128 tokens;
      workbench and ``bridge.run_with_cache`` capture the same names.
Within one group the variants are timed side by side: every repetition runs each variant once (after
warm-up calls), in an order shuffled anew each repetition (benchmarks/_timing.py says why), so machine
noise hits all of them alike. A ratio is the median, over repetitions, of a variant's time over the plain forward's time in
the same repetition (paired, so slow drifts in machine load cancel); "ratio of mins" divides the fastest
times. The CNN group also times hand-written forward hooks that keep the same tensors (the floor cost of
holding every activation), as the transformer group times TransformerLens's own cache.
  (c) Throughput of ``wb.harvest(reduce="spatial_mean", path=tmp)`` (all names, and the 9 block outputs)
      over the same pre-made batches as a forward-only loop, interleaved per repetition likewise. A disk
      harvest fingerprints the model and each batch, and checksums every chunk file as it writes it.
  (d) Peak RSS of a disk harvest (reduce=None, three names, 4 MB chunks) over N and 10N batches, each in a
      fresh subprocess whose batches are generated on the fly; the child reports its own ``VmHWM``.
  (e) Import time: fresh interpreters run ``import torch`` alone or ``import torch, workbench``;
      the cost of workbench is the difference of the minima.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata as md
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this folder is sys.path[0], where benchmarks/transformers.py would shadow Hugging
# Face's `transformers` (which TransformerLens imports).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks._timing import cpu_name, timed  # noqa: E402

import workbench as wb  # noqa: E402
from workbench.zoo import BasicBlock, ResNet  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CNN_NAME = "layer2.1.bn2"  # mid-network BN output, later overwritten in place by `+=` and ReLU(inplace)
TL_NAME = "blocks.2.hook_resid_post"
HARVEST_FEW = "layer?.?"  # glob: the 9 BasicBlock outputs
RSS_NAMES = ["layer1.2.relu2", "layer2.2.relu2", "layer3.2.relu2"]


# ---------------------------------------------------------------------------------------- models
def make_cnn() -> nn.Module:
    torch.manual_seed(0)
    # ResNet-20 layout with torchvision's blocks (in-place ReLU and +=), one ReLU module per use.
    stages = [(BasicBlock, 3, w, 1 if i == 0 else 2) for i, w in enumerate((16, 32, 64))]
    return ResNet(stages, stem_width=16, classes=10, stem="cifar", separate_relus=True).eval()


def make_bridge() -> nn.Module:
    from workbench.models import ensure_torchvision_importable

    ensure_torchvision_importable()  # TransformerLens imports transformers, which imports torchvision (_compat.py)
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(d_model=256, d_head=32, n_heads=8, n_layers=4, n_ctx=128, d_vocab=1000,
                                  act_fn="gelu", seed=0, normalization_type="LN")
    return TransformerBridge.boot_native(cfg).eval()


def cnn_batches(n: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.randn(batch, 3, 32, 32, generator=g)


# ---------------------------------------------------------------------------------------- timing
def interleaved(variants: dict, reps: int, warmup: int = 2) -> dict[str, list[float]]:
    """Wall seconds per call of each variant (this script judges throughput, where a background writer
    overlaps the forward): benchmarks/_timing.py's loop, the wall clock of it."""
    return {k: v["wall"] for k, v in timed(variants, reps, warmup).items()}


def row(label, times=None, base=None, target=None, ratio=None, unit="s", **extra) -> dict:
    r = {"measurement": label, "unit": unit, "samples": times, **extra}
    if times:
        r["median"], r["min"] = statistics.median(times), min(times)
    if ratio is None and base is not None:  # paired: each repetition's time over its own baseline's
        ratio = statistics.median(a / b for a, b in zip(times, base))
        r["ratio_min"] = r["min"] / min(base)
    r["ratio"] = ratio
    if target is not None:
        op, bound = target
        r["target"] = f"{op} {bound}"
        r["pass"] = ratio <= bound if op == "<=" else ratio >= bound
    return r


# ---------------------------------------------------------------------------------------- groups
def bench_cnn(reps: int) -> list[dict]:
    model, x = make_cnn(), next(cnn_batches(1, 128))
    fresh = iter([copy.deepcopy(model) for _ in range(reps + 2)])  # one per call, made before timing

    def cap(m, names):
        with wb.capture(m, names=names) as cache:
            m(x)
        return cache

    def by_hand():  # the floor: keep every output, copy the 19 BN outputs that in-place ops overwrite
        store, named = {}, [(n, mod) for n, mod in model.named_modules() if n]
        handles = [mod.register_forward_hook(lambda _, a, o, n=n: store.__setitem__(
            n, o.clone() if n.endswith(("bn1", "bn2")) else o)) for n, mod in named]
        model(x)
        for h in handles:
            h.remove()
        return store

    # On a model it has not seen: nothing learned yet; the write guard copies CNN_NAME before `+=` writes
    # into it (this row was 2x when the core re-ran the forward to recover overwritten values).
    t = interleaved({"plain": lambda: model(x), "one": lambda: cap(model, CNN_NAME), "all": lambda: cap(model, None),
                     "hand": by_hand, "first": lambda: cap(next(fresh), CNN_NAME)}, reps)
    rows = [
        row("CNN plain forward (b128)", t["plain"], t["plain"]),
        row(f"CNN wb.capture one name ({CNN_NAME})", t["one"], t["plain"], ("<=", 1.05)),
        row(f"CNN wb.capture all names ({len(cap(model, None))})", t["all"], t["plain"], ("<=", 1.15)),
        row("CNN hand-written hooks keeping the same tensors (reference)", t["hand"], t["plain"]),
        row("CNN wb.capture one name, first call on a fresh model (info)", t["first"], t["plain"]),
    ]
    rows[2]["reference"] = rows[3]["ratio"]
    return rows


def bench_tl(reps: int) -> list[dict]:
    model = make_bridge()
    x = torch.randint(0, 1000, (32, 128), generator=torch.Generator().manual_seed(0))
    all_names = set(wb.run_with_cache(model, x[:1], names=None)[1].names)
    one_name = {TL_NAME}
    t = interleaved({
        "plain": lambda: model(x),
        "wb_one": lambda: wb.run_with_cache(model, x, names=TL_NAME),
        "wb_all": lambda: wb.run_with_cache(model, x, names=None),
        "tl_one": lambda: model.run_with_cache(x, names_filter=lambda n: n in one_name),
        "tl_all": lambda: model.run_with_cache(x, names_filter=lambda n: n in all_names),
    }, reps)
    rows = [
        row("TL bridge plain forward (32x128)", t["plain"], t["plain"]),
        row(f"TL wb.run_with_cache one name ({TL_NAME})", t["wb_one"], t["plain"], ("<=", 1.05)),
        row("TL bridge.run_with_cache one name (reference)", t["tl_one"], t["plain"]),
        row(f"TL wb.run_with_cache all names ({len(all_names)})", t["wb_all"], t["plain"], ("<=", 1.15)),
        row(f"TL bridge.run_with_cache same {len(all_names)} names (reference)", t["tl_all"], t["plain"]),
    ]
    rows[3]["reference"] = rows[4]["ratio"]
    return rows


def bench_harvest(reps: int, n_batches: int) -> list[dict]:
    model, batches = make_cnn(), list(cnn_batches(n_batches, 128, seed=1))
    tmp, counter = Path(tempfile.mkdtemp(prefix="wb-bench-harvest-")), iter(range(10**9))

    def forward_only():
        for b in batches:
            model(b)

    def harvest(names):
        path = tmp / f"run-{next(counter)}"
        wb.harvest(model, batches, names=names, reduce="spatial_mean", path=path, progress=False)
        shutil.rmtree(path)

    try:
        t = interleaved({"forward": forward_only, "all": lambda: harvest(None),
                         "blocks": lambda: harvest(HARVEST_FEW)}, reps, warmup=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rate = lambda k: n_batches * 128 / statistics.median(t[k])  # noqa: E731
    out = [row(f"CNN forward-only, {n_batches} batches x128 ({rate('forward'):,.0f} rows/s)", t["forward"])]
    for k, what in (("all", "all names"), ("blocks", f"the 9 block outputs {HARVEST_FEW!r}")):
        paired = statistics.median(f / h for f, h in zip(t["forward"], t[k]))  # throughput ratio
        out.append(row(f"CNN wb.harvest spatial_mean to disk, {what} ({rate(k):,.0f} rows/s); ratio = throughput",
                       t[k], ratio=paired, target=(">=", 0.9), ratio_min=min(t["forward"]) / min(t[k])))
    return out


def peak_rss_kb() -> int:
    """This process's peak RSS (Linux ``VmHWM``). Not ``ru_maxrss``: Linux carries that over ``execve``, so
    a child would report the peak of the benchmark parent (about 1 GiB) instead of its own."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def rss_child(n_batches: int) -> None:
    """Runs in a fresh interpreter: a disk harvest over generated batches; prints its peak RSS."""
    model = make_cnn()
    with torch.no_grad():
        model(next(cnn_batches(1, 64)))
        before = peak_rss_kb()
        tmp = tempfile.mkdtemp(prefix="wb-bench-rss-")
        try:
            store = wb.harvest(model, cnn_batches(n_batches, 64), names=RSS_NAMES, reduce=None,
                               path=Path(tmp) / "store", progress=False, chunk_bytes="4MB")
            chunks = len(list((Path(tmp) / "store").glob("chunk-*")))
            info = {"rows": len(store), "bytes": store.nbytes, "chunks": chunks}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    peak = peak_rss_kb()
    print(json.dumps({"before_kb": before, "peak_kb": peak, **info}))


def bench_rss(n: int) -> list[dict]:
    out = []
    for k in (n, 10 * n):
        proc = subprocess.run([sys.executable, __file__, "--rss-child", str(k)], capture_output=True,
                              text=True, check=True, cwd=ROOT)
        d = json.loads(proc.stdout.strip().splitlines()[-1])
        label = (f"peak RSS, disk harvest of {k} batches x64 (store {d['bytes'] / 2**20:,.0f} MiB in "
                 f"{d['chunks']} chunks; {d['before_kb'] / 1024:,.0f} MiB before the harvest)")
        out.append(row(label + (f"; ratio to {n} batches" if out else ""), [d["peak_kb"] / 1024], unit="MiB",
                       raw=d, **({"ratio": d["peak_kb"] / out[0]["raw"]["peak_kb"], "target": ("<=", 1.10)}
                                 if out else {})))
    return out


def bench_import(reps: int) -> list[dict]:
    code = "import time; t = time.perf_counter(); import torch{}; print(time.perf_counter() - t)"
    run = lambda extra: float(subprocess.run([sys.executable, "-c", code.format(extra)], cwd=ROOT,  # noqa: E731
                                             capture_output=True, text=True, check=True).stdout)
    t = interleaved({"torch": lambda: run(""), "both": lambda: run("; import workbench")}, reps, warmup=1)
    return [row("import torch (fresh interpreter)", t["torch"]),
            row("import torch, workbench; ratio = seconds added (min - min)", t["both"],
                ratio=min(t["both"]) - min(t["torch"]), target=("<=", 1.0))]


# ---------------------------------------------------------------------------------------- report
def fmt(v, unit):
    if v is None:
        return ""
    return f"{v:,.0f} MiB" if unit == "MiB" else (f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s")


MISS_NOTES = {  # first matching key wins
    "harvest": "Harvesting to disk runs at less than 90% of the speed of the forward passes alone.",
    "RSS": "Peak memory of a disk harvest grows with the number of batches instead of staying flat.",
    "import": "Importing workbench adds more than a second on top of importing torch.",
    "one name": "Capturing a single activation costs more than 5% over a plain forward pass.",
    "all names": "Capturing every activation costs more than 15% over a plain forward pass.",
}


def noise_hint(r: dict) -> str:
    rm = r.get("ratio_min")
    if rm is None:
        return ""
    op, bound = r["target"].split()
    ok = rm <= float(bound) if op == "<=" else rm >= float(bound)
    ref = f"; the reference row below it costs {r['reference']:.3f}x" if "reference" in r else ""
    return ref + (f"; the fastest runs do meet it (ratio of mins {rm:.3f}), so machine noise may explain it"
                  if ok else f"; the fastest runs miss it too (ratio of mins {rm:.3f}), so the cost is real")


def table(rows: list[dict]) -> str:
    lines = ["| measurement | median | min | ratio | ratio of mins | target | result |",
             "|---|---|---|---|---|---|---|"]
    num = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    for r in rows:
        result = "" if "pass" not in r else ("PASS" if r["pass"] else "MISS")
        lines.append(f"| {r['measurement']} | {fmt(r.get('median'), r['unit'])} | {fmt(r.get('min'), r['unit'])} "
                     f"| {num(r.get('ratio'))} | {num(r.get('ratio_min'))} | {r.get('target', '')} | {result} |")
    return "\n".join(lines)


def machine() -> dict:
    return {"nproc": os.cpu_count(), "cpu": cpu_name(), "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "torch": torch.__version__,
            "transformer_lens": md.version("transformer-lens"), "workbench": wb.__version__}


def write(rows: list[dict], settings: dict, started: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    m = machine()
    misses = [r for r in rows if r.get("pass") is False]
    notes = [f"- **{r['measurement']}**: {next(v for k, v in MISS_NOTES.items() if k in r['measurement'])} "
             f"(ratio {r['ratio']:.3f}, target {r['target']}){noise_hint(r)}." for r in misses]
    md_text = "\n".join([
        "# Activation-capture benchmark", "",
        f"- Date: {started}",
        f"- Machine: {m['nproc']} CPUs ({m['cpu']}), torch threads {m['torch_threads']}, Python {m['python']}, "
        f"torch {m['torch']}, TransformerLens {m['transformer_lens']}, workbench {m['workbench']}",
        "- Rerun: `make bench` (runs `.venv/bin/python benchmarks/cache.py`); method in the script's docstring.",
        f"- Settings: {settings}",
        f"- Load average (1 min) at start / end: {settings['load'][0]:.2f} / {settings['load'][1]:.2f} (above "
        f"{m['nproc']}, other processes were competing for the CPUs)", "",
        "Times are per call (per pass over all batches for harvest). A ratio is the median over repetitions "
        "of the row's time over the plain forward's time in the same repetition (ratio of mins: fastest over "
        "fastest, least touched by noise), except where the row says otherwise. PASS/MISS is judged on the "
        "ratio.", "",
        table(rows), "",
        "## Misses", "", *(notes or ["None."]), "",
    ])
    (RESULTS / "cache.md").write_text(md_text)
    (RESULTS / "cache.json").write_text(json.dumps({"date": started, "machine": m, "settings": settings,
                                                    "rows": rows}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke test: few repetitions, prints only")
    p.add_argument("--rss-child", type=int, metavar="BATCHES", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child is not None:
        return rss_child(args.rss_child)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    s = (dict(reps=3, harvest_reps=2, harvest_batches=10, rss_n=4, import_reps=2) if args.quick else
         dict(reps=11, harvest_reps=7, harvest_batches=50, rss_n=20, import_reps=7))
    rows, load = [], os.getloadavg()[0]
    with torch.no_grad():
        for title, fn in [("(a) CNN", lambda: bench_cnn(s["reps"])),
                          ("(b) TransformerBridge", lambda: bench_tl(s["reps"])),
                          ("(c) harvest", lambda: bench_harvest(s["harvest_reps"], s["harvest_batches"]))]:
            print(f"running {title} ...", flush=True)
            rows += fn()
    print("running (d) RSS and (e) import ...", flush=True)
    rows += bench_rss(s["rss_n"]) + bench_import(s["import_reps"])
    print(table(rows))
    s["load"] = (load, os.getloadavg()[0])
    if not args.quick:
        write(rows, s, started)
        print(f"wrote {RESULTS / 'cache.md'} and cache.json")


if __name__ == "__main__":
    main()
