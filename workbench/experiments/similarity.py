"""Similarity across seeds (paper §5): G_ReLU- vs orthogonal-invariant measures, widths, layer×layer, ResNet-20.

Each run compares two independently trained seeds of one family on the same test images: every
activation layer with itself (the paper's "diagonal"), or every layer with every layer (the CKA
matrices), with measures from ``wb.similarity``. A control run compares seed 0 with a
function-preserving random transform of itself (``wb.random_intertwiner``): a measure invariant
to the layer's group must read 1 there.
"""
from __future__ import annotations

import itertools

import torch
from torch import nn

from ._runs import cyclic_pairs
from ._stats import INTERVALS, excludes_zero, fmt, median_ci, no_verdict, paired

NAME = "similarity"
TITLE = "Similarity across seeds (paper §5)"
HEADLINE = ["grelu_procrustes", "orthogonal_procrustes", "grelu_cka", "standardized_cka", "linear_cka_unbiased"]
# Godfrey et al. 2022 §5, Myrtle CNN (width 64, CIFAR-10), four ReLU layers. Their "orthogonal" CKA standardises
# each channel first: our standardized_cka.
PAPER = {"grelu_procrustes": (0.62, 0.51, 0.44, 0.49), "orthogonal_procrustes": (0.77, 0.57, 0.51, 0.58),
         "grelu_cka": (0.84, 0.61, 0.45, 0.43), "standardized_cka": (0.98, 0.97, 0.92, 0.93)}
GAPS = [("orthogonal_procrustes", "grelu_procrustes"), ("standardized_cka", "grelu_cka")]
WIDTHS = {"myrtle_relu_w8": 8, "myrtle_relu": 16, "myrtle_relu_w32": 32}


def protocol(budget: str) -> dict:
    from .. import zoo

    if budget not in ("paper", "quick", "smoke"):
        from .._errors import InvalidOptionError
        from . import BUDGETS
        raise InvalidOptionError(f"budget={budget!r} is not a valid option; expected one of {BUDGETS!r}.")
    all_measures = list(__import__("workbench.similarity", fromlist=["MEASURES"]).MEASURES)
    p = {"n_images": 500, "images": "the first N images of the zoo's test set (shapes seed 2)",
         "layers": "every activation module (ReLU/GELU), after BatchNorm and before pooling",
         "families": {"myrtle_relu": {"pairs": cyclic_pairs(list(range(8)), 8), "measures": all_measures},
                      "myrtle_gelu": {"pairs": cyclic_pairs([0, 1, 2, 3], 4), "measures": HEADLINE},
                      "myrtle_relu_w8": {"pairs": cyclic_pairs([0, 1, 2, 3], 4), "measures": HEADLINE},
                      "myrtle_relu_w32": {"pairs": cyclic_pairs([0, 1, 2], 3), "measures": HEADLINE},
                      "resnet20_relu": {"pairs": cyclic_pairs([0, 1, 2, 3], 3), "measures": HEADLINE}},
         "controls": ["myrtle_relu", "myrtle_gelu"],
         "matrix": {"family": "myrtle_relu", "pairs": cyclic_pairs(list(range(8)), 4), "measures": ["grelu_cka", "standardized_cka"]}}
    if budget == "quick":
        p.update(n_images=200, families={k: {**v, "pairs": v["pairs"][:2], "measures": HEADLINE}
                                         for k, v in p["families"].items() if k != "resnet20_relu"},
                 matrix={**p["matrix"], "pairs": p["matrix"]["pairs"][:1]})
    if budget == "smoke":
        p.update(n_images=24, families={"myrtle_relu": {"pairs": ["0-1", "2-3"], "measures": ["grelu_cka", "orthogonal_procrustes"]}},
                 controls=["myrtle_relu"], matrix={**p["matrix"], "pairs": ["0-1"], "measures": ["grelu_cka"]})
    shipped = {(m["name"], m["seed"]) for m in zoo.read_manifest()["models"]}
    p["families"] = {k: v for k, v in p["families"].items()
                     if all((k, int(s)) in shipped for pr in v["pairs"] for s in pr.split("-"))}
    return p


