"""The widgets, driven from code: state set and read, Apply's verdicts, errors, cancellation, no mutation."""
import re
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import workbench as wb
from workbench.symmetry import site_units
from workbench.widgets import CacheBrowser, Cancelled, ExplorerResult, IntertwinerExplorer
from workbench.widgets._base import shown_text
from workbench.widgets._cache_browser import slice_2d
from workbench.widgets._compute import correlation, unit_activations, unit_traces
from workbench.widgets._examples import kind_of, token_contexts_html
from models import randomise


def small_cnn(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                        nn.Linear(12, 6))
    return randomise(net).to(dtype)


@pytest.fixture(scope="module")
def shapes():
    return wb.data.shapes(40, size=16, seed=0)


@pytest.fixture
def explorer(shapes):
    return IntertwinerExplorer(small_cnn(), shapes, k=5, progress=False)


def snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_own_group_passes_and_units_map_onto_units(explorer):
    assert explorer.smap.names == ["2", "5"] and explorer.site == "2" and explorer.group == "own"
    result = explorer.apply()
    assert isinstance(result, ExplorerResult) and result is explorer.result
    assert result.passed and result.is_symmetry and result.group == "scaled_permutation"
    assert result.verification.max_rel_diff <= result.verification.tolerance == 1e-5  # float32's tolerance
    assert "PASS" in explorer.badge.value and "seed 0" in explorer.badge.value
    # The element really moved the units (not the identity), and matching undoes it exactly.
    assert not torch.equal(result.transform.elements["2"].perm, torch.arange(8))
    assert result.shift.overlap_matched.min() == 1.0 > result.shift.overlap_same_index.mean()
    varies = (explorer.before["2"].std(dim=0) > 0)[result.matching.perm]  # a dead unit correlates 0 with all
    assert varies.sum() >= 4
    assert torch.allclose(result.matched_correlation[varies], torch.ones(1, dtype=torch.float64), atol=1e-5)
    assert [type(p.children[1].children[1]).__name__ for p in explorer.heatmap.children[:2]] == ["Image", "Image"]
    rows = re.findall(r"<b>(original model, unit 0|transformed, same index 0|transformed, unit \d+ matched to 0)",
                      explorer.examples_text)
    assert len(rows) == 3 and "top-5 overlap 1.000 after matching" in explorer.examples_text


def test_exact_in_float64(shapes):
    explorer = IntertwinerExplorer(small_cnn(torch.float64), shapes.inputs.double(), k=5, progress=False)
    explorer.site, explorer.sigma = "5", 2.0
    result = explorer.apply()
    assert result.passed and result.verification.tolerance == 1e-10
    assert result.verification.max_rel_diff < 1e-13


def test_rotation_at_a_relu_site_fails(explorer):
    explorer.group = "rotation"  # an alias: stored as the registry's name
    assert explorer.group == "orthogonal"
    result = explorer.apply()
    assert not result.passed and not result.is_symmetry and result.site in result.transform.forced
    assert result.verification.max_rel_diff > 1e-3
    assert "FAIL" in explorer.badge.value and "not a symmetry here" in explorer.badge.value
    assert result.matched_correlation.abs().mean() < 0.99  # a rotation mixes units: no clean diagonal


def test_a_subgroup_of_the_sites_group_is_a_symmetry(explorer):
    explorer.group = "permutation"
    result = explorer.apply()
    assert result.passed and result.is_symmetry and result.transform.elements["2"].scale is None


def test_seed_picks_the_element(explorer):
    first = explorer.apply().transform.elements["2"].to_dict()
    explorer.seed = 3
    third = explorer.apply().transform.elements["2"].to_dict()
    explorer.seed = 0
    again = explorer.apply().transform.elements["2"].to_dict()
    assert first == again and first != third
    assert explorer.result.seed == 0


def test_result_agrees_with_the_library_verbs(explorer, shapes):
    explorer.site, explorer.seed = "5", 7
    result = explorer.apply()
    new = wb.apply_transform(explorer.model, result.transform)
    shift = wb.interpretation_shift(explorer.model, new, shapes.inputs, "5", k=5)
    for field in ("top_before", "top_after", "perm", "overlap_same_index", "overlap_matched"):
        assert torch.equal(getattr(result.shift, field), getattr(shift, field)), field
    report = wb.verify(explorer.model, new, shapes.inputs[:32], transform=result.transform)
    assert report.max_rel_diff == result.verification.max_rel_diff and result.verified_on == 32
    assert result.to_frame().shape == (12, 7)
    assert "PASS" in result._repr_html_()


