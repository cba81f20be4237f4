"""Adversarial checks of the widgets: every number they show recomputed here from activations captured with
plain forward hooks (float64), on models and data built to trip them (sign flips, stale state, NaN)."""
import re

import pytest
import torch
from torch import nn

import workbench as wb
from workbench.widgets import IntertwinerExplorer, NeuronBasisProbe

F64 = torch.float64


def captured(model: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """The output of module ``name`` on ``x``, by a plain forward hook, in eval mode (restored)."""
    seen = []
    handle = dict(model.named_modules())[name].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    mode = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
        model.train(mode)
    return seen[0].double()


def pooled(a: torch.Tensor) -> torch.Tensor:
    """``[N, C, ...]`` -> each example's largest value per unit, ``[N, C]``."""
    return a.reshape(a.shape[0], a.shape[1], -1).amax(-1)


def shown_rows(explorer) -> list[tuple[str, list[str]]]:
    """``(title, captions)`` of each row of thumbnails the examples panel shows."""
    blocks = re.split(r"<div style='margin-bottom:6px'>", explorer.examples_text)[1:]
    return [(re.search(r"<b>(.*?)</b>", b).group(1), re.findall(r"<figcaption[^>]*>(.*?)</figcaption>", b))
            for b in blocks]


def tanh_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 4, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()


def unit_map(before: torch.Tensor, after: torch.Tensor) -> dict[int, tuple[int, float]]:
    """``{unit after: (unit before, ±1)}`` found by comparing whole activation maps (exact in float64)."""
    found = {}
    for i in range(after.shape[1]):
        for j in range(before.shape[1]):
            for s in (1.0, -1.0):
                if torch.allclose(after[:, i], s * before[:, j], rtol=0, atol=1e-12):
                    found[i] = (j, s)
    return found


def test_flipped_conv_units_show_r_minus_one_and_a_negative_scale():
    """At a tanh conv site an exact signed permutation flips units; the per-image maxima of a flipped unit are
    the old minima negated, so their plain Pearson r with the old maxima is anything (it showed 0.2 for an
    exact −1, 'mean |r| on the diagonal 0.288' for a PASS), and the matching reported scale +1 for it."""
    model = tanh_cnn()
    x = torch.randn(30, 3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    explorer = IntertwinerExplorer(model, x, k=5, progress=False)
    explorer.seed = 2
    r = explorer.apply()
    assert r.passed
    truth = unit_map(captured(model, x, "1"), captured(explorer.new_model, x, "1"))
    assert len(truth) == 6 and sum(s < 0 for _, s in truth.values()) >= 3  # the seed flips units
    for after, (before, sign) in truth.items():
        assert int(r.matching.perm[after]) == before
        assert float(r.matching.scale[after]) == sign
        assert float(r.correlation[after, before]) == pytest.approx(sign, abs=1e-12)
    assert r.matching.element.group == "diagonal_permutation"
    assert "mean |r| on the diagonal 1.000" in explorer.heatmap.children[1].children[0].value
    explorer.unit = truth[0][0]
    assert f"r = {truth[0][1]:+.3f}" in shown_rows(explorer)[2][0]


def relu_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 2)).double()


