"""Issue 21's four targets, each a ratio to a baseline timed in the same run, interleaved, min of N.

    .venv/bin/python benchmarks/performance.py            # writes benchmarks/results/performance.{md,json}
    .venv/bin/python benchmarks/performance.py --quick    # smoke test: few repetitions, prints only

| target | measure | baseline |
|---|---|---|
| 1 capture | ``wb.capture`` of every name of a CNN, one forward | the plain forward; hand-written hooks keeping the same tensors (bracketed by hooks keeping references only and hooks copying every value) |
| 2 harvest | ``wb.harvest(reduce=None, path=…)`` of every name over N batches | the same forwards with hand-written hooks and ``np.save`` of the same bytes |
| 3 verify | ``wb.verify`` of a transformed CNN with BatchNorm, repeated on one batch and of a new transform each call | the two models' plain forwards |
| 4 transform | ``wb.random_intertwiner`` of a 5.3M-parameter MLP, repeated, on a fresh object of a seen architecture, on a never-seen one | ``copy.deepcopy`` |

Method. Every variant of a group runs once per repetition, in an order shuffled anew each repetition
(seeded; ``timed`` says why a rotated order was biased), after warm-up calls. Each call records its
wall time and this process's CPU time (user + system, which includes page faults). Ratios are minimum
over minimum, with the median of the per-repetition ratios beside them. Compute groups (1, 3, 4) run on
one torch thread and are judged on CPU time: this machine has 2 cores and a load average of 7 to 10
from other users' jobs, so a wall clock mostly measures the scheduler (a two-thread forward waits at
every OpenMP barrier for a thread that is not running), while CPU time measures the work. Harvest (2)
is judged on wall time, because it overlaps computing with disk writes on a background thread, which
CPU time cannot show. The load average is recorded at the start and end of each group.

``--device cuda`` runs groups 1-3 on a GPU (benchmarks/gpu.py is the one-command GPU check); the
timings then synchronise the device before reading the clock.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# This folder holds a `transformers.py`, which would shadow Hugging Face's package: keep it off the path.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import workbench as wb  # noqa: E402
from workbench.zoo import BasicBlock, ResNet, resnet18  # noqa: E402

RESULTS = HERE / "results"


# ---------------------------------------------------------------------------------------- models
def cnn26() -> nn.Module:
    """A plain VGG-style CNN with BatchNorm and no in-place op: 26 hook names, 32×32 inputs."""
    torch.manual_seed(0)
    layers, c = [], 3
    for i, w in enumerate((32, 32, 64, 64, 128, 128, 128)):
        layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
        if i in (1, 3, 5):
            layers.append(nn.MaxPool2d(2))
        c = w
    layers += [nn.Flatten(), nn.Linear(c * 4 * 4, 10)]
    return _randomise(nn.Sequential(*layers)).eval()


def resnet20() -> nn.Module:
    """ResNet-20 for CIFAR with torchvision's blocks (``ReLU(inplace=True)``, ``out += identity``): 78 names."""
    torch.manual_seed(0)
    stages = [(BasicBlock, 3, w, 1 if i == 0 else 2) for i, w in enumerate((16, 32, 64))]
    return _randomise(ResNet(stages, stem_width=16, classes=10, stem="cifar", separate_relus=True)).eval()


def mlp(dims=(512, 2048, 2048, 10)) -> nn.Module:
    """Linear-ReLU MLP; the default has 5.27M parameters."""
    torch.manual_seed(0)
    return nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())][:-1]).eval()


