"""The paper's stitching and insertion experiments on the zoo: ``python -m workbench.stitching.study``.

Writes ``docs/results/stitching.md`` (tables with the command and settings that made them). The
default is modest — small subsets, few epochs — so it runs in about 10 minutes on two shared CPU
cores; ``--n-train``, ``--epochs`` and ``--insertion-epochs`` scale it up. Numbers are reported as
they come out; the page compares them with the paper's and says where the settings differ.
"""
from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import torch

SHAPES = {"size": 32, "difficulty": 0.3}  # the zoo's image settings (workbench/zoo/_recipes.py SHAPES)
MYRTLE_SITES = ["2", "5", "9", "13"]  # the four ReLU layers of Myrtle-5 (the paper's ReLU layers 3/6/10/14)
STITCH_FAMILIES = ["gl", "low_rank:1", "low_rank:2", "low_rank:4", "relu", "orthogonal"]
RESNET_SITES = [("act", "stage 1 stream"), ("layer1.1.act1", "stage 1 branch"), ("layer2.0.act2", "stage 2 stream"),
                ("layer2.1.act1", "stage 2 branch")]
PAPER_MYRTLE = {"gl": [1.0, 1.5, 2.3, 2.3], "low_rank:4": [8.5, 13.5, 26.5, 16.0], "low_rank:1": [42, 54, 57, 62],
                "relu": [8.1, 7.3, 16.5, 5.6]}
PAPER_INSERTION = "conv layers 0 / 2 / 5 of Myrtle without BatchNorm, 50 epochs: G_ReLU ≈ 0.0 / 1.7 / 1.3; orthogonal ≈ 0.7 / 4.6 / 8.3"


def _table(header, rows) -> str:
    fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows])


def _stitch_grid(name, seeds, sites, families, train, test, args, log):
    from .. import zoo
    from ._stitch import stitch

    a, b = zoo.load(name, seed=seeds[0]), zoo.load(name, seed=seeds[1])
    out = {}
    for site in sites:
        for fam in families:
            t0 = time.time()
            r = stitch(a, b, site, fam, train, epochs=args.epochs, seed=args.seed, eval_data=test, init="match", lr=args.lr)
            out[site, fam] = r
            loss = " → ".join(f"{c['loss']:.2f}" for c in r.curve)
            log(f"{name} {site} {fam}: {r.summary()}; training loss per epoch {loss} [{time.time() - t0:.0f} s]")
    return out


def _insertions(name, seed, sites, groups, train, test, args, log):
    from .. import zoo
    from ._insertion import insertion_test

    from ..symmetry import symmetry_map

    model = zoo.load(name, seed=seed)
    sites = sites or symmetry_map(model).names  # without BatchNorm the module indices differ
    out = {}
    for site in sites:
        for g in groups:
            t0 = time.time()
            r = insertion_test(model, site, g, train, epochs=args.insertion_epochs, repeats=args.repeats,
                               seed=args.seed, eval_data=test, lr=args.insertion_lr, reinit=args.insertion_reinit)
            out[site, g] = r
            log(f"insertion {name} {site} {g}: {r.summary()} [{time.time() - t0:.0f} s]")
    return out


def _zoo_accuracy(name: str, seed: int = 0) -> float:
    from .. import zoo

    entry = next(m for m in zoo.read_manifest()["models"] if m["name"] == name and m["seed"] == seed)
    return 100 * entry["metrics"]["test_accuracy"]