def test_weights_changed_after_opening_are_scored_again():
    """The explorer scores the original model once; after an optimiser step the panel showed the old top examples
    and an exact symmetry showed matched overlap 0.38 (the training's shift, compared as the transform's)."""
    model = relu_mlp()
    x = torch.randn(40, 5, dtype=F64, generator=torch.Generator().manual_seed(2))
    explorer = IntertwinerExplorer(model, x, k=5, progress=False)
    assert explorer.apply().shift.overlap_matched.min() == 1.0
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        optimiser.zero_grad()
        model(x).pow(2).sum().backward()
        optimiser.step()
    hand = captured(model, x, "1")
    explorer.unit = 3  # a redraw: the top examples of the model as it is now
    assert explorer.result is None and "scored again" in explorer.badge.value
    for u in range(12):
        explorer.unit = u
        assert shown_rows(explorer)[0][1] == [f"#{i}" for i in hand[:, u].topk(5).indices.tolist()]
    r = explorer.apply()
    assert r.passed and r.shift.overlap_matched.min() == 1.0
    assert torch.equal(r.shift.top_before, hand.topk(5, dim=0).indices.T)
    with torch.no_grad():  # a write through .data has no version counter: Apply's hash of the bytes sees it
        model[0].weight.data.mul_(-1)
    r = explorer.apply()
    assert torch.equal(explorer.before["1"], captured(model, x, "1")) and r.shift.overlap_matched.min() == 1.0
    x.mul_(2)  # the caller's data, edited in place
    explorer.apply()
    assert torch.equal(explorer.before["1"], captured(model, x, "1"))
    model[1] = nn.Tanh()  # another activation: another group, so another explorer
    with pytest.raises(wb.WorkbenchError, match="modules changed since this explorer opened"):
        explorer.apply()


def table_column(html_text: str, column: int) -> list[str]:
    return [re.findall(r"<td>(.*?)</td>", row)[column] for row in re.findall(r"<tr>\s*(<td>.*?)</tr>", html_text, re.S)]


def test_a_control_moved_during_a_background_run_is_not_shown_the_old_result():
    """A Run/Apply reads its settings when it starts; moving a control while the worker ran left the panels showing
    the old concept's best units (no concept named) under the new concept's name, and the message 'done in'."""
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(3)
    even, third = torch.arange(60) % 2 == 0, torch.arange(60) % 3 == 0
    acts = torch.randn(60, 6, dtype=F64, generator=g)
    acts[:, 2] += 2 * even
    acts[:, 4] -= 2 * third
    probe = NeuronBasisProbe(acts, {"even": even, "third": third}, n_bases=9, progress=False)

    def move(change):  # the worker entered its second step: the user picks another concept
        if change["new"] == 2:
            probe.concept = "third"

    probe.job.bar.observe(move, "value")
    probe.run(wait=False)
    probe.wait(120)
    probe.job.bar.unobserve(move, "value")
    assert probe.concept == "third" and probe.result.concept == "third" and "from the cache" in probe.message.value
    auroc = torch.tensor([roc_auc_score(third.numpy(), acts[:, u].numpy()) for u in range(6)], dtype=F64)
    best = (auroc - 0.5).abs().argsort(descending=True).tolist()
    assert "for concept third at layer acts" in probe.units.value and [int(u) for u in table_column(probe.units.value, 0)] == best
    assert probe.result.observed == pytest.approx(float((auroc - 0.5).abs().max()), abs=1e-12)

    explorer = IntertwinerExplorer(relu_mlp(), torch.randn(30, 5, dtype=F64, generator=g), k=4, progress=False)

    def reseed(change):
        if change["new"] == 2:
            explorer.seed = 9

    explorer.job.bar.observe(reseed, "value")
    explorer.apply(wait=False)
    explorer.wait(120)
    assert explorer.result.seed == 0 and explorer.seed == 9
    assert "seed 0" in explorer.badge.value and "settings changed" in explorer.message.value


def test_nan_activations_are_refused_not_ranked_first():
    """torch.topk puts NaN above every number: an example with a NaN input headed every unit's top examples."""
    x = torch.randn(30, 5, dtype=F64, generator=torch.Generator().manual_seed(4))
    x[7, 0] = float("nan")
    with pytest.raises(wb.InvalidOptionError, match=r"site '1' are NaN or infinite on examples \[7\] \(of 30\)"):
        IntertwinerExplorer(relu_mlp(), x, progress=False)
    x[7, 0] = 0.0
    model = relu_mlp()
    with torch.no_grad():
        model[0].weight[4, 0] = float("inf")  # inf · 0 on example 7 only is NaN; elsewhere ±inf
    with pytest.raises(wb.InvalidOptionError, match=r"NaN or infinite on examples \[0, 1, 2"):
        IntertwinerExplorer(model, x, progress=False)
