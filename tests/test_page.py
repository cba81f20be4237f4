"""The results page (workbench._page): verdicts first, contents, captioned figures, raw numbers linked."""
import html.parser
import json

import pytest

from workbench._page import Page


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.hrefs, self.text = set(), [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and "href" in a:
            self.hrefs.append(a["href"])

    def handle_data(self, data):
        self.text.append(data)


class _Plotted:
    def plot(self, ax=None):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        return ax


def test_page_puts_verdicts_first_links_every_check_and_the_raw_numbers(tmp_path):
    page = Page("A <study>", intro="What was run.")
    page.section("verify", "Verification <float64>", "<table><tr><td>1</td></tr></table>", group="CNN",
                 figure=_Plotted(), caption="errors per site", caveat="one seed")
    page.section("control", "Negative control", "<p>rotated</p>", group="CNN")
    page.check("function preserved", True, "max relative difference 1e-16", "verify")
    page.check("rotation changes the function", False, "relative difference 0.3", "control")
    page.check("sites moved", None, "no site was transformed", "verify")
    path = page.write(tmp_path, {"x": 1})
    text = path.read_text()
    parser = _Links()
    parser.feed(text)
    assert text.index("Verdicts") < text.index("Contents") < text.index("Verification")
    assert "A &lt;study&gt;" in text and "Verification &lt;float64&gt;" in text  # titles are escaped
    assert "<table><tr><td>1</td></tr></table>" in text  # report HTML is inserted as is
    assert [v for v in ("PASS", "FAIL", "NOT CHECKED") if f">{v}<" in text] == ["PASS", "FAIL", "NOT CHECKED"]
    internal = [h[1:] for h in parser.hrefs if h.startswith("#")]
    assert internal and set(internal) <= parser.ids  # every link resolves
    assert "summary.json" in parser.hrefs and json.loads((tmp_path / "summary.json").read_text()) == {"x": 1}
    assert "errors per site" in text and "Caveat: one seed" in text and "data:image/png;base64," in text
    assert "<script" not in text and "http" not in text.split("</title>")[1]  # nothing loaded from the web


def test_page_refuses_what_would_make_a_broken_or_unexplained_page():
    page = Page("t")
    with pytest.raises(ValueError, match="a figure needs a caption"):
        page.section("a", "A", figure=_Plotted())
    page.section("a", "A")
    with pytest.raises(ValueError, match="used twice"):
        page.section("a", "A again")
    with pytest.raises(ValueError, match="link anchor"):
        page.section("Bad Id", "B")
    page.check("c", True, "e", "missing")
    with pytest.raises(ValueError, match=r"do not exist: \['missing'\]"):
        page.render()