def _verdicts(myrtle) -> list[str]:
    """Statements computed from the numbers (so a rerun cannot leave stale prose behind)."""
    p = lambda site, fam: myrtle[site, fam].penalty  # noqa: E731
    below_r1 = sum(p(s, "relu") < p(s, "low_rank:1") for s in MYRTLE_SITES)
    below_r4 = sum(p(s, "relu") <= p(s, "low_rank:4") for s in MYRTLE_SITES)
    gl_best = sum(p(s, "gl") <= min(p(s, f) for f in STITCH_FAMILIES) + 1e-9 for s in MYRTLE_SITES)
    return [f"G_ReLU penalty below rank 1 at {below_r1} of 4 Myrtle layers, at or below rank 4 at {below_r4} of 4.",
            f"Full linear (gl) is the best family at {gl_best} of 4 layers."]


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-test", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=2, help="stitching epochs")
    ap.add_argument("--lr", type=float, default=1e-3, help="stitching learning rate (Adam)")
    ap.add_argument("--insertion-epochs", type=int, default=3)
    ap.add_argument("--insertion-lr", type=float, default=1e-3)
    ap.add_argument("--insertion-reinit", action="store_true",
                    help="re-initialise the retrained part (fairer, but needs far more epochs than the default budget)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("docs/results/stitching.md"))
    args = ap.parse_args(argv)
    from .. import data, zoo

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # small convolutions on a shared 2-core machine: threads only contend
    start = time.time()
    log_lines: list[str] = []

    def log(msg):
        print(msg, flush=True)
        log_lines.append(msg)

    train = data.shapes(args.n_train, seed=1, **SHAPES)
    test = data.shapes(args.n_test, seed=2, **SHAPES)
    shipped = {m["name"] for m in zoo.read_manifest()["models"]}
    insertion_model = "myrtle_relu_nobn" if "myrtle_relu_nobn" in shipped else "myrtle_relu"
    myrtle = _stitch_grid("myrtle_relu", (0, 1), MYRTLE_SITES, STITCH_FAMILIES, train, test, args, log)
    gelu = _stitch_grid("myrtle_gelu", (0, 1), MYRTLE_SITES, ["gl", "permutation", "orthogonal"],
                        train, test, args, log)
    resnet = _stitch_grid("resnet20_relu", (0, 1), [s for s, _ in RESNET_SITES], ["gl", "relu"], train, test, args, log)
    ins_relu = _insertions(insertion_model, 0, None, ["relu", "orthogonal"], train, test, args, log)
    relu_sites = list(dict.fromkeys(s for s, _ in ins_relu))
    ins_gelu = _insertions("myrtle_gelu", 0, MYRTLE_SITES, ["permutation", "orthogonal"], train, test, args, log)
    minutes = (time.time() - start) / 60
    cmd = "python -m workbench.stitching.study" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v != ap.get_default(k))
    r0 = myrtle[MYRTLE_SITES[0], "gl"]
    md = [
        "# Stitching and the insertion test on the zoo", "",
        f"Generated by `{cmd}` ({datetime.date.today()}, {minutes:.0f} min on the shared 2-core CPU machine, `nice -n 10`).",
        f"Data: `wb.data.shapes(n, size=32, difficulty=0.3)` — training subset n={args.n_train} (seed 1), evaluation "
        f"n={args.n_test} (seed 2; the zoo's test-set settings, smaller). Accuracies in percent on the evaluation set, "
        "penalties in points: mean endpoint accuracy − stitched accuracy.", "",
        f"Stitching settings: both models frozen and in eval mode, BatchNorm statistics frozen (`bn=\"frozen\"`), "
        f"`init=\"match\"` (each family starts at its closed-form fit of B's activation from A's: least squares, "
        f"reduced-rank regression, Procrustes, Hungarian matching), then {args.epochs} epochs of Adam (lr {args.lr}, batch 128) on "
        f"the task loss; G_ReLU = Sinkhorn P × positive scales, P alone for the first half, rounded to an exact "
        f"permutation (Hungarian) for evaluation; seed {args.seed}. Endpoints myrtle_relu seeds 0/1: "
        f"{r0.accuracy_a:.1f}% / {r0.accuracy_b:.1f}%.", "",
        "## Stitching penalty per layer, Myrtle ReLU (seeds 0 → 1)", "",
        _table(["family", *[f"site {s}" for s in MYRTLE_SITES], "paper (layers 3/6/10/14)"],
               [[f, *[myrtle[s, f].penalty for s in MYRTLE_SITES],
                 " / ".join(map(str, PAPER_MYRTLE[f])) if f in PAPER_MYRTLE else "—"] for f in STITCH_FAMILIES]), "",
        "G_ReLU before rounding (relaxed Sinkhorn P), stitched accuracy: " + ", ".join(
            f"site {s} {myrtle[s, 'relu'].relaxed_accuracy:.1f}% (rounded {myrtle[s, 'relu'].stitched_accuracy:.1f}%)"
            for s in MYRTLE_SITES) + ".", "",
        *[f"- {v}" for v in _verdicts(myrtle)], "",
        "## ReLU vs GELU (myrtle_gelu seeds 0 → 1; GELU's group is permutations only)", "",
        _table(["family", *[f"site {s}" for s in MYRTLE_SITES]],
               [[f"ReLU {f}", *[myrtle[s, f].penalty for s in MYRTLE_SITES]] for f in ["gl", "relu", "orthogonal"]]
               + [[f"GELU {f}", *[gelu[s, f].penalty for s in MYRTLE_SITES]] for f in ["gl", "permutation", "orthogonal"]]),
        "", "## ResNet-20 (resnet20_relu seeds 0 → 1): streams vs residual branches", "",
        "A cut inside a branch takes the skip stream from A too; it gets its own stitching layer of the same family.", "",
        _table(["site", "where", "gl", "G_ReLU", "endpoints"],
               [[s, where, resnet[s, "gl"].penalty, resnet[s, "relu"].penalty,
                 f"{resnet[s, 'gl'].accuracy_a:.1f} / {resnet[s, 'gl'].accuracy_b:.1f}"] for s, where in RESNET_SITES]), "",
        f"## Insertion test (paper §3.3) on {insertion_model} seed 0", "",
        (f"`myrtle_relu_nobn` seed 0 is in the zoo, at {_zoo_accuracy(insertion_model):.0f}% test accuracy (the paper's "
         "no-BatchNorm Myrtle reached 87%). " if insertion_model.endswith("nobn") else
         "The paper uses Myrtle without BatchNorm; `myrtle_relu_nobn` is not in data/zoo/manifest.json yet, so this "
         "uses myrtle_relu (BatchNorm before each ReLU; M is inserted after it, right before the nonlinearity). "),
        f"A fixed random M on the pre-activation, everything before it frozen, the rest "
        f"{'re-initialised' if args.insertion_reinit else 'continued from its trained weights'} and trained "
        f"{args.insertion_epochs} epochs (Adam lr {args.insertion_lr}) — once with M = I (control) and {args.repeats}× "
        f"with M from the group. Penalty = control − accuracy, mean ± std over repeats. Paper: {PAPER_INSERTION}.", "",
        _table(["model", "site", "original %", "control %", *["penalty " + g for g in ["G_ReLU", "orthogonal", "permutation"]]],
               [[insertion_model, s, ins_relu[s, "relu"].accuracy_original, ins_relu[s, "relu"].accuracy_control,
                 f"{ins_relu[s, 'relu'].penalty:.1f} ± {ins_relu[s, 'relu'].penalty_std:.1f}",
                 f"{ins_relu[s, 'orthogonal'].penalty:.1f} ± {ins_relu[s, 'orthogonal'].penalty_std:.1f}", "—"]
                for s in relu_sites]
               + [["myrtle_gelu", s, ins_gelu[s, "permutation"].accuracy_original, ins_gelu[s, "permutation"].accuracy_control,
                   "—", *[f"{ins_gelu[s, g].penalty:.1f} ± {ins_gelu[s, g].penalty_std:.1f}" for g in ["orthogonal", "permutation"]]]
                  for s in MYRTLE_SITES]), "",
        "## Differences from the paper", "", DIFFERENCES, "",
        "## Log", "", "```", *log_lines, "```", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(md))
    print(f"wrote {args.out} in {minutes:.1f} min")
    return args.out