def _randomise(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def overwritten_in_place(model: nn.Module, x: torch.Tensor) -> set[str]:
    """Names whose output a later in-place op overwrites: what hand-written hooks must clone (the values
    the capture's write guard had to copy)."""
    from workbench.hooks._capture import _Capture

    core = _Capture(model, None, device=None, budget=None)
    core.attach()
    try:
        with torch.no_grad():
            model(x)
        held = {id(rec[2]) for recs in core._watch.values() for rec in recs}  # values kept by reference
        return {k for k, calls in core.calls.items() if any(id(t) not in held for t in calls)}
    finally:
        core.detach()


def hand_hooks(model: nn.Module, clone: set[str], to_cpu: bool = False):
    """Hand-written forward hooks keeping every module's output (cloned where an in-place op follows)."""
    named = [(n, m) for n, m in model.named_modules() if n]

    def run(x):
        store = {}

        def keep(name):
            def hook(module, args, out):
                t = out.detach()
                store[name] = (t.to("cpu") if to_cpu else t.clone()) if name in clone or (to_cpu and t.is_cuda) else t
            return hook
        handles = [m.register_forward_hook(keep(n)) for n, m in named]
        try:
            model(x)
        finally:
            for h in handles:
                h.remove()
        return store
    return run


# ---------------------------------------------------------------------------------------- timing
# One loop for every benchmark (benchmarks/_timing.py): interleaved, wall and CPU clocks.
from benchmarks._timing import cpu_name, synchronize, timed  # noqa: E402,F401


def row(label: str, t: dict, base: dict, clock: str, target=None, **extra) -> dict:
    """One table row: the variant's minimum over the baseline's minimum (``ratio``), on ``clock``."""
    a, b = t[clock], base[clock]
    r = {"measurement": label, "clock": clock, "min_s": min(a), "median_s": statistics.median(a),
         "base_min_s": min(b), "ratio": min(a) / min(b),
         "ratio_median": statistics.median(x / y for x, y in zip(a, b)),
         "wall_ratio": min(t["wall"]) / min(base["wall"]), "cpu_ratio": min(t["cpu"]) / min(base["cpu"]),
         "samples": t, **extra}
    if target is not None:
        r["target"], r["pass"] = f"<= {target}", r["ratio"] <= target
    return r


def load() -> float:
    return round(os.getloadavg()[0], 2)


# ---------------------------------------------------------------------------------------- groups
def bench_capture(reps: int, device: torch.device, batch: int = 128) -> list[dict]:
    rows = []
    for name, make in (("CNN-26 (no in-place ops)", cnn26), ("ResNet-20 (in-place ReLU and +=)", resnet20)):
        model = make().to(device)
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
        clone = overwritten_in_place(model, x)
        hand = hand_hooks(model, clone)
        names = {n for n, _ in model.named_modules() if n}
        # Two more hand-written baselines bracket the one above, which is told by the capture's own write
        # guard which names a later in-place op overwrites: hooks that keep references only (no copies:
        # the overwritten values are wrong, so this is the memory floor of keeping every value, not a way
        # to capture), and hooks that copy every value (what a hook must do to be right without that
        # knowledge).
        refs, clone_all = hand_hooks(model, set()), hand_hooks(model, names)
        n_names = len(wb.hook_names(model))

        def cap(where):
            with wb.capture(model, names=None, device=where) as cache:
                model(x)
            return cache

        variants = {"plain": lambda: model(x), "capture": lambda: cap(None), "hand": lambda: hand(x),
                    "refs": lambda: refs(x), "clone_all": lambda: clone_all(x)}
        if device.type == "cuda":
            variants["capture_cpu"] = lambda: cap("cpu")  # streamed to pinned host memory
        l0 = load()
        with torch.no_grad():
            t = timed(variants, reps, device=device)
        clock = "cpu" if device.type == "cpu" else "wall"
        what = f"{name}, b{batch}, {n_names} names"
        rows += [row(f"{what}: plain forward", t["plain"], t["plain"], clock, load=[l0, load()]),
                 row(f"{what}: hand-written hooks keeping references only ("
                     + (f"{len(clone)} of the values overwritten later, so wrong" if clone else "none overwritten here")
                     + ": the memory floor)", t["refs"], t["plain"], clock),
                 row(f"{what}: hand-written hooks copying every value ({len(names)} cloned: right without "
                     f"knowing which are overwritten)", t["clone_all"], t["plain"], clock),
                 row(f"{what}: hand-written hooks keeping the same tensors ({len(clone)} cloned: those the capture found "
                     f"overwritten)", t["hand"],
                     t["plain"], clock),
                 row(f"{what}: wb.capture every name", t["capture"], t["plain"], clock, target=1.10,
                     below_hand=min(t["capture"][clock]) < min(t["hand"][clock]))]
        if "capture_cpu" in t:
            rows.append(row(f"{what}: wb.capture every name, device='cpu' (pinned, asynchronous)",
                            t["capture_cpu"], t["plain"], clock))
    return rows


def disk_speed(folder: Path, nbytes: int = 256 * 2**20) -> dict:
    """GB/s of one large write, with and without fsync, into ``folder`` (best of 3)."""
    data = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    best = {"write": 0.0, "write+fsync": 0.0}
    for _ in range(3):
        path = folder / "speed.bin"
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            f.write(memoryview(data))
            f.flush()
            t1 = time.perf_counter()
            os.fsync(f.fileno())
        t2 = time.perf_counter()
        path.unlink()
        best["write"] = max(best["write"], nbytes / (t1 - t0) / 1e9)
        best["write+fsync"] = max(best["write+fsync"], nbytes / (t2 - t0) / 1e9)
    return best


def bench_harvest(reps: int, device: torch.device, n_batches: int = 6, batch: int = 64) -> list[dict]:
    model = cnn26().to(device)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(n_batches)]
    if device.type == "cuda":
        batches = [b.pin_memory() for b in batches]
    clone = overwritten_in_place(model, batches[0].to(device))
    hand = hand_hooks(model, clone, to_cpu=True)
    tmp = Path(tempfile.mkdtemp(prefix="wb-bench-harvest-", dir=os.environ.get("WB_BENCH_TMP")))
    counter = itertools.count()
    nbytes = sum(t.numel() * t.element_size() for t in hand(batches[0].to(device)).values()) * n_batches

    def forward_only():
        with torch.no_grad():
            for b in batches:
                model(b.to(device, non_blocking=True))

    def by_hand(durable: bool):
        folder = tmp / f"hand-{next(counter)}"
        folder.mkdir()
        with torch.no_grad():
            for i, b in enumerate(batches):
                for name, t in hand(b.to(device, non_blocking=True)).items():
                    path = folder / f"{i}-{name}.npy"
                    np.save(path, t.cpu().numpy())
                    if durable:
                        with open(path, "rb+") as f:
                            os.fsync(f.fileno())

    def harvest(durable: bool):
        folder = tmp / f"store-{next(counter)}"
        wb.harvest(model, batches, names=None, reduce=None, path=folder, progress=False,
                   **_supported(wb.harvest, durable=durable, device=device))

    def clean():  # untimed: deleting hundreds of MiB is slow here, and no part of either variant
        for folder in list(tmp.iterdir()):
            shutil.rmtree(folder)

    try:
        speed = disk_speed(tmp)
        l0 = load()
        t = timed({"forward": forward_only, "hand": lambda: by_hand(False), "hand_fsync": lambda: by_hand(True),
                   "harvest": lambda: harvest(False), "harvest_durable": lambda: harvest(True)}, reps, warmup=1,
                  device=device, after=clean)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gbps = lambda k: nbytes / min(t[k]["wall"]) / 1e9  # noqa: E731
    what = f"CNN-26 all names, reduce=None, {n_batches} batches x{batch} ({nbytes / 2**20:,.0f} MiB)"
    note = (f"disk (this folder): {speed['write']:.2f} GB/s write, {speed['write+fsync']:.2f} GB/s write+fsync; "
            f"forward alone {nbytes / min(t['forward']['wall']) / 1e9:.2f} GB/s of activations")
    return [
        row(f"{what}: forwards only", t["forward"], t["forward"], "wall", load=[l0, load()], disk=speed, note=note),
        row(f"{what}: hand-written hooks + np.save ({gbps('hand'):.2f} GB/s)", t["hand"], t["forward"], "wall"),
        row(f"{what}: wb.harvest durable=False ({gbps('harvest'):.2f} GB/s) / hand + np.save", t["harvest"],
            t["hand"], "wall", target=1.10),
        row(f"{what}: hand-written hooks + np.save + fsync ({gbps('hand_fsync'):.2f} GB/s)", t["hand_fsync"],
            t["forward"], "wall"),
        row(f"{what}: wb.harvest durable=True, the default ({gbps('harvest_durable'):.2f} GB/s) / hand + np.save "
            f"+ fsync", t["harvest_durable"], t["hand_fsync"], "wall", target=1.10),
        row(f"{what}: wb.harvest durable=True / max(forwards, hand-written writes)", t["harvest_durable"],
            {c: [max(a, b - f) for a, b, f in zip(t["forward"][c], t["hand_fsync"][c], t["forward"][c])]
             for c in ("wall", "cpu")}, "wall"),
    ]


