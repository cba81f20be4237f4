"""``workbench tour``: the headline study on the shipped zoo and data, as one page a researcher can send.

It runs (nothing is downloaded): the activation cache and a streaming harvest on a Myrtle CNN, its
symmetry map, a random intertwiner verified (float32 and float64) with a rotation as the negative
control and the interpretation shift of each, a privileged-basis test of two layers, G_ReLU- vs
orthogonal-invariant similarity across two independently trained seeds, a small stitching comparison,
the tiny TransformerLens decoder (hook names, LayerNorm folding, a random element of every site,
non-symmetries that must fail, MLP neurons vs residual-stream coordinates) and MiniLM (a Hugging Face
model through the same verbs). The page (``workbench/_page.py``) puts the verdicts first; every
number is in ``summary.json`` beside it. Each phase is logged (``logging``, logger ``workbench.tour``)
with its time, also recorded in the summary.
"""
from __future__ import annotations

import logging
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("workbench.tour")


def _harvest(model, batches, folder: Path, progress: bool):
    """One folder per seed; a rerun resumes it, and starts it over when the folder holds a harvest of
    other inputs (e.g. zoo weights of another workbench version), never reporting it."""
    import workbench as wb
    from workbench._errors import ResumeMismatchError

    options = dict(names=["1", "5"], reduce="spatial_mean", path=folder, progress=progress)
    try:
        return wb.harvest(model, batches, resume=folder.exists(), **options)
    except ResumeMismatchError:
        shutil.rmtree(folder)  # the tour's own output folder
        return wb.harvest(model, batches, **options)


