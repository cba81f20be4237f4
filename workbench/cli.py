"""``workbench tour``: the headless main job. Writes a self-contained HTML report to a folder.
``workbench reproduce EXPERIMENT [--budget quick|paper] [--out DIR]``: one of the paper's experiments
on the zoo (``workbench.experiments``), resumable, written as JSON plus a generated page.

It runs the headline study on the shipped zoo and data (nothing is downloaded): the activation cache
and a streaming harvest on a Myrtle CNN, its symmetry map, a random intertwiner verified (float32
and float64) with a rotation as the negative control and the interpretation shift of each, a
privileged-basis test of two layers, G_ReLU- vs orthogonal-invariant similarity across two
independently trained seeds, a small stitching comparison, and the tiny TransformerLens decoder: its
hook names, LayerNorm folding, a random intertwiner of every site, non-symmetries that must fail, and
MLP neurons vs residual-stream coordinates.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
import time
from pathlib import Path


def _figure(report) -> str:
    """``report.plot()`` as an inline PNG (the page stays self-contained)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax = report.plot()
    fig = ax.figure if hasattr(ax, "figure") else ax
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return f"<img alt='figure' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'/>"


def _tour_harvest(model, batches, folder: Path, progress: bool):
    """The tour's harvest: one folder per seed; a rerun resumes it, and starts it over when the folder
    holds a harvest of other inputs (e.g. zoo weights of another workbench version), never reporting it."""
    import shutil

    import workbench as wb
    from workbench._errors import ResumeMismatchError

    options = dict(names=["1", "5"], reduce="spatial_mean", path=folder, progress=progress)
    try:
        return wb.harvest(model, batches, resume=folder.exists(), **options)
    except ResumeMismatchError:
        shutil.rmtree(folder)  # the tour's own output folder
        return wb.harvest(model, batches, **options)


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

    log("CNN: the zoo's Myrtle (ReLU, seed 0) on procedural shapes; capturing every hook name")
    cnn = wb.zoo.load("myrtle_relu", seed=seed)
    shapes = wb.data.shapes(640, size=32, seed=2, difficulty=0.3)  # the zoo's test distribution
    x = shapes.inputs[:64]
    names = wb.hook_names(cnn, example=x[:2])
    output, cache = wb.run_with_cache(cnn, x)
    # The BatchNorm output ("1") feeds a ReLU; the cache must hold the pre-ReLU values.
    bn_negative = float((cache["1"] < 0).float().mean())
    sections.append(("CNN: hook names", names._repr_html_()))
    sections.append(("CNN: activation cache of one forward pass (batch 64)", cache._repr_html_()))
    stats = cache.to_frame()
    stats["fraction ≤ 0"] = [float((cache[n] <= 0).float().mean()) for n in stats["name"]]
    sections.append(("CNN: per-name statistics", stats.to_html(index=False)))
    summary["cnn"] = {"model": "myrtle_relu", "names": len(names), "cache_bytes": cache.nbytes,
                      "bn_output_fraction_negative": bn_negative,
                      "accuracy_on_shapes": float((output.argmax(1) == shapes.labels[:64]).float().mean())}

    log("CNN: streaming a harvest to disk (reduce='spatial_mean')")
    train = wb.data.shapes(1024, size=32, seed=5, difficulty=0.3)
    batches = [(train.inputs[i:i + 128], train.labels[i:i + 128]) for i in range(0, 1024, 128)]
    reopened = _tour_harvest(cnn, batches, out / f"harvest-seed{seed}", progress)
    corr = np.corrcoef(reopened.array("5").T)
    sections.append(("CNN: harvested store (8 batches × 128, on disk)", reopened._repr_html_()))
    summary["harvest"] = {"rows": len(reopened), "complete": reopened.complete,
                          "folder": reopened.path.name, "model": reopened.fingerprint["model"]["parameters"],
                          "mean_abs_unit_correlation_layer5": float(np.abs(corr[np.triu_indices_from(corr, 1)]).mean())}

    log("CNN: symmetry map, a random intertwiner, verification and a negative control")
    smap = wb.symmetry_map(cnn)
    new, transform = wb.random_intertwiner(cnn, seed=seed)
    report = wb.verify(cnn, new, x, transform=transform)
    exact = wb.verify(cnn, new, x, transform=transform, dtype=torch.float64)
    site = smap[0].name
    rotated, forced = wb.random_intertwiner(cnn, seed=seed, sites=[site], group="orthogonal", allow_non_symmetry=True)
    control = wb.verify(cnn, rotated, x, transform=forced)
    data = shapes.inputs[128:640]
    shift = wb.interpretation_shift(cnn, new, data, site, k=10)
    shift_rot = wb.interpretation_shift(cnn, rotated, data, site, k=10)
    sections.append(("CNN: symmetry map (sites and their intertwiner groups)", smap._repr_html_()))
    sections.append(("CNN: a random element of each site's group — function unchanged",
                     report._repr_html_() + _figure(report)))
    sections.append((f"Negative control: a random rotation at ReLU site {site}", control._repr_html_()))
    sections.append(("Interpretation shift (top-10 examples per unit)",
                     f"<p>G_ReLU transform: {shift.summary()}</p><p>rotation: {shift_rot.summary()}</p>" + _figure(shift_rot)))
    summary["symmetry"] = {"sites": len(smap), "verify_float32": report.passed, "max_rel_diff_float32": report.max_rel_diff,
                           "max_rel_diff_float64": exact.max_rel_diff, "rotation_control_fails": not control.passed,
                           "top10_overlap_matched_grelu": float(shift.overlap_matched.mean()),
                           "top10_overlap_matched_rotation": float(shift_rot.overlap_matched.mean())}

    log("CNN: is the neuron basis privileged? (privileged-basis test, 50 bases per family)")
    summary["probing"] = {}
    for layer in ("13", "16"):
        _, c = wb.run_with_cache(cnn, shapes.inputs[:512], names=[layer])
        acts = c[layer].flatten(2).mean(2) if c[layer].ndim > 2 else c[layer]
        test = wb.probing.privileged_basis_test(acts, shapes.subset(torch.arange(512)), n_bases=50, seed=seed,
                                                group=smap["13"] if layer == "13" else "relu")
        frame = test.layer_frame()
        sections.append((f"Privileged basis? Myrtle layer {layer}", test._repr_html_() + _figure(test)))
        summary["probing"][layer] = {r["family"]: {"z": float(r["z"]), "p": float(r["p"])} for r in frame.to_dict("records")}

    log("Similarity and stitching across two independently trained seeds (site 9)")
    other = wb.zoo.load("myrtle_relu", seed=seed + 1)
    _, ca = wb.run_with_cache(cnn, shapes.inputs[:200], names=["9"])
    _, cb = wb.run_with_cache(other, shapes.inputs[:200], names=["9"])
    sim = wb.similarity.compare(ca["9"], cb["9"], measures=["grelu_cka", "standardized_cka", "linear_cka",
                                                              "grelu_procrustes", "orthogonal_procrustes"])
    sections.append(("Similarity of layer 9 across seeds 0 and 1: G_ReLU-invariant vs orthogonal-invariant",
                     sim._repr_html_()))
    stitches = {}
    for family in ("relu", "orthogonal", "gl"):
        r = wb.stitching.stitch(cnn, other, "9", family, train.subset(torch.arange(512)), epochs=1, seed=seed,
                                eval_data=shapes.subset(torch.arange(512)), init="match", lr=1e-3)
        stitches[family] = r
        sections.append((f"Stitching seed 0 → seed 1 at site 9 with {family}", r._repr_html_()))
    summary["similarity"] = {k: float(v) for k, v in sim.to_frame().set_index("measure")["similarity"].items()}
    summary["stitching_penalty"] = {k: float(r.penalty) for k, r in stitches.items()}

    log("Transformer: the zoo's tiny GELU decoder (TransformerLens, imported lazily)")
    model = wb.zoo.load("tiny_gelu")
    tnames = wb.hook_names(model)
    lang = wb.data.synthetic_language(48, seq_len=32, seed=2)
    tokens = lang.inputs
    _, tcache = wb.run_with_cache(model, tokens[:4], names="blocks.*.hook_resid_*")
    same = torch.equal(tcache["blocks.0.hook_in"], tcache["blocks.0.hook_resid_pre"])
    sections.append(("Transformer: hook names (aliases, names that need configuration)", tnames._repr_html_()))
    sections.append(("Transformer: residual stream cache", tcache._repr_html_()))
    tmap = wb.symmetry_map(model)
    folded = wb.fold_layernorm(model)
    fmap = wb.symmetry_map(folded)
    tnew, tt = wb.random_intertwiner(folded, seed=seed)
    treport = wb.verify(folded, tnew, tokens[:8], transform=tt, dtype=torch.float64)
    bad, bt = wb.random_intertwiner(folded, seed=seed, sites=["resid"], group="orthogonal", allow_non_symmetry=True)
    tcontrol = wb.verify(folded, bad, tokens[:8], transform=bt, dtype=torch.float64)
    mlp_new, _ = wb.random_intertwiner(folded, seed=seed, sites=["blocks.1.mlp"])
    res_new, _ = wb.random_intertwiner(folded, seed=seed, sites=["resid"])
    mlp_shift = wb.interpretation_shift(folded, mlp_new, tokens, "blocks.1.mlp", k=10)
    res_shift = wb.interpretation_shift(folded, res_new, tokens, "resid", k=10)
    sections.append(("Transformer: symmetry map before folding LayerNorm", tmap._repr_html_()))
    sections.append(("Transformer: symmetry map after wb.fold_layernorm", fmap._repr_html_()))
    sections.append(("Transformer: a random element of every site (float64) — log-probabilities unchanged",
                     treport._repr_html_() + _figure(treport)))
    sections.append(("Negative control: a general rotation of the folded stream (R·1 ≠ 1)", tcontrol._repr_html_()))
    sections.append(("Transformer: MLP neurons vs residual-stream coordinates (top-10 token contexts)",
                     f"<p>MLP permutation: {mlp_shift.summary()}</p><p>residual rotation: {res_shift.summary()}</p>"))
    summary["transformer"] = {"names": len(tnames), "fire_by_default": len(tnames.firing),
                              "aliases": len(tnames.aliases), "alias_resolves": same,
                              "resid_group": tmap["resid"].group.name, "resid_group_folded": fmap["resid"].group.name,
                              "verify_float64": treport.passed, "max_abs_logprob_diff": treport.max_abs_diff,
                              "rotation_control_fails": not tcontrol.passed,
                              "mlp_top10_overlap_matched": float(mlp_shift.overlap_matched.mean()),
                              "resid_top10_overlap_same_index": float(res_shift.overlap_same_index.mean())}

    log("Transformer: MiniLM (Hugging Face BERT in a bridge; post-LayerNorm)")
    minilm = wb.zoo.load("minilm")
    ids = wb.data.retokenize(wb.data.sentences(48, seed=2), minilm.tokenizer).inputs
    mmap = wb.symmetry_map(minilm)
    sites = ["resid", "blocks.2.attn.qk.0", "blocks.2.attn.ov.0", "blocks.2.attn.heads", "blocks.2.mlp"]
    mnew, mt = wb.random_intertwiner(minilm, seed=seed, sites=sites)
    mreport = wb.verify(minilm, mnew, ids[:8], transform=mt)
    mbad, mbt = wb.random_intertwiner(minilm, seed=seed, sites=["resid"], group="orthogonal", allow_non_symmetry=True)
    mcontrol = wb.verify(minilm, mbad, ids[:8], transform=mbt)
    ov_shift = wb.interpretation_shift(minilm, mnew, ids, "blocks.2.attn.ov.0", k=10)
    mlp_shift_m = wb.interpretation_shift(minilm, mnew, ids, "blocks.2.mlp", k=10)
    sections.append(("MiniLM: symmetry map (post-LayerNorm: the stream only permutes)", mmap._repr_html_()))
    sections.append(("MiniLM: a random element at the stream, one head's QK and OV, the heads and an MLP — "
                     "encoder outputs unchanged (in the new basis)", mreport._repr_html_() + _figure(mreport)))
    sections.append(("Negative control: a rotation of MiniLM's stream (post-LN: not a symmetry)", mcontrol._repr_html_()))
    sections.append(("MiniLM: value-space coordinates vs MLP neurons (top-10 token contexts)",
                     f"<p>per-head OV map (GL): {ov_shift.summary()}</p><p>MLP permutation: {mlp_shift_m.summary()}</p>"))
    summary["minilm"] = {"sites": len(mmap), "resid_group": mmap["resid"].group.name, "verify_float32": mreport.passed,
                         "compared": mreport.compared, "max_rel_diff": mreport.max_rel_diff,
                         "rotation_control_fails": not mcontrol.function_preserved,
                         "ov_top10_overlap_matched": float(ov_shift.overlap_matched.mean()),
                         "mlp_top10_overlap_matched": float(mlp_shift_m.overlap_matched.mean())}
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
    from .experiments import BUDGETS, EXPERIMENTS

    r = sub.add_parser("reproduce", help="run one of the paper's experiments on the zoo (resumable) and write its "
                                         "JSON and page")
    r.add_argument("experiment", choices=EXPERIMENTS)
    r.add_argument("--budget", choices=BUDGETS, default="quick",
                   help="quick (≤ 10 min, the default), paper (the paper's protocol at CPU scale: hours) or smoke")
    r.add_argument("--out", type=Path, default=None,
                   help="folder for <experiment>.json/.md (default: docs/results for paper, report/reproduce-<budget> else)")
    r.add_argument("--runs", type=Path, default=None, help="folder of the per-run records (default: <out>/.runs)")
    r.add_argument("--part", default=None, help="'i/n': run every n-th job from the i-th (n processes share one experiment)")
    r.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    r.add_argument("--report-only", action="store_true", help="run nothing; write the JSON and page from finished runs")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    if args.command == "tour":
        tour(args.out, seed=args.seed, progress=not args.quiet)
    elif args.command == "reproduce":
        import torch

        from .experiments import reproduce

        if args.threads:
            torch.set_num_threads(args.threads)
        path = reproduce(args.experiment, args.budget, args.out, runs=args.runs, part=args.part,
                         progress=not args.quiet, report_only=args.report_only,
                         log=(lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True)))
        return 0 if path is not None or args.part else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
