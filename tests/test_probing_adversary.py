"""Data built to fool the probing verdicts: each test here failed before the fix it names.

Each check computes the right answer itself (a closed form, a hand count, a simulation with its own
binomial bound, or scikit-learn/SciPy), never by asking the tool under test.
"""
import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.feature_selection import f_classif

import workbench as wb
from workbench.probing import (SparseProbe, basis_alignment, bh_qvalues, concept_scores, dissect,
                               privileged_basis_test, probe_curve)
from workbench.probing._scores import f_statistic_matrix, mean_difference_matrix


def _data(seed=0, n=120, d=6):
    rng = np.random.default_rng(seed)
    return torch.as_tensor(rng.standard_normal((n, d))), torch.as_tensor(rng.random(n) < 0.5)


# ----------------------------------------------------------------------------- verdicts
def test_unit_scales_neither_change_the_verdict_nor_fake_a_privileged_basis():
    """Labels independent of Gaussian activations whose unit scales differ: no unit carries the concept.

    Unstandardized, a rotation of unequal-scale units is dominated by the largest ones, every rotated
    unit is correlated with the others and their best |AUROC − 0.5| is smaller than that of the d
    independent neuron-basis units: p ≤ 0.05 in 31% of such data sets (measured, n = 200, d = 16,
    99 bases, 300 sets: benchmarks/results/probing_calibration.md). Rescaling units is a symmetry of a
    ReLU layer, so the verdict must not move.
    """
    R, B, hits = 200, 19, 0
    for r in range(R):
        rng = np.random.default_rng(r)
        X = rng.standard_normal((100, 16)) * np.exp(rng.uniform(np.log(0.1), np.log(10), 16))
        y = rng.random(100) < 0.5
        t = privileged_basis_test(torch.as_tensor(X), torch.as_tensor(y), bases=["orthogonal"], n_bases=B, seed=r)
        hits += float(t.p_values("orthogonal")[0]) <= 0.05
    # Under the null the +1-corrected p is ≤ 0.05 only when the neuron basis ranks first of B + 1 = 20
    # exchangeable draws (or ties first): probability ≤ 1/20, so hits ≤ Binomial(200, 0.05) in
    # distribution and P(hits ≥ 28) = 9.6e-7 for a correct test; before the fix hits ≈ 0.28·200 = 56
    # (P(≤ 27) < 1e-4 even at a rate of 0.25).
    assert hits < 28, hits
    assert stats.binom.sf(27, R, 0.05) < 1e-6

    # the layer's own gauge: the same data with units rescaled (a ReLU net's function-preserving D₊)
    X, y = _data(1, n=150, d=8)
    D = torch.as_tensor(np.exp(np.random.default_rng(2).uniform(-4, 4, 8)))
    a = privileged_basis_test(X, y, bases=["orthogonal", "gl"], n_bases=30, seed=3)
    b = privileged_basis_test(X * D, y, bases=["orthogonal", "gl"], n_bases=30, seed=3)
    for f in a.null:
        torch.testing.assert_close(a.null[f], b.null[f], rtol=1e-9, atol=0)
        assert torch.equal(a.p_values(f), b.p_values(f))
    for scale in (1e-200, 1e200):  # the standard deviations of such units must neither underflow nor overflow
        c = privileged_basis_test(X * scale, y, bases=["orthogonal"], n_bases=30, seed=3)
        torch.testing.assert_close(c.null["orthogonal"], a.null["orthogonal"], rtol=1e-9, atol=0)
    assert a.standardized and not privileged_basis_test(X, y, bases=["orthogonal"], n_bases=3,
                                                        standardize=False).standardized


def test_alpha_outside_0_1_is_refused_not_a_privileged_verdict_for_p_of_0_8():
    X, y = _data()
    assert not privileged_basis_test(X, y, bases=["orthogonal"], n_bases=9).to_frame().privileged.any()
    for alpha in (1.5, 1.0, 0.0, -1, float("nan"), "0.05", True):
        with pytest.raises(wb.InvalidOptionError, match=r"alpha is a false discovery rate in \(0, 1\)"):
            privileged_basis_test(X, y, bases=["orthogonal"], n_bases=9, alpha=alpha)


