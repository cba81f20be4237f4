"""Network Dissection on the zoo's Myrtle CNNs, with a null: how many detectors does a random basis get?

For each model, seed and layer the conv maps are dissected (NetDissect-Lite: threshold each unit at
its top 0.005 quantile, bilinear upsampling, a unit is a detector when its best concept IoU > 0.04)
in the neuron basis, in K random rotations of the channel basis (Haar, SO(C)) — the null — and in a
random element of the layer's own group (P·D₊ for ReLU, P for GELU), which must give exactly the
neuron basis's count. One run is one (model, seed, layer).
"""
from __future__ import annotations

import torch

from ._stats import INTERVALS, excludes_zero, fmt, median_ci

NAME = "dissection"
TITLE = "Network Dissection with a random-basis null"
LAYERS = {"9": "ReLU/GELU 3", "13": "ReLU/GELU 4"}


def protocol(budget: str) -> dict:
    p = {"models": {"myrtle_relu": [0, 1, 2, 3], "myrtle_gelu": [0, 1, 2, 3]}, "layers": list(LAYERS),
         "n_images": 1000, "images": "the first N images of the zoo's test set, with their concept masks",
         "rotations": 10, "quantile": 0.005, "iou_threshold": 0.04, "sweep_alphas": [0.0, 0.25, 0.5, 0.75, 1.0],
         # how a pixel is on (workbench.probing.dissect, since 2026-12-05; runs before it counted a ≥ T at an interpolated
         # quantile): a stored run of the older rule no longer matches this protocol and is recomputed
         "on": "activation > T, T just below the unit's top ceil(quantile·N) values"}
    if budget == "paper":
        return p
    if budget == "quick":
        return {**p, "models": {"myrtle_relu": [0, 1], "myrtle_gelu": [0]}, "n_images": 300, "rotations": 3,
                "sweep_alphas": [0.0, 0.5, 1.0]}
    if budget == "smoke":
        return {**p, "models": {"myrtle_relu": [0, 1]}, "layers": ["13"], "n_images": 60, "rotations": 2,
                "sweep_alphas": [0.0, 1.0]}
    from .._errors import InvalidOptionError
    from . import BUDGETS
    raise InvalidOptionError(f"budget={budget!r} is not a valid option; expected one of {BUDGETS!r}.")


def settings(p: dict, job: dict) -> dict:
    """What one run depends on: everything but the lists of models, seeds and layers."""
    return {k: v for k, v in p.items() if k not in ("models", "layers")}


def jobs(p: dict) -> list[dict]:
    return [{"model": m, "seed": s, "layer": lay} for m, seeds in p["models"].items() for s in seeds for lay in p["layers"]]


def run(job: dict, p: dict, ctx: dict) -> list[dict]:
    from .. import zoo
    from ..groups import get_group
    from ..hooks import run_with_cache
    from ..probing import dissect, dissection_sweep
    from ..symmetry import symmetry_map
    from . import _data

    if "ds" not in ctx:
        ctx["ds"] = _data.split("test", p["n_images"])
    ds = ctx["ds"]
    model = zoo.load(job["model"], seed=job["seed"])
    with torch.no_grad():
        maps = torch.cat([run_with_cache(model, xb, names=[job["layer"]])[1][job["layer"]] for xb in ds.inputs.split(250)])
    C = maps.shape[1]
    opts = {"quantile": p["quantile"], "iou_threshold": p["iou_threshold"]}
    base = {**job, "site": job["layer"], "group": job["model"]}
    rows = []

    def add(basis, d, draw=None):
        extra = {"basis": basis} if draw is None else {"basis": basis, "draw": draw}
        rows.append({**base, **extra, "metric": "detectors", "value": len(d.detectors)})
        rows.append({**base, **extra, "metric": "unique_detectors", "value": d.unique_detectors})

    add("neuron", dissect(maps, ds, **opts))
    own = symmetry_map(model).sites
    group = next(s.group for s in own if s.hook_name == job["layer"] or any(o.name == job["layer"] for o in s.observed))
    add("own_group", dissect(maps, ds, basis=group.sample(seed=1000 + job["seed"]), **opts))
    for k in range(p["rotations"]):
        Q = get_group("special_orthogonal", C).sample(seed=k)
        add("rotation", dissect(maps, ds, basis=Q, **opts), draw=k)
    sweep = dissection_sweep(maps, ds, alphas=p["sweep_alphas"], seed=0, **opts).to_frame()
    for a, det, uni in zip(sweep.alpha, sweep.detectors, sweep.unique_detectors):
        rows.append({**base, "basis": "geodesic", "alpha": float(a), "metric": "detectors", "value": int(det)})
        rows.append({**base, "basis": "geodesic", "alpha": float(a), "metric": "unique_detectors", "value": int(uni)})
    return rows