def settings(p: dict, job: dict) -> dict:
    """What one run depends on: the images and the measures it computes (not which families or pairs are listed)."""
    if job["kind"] == "matrix":
        return {"n_images": p["n_images"], "measures": p["matrix"]["measures"]}
    if job["kind"] == "control":
        return {"n_images": p["n_images"]}
    return {"n_images": p["n_images"], "measures": p["families"][job["family"]]["measures"]}


def jobs(p: dict) -> list[dict]:
    out = [{"family": f, "pair": pr, "kind": "diagonal"} for f, v in p["families"].items() for pr in v["pairs"]]
    out += [{"family": f, "pair": "0-control", "kind": "control"} for f in p["controls"]]
    out += [{"family": p["matrix"]["family"], "pair": pr, "kind": "matrix"} for pr in p["matrix"]["pairs"]]
    return out


def activation_layers(model: nn.Module) -> list[str]:
    """Hook names of the activation modules (ReLU, GELU, …) in forward order."""
    acts = (nn.ReLU, nn.GELU, nn.Tanh, nn.SiLU, nn.LeakyReLU)
    return [name for name, m in model.named_modules() if isinstance(m, acts)]


@torch.no_grad()
def capture(model: nn.Module, x: torch.Tensor, names: list[str], batch: int = 250) -> dict:
    """``{name: [N, C, H, W]}`` (float32) for every name, in batches."""
    from ..hooks import run_with_cache

    parts = {name: [] for name in names}
    for xb in x.split(batch):
        cache = run_with_cache(model, xb, names=names)[1]
        for name in names:
            parts[name].append(cache[name])
    return {name: torch.cat(v) for name, v in parts.items()}


def _acts(ctx, p, family, seed):
    from .. import zoo
    from . import _data

    key = ("acts", family, seed)
    if key not in ctx:
        if "x" not in ctx:
            ctx["x"] = _data.split("test", p["n_images"]).inputs
        if seed == "control":
            from ..symmetry import random_intertwiner

            model, _ = random_intertwiner(zoo.load(family, seed=0), seed=0)
        else:
            model = zoo.load(family, seed=int(seed))
        ctx[key] = capture(model, ctx["x"], activation_layers(model))
        for k in [k for k in ctx if isinstance(k, tuple) and k[0] == "acts" and k[1] != family]:
            del ctx[k]  # one family's activations at a time
    return ctx[key]


def run(job: dict, p: dict, ctx: dict) -> list[dict]:
    from ..similarity import get_measure

    a_seed, b_seed = job["pair"].split("-")
    A, B = _acts(ctx, p, job["family"], a_seed), _acts(ctx, p, job["family"], b_seed)
    names = list(A)
    rows = []
    if job["kind"] == "matrix":
        for m in p["matrix"]["measures"]:
            for (i, na), (j, nb) in itertools.product(enumerate(names), enumerate(names)):
                rows.append({**job, "site": f"{na}|{nb}", "layer_a": i + 1, "layer_b": j + 1, "measure": m,
                             "metric": "similarity", "value": get_measure(m)(A[na].double(), B[nb].double())})
        return rows
    measures = p["families"].get(job["family"], {}).get("measures", HEADLINE) if job["kind"] == "diagonal" else \
        list(__import__("workbench.similarity", fromlist=["MEASURES"]).MEASURES)
    if job["kind"] == "control" and p["n_images"] < 50:
        measures = ["grelu_cka", "orthogonal_procrustes"]
    for i, name in enumerate(names):
        a, b = A[name].double(), B[name].double()
        for m in measures:
            rows.append({**job, "site": name, "layer": i + 1, "measure": m, "metric": "similarity",
                         "value": get_measure(m)(a, b)})
    return rows


# ------------------------------------------------------------------------------------------ summaries
def _by_pair(doc, family, layer, measure, kind="diagonal") -> dict:
    return {r["pair"]: r["value"] for r in doc["runs"] if r["kind"] == kind and r["family"] == family
            and r.get("layer") == layer and r["measure"] == measure}


