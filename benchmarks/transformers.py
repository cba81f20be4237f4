"""Benchmark of ``wb.random_intertwiner`` on a GPT-2-small-shaped TransformerLens model vs the matmul bound.

Rerun with ``.venv/bin/python benchmarks/transformers.py``; ``--quick`` shrinks the model (4 layers,
d_model 256) and writes nothing. Results go to ``benchmarks/results/transformers.md`` (raw samples in
``transformers.json``).

Method. A native ``TransformerBridge`` (TransformerLens 4) with GPT-2 small's shape — 12 layers,
d_model 768, 12 heads of 64, d_mlp 3072, vocab 50,257, context 1,024, LayerNorm, GELU; ~163M
parameters with an untied unembedding — float32, random weights. ``wb.random_intertwiner(model,
seed=i)`` draws an element for every site (a dense 768×768 map on the residual stream, dense 64×64
maps per head for QK and OV, head and neuron permutations) and builds the transformed model.
The bound: the multiply-adds of every dense map applied to every weight it touches (2·numel·n FLOPs
per weight, counted from the symmetry map) divided by the machine's float32 matmul rate, measured
in the same run on the same shapes ([numel/768, 768] @ [768, 768], min of 5). Permutations cost no
FLOPs and are not in the bound. The ratio is (min time of random_intertwiner) / bound. Memory: peak
RSS of a fresh process that builds the model and then transforms it, over the model's bytes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# This file's name shadows the `transformers` package when its folder is on the path: keep it off.
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util  # noqa: E402

import torch  # noqa: E402

import workbench as wb  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_cache", HERE / "cache.py")
_cache = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cache)
machine = _cache.machine  # the house helpers

RESULTS = HERE / "results"
SHAPES = {"full": dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=1024),
          "quick": dict(n_layers=4, d_model=256, n_heads=4, d_head=64, d_mlp=1024, d_vocab=5000, n_ctx=256)}


def make(size: str):
    import warnings

    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_native(TransformerBridgeConfig(**SHAPES[size], act_fn="gelu",
                                                                     normalization_type="LN", seed=0)).eval()


def dense_flops(model) -> float:
    """2·numel·n for every dense (non-permutation) element acting on every weight it touches."""
    from workbench.hooks._tl import read_weights

    W = read_weights(model)
    total = 0.0
    for site in wb.symmetry_map(model):
        if not site.group.continuous:
            continue
        for port in site.writers + site.readers:
            t = W[port.name]
            numel = t[list(port.heads)].numel() if port.heads else t.numel()
            total += 2 * numel * site.n
    return total


def matmul_rate(flops_rows: int, n: int = 768, reps: int = 5) -> float:
    """float32 FLOP/s of [rows, n] @ [n, n] (min time of ``reps``)."""
    a, b = torch.randn(flops_rows, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * flops_rows * n * n / best


def memory_child(size: str) -> None:
    """RSS sampled every 5 ms while the transform runs, against RSS just before it (building the
    model has a higher high-water mark than the transform, so ``ru_maxrss`` cannot tell them apart)."""
    import threading

    import psutil

    model = make(size)
    proc, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    base = proc.memory_info().rss
    thread = threading.Thread(target=sample)
    thread.start()
    wb.random_intertwiner(model, seed=0)
    done.set()
    thread.join()
    base, peak = base // 1024, peak[0] // 1024
    size_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"base_kb": base, "peak_kb": peak, "model_bytes": size_bytes}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        return memory_child(args.child)
    size = "quick" if args.quick else "full"
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    model = make(size)
    params = sum(p.numel() for p in model.parameters())
    flops = dense_flops(model)
    d = SHAPES[size]["d_model"]
    rate = matmul_rate(int(flops / (2 * d * d)), d)
    bound = flops / rate
    times = []
    for i in range(args.reps + 1):  # the first call also traces nothing but imports; kept apart
        t0 = time.perf_counter()
        wb.random_intertwiner(model, seed=i)
        times.append(time.perf_counter() - t0)
    first, steady = times[0], times[1:]
    out = subprocess.run([sys.executable, __file__, "--child", size], capture_output=True, text=True, check=True)
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    extra_mb = (mem["peak_kb"] - mem["base_kb"]) / 1024
    model_mb = mem["model_bytes"] / 2 ** 20
    ratio = min(steady) / bound
    rows = [
        ("model", f"{params / 1e6:.1f}M parameters, {model_mb:.0f} MiB float32 ({size})"),
        ("dense FLOPs of the transform", f"{flops / 1e9:.1f} GFLOP"),
        ("float32 matmul rate (same shapes)", f"{rate / 1e9:.1f} GFLOP/s"),
        ("matmul bound", f"{bound:.3f} s"),
        ("random_intertwiner, min of {0} (median)".format(len(steady)),
         f"{min(steady):.3f} s ({sorted(steady)[len(steady) // 2]:.3f} s); first call {first:.3f} s"),
        ("ratio to the bound (target ≤ 2)", f"{ratio:.2f} — {'PASS' if ratio <= 2 else 'MISS'}"),
        ("peak memory added by the transform", f"{extra_mb:.0f} MiB = {extra_mb / model_mb:.2f}× the model"),
    ]
    text = "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(text)
    if args.quick:
        return
    RESULTS.mkdir(exist_ok=True)
    m = machine()
    (RESULTS / "transformers.json").write_text(json.dumps({"started": started, "machine": m, "times": times,
                                                           "flops": flops, "rate": rate, "memory": mem}, indent=1))
    (RESULTS / "transformers.md").write_text(
        f"# random_intertwiner on a GPT-2-small-shaped model\n\nRun {started} on {m['cpu']} ({m['nproc']} cores, "
        f"torch {m['torch']}, TransformerLens {m['transformer_lens']}) with "
        f"`.venv/bin/python benchmarks/transformers.py`. Method: see the module docstring.\n\n"
        f"| measurement | value |\n|---|---|\n{text}\n")


if __name__ == "__main__":
    main()