def test_bad_input_gets_clear_errors(explorer, shapes):
    with pytest.raises(wb.UnknownNameError, match=r"no site named 'nope'"):
        explorer.site = "nope"
    with pytest.raises(wb.InvalidOptionError, match=r"Did you mean 'orthogonal'"):
        explorer.group = "orthogonl"
    with pytest.raises(ValueError, match=r"seed=-1 is out of range"):
        explorer.seed = -1
    with pytest.raises(TypeError, match=r"seed must be an int; got '3'"):
        explorer.seed = "3"
    with pytest.raises(ValueError, match=r"sigma must be a number in \[0, 10\]; got -1"):
        explorer.sigma = -1
    with pytest.raises(ValueError, match=r"unit=8 is out of range; expected 0 <= unit < 8"):
        explorer.unit = 8
    assert (explorer.site, explorer.group, explorer.seed, explorer.sigma, explorer.unit) == ("2", "own", 0, 1.0, 0)
    with pytest.raises(TypeError, match=r"needs a torch.nn.Module; got str"):
        IntertwinerExplorer("myrtle_relu", shapes)
    with pytest.raises(ValueError, match=r"could not run on the data \(inputs of shape \(40, 1, 16, 16\)"):
        IntertwinerExplorer(small_cnn(), shapes.inputs[:, :1], progress=False)
    with pytest.raises(ValueError, match=r"data must be a ConceptDataset .* got list"):
        IntertwinerExplorer(small_cnn(), [1, 2])
    with pytest.raises(wb.WorkbenchError, match=r"found no site in this Sequential"):
        IntertwinerExplorer(nn.Sequential(nn.Flatten(), nn.Linear(768, 2)), shapes, progress=False)


def test_the_model_is_never_modified(shapes):
    model = small_cnn().train()  # train mode: a careless forward would move BatchNorm's statistics
    before = snapshot(model)
    hooks = [(m._forward_hooks.copy(), m._forward_pre_hooks.copy()) for m in model.modules()]
    explorer = IntertwinerExplorer(model, shapes, k=5, progress=False)
    for group in ("own", "orthogonal", "gl"):
        explorer.group = group
        explorer.apply()
        explorer.unit = 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())
    assert [(m._forward_hooks, m._forward_pre_hooks) for m in model.modules()] == hooks
    assert explorer.new_model is not model


def test_cancel_stops_at_the_next_step_and_keeps_the_last_result(explorer):
    kept = explorer.apply()
    explorer.seed = 5

    def cancel_at_verify(change):
        if change["new"] == 2:  # the bar entered step 2 ("verify"): the next check stops
            explorer.cancel()

    explorer.job.bar.observe(cancel_at_verify, "value")
    assert explorer.apply() is None
    assert explorer.result is kept and "cancelled" in explorer.message.value
    assert not explorer.apply_button.disabled and explorer.cancel_button.disabled
    explorer.job.bar.unobserve(cancel_at_verify, "value")
    assert explorer.apply().seed == 5  # the next Apply runs normally


def test_the_apply_button_runs_in_the_background(explorer):
    explorer.seed = 2
    explorer.apply_button.click()
    result = explorer.wait(timeout=60)
    assert result is not None and result.seed == 2 and "PASS" in explorer.badge.value
    assert "done in" in explorer.message.value


def test_site_and_unit_changes_redraw(explorer):
    explorer.apply()
    explorer.site = "5"
    assert explorer._unit.max == 11 and "12 units" in explorer.site_info.value
    assert explorer.examples_text.count("<figure") == 5  # before only: the result is for another site
    assert "settings changed" in explorer.message.value
    explorer.apply()
    explorer.unit = 11
    assert "original model, unit 11" in explorer.examples_text and explorer.examples_text.count("<figure") == 15


def test_a_zoo_mlp_on_digits():
    digits = wb.data.digits(size=16)
    explorer = IntertwinerExplorer(wb.zoo.load("mlp_relu", 0), digits.subset(torch.arange(300)), progress=False)
    assert explorer.smap.names == ["2", "4"]
    assert explorer.apply().passed
    explorer.group = "orthogonal"
    assert not explorer.apply().passed
    assert kind_of(digits.inputs) == "images" and "<figcaption" in explorer.examples_text


@pytest.fixture(scope="module")
def mlp_explorer():
    torch.manual_seed(1)
    model = randomise(nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 9), nn.ReLU(), nn.Linear(9, 2)))
    return IntertwinerExplorer(model.double(), torch.randn(64, 6, dtype=torch.float64), k=4, progress=False)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), sigma=st.floats(0.0, 3.0), site=st.sampled_from(["1", "3"]))
