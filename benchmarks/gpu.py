"""The GPU check of issue 21: one command, under five minutes, absolute times in benchmarks/results/gpu.md.

    python benchmarks/gpu.py                            # on a machine with CUDA (workbench importable: pip install -e .)
    python benchmarks/gpu.py --device cpu --small       # the same script on a CPU, small sizes (a smoke test)

Sections, each timed interleaved against a baseline in the same run (benchmarks/performance.py's
``timed``: warm-up calls, an order shuffled each repetition, the device synchronised before every clock read, minimum of N):

1. capture overhead: ``wb.capture`` of every name of two CNNs at batch 128, activations kept on the GPU
   (``device=None``) and streamed to pinned CPU memory (``device="cpu"``), against the plain forward and
   hand-written hooks;
2. harvest: ``wb.harvest(reduce=None)`` of every name to disk (``durable`` both ways), in GB/s of
   activations, against hand-written hooks + ``np.save`` and against the disk's own write speed;
3. ``wb.random_intertwiner`` of a 1.1B-parameter LLaMA-shaped decoder (TinyLlama's shape: 22 layers,
   d_model 2048, 32 query heads, 4 key/value heads, d_mlp 5632, vocabulary 32000; random weights, float32,
   built on the device) against ``copy.deepcopy`` of it;
4. ``wb.verify`` of a transformed ResNet-18 and CNN against the two plain forwards, and of the decoder
   against its two forwards.

A section that fails (a missing package, an error) is reported with its error and the others still run.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_performance", HERE / "performance.py")
perf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(perf)

import workbench as wb  # noqa: E402

DECODER = {"full": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
           "small": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=500, max_position_embeddings=128)}


def decoder(size: str, device: torch.device):
    from workbench.models import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with device:  # built where it runs: initialising 1.1B weights on a CPU takes minutes
        model = LlamaForCausalLM(LlamaConfig(**DECODER[size], attn_implementation="sdpa")).eval()
    return model


def bench_decoder(reps: int, device: torch.device, size: str) -> list[dict]:
    model = decoder(size, device)
    params = sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, DECODER[size]["vocab_size"], (4, 128 if size == "full" else 16),
                           generator=torch.Generator().manual_seed(0)).to(device)
    t0 = time.perf_counter()
    new, tr = wb.random_intertwiner(model, seed=0)
    perf.synchronize(device)
    first = time.perf_counter() - t0
    devices = sorted({str(p.device) for p in new.parameters()})
    report = wb.verify(model, new, tokens, transform=tr)
    seeds = iter(range(1, 10**6))
    what = f"LLaMA-shaped decoder ({params / 1e9:.2f}B params, {DECODER[size]['num_hidden_layers']} layers)"
    t = perf.timed({"copy": lambda: copy.deepcopy(model), "transform": lambda: wb.random_intertwiner(model, seed=next(seeds))},
                   reps, warmup=1, device=device)

    def plain():
        with torch.no_grad():
            model(tokens)
            new(tokens)
    v = perf.timed({"plain": plain, "verify": lambda: wb.verify(model, new, tokens, transform=tr)}, reps, warmup=1,
                   device=device)
    clock = "wall"
    return [perf.row(f"{what}: copy.deepcopy", t["copy"], t["copy"], clock, load=[perf.load()]),
            perf.row(f"{what}: wb.random_intertwiner (first call {first:.2f} s; new weights on {devices})",
                     t["transform"], t["copy"], clock, target=1.5),
            perf.row(f"{what}: two plain forwards, {tuple(tokens.shape)} tokens", v["plain"], v["plain"], clock),
            perf.row(f"{what}: wb.verify ({report.verdict}: {report.summary()[:120]})", v["verify"], v["plain"], clock,
                     target=1.3)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="small models and few repetitions (a smoke test)")
    p.add_argument("--out", default=str(HERE / "results" / "gpu.md"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # as benchmarks/performance.py on this shared machine
    size, reps = ("small", 2) if args.small else ("full", 5)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    sections = [
        ("capture", lambda: perf.bench_capture(reps, device, batch=4 if args.small else 128)),
        ("harvest", lambda: perf.bench_harvest(max(2, reps - 2), device, n_batches=2 if args.small else 6,
                                               batch=8 if args.small else 64)),
        ("verify", lambda: perf.bench_verify(reps, device, small=args.small)),
        ("decoder", lambda: bench_decoder(reps, device, size)),
    ]
    rows, errors, seconds = [], {}, {}
    for name, fn in sections:
        print(f"running {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            rows += fn()
        except Exception as exc:  # one broken section must not hide the others' numbers
            errors[name] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            traceback.print_exc()
        seconds[name] = round(time.perf_counter() - t0, 1)
    print(perf.table(rows))
    settings = {"device": str(device), "size": size, "reps": reps, "section_seconds": seconds,
                "loads": {"end": perf.load()}, "command": "python benchmarks/gpu.py " + " ".join(argv or sys.argv[1:])}
    out = Path(args.out)
    perf.write(rows, settings, started, out, f"GPU check of issue 21 ({device}{', small' if args.small else ''})")
    if errors:
        with open(out.with_suffix(".md"), "a") as f:
            f.write("\n## Sections that failed\n\n" + "\n".join(f"- **{k}**: `{v}`" for k, v in errors.items()) + "\n")
    print(f"wrote {out.with_suffix('.md')}" + (f"; failed sections: {sorted(errors)}" if errors else ""))


if __name__ == "__main__":
    main()
