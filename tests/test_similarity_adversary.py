"""Similarity measures against direct float64 definitions, and the inputs that would fool them.

The references below are written from the published definitions with NumPy/SciPy only (traces with
the centring matrix, scipy's Procrustes and Hungarian solvers, SVDs of orthonormal bases), never
by calling the code under test.
"""
import math

import numpy as np
import pytest
import scipy.linalg as sla
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

import workbench as wb
from workbench import InvalidOptionError
from workbench.similarity import MEASURES, DegenerateRepresentationError

S = wb.similarity
TOL = 1e-10  # float64 through Grams, SVDs and sums on these sizes: worst measured 7e-15


# ---------------------------------------------------------------------------------------- references
def _flat(x):
    return x.reshape(x.shape[0], -1)


def _rows(x):
    return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])


def _hsic_biased(K, L):  # Gretton et al. 2005: tr(K H L H) / (n − 1)²
    n = len(K)
    H = np.eye(n) - np.ones((n, n)) / n
    return np.trace(K @ H @ L @ H) / (n - 1) ** 2


def _hsic_unbiased(K, L):  # Song et al. 2012, eq. (5)
    n = len(K)
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    one = np.ones(n)
    return (np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (one @ K @ L @ one)) / (n * (n - 3))


def _cka(K, L, unbiased=False):
    h = _hsic_unbiased if unbiased else _hsic_biased
    n = len(K)
    # The unbiased self-HSIC is exactly 0 for some inputs (one example differing from the rest); rounding
    # leaves ±1e-17 there, and 0/0 is no similarity: NaN, which the test reads as "must refuse".
    if any(h(G, G) <= 1e-10 * (G ** 2).sum() / (n * (n - 3) if unbiased else (n - 1) ** 2) for G in (K, L)):
        return math.nan
    return h(K, L) / np.sqrt(h(K, K) * h(L, L))


def _linear_cka(a, b, unbiased=False):
    X, Y = _flat(a), _flat(b)
    X, Y = X - X.mean(0), Y - Y.mean(0)  # the same CKA (Kornblith et al. 2019, eq. 5), no 1e8-sized Gram entries
    return _cka(X @ X.T, Y @ Y.T, unbiased)