def layers_of(doc, family) -> list[tuple[int, str]]:
    return sorted({(r["layer"], r["site"]) for r in doc["runs"] if r["kind"] == "diagonal" and r["family"] == family})


def diagonal(doc, family, measure) -> list[dict]:
    return [{"layer": lay, "site": site, **median_ci(list(_by_pair(doc, family, lay, measure).values()))}
            for lay, site in layers_of(doc, family)]


def gaps(doc, family) -> list[dict]:
    """Per layer, paired by seed pair: orthogonal-side − G_ReLU-side, median [CI]."""
    out = []
    for hi, lo in GAPS:
        for lay, site in layers_of(doc, family):
            d = paired(_by_pair(doc, family, lay, hi), _by_pair(doc, family, lay, lo))
            if d:
                s = median_ci(d)
                out.append({"upper": hi, "lower": lo, "layer": lay, "site": site, **s, "sign": excludes_zero(s)})
    return out


def width_rows(doc) -> list[dict]:
    rows = []
    for fam, w in sorted(WIDTHS.items(), key=lambda t: t[1]):
        if fam not in doc["protocol"]["families"]:
            continue
        for lay, _ in layers_of(doc, fam):
            row = {"width": w, "layer": lay}
            for m in HEADLINE:
                row[m] = median_ci(list(_by_pair(doc, fam, lay, m).values()))
            for hi, lo in GAPS:
                row[f"{hi} − {lo}"] = median_ci(paired(_by_pair(doc, fam, lay, hi), _by_pair(doc, fam, lay, lo)))
            rows.append(row)
    return rows


def headlines(doc) -> list[dict]:
    """Myrtle ReLU (width 16), same layer across seeds: each G_ReLU measure beside its comparator, and the gap."""
    out = []
    for lo, hi in (("grelu_procrustes", "orthogonal_procrustes"), ("grelu_cka", "standardized_cka")):
        gap = {r["layer"]: r for r in gaps(doc, "myrtle_relu") if r["upper"] == hi}
        for a, b in zip(diagonal(doc, "myrtle_relu", lo), diagonal(doc, "myrtle_relu", hi)):
            k = a["layer"] - 1
            out.append({"experiment": NAME, "what": f"Myrtle ReLU layer {a['layer']}: {lo} / {hi} (gap)",
                        "ours": f"{fmt(a, 2)} / {fmt(b, 2)}"
                                + (f" (gap {fmt(gap[a['layer']], 2)})" if a["layer"] in gap else ""),
                        "paper": f"{PAPER[lo][k]:.2f} / {PAPER[hi][k]:.2f}" if k < 4 else "—"})
    return out