def test_a_family_asked_for_twice_is_refused_not_merged_into_one_comparison():
    """``group="relu"`` (the scaled permutations) with ``bases=["orthogonal", "scaled_permutation"]`` gave one
    scaled-permutation comparison, role "architecture", where two were asked for (random and architecture), and
    ``bases=["orthogonal", "orthogonal"]`` one orthogonal comparison: the families are keyed by name, and a family's
    bases come from its own stream of the seed (the same bases both times). Both are refused, naming the family; the
    family once, in either role, is one comparison as before."""
    from workbench.groups import get_group

    X, y = _data()
    with pytest.raises(wb.InvalidOptionError, match="'scaled_permutation' family, which bases names too"):
        privileged_basis_test(X, y, bases=["orthogonal", "scaled_permutation"], group="relu", n_bases=9)
    with pytest.raises(wb.InvalidOptionError, match="'orthogonal' twice"):
        privileged_basis_test(X, y, bases=["orthogonal", get_group("orthogonal", 6)], n_bases=9)
    once = privileged_basis_test(X, y, bases=["orthogonal"], group="relu", n_bases=9)
    assert once.to_frame().family.tolist() == ["orthogonal", "scaled_permutation"]
    assert privileged_basis_test(X, y, bases=["orthogonal", "scaled_permutation"], n_bases=9).to_frame().family.tolist() \
        == ["orthogonal", "scaled_permutation"]


def test_a_custom_statistic_of_the_wrong_length_or_nan_is_refused():
    X, y = _data()
    # three numbers for one concept were taken as three concepts' values (and the extra ones dropped)
    with pytest.raises(wb.InvalidOptionError, match=r"must return K = 1 numbers.*returned shape \(3,\)"):
        privileged_basis_test(X, y, bases=["orthogonal"], n_bases=9, statistic=lambda a, c: torch.zeros(3))
    # a NaN statistic was neither ≥ nor tied with any basis: p = 1/(B+1), the smallest p there is
    nan = lambda a, c: torch.full((c.shape[1],), float("nan"))
    with pytest.raises(wb.InvalidOptionError, match=r"statistic '<lambda>' is NaN in the neuron basis"):
        privileged_basis_test(X, y, bases=["orthogonal"], n_bases=99, statistic=nan)
    first = {"n": 0}

    def nan_in_bases(a, c):  # finite in the neuron basis (the first call), NaN in the random ones
        first["n"] += 1
        return torch.full((c.shape[1],), 0.1 if first["n"] == 1 else float("nan"), dtype=torch.float64)
    with pytest.raises(wb.InvalidOptionError, match=r"NaN in bases of 'orthogonal'"):
        privileged_basis_test(X, y, bases=["orthogonal"], n_bases=9, statistic=nan_in_bases)
    # a plain list or array is a fine return value
    t = privileged_basis_test(X, y, bases=["orthogonal"], n_bases=9, statistic=lambda a, c: [float(a[:, 0].mean())])
    assert t.observed.shape == (1,)


# ----------------------------------------------------------------------------- scores
def test_a_constant_unit_scores_zero_and_a_perfect_unit_scores_infinite_f():
    # 188 copies of -1.8421…: the mean is 1 ulp off the value, the standard deviation 2e-16 instead of 0,
    # the class means differ by a rounding error too, and their ratio read 17 (a huge effect size)
    X = torch.full((188, 1), -1.8421091473039353, dtype=torch.float64)
    rng = np.random.default_rng(0)
    for _ in range(200):
        y = torch.as_tensor(rng.random(188) < 0.5)[:, None]
        assert mean_difference_matrix(X, y).item() == 0.0
        assert mean_difference_matrix(X, y, standardize=False).item() == 0.0
        assert f_statistic_matrix(X, y).item() == 0.0
    # a unit that IS the concept (no spread within either class) had F = 0, the worst score, so the
    # F-selected sparse probe passed it over: k = 1 cross-validated AUC 0.53 instead of 1
    Xn = rng.standard_normal((200, 6))
    y = rng.random(200) < 0.5
    Xn[:, 2] = 3.0 * y
    with np.errstate(divide="ignore"):  # SciPy's F divides by the zero within-class sum of unit 2
        ref, _ = f_classif(Xn, y)
    F = concept_scores(torch.as_tensor(Xn), torch.as_tensor(y)).f_statistic[:, 0].numpy()
    # SciPy's F is inf (its within-class sum is exactly 0); ours is inf or, where the within-class sum
    # rounds to a positive number, ~1e17: either way far above every other unit
    assert np.isinf(ref[2]) and F[2] > 1e12 * F[[0, 1, 3, 4, 5]].max()
    np.testing.assert_allclose(F[[0, 1, 3, 4, 5]], ref[[0, 1, 3, 4, 5]], rtol=1e-10)
    assert SparseProbe(k=1, selection="f_statistic").fit(Xn, y).units_.tolist() == [2]
    curve = probe_curve(torch.as_tensor(Xn), torch.as_tensor(y), ks=[1], selection="f_statistic", cv=3, dense=False)
    assert curve.to_frame().auc_mean.tolist() == [1.0]


