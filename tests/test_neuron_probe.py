"""NeuronBasisProbe driven from code: planted concepts, the cached nulls, cancellation, errors, no mutation."""
import pytest
import torch
from torch import nn

import workbench as wb
from workbench.probing import concept_scores, privileged_basis_test
from workbench.widgets import NeuronBasisProbe, ProbeReport
from workbench.widgets._base import shown_text
from conftest import make_transformer
from models import randomise


def planted(unit=5, n=300, d=16, seed=0):
    """Isotropic activations with one concept carried by one unit, and one carried by a random direction."""
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n, generator=g) < 0.5
    acts = torch.randn(n, d, generator=g, dtype=torch.float64)
    acts[:, unit] += 2 * y
    v = torch.randn(d, generator=g, dtype=torch.float64)
    rotated = (acts @ (v / v.norm())) > 0  # lives in no particular unit
    return acts, {"planted": y, "rotated": rotated}


@pytest.fixture(scope="module")
def probe():
    acts, concepts = planted()
    return NeuronBasisProbe(acts, concepts, groups={"acts": "relu"}, n_bases=39, progress=False)


def test_planted_unit_is_the_best_unit_and_beats_rotations(probe):
    probe.concept = "planted"
    r = probe.run()
    assert isinstance(r, ProbeReport) and probe.result is r
    assert r.best_units[0] == 5 and len(r.best_units) == 10
    assert r.units_frame().unit.iloc[0] == 5
    assert r.p_value("orthogonal") < 0.05 and r.p_value("gl") < 0.05
    # the own group (positive scalings and permutations) leaves the best |AUROC − 0.5| unchanged: p = 1
    assert r.p_value("scaled_permutation") == 1.0 and r.z_score("scaled_permutation") == 0.0
    assert r.roles == {"orthogonal": "random", "gl": "random", "scaled_permutation": "architecture"}
    assert torch.allclose(r.null["scaled_permutation"], torch.full((39,), r.observed, dtype=torch.float64), rtol=1e-10, atol=0)
    frame = r.to_frame().set_index("family")
    assert frame.loc["orthogonal", "z"] > 2 and frame.loc["orthogonal", "p"] == r.p_value("orthogonal")
    assert "best unit 5" in r.summary() and "best unit 5" in probe.verdict.value
    assert probe.histogram.outputs[0]["data"]["image/png"]  # the histogram was drawn


def test_negative_control_a_concept_in_a_rotated_direction_is_not_privileged(probe):
    probe.concept = "rotated"
    r = probe.run()
    # The neuron basis is one more random basis for this concept, so p is uniform on {1/40, …, 1} over
    # data sets: P(p ≤ 0.05) measured 0.060 over 200 seeds of planted() with standardized units (0.055
    # raw), as it should be. This one data set gives 0.05 standardized (0.10 raw): a single draw can only
    # be asked not to be the most extreme of the 40 (P = 1/40 under the null).
    assert r.p_value("orthogonal") > 1 / 40
    assert r.p_value("scaled_permutation") == 1.0


def test_numbers_are_privileged_basis_test_s(probe):
    acts, concepts = planted()
    ref = privileged_basis_test(acts, concepts, bases=("orthogonal", "gl"), group="relu", n_bases=39, seed=0)
    probe.concept = "planted"
    r = probe.run()
    for fam, null in ref.null.items():
        assert torch.equal(r.null[fam], null[:, 0])
    assert r.observed == float(ref.observed[0])
    scores = concept_scores(acts, concepts)
    assert torch.equal(r.auroc, scores.auroc[:, 0]) and torch.equal(r.mean_difference, scores.mean_difference[:, 0])


def test_same_seed_same_numbers_other_seed_other_numbers():
    acts, concepts = planted()
    a = NeuronBasisProbe(acts, concepts, n_bases=9, seed=3, progress=False).run()
    b = NeuronBasisProbe(acts, concepts, n_bases=9, seed=3, progress=False).run()
    c = NeuronBasisProbe(acts, concepts, n_bases=9, seed=4, progress=False).run()
    assert all(torch.equal(a.null[f], b.null[f]) for f in a.null)
    assert not torch.equal(a.null["orthogonal"], c.null["orthogonal"])
    assert list(a.null) == ["orthogonal", "gl"]  # no own group known for bare activations


def test_null_is_cached_per_layer_bases_and_seed(probe):
    probe.n_bases, probe.seed, probe.concept = 39, 0, "planted"
    probe.run()
    tests = dict(probe.data._tests)
    probe.concept = "rotated"  # answered from the cache, without Run
    assert probe.ready and probe.result.concept == "rotated" and "cache" in probe.message.value
    assert probe.data._tests == tests
    probe.n_bases = 19  # not computed yet: the result on show stays, Run is asked for
    assert not probe.ready and probe.result.n_bases == 39 and "Run" in probe.message.value
    assert probe.run().n_bases == 19 and len(probe.data._tests) == len(tests) + 1
    probe.n_bases = 39
    assert probe.ready and probe.result.n_bases == 39


