"""``workbench tour``: the headless main job. Writes a self-contained HTML report to a folder.

Until the zoo lands, the tour runs on models built procedurally from a seed (no downloads): a small
CNN on procedural images and a tiny TransformerLens model — capture, aliases, in-place safety, a
streaming disk harvest, the CNN's symmetry map, a random intertwiner verified (float32 and float64),
a rotation as the negative control, and how top-activating examples move under each.
"""
from __future__ import annotations

import argparse
import html
import json
import sys
import time
from pathlib import Path


def _cnn(seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()


def _images(n: int, seed: int):
    """Procedural images: coloured Gaussian blobs on noise, [n, 3, 32, 32]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    centre = torch.rand(n, 2, generator=g) * 24 + 4
    blob = torch.exp(-((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2) / 18)
    colour = torch.rand(n, 3, 1, 1, generator=g)
    return colour * blob[:, None] + 0.1 * torch.randn(n, 3, 32, 32, generator=g)


def _tiny_transformer(seed: int):
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(d_model=64, d_head=16, n_heads=4, n_layers=2, n_ctx=32, d_vocab=100,
                                  act_fn="gelu", seed=seed, normalization_type="LN")
    return TransformerBridge.boot_native(cfg)


def tour(out: Path, seed: int = 0, progress: bool = True) -> Path:
    """Run the tour and write ``out/index.html`` (plus ``summary.json`` and the harvested store)."""
    import numpy as np
    import torch

    import workbench as wb

    out.mkdir(parents=True, exist_ok=True)
    sections, summary = [], {"seed": seed}
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        if progress:
            print(f"[{time.perf_counter() - t0:5.1f}s] {msg}", file=sys.stderr)

    log("CNN: capturing every hook name")
    cnn, x = _cnn(seed), _images(64, seed)
    names = wb.hook_names(cnn, example=x[:2])
    output, cache = wb.run_with_cache(cnn, x)
    # ReLU(inplace=True) overwrites the BatchNorm output; the cache must still hold the pre-ReLU values.
    bn_negative = float((cache["1"] < 0).float().mean())
    sections.append(("CNN: hook names", names._repr_html_()))
    sections.append(("CNN: activation cache of one forward pass (batch 64)", cache._repr_html_()))
    stats = cache.to_frame()
    stats["fraction ≤ 0"] = [float((cache[n] <= 0).float().mean()) for n in stats["name"]]
    sections.append(("CNN: per-name statistics", stats.to_html(index=False)))
    summary["cnn"] = {"names": len(names), "cache_bytes": cache.nbytes,
                      "bn_output_fraction_negative": bn_negative}

    log("CNN: streaming a harvest to disk (reduce='spatial_mean')")
    batches = [(_images(128, seed + i), torch.full((128,), i)) for i in range(8)]
    wb.harvest(cnn, batches, names=["1", "5"], reduce="spatial_mean",
                       path=out / "harvest", progress=progress, resume=(out / "harvest").exists())
    reopened = wb.ActivationStore.open(out / "harvest")
    corr = np.corrcoef(reopened.array("5").T)
    sections.append(("CNN: harvested store (8 batches × 128, on disk)", reopened._repr_html_()))
    summary["harvest"] = {"rows": len(reopened), "complete": reopened.complete,
                          "mean_abs_unit_correlation_layer5": float(np.abs(corr[np.triu_indices_from(corr, 1)]).mean())}

    log("CNN: symmetry map, a random intertwiner, verification and a negative control")
    smap = wb.symmetry_map(cnn)
    new, transform = wb.random_intertwiner(cnn, seed=seed)
    report = wb.verify(cnn, new, x, transform=transform)
    exact = wb.verify(cnn, new, x, transform=transform, dtype=torch.float64)
    site = smap[0].name
    rotated, forced = wb.random_intertwiner(cnn, seed=seed, sites=[site], group="orthogonal", allow_non_symmetry=True)
    control = wb.verify(cnn, rotated, x, transform=forced)
    data = _images(512, seed + 100)
    shift = wb.interpretation_shift(cnn, new, data, site, k=10)
    shift_rot = wb.interpretation_shift(cnn, rotated, data, site, k=10)
    sections.append(("CNN: symmetry map (sites and their intertwiner groups)", smap._repr_html_()))
    sections.append(("CNN: a random element of each site's group — function unchanged", report._repr_html_()))
    sections.append((f"Negative control: a random rotation at ReLU site {site}", control._repr_html_()))
    sections.append(("Interpretation shift (top-10 examples per unit)",
                     f"<p>G_ReLU transform: {shift.summary()}</p><p>rotation: {shift_rot.summary()}</p>"))
    summary["symmetry"] = {"sites": len(smap), "verify_float32": report.passed, "max_rel_diff_float32": report.max_rel_diff,
                           "max_rel_diff_float64": exact.max_rel_diff, "rotation_control_fails": not control.passed,
                           "top10_overlap_matched_grelu": float(shift.overlap_matched.mean()),
                           "top10_overlap_matched_rotation": float(shift_rot.overlap_matched.mean())}

    log("Transformer: TransformerLens bridge (imported lazily)")
    model = _tiny_transformer(seed)
    tnames = wb.hook_names(model)
    tokens = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(seed))
    _, tcache = wb.run_with_cache(model, tokens, names="blocks.*.hook_resid_*")
    same = torch.equal(tcache["blocks.0.hook_in"], tcache["blocks.0.hook_resid_pre"])
    sections.append(("Transformer: hook names (aliases, names that need configuration)", tnames._repr_html_()))
    sections.append(("Transformer: residual stream cache", tcache._repr_html_()))
    summary["transformer"] = {"names": len(tnames), "fire_by_default": len(tnames.firing),
                              "aliases": len(tnames.aliases), "alias_resolves": same}
    summary["seconds"] = round(time.perf_counter() - t0, 2)

    body = "".join(f"<h2>{html.escape(t)}</h2>{h}" for t, h in sections)
    facts = "".join(f"<li><code>{html.escape(k)}</code>: {html.escape(json.dumps(v))}</li>" for k, v in summary.items())
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>workbench tour</title>"
            f"<style>body{{font-family:sans-serif;max-width:70em;margin:auto}}td,th{{padding:2px 8px}}</style>"
            f"</head><body><h1>workbench tour</h1><ul>{facts}</ul>{body}</body></html>")
    (out / "index.html").write_text(page)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"report written to {out / 'index.html'}")
    return out / "index.html"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="workbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("tour", help="run the headless tour and write an HTML report")
    p.add_argument("--out", type=Path, default=Path("report"), help="folder for the report (default: report/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    if args.command == "tour":
        tour(args.out, seed=args.seed, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