def test_scores_do_not_overflow_or_underflow_at_extreme_scales():
    # squares of 1e160 overflowed and of 1e-200 underflowed: the planted unit's mean difference read 0
    # and its F 0 or inf; every statistic here is scale-invariant (the raw difference scales along)
    X, y = _data(4, n=300, d=3)
    X[:, 1] += 2 * y
    ref = concept_scores(X, y)
    for scale in (1e-200, 1e160, 1e200):
        s = concept_scores(X * scale, y)
        torch.testing.assert_close(s.mean_difference, ref.mean_difference, rtol=1e-12, atol=0)
        torch.testing.assert_close(s.f_statistic, ref.f_statistic, rtol=1e-10, atol=0)
        raw = mean_difference_matrix(X * scale, y[:, None], standardize=False) / scale
        torch.testing.assert_close(raw, mean_difference_matrix(X, y[:, None], standardize=False), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- multiple testing
def _bh(p):
    """Benjamini–Hochberg written out: q_(i) = min over j ≥ i of p_(j)·m/j, capped at 1."""
    m, order = len(p), np.argsort(p, kind="stable")
    q, run = np.empty(m), 1.0
    for i in range(m - 1, -1, -1):
        run = min(run, p[order[i]] * m / (i + 1))
        q[order[i]] = run
    return q


def test_bh_qvalues_against_a_direct_implementation_and_bad_p_values():
    rng = np.random.default_rng(0)
    for t in range(300):
        m = int(rng.integers(1, 30))
        p = [rng.random(m), rng.choice([0.01, 0.02, 0.05, 0.5, 1.0], m), rng.integers(1, 21, m) / 20][t % 3]
        np.testing.assert_allclose(bh_qvalues(p), _bh(p), rtol=1e-12, atol=0)
    assert bh_qvalues([1.0]).tolist() == [1.0] and bh_qvalues([0.03]).tolist() == [0.03]
    # NaN and p > 1 went to SciPy's ValueError; a matrix was adjusted column by column without a word
    with pytest.raises(wb.InvalidOptionError, match=r"p-values must lie in \[0, 1\]; got \[nan\] at positions \[1\]"):
        bh_qvalues(np.array([0.01, np.nan, 0.5]))
    with pytest.raises(wb.InvalidOptionError, match=r"got \[1.5\]"):
        bh_qvalues([0.2, 1.5])
    with pytest.raises(wb.InvalidOptionError, match=r"vector of p-values \(shape \[m\]\); got shape \(2, 2\)"):
        bh_qvalues(np.full((2, 2), 0.1))
    with pytest.raises(wb.InvalidOptionError, match=r"got shape \(\)"):
        bh_qvalues(0.03)


# ----------------------------------------------------------------------------- degenerate input
def test_degenerate_input_gets_workbench_errors_not_tracebacks():
    X, y = _data(n=60, d=4)
    E = wb.InvalidOptionError
    pbt = lambda *a, **k: privileged_basis_test(*a, **{"bases": ["orthogonal"], "n_bases": 9, **k})
    cases = [
        (lambda: pbt(X, {"a": y, "b": y[:30]}), r"same examples.*'b': \(30,\)"),  # was torch.stack's RuntimeError
        (lambda: pbt(X[:, :0], y), "at least one unit and one concept"),  # was a reshape RuntimeError
        (lambda: pbt(X, torch.zeros(60, 0, dtype=torch.bool)), "at least one unit and one concept"),
        (lambda: pbt(X, {}), "empty dict"),
        # string labels read "must be a tensor or an array; got ndarray" (it was one)
        (lambda: pbt(X, np.array(["cat", "dog"] * 30)), r"must hold real numbers or bools; got ndarray of dtype <U3 "
                                                        r"\(labels must be bool or 0/1"),
        (lambda: concept_scores(X, {"a": ["x"] * 60}), r"concept 'a' must hold real numbers or bools; got list"),
        (lambda: pbt(X, y, bases=None), "bases must be a list"),  # was 'NoneType' object is not iterable
        (lambda: pbt(X, y, bases=3), "bases must be a list"),
        (lambda: pbt(X, y, bases=[]), "no basis family"),  # was an empty report
        (lambda: pbt(X, y, where=torch.rand(60)), "where must be a bool mask"),  # every row was kept
        (lambda: basis_alignment(X[:0], n_bases=5), "at least one example of at least one unit"),
        (lambda: basis_alignment(X[:, :0], n_bases=5), "at least one example of at least one unit"),
        (lambda: basis_alignment(X, n_bases=True), "n_bases must be a positive int"),
        (lambda: basis_alignment(X, n_bases=5, outlier_factor=float("nan")), "outlier_factor must be"),
        (lambda: probe_curve(X, y, ks=[], dense=False, cv=3), "no probe to fit"),  # was an AttributeError
        (lambda: probe_curve(X, y, ks=[0], cv=3), r"ks are probe sizes.*\[0\]"),  # was 'All the 3 fits failed'
        (lambda: probe_curve(X, y, ks=[1], cv=1), "cv is the number of cross-validation folds"),
        (lambda: probe_curve(X, y, ks=[1], cv=2.5), "cv is the number of cross-validation folds"),
    ]
    maps, masks = torch.rand(4, 2, 3, 3), torch.zeros(4, 1, 6, 6, dtype=torch.bool)
    cases += [
        (lambda: dissect(maps, torch.zeros(6, 1, 6, 6, dtype=torch.bool)), "masks cover 6 images but maps have 4"),
        (lambda: dissect(maps.clone().fill_(float("nan")), masks), "NaN or infinite"),  # was '0 detectors'
        (lambda: dissect(maps, masks, names=["a", "b"]), "2 concept names for 1 mask channels"),
        (lambda: dissect(maps, torch.rand(4, 1, 6, 6)), "masks must be binary"),  # 0.3 was read as True
        (lambda: dissect(maps, masks, batch_size=0), "batch_size must be an int"),
        (lambda: dissect(maps, masks, quantile="0.1"), "quantile must be a number"),  # was a TypeError from '<'
        (lambda: dissect(maps, masks, iou_threshold=float("nan")), "iou_threshold must be a number"),  # 0 detectors
        (lambda: dissect(maps, masks, iou_threshold=-0.1), "iou_threshold must be a number"),  # every unit
        (lambda: dissect(maps[:, :0], masks), "at least one image, unit, concept"),
        (lambda: dissect(maps, masks[:, :0]), "at least one image, unit, concept"),
        (lambda: dissect(maps[:0], masks[:0]), "at least one image, unit, concept"),
    ]
    for fn, message in cases:
        with pytest.raises(E, match=message):
            fn()
    # accepted as what they are: NumPy ints, a single class member, ks all above the width (dense only)
    assert privileged_basis_test(X, y, bases=["orthogonal"], n_bases=np.int64(5)).null["orthogonal"].shape == (5, 1)
    assert privileged_basis_test(X, torch.arange(60) == 7, bases=["orthogonal"], n_bases=5).observed.shape == (1,)
    assert probe_curve(X, y, ks=[16], cv=3).summary().startswith("mean CV AUC: dense")


def test_inputs_are_not_mutated():
    X, y = _data(n=80, d=5)
    Xn, yn = X.numpy().copy(), y.numpy().copy()
    X32 = X.float()
    keep = [X.clone(), y.clone(), X32.clone()]
    privileged_basis_test(X, y, bases=["orthogonal", "gl"], group="relu", n_bases=5)
    privileged_basis_test(X32, y, bases=["orthogonal"], n_bases=5, statistic="mean_difference")
    privileged_basis_test(Xn, yn, bases=["orthogonal"], n_bases=5)
    concept_scores(X, y)
    basis_alignment(X, n_bases=5)
    probe_curve(X, y, ks=[1, 2], cv=3)
    SparseProbe(k=2).fit(Xn, yn)
    maps, masks = torch.rand(4, 2, 3, 3, dtype=torch.float64), torch.rand(4, 2, 6, 6) > 0.5
    m0, k0 = maps.clone(), masks.clone()
    dissect(maps, masks, quantile=0.1, basis=wb.get_group("orthogonal", 2).sample(seed=0))
    assert torch.equal(X, keep[0]) and torch.equal(y, keep[1]) and torch.equal(X32, keep[2])
    assert np.array_equal(Xn, X.numpy()) and np.array_equal(yn, y.numpy())
    assert torch.equal(maps, m0) and torch.equal(masks, k0)


# ----------------------------------------------------------------------------- dissection
def test_a_dead_or_mostly_zero_unit_is_never_on_where_it_is_zero():
    """A ReLU unit that is 0 on more than 1 − quantile of its locations has threshold 0; with ``≥`` it was
    on at every pixel, so a dead unit scored the largest concept's area (0.5 here) as IoU and counted as
    its detector. NetDissect-Lite counts ``mask > threshold``: such a unit is on only where it is positive."""
    g = torch.Generator().manual_seed(0)
    n = 20
    maps = torch.zeros(n, 3, 4, 4, dtype=torch.float64)
    maps[:, 0] = torch.rand(n, 4, 4, generator=g, dtype=torch.float64)  # a live unit with distinct values
    maps[0, 2, 0, 0] = 1.0  # unit 1 dead; unit 2 positive at one location of one image
    masks = torch.zeros(n, 1, 8, 8, dtype=torch.bool)
    masks[:, 0, :, :4] = True  # a concept covering half of every image
    d = dissect(maps, masks)
    assert d.iou[1].tolist() == [0.0] and d.thresholds[1] == 0 and d.thresholds[2] == 0
    # unit 2 is on exactly where its upsampled map is positive: its IoU by hand
    up = torch.nn.functional.interpolate(maps[:, 2:3], size=(8, 8), mode="bilinear", align_corners=False)[:, 0] > 0
    inter, union = int((up & masks[:, 0]).sum()), int((up | masks[:, 0]).sum())
    assert 0 < int(up.sum()) < 64 and d.iou[2, 0].item() == pytest.approx(inter / union, rel=1e-12)
    assert d.detectors.tolist() == [] and d.unique_detectors == 0
    # distinct values: exactly ceil(quantile · n) of each unit's values lie strictly above its threshold
    vals = maps[:, 0].reshape(-1).numpy()
    for q in (0.005, 0.05, 0.3):
        T = float(dissect(maps, masks, quantile=q).thresholds[0])
        assert int((vals > T).sum()) == int(np.ceil(q * vals.size))


def test_a_single_random_basis_gives_no_z_score_not_an_infinite_one():
    """One draw has no spread: z read ±inf (an infinitely significant layer from one basis) beside a
    null_std of 0.0 (privileged) or NaN with a warning (alignment). Two equal draws that differ from the
    observed value are a constant null: ±inf stays; a draw tying with the observed value is z = 0."""
    from workbench.probing._privileged import z_scores

    X, y = _data(5, n=80, d=6)
    t = privileged_basis_test(X, y, bases=["orthogonal"], group="relu", n_bases=1, seed=1)
    f = t.to_frame().set_index("family")
    assert np.isnan(f.loc["orthogonal", "z"]) and np.isnan(f.loc["orthogonal", "null_std"])
    assert f.loc["scaled_permutation", "z"] == 0.0  # the layer's own group: a tie, not a spread
    assert np.isnan(t.layer_frame().set_index("family").loc["orthogonal", "z"])
    assert np.isnan(t.to_frame().z[0]) and "z=nan" in t.summary()
    b = basis_alignment(X, n_bases=1).to_frame()
    assert b.z.isna().sum() + (b.z == 0).sum() == 3 and b.null_std.isna().all()
    obs = torch.tensor([0.3, 0.3], dtype=torch.float64)
    assert z_scores(obs, torch.tensor([[0.5, 0.1], [0.5, 0.1]], dtype=torch.float64)).tolist() == [-np.inf, np.inf]


# ----------------------------------------------------------------------------- basis alignment
def test_outlier_dimensions_measure_live_units_against_the_median_live_unit():
    """With more than half the units dead (RMS 0, a ReLU layer), the median over all units was 0 and every
    live unit counted as an outlier: 4 live units of one scale among 10 read 4 outlier dimensions, against
    0 in every rotation (p = 1/(B + 1)). Dead units are now left out of the median and never counted."""
    from workbench.probing._alignment import alignment_statistics

    g = torch.Generator().manual_seed(0)
    live = torch.randn(300, 4, generator=g, dtype=torch.float64)
    X = torch.zeros(300, 10, dtype=torch.float64)
    X[:, [1, 4, 7, 8]] = live  # 6 of 10 units dead
    rms = X.pow(2).mean(0).sqrt().numpy()
    typical = np.sort(rms[rms > 0])[(4 - 1) // 2]  # the lower median of the 4 live units, by hand
    assert int((rms > 6 * typical).sum()) == 0
    b = basis_alignment(X, n_bases=9, seed=0)
    assert int(b.observed[2]) == 0 and b.to_frame().p[2] == 1.0
    X[:, 8] *= 100  # one live unit 100× the others: one outlier, whatever the dead units
    assert int(basis_alignment(X, n_bases=1).observed[2]) == 1
    # bases side by side, each with its own median: all dead (none), one dead basis beside a live one
    assert alignment_statistics(torch.zeros(300, 10, dtype=torch.float64), 1, 6.0)[0, 2] == 0
    stats_ = alignment_statistics(torch.cat([X, torch.zeros(300, 10, dtype=torch.float64), X], 1), 3, 6.0)
    assert stats_[:, 2].tolist() == [1.0, 0.0, 1.0]


def test_a_constant_activation_vector_has_no_kurtosis():
    """An example whose d units all hold one value (0.1) had a mean 1 ulp off that value, every deviation the
    same residue, and an excess kurtosis of exactly −2, the smallest possible, for a vector with no spread;
    with half such rows the layer's kurtosis_per_example read ≈ 1 lower than SciPy's over the other rows."""
    rng = np.random.default_rng(0)
    X = rng.laplace(size=(60, 7))
    X[::2] = 0.1
    X[1::4] = -1.8421091473039353
    ref = [0.0 if np.ptp(row) == 0 else stats.kurtosis(row) for row in X]  # Fisher, biased: the documented one
    assert sum(np.ptp(row) == 0 for row in X) == 45
    b = basis_alignment(torch.as_tensor(X), n_bases=3)
    assert float(b.observed[0]) == pytest.approx(np.mean(ref), rel=1e-12)
    # the same along units: 7 units with one RMS (every value 0.1 or -0.1) have no kurtosis of RMS either
    S = np.where(rng.random((60, 7)) < 0.5, 0.1, -0.1)
    assert float(basis_alignment(torch.as_tensor(S), n_bases=3).observed[1]) == 0.0


# ----------------------------------------------------------------------------- probes
def test_token_level_probes_are_cross_validated_by_example_not_by_token():
    """A label shared by each sentence's tokens, activations that carry a per-sentence offset and nothing of the
    label: split by token, the probes learned which sentence a token came from and read the held-out tokens of
    the same sentences — cross-validated dense AUC 0.73, sparse 0.65-0.69, for a concept that is not there."""
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
    from workbench.probing import DenseProbe

    rng = np.random.default_rng(0)
    N, T, d = 40, 12, 16
    acts = 2 * rng.standard_normal((N, 1, d)) + rng.standard_normal((N, T, d))
    y = np.repeat(rng.random((N, 1)) < 0.5, T, axis=1)
    curve = probe_curve(torch.as_tensor(acts), torch.as_tensor(y[..., None]), ks=[1, 4], cv=5).to_frame()
    assert (curve.auc_mean < 0.6).all(), curve
    # the dense row is scikit-learn's grouped cross-validation of the same probe, fold for fold
    X, yy, groups = acts.reshape(-1, d), y.reshape(-1), np.repeat(np.arange(N), T)
    ref = cross_val_score(DenseProbe(random_state=0), X, yy, groups=groups, scoring="roc_auc",
                          cv=StratifiedGroupKFold(5, shuffle=True, random_state=0))
    dense = curve[curve.probe == "dense"].iloc[0]
    assert dense.auc_mean == pytest.approx(ref.mean(), abs=1e-12) and dense.auc_std == pytest.approx(ref.std(), abs=1e-12)
    # rows that are examples are split as before: one row per example, nothing to group
    flat = probe_curve(torch.as_tensor(X), torch.as_tensor(yy), ks=[1], cv=5, dense=False).to_frame()
    assert flat.auc_mean[0] > 0.6  # split by token, the leak is there (the sentence offsets identify the label)
    # grouped folds that hold out one class only are refused (ROC AUC was NaN with a warning, as the mean)
    few = torch.tensor([[0, 0], [1, 1], [1, 0], [1, 0]], dtype=torch.bool)[..., None]
    with pytest.raises(wb.InvalidOptionError, match="held-out folds have tokens of one class only"):
        probe_curve(torch.as_tensor(rng.standard_normal((4, 2, 3))), few, ks=[1], cv=3)
    with pytest.raises(wb.InvalidOptionError, match=r"fewer than cv=5 examples in one class \(examples with a token"):
        probe_curve(torch.as_tensor(rng.standard_normal((4, 2, 3))), few, ks=[1], cv=5)