def page(doc) -> str:
    from ._page import header, table

    p = doc["protocol"]
    lines = header(doc, TITLE)
    fams = p["families"]
    lines += ["## Protocol", "",
              f"- Images: N = {p['n_images']}, {p['images']}; layers: {p['layers']}. Float64 in every measure.",
              "- Pairs of independently trained seeds: " + "; ".join(f"`{f}` {', '.join(v['pairs'])}" for f, v in fams.items())
              + f". Over pairs, {INTERVALS}.",
              "- `standardized_cka` is the paper's \"orthogonal\" CKA: channels standardised first, so it is invariant to "
              "per-channel scaling and *not* to rotations; `linear_cka_unbiased` is the rotation-invariant one.",
              "- The paper's similarity models (`mCNN` = `mCNN_bn_k` in its code) have BatchNorm before every ReLU, as ours do.",
              ""]
    if "myrtle_relu" in fams:
        lines += ["## Same layer across seeds, Myrtle ReLU width 16 (paper beside)", "",
                  table(["layer"] + HEADLINE,
                        [[r["layer"]] + [fmt(x, 3) for x in [diagonal(doc, "myrtle_relu", m)[i] for m in HEADLINE]]
                         for i, r in enumerate(diagonal(doc, "myrtle_relu", HEADLINE[0]))]
                        + [[f"paper {k + 1}"] + [f"{PAPER[m][k]:.2f}" if m in PAPER else "" for m in HEADLINE] for k in range(4)]),
                  ""]
    for fam in fams:
        g = gaps(doc, fam)
        if not g:
            continue
        lines += [f"Gaps, `{fam}` (orthogonal-side − G_ReLU-side, paired by seed pair):", ""]
        for r in g:
            verdict = {1: "G_ReLU-side lower (interval excludes 0)", 0: "interval contains 0", -1: "G_ReLU-side higher",
                       None: no_verdict("pairs")}[r["sign"]]
            lines.append(f"- layer {r['layer']}: {r['upper']} − {r['lower']} = {fmt(r, 3)} — {verdict}")
        lines.append("")
    wr = width_rows(doc)
    widths = sorted({r["width"] for r in wr})
    if len(widths) == 1:  # the width effect needs other widths' seeds in the zoo
        lines += ["## Width", "",
                  f"Not measured: only width {widths[0]} has seeds in the zoo. `myrtle_relu_w8` and `myrtle_relu_w32` "
                  "have recipes (`python -m workbench.zoo.train`) but no shipped weights yet; once trained, rerunning "
                  "this experiment adds them without recomputing the runs above.", ""]
    elif wr:
        lines += [f"## Width: Myrtle ReLU at widths {', '.join(map(str, widths))} (channels 1×, 2×, 4×, 8× the width per layer)", "",
                  table(["width", "layer"] + HEADLINE + [f"{hi} − {lo}" for hi, lo in GAPS],
                        [[r["width"], r["layer"]] + [fmt(r[m], 3) for m in HEADLINE]
                         + [fmt(r[f"{hi} − {lo}"], 3) for hi, lo in GAPS] for r in wr]), "",
                  "Intervals of different widths come from different models (unpaired): read a width effect only where "
                  "they do not overlap.", ""]
    for fam in [f for f in fams if f not in ("myrtle_relu",)]:
        lines += [f"## Same layer across seeds: `{fam}`", "",
                  table(["layer", "hook"] + HEADLINE,
                        [[r["layer"], r["site"]] + [fmt(x, 3) for x in [diagonal(doc, fam, m)[i] for m in HEADLINE]]
                         for i, r in enumerate(diagonal(doc, fam, HEADLINE[0]))]), ""]
    mats = [r for r in doc["runs"] if r["kind"] == "matrix"]
    if mats:
        for m in p["matrix"]["measures"]:
            n = max(r["layer_a"] for r in mats)
            cell = lambda i, j: median_ci([r["value"] for r in mats if r["measure"] == m and r["layer_a"] == i  # noqa: E731
                                           and r["layer_b"] == j])
            lines += [f"## Layer × layer, `{p['matrix']['family']}`: {m} (rows: seed a's layer, columns: seed b's; "
                      f"median [CI] over {len(p['matrix']['pairs'])} pairs)", "",
                      table(["layer"] + [str(j) for j in range(1, n + 1)],
                            [[str(i)] + [fmt(cell(i, j), 2) for j in range(1, n + 1)] for i in range(1, n + 1)]), ""]
    ctrl = [r for r in doc["runs"] if r["kind"] == "control"]
    if ctrl:
        measures = list(dict.fromkeys(r["measure"] for r in ctrl))
        cols = sorted({(r["family"], r["layer"]) for r in ctrl})
        val = {(r["measure"], r["family"], r["layer"]): r["value"] for r in ctrl}
        lines += ["## Control: seed 0 against a function-preserving random transform of itself", "",
                  "`wb.random_intertwiner(model, seed=0)` (ReLU: P·D₊ at every site; GELU: P). A measure invariant to that "
                  "group must read 1 (to float rounding); any other value is what the measure adds by not respecting "
                  "the network's symmetry.", "",
                  table(["measure"] + [f"{f.replace('myrtle_', '')} L{lay}" for f, lay in cols],
                        [[m] + [_ctrl(val.get((m, f, lay))) for f, lay in cols] for m in measures]), ""]
    return "\n".join(lines)


def _ctrl(v) -> str:
    if v is None:
        return ""
    if abs(1 - v) > 1e-4:
        return f"{v:.4f}"
    return "1" if v == 1 else (f"1 − {1 - v:.0e}" if v < 1 else f"1 + {v - 1:.0e}")