def _rbf_cka(a, b):
    def gram(x):
        X = _flat(x)
        D = ((X[:, None] - X[None]) ** 2).sum(-1)
        d = np.sort(D[np.triu_indices(len(X), 1)])
        return np.exp(-D / (2 * d[(len(d) - 1) // 2]))  # the lower median, as documented
    return _cka(gram(a), gram(b))


def _standardise(x):
    """[N, C, P]: each channel centred and scaled to norm 1 over (examples, positions); constant → 0."""
    X = x.reshape(x.shape[0], x.shape[1], -1).astype(float)
    const = X.max(axis=(0, 2), keepdims=True) == X.min(axis=(0, 2), keepdims=True)
    X = np.where(const, 0.0, X - X.mean(axis=(0, 2), keepdims=True))
    norm = np.sqrt((X ** 2).sum(axis=(0, 2), keepdims=True))
    return X / np.where(norm > 0, norm, 1)


def _grelu_cka(a, b):
    def gram(x):  # the paper's loop: K_ij = max_c <H_i[c], H_j[c]>
        H = _standardise(x)
        n = len(H)
        return np.array([[max(H[i, c] @ H[j, c] for c in range(H.shape[1])) for j in range(n)] for i in range(n)])
    return _cka(gram(a), gram(b), True)


def _standardized_cka(a, b):
    X, Y = _flat(_standardise(a)), _flat(_standardise(b))
    return _cka(X @ X.T, Y @ Y.T, True)


def _pad(A, B):
    c = max(A.shape[1], B.shape[1])
    return np.pad(A, ((0, 0), (0, c - A.shape[1]))), np.pad(B, ((0, 0), (0, c - B.shape[1])))


def _orthogonal_procrustes(a, b):
    A, B = _rows(a), _rows(b)
    A, B = _pad(A / np.linalg.norm(A), B / np.linalg.norm(B))
    R, _ = sla.orthogonal_procrustes(B, A)
    return 1 - np.sqrt(((A - B @ R) ** 2).sum() / 4)


def _permutation_procrustes(a, b):
    A, B = _rows(a), _rows(b)
    A, B = _pad(A / np.linalg.norm(A), B / np.linalg.norm(B))
    r, c = linear_sum_assignment(A.T @ B, maximize=True)
    return 1 - np.sqrt(((A[:, r] - B[:, c]) ** 2).sum() / 4)


def _grelu_procrustes(a, b):  # PAPER.md §5: units normalised, Hungarian on C_ij, d² = (‖A‖²+‖B‖²−2Σ)/(4C)
    def unit(H):
        n = np.linalg.norm(H, axis=0)
        return H / np.where(n > 0, n, 1)
    A, B = _pad(unit(_rows(a)), unit(_rows(b)))
    C = A.T @ B
    r, c = linear_sum_assignment(C, maximize=True)
    return 1 - np.sqrt(max((A ** 2).sum() + (B ** 2).sum() - 2 * C[r, c].sum(), 0) / (4 * A.shape[1]))


def _correlation_matching(a, b):
    def z(H):  # Pearson's standardisation; an exactly constant unit is 0, so it correlates 0
        H = np.where(H.max(0) == H.min(0), 0.0, H - H.mean(0))
        n = np.linalg.norm(H, axis=0)
        return H / np.where(n > 0, n, 1)
    R = z(_rows(a)).T @ z(_rows(b))
    r, c = linear_sum_assignment(R, maximize=True)
    return R[r, c].mean()


def _basis(H, keep=None):
    U, S, _ = np.linalg.svd(H - H.mean(0), full_matrices=False)
    k = rank = int((S > S.max() * max(H.shape) * np.finfo(float).eps).sum())
    if keep is not None:
        share = np.cumsum(S[:rank] ** 2) / (S[:rank] ** 2).sum()
        k = min(rank, int(np.searchsorted(share, keep - 1e-12)) + 1)
    return U[:, :k]


def _mean_cca(a, b, keep=None):  # Raghu et al. 2017: CCA of (SVD-truncated) bases = singular values of QaᵀQb
    rho = np.linalg.svd(_basis(_rows(a), keep).T @ _basis(_rows(b), keep), compute_uv=False)
    return np.minimum(rho, 1).mean()


REFERENCE = {"linear_cka": _linear_cka, "linear_cka_unbiased": lambda a, b: _linear_cka(a, b, True),
             "rbf_cka": _rbf_cka, "standardized_cka": _standardized_cka, "grelu_cka": _grelu_cka,
             "orthogonal_procrustes": _orthogonal_procrustes, "permutation_procrustes": _permutation_procrustes,
             "grelu_procrustes": _grelu_procrustes, "correlation_matching": _correlation_matching,
             "mean_cca": _mean_cca, "svcca": lambda a, b: _mean_cca(a, b, 0.99)}
MIN_N = {"linear_cka_unbiased": 4, "standardized_cka": 4, "grelu_cka": 4, "rbf_cka": 3, "linear_cka": 3}


def test_every_measure_has_a_reference():
    assert set(REFERENCE) == set(MEASURES)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(2, 12), ca=st.integers(1, 6), cb=st.integers(1, 6), spatial=st.sampled_from([(), (2,), (2, 3)]),
       relu=st.booleans(), seed=st.integers(0, 2 ** 31))
def test_every_measure_equals_its_published_definition(n, ca, cb, spatial, relu, seed):
    """Random sizes including n < d, n = d, d = 1, n = 2, 3; related pairs so values sit mid-range."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, ca, *spatial))
    b = rng.standard_normal((n, cb, *spatial)) + 0.7 * np.resize(a, (n, cb, *spatial))
    if relu:
        a, b = np.maximum(a, 0), np.maximum(b, 0)
    for name, measure in MEASURES.items():
        rows = n * math.prod(spatial)
        if (n < MIN_N.get(name, 2) or (name in ("mean_cca", "svcca") and rows <= max(ca, cb) + 1)
                or (name == "correlation_matching" and rows < 3)):
            # too few samples; a side that is also constant (all dead after ReLU) may be refused for that first
            constant = any((_rows(x).max(0) == _rows(x).min(0)).all() for x in (a, b))
            with pytest.raises((InvalidOptionError, DegenerateRepresentationError) if constant else InvalidOptionError):
                measure(a, b)
            continue
        with np.errstate(all="ignore"):
            try:
                ref = float(REFERENCE[name](a, b))
            except ValueError:  # scipy refuses the NaNs of 0/0 on a dead side
                ref = math.nan
        dead = any(not x.any() for x in (a, b))  # documented: no signal → refused, not scored (e.g. 0.5)
        if measure.invariant_to("translation"):
            dead = dead or any((_rows(x).max(0) == _rows(x).min(0)).all() for x in (a, b))
        if dead or not np.isfinite(ref):  # a degenerate draw (every unit dead after ReLU): ours must refuse
            with pytest.raises(DegenerateRepresentationError):
                measure(a, b)
            continue
        ours = measure(torch.from_numpy(a), torch.from_numpy(b))
        assert abs(ours - ref) <= TOL, (name, ours, ref)


# ---------------------------------------------------------------------------------------- data that would fool them
def _pair(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).relu() + 0.01
    return x, torch.randn(shape, generator=g, dtype=torch.float64).relu() + 0.5 * x


@settings(max_examples=30, deadline=None)
@given(value=st.floats(-1e3, 1e3, allow_nan=False).filter(lambda v: v != 0), n=st.integers(6, 40),
       spatial=st.sampled_from([(), (3,), (2, 2)]))
def test_a_constant_map_is_degenerate_whatever_its_value(value, n, spatial):
    """Centring a constant 0.1 left 1e-17 of rounding, which CKA, CCA and correlation matching then read as a
    representation (linear CKA 2e-33, mean CCA 9e-17, correlation matching 5e-18) instead of refusing it."""
    _, live = _pair((n, 4, *spatial), n)
    constant = torch.full((n, 4, *spatial), value, dtype=torch.float64)
    for name, measure in MEASURES.items():
        if not measure.invariant_to("translation"):
            continue  # the uncentred measures see a constant map as a signal
        for a, b in ((constant, live), (live, constant)):
            with pytest.raises(DegenerateRepresentationError):
                measure(a, b)


@pytest.mark.parametrize("value", [0.1, 0.7, 1.1, 123.456])
@pytest.mark.parametrize("n, positions", [(7, 1), (5, 9), (30, 4)])
def test_a_constant_unit_correlates_zero_with_everything(value, n, positions):
    """As documented; its rounding residue, scaled to norm 1, correlated perfectly with its own copy (1.0, not 0.75)."""
    x, _ = _pair((n, 4, positions), 3)
    x[:, 0] = value
    assert S.correlation_matching(x, x) == pytest.approx(3 / 4, abs=1e-12)
    assert S.correlation_matching(x, x) == pytest.approx(_correlation_matching(x.numpy(), x.numpy()), abs=1e-12)


@pytest.mark.parametrize("k", [-600, -250, 250, 600])
def test_power_of_two_scale_changes_nothing_even_far_from_one(k):
    """Every measure is invariant to isotropic scaling; far from 1, Gram products overflowed or
    underflowed (Procrustes 0.5, correlation matching 0, CKA 'degenerate' at 2^±600 ≈ 1e±180)."""
    x, y = _pair((20, 4, 2, 2), 1)
    for name, measure in MEASURES.items():
        base = measure(x, y)
        assert measure(x * 2.0 ** k, y) == base, name  # a power of two changes no rounding: equal, not close
        assert measure(x, y * 2.0 ** k) == base, name


@settings(max_examples=40, deadline=None)
@given(n=st.integers(4, 40), c=st.integers(1, 6), which=st.integers(0, 39), seed=st.integers(0, 2 ** 31))
def test_unbiased_cka_refuses_a_map_where_only_one_example_differs(n, c, which, seed):
    """The U-statistic HSIC(K, K) of a linear kernel is exactly 0 when one example differs from the others
    (checked in exact fractions for N = 4, 5, 6, 10); its ±1e-17 of rounding had made CKA any number
    (6.9e-08 for N = 4) or a refusal, by the sign of the residue."""
    rng = np.random.default_rng(seed)
    x = np.tile(rng.random((1, c)), (n, 1))
    x[which % n] += rng.standard_normal(c)
    y = rng.standard_normal((n, 3))
    assert math.isnan(_linear_cka(x, y, True))  # the reference agrees: 0/0
    for name in ("linear_cka_unbiased", "standardized_cka"):
        with pytest.raises(DegenerateRepresentationError, match="acts_a"):
            MEASURES[name](x, y)
    assert S.linear_cka(x, y) == pytest.approx(_linear_cka(x, y), abs=TOL)  # the biased estimator is defined


@pytest.mark.parametrize("name", ["mean_cca", "svcca"])
@pytest.mark.parametrize("c, spatial", [(1, ()), (3, ()), (7, ()), (3, (1,))])
def test_cca_refuses_as_many_units_as_centred_dimensions(name, c, spatial):
    """N·P = C + 1 samples: after centring one side spans the whole space, so every canonical correlation is 1
    for unrelated random maps (the reference reads 1.0 too); the old check (N·P ≤ C) let that through as 1.0."""
    rng = np.random.default_rng(c)
    a, b = rng.standard_normal((c + 1, c, *spatial)), rng.standard_normal((c + 1, c, *spatial))
    assert _mean_cca(a, b) == pytest.approx(1.0, abs=1e-9)  # the definition itself is trivial here
    with pytest.raises(InvalidOptionError, match="at least units \\+ 2"):
        MEASURES[name](a, b)
    a, b = rng.standard_normal((c + 2, c, *spatial)), rng.standard_normal((c + 2, c, *spatial))
    assert MEASURES[name](a, b) == pytest.approx(_mean_cca(a, b, None if name == "mean_cca" else 0.99), abs=TOL)


def test_two_samples_are_refused_where_every_pair_of_maps_would_read_one():
    """With two examples, centred linear Grams are both ±[[1, −1], [−1, 1]]: linear CKA read 1.0 for any two
    maps; with two samples every Pearson correlation is ±1, and correlation matching read ±1."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 5)), rng.standard_normal((2, 3))
    assert _linear_cka(a, b) == pytest.approx(1.0)  # the definition is trivial at N = 2
    for name in ("linear_cka", "correlation_matching"):
        with pytest.raises(InvalidOptionError, match="at least 3"):
            MEASURES[name](a, b)
    c = rng.standard_normal((3, 5))
    assert S.linear_cka(c, c[:, :2]) == pytest.approx(_linear_cka(c, c[:, :2]), abs=TOL)
    assert S.linear_cka(c, c[:, :2]) < 1 - 1e-3
    assert S.correlation_matching(c[:, :2], c[:, 2:4]) == pytest.approx(_correlation_matching(c[:, :2], c[:, 2:4]),
                                                                        abs=TOL)


# ---------------------------------------------------------------------------------------- inputs and the report
def test_odd_dtypes_layouts_and_aliasing_give_the_float64_answer_and_mutate_nothing():
    x, y = _pair((12, 3, 2, 2), 4)
    expect = {name: m(x, y) for name, m in MEASURES.items()}
    variants = {"float16": x.half(), "bfloat16": x.bfloat16(), "non-contiguous": x.transpose(2, 3).contiguous().transpose(2, 3),
                "requires_grad": x.clone().requires_grad_(True), "numpy big-endian": x.numpy().astype(">f8"),
                "numpy Fortran order": np.asfortranarray(x.numpy())}
    def as_float64(v):
        return v.detach().double() if isinstance(v, torch.Tensor) else torch.from_numpy(v.astype("=f8"))

    for label, v in variants.items():
        before = as_float64(v).clone()
        for name, m in MEASURES.items():
            assert m(v, y) == m(as_float64(v), y), (label, name)  # read as its own float64 values, nothing else
            if label not in ("float16", "bfloat16"):
                assert m(v, y) == expect[name], (label, name)
        assert torch.equal(as_float64(v), before)
    for label, v in {"int": (10 * x).int(), "bool": x > 0.5}.items():
        for name, m in MEASURES.items():
            assert m(v, y) == m(v.double(), y), (label, name)
    same = x.clone()
    for name, m in MEASURES.items():  # the same tensor on both sides: 1, and untouched
        assert m(same, same) == pytest.approx(1.0, abs=1e-12), name
        assert torch.equal(same, x)
    with pytest.raises(InvalidOptionError, match="must hold numbers.*dtype <U"):
        S.linear_cka(np.array([["a", "b"]] * 4), x)


def test_report_summary_skips_nan_and_compare_refuses_no_measures():
    """min/max with a NaN key reported 'lowest grelu_cka nan, highest grelu_cka nan' beside linear_cka 0.5;
    compare(measures=[]) built a report whose summary raised ValueError."""
    report = S.SimilarityReport({"grelu_cka": math.nan, "linear_cka": 0.5, "mean_cca": 0.25}, (8, 3), (8, 3))
    assert report.summary() == ("3 measures on [8, 3] vs [8, 3]; lowest mean_cca 0.250, highest linear_cka 0.500; "
                                "NaN: grelu_cka")
    assert "NaN: grelu_cka" in report._repr_html_() and len(report.to_frame()) == 3
    all_nan = S.SimilarityReport({"grelu_cka": math.nan}, (8, 3), (8, 3))
    assert all_nan.summary() == "1 measures on [8, 3] vs [8, 3]; NaN: grelu_cka"
    import matplotlib
    matplotlib.use("Agg")
    assert len(report.plot().patches) >= 2
    x, y = _pair((10, 3), 2)
    with pytest.raises(InvalidOptionError, match="measures is empty"):
        S.compare(x, y, measures=[])
    one = S.compare(x, y, measures="grelu_procrustes")  # one measure: the table is that measure's own call
    assert one.values == {"grelu_procrustes": S.grelu_procrustes(x, y)} and len(one.to_frame()) == 1
    everything = S.compare(x.float(), y.numpy())
    assert everything.values == {name: m(x.float(), y.numpy()) for name, m in MEASURES.items()}


# ---------------------------------------------------------------------------------------- the experiment's statistics
from workbench.experiments import _stats  # noqa: E402


@pytest.mark.parametrize("values", [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0], [-1.0, 2, 3, 4, 5, 6, 7, 8],
                                    [1e-9, 1e-9, 1e-9]])
def test_a_verdict_at_95_percent_needs_the_sign_test_at_5_percent(values):
    """A median's interval excludes 0 at 95% only if the sign test rejects a zero median at 5% (two-sided):
    the distribution-free interval for a median is made of order statistics (scipy.stats.quantile_test).
    The percentile bootstrap's interval of 3 distinct values was [min, max]: all-positive read 'excludes 0' with
    sign-test p = 0.25 (under a zero-median null, 24% of random triples got a verdict; 13% at n = 4 and 7)."""
    from scipy.stats import quantile_test

    p = quantile_test(values, q=0, p=0.5).pvalue
    assert p > 0.05  # the data do not show a nonzero median at 5%
    assert _stats.excludes_zero(_stats.median_ci(values)) in (0, None)


# ---------------------------------------------------------------------------------------- the public kernel functions
def test_hsic_and_cka_from_kernels_check_their_gram_matrices():
    """Unbiased HSIC of N = 3 returned NaN (0/0) and CKA called that 'constant'; a non-symmetric L gave CKA
    0.99; a [3, 2] 'Gram' gave a number; numpy input raised TypeError; mismatched sizes a raw RuntimeError."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 4))
    K = x @ x.T
    with pytest.raises(InvalidOptionError, match="unbiased HSIC needs at least 4 examples; got 3"):
        S.hsic(torch.from_numpy(K[:3, :3]), torch.from_numpy(K[:3, :3]), unbiased=True)
    with pytest.raises(InvalidOptionError, match="at least 4 examples"):
        S.cka_from_kernels(torch.from_numpy(K[:3, :3]), torch.from_numpy(K[:3, :3]), unbiased=True)
    with pytest.raises(InvalidOptionError, match="L is not symmetric"):
        S.cka_from_kernels(torch.from_numpy(K), torch.from_numpy(K + rng.standard_normal((6, 6))))
    with pytest.raises(InvalidOptionError, match=r"square Gram matrix.*\(6, 2\)"):
        S.hsic(torch.from_numpy(K[:, :2]), torch.from_numpy(K[:, :2]))
    with pytest.raises(InvalidOptionError, match="same examples"):
        S.hsic(torch.from_numpy(K), torch.from_numpy(K[:4, :4]))
    with pytest.raises(InvalidOptionError, match="NaN or infinite"):
        S.hsic(torch.from_numpy(K), torch.full((6, 6), math.nan, dtype=torch.float64))
    for unbiased, ref in ((False, _hsic_biased), (True, _hsic_unbiased)):  # numpy and float32 read in float64
        assert float(S.hsic(K, K, unbiased=unbiased)) == pytest.approx(ref(K, K), rel=1e-12)
        K32 = K.astype(np.float32)
        assert float(S.hsic(torch.from_numpy(K32), torch.from_numpy(K))) == pytest.approx(
            _hsic_biased(K32.astype(float), K), rel=1e-12)


def test_grelu_kernel_is_unchanged_by_a_power_of_two_far_from_one():
    """Its channel variances overflowed at 2^600 (≈ 1e180): the kernel came back all zeros."""
    x, _ = _pair((8, 3, 2, 2), 6)
    for k in (-600, 600):
        assert torch.equal(S.grelu_kernel(x * 2.0 ** k), S.grelu_kernel(x))


def _fooling_inputs():
    rng = np.random.default_rng(11)
    x = np.maximum(rng.standard_normal((30, 5)), 0) + 0.01
    y = np.maximum(rng.standard_normal((30, 5)), 0) + 0.5 * x
    big = x.copy(); big[:, 0] *= 1e6
    dup = x.copy(); dup[:, 1] = dup[:, 0]
    rank = x.copy(); rank[:, 2] = rank[:, 0] + rank[:, 1]
    rows = x.copy(); rows[10:] = rows[0] + 0.1 * rng.random((20, 5))
    const = x.copy(); const[:, 3] = 0.1
    offset = (x + 1e4).astype(np.float32).astype(np.float64)  # what a float32 map with a large mean holds
    conv = rng.standard_normal((9, 3, 4, 4)), rng.standard_normal((9, 3, 4, 4))
    return {"one unit 1e6": (big, y), "duplicated unit": (dup, y), "rank-deficient": (rank, y),
            "rows nearly repeated": (rows, y), "constant unit 0.1": (const, y), "float32 mean 1e4": (offset, y),
            "conv": conv, "d = 1": (x[:, :1], y[:, :1]), "one side wider": (x, y[:, :3])}


@pytest.mark.parametrize("case", list(_fooling_inputs()))
def test_inputs_that_would_fool_a_measure_still_match_the_definition(case):
    a, b = _fooling_inputs()[case]
    for name, measure in MEASURES.items():
        with np.errstate(all="ignore"):
            ref = float(REFERENCE[name](a, b))
        assert measure(a, b) == pytest.approx(ref, abs=1e-9), name


def test_channel_sign_flips_are_invisible_to_the_cka_measures_on_channels_but_not_to_matching():
    """Beyond the table (which has no sign-flip row): the per-channel CKAs read a sign-flipped map as identical
    (the group of every nonzero D, larger than G_ReLU), as documented; the matching measures see the flip."""
    x, y = _pair((30, 5, 2, 2), 12)
    flip = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0], dtype=torch.float64).reshape(1, 5, 1, 1)
    for name in ("grelu_cka", "standardized_cka", "linear_cka", "mean_cca"):
        assert MEASURES[name](x * flip, y) == pytest.approx(MEASURES[name](x, y), abs=1e-12), name
    for name in ("grelu_procrustes", "permutation_procrustes", "correlation_matching"):
        assert MEASURES[name](x * flip, y) < MEASURES[name](x, y) - 0.1, name


@pytest.mark.parametrize("k", range(2, 10))
def test_the_cyclic_seed_design_has_every_edge_of_the_cycle(k):
    """similarity._cyclic([0, 1, 2], 3) returned 2 pairs (0-1, 1-2) for the protocol's 3 (myrtle_relu_w32): odd cycles
    lost their closing pair. The first pairs stay disjoint, and a shorter request is a prefix of a longer one."""
    from workbench.experiments._runs import cyclic_pairs

    pairs = cyclic_pairs(list(range(k)), k)
    edges = {frozenset(map(int, p.split("-"))) for p in pairs}
    expect = {frozenset((i, (i + 1) % k)) for i in range(k)}
    assert len(pairs) == len(expect) and edges == expect
    disjoint = pairs[:k // 2]
    assert len({s for p in disjoint for s in p.split("-")}) == 2 * len(disjoint)
    assert all(cyclic_pairs(list(range(k)), m) == pairs[:m] for m in range(1, k + 1))


# ---------------------------------------------------------------------------------------- random_transform's law
def test_random_transform_draws_haar_orthogonal_uniform_permutations_and_positive_scalings():
    from collections import Counter

    from scipy import stats

    c, eye = 4, torch.eye(4, dtype=torch.float64)
    Q = [S.random_transform(eye, "orthogonal", seed=s) for s in range(600)]
    assert all(torch.allclose(q @ q.T, eye, atol=1e-12) for q in Q)
    # Haar on O(4): an entry is a coordinate of a uniform point on S³, (x + 1)/2 ~ Beta(3/2, 3/2); E tr = 0,
    # Var tr = 1; both determinants equally often (O(n), not SO(n)). QR of a Gaussian without the sign fix
    # fails all three (E tr = −0.83, Var tr = 0.35, det > 0 never).
    for i, j in ((0, 1), (0, 0), (3, 3)):  # a diagonal entry is where an unsigned QR shows (KS p = 1e-140)
        entry = np.array([float(q[i, j]) for q in Q])
        assert stats.kstest((entry + 1) / 2, stats.beta((c - 1) / 2, (c - 1) / 2).cdf).pvalue > 1e-3
    trace = np.array([float(q.trace()) for q in Q])
    assert abs(trace.mean()) < 4 / np.sqrt(600) and abs(trace.var() - 1) < 0.25
    assert 0.4 < np.mean([float(torch.linalg.det(q)) > 0 for q in Q]) < 0.6
    perms = Counter(tuple(S.random_transform(eye, "permutation", seed=s).argmax(1).tolist()) for s in range(2400))
    assert len(perms) == 24 and stats.chisquare(list(perms.values())).pvalue > 1e-3
    for s in range(20):
        d = S.random_transform(eye, "unit_scaling", seed=s)
        assert torch.equal(d, torch.diag(d.diagonal())) and bool((d.diagonal() > 0).all())
    x = torch.randn(5, c, 3, 3, dtype=torch.float64)
    before = x.clone()
    for kind in S.INVARIANCES:  # the same map at every position, the input untouched
        y = S.random_transform(x, kind, seed=3)
        assert y.shape == x.shape and y.dtype == torch.float64 and torch.equal(x, before)
    M = S.random_transform(eye, "invertible_linear", seed=3)
    assert torch.allclose(S.random_transform(x, "invertible_linear", seed=3), torch.einsum("nchw,cd->ndhw", x, M))


def test_mean_cca_stays_gl_invariant_for_ill_conditioned_maps_and_d_close_to_n():
    """Measured drift is about cond·eps (1e-12 at cond 1e6); the library's GL samples are well conditioned
    (cond ≤ 11 in 200 draws), so the edge is checked here."""
    g = torch.Generator().manual_seed(0)
    for n, c in ((40, 6), (12, 10)):
        x = torch.randn(n, c, generator=g, dtype=torch.float64)
        y = torch.randn(n, c, generator=g, dtype=torch.float64) + 0.5 * x
        U, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))
        M = U @ torch.diag(torch.logspace(0, -6, c, dtype=torch.float64)) @ V  # condition number 1e6
        assert S.mean_cca(x @ M, y) == pytest.approx(S.mean_cca(x, y), abs=1e-9)
        assert S.mean_cca(x @ M, y) == pytest.approx(_mean_cca(x.numpy(), y.numpy()), abs=1e-9)


def test_verdicts_under_a_zero_median_null_are_rare():
    rng = np.random.default_rng(0)
    for n in (3, 4, 6, 7, 8):
        calls = [_stats.excludes_zero(_stats.median_ci(rng.standard_normal(n))) for _ in range(400)]
        assert sum(c not in (0, None) for c in calls) / 400 <= 0.05 + 0.02, n  # nominal 5%, sampling slack


# ---------------------------------------------------------------------------------------- ties in SVCCA's cut
@pytest.mark.parametrize("spectrum, keep, kept", [((1.0, 1, 1, 1), 0.6, 4), ((3.0, 1, 1, 1), 0.8, 4),
                                                  ((3.0, 1, 1, 1), 0.7, 1), ((2.0, 2, 1, 1), 0.5, 2)])
def test_svcca_keeps_or_drops_tied_directions_together(spectrum, keep, kept):
    """Whitened units have equal singular values: a cut inside them kept whichever tied directions the SVD
    returned first, which a rotation or a permutation of the units (both declared invariances) changed:
    svcca moved by 0.11 at keep = 0.6. The reference keeps the first ``kept`` directions of the spectrum built
    here (all of a tied set or none of it)."""
    rng = np.random.default_rng(1)
    n = 40
    Z = rng.standard_normal((n, 4))
    U, _ = np.linalg.qr(Z - Z.mean(0))  # orthonormal columns, centred (combinations of centred ones)
    x = U * np.array(spectrum)
    y = rng.standard_normal((n, 3)) + U[:, :3] @ rng.standard_normal((3, 3))
    rho = np.linalg.svd(U[:, :kept].T @ _basis(y, keep), compute_uv=False)
    ref = np.minimum(rho, 1).mean()
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    assert S.svcca(xt, yt, keep=keep) == pytest.approx(ref, abs=TOL)
    for kind in ("orthogonal", "permutation"):
        for s in range(4):
            assert S.svcca(S.random_transform(xt, kind, seed=s), yt, keep=keep) == pytest.approx(ref, abs=TOL), kind


# ---------------------------------------------------------------------------------------- wide RBF kernels
def test_a_wide_rbf_kernel_tends_to_linear_cka_without_rounding_away():
    """exp(−D²/(2σ²)) of a wide kernel is 1 − (below rounding): bandwidth 1e7 read 0.3438 and 1e8 read 0.225
    where the documented limit, linear CKA, is 0.3445; 1e9 was refused as 'acts_a is (nearly) constant'."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 5))
    y = rng.standard_normal((30, 4)) + 0.5 * x[:, :4]

    def rbf(a, bandwidth):  # the definition, where exp still resolves the distances
        D = ((a[:, None] - a[None]) ** 2).sum(-1)
        d = np.sort(D[np.triu_indices(len(a), 1)])
        return np.exp(-D / (2 * bandwidth ** 2 * d[(len(d) - 1) // 2]))
    for bandwidth in (0.3, 2.0, 100.0):
        assert S.rbf_cka(x, y, bandwidth=bandwidth) == pytest.approx(_cka(rbf(x, bandwidth), rbf(y, bandwidth)), abs=1e-9)
    linear = _linear_cka(x, y)
    assert abs(S.rbf_cka(x, y, bandwidth=100.0) - linear) > 1e-6  # not yet at the limit
    for bandwidth in (1e6, 1e8, 1e9, 1e100, 1e155, 1e160, 1e200, np.float32(1e30)):
        assert S.rbf_cka(x, y, bandwidth=bandwidth) == pytest.approx(linear, abs=1e-10), bandwidth
    for bad in (math.inf, math.nan, 0.0, -1.0, True, "1"):
        with pytest.raises(InvalidOptionError, match="bandwidth must be a positive number, finite"):
            S.rbf_cka(x, y, bandwidth=bad)
