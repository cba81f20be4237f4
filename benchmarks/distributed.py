"""Harvest past one machine, simulated on this one: W gloo ranks harvest one dataset, one rank is killed
(SIGKILL) mid-harvest and the launcher stops the others as torchrun would, every rank is started again
with ``resume=True``, and the merged store is read in batch order, memory-mapped, and compared row for
row with a single-process capture of the same batches, and once more through ``store.to_dask`` (dask).

    .venv/bin/python benchmarks/distributed.py                     # 8 ranks; writes benchmarks/results/distributed.md
    .venv/bin/python benchmarks/distributed.py --ranks 4 --batches 12 --quick   # what tests/test_distributed.py runs

Each rank is a fresh interpreter with ``OMP_NUM_THREADS=1`` joined to a gloo process group through a file
rendezvous (``torch.distributed.init_process_group("gloo", init_method="file://...")``), exactly what
``torchrun`` would give the harvest (rank, world size, an initialised group), without torchrun's own
start-up cost. Rank ``--kill-rank`` kills itself with SIGKILL right after its ``--kill-after``-th chunk is
listed; the launcher, seeing a rank die, SIGKILLs the others wherever they are (mid-forward, mid-write or
waiting at the final barrier). The result (timings, rows, checks) is printed as one JSON line.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

NAMES = ["1", "4"]


def model() -> nn.Module:
    """The harvested model: conv, BatchNorm, in-place ReLU (its BatchNorm output must survive), linear."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Flatten(),
                        nn.Linear(8 * 14 * 14, 10))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.3, 0.3)
        net[1].running_var.uniform_(0.5, 1.5)
    return net.eval()


