"""The paper's §5 on the zoo: G_ReLU- vs orthogonal-invariant similarity of one layer across seeds.

For every activation layer of the Myrtle CNNs (``myrtle_relu`` and ``myrtle_gelu``, seeds 0-3), every
pair of independently trained seeds is compared on the same test images (``wb.data.shapes``, the
zoo's test recipe) with every measure of the registry. A control compares seed 0 with a
function-preserving random transform of itself (``wb.random_intertwiner``): measures invariant to the
layer's group must give exactly 1 there. Run::

    nice -n 10 .venv/bin/python -m workbench.similarity.study            # N = 250; writes docs/results/similarity.md
    .venv/bin/python -m workbench.similarity.study --n 60 --seeds 0 1 --out /tmp/similarity.md   # smoke run

The written file keeps any text below its discussion marker, so a hand-written discussion survives a rerun.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import os
import time
from pathlib import Path

import torch
from torch import nn

FAMILIES = ("myrtle_relu", "myrtle_gelu")
HEADLINE = ["grelu_procrustes", "orthogonal_procrustes", "grelu_cka", "standardized_cka", "linear_cka_unbiased"]
# Godfrey et al. 2022, §5, Myrtle CNN (width 64, CIFAR-10), the four ReLU layers; their "orthogonal" CKA
# standardises each channel first, which is our standardized_cka.
PAPER = {"grelu_procrustes": (0.62, 0.51, 0.44, 0.49), "orthogonal_procrustes": (0.77, 0.57, 0.51, 0.58),
         "grelu_cka": (0.84, 0.61, 0.45, 0.43), "standardized_cka": (0.98, 0.97, 0.92, 0.93)}
MARKER = "<!-- discussion: written by hand; the study keeps everything below this line on rerun -->"
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "docs" / "results" / "similarity.md"


def zoo_test_images(n: int) -> torch.Tensor:
    """``[n, 3, 32, 32]`` images drawn like the zoo CNNs' test set (same generator, seed and difficulty)."""
    from .. import data, zoo

    d = zoo.RECIPES["myrtle_relu"].data
    return data.shapes(n, size=d["size"], seed=d["test"]["seed"], difficulty=d["difficulty"]).inputs


def activation_layers(model: nn.Module) -> list[str]:
    """Hook names of the activation modules (ReLU, GELU, …) in forward order."""
    acts = (nn.ReLU, nn.GELU, nn.Tanh, nn.SiLU, nn.LeakyReLU)
    return [name for name, m in model.named_modules() if isinstance(m, acts)]


def capture(model: nn.Module, x: torch.Tensor, names: list[str], batch: int = 250) -> dict:
    """``{name: [N, C, H, W] float64}`` for every name, in batches (converted once, not per measure)."""
    from ..hooks import run_with_cache

    parts = {name: [] for name in names}
    with torch.no_grad():
        for xb in x.split(batch):
            cache = run_with_cache(model, xb, names=names)[1]
            for name in names:
                parts[name].append(cache[name])
    return {name: torch.cat(p).double() for name, p in parts.items()}


def run(n: int = 250, families=FAMILIES, seeds=(0, 1, 2, 3), measures=None, progress: bool = True) -> list[dict]:
    """One record per (family, layer, pair of seeds or control, measure) with the similarity."""
    from tqdm.auto import tqdm

    from .. import zoo
    from ..symmetry import random_intertwiner
    from ._registry import MEASURES, get_measure

    chosen = [get_measure(m) for m in (measures or list(MEASURES))]
    x = zoo_test_images(n)
    pairs = list(itertools.combinations(seeds, 2))
    records = []
    bar = tqdm(total=len(families) * 4 * (len(pairs) + 1) * len(chosen), disable=not progress, desc="similarity")
    for family in families:
        models = {s: zoo.load(family, seed=s) for s in seeds}
        names = activation_layers(models[seeds[0]])
        control, _ = random_intertwiner(models[seeds[0]], seed=0)
        acts = {s: capture(m, x, names) for s, m in models.items()}
        acts["control"] = capture(control, x, names)
        for depth, name in enumerate(names):
            shape = tuple(acts[seeds[0]][name].shape[1:])
            for a, b in [*pairs, (seeds[0], "control")]:
                label = "control" if b == "control" else f"{a}-{b}"
                for m in chosen:
                    records.append({"family": family, "layer": depth + 1, "hook": name, "shape": shape,
                                    "pair": label, "measure": m.name, "similarity": m(acts[a][name], acts[b][name])})
                    bar.update()
        del acts
    bar.close()
    return records


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.3f}" if std != std else f"{mean:.3f} ± {std:.3f}"  # one pair: no spread


def _ctrl(v: float) -> str:
    """A control value; within 1e-4 of 1 it shows how far below 1 it is."""
    if 1 - v > 1e-4:
        return f"{v:.4f}"
    return "1" if v == 1 else (f"1 − {1 - v:.0e}" if v < 1 else f"1 + {v - 1:.0e}")


