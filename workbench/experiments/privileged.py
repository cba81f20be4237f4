"""Is the neuron basis privileged? The privileged-basis test on the zoo (CNN layers and transformers).

For each concept the statistic is the best unit's |AUROC − 0.5|; the layer-level test compares its
mean over concepts in the neuron basis with random bases of each family (Haar rotations, random GL
maps, and the layer's own group, which must give an identical value: p = 1). Runs: one per
(model, seed) for the Myrtle CNNs (ReLU and GELU twins) and one per transformer (tiny decoders,
MiniLM). Basis alignment (kurtosis, outlier dimensions) against rotations is recorded beside.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._stats import INTERVALS, excludes_zero, fmt, median_ci

NAME = "privileged"
TITLE = "Is the neuron basis privileged? (privileged-basis test)"
CNN_LAYERS = {"5": "ReLU/GELU 2 (post)", "9": "ReLU/GELU 3 (post)", "12": "BN 4 (pre-activation)",
              "13": "ReLU/GELU 4 (post)", "16": "final Linear's input"}
SITE_OF = {"5": "5", "9": "9", "12": "13", "13": "13", "16": "13"}  # the site whose group acts on the layer
TRANSFORMERS = {"tiny_gelu": ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post", "blocks.0.hook_resid_post",
                              "blocks.1.hook_resid_post"],
                "tiny_relu": ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post", "blocks.0.hook_resid_post",
                              "blocks.1.hook_resid_post"],
                "minilm": ["blocks.2.mlp.hook_post", "blocks.5.mlp.hook_post", "blocks.2.hook_resid_post",
                           "blocks.5.hook_resid_post"]}


def _minilm_bases(p: dict) -> str:
    """MiniLM's layers are tested against fewer bases than the others (``minilm_bases``): the page says so."""
    t = p["transformers"]
    return f"; MiniLM's layers: {t['minilm_bases']} per family" if "minilm" in t["models"] and t.get("minilm_bases") != p["n_bases"] else ""


def protocol(budget: str) -> dict:
    p = {"cnn": {"models": ["myrtle_relu", "myrtle_gelu"], "seeds": [0, 1, 2, 3], "layers": list(CNN_LAYERS),
                 "n_images": 1000, "images": "the first N images of the zoo's test set (29 concepts)"},
         "transformers": {"models": list(TRANSFORMERS), "n_sequences": 200, "n_sentences": 400, "max_tokens": 3000,
                          "min_positives": 20, "minilm_bases": 40},
         "n_bases": 100, "statistic": "auroc", "bases": ["orthogonal", "gl"], "alpha": 0.05, "standardize": True}
    if budget == "paper":
        return p
    if budget == "quick":
        p["cnn"].update(seeds=[0, 1], n_images=300, layers=["9", "13", "16"])
        p["transformers"].update(models=["tiny_gelu"], n_sequences=40, max_tokens=600)
        return {**p, "n_bases": 20}
    if budget == "smoke":
        p["cnn"].update(models=["myrtle_relu"], seeds=[0, 1], n_images=80, layers=["13", "16"])
        p["transformers"].update(models=[])
        return {**p, "n_bases": 5}
    from .._errors import InvalidOptionError
    from . import BUDGETS
    raise InvalidOptionError(f"budget={budget!r} is not a valid option; expected one of {BUDGETS!r}.")


def settings(p: dict, job: dict) -> dict:
    """What one run depends on: the data and test settings, not the lists of models and seeds."""
    part = "cnn" if job["model"] in p["cnn"]["models"] else "transformers"
    sub = {k: v for k, v in p[part].items() if k not in ("models", "seeds")}
    return {"part": sub, **{k: p[k] for k in ("n_bases", "statistic", "bases", "alpha", "standardize")}}


def jobs(p: dict) -> list[dict]:
    return ([{"model": m, "seed": s} for m in p["cnn"]["models"] for s in p["cnn"]["seeds"]]
            + [{"model": m, "seed": 0} for m in p["transformers"]["models"]])


def _rows(base: dict, test, alignment) -> list[dict]:
    rows = []
    for r in test.layer_frame().itertuples():
        fam = "own_group" if r.role == "architecture" else r.family
        for metric, value in (("z", r.z), ("p", r.p), ("n_privileged", r.n_privileged), ("identical", float(r.identical))):
            rows.append({**base, "family": fam, "metric": metric, "value": float(value)})
    rows.append({**base, "family": "neuron", "metric": "statistic", "value": float(test.observed.mean())})
    a = alignment.to_frame().set_index("statistic")
    for s in ("kurtosis_per_example", "kurtosis_of_rms", "outlier_dimensions"):
        rows.append({**base, "family": "orthogonal", "metric": f"{s}_p", "value": float(a.loc[s, "p"])})
        rows.append({**base, "family": "neuron", "metric": s, "value": float(a.loc[s, "observed"])})
    return rows


