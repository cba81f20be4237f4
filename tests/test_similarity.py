"""Similarity measures: every declared invariance checked both ways, known values, errors, the report."""
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import workbench as wb
from workbench import InvalidOptionError
from workbench.groups import get_group
from workbench.similarity import INVARIANCE_GROUPS, INVARIANCES, MEASURES, DegenerateRepresentationError

S = wb.similarity
EPS = torch.finfo(torch.float64).eps
TOL = 1e3 * EPS  # float64 rounding through Gram matrices, SVDs and sums (150 random cases: worst 2.4e-15)
CLEAR = 1e-3  # ~10⁸ × TOL: a change this large means the measure clearly sees the transformation
SHAPES = [(40, 6), (24, 5, 3, 3)]  # plain units and conv maps


def acts(shape, seed, decay=0.3):
    """ReLU-like activations with correlated units and a decaying spectrum (so SVCCA truncates)."""
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    z = torch.randn(n, c, *shape[2:], generator=g, dtype=torch.float64)
    mix = torch.randn(c, c, generator=g, dtype=torch.float64) * decay ** torch.arange(c, dtype=torch.float64)
    x = torch.einsum("nc...,dc->nd...", z, mix).relu()
    return x + 0.05 * torch.rand(x.shape, generator=g, dtype=torch.float64)  # no exactly dead unit


def pair(shape, seed):
    """Two related, different representations: the similarity sits mid-range, where changes show."""
    x = acts(shape, seed)
    return x, acts(shape, seed + 100) + 0.5 * x


DECLARED = [(m, k) for m in MEASURES for k in INVARIANCES if MEASURES[m].invariant_to(k)]
UNDECLARED = [(m, k) for m in MEASURES for k in INVARIANCES if not MEASURES[m].invariant_to(k)]


# ---------------------------------------------------------------------------------------- the registry
def test_registry_lists_every_measure_with_its_flags():
    frame = S.measures()
    assert list(frame["measure"]) == list(MEASURES)
    assert {"linear_cka", "linear_cka_unbiased", "rbf_cka", "orthogonal_procrustes", "permutation_procrustes",
            "correlation_matching", "mean_cca", "svcca", "grelu_procrustes", "grelu_cka"} <= set(MEASURES)
    assert set(INVARIANCES) <= set(frame.columns)
    flags = frame.set_index("measure")
    for name in ("grelu_procrustes", "grelu_cka"):  # the paper's measures: G_ReLU yes, rotations no
        assert flags.loc[name, "unit_scaling"] and flags.loc[name, "permutation"]
        assert not flags.loc[name, "orthogonal"] and flags.loc[name, "group"] == "P·D₊ (G_ReLU)"
    assert flags.loc["linear_cka", "group"] == "O(n)" and flags.loc["mean_cca", "group"] == "GL"
    for m in MEASURES.values():  # GL contains the other groups, so its flag implies theirs
        if m.invariant_to("invertible_linear"):
            assert {"orthogonal", "permutation", "unit_scaling", "isotropic_scaling"} <= m.invariances
    assert len(UNDECLARED) >= 20  # the negative controls below are a real part of the suite


def test_unknown_names_get_the_nearest_ones():
    with pytest.raises(InvalidOptionError, match=r"unknown similarity measure 'grelu_cca'.*Did you mean 'grelu_cka'"):
        S.compare(torch.ones(4, 2), torch.ones(4, 2), measures=["grelu_cca"])
    with pytest.raises(ValueError, match="svcca"):  # an InvalidOptionError is a ValueError too
        S.get_measure("svcaa")
    with pytest.raises(InvalidOptionError, match="unknown transformation 'rotation'.*expected one of"):
        S.random_transform(torch.ones(4, 2), "rotation")
    assert S.get_measure("wreath_CKA") is MEASURES["grelu_cka"]  # the paper code's name, any case


