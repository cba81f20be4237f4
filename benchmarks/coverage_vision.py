"""Coverage of vision models (issue 17): sites, groups, verify and the cost of a transform, graph backend.

Rerun with ``.venv/bin/python benchmarks/coverage_vision.py``; ``--only NAME …`` picks models, ``--reps N``
the timing repetitions (default 3). Results go to ``benchmarks/results/coverage_vision.md`` (raw numbers in
``coverage_vision.json``). The sister script for text models is ``coverage_text.py``; its ``measure``
(map, float32 and float64 verify, time against ``copy.deepcopy``) and ``groups`` are used here as they are.

Method. Each torchvision / timm constructor at its released size (ViT-B/16 and timm's models built for
32×32 inputs, which changes only the position table), random weights (``weights=None``), then every
vector parameter (norm gains and biases, layer scales, class tokens), every zero-initialised tensor
(ViT's head) and the BatchNorm statistics drawn at random: a fresh model's 1s and 0s hide mistakes. Inputs:
2 random images of 32×32 (Swin: 64×64). Per model:

- the map now and **before** this work (``--maps-only FILE`` writes the sites of whatever ``workbench`` is
  first on the path; the "before" column was made from the tree at commit 192c53b with
  ``PYTHONPATH=<that tree> … --maps-only``, and is read back with ``--before FILE``);
- ``verify`` at float32 and float64 of ``random_intertwiner(model, seed=0)`` (``coverage_text.measure``), and
  the **direct** float64 check: the same transform applied to a float64 copy, both run here, the largest
  |Δ| of each output unit over its own largest |value| (no workbench code in the comparison);
- ``random_intertwiner`` against ``copy.deepcopy`` (min over ``--reps``, interleaved), judged with freed memory
  reused and measured again on fresh memory, as ``coverage_text.measure`` does.

Everything runs on one torch thread: small float64 convolutions on two threads of a busy 2-core machine wait
at barriers (a MobileNetV2 forward took 0.06 s on one thread and 0.4 s to minutes on two).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def constructors() -> dict:
    """Name → (constructor, input side)."""
    from workbench.models import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torchvision.models as tvm

    def timm(name, **kw):
        def build():
            from workbench.models import require

            return require("timm").create_model(name, pretrained=False, num_classes=10, img_size=32, **kw)
        return build

    def mixer():  # timm's mixer_s16_224 fixes patch_size=16, which leaves one token at 32×32
        from workbench.models import require

        require("timm")
        from timm.models.mlp_mixer import MlpMixer

        return MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=8, embed_dim=512)

    return {
        "mobilenet_v2": (lambda: tvm.mobilenet_v2(num_classes=10), 32),
        "mobilenet_v3_small": (lambda: tvm.mobilenet_v3_small(num_classes=10), 32),
        "mobilenet_v3_large": (lambda: tvm.mobilenet_v3_large(num_classes=10), 32),
        "efficientnet_b0": (lambda: tvm.efficientnet_b0(num_classes=10), 32),
        "regnet_y_400mf": (lambda: tvm.regnet_y_400mf(num_classes=10), 32),
        "resnext50_32x4d": (lambda: tvm.resnext50_32x4d(num_classes=10), 32),
        "densenet121": (lambda: tvm.densenet121(num_classes=10), 32),
        "shufflenet_v2_x0_5": (lambda: tvm.shufflenet_v2_x0_5(num_classes=10), 64),
        "convnext_tiny": (lambda: tvm.convnext_tiny(num_classes=10), 32),
        "vit_b_16": (lambda: tvm.vit_b_16(num_classes=10, image_size=32), 32),
        "swin_t": (lambda: tvm.swin_t(num_classes=10), 64),
        "timm vit_tiny_patch16_224": (timm("vit_tiny_patch16_224", patch_size=8), 32),
        "timm MlpMixer (mixer_s16 widths, patch 8)": (mixer, 32),
    }


def randomised(model, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1 or "layer_scale" in name or "gamma" in name or not p.any():
                p.copy_(0.3 * torch.randn(p.shape, generator=g) + (1.0 if name.endswith("weight") and p.ndim == 1 else 0.0))
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def site_counts(smap) -> dict:
    from collections import Counter

    return {"sites": len(smap), "skipped": len(smap.skipped), "by_group": dict(Counter(s.group.name for s in smap))}


def direct_error(model, transform, x) -> float:
    """The transform applied to a float64 copy, compared here: max over output units of |Δ| / max |value|."""
    import copy

    import torch
    import workbench as wb

    model64 = copy.deepcopy(model).double()
    new64 = wb.apply_transform(model64, transform, example=x.double())
    with torch.no_grad():
        a, b = model64(x.double()), new64(x.double())
    return float(((a - b).abs() / a.abs().amax(0).clamp_min(1e-300)).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--maps-only", metavar="FILE", help="write the maps' site counts to FILE and stop")
    parser.add_argument("--before", metavar="FILE", help="site counts from --maps-only on the tree before")
    parser.add_argument("--page-only", action="store_true", help="rewrite the markdown page from the JSON and stop")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import torch
    import workbench as wb

    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE.parent))
    from benchmarks import _timing

    _timing.reuse_freed_memory()  # the judged regime: no page faults on either side (coverage_text.measure)
    models = {k: v for k, v in constructors().items() if not args.only or k in args.only}

    def built(name):
        ctor, side = models[name]
        torch.manual_seed(0)
        return randomised(ctor()), torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))

    if args.page_only:  # regenerate the page from the JSON (after editing the page's text)
        data = json.loads((RESULTS / "coverage_vision.json").read_text())
        (RESULTS / "coverage_vision.md").write_text(page(data["rows"], data["started"], *data["load"],
                                                         command=data.get("command", COMMAND)))
        return
    if args.maps_only:
        out = {}
        for name in models:
            model, x = built(name)
            out[name] = site_counts(wb.symmetry_map(model, x))
            print(name, out[name], flush=True)
        Path(args.maps_only).write_text(json.dumps(out, indent=1))
        return
    sys.path.insert(0, str(HERE))
    from coverage_text import groups, measure  # noqa: E402  (the sister script's helpers)

    before = json.loads(Path(args.before).read_text()) if args.before else {}
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load0 = os.getloadavg()[0]
    rows = []
    for name in models:
        model, x = built(name)
        try:
            row = measure(name, "torchvision" if not name.startswith("timm") else "timm", model, x, args.reps)
        except Exception as exc:  # verify's own failure on this model: recorded, not hidden
            nan = float("nan")
            row = {"family": name, "parameters": sum(p.numel() for p in model.parameters()), "error": repr(exc)[:300],
                   "verify32": f"ERROR ({type(exc).__name__})", "verify64": "not run", "rel32": nan, "rel64": nan,
                   "random_intertwiner_s": nan, "deepcopy_s": nan, "ratio": nan, "pass": False}
        smap = wb.symmetry_map(model, x)
        _, t = wb.random_intertwiner(model, seed=0, example=x)
        row.update(site_counts(smap), groups=groups(smap), direct64=direct_error(model, t, x),
                   before=before.get(name), skipped_reasons=sorted({r.split(";")[0] for _, r in smap.skipped}))
        rows.append(row)
        print(f"{name:26s} {row['parameters'] / 1e6:6.2f}M sites {row['sites']:3d} (before {row['before'] and row['before']['sites']}) "
              f"{row['verify32']}/{row['verify64']} direct {row['direct64']:.1e} ratio {row['ratio']:.2f}", flush=True)
    load1 = os.getloadavg()[0]
    RESULTS.mkdir(exist_ok=True)
    command = " ".join([COMMAND, *(a if a != args.before else "FILE" for a in sys.argv[1:])])
    (RESULTS / "coverage_vision.md").write_text(page(rows, started, load0, load1, command))
    (RESULTS / "coverage_vision.json").write_text(json.dumps({"started": started, "load": [load0, load1], "rows": rows,
                                                             "command": command}, indent=1, default=str))


COMMAND = ".venv/bin/python benchmarks/coverage_vision.py"


def page(rows: list, started: str, load0: float, load1: float, command: str = COMMAND) -> str:
    import torch

    sys.path.insert(0, str(HERE))
    from coverage_text import fresh, regimes  # noqa: E402  (the sister script's helpers)

    def fmt(counts):
        if not counts:
            return "–"
        by = ", ".join(f"{n} {g}" for g, n in sorted(counts["by_group"].items(), key=lambda kv: -kv[1]))
        return f"{counts['sites']} ({counts['skipped']})" + (f": {by}" if by else "")

    lines = ["| model | parameters | before: sites (skipped) | now: sites (skipped) | verify float32 | verify float64 | "
             "direct float64 | random_intertwiner / deepcopy | on fresh memory |", "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['family']} | {r['parameters'] / 1e6:.1f}M | {fmt(r['before'])} | {fmt(r)} | {r['verify32']} "
                     f"({r['rel32']:.0e}) | {r['verify64']} ({r['rel64']:.0e}) | {r['direct64']:.0e} | "
                     f"{r['random_intertwiner_s'] * 1e3:.0f} / {r['deepcopy_s'] * 1e3:.0f} ms = {r['ratio']:.2f} "
                     f"{'PASS' if r['pass'] else 'MISS'} | {fresh(r) if 'fresh_ratio' in r else '–'} |")
    errors = [f"- **{r['family']}**: verify raised {r['error']}" for r in rows if r.get("error")]
    timed_rows = [r for r in rows if "faults_median" in r]
    frozen = [f"- **{r['family']}**: " + "; ".join(r["skipped_reasons"][:6]) + (" …" if len(r["skipped_reasons"]) > 6 else "")
              for r in rows if r["skipped_reasons"] != ["the model's output"]]
    return "\n".join([
        "# Coverage of vision models: sites, groups, verify, cost (graph backend)", "",
        f"Run {started} on {platform.machine()} ({os.cpu_count()} cores, one torch thread, torch {torch.__version__}) "
        f"with `{command}`" + (" (FILE: `--maps-only` site counts from the tree before, here the previous "
                               "JSON's `before` column)" if "FILE" in command else "")
        + "; method in the script's docstring. Load average "
        f"(1 min) at start / end: {load0:.1f} / {load1:.1f}.", "",
        "Sites (places skipped) and the sites per group, before this work (commit 192c53b) and now. verify: the "
        "verdict and the largest relative output difference; *direct float64*: the same transform on a float64 "
        "copy, outputs compared by the script itself. Groups per kind of site are in the JSON (`groups`).", "",
        *lines, "",
        "Cost: CPU time on one torch thread, the minimum over `--reps` interleaved runs, against `copy.deepcopy` "
        "(the wall-clock ratios are in the JSON, `wall_ratio`). A dense (GL) site's transform is matrix products, "
        "not a copy: ViT and Swin (and timm's ViT, 72 maps) draw one GL(d_head) map per head for queries/keys and "
        "one for values/out-projection (288 on ViT-B/16, 276 on Swin-T). Where each model's time goes, measured, "
        "and what limits it: [coverage_costs.md](coverage_costs.md) (hand-written, dated; this page is generated "
        "and its figures are this run's).", "",
        *([regimes(timed_rows), ""] if timed_rows else []),
        *(["Errors:", "", *errors, ""] if errors else []),
        "What is still frozen (the first reasons; all of them in the JSON's `skipped_reasons`):", "", *frozen, "",
    ])


if __name__ == "__main__":
    main()