def test_own_group_always_passes_on_an_mlp(mlp_explorer, seed, sigma, site):
    mlp_explorer.site, mlp_explorer.seed, mlp_explorer.sigma = site, seed, sigma
    result = mlp_explorer.apply()
    assert result.passed and result.verification.max_rel_diff < 1e-12  # float64
    assert result.shift.overlap_matched.min() == 1.0 and "<figure" in mlp_explorer.examples_text  # vectors as strips


def test_unit_scores_traces_and_correlation():
    model = small_cnn()
    x = torch.rand(6, 3, 16, 16)
    site = wb.symmetry_map(model)["5"]
    scores = unit_activations(model, [site], x, batch_size=4)["5"]
    _, cache = wb.run_with_cache(model, x, names="5")
    assert torch.equal(scores, cache["5"].double().amax(dim=(2, 3)))
    assert torch.equal(unit_traces(model, site, x[:3], 4), cache["5"][:3, 4].reshape(3, -1).double())
    units12 = SimpleNamespace(n=12)
    tokens_layout = torch.randn(2, 7, 12)  # TransformerLens: [batch, pos, d] with the units last
    hook = wb.symmetry.Observation("h", 0, "pre")
    assert torch.equal(site_units(tokens_layout, units12, hook, True), tokens_layout.transpose(1, 2))
    per_head = torch.randn(2, 7, 4, 12)  # [batch, pos, head, d_head]: a per-head site reads its own head only
    head2 = wb.symmetry.Observation("h", 0, "pre", axis=-1, heads=(2,))
    assert torch.equal(site_units(per_head, units12, head2, True), per_head[:, :, 2].transpose(1, 2))
    a = torch.randn(50, 4, dtype=torch.float64)
    b = torch.cat([3 * a[:, [2, 0]], -a[:, [1]], torch.zeros(50, 1, dtype=torch.float64)], dim=1)
    r = correlation(a, b)
    assert torch.allclose(r[[0, 1, 2], [2, 0, 1]], torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    assert torch.equal(r[3], torch.zeros(4, dtype=torch.float64))  # a constant unit: 0, not NaN

    def stop(_):
        raise Cancelled("stop")

    with pytest.raises(Cancelled):
        unit_activations(model, [site], x, check=stop)


def test_token_contexts_are_highlighted_and_escaped():
    tokens = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    acts = torch.tensor([[0.0, 1.0, 4.0, 2.0], [0.0, 0.0, 0.5, 0.0]])
    text = token_contexts_html([("unit 3", tokens, acts, ["a", "b"])], ["<bos>", "x", "peak", "&"], width=1)
    assert "&lt;bos&gt;" in text and "&amp;" in text and "<bos>" not in text
    assert re.search(r"rgba\(255,140,0,1\.00\);font-weight:bold;padding:0 2px'>peak<", text)
    assert "rgba(255,140,0,0.25)" in text  # x at 1.0 of a row maximum 4.0
    assert "<b>unit 3</b>" in text and text.count("<div style='font-family") == 2
    assert kind_of(tokens) == "tokens" and kind_of(torch.rand(2, 5)) == "vectors"


@pytest.fixture(scope="module")
def cache(shapes):
    _, cache = wb.run_with_cache(small_cnn(), shapes.inputs[:6], names=["1", "2", "7", "8"])
    return cache


def test_cache_browser_lists_and_shows(cache):
    browser = CacheBrowser(cache)
    table = browser.table
    assert list(table["name"]) == cache.names and list(table["bytes"]) == list(cache.to_frame()["bytes"])
    assert browser.name == "1" and browser._channel.max == 7 and browser._example.max == 5
    assert "f32[6,8,16,16]" in browser.info.value and "<img" in shown_text(browser.figure)
    browser.example, browser.channel = 4, 7
    values, caption = slice_2d(browser.tensor, 4, 7)
    assert torch.equal(values, cache["1"][4, 7]) and caption == "example 4, channel 7: (16, 16)"
    assert "1 — example 4, channel 7: (16, 16)" in shown_text(browser.figure)
    browser.view = "histogram"
    assert "image/png" in browser.figure.outputs[0]["data"]  # a matplotlib figure
    browser.name = "8"  # [6, 6]: examples × units, no example or channel to pick
    assert browser._example.disabled and browser._channel.disabled
    assert slice_2d(browser.tensor, 0, 0)[1] == "examples × units (6, 6)"


def test_cache_browser_errors(cache):
    browser = CacheBrowser(cache)
    with pytest.raises(wb.UnknownNameError, match=r"'22' is not in this cache \(4 names\). Nearest names: \['2'\]"):
        browser.name = "22"
    with pytest.raises(ValueError, match=r"view='pie' is not a valid option"):
        browser.view = "pie"
    with pytest.raises(ValueError, match=r"example=6 is out of range"):
        browser.example = 6
    with pytest.raises(ValueError, match=r"needs a non-empty ActivationCache .* got dict \(empty\)"):
        CacheBrowser({})
    plain = CacheBrowser({"a": torch.arange(5), "b": torch.randn(3, 4)})  # any mapping of tensors
    assert plain.name == "a" and "all 5 values" in shown_text(plain.figure)


@pytest.mark.slow  # the first seaborn import
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # seaborn's own use of matplotlib
def test_result_plot_draws_the_matched_heatmap(explorer):
    import matplotlib.pyplot as plt

    ax = explorer.apply().plot()
    assert ax.get_xlabel() == "original unit (matched order)"
    plt.close(ax.figure)


def test_a_click_on_a_heatmap_cell_shows_that_unit(explorer):
    """A click reports where it landed in the drawn image (ipyevents), one source pixel per cell."""
    from workbench.widgets._explorer import _cell

    explorer.apply()
    click = {"relativeX": 75.6, "relativeY": 3.0, "boundingRectWidth": 220, "boundingRectHeight": 220}
    assert _cell(click, (16, 16)) == (0, 5)  # 75.6 px of 220 across 16 cells: the sixth cell
    assert _cell({**click, "relativeX": 219.9, "relativeY": 220.0}, (16, 16)) == (15, 15)
    r = explorer.result
    assert explorer.click_cell("same", 0, 3) == 3 and explorer.unit == 3
    unit = explorer.click_cell("matched", 2, 5)
    assert unit == int(r.matching.perm[5]) and explorer.unit == unit
    assert f"unit {unit}" in explorer.examples_text
    with pytest.raises(wb.InvalidOptionError, match="outside the heatmap"):
        explorer.click_cell("same", 0, 10_000)


def test_without_javascript_each_widget_says_what_it_shows(explorer, cache):
    # A front end without the widgets' JavaScript (nbconvert to text, a terminal console) shows the text/plain of the
    # mime bundle: ipywidgets' default is the first 110 characters of the children's HTML (a <style> block).
    text = explorer._repr_mimebundle_()["text/plain"]
    assert text == f"IntertwinerExplorer(site {explorer.site!r}, group 'own', seed 0: not applied yet; 2 sites)"
    explorer.seed = 4
    assert explorer.apply().passed
    assert explorer._repr_mimebundle_()["text/plain"] == f"IntertwinerExplorer(site {explorer.site!r}, group 'own', seed 4: PASS; 2 sites)"
    explorer.group = "orthogonal"
    assert not explorer.apply().passed and ": FAIL;" in explorer._repr_mimebundle_()["text/plain"]
    browser = CacheBrowser(cache)
    browser.view = "histogram"
    assert browser._repr_mimebundle_()["text/plain"] == f"CacheBrowser({len(cache)} names; showing {browser.name!r} as a histogram)"


class Concat(nn.Module):
    """c(ReLU(cat(a(x), b(x)))), the ReLU a module: the concatenation is a host site the explorer can read."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.relu, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 5, 1), nn.ReLU(), nn.Conv2d(9, 2, 1)

    def forward(self, x):
        return self.c(self.relu(torch.cat([self.a(x), self.b(x)], 1))).mean((2, 3))


def test_a_host_site_s_group_is_shown_as_the_reports_show_it(shapes):
    """A concatenation's group is named ``scaled_permutation_per_block`` (no registry name: its blocks are the
    mathematics); the site list and the site's line show its label too, as the symmetry map's frame does."""
    explorer = IntertwinerExplorer(randomise(Concat()), shapes, k=5, progress=False)
    row = explorer.smap.to_frame().set_index("site").loc["relu"]
    assert (row["group"], row["label"]) == ("scaled_permutation_per_block", "scaled_permutation on each of 2 blocks (4 + 5)")
    shown = f"{row['group']} ({row['label']})"
    assert any(value == "relu" and label.endswith(shown) for label, value in explorer._site.options)
    explorer.site = "relu"
    assert f"group <b>{shown}</b>" in explorer.site_info.value
