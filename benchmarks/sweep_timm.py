"""Every architecture file of timm, transformed: does the graph backend find sites, and is every transform exact?

Issue 17 asks for "0 models transformed wrongly". The coverage tables check the models they name; this sweep
checks the ones nobody named. For each of timm's architecture files (``timm.models.<module>``) it takes the
smallest registered model (parameters counted on the meta device) and up to ``--per-module - 1`` more with other
name stems (``seresnet``, ``ecaresnet``, ``skresnet`` live in ``resnet.py``), builds each with random weights
(``pretrained=False``, ten classes, vector parameters and BatchNorm statistics drawn at random as
``coverage_vision.randomised`` does: a fresh model's 1s and 0s hide mistakes), and in a subprocess of its own
(``--timeout`` seconds):

- ``wb.symmetry_map`` on one random image: sites, places skipped and the first skip reasons;
- ``wb.random_intertwiner(seed=0)`` applied to a float64 copy, and both copies run here on two random images: the
  largest |Δ| of each output unit over that unit's largest |value| (``coverage_vision.direct_error``; no
  workbench code in the comparison).

A row is ``exact`` (relative error ≤ 1e-10), ``at its floor`` (above 1e-10 but within ten times what one unit
of rounding in every parameter moves the outputs by, ``floor64``: a randomly initialised network can amplify
rounding that much, and no transform, which rounds every weight it writes, can do better), ``WRONG`` (above both:
a silent wrong transform, the one outcome that must never happen), ``no sites`` (nothing transformable was found; nothing is changed), ``refused`` (one of
workbench's own errors, with its message), ``crash`` (any other exception: a raw error where a clear refusal
belongs) or ``timeout``. Inputs are 64×64 where the model accepts ``img_size=64`` or runs at that size, else
the model's own input size.

Run: ``.venv/bin/python benchmarks/sweep_timm.py`` (about 35 minutes on one core, 14 of them counting parameters); ``--only NAME …`` reruns some
models; ``--torchvision --out benchmarks/results/sweep_torchvision`` sweeps torchvision's families the same way. Results: ``benchmarks/results/sweep_timm.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
EXACT = 1e-10
SIDE = 64


def _timm():
    from workbench.models import ensure_torchvision_importable, require

    ensure_torchvision_importable()
    return require("timm")


def selection(per_module: int) -> list[tuple[str, str, int]]:
    """``(model name, module, parameters)``: the smallest model of each architecture file, then the smallest of up
    to ``per_module - 1`` other name stems of that file."""
    import torch

    timm = _timm()
    from timm.models import _registry

    by_module: dict[str, list] = {}
    names = timm.list_models()
    for i, name in enumerate(names):
        module = _registry._model_to_module.get(name, "?")
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                n = sum(p.numel() for p in timm.create_model(name, pretrained=False, num_classes=10).parameters())
        except Exception:  # noqa: BLE001 - a model that cannot be built on meta is counted as huge, still a candidate
            n = 10 ** 12
        by_module.setdefault(module, []).append((n, name))
        if i % 100 == 0:
            print(f"  counted {i}/{len(names)}", file=sys.stderr, flush=True)
    chosen = []
    for module, rows in sorted(by_module.items()):
        rows.sort()
        stems: set[str] = set()
        for n, name in rows:
            stem = name.split("_")[0].rstrip("0123456789")
            if stem in stems:
                continue
            stems.add(stem)
            chosen.append((name, module, n))
            if len(stems) >= per_module:
                break
    return chosen


def torchvision_selection() -> list[tuple[str, str, int]]:
    """``("tv:NAME", "torchvision", parameters)``: the smallest classification model of each torchvision name stem
    (``resnet``, ``vit``, ``swin``, …)."""
    import torch

    _timm()  # (makes torchvision importable)
    import torchvision.models as tvm

    best: dict[str, tuple] = {}
    for name in tvm.list_models(module=tvm):
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                n = sum(p.numel() for p in tvm.get_model(name, weights=None).parameters())
        except Exception:  # noqa: BLE001 - RegNet computes its widths with tensors, not on meta: counted as huge
            n = 10 ** 12
        stem = name.split("_")[0].rstrip("0123456789")
        if stem not in best or n < best[stem][0]:
            best[stem] = (n, name)
    return [(f"tv:{name}", "torchvision", n) for stem, (n, name) in sorted(best.items())]


def build(name: str):
    """The model with random weights and a batch of two images it runs on (``tv:NAME``: torchvision's). Tried in
    order: built for 64×64 images (``img_size=64``) and run at 64; built as registered and run at 64; built as
    registered and run at its own input size."""
    import torch

    timm = _timm()
    sys.path.insert(0, str(HERE))
    from coverage_vision import randomised

    def make(**kw):
        torch.manual_seed(0)
        if name.startswith("tv:"):
            import torchvision.models as tvm

            if kw:
                raise TypeError("torchvision: no img_size")
            extra = {"aux_logits": False, "init_weights": True} if name[3:] in ("googlenet", "inception_v3") else {}
            return tvm.get_model(name[3:], weights=None, num_classes=10, **extra)
        return timm.create_model(name, pretrained=False, num_classes=10, **kw)

    last = None
    for kw, side in (({"img_size": SIDE}, SIDE), ({}, SIDE), ({}, None)):
        try:
            model = randomised(make(**kw))
            side = side or getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1]
            x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                model(x[:1])
            return model, x, side
        except Exception as exc:  # noqa: BLE001 - the next way of building it
            last = exc
    raise last


def floor(model, run, rel: float = 2.0 ** -52) -> float:
    """How much ``run(model)`` (its output tensor) moves when every floating parameter moves by ``rel`` (each times
    1 + rel·u, u uniform in [−1, 1]; the larger of two draws), each output unit against its own largest |value|, as
    ``coverage_vision.direct_error`` measures a transform. A randomly initialised network can be chaotic: timm's
    HaloNet-H1 moves by 1.3e-5 for one unit of float64 rounding in its weights (sweep_timm.json, ``floor64``)."""
    import copy

    import torch

    out = 0.0
    with torch.no_grad():
        ref = run(model)
        for seed in (0, 1):
            other = copy.deepcopy(model)
            g = torch.Generator().manual_seed(seed)
            for p in other.parameters():
                if p.is_floating_point():
                    p.mul_(1 + rel * (2 * torch.rand(p.shape, generator=g, dtype=p.dtype) - 1))
            b = run(other)
            out = max(out, float(((ref - b).abs() / ref.abs().flatten(0, -2).amax(0).clamp_min(1e-300)).max()))
    return out


def one(name: str) -> dict:
    """One model's row (run in a subprocess of its own)."""
    import torch

    import workbench as wb

    sys.path.insert(0, str(HERE))
    from coverage_vision import direct_error, site_counts

    torch.set_num_threads(1)
    row: dict = {"model": name}
    t0 = time.perf_counter()
    try:
        model, x, side = build(name)
    except Exception as exc:  # noqa: BLE001 - timm itself: not ours, recorded
        return {**row, "status": "not built", "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    row.update(parameters=sum(p.numel() for p in model.parameters()), side=side)
    try:
        smap = wb.symmetry_map(model, x[:1])
        row.update(site_counts(smap), skip_reasons=sorted({r.split(";")[0][:240] for _, r in smap.skipped})[:6])
        if not len(smap):
            row["status"] = "no sites"
        else:
            _, t = wb.random_intertwiner(model, seed=0, example=x[:1])
            x64 = x.double()
            judge(row, direct_error(model, t, x), lambda: floor(model.double(), lambda m: m(x64)), "floor64")
    except Exception as exc:  # noqa: BLE001 - a refusal, or a raw error where a clear refusal belongs
        failed(row, exc)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def judge(row: dict, err: float, floor_of, key: str = "floor") -> None:
    """``row``'s status for a transform whose direct float64 error is ``err``: exact, WRONG, or at its floor (within ten
    times ``floor_of()``, measured only when ``err`` is above 1e-10: is the model itself this sensitive to rounding?
    Then no transform can do better)."""
    row.update(direct64=err, status="exact" if err <= EXACT else "WRONG")
    if err > EXACT:
        row[key] = floor_of()
        if err <= 10 * row[key]:
            row["status"] = "at its floor"


def failed(row: dict, exc: BaseException) -> None:
    """``row`` for an exception: ``refused`` (workbench's own error, its message kept) or ``crash`` (any other)."""
    import traceback

    from workbench._errors import WorkbenchError

    if isinstance(exc, WorkbenchError):
        row.update(status="refused", error=f"{type(exc).__name__}: {str(exc)[:400]}")
    else:
        row.update(status="crash", error=f"{type(exc).__name__}: {str(exc)[:400]}",
                   where=traceback.format_exception(exc)[-6:])


def isolated(script: str, name: str, row: dict, timeout: int, env: dict) -> dict:
    """``script --one name`` in a fresh interpreter (a model that crashes or hangs takes only itself down): the row it
    prints, or ``row`` marked ``crash`` (with the end of its stderr) or ``timeout``."""
    try:
        proc = subprocess.run([sys.executable, script, "--one", name], capture_output=True, text=True, timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        return {**row, "status": "timeout", "error": f"over {timeout} s"}
    found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    return json.loads(found[-1]) if found else {**row, "status": "crash",
                                                "error": f"exit {proc.returncode}: {proc.stderr[-300:]}"}


def page(rows: list, started: str, command: str, title: str = "Every timm architecture file") -> str:
    from collections import Counter

    counts = Counter(r["status"] for r in rows)
    lines = [
        f"# {title}, transformed (graph backend)", "",
        f"Run {started} with `{command}`; method in the script's docstring. {len(rows)} models: "
        + ", ".join(f"{n} {s}" for s, n in counts.most_common()) + ".", "",
        "| model | module | parameters | input | status | sites (skipped) | groups | direct float64 | note |",
        "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        by = ", ".join(f"{n} {g}" for g, n in sorted((r.get("by_group") or {}).items(), key=lambda kv: -kv[1]))
        note = r.get("error") or "; ".join(r.get("skip_reasons", [])[:2])
        note = note.replace("|", "\\|").replace("\n", " ")[:300]
        err = f"{r['direct64']:.0e}" if "direct64" in r else "–"
        err += f" (floor {r['floor64']:.0e})" if "floor64" in r else ""
        sites = f"{r['sites']} ({r['skipped']})" if "sites" in r else "–"
        params = f"{r['parameters'] / 1e6:.1f}M" if "parameters" in r else "–"
        lines.append(f"| {r['model']} | {r.get('module', '')} | {params} | {r.get('side', '–')} | {r['status']} | {sites} "
                     f"| {by or '–'} | {err} | {note} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the subprocess's entry
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--per-module", type=int, default=2)
    parser.add_argument("--models-from", metavar="JSON", help="sweep the models an earlier run's JSON lists")
    parser.add_argument("--torchvision", action="store_true",
                        help="torchvision's classification families instead (the smallest of each name stem)")
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--out", default=str(RESULTS / "sweep_timm"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.one:
        print("ROW " + json.dumps(one(args.one), default=str), flush=True)
        return
    out = Path(args.out)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if args.models_from:  # the models (and modules) of an earlier run: skips counting every model's parameters
        chosen = [(r["model"], r.get("module", "?"), r.get("parameters", 0))
                  for r in json.loads(Path(args.models_from).read_text())["rows"]]
    else:
        chosen = torchvision_selection() if args.torchvision else selection(args.per_module)
    if args.only:
        chosen = [c for c in chosen if c[0] in args.only] + [(n, "?", 0) for n in args.only
                                                             if n not in {c[0] for c in chosen}]
    rows = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE.parent)}
    for i, (name, module, n) in enumerate(chosen):
        row = isolated(__file__, name, {"model": name}, args.timeout, env)
        row["module"] = module
        rows.append(row)
        print(f"[{i + 1}/{len(chosen)}] {name:40s} {row['status']:9s} {row.get('sites', '')} "
              f"{row.get('direct64', '')} {row.get('error', '')[:120]}", flush=True)
        out.with_suffix(".json").write_text(json.dumps({"started": started, "rows": rows}, indent=1, default=str))
    command = ".venv/bin/python benchmarks/sweep_timm.py " + " ".join(sys.argv[1:])
    title = "Every torchvision classification family" if args.torchvision else "Every timm architecture file"
    out.with_suffix(".md").write_text(page(rows, started, command.strip(), title))


if __name__ == "__main__":
    main()