def test_random_transform_samples_the_groups_registry():
    x = acts((10, 4, 2, 2), 0)
    for kind, group in INVARIANCE_GROUPS.items():
        element = get_group(group, 4).sample(torch.Generator().manual_seed(7))
        assert torch.equal(S.random_transform(x, kind, seed=7), element.act(x, dim=1))
    assert torch.equal(S.random_transform(x, "translation", seed=1), S.random_transform(x, "translation", seed=1))
    assert not torch.equal(S.random_transform(x, "translation", seed=1), S.random_transform(x, "translation", seed=2))
    shift = S.random_transform(x, "translation", seed=1) - x  # one offset per channel, the same at every position
    assert torch.allclose(shift, shift[:1, :, :1, :1].expand_as(shift), atol=1e-12)
    assert shift[0, :, 0, 0].abs().min() > 0


# ---------------------------------------------------------------------------------------- invariances
@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(n=st.integers(8, 24), c=st.integers(2, 6), spatial=st.sampled_from([(), (2, 2), (3, 1)]),
       seed=st.integers(0, 10_000))
def test_declared_invariances_hold_on_random_shapes(n, c, spatial, seed):
    x, y = pair((n, c, *spatial), seed)
    for name, kind in DECLARED:
        m = MEASURES[name]
        base = m(x, y)
        moved_a, moved_b = S.random_transform(x, kind, seed=seed), S.random_transform(y, kind, seed=seed + 1)
        assert abs(m(moved_a, y) - base) <= TOL, (name, kind)
        assert abs(m(x, moved_b) - base) <= TOL, (name, kind)


@pytest.mark.parametrize("name,kind", UNDECLARED, ids=[f"{m}-{k}" for m, k in UNDECLARED])
def test_undeclared_invariances_fail_clearly(name, kind):
    """Not invariant: some transformation of the kind moves the number clearly (vs itself or another)."""
    m = MEASURES[name]
    for shape in SHAPES:
        x, y = pair(shape, 0)
        changes = [max(abs(m(t, x) - m(x, x)), abs(m(t, y) - m(x, y)))
                   for t in (S.random_transform(x, kind, seed=s) for s in range(3))]
        assert max(changes) > CLEAR, (shape, changes)


# ---------------------------------------------------------------------------------------- known values
@pytest.mark.parametrize("shape", SHAPES)
def test_identical_inputs_score_one_and_measures_are_symmetric(shape):
    x, y = pair(shape, 3)
    for name, m in MEASURES.items():
        assert abs(m(x, x) - 1) <= TOL, name
        assert abs(m(x, y) - m(y, x)) <= TOL, name
        assert m(x, y) < 1 - CLEAR, name


def test_a_unit_map_and_a_1x1_conv_map_are_the_same_representation():
    x, y = pair((20, 4), 5)
    for name, m in MEASURES.items():
        assert abs(m(x, y) - m(x[..., None, None], y[..., None, None])) <= TOL, name


def test_known_values_of_linear_cka_cca_and_correlation_matching():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(2, 200, 1, generator=g, dtype=torch.float64)
    r = np.corrcoef(u[:, 0].numpy(), (u + v)[:, 0].numpy())[0, 1]
    assert S.linear_cka(u, u + v) == pytest.approx(r ** 2, abs=TOL)  # one unit each: CKA is r²
    assert S.mean_cca(u, -(u + v)) == pytest.approx(abs(r), abs=TOL)  # and CCA is |r|
    x = torch.randn(200, 3, generator=g, dtype=torch.float64)
    flipped = torch.stack([x[:, 1], x[:, 0], -x[:, 2]], 1)
    assert S.correlation_matching(x, flipped) == pytest.approx(1 / 3, abs=TOL)  # matches 1, 1 and −1
    assert S.svcca(x, flipped, keep=1.0) == pytest.approx(S.mean_cca(x, flipped), abs=TOL)


def test_known_values_of_the_procrustes_distances():
    e = torch.eye(4, dtype=torch.float64)
    a, b = e[:, :2], e[:, 2:]  # units of a and b orthogonal over the samples: nothing aligns
    assert S.orthogonal_procrustes(a, b) == pytest.approx(1 - math.sqrt(2 / 4), abs=TOL)
    assert S.grelu_procrustes(a, b) == pytest.approx(1 - math.sqrt(4 / 8), abs=TOL)
    # Second unit negated. Normalised units have cosine 1/2, so the cross-Gram is [[1, −½], [½, −1]]:
    # both matchings total 0, and d = sqrt((2 + 2 − 2·0) / (4·2)).
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    signed = u * torch.tensor([1.0, -1.0], dtype=torch.float64)
    assert S.grelu_procrustes(u, signed) == pytest.approx(1 - math.sqrt(0.5), abs=TOL)
    # A dead unit is left at zero (never divided by zero): a copy with a dead unit added is still a match.
    padded = torch.cat([u, torch.zeros(3, 1, dtype=torch.float64)], 1)
    assert S.grelu_procrustes(u, padded) == pytest.approx(1.0, abs=TOL)


