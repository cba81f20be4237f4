"""How the insertion test's rotation penalty depends on the retrained layer's width (notebook 05's remark).

The notebook's cell trains a 64 → 16 → 16 → 10 ReLU MLP on the 8×8 digits (full-batch Adam, lr 1e-2, 100 steps,
seed 1) and runs ``insertion_test`` at its first ReLU (``"1"``) for the G_ReLU element and a rotation, tail
re-initialised, ``epochs=6``, ``lr=1e-2``, evaluated on the held-out 30%. This script runs the same protocol at
widths 16 and 128 with 8 repeats each, and writes the penalties (mean ± standard deviation over the repeats, in
accuracy points) with every repeat's accuracies to ``benchmarks/results/insertion_width.json`` and ``.md``.

Run: ``.venv/bin/python benchmarks/insertion_width.py`` (about a minute on one core).
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPEATS = 8


def main() -> None:
    import torch

    import workbench as wb

    torch.set_num_threads(1)
    train, test = wb.data.digits(size=8).split(0.7, seed=0)
    d_train = (train.inputs.flatten(1), train.labels)
    d_eval = (test.inputs.flatten(1), test.labels)
    rows = []
    for width in (16, 128):
        torch.manual_seed(1)
        mlp = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                  torch.nn.ReLU(), torch.nn.Linear(width, 10))
        opt = torch.optim.Adam(mlp.parameters(), lr=1e-2)
        for _ in range(100):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(mlp(d_train[0]), d_train[1]).backward()
            opt.step()
        mlp.eval()
        for group in ("relu", "orthogonal"):
            r = wb.stitching.insertion_test(mlp, "1", group, d_train, epochs=6, repeats=REPEATS, seed=0,
                                            eval_data=d_eval, lr=1e-2, progress=False)
            rows.append({"width": width, "group": group, "control": r.accuracy_control, "penalty": r.penalty,
                         "penalty_std": r.penalty_std, "accuracies": r.accuracies, "repeats": REPEATS})
            print(width, group, f"{r.penalty:.1f} ± {r.penalty_std:.1f}", flush=True)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "insertion_width.json").write_text(json.dumps({"started": started, "rows": rows}, indent=1, default=str))
    lines = ["# Insertion test: rotation penalty against the retrained layer's width", "",
             f"Run {started} with `.venv/bin/python benchmarks/insertion_width.py`; protocol in the script's docstring. "
             f"Penalty: control accuracy minus the inserted map's, in points, mean ± standard deviation over "
             f"{REPEATS} repeats.", "", "| width | map | control % | penalty ± std |", "|---|---|---|---|"]
    lines += [f"| {r['width']} | {r['group']} | {r['control']:.1f} | {r['penalty']:.1f} ± {r['penalty_std']:.1f} |"
              for r in rows]
    (RESULTS / "insertion_width.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