@contextmanager
def _library_bars(on: bool):
    """transformers' own progress bars (its "Loading weights" bar when MiniLM is booted) follow ``progress``: they
    are not ours to pass ``disable=`` to, so ``workbench tour --quiet`` printed one. Restored afterwards."""
    if on:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def tour(out: Path, seed: int = 0, progress: bool = True) -> Path:
    """Run the tour and write ``out/index.html`` (plus ``summary.json`` and the harvested store)."""
    import numpy as np
    import torch

    import workbench as wb
    from workbench._page import Page

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"seed": seed, "phases": {}}
    page = Page("workbench tour", intro=(
        f"The shipped zoo and procedural data through every verb, seed {seed}. Each verdict links to its "
        f"evidence; every number on this page is in the JSON at the end. Trained models: docs/ZOO.md."))
    t0 = time.perf_counter()

    @contextmanager
    def phase(name: str):
        start = time.perf_counter()
        log.info("%s …", name)
        yield
        seconds = time.perf_counter() - start
        summary["phases"][name] = round(seconds, 2)
        log.info("%s: %.1f s (%.0f s in all)", name, seconds, time.perf_counter() - t0)

    with phase("CNN: activation cache"):
        cnn = wb.zoo.load("myrtle_relu", seed=seed)
        shapes = wb.data.shapes(640, size=32, seed=2, difficulty=0.3)  # the zoo's test distribution
        x = shapes.inputs[:64]
        names = wb.hook_names(cnn, example=x[:2])
        output, cache = wb.run_with_cache(cnn, x)
        # The BatchNorm output ("1") feeds an in-place ReLU; the cache must hold the pre-ReLU values.
        bn_negative = float((cache["1"] < 0).float().mean())
        stats = cache.to_frame()
        stats["fraction ≤ 0"] = [float((cache[n] <= 0).float().mean()) for n in stats["name"]]
        accuracy = float((output.argmax(1) == shapes.labels[:64]).float().mean())
        summary["cnn"] = {"model": "myrtle_relu", "names": len(names), "cache_bytes": cache.nbytes,
                          "bn_output_fraction_negative": bn_negative, "accuracy_on_shapes": accuracy}
        page.section("cnn-names", "hook names", names._repr_html_(), group="CNN")
        page.section("cnn-cache", "the activation cache of one forward pass (batch 64)",
                     cache._repr_html_() + stats.to_html(index=False, border=0, float_format=lambda v: f"{v:.3g}"),
                     group="CNN", caveat="one batch of 64 images; the fractions describe these images only")
        page.check("the in-place ReLU did not overwrite the cached BatchNorm output", bn_negative > 0.2,
                   f"{bn_negative:.0%} of the cached BatchNorm outputs are negative (a ReLU output has none)",
                   "cnn-cache")

    with phase("CNN: streaming harvest"):
        train = wb.data.shapes(1024, size=32, seed=5, difficulty=0.3)
        batches = [(train.inputs[i:i + 128], train.labels[i:i + 128]) for i in range(0, 1024, 128)]
        store = _harvest(cnn, batches, out / f"harvest-seed{seed}", progress)
        corr = np.corrcoef(store.array("5").T)
        summary["harvest"] = {"rows": len(store), "complete": store.complete, "folder": store.path.name,
                              "model": store.fingerprint["model"]["parameters"],
                              "mean_abs_unit_correlation_layer5": float(np.abs(corr[np.triu_indices_from(corr, 1)]).mean())}
        page.section("harvest", "a harvest streamed to disk (8 batches × 128, reduce='spatial_mean')",
                     store._repr_html_(), group="CNN")
        page.check("the harvest is complete, every row written", store.complete and len(store) == 1024,
                   f"{len(store)} rows of 1024, complete={store.complete}, checksums verified on read", "harvest")

    with phase("CNN: symmetries"):
        smap = wb.symmetry_map(cnn, x)
        new, transform = wb.random_intertwiner(cnn, seed=seed, example=x)
        report = wb.verify(cnn, new, x, transform=transform)
        exact = wb.verify(cnn, new, x, transform=transform, dtype=torch.float64)
        site = smap[0].name
        rotated, forced = wb.random_intertwiner(cnn, seed=seed, sites=[site], group="orthogonal",
                                                allow_non_symmetry=True, example=x)
        control = wb.verify(cnn, rotated, x, transform=forced)
        data = shapes.inputs[128:640]
        shift = wb.interpretation_shift(cnn, new, data, site, k=10)
        shift_rot = wb.interpretation_shift(cnn, rotated, data, site, k=10)
        summary["symmetry"] = {"sites": len(smap), "verify_float32": report.passed,
                               "max_rel_diff_float32": report.max_rel_diff, "max_rel_diff_float64": exact.max_rel_diff,
                               "rotation_control_fails": not control.passed,
                               "top10_overlap_matched_grelu": float(shift.overlap_matched.mean()),
                               "top10_overlap_matched_rotation": float(shift_rot.overlap_matched.mean())}
        page.section("cnn-map", "symmetry map: sites and their intertwiner groups", smap._repr_html_(), group="CNN")
        page.section("cnn-verify", "a random element of each site's group", report._repr_html_(), group="CNN",
                     figure=report, caption="Per site: how far the activations moved (representation change) and "
                     "how far they are from where the element says (equivariance error), against the float32 "
                     "tolerance (dashed).", caveat="64 test images, one random element (seed "
                     f"{seed}); float64 rerun: max relative difference {exact.max_rel_diff:.1e}")
        page.check("a random element of every site's group keeps the function (float32)", report.passed,
                   report.summary(), "cnn-verify")
        page.check("… and exactly so in float64", exact.passed, exact.summary(), "cnn-verify")
        page.section("cnn-control", f"negative control: a random rotation at ReLU site {site}",
                     control._repr_html_(), group="CNN")
        page.check(f"a rotation at ReLU site {site} changes the function (negative control)", not control.passed,
                   control.summary(), "cnn-control")
        page.section("cnn-shift", "interpretation shift: top-10 examples per unit",
                     f"<p>G_ReLU element: {shift.summary()}</p><p>rotation: {shift_rot.summary()}</p>", group="CNN",
                     figure=shift_rot, caption="After the rotation, how many of each unit's top-10 images remain "
                     "its top-10 (matched: after the best one-to-one matching of units).",
                     caveat=f"{len(data)} images; unit-level overlap, not a test of meaning")
        page.check("G_ReLU transform: every unit keeps its top-10 images (relabelled)",
                   bool(float(shift.overlap_matched.mean()) == 1.0),
                   f"mean matched overlap {float(shift.overlap_matched.mean()):.3f} (rotation: "
                   f"{float(shift_rot.overlap_matched.mean()):.3f})", "cnn-shift")

    with phase("CNN: privileged-basis tests"):
        summary["probing"] = {}
        for layer in ("13", "16"):
            _, c = wb.run_with_cache(cnn, shapes.inputs[:512], names=[layer])
            acts = c[layer].flatten(2).mean(2) if c[layer].ndim > 2 else c[layer]
            test = wb.probing.privileged_basis_test(acts, shapes.subset(torch.arange(512)), n_bases=50, seed=seed,
                                                    group=smap["13"] if layer == "13" else "relu")
            frame = test.layer_frame()
            summary["probing"][layer] = {r["family"]: {"z": float(r["z"]), "p": float(r["p"])}
                                         for r in frame.to_dict("records")}
            page.section(f"probe-{layer}", f"is the neuron basis of layer {layer} privileged?", test._repr_html_(),
                         group="CNN", figure=test, caption="Per concept: the best unit's |AUROC − 0.5| in the neuron "
                         "basis (star) against the same statistic in 50 random bases of each family.",
                         caveat="50 bases per family, so the smallest p-value is 1/51 ≈ 0.02; 512 images")
        own = summary["probing"]["13"]["scaled_permutation"]["p"]
        page.check("bases from the layer's own group (P·D₊) give the neuron basis's statistic exactly",
                   own == 1.0, f"p = {own:.2f} against the own group at layer 13 (1 means identical)", "probe-13")

    with phase("similarity and stitching across seeds"):
        other = wb.zoo.load("myrtle_relu", seed=seed + 1)
        _, ca = wb.run_with_cache(cnn, shapes.inputs[:200], names=["9"])
        _, cb = wb.run_with_cache(other, shapes.inputs[:200], names=["9"])
        sim = wb.similarity.compare(ca["9"], cb["9"], measures=["grelu_cka", "standardized_cka", "linear_cka",
                                                                  "grelu_procrustes", "orthogonal_procrustes"])
        summary["similarity"] = {k: float(v) for k, v in sim.to_frame().set_index("measure")["similarity"].items()}
        page.section("similarity", f"similarity of layer 9 across seeds {seed} and {seed + 1}", sim._repr_html_(),
                     group="Across seeds", caveat="one pair of models, 200 images; the paper's protocol and its "
                     "intervals are in docs/results/similarity.md")
        stitches = {}
        rows = []
        for family in ("relu", "orthogonal", "gl"):
            r = wb.stitching.stitch(cnn, other, "9", family, train.subset(torch.arange(512)), epochs=1, seed=seed,
                                    eval_data=shapes.subset(torch.arange(512)), init="match", lr=1e-3)
            stitches[family] = r
            rows.append(f"<tr><td>{family}</td><td>{r.penalty:+.1f}</td><td>{r.summary()}</td></tr>")
        summary["stitching_penalty"] = {k: float(r.penalty) for k, r in stitches.items()}
        page.section("stitching", f"stitching seed {seed} → seed {seed + 1} at site 9",
                     "<table><thead><tr><th>family</th><th>penalty (points)</th><th>result</th></tr></thead><tbody>"
                     + "".join(rows) + "</tbody></table>", group="Across seeds",
                     caveat="one epoch from each family's closed-form fit on 512 images, one pair: a smoke test of "
                     "the machinery, far from the paper's protocol. Penalties at the paper's protocol, with "
                     "intervals over pairs: docs/results/stitching.md")

    with phase("Transformer: the tiny decoder"):
        model = wb.zoo.load("tiny_gelu")
        tnames = wb.hook_names(model)
        tokens = wb.data.synthetic_language(48, seq_len=32, seed=2).inputs
        _, tcache = wb.run_with_cache(model, tokens[:4], names="blocks.*.hook_resid_*")
        same = torch.equal(tcache["blocks.0.hook_in"], tcache["blocks.0.hook_resid_pre"])
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
        summary["transformer"] = {"names": len(tnames), "fire_by_default": len(tnames.firing),
                                  "aliases": len(tnames.aliases), "alias_resolves": same,
                                  "resid_group": tmap["resid"].group.name, "resid_group_folded": fmap["resid"].group.name,
                                  "verify_float64": treport.passed, "max_abs_logprob_diff": treport.max_abs_diff,
                                  "rotation_control_fails": not tcontrol.passed,
                                  "mlp_top10_overlap_matched": float(mlp_shift.overlap_matched.mean()),
                                  "resid_top10_overlap_same_index": float(res_shift.overlap_same_index.mean())}
        g = "Tiny decoder"
        page.section("tl-names", "hook names (aliases, names that need configuration)", tnames._repr_html_(), group=g)
        page.section("tl-cache", "residual stream cache", tcache._repr_html_(), group=g)
        page.check("TransformerLens aliases resolve to the same values", same,
                   "blocks.0.hook_in equals blocks.0.hook_resid_pre", "tl-cache")
        page.section("tl-map", "symmetry map before folding LayerNorm", tmap._repr_html_(), group=g)
        page.section("tl-map-folded", "symmetry map after wb.fold_layernorm", fmap._repr_html_(), group=g)
        page.section("tl-verify", "a random element of every site (float64)", treport._repr_html_(), group=g,
                     figure=treport, caption="Per site: representation change and equivariance error against the "
                     "float64 tolerance (dashed).", caveat="8 sequences of 32 tokens, one element per site")
        page.check("a random element of every site keeps the log-probabilities (float64)", treport.passed,
                   treport.summary(), "tl-verify")
        page.section("tl-control", "negative control: a general rotation of the folded stream (R·1 ≠ 1)",
                     tcontrol._repr_html_(), group=g)
        page.check("a general rotation of the folded stream changes the function", not tcontrol.passed,
                   tcontrol.summary(), "tl-control")
        page.section("tl-shift", "MLP neurons vs residual-stream coordinates (top-10 token contexts)",
                     f"<p>MLP permutation: {mlp_shift.summary()}</p><p>residual rotation: {res_shift.summary()}</p>",
                     group=g, caveat=f"{tokens.numel()} token contexts; a rotation fixing 1 is a symmetry, so the "
                     "residual coordinates' contexts are basis artefacts here")

    with phase("Transformer: MiniLM"):
        with _library_bars(progress):
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
        summary["minilm"] = {"sites": len(mmap), "resid_group": mmap["resid"].group.name,
                             "verify_float32": mreport.passed, "compared": mreport.compared,
                             "max_rel_diff": mreport.max_rel_diff, "rotation_control_fails": not mcontrol.function_preserved,
                             "ov_top10_overlap_matched": float(ov_shift.overlap_matched.mean()),
                             "mlp_top10_overlap_matched": float(mlp_shift_m.overlap_matched.mean())}
        g = "MiniLM"
        page.section("minilm-map", "symmetry map (post-LayerNorm: the stream only permutes)", mmap._repr_html_(), group=g)
        page.section("minilm-verify", "a random element at the stream, one head's QK and OV, the heads and an MLP",
                     mreport._repr_html_(), group=g, figure=mreport, caption="Encoder outputs compared in the new "
                     "basis; per site, representation change and equivariance error against the float32 tolerance.",
                     caveat="8 sentences")
        page.check("MiniLM: a random element of five sites keeps the encoder output (float32)", mreport.passed,
                   mreport.summary(), "minilm-verify")
        page.section("minilm-control", "negative control: a rotation of MiniLM's stream (post-LayerNorm: not a symmetry)",
                     mcontrol._repr_html_(), group=g)
        page.check("MiniLM: a rotation of the post-LayerNorm stream changes the function",
                   not mcontrol.function_preserved, mcontrol.summary(), "minilm-control")
        page.section("minilm-shift", "value-space coordinates vs MLP neurons (top-10 token contexts)",
                     f"<p>per-head OV map (GL): {ov_shift.summary()}</p><p>MLP permutation: {mlp_shift_m.summary()}</p>",
                     group=g, caveat=f"{ids.numel()} token positions of 48 templated sentences")

    summary["seconds"] = round(time.perf_counter() - t0, 2)
    path = page.write(out, summary)
    log.info("report written to %s", path)
    return path