def test_unbiased_hsic_is_the_u_statistic_and_biased_hsic_uses_the_centring_matrix():
    g = torch.Generator().manual_seed(1)
    n = 6
    X, Y = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g, dtype=torch.float64)
    K, L = X @ X.T, torch.exp(Y @ Y.T / 4)
    u = sum(K[i, j] * L[i, j] + K[i, j] * L[q, r] - 2 * K[i, j] * L[i, q]
            for i, j, q, r in itertools.permutations(range(n), 4)) / math.perm(n, 4)
    assert float(S.hsic(K, L, unbiased=True)) == pytest.approx(float(u), rel=1e-12)
    H = torch.eye(n, dtype=torch.float64) - 1 / n
    assert float(S.hsic(K, L)) == pytest.approx(float(torch.trace(K @ H @ L @ H)) / (n - 1) ** 2, rel=1e-12)


def test_rbf_cka_tends_to_linear_cka_for_a_wide_kernel():
    x, y = pair((30, 5), 2)
    assert S.rbf_cka(x, y, bandwidth=1e3) == pytest.approx(S.linear_cka(x, y), abs=1e-6)  # gap ∝ 1/bandwidth²
    assert abs(S.rbf_cka(x, y) - S.linear_cka(x, y)) > CLEAR  # at the median bandwidth it differs


def test_vectorised_grelu_kernel_matches_a_loop_over_example_pairs():
    x = acts((9, 3, 2, 3), 4)
    H = x - x.mean((0, 2, 3), keepdim=True)
    H = H / H.pow(2).sum((0, 2, 3), keepdim=True).sqrt()
    ref = torch.tensor([[max(float((H[i, c] * H[j, c]).sum()) for c in range(3)) for j in range(9)] for i in range(9)],
                       dtype=torch.float64)
    assert torch.allclose(S.grelu_kernel(x), ref, atol=TOL, rtol=0)
    assert torch.allclose(S.grelu_kernel(x, block_bytes=1), ref, atol=TOL, rtol=0)  # one row per block


def test_grelu_measures_recover_an_exact_p_d_transform_that_rotations_break():
    x = acts((30, 6, 2, 2), 6)
    pd_ = get_group("relu", 6).sample(seed=3).act(x, dim=1)
    rot = get_group("orthogonal", 6).sample(seed=3).act(x, dim=1)
    for name in ("grelu_procrustes", "grelu_cka"):
        assert MEASURES[name](x, pd_) == pytest.approx(1.0, abs=TOL)
        assert MEASURES[name](x, rot) < 1 - 0.05
    assert S.orthogonal_procrustes(x, rot) == pytest.approx(1.0, abs=TOL)
    assert S.orthogonal_procrustes(x, pd_) < 1 - 0.05


# ---------------------------------------------------------------------------------------- inputs and errors
def test_inputs_numpy_float32_and_different_widths():
    x, y = pair((20, 4, 2, 2), 8)
    assert S.grelu_cka(x.numpy(), y.numpy()) == S.grelu_cka(x, y)
    x32 = x.float()
    assert S.linear_cka(x32, y) == S.linear_cka(x32.double(), y)  # computed in float64 from the same values
    wide = acts((20, 7, 2, 2), 9)
    for name, m in MEASURES.items():
        assert -1 < m(x, wide) < 1 - CLEAR, name  # channel counts may differ (unbiased CKA may dip below 0)
    assert 0 < S.linear_cka(x, acts((20, 3, 4, 4), 1)) < 1  # per-example measures: spatial shapes may differ