def _supported(fn, **kwargs) -> dict:
    """The keyword arguments ``fn`` takes (so this script also times workbench versions before issue 21)."""
    import inspect

    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def bench_verify(reps: int, device: torch.device, small: bool = False) -> list[dict]:
    rows = []
    shapes = ((2, 3, 32, 32), (4, 3, 32, 32)) if small else ((8, 3, 64, 64), (32, 3, 32, 32))
    for (name, make), shape in zip((("ResNet-18", resnet18), ("CNN-26", cnn26)), shapes):
        torch.manual_seed(0)  # the same weights in every run: which rows verify's floor needs depends on them
        model = make().eval().to(device)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device)
        new, tr = wb.random_intertwiner(model, seed=0, example=x)
        report = wb.verify(model, new, x, transform=tr)  # its verdict is recorded, not asserted (see the notes)

        def plain():
            with torch.no_grad():
                model(x)
                new(x)

        # A new transform for every call (made untimed), on the same original and batch: the whole-pair memo of
        # the worst rows' floor forwards never applies, but rows verify has already measured alone are recalled
        # (_verify_floor), as in a user's sweep over transforms of one model.
        pool = [wb.random_intertwiner(model, seed=s, example=x) for s in range(1, reps + 4)]

        def first():
            other, t_other = pool.pop()
            return wb.verify(model, other, x, transform=t_other)

        # A fresh original object each call (a shell sharing the tensors, made untimed) and its own transform:
        # nothing verify keeps applies, so its float copies and floor forwards are all made: a user's first call.
        fresh_pool = []
        for s in range(reps + 4):
            m = shell(model)
            fresh_pool.append((m,) + tuple(wb.random_intertwiner(m, seed=100 + s, example=x)))

        def fresh():
            m, other, t_other = fresh_pool.pop()
            return wb.verify(m, other, x, transform=t_other)

        l0 = load()
        t = timed({"plain": plain, "verify": lambda: wb.verify(model, new, x, transform=tr), "first": first,
                   "fresh": fresh}, reps, device=device)
        del pool, fresh_pool
        clock = "cpu" if device.type == "cpu" else "wall"
        what = f"{name} {'x'.join(map(str, shape))}"
        rows += [row(f"{what}: two plain forwards (no_grad)", t["plain"], t["plain"], clock, load=[l0, load()]),
                 row(f"{what}: wb.verify, repeated on the same models and batch ({len(report.checked)} sites checked, "
                     f"verdict {report.verdict})", t["verify"], t["plain"], clock, target=1.3,
                     verdict=report.summary()),
                 row(f"{what}: wb.verify of a new transform each call, same model and batch (rows measured "
                     f"before are recalled)", t["first"], t["plain"], clock, target=1.3),
                 row(f"{what}: wb.verify, first call on a fresh model object (float copies and floor forwards made; "
                     f"reported, no target in the issue)", t["fresh"], t["plain"], clock)]
    return rows