def tables(records: list[dict]) -> dict:
    """Markdown tables: the headline comparison with the paper, every measure, and the control."""
    import pandas as pd

    frame = pd.DataFrame(records)
    seeds = frame[frame["pair"] != "control"]
    stats = seeds.groupby(["family", "layer", "measure"], sort=False)["similarity"].agg(["mean", "std"]).reset_index()
    out = {}
    lines = ["| family | layer | shape [C, H, W] | " + " | ".join(HEADLINE) + " |", "|---" * (3 + len(HEADLINE)) + "|"]
    for (family, layer), g in stats.groupby(["family", "layer"], sort=False):
        shape = list(frame[(frame.family == family) & (frame.layer == layer)]["shape"].iloc[0])
        cell = {r.measure: _fmt(r["mean"], r["std"]) for _, r in g.iterrows()}
        lines.append(f"| {family} | {layer} | {shape} | " + " | ".join(cell.get(m, "") for m in HEADLINE) + " |")
    for layer in range(4):
        cells = [f"{PAPER[m][layer]:.2f}" if m in PAPER else "" for m in HEADLINE]
        lines.append(f"| paper (Myrtle-64, CIFAR-10) | {layer + 1} | | " + " | ".join(cells) + " |")
    out["headline"] = "\n".join(lines)

    wide = stats.assign(cell=[_fmt(a, b) for a, b in zip(stats["mean"], stats["std"])])
    wide = wide.pivot_table(index="measure", columns=["family", "layer"], values="cell", aggfunc="first", sort=False)
    cols = list(wide.columns)
    lines = ["| measure | " + " | ".join(f"{f.replace('myrtle_', '')} L{lay}" for f, lay in cols) + " |",
             "|---" * (1 + len(cols)) + "|"]
    lines += [f"| {m} | " + " | ".join(str(wide.loc[m, c]) for c in cols) + " |" for m in wide.index]
    out["all"] = "\n".join(lines)

    ctrl = frame[frame["pair"] == "control"].pivot_table(index="measure", columns=["family", "layer"],
                                                         values="similarity", sort=False)
    lines = ["| measure | " + " | ".join(f"{f.replace('myrtle_', '')} L{lay}" for f, lay in ctrl.columns) + " |",
             "|---" * (1 + len(ctrl.columns)) + "|"]
    lines += [f"| {m} | " + " | ".join(_ctrl(v) for v in ctrl.loc[m]) + " |" for m in ctrl.index]
    out["control"] = "\n".join(lines)

    gaps = []
    for family in frame["family"].unique():
        s = stats[stats.family == family].pivot(index="layer", columns="measure", values="mean")
        for hi, lo in (("orthogonal_procrustes", "grelu_procrustes"), ("standardized_cka", "grelu_cka"),
                       ("linear_cka_unbiased", "grelu_cka")):
            if hi in s and lo in s:
                d = s[hi] - s[lo]
                gaps.append(f"- {family}: {hi} − {lo} per layer = " + ", ".join(f"{v:+.3f}" for v in d)
                            + f" (G_ReLU lower at {int((d > 0).sum())} of {len(d)} layers)")
    out["gaps"] = "\n".join(gaps)
    return out


def write(records: list[dict], settings: dict, out: Path) -> None:
    t = tables(records)
    kept = ""
    if out.exists() and MARKER in out.read_text():
        kept = out.read_text().split(MARKER, 1)[1]
    text = "\n".join([
        "# Similarity across seeds: G_ReLU-invariant vs orthogonal-invariant measures (paper §5)", "",
        f"- Command: `{settings['command']}`",
        f"- Date: {settings['date']}; wall time {settings['seconds']:.0f} s; load average at start "
        f"{settings['load']:.2f} on {os.cpu_count()} CPUs",
        f"- Data: N = {settings['n']} images from `wb.data.shapes` drawn like the zoo test set (seed 2, "
        "difficulty 0.3, 32×32); activations after each of the four activation modules (hooks "
        "`2`, `5`, `9`, `13`: after BN and ReLU/GELU, before pooling), float64 in the measures.",
        f"- Models: {', '.join(settings['families'])}, seeds {list(settings['seeds'])} (width 16); every pair of "
        "seeds (mean ± std over the pairs).", "",
        "## Headline: the paper's comparison", "",
        "Each cell: same layer, two independently trained seeds. G_ReLU-invariant: `grelu_procrustes`, "
        "`grelu_cka`. Orthogonal-invariant: `orthogonal_procrustes`, `linear_cka_unbiased`. "
        "`standardized_cka` is the paper's \"orthogonal\" CKA (channels standardised first, so in fact "
        "invariant to per-channel scaling and *not* to rotations; see `wb.similarity.measures()`).", "",
        t["headline"], "",
        "Gaps (orthogonal-side minus G_ReLU-side, mean over pairs):", "", t["gaps"], "",
        "## Every measure", "", t["all"], "",
        "## Control: seed 0 against a function-preserving transform of itself", "",
        "`wb.random_intertwiner(model, seed=0)`: a random element of each site's group (ReLU: P·D₊; GELU: P) "
        "pushed into the weights. Measures invariant to that group must read 1 up to float32 rounding of the "
        "transformed network's activations.", "",
        t["control"], "", MARKER,
    ])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + (kept if kept else "\n"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="G_ReLU- vs orthogonal-invariant similarity across zoo seeds.")
    p.add_argument("--n", type=int, default=250, help="test images (default 250)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    start, load = time.perf_counter(), os.getloadavg()[0]
    records = run(args.n, args.families, tuple(args.seeds))
    settings = {"command": "nice -n 10 .venv/bin/python -m workbench.similarity.study"
                + ("" if args.n == 250 else f" --n {args.n}")
                + ("" if args.families == list(FAMILIES) else " --families " + " ".join(args.families))
                + ("" if args.seeds == [0, 1, 2, 3] else " --seeds " + " ".join(map(str, args.seeds))),
                "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "seconds": time.perf_counter() - start, "load": load, "n": args.n, "families": args.families,
                "seeds": args.seeds}
    write(records, settings, args.out)
    print(tables(records)["headline"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