def batches(n: int, size: int) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(size, 3, 16, 16, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


# ---------------------------------------------------------------------------------------- one rank
def worker(path: str, rendezvous: str, n: int, size: int, resume: bool, kill_rank: int, kill_after: int) -> None:
    import torch.distributed as dist

    import workbench as wb
    from workbench.hooks import _disk

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    if rank == kill_rank and kill_after > 0:
        real, written = _disk.ShardWriter.write, [0]

        def write(self, *args, **kwargs):
            real(self, *args, **kwargs)
            written[0] += 1
            if written[0] == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        _disk.ShardWriter.write = write
    t0 = time.perf_counter()
    store = wb.harvest(model(), batches(n, size), names=NAMES, path=path, progress=False, resume=resume,
                       chunk_bytes=1)
    print(json.dumps({"rank": rank, "rows": len(store), "seconds": time.perf_counter() - t0}), flush=True)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- the launcher
def launch(world: int, path: Path, n: int, size: int, *, resume: bool, kill_rank: int = -1, kill_after: int = 0,
           timeout: float = 600) -> dict:
    """Start ``world`` ranks; when one exits with an error, SIGKILL the others (as torchrun does). Returns each
    rank's return code and the wall time."""
    rendezvous = Path(tempfile.mkdtemp(prefix="wb-rdzv-")) / "store"
    env = dict(os.environ, WORLD_SIZE=str(world), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(path), str(rendezvous), str(n), str(size),
           str(int(resume)), str(kill_rank), str(kill_after)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    deadline = t0 + timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.perf_counter() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGKILL)
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = [p.communicate() for p in procs]
    return {"returncodes": [p.returncode for p in procs], "seconds": time.perf_counter() - t0,
            "stdout": [o[0] for o in outs], "stderr": [o[1][-2000:] for o in outs]}


def reference(n: int, size: int) -> dict:
    """Every name's rows computed by one process, one capture per batch (no store involved)."""
    import workbench as wb

    net, out = model(), {name: [] for name in NAMES}
    for x, _ in batches(n, size):
        _, cache = wb.run_with_cache(net, x, names=NAMES)
        for name in NAMES:
            out[name].append(cache[name].numpy())
    return {name: np.concatenate(v) for name, v in out.items()}


def run(world: int, n: int, size: int, folder: Path, kill_rank: int, kill_after: int) -> dict:
    import warnings

    import workbench as wb

    path = folder / "store"
    first = launch(world, path, n, size, resume=False, kill_rank=kill_rank, kill_after=kill_after)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        partial = wb.ActivationStore.open(path)
    partial_rows, partial_problems = len(partial), list(partial.problems)
    second = launch(world, path, n, size, resume=True)
    t0 = time.perf_counter()
    store = wb.ActivationStore.open(path)
    chunks = list(store.iter_chunks(NAMES[0]))
    mapped = all(isinstance(c, np.memmap) and not c.flags.owndata and not c.flags.writeable for c in chunks)
    merged = {name: store.array(name) for name in NAMES}
    read_seconds = time.perf_counter() - t0
    ref = reference(n, size)
    exact = all(np.array_equal(merged[name], ref[name]) for name in NAMES)
    in_order = bool(np.array_equal(store.batch_index, np.repeat(np.arange(n), size)))
    targets = bool(np.array_equal(store.targets, torch.cat([y for _, y in batches(n, size)]).numpy()))
    store.verify()
    # the merged store through dask: one block per batch, each block the mapped file itself (no copy)
    import dask.array  # noqa: F401  (the dev extra installs dask[array])
    lazy = store.to_dask(NAMES[0])
    blocks = [d.compute(scheduler="sync") for d in lazy.to_delayed().ravel()]
    dask_mapped = all(isinstance(b, np.memmap) and not b.flags.owndata for b in blocks)
    t1 = time.perf_counter()
    dask_mean = lazy.mean(axis=0).compute()
    dask_seconds = time.perf_counter() - t1
    dask_exact = bool(np.allclose(dask_mean, ref[NAMES[0]].mean(axis=0, dtype=np.float64), rtol=1e-5, atol=1e-6))
    return {"dask_blocks": len(blocks), "dask_mapped": dask_mapped, "dask_exact": dask_exact,
            "dask_seconds": dask_seconds, "world": world, "batches": n, "batch_size": size, "kill_rank": kill_rank, "kill_after": kill_after,
            "first_returncodes": first["returncodes"], "first_seconds": first["seconds"],
            "partial_rows": partial_rows, "partial_problems": partial_problems,
            "resume_returncodes": second["returncodes"], "resume_seconds": second["seconds"],
            "resume_stderr": [e for e in second["stderr"] if e.strip()][:1],
            "complete": store.complete, "rows": len(store), "exact": exact, "batch_order": in_order,
            "targets": targets, "memory_mapped_chunks": mapped, "chunks": len(chunks), "read_seconds": read_seconds,
            "store_bytes": int(store.nbytes)}


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        a = sys.argv[2:]
        return worker(a[0], a[1], int(a[2]), int(a[3]), bool(int(a[4])), int(a[5]), int(a[6]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--batches", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--kill-rank", type=int, default=None, help="default: the middle rank")
    p.add_argument("--kill-after", type=int, default=2, help="chunks that rank lists before it is killed")
    p.add_argument("--folder", default=None, help="where the store goes (default: a temporary folder, removed)")
    p.add_argument("--quick", action="store_true", help="print the JSON only; write no results page")
    args = p.parse_args(argv)
    kill_rank = args.ranks // 2 if args.kill_rank is None else args.kill_rank
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="wb-dist-") as tmp:
        folder = Path(args.folder) if args.folder else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        load0 = os.getloadavg()[0]
        result = run(args.ranks, args.batches, args.batch_size, folder, kill_rank, args.kill_after)
        result["load"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(result))
    if not args.quick:
        write(result, started, " ".join(sys.argv[1:]))


def write(r: dict, started: str, command: str) -> None:
    out = HERE / "results" / "distributed.md"
    ok = (r["complete"] and r["exact"] and r["batch_order"] and r["targets"] and r["memory_mapped_chunks"]
          and r["dask_mapped"] and r["dask_exact"])
    killed = [i for i, c in enumerate(r["first_returncodes"]) if c == -signal.SIGKILL]
    out.write_text("\n".join([
        "# Distributed harvest: killed and resumed", "",
        f"- Date: {started}; machine: {os.cpu_count()} CPUs, torch {torch.__version__}, load average "
        f"{r['load'][0]} at the start and {r['load'][1]} at the end",
        f"- Command: `python benchmarks/distributed.py {command}`; method in the script's docstring", "",
        f"{r['world']} gloo ranks harvest {r['batches']} batches of {r['batch_size']} (names {NAMES}, one chunk per "
        f"batch). Rank {r['kill_rank']} killed itself after listing {r['kill_after']} chunks; the launcher then "
        f"killed the others: return codes {r['first_returncodes']} ({len(killed)} SIGKILLed) after "
        f"{r['first_seconds']:.1f} s. The store then opened incomplete with {r['partial_rows']} rows and said why:", "",
        *[f"  - {p}" for p in r["partial_problems"]], "",
        f"Every rank started again with `resume=True`: return codes {r['resume_returncodes']}, {r['resume_seconds']:.1f} s.",
        "", "| check | result |", "|---|---|",
        f"| complete | {r['complete']} |",
        f"| rows | {r['rows']} of {r['batches'] * r['batch_size']} |",
        f"| equal, row for row, to one process capturing every batch | {r['exact']} |",
        f"| rows in the original batch order (batch_index) | {r['batch_order']} |",
        f"| labels aligned | {r['targets']} |",
        f"| every chunk read as a read-only np.memmap (no copy) | {r['memory_mapped_chunks']} ({r['chunks']} chunks) |",
        f"| merged read of {r['store_bytes'] / 2**20:.1f} MiB, checksums verified on first read | {r['read_seconds']:.2f} s |",
        "", f"Verdict: {'PASS' if ok else 'FAIL'}.", "",
        f"`store.to_dask({NAMES[0]!r})` wraps the same memory maps as one lazy dask array of {r['dask_blocks']} blocks "
        f"(one per batch); every block computed alone is a read-only view of its mapped file, not a copy: "
        f"{r['dask_mapped']}. Its per-feature mean, computed by dask's threads over the blocks in "
        f"{r['dask_seconds']:.2f} s, equals the single-process reference's (float64, rtol 1e-5): {r['dask_exact']}.", "",
    ]))
    (HERE / "results" / "distributed.json").write_text(json.dumps({"date": started, "command": command, **r}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