def run(job: dict, p: dict, ctx: dict) -> list[dict]:
    import workbench as wb
    from ..probing import basis_alignment, privileged_basis_test
    from . import _data

    model = wb.zoo.load(job["model"], seed=job["seed"]) if job["model"] != "minilm" else wb.zoo.load("minilm")
    rows = []
    if job["model"] in p["cnn"]["models"]:
        ds = _data.split("test", p["cnn"]["n_images"])
        sites = {s.name: s for s in wb.symmetry_map(model).sites}
        with torch.no_grad():
            caches = [wb.run_with_cache(model, xb, names=p["cnn"]["layers"])[1] for xb in ds.inputs.split(200)]
        for layer in p["cnn"]["layers"]:
            X = torch.cat([c[layer].float() for c in caches])
            X = X.mean((2, 3)) if X.ndim == 4 else X
            test = privileged_basis_test(X, ds, bases=tuple(p["bases"]), group=sites[SITE_OF[layer]],
                                         n_bases=p["n_bases"], seed=0, standardize=p["standardize"],
                                         statistic=p["statistic"], alpha=p["alpha"])
            rows += _rows({**job, "site": layer, "layer": CNN_LAYERS[layer], "d": X.shape[1]}, test,
                          basis_alignment(X, n_bases=p["n_bases"], seed=0))
        return rows
    X_by_hook, Y, names = _token_activations(model, job["model"], TRANSFORMERS[job["model"]], p["transformers"])
    sites = {s.hook_name: s for s in wb.symmetry_map(model).sites}
    n_bases = p["transformers"]["minilm_bases"] if job["model"] == "minilm" else p["n_bases"]
    for hook, X in X_by_hook.items():
        site = sites.get(hook) or (sites.get("blocks.0.hook_resid_pre") if "hook_resid" in hook else None)
        test = privileged_basis_test(X, Y, names=names, bases=("orthogonal", "gl") if X.shape[1] <= 512 else ("orthogonal",),
                                     group=site, n_bases=n_bases, seed=0, standardize=p["standardize"],
                                     statistic=p["statistic"], alpha=p["alpha"])
        kind = "MLP neurons" if "mlp" in hook else "residual stream"
        rows += _rows({**job, "site": hook, "layer": kind, "d": X.shape[1]}, test,
                      basis_alignment(X, n_bases=n_bases, seed=0))
    return rows


def _token_activations(model, name: str, hooks: list[str], t: dict):
    """``({hook: [tokens, d]}, concepts [tokens, K], names)`` over unpadded sequences (grouped by length, so
    no sequence attends to padding), a seeded sample of ``max_tokens`` tokens and the concepts with at
    least ``min_positives`` positives (and as many negatives)."""
    import workbench as wb

    if name == "minilm":
        ds = wb.data.retokenize(wb.data.sentences(t["n_sentences"], seed=2), model.tokenizer)
        seqs = [ds.inputs[i, :n] for i, n in enumerate(ds.meta["pieces"])]
        labels = [ds.concepts[i, :n] for i, n in enumerate(ds.meta["pieces"])]
    else:
        ds = wb.data.synthetic_language(t["n_sequences"], seq_len=32, seed=2)
        seqs, labels = list(ds.inputs), list(ds.concepts)
    by_len: dict = {}
    for i, sq in enumerate(seqs):
        by_len.setdefault(len(sq), []).append(i)
    out, order = {h: [] for h in hooks}, []
    with torch.no_grad():
        for _, idx in sorted(by_len.items()):
            _, cache = wb.run_with_cache(model, torch.stack([seqs[i] for i in idx]), names=hooks)
            for h in hooks:
                out[h].append(cache[h].float().reshape(-1, cache[h].shape[-1]))
            order += idx
    Y = torch.cat([labels[i] for i in order])
    keep = torch.randperm(len(Y), generator=torch.Generator().manual_seed(0))[:t["max_tokens"]].sort().values
    Y = Y[keep]
    ok = [k for k in range(Y.shape[1]) if t["min_positives"] <= int(Y[:, k].sum()) <= len(Y) - t["min_positives"]]
    return {h: torch.cat(v)[keep] for h, v in out.items()}, Y[:, ok], [ds.concept_names[k] for k in ok]


