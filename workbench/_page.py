"""A self-contained HTML page of results: a verdict table first, a table of contents, sections with
captioned figures, the raw numbers as a download at the end. Rendered with jinja2 from
``workbench/templates/page.html.j2`` (autoescaped; only the report objects' own HTML is inserted as is).

Used by ``workbench tour``; any script that wants the same page can build one::

    page = Page("My study")
    page.check("function preserved", report.passed, report.summary(), "verify")
    page.section("verify", "Verification", report._repr_html_(), figure=report, caption="...")
    page.write(folder, summary)
"""
from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ._errors import InvalidOptionError


@dataclass
class Check:
    """One line of the verdict table: what was checked, the outcome, one line of evidence, where."""

    name: str
    passed: Optional[bool]  # None: not checked (shown as such, never as a pass)
    evidence: str
    section: str

    @property
    def verdict(self) -> str:
        return "NOT CHECKED" if self.passed is None else ("PASS" if self.passed else "FAIL")


@dataclass
class Section:
    id: str
    title: str
    html: str
    group: str = ""
    figure: str = ""  # an inline PNG (data URI), or empty
    caption: str = ""
    caveat: str = ""


@dataclass
class Page:
    title: str
    intro: str = ""
    checks: list[Check] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)

    def check(self, name: str, passed: Optional[bool], evidence: str, section: str) -> None:
        """One verdict. ``evidence`` is one line; a leading verdict word (a report summary's "PASS: ", or verify's
        "PASS on the 64 inputs given: ") is dropped, since the verdict column says it."""
        evidence = re.sub(r"^(PASS|FAIL|NOT CHECKED)\b:?\s*", "", evidence)
        self.checks.append(Check(name, None if passed is None else bool(passed), evidence, section))

    def section(self, id: str, title: str, html: str = "", *, group: str = "", figure: Any = None,
                caption: str = "", caveat: str = "") -> None:
        """Add a section; ``figure`` is a report object (its ``plot()`` is drawn) or a matplotlib figure.
        A figure needs a caption: a picture nobody explains is not evidence."""
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", id):
            raise InvalidOptionError(f"section id {id!r} must be lowercase letters, digits and dashes (it is a link anchor).")
        if any(s.id == id for s in self.sections):
            raise InvalidOptionError(f"section id {id!r} is used twice.")
        if figure is not None and not caption:
            raise InvalidOptionError(f"section {id!r}: a figure needs a caption.")
        self.sections.append(Section(id, title, html, group, _png(figure) if figure is not None else "", caption, caveat))

    def render(self, raw_name: str = "summary.json") -> str:
        from jinja2 import Environment, PackageLoader, select_autoescape

        env = Environment(loader=PackageLoader("workbench", "templates"), autoescape=select_autoescape(["j2"]),
                          trim_blocks=True, lstrip_blocks=True)
        known = {s.id for s in self.sections}
        broken = [c.section for c in self.checks if c.section not in known]
        if broken:
            raise InvalidOptionError(f"checks link to sections that do not exist: {broken}.")
        groups: dict[str, list[Section]] = {}
        for s in self.sections:
            groups.setdefault(s.group, []).append(s)
        return env.get_template("page.html.j2").render(page=self, groups=groups, raw_name=raw_name)

    def write(self, folder: Path, summary: dict, name: str = "index.html") -> Path:
        """``folder/name`` and the raw numbers beside it (``summary.json``, linked from the page)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "summary.json").write_text(json.dumps(summary, indent=1))
        path = folder / name
        path.write_text(self.render("summary.json"))
        return path


def _png(figure: Any) -> str:
    """A report's ``plot()`` (or a matplotlib figure/Axes) as a base64 PNG data URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    obj = figure.plot() if hasattr(figure, "plot") and not hasattr(figure, "savefig") else figure
    fig = obj.figure if hasattr(obj, "figure") and not hasattr(obj, "savefig") else obj
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