def shell(model: nn.Module) -> nn.Module:
    """A new module tree sharing ``model``'s tensors: a model object no memo has seen, made untimed."""
    return copy.deepcopy(model, {id(t): t for t in itertools.chain(model.parameters(), model.buffers())})


def unseen(model: nn.Module, i: int) -> nn.Module:
    """A shell of a class of its own: an architecture no cache has seen (the map is traced again)."""
    new = shell(model)
    new.__class__ = type(f"{type(model).__name__}{i}", (type(model),), {})
    return new


def bench_intertwiner(reps: int, device: torch.device) -> list[dict]:
    model = mlp().to(device)
    seeds, shells = itertools.count(1), [shell(model) for _ in range(reps + 3)]
    fresh = [unseen(model, i) for i in range(reps + 3)]
    wb.random_intertwiner(model, seed=0)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    g = torch.Generator().manual_seed(0)
    perms = [torch.randperm(m.out_features, generator=g).to(device) for m in linears[:-1]]
    scales = [(torch.rand(m.out_features, generator=g) + 0.5).to(device) for m in linears[:-1]]

    def kernels():
        """The floor: only the gathers and scalings any transform of this MLP must run (rows of every writer,
        columns of every reader, each into new memory), as torch's index_select and mul."""
        with torch.no_grad():
            for i, m in enumerate(linears):
                w, b = m.weight, m.bias
                if i > 0:  # reads the site before it: columns
                    w = torch.index_select(w, 1, perms[i - 1]).mul_(1 / scales[i - 1])
                if i < len(perms):  # writes a site: rows
                    w = torch.index_select(w, 0, perms[i]).mul_(scales[i][:, None])
                    b = b[perms[i]] * scales[i]
                else:
                    b = b.clone()

    def fused():
        """The same gathers and scalings, each weight in one pass of workbench's kernel (workbench/symmetry/_kernels.py:
        numba where installed, else torch's kernels), into new memory."""
        from workbench.symmetry._kernels import gather_scale_into

        with torch.no_grad():
            for i, m in enumerate(linears):
                rows = (perms[i], scales[i]) if i < len(perms) else (None, None)
                cols = (perms[i - 1], 1 / scales[i - 1]) if i > 0 else (None, None)
                gather_scale_into(m.weight, torch.empty_like(m.weight), *rows, *cols, torch.empty_like)
                gather_scale_into(m.bias, torch.empty_like(m.bias), *rows, None, None, torch.empty_like)

    l0 = load()
    t = timed({"copy": lambda: copy.deepcopy(model), "steady": lambda: wb.random_intertwiner(model, seed=next(seeds)),
               "first": lambda: wb.random_intertwiner(shells.pop(), seed=next(seeds)),
               "unseen": lambda: wb.random_intertwiner(fresh.pop(), seed=next(seeds)), "kernels": kernels,
               "fused": fused}, reps, device=device)
    clock = "cpu" if device.type == "cpu" else "wall"
    what = f"MLP 512-2048-2048-10 ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params)"
    return [row(f"{what}: copy.deepcopy", t["copy"], t["copy"], clock, load=[l0, load()]),
            row(f"{what}: the gathers and scalings alone, no model (the floor of any transform with torch's kernels)",
                t["kernels"], t["copy"], clock),
            row(f"{what}: the same in one pass per weight (workbench's kernel: the floor of a transform now)",
                t["fused"], t["copy"], clock),
            row(f"{what}: wb.random_intertwiner, repeated", t["steady"], t["copy"], clock, target=1.5),
            row(f"{what}: wb.random_intertwiner, first call on a fresh model object of an architecture seen before "
                f"(the map cached by structure)", t["first"], t["copy"], clock, target=2.0),
            row(f"{what}: wb.random_intertwiner, first call on a never-seen architecture (the map traced)", t["unseen"],
                t["copy"], clock)]