# ------------------------------------------------------------------------------------------ summaries
def _vals(doc, model, site, family, metric) -> list[float]:
    return [r["value"] for r in doc["runs"] if r["model"] == model and r["site"] == site and r["family"] == family
            and r["metric"] == metric]


def table_rows(doc) -> list[dict]:
    out = []
    seen = []
    for r in doc["runs"]:
        key = (r["model"], r["site"])
        if key not in seen:
            seen.append(key)
    for model, site in seen:
        layer = next(r["layer"] for r in doc["runs"] if r["model"] == model and r["site"] == site)
        z = median_ci(_vals(doc, model, site, "orthogonal", "z"))
        row = {"model": model, "site": site, "layer": layer, "seeds": z["n"], "z_orth": {**z, "sign": excludes_zero(z)},
               "z_gl": median_ci(_vals(doc, model, site, "gl", "z")),
               "priv_orth": median_ci(_vals(doc, model, site, "orthogonal", "n_privileged")),
               "n_concepts": None, "own_identical": _all_identical(_vals(doc, model, site, "own_group", "identical")),
               "kurtosis": median_ci(_vals(doc, model, site, "neuron", "kurtosis_per_example"))}
        out.append(row)
    return out


OWN = {True: "yes", False: "NO", None: "— (no own group)"}  # the page's "own group identical" column


def _all_identical(flags: list[float]) -> Optional[bool]:
    """Whether every seed's own-group bases gave the neuron basis's value exactly; None where no own group was
    tested (a layer without a site: ``all([])`` would have read as a "yes" the runs never checked)."""
    return all(v == 1.0 for v in flags) if flags else None


def headlines(doc) -> list[dict]:
    """The Myrtle CNN layers (seeds give intervals); the one-seed transformers stay on the page."""
    return [{"experiment": NAME, "what": f"{r['model']} {r['site']} ({r['layer']}): layer z against rotations",
             "ours": fmt(r["z_orth"]), "paper": "—"} for r in table_rows(doc) if r["model"] in doc["protocol"]["cnn"]["models"]]


def page(doc) -> str:
    from ._page import header, table

    p = doc["protocol"]
    lines = header(doc, TITLE)
    lines += ["## Protocol", "",
              f"- CNNs: {', '.join(p['cnn']['models'])} seeds {p['cnn']['seeds']}, layers {p['cnn']['layers']}; N = "
              f"{p['cnn']['n_images']} ({p['cnn']['images']}); spatial-mean activations.",
              f"- Transformers: {', '.join(p['transformers']['models']) or 'none'} (token activations, up to "
              f"{p['transformers']['max_tokens']} tokens; concepts with fewer than {p['transformers']['min_positives']} "
              "positives dropped).",
              ("- Units divided by their standard deviations before the bases turn (a unit's scale is not basis-free: "
               "a ReLU layer can rescale it without changing the function).\n" if p.get("standardize") else
               "- Units as they are (not standardized).\n") +
              f"- Statistic: best unit's |AUROC − 0.5| per concept; layer test: its mean over concepts against {p['n_bases']} "
              f"random bases per family ({', '.join(p['bases'])}, and the layer's own group{_minilm_bases(p)}); z and "
              f"+1-corrected p; "
              f"privileged concepts at BH q < {p['alpha']}.",
              f"- z over seeds: {INTERVALS}. The transformers have one value each (one seed).", ""]
    rows = table_rows(doc)
    lines += [table(["model", "layer", "seeds", "z vs rotations", "z vs GL", "privileged concepts vs rotations",
                     "own group identical", "kurtosis per example"],
                    [[r["model"], f"{r['site']}: {r['layer']}", r["seeds"], fmt(r["z_orth"]), fmt(r["z_gl"]),
                      fmt(r["priv_orth"], 0), OWN[r["own_identical"]], fmt(r["kurtosis"], 2)]
                     for r in rows]),
              ""]
    for r in rows:
        s = r["z_orth"]["sign"]
        if s is None:
            continue
        verdict = {1: "privileged against rotations (z interval above 0)", 0: "not shown (z interval contains 0)",
                   -1: "less aligned than random rotations (z interval below 0)"}[s]
        if s == 1 and r["z_orth"]["median"] < 3:  # every seed above 0, none far: one seed alone would not show it
            alone = "" if r["priv_orth"]["median"] else ", no concept privileged on its own"
            verdict = f"above rotations in every seed, but weakly (median z {r['z_orth']['median']:.1f} < 3{alone})"
        lines.append(f"- {r['model']} {r['site']} ({r['layer']}): {verdict}.")
    return "\n".join(lines + [""])