DIFFERENCES = """\
- Scale: width-16 Myrtle/ResNet-20 on procedural 32×32 shapes (zoo), not width-64 networks on CIFAR-10; a
  400-image training subset and a few epochs instead of 20 stitching / 50 retraining epochs. Penalties carry
  roughly ±1.5 points of sampling noise from the 600-image evaluation set alone.
- Initialisation: every stitching family starts at its closed-form fit (`init="match"`); with only a couple of
  epochs, training from the identity or a random map mostly measures optimisation speed, not what the family can
  express. The paper trains from scratch for 20 epochs.
- BatchNorm: frozen (the paper's code ran the frozen networks in train mode, so their statistics moved).
- G_ReLU stitch: P is a Sinkhorn parametrisation (annealed from temperature 1 to 0.05) rather than SGD steps
  followed by a Sinkhorn projection; the −α‖P‖_F term (α = 0.1) and the P-then-scales schedule follow the paper.
- Insertion test: `insertion_test` re-initialises the retrained part by default (`reinit=True`), so the control
  and every M start equal; continuing from the trained weights makes an absorbable permutation cost as much as a
  rotation at short budgets, because the next layer has to be rewired either way (measured once on the 64-16-16-10
  digits MLP of tests/test_stitching.py, first ReLU layer, 6 epochs, Adam 1e-2, 2 repeats: G_ReLU 17.9 vs
  orthogonal 15.5 points continuing from trained weights; 1.8 vs 8.1 with re-initialisation). This study's budget
  is far too small to retrain Myrtle's layers from scratch (controls of 17–40% after 2 epochs on 400 images, in a
  first run with `--insertion-reinit --insertion-epochs 2 --insertion-lr 0.003`), so by default it continues from
  the trained weights (`reinit=False`), which the paper's wording ("retrain the rest") also allows; expect the
  G_ReLU penalties to be inflated by the rewiring cost.
- G_ReLU stitch from `init="match"`: the matched permutation starts as a near-vertex of the Sinkhorn relaxation
  (logit margin 10), and a couple of epochs of Adam do not move P away from it, so the G_ReLU numbers here are
  "Hungarian matching of units + trained positive scales" — relaxed and rounded accuracies coincide. From a
  near-uniform P (`init=None`) the relaxation explores permutations, but on the test MLP it rounded to a wrong
  permutation (task loss alone does not identify units the task does not need), which is why the exact-recovery
  test starts from the matching.
- ResNet branches: the skip stream crossing a branch cut gets its own stitching layer of the same family; how the
  paper treats it is not stated."""


if __name__ == "__main__":
    main()