def test_cancel_stops_a_run_and_caches_nothing():
    acts, concepts = planted(d=32)
    probe = NeuronBasisProbe(acts, concepts, n_bases=20_000, progress=False)
    probe.run(wait=False)
    probe.cancel()
    assert probe.wait(60) is None
    assert not probe.job.running and "cancelled" in probe.message.value and not probe.ready
    assert probe.data._tests == {}


def test_model_layers_are_the_symmetry_map_sites_spatial_means_and_the_model_is_untouched():
    torch.manual_seed(0)
    net = randomise(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4)))
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    data = wb.data.shapes(60, size=16, seed=0)
    probe = NeuronBasisProbe(net, data, n_bases=9, progress=False)
    assert probe.data.layers == wb.symmetry_map(net).names == ["1", "3"]
    assert net.training and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    net.eval()
    _, cache = wb.run_with_cache(net, data.inputs, names=["1"])
    assert torch.allclose(probe.data.acts["1"], cache["1"].mean((2, 3)))
    probe.layer = "3"
    r = probe.run()
    assert set(r.null) == {"orthogonal", "gl", "scaled_permutation"} and r.p_value("scaled_permutation") == 1.0
    assert len(r.auroc) == 5
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_activation_cache_layers_are_its_names():
    mlp = randomise(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 8), nn.ReLU(), nn.Linear(8, 4)))
    data = wb.data.shapes(50, size=16, seed=1)
    _, cache = wb.run_with_cache(mlp, data.inputs)
    probe = NeuronBasisProbe(cache, data, n_bases=5, progress=False)
    assert probe.data.layers == cache.names and probe.data.acts["2"].shape == (50, 8)
    assert probe.run().layer == cache.names[0]


@pytest.mark.slow
def test_transformer_layers_are_per_token():
    model = make_transformer(d_vocab=96, n_ctx=16)
    text = wb.data.synthetic_language(6, seq_len=16, seed=0)
    probe = NeuronBasisProbe(model, text, n_bases=5, progress=False)
    assert "resid" in probe.data.layers
    assert probe.data.scores("resid").n_examples == 6 * 16  # one row per token
    probe.layer = "resid"
    own = {s.name: s.group.name for s in wb.symmetry_map(model).sites}["resid"]
    assert probe.run().roles[own] == "architecture"  # the residual stream's own group is a null family
    assert any("hook shape" in s for s in probe.skipped)  # per-head q/k/v: not one value per unit


def test_bad_input_says_what_is_wrong():
    acts, concepts = planted()
    with pytest.raises(wb.WorkbenchError, match="activations .* or a torch model; got str"):
        NeuronBasisProbe("acts", concepts)
    with pytest.raises(wb.WorkbenchError, match="needs data with concepts"):
        NeuronBasisProbe(acts)
    with pytest.raises(wb.WorkbenchError, match="must agree on every axis"):
        NeuronBasisProbe(acts[:100], concepts).run()
    with pytest.raises(wb.WorkbenchError, match="all-true or all-false"):
        NeuronBasisProbe(acts, {"never": torch.zeros(300, dtype=torch.bool)})
    with pytest.raises(wb.WorkbenchError, match=r"shape \(300, 4, 4\) but the concepts have 2 axes"):
        NeuronBasisProbe({"x": torch.randn(300, 4, 4)}, concepts)
    with pytest.raises(wb.WorkbenchError, match="must be a ConceptDataset"):
        NeuronBasisProbe(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), concepts)
    with pytest.raises(wb.WorkbenchError, match="layer"):
        NeuronBasisProbe(acts, concepts, groups={"nope": "relu"})
    probe = NeuronBasisProbe(acts, {**concepts, "never": torch.zeros(300, dtype=torch.bool)}, progress=False)
    assert probe.data.dropped == ["never"] and "never" in probe.children[0].value
    with pytest.raises(wb.WorkbenchError, match="planted"):
        probe.concept = "plantd"
    with pytest.raises(wb.WorkbenchError, match="acts"):
        probe.layer = "act"
    with pytest.raises(wb.WorkbenchError, match="n_bases=0 is out of range"):
        probe.n_bases = 0
    with pytest.raises(wb.WorkbenchError, match="seed must be an int"):
        probe.seed = 1.5
    with pytest.raises(wb.WorkbenchError, match="family"):
        NeuronBasisProbe(acts, concepts, n_bases=3, progress=False).run().p_value("permutation")
    assert "best unit" not in shown_text(probe.histogram)


def test_without_javascript_the_probe_says_what_it_shows():
    acts, concepts = planted()
    probe = NeuronBasisProbe(acts, concepts, n_bases=9, seed=3, progress=False)
    probe.concept = "planted"
    text = probe._repr_mimebundle_()["text/plain"]  # (ipywidgets' default: the first 110 characters of its HTML)
    assert text == "NeuronBasisProbe(layer 'acts', concept 'planted', 9 bases: not run yet)"
    assert probe.run().best_units[0] == 5
    assert probe._repr_mimebundle_()["text/plain"] == "NeuronBasisProbe(layer 'acts', concept 'planted', 9 bases: best unit 5)"