def test_bad_inputs_get_clear_errors():
    x = acts((10, 3, 2, 2), 0)
    with pytest.raises(InvalidOptionError, match="same examples: got 10 and 9 rows"):
        S.linear_cka(x, x[:9])
    with pytest.raises(InvalidOptionError, match=r"position by position.*\(2, 2\) and \(1, 4\)"):
        S.grelu_procrustes(x, x.reshape(10, 3, 1, 4))
    with pytest.raises(InvalidOptionError, match=r"shape \[N, C\].*got shape \(10,\)"):
        S.grelu_cka(x[:, 0, 0, 0], x[:, 0, 0, 0])
    with pytest.raises(InvalidOptionError, match="NaN or infinite"):
        S.mean_cca(x.clone().fill_(float("nan")), x)
    with pytest.raises(InvalidOptionError, match="at least 4 examples"):
        S.grelu_cka(x[:3], x[:3])
    with pytest.raises(InvalidOptionError, match="more samples than units"):
        S.mean_cca(x[:2, :, 0, 0], x[:2, :, 0, 0])
    with pytest.raises(InvalidOptionError, match=r"keep must be a fraction of variance in \(0, 1\]"):
        S.svcca(x, x, keep=1.5)
    with pytest.raises(InvalidOptionError, match="bandwidth must be a positive number"):
        S.rbf_cka(x, x, bandwidth=0)
    with pytest.raises(InvalidOptionError, match="torch tensor or numpy array"):
        S.linear_cka([[1.0, 2.0]], x)
    constant = torch.ones(10, 3, dtype=torch.float64)
    with pytest.raises(DegenerateRepresentationError, match="acts_a.*constant.*CKA is undefined"):
        S.linear_cka(constant, x[:, :, 0, 0], unbiased=True)
    with pytest.raises(DegenerateRepresentationError, match="all zeros"):
        S.orthogonal_procrustes(torch.zeros(10, 3), x[:, :, 0, 0])



@pytest.mark.parametrize("name", list(MEASURES))
def test_every_measure_refuses_a_representation_with_no_signal(name):
    """A dead layer is degenerate for every measure alike, never an arbitrary score.

    Uncentred measures (Procrustes) see no signal in an all-zero layer; centred ones (CKA, CCA,
    correlation) see none in a layer constant over the samples. Either side may be the dead one. A layer
    with only *some* dead units is a real representation and still gets a number.
    """
    g = torch.Generator().manual_seed(5)
    live = torch.randn(40, 6, 3, 3, generator=g, dtype=torch.float64).relu()
    measure = MEASURES[name]
    dead = [torch.zeros_like(live)]
    if measure.invariant_to("translation"):
        dead.append(torch.full_like(live, 2.0))
    for d in dead:
        for a, b in ((d, live), (live, d)):
            with pytest.raises(DegenerateRepresentationError, match="acts_[ab]"):
                measure(a, b)
    partly = live.clone()
    partly[:, :3] = 0
    assert 0 < measure(partly, live) <= 1 + 1e-12


# ---------------------------------------------------------------------------------------- compare and its report
def test_compare_runs_every_measure_and_reports():
    x, y = pair((16, 4, 2, 2), 10)
    before = x.clone()
    report = S.compare(x, y)
    assert torch.equal(x, before)  # inputs untouched
    assert list(report.values) == list(MEASURES)
    for name, m in MEASURES.items():
        assert report[name] == m(x, y)
    assert report["wreath_procrustes"] == report.values["grelu_procrustes"]
    frame = report.to_frame()
    assert list(frame.columns) == ["measure", "similarity", "invariant_to", "spatial"]
    assert set(frame["invariant_to"]) == {"GL", "O(n)", "P·D₊ (G_ReLU)", "P"}
    assert "11 measures on [16, 4, 2, 2]" in repr(report) and "<table" in report._repr_html_()
    one = S.compare(x, y, measures="grelu_cka")
    assert list(one.values) == ["grelu_cka"]


@pytest.mark.slow  # importing seaborn and matplotlib
def test_report_plot_draws_one_bar_per_measure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = pair((12, 3), 11)
    ax = S.compare(x, y, measures=["linear_cka", "grelu_cka", "mean_cca"]).plot()
    assert len([p for p in ax.patches if p.get_width() > 0]) == 3
    plt.close("all")