GROUPS = {"capture": bench_capture, "harvest": bench_harvest, "verify": bench_verify, "transform": bench_intertwiner}


# ---------------------------------------------------------------------------------------- report
def fmt_s(v: float) -> str:
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


def table(rows: list[dict]) -> str:
    lines = ["| measurement | clock | min | ratio (min/min) | median of paired ratios | wall / CPU ratio | target | result |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        res = "" if "pass" not in r else ("PASS" if r["pass"] else "MISS")
        if "below_hand" in r:
            res += " (below hand-written hooks)" if r["below_hand"] else " (above hand-written hooks)"
        lines.append(f"| {r['measurement']} | {r['clock']} | {fmt_s(r['min_s'])} | {r['ratio']:.3f} | "
                     f"{r['ratio_median']:.3f} | {r['wall_ratio']:.3f} / {r['cpu_ratio']:.3f} | "
                     f"{r.get('target', '')} | {res} |")
    return "\n".join(lines)


def machine() -> dict:
    m = {"nproc": os.cpu_count(), "cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
         "torch": torch.__version__, "numpy": np.__version__, "workbench": wb.__version__}
    if torch.cuda.is_available():
        m["gpu"] = torch.cuda.get_device_name(0)
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
        m["commit"] = git("rev-parse", "--short", "HEAD")
        m["uncommitted"] = git("status", "--porcelain", "--", "workbench").splitlines()
    except OSError:
        pass
    return m


def write(rows: list[dict], settings: dict, started: str, out: Path, title: str) -> None:
    m = machine()
    out.parent.mkdir(parents=True, exist_ok=True)
    notes = [f"- {r['note']}" for r in rows if r.get("note")]
    out.with_suffix(".md").write_text("\n".join([
        f"# {title}", "",
        f"- Date: {started}",
        f"- Machine: {m['nproc']} CPUs ({m['cpu']}), torch threads {m['torch_threads']}, Python {m['python']}, "
        f"torch {m['torch']}, NumPy {m['numpy']}" + (f", GPU {m['gpu']}" if "gpu" in m else ""),
        f"- Code: commit {m.get('commit', '?')}" + (f", uncommitted: {m['uncommitted']}" if m.get("uncommitted") else ""),
        f"- Command: `{settings['command']}`; method in benchmarks/performance.py's docstring",
        f"- Settings: {({k: v for k, v in settings.items() if k != 'command'})}",
        f"- Load average (1 min) per group, start and end: {settings['loads']}", "",
        "A ratio is the variant's fastest call over its baseline's fastest call (both timed in the same run, "
        "interleaved), on the clock named in the row; the paired median and the other clock's ratio are "
        "beside it. PASS/MISS is judged on the ratio.", "",
        table(rows), "", *notes, "",
    ]))
    out.with_suffix(".json").write_text(json.dumps({"date": started, "machine": m, "settings": settings,
                                                    "rows": rows}, indent=1, default=str))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke test: few repetitions, prints only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see the docstring)")
    p.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated, of {list(GROUPS)}")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", default=str(RESULTS / "performance.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # Every variant of every group runs with the allocator setting workbench's first capture or transform
    # applies to the process (workbench/_memory.py), whichever group runs first: a baseline's cost must not
    # depend on the order of the groups. (Versions before issue 21 have no such setting.)
    try:
        from workbench._memory import keep_freed_memory
        keep_freed_memory()
    except ImportError:
        pass
    device = torch.device(args.device)
    reps = args.reps or (3 if args.quick else 15)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    rows, loads = [], {}
    for name in args.groups.split(","):
        print(f"running {name} ...", flush=True)
        l0 = load()
        rows += GROUPS[name](max(2, reps // 3) if name == "harvest" else reps, device)
        loads[name] = [l0, load()]
    print(table(rows))
    settings = {"reps": reps, "harvest_reps": max(2, reps // 3), "threads": args.threads, "device": str(device),
                "loads": loads, "command": "python benchmarks/performance.py " + " ".join(argv or sys.argv[1:])}
    if not args.quick:
        write(rows, settings, started, Path(args.out), "Performance targets of issue 21")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
