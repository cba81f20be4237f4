"""Markdown pieces shared by every experiment's page (the pages are generated from the JSON alone)."""
from __future__ import annotations

import datetime


def table(header: list[str], rows: list[list]) -> str:
    cell = lambda v: f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def header(doc: dict, title: str) -> list[str]:
    t = doc["timing"]
    budget = doc["budget"]
    note = {"paper": "the paper's protocol at the scale this CPU allows",
            "quick": "**quick budget** (seconds to minutes): too small to compare with the paper; "
                     "rerun with `--budget paper` for the numbers quoted in docs/results.md",
            "smoke": "**smoke budget**: a test of the machinery, not a result"}.get(budget, budget)
    day = datetime.datetime.fromtimestamp(t["finished"], datetime.timezone.utc).date().isoformat()
    return [f"# {title}", "",
            f"- Generated from [`{doc['experiment']}.json`]({doc['experiment']}.json) by `{doc['command']}` — "
            f"budget `{budget}`: {note}.",
            f"- {t['runs']} runs; compute {duration(t['compute_seconds'])} (sum over runs), wall "
            f"{duration(t['wall_seconds'])} from the first run's start to the last run's end ({day}), on "
            f"{t['machine']}.",
            "- Every number below is recomputed from the JSON's `runs` by `workbench.experiments."
            f"{doc['experiment']}.page` (a test regenerates this page and compares).", ""]
