"""The README contract and the headless tour."""
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_gives_the_two_setup_commands_and_the_lab_command():
    readme = (ROOT / "README.md").read_text()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", readme, re.S))
    for command in ("make tour", "make test", "make lab"):
        assert command in blocks
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci  # CI runs exactly the README's test command


def test_torch_is_pinned_first_and_a_range_in_the_package():
    makefile = (ROOT / "Makefile").read_text()
    install = makefile[makefile.index("$(STAMP): pyproject.toml"):]
    assert install.index("$(TORCH_SPEC)") < install.index("-e '.[dev]'")
    assert "TORCH_SPEC ?= torch==2.13.0" in makefile
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_dep = next(d for d in deps if d.startswith("torch"))
    assert "==" not in torch_dep and "<3" in torch_dep
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any(d.startswith("transformer-lens") for d in deps)  # the core install stays light
    tl = next(d for d in extras["transformers"] if d.startswith("transformer-lens"))
    assert ">=3.9" in tl and "<5" in tl  # admits both 3.9 (HookedTransformer) and 4.x (TransformerBridge)
    assert install.index("$(TORCH_SPEC)") < install.index("$(TORCHVISION_SPEC)") < install.index("-e '.[dev]'")


@pytest.mark.slow
def test_tour_writes_a_self_contained_report(tmp_path):
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "workbench.cli", "tour", "--out", str(out), "--quiet"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    page = (out / "index.html").read_text()
    # Nothing loaded from the web. Figures are embedded as base64 data URIs, in which "http" turns up by chance
    # (about 3% of runs for the tour's ~470 kB of base64): look outside them.
    text = re.sub(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+", "data:", page.split("</title>")[1])
    assert "<script" not in page and "http" not in text
    assert not re.search(r"""(src|href)\s*=\s*["']?//|url\(\s*["']?//""", text)  # protocol-relative addresses
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cnn"]["bn_output_fraction_negative"] > 0.2  # in-place ReLU did not corrupt the cache
    assert summary["harvest"] == {**summary["harvest"], "rows": 1024, "complete": True}
    assert summary["transformer"]["alias_resolves"] is True
    sym = summary["symmetry"]
    assert sym["verify_float32"] and sym["max_rel_diff_float64"] < 1e-10 and sym["rotation_control_fails"]
    assert sym["top10_overlap_matched_grelu"] == 1.0 > sym["top10_overlap_matched_rotation"]
    assert summary["transformer"]["fire_by_default"] < summary["transformer"]["names"]
    t = summary["transformer"]
    assert t["resid_group"] == "permutation" and t["resid_group_folded"] == "orthogonal_ones"
    assert t["verify_float64"] and t["max_abs_logprob_diff"] < 1e-9 and t["rotation_control_fails"]
    assert t["mlp_top10_overlap_matched"] == 1.0 > t["resid_top10_overlap_same_index"]
    assert summary["cnn"]["accuracy_on_shapes"] > 0.8  # the shipped zoo model, not a random one
    assert summary["similarity"]["grelu_cka"] < summary["similarity"]["standardized_cka"]  # the paper's direction
    for family in ("13", "16"):
        assert summary["probing"][family]["scaled_permutation"]["p"] == 1.0  # the layer's own group: identical
    assert set(summary["stitching_penalty"]) == {"relu", "orthogonal", "gl"}
    m = summary["minilm"]  # a Hugging Face model through the same verbs
    assert m["resid_group"] == "permutation" and m["compared"] == "encoder outputs"
    assert m["verify_float32"] and m["rotation_control_fails"]
    assert m["mlp_top10_overlap_matched"] > 0.99 > 0.5 > m["ov_top10_overlap_matched"]
    assert set(summary["phases"]) >= {"CNN: symmetries", "Transformer: MiniLM"}  # each phase timed
    assert "CNN: symmetries" not in result.stderr  # --quiet: no progress lines
    assert "Loading weights" not in result.stderr and "it/s]" not in result.stderr  # nor a library's bar
    read_like_a_person(out / "index.html")


def read_like_a_person(path):
    """The report in a real browser at 1280 px: verdicts first, nothing wider than the window, every link
    resolves, long tables collapsed, every figure captioned, and no verdict said twice."""
    from test_browser import CHROMIUM, CHROMIUM_ARGS

    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (install Debian's chromium: apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(path.as_uri())
            width = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
            assert width[0] <= width[1], f"horizontal scroll at 1280 px: {width}"
            headings = page.locator("h2").all_inner_texts()
            assert headings[:2] == ["Verdicts", "Contents"] and headings[-1] == "The raw numbers"
            rows = page.locator("#verdicts ~ div table tbody tr")
            assert rows.count() >= 10
            verdicts = page.locator("#verdicts ~ div .badge").all_inner_texts()
            assert set(verdicts) <= {"PASS", "FAIL", "NOT CHECKED"} and "FAIL" not in verdicts, verdicts
            evidence = page.locator("#verdicts ~ div table tbody tr td:nth-child(3)").all_inner_texts()
            assert not any(e.startswith(("PASS", "FAIL")) for e in evidence)  # the verdict is not repeated
            for href in page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))"):
                if href.startswith("#"):
                    assert page.locator(f"[id='{href[1:]}']").count() == 1, f"broken link {href}"
                else:
                    assert (path.parent / href).exists(), f"broken link {href}"
            assert page.locator("figure").count() == page.locator("figure figcaption").count() >= 4
            # The transformer maps are long: grouped by layer, collapsed until opened.
            closed = page.locator("#minilm-map ~ div details:not([open])").count()
            assert closed >= 6
            assert page.locator("#minilm-map ~ div table").first.is_visible() is False
        finally:
            browser.close()


def test_workbench_raises_its_own_error_classes_not_bare_builtins():
    """Bad input gets a class from workbench/_errors.py (each subclasses the builtin a user would guess)."""
    import ast

    bare = {"ValueError", "TypeError", "KeyError", "IndexError"}
    found = []
    for path in sorted((ROOT / "workbench").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(exc, ast.Name) and exc.id in bare:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} raise {exc.id}")
    assert not found, found


def test_an_unknown_budget_names_the_valid_ones():
    import workbench as wb
    from workbench.experiments import BUDGETS, EXPERIMENTS, module

    for name in EXPERIMENTS:
        try:
            module(name).protocol("papr")
        except wb.InvalidOptionError as exc:
            assert "budget='papr'" in str(exc) and all(b in str(exc) for b in BUDGETS), (name, exc)
        else:
            raise AssertionError(f"{name}: protocol('papr') did not refuse the budget")