# ------------------------------------------------------------------------------------------ summaries
def per_seed(doc, model, layer, metric="detectors") -> dict:
    """``{seed: (neuron, null mean, own group, [null draws])}``."""
    out = {}
    for seed in doc["protocol"]["models"][model]:
        rs = [r for r in doc["runs"] if r["model"] == model and r["seed"] == seed and r["layer"] == layer
              and r["metric"] == metric]
        if not rs:
            continue
        neuron = next(r["value"] for r in rs if r["basis"] == "neuron")
        own = next(r["value"] for r in rs if r["basis"] == "own_group")
        null = [r["value"] for r in rs if r["basis"] == "rotation"]
        out[seed] = (neuron, sum(null) / len(null), own, null)
    return out


def rows(doc, metric="detectors") -> list[dict]:
    out = []
    for model in doc["protocol"]["models"]:
        for layer in doc["protocol"]["layers"]:
            ps = per_seed(doc, model, layer, metric)
            if not ps:
                continue
            diff = median_ci([n - m for n, m, _, _ in ps.values()])
            # Per seed: +1-corrected share of rotations with at least the neuron basis's count.
            pvals = [(1 + sum(v >= n for v in null)) / (1 + len(null)) for n, _, _, null in ps.values()]
            out.append({"model": model, "layer": layer, "neuron": median_ci([v[0] for v in ps.values()]),
                        "null": median_ci([v[1] for v in ps.values()]), "diff": {**diff, "sign": excludes_zero(diff)},
                        "own_equal": all(v[0] == v[2] for v in ps.values()), "p_max": max(pvals), "seeds": len(ps)})
    return out


def headlines(doc) -> list[dict]:
    return [{"experiment": NAME, "what": f"{r['model']} layer {r['layer']}: detectors, neuron basis vs random rotations",
             "ours": f"{fmt(r['neuron'])} vs {fmt(r['null'])}", "paper": "AlexNet conv5: 79 → ~16 unique (Bau et al.)"}
            for r in rows(doc)]


def page(doc) -> str:
    from ._page import header, table

    p = doc["protocol"]
    lines = header(doc, TITLE)
    lines += ["## Protocol", "",
              f"- Models: " + "; ".join(f"`{m}` seeds {s}" for m, s in p["models"].items()) + f"; layers {p['layers']} "
              "(after the activation, before pooling).",
              f"- Images: N = {p['n_images']}, {p['images']}; NetDissect-Lite thresholds: top {p['quantile']} quantile per unit, "
              f"IoU > {p['iou_threshold']} counts a detector.",
              f"- Null: {p['rotations']} Haar rotations of the channel basis per model and layer (the same draws for every model "
              "of one width); own group: one random element of the layer's group from `wb.symmetry_map`.",
              f"- Over seeds, {INTERVALS}. The difference is paired by seed; p = the largest per-seed +1-corrected share "
              "of rotations with at least as many detectors.", ""]
    for metric in ("detectors", "unique_detectors"):
        rs = rows(doc, metric)
        lines += [f"## {metric.replace('_', ' ').capitalize()}", "",
                  table(["model", "layer", "neuron basis", "rotations (mean per seed)", "neuron − rotations", "p (max over seeds)",
                         "own group = neuron"],
                        [[r["model"], r["layer"], fmt(r["neuron"]), fmt(r["null"]), fmt(r["diff"]), f"{r['p_max']:.3g}",
                          "yes" if r["own_equal"] else "NO"] for r in rs]), ""]
        for r in rs:
            c = r["diff"]
            if c["sign"] == 1:
                lines.append(f"- `{r['model']}` layer {r['layer']}: the neuron basis has more {metric.replace('_', ' ')} than "
                             f"random rotations ({fmt(c)}; interval excludes 0).")
            elif c["sign"] == -1:
                lines.append(f"- `{r['model']}` layer {r['layer']}: the neuron basis has fewer {metric.replace('_', ' ')} "
                             f"than random rotations ({fmt(c)}; interval excludes 0).")
            elif c["sign"] == 0:
                lines.append(f"- `{r['model']}` layer {r['layer']}: no difference shown ({fmt(c)}).")
        lines.append("")
    sweep = [r for r in doc["runs"] if r["basis"] == "geodesic" and r["metric"] == "detectors"]
    if sweep:
        alphas = p["sweep_alphas"]
        lines += ["## Geodesic from the neuron basis (α = 0) to a random rotation (α = 1): detectors, median over seeds", "",
                  table(["model", "layer"] + [f"α = {a:g}" for a in alphas],
                        [[m, lay] + [fmt(median_ci([r["value"] for r in sweep if r["model"] == m and r["layer"] == lay
                                                    and r["alpha"] == a]), 0) for a in alphas]
                         for m in p["models"] for lay in p["layers"]]), ""]
    return "\n".join(lines)
