"""Adversarial tests of the groups layer's verdicts (check_intertwiner, discover_group, the catalogue) and of
the neuron-level interpretation tools (match_neurons, interpretation_shift).

Every verdict is held against an answer computed here directly: the element applied by hand in float64
(σ(Mx) against φ(M)σ(x)), scipy's linear_sum_assignment on cosines computed here, a permutation whose
effect is known. The inputs are the ones that would fool a numerical check: activations that agree with
a catalogued one on a small range only, elements that nearly commute or are not invertible, units that
a permutation with a fixed point never moves."""
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment
from torch import nn

import workbench as wb
from workbench._errors import InvalidOptionError
from workbench.groups import (CATALOGUE, Dense, ScaledPermutation, check_intertwiner, discover_group, get_group,
                              intertwiner_group)
from workbench.groups._discover import generator_element
from workbench.symmetry import match_neurons

F64 = torch.float64
FAST = settings(max_examples=15, deadline=None)


def direct_error(fn, M: torch.Tensor, X: torch.Tensor, phi=lambda M: M) -> float:
    """max |σ(Mx) − φ(M)σ(x)| over the rows x of X, computed here in float64 with dense matrices."""
    M, X = M.to(F64), X.to(F64)
    return float((fn(X @ M.T) - fn(X) @ phi(M).T).abs().max())


def pos_diag(n, seed, lo=0.5, hi=2.0):
    g = torch.Generator().manual_seed(seed)
    return ScaledPermutation(torch.arange(n), lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64))


# ------------------------------------------------------------------ activations that agree on a small range only

# (activation, its true group, an input where a member of the wrongly claimed group visibly fails)
LOOK_ALIKES = [
    (lambda x: x.clamp(0, 20), "permutation"),  # ReLU up to 20: a positive scaling is not an intertwiner
    (lambda x: x.clamp(0, 100), "permutation"),
    (lambda x: torch.relu(x + 50) - 50, "permutation"),  # max(x, −50): a ReLU with its kink moved far away
    (lambda x: torch.relu(x - 30), "permutation"),  # zero on |x| < 30: looks like the zero map (GL)
    (lambda x: x.clamp(-20, 20), "signed_permutation"),  # odd; the identity up to 20 (looks like GL)
    (lambda x: x.clamp(-100, 100), "signed_permutation"),
    (lambda x: F.softplus(x, beta=1e8), "permutation"),  # ReLU except within 2·10⁻⁷ of 0
]


@pytest.mark.parametrize("fn,true_group", LOOK_ALIKES, ids=[f"{i}:{g}" for i, (_, g) in enumerate(LOOK_ALIKES)])
def test_an_activation_that_agrees_with_relu_or_the_identity_on_a_small_range_gets_its_own_group(fn, true_group):
    found = discover_group(fn)
    assert found.group.name == true_group, found.summary()
    # the claim the old inputs (Gaussian × 3) made is false, shown directly: a member of the larger group fails
    x = torch.tensor([[-200.0, -40.0, 0.0, 1e-7, 5.0, 35.0, 80.0, 150.0]], dtype=F64)
    D = torch.diag(torch.tensor([3.0, 2.0, 0.5, 4.0, 5.0, 2.5, 0.5, 3.0], dtype=F64))
    assert direct_error(fn, D, x) > 1e-9
    assert found.input_max > 1e3 and "|x| ≤" in found.summary()


def test_relu6_and_a_clamp_at_20_fail_a_positive_scaling_that_relu_passes():
    g = get_group("relu", 8).sample(seed=0)
    assert check_intertwiner("relu", g).passed
    for fn in ("relu6", nn.Hardtanh(0.0, 20.0), lambda x: x.clamp(0, 20)):
        res = check_intertwiner(fn, g)
        assert not res.passed and res.worst_ratio > 1e6, res.summary()
    assert intertwiner_group("relu6", 8).name == intertwiner_group(nn.Hardtanh(0.0, 20.0), 8).name == "permutation"


def test_a_kink_beyond_the_range_checked_is_stated_and_found_with_a_wider_scale():
    fn = lambda x: x.clamp(0, 1e5)  # noqa: E731
    found = discover_group(fn)
    # beyond the default range the check cannot see the clamp: the verdict says which inputs it covers
    assert found.group.name == "scaled_permutation" and found.input_max < 1e5
    assert f"|x| ≤ {found.input_max:.3g}" in found.summary() and "scale=" in found.summary()
    wide = discover_group(fn, scale=(1e-3, 1e6))
    assert wide.group.name == "permutation" and wide.input_max > 1e5


@pytest.mark.parametrize("fn,name", [(F.gelu, "permutation"), (functools.partial(F.gelu, approximate="tanh"), "permutation"),
                                     (F.silu, "permutation"), (F.elu, "permutation"),
                                     (functools.partial(F.elu, alpha=2.0), "permutation"),
                                     (functools.partial(F.leaky_relu, negative_slope=1e-6), "scaled_permutation"),
                                     (torch.tanh, "signed_permutation"), (torch.relu, "scaled_permutation")])
def test_near_relatives_of_relu_get_the_catalogues_group(fn, name):
    found, G = discover_group(fn), intertwiner_group(fn, 8)
    assert found.group.name == G.name == name, found.summary()


@pytest.mark.parametrize("name", ["gelu", "relu", "tanh", "sigmoid", "x^3", "abs", "softplus"])
@pytest.mark.parametrize("c", [1e-15, 1e-9, 1e9, 1e15])
def test_a_constant_multiple_of_an_activation_gets_the_same_verdict(name, c):
    # the tolerance is relative to σ itself: 1e-15·GELU is not positively homogeneous either (with an absolute
    # floor of 100·eps the error 1e-15·0.13 passed, and GELU·1e-15 was given P·D₊)
    fn = wb.groups.Activation(name)
    base = discover_group(fn, n_samples=512)
    scaled = discover_group(lambda x: c * fn(x), n_samples=512)
    assert (scaled.group.name, scaled.group.phi) == (base.group.name, base.group.phi), (c, scaled.summary())


# ------------------------------------------------------------------ the permutation generator moves every unit

@pytest.mark.parametrize("n", [2, 3, 5, 8, 13])
@pytest.mark.parametrize("seed", range(4))
def test_the_permutation_generator_is_an_n_cycle(n, seed):
    perm = generator_element("permutation", n, seed=seed).perm.tolist()
    seen, i = set(), 0
    while i not in seen:
        seen.add(i)
        i = perm[i]
    assert len(seen) == n, perm  # one cycle through every unit: no unit is left where it was


@pytest.mark.parametrize("unit", range(8))
def test_one_linear_unit_among_relus_is_not_given_permutations(unit):
    # a ReLU layer with one linear unit (a skip unit): swapping it with a ReLU unit changes the function.
    # The old test permutation fixed unit 0 (seed 0, n = 8), so this activation was given P·D₊.
    def act(x):
        y = torch.relu(x)
        y[..., unit] = x[..., unit]
        return y

    found = discover_group(act)
    assert found.group.name == "positive_diagonal", found.summary()
    swap = torch.arange(8)
    swap[[unit, (unit + 1) % 8]] = swap[[(unit + 1) % 8, unit]]
    P = torch.eye(8, dtype=F64)[swap]
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(unit), dtype=F64)
    assert direct_error(act, P, x) > 0.1  # the permutation is not an intertwiner
    assert direct_error(act, pos_diag(8, unit).matrix(), x) < 1e-12  # the positive diagonal is


# ------------------------------------------------------------------ elements: nearly commuting, singular, bad

@pytest.mark.parametrize("eps,dtype,passes", [(1e-7, F64, False), (1e-10, F64, False), (1e-12, F64, False),
                                              (1e-4, torch.float32, False), (1e-3, torch.float32, False),
                                              (0.0, F64, True), (0.0, torch.float32, True)])
def test_a_permutation_times_a_scaling_near_one_is_not_a_gelu_intertwiner(eps, dtype, passes):
    perm = generator_element("permutation", 8, seed=1).perm
    e = ScaledPermutation(perm, torch.full((8,), 1 + eps, dtype=F64))
    res = check_intertwiner("gelu", e, dtype=dtype)
    assert res.passed == passes, res.summary()
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    direct = direct_error(F.gelu, e.matrix(), x)
    assert (direct == 0.0) == (eps == 0.0) and direct <= 0.5 * eps  # GELU(λx) − λGELU(x) ≈ (λ − 1)x²φ(x)


def test_negative_controls_fail_and_true_members_pass_directly_and_in_the_check():
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0), dtype=F64) * 3
    Q = get_group("orthogonal", 8).sample(seed=0)
    D = pos_diag(8, 1)
    S = ScaledPermutation(torch.arange(8), torch.tensor([-1.0, 1, -1, 1, 1, -1, 1, 1], dtype=F64))
    cases = [("relu", torch.relu, Q, False), ("relu", torch.relu, D, True), ("gelu", F.gelu, D, False),
             ("tanh", torch.tanh, D, False), ("tanh", torch.tanh, S, True), ("gelu", F.gelu, S, False),
             ("identity", lambda t: t, Q, True)]
    for name, fn, e, member in cases:
        direct = direct_error(fn, e.matrix(), x)
        assert (direct < 1e-12) == member, (name, direct)
        assert check_intertwiner(name, e).passed == member, (name, check_intertwiner(name, e).summary())


@pytest.mark.parametrize("element,what", [
    (Dense(torch.zeros(4, 4, dtype=F64)), "singular"),  # passed for ReLU: relu(0) = 0·relu(x)
    (Dense(torch.ones(4, 4, dtype=F64)), "singular"),  # rank 1
    (Dense(torch.diag(torch.tensor([1.0, 1.0, 1.0, 1e-300], dtype=F64))), "singular"),
    (ScaledPermutation(torch.zeros(4, dtype=torch.long)), "not a permutation"),  # passed for every σ: σ(x₀) = σ(x₀)
    (ScaledPermutation(torch.tensor([1, 2, 3, 4])), "not a permutation"),  # was a RuntimeError from index_select
    (ScaledPermutation(torch.arange(4), torch.tensor([1.0, 0.0, 2.0, 1.0], dtype=F64)), "zero scale"),
    (ScaledPermutation(torch.arange(4), torch.tensor([1.0, float("nan"), 2.0, 1.0], dtype=F64)), "non-finite"),
    (ScaledPermutation(torch.arange(4), torch.full((4,), float("inf"), dtype=F64)), "non-finite"),
    (Dense(torch.tensor([[1.0, 0, 0, 0], [0, float("nan"), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=F64)), "non-finite"),
])
@pytest.mark.parametrize("act", ["relu", "gelu", "identity"])
def test_singular_or_non_finite_elements_are_refused(element, what, act):
    with pytest.raises(InvalidOptionError, match=what):
        check_intertwiner(act, element)


def test_a_float32_element_is_checked_like_its_float64_twin():
    perm = generator_element("permutation", 6, seed=2).perm
    s32 = torch.tensor([0.5, 2.0, 1.5, 3.0, 0.25, 1.0], dtype=torch.float32)
    for act in ("relu", "gelu"):
        a = check_intertwiner(act, ScaledPermutation(perm, s32))
        b = check_intertwiner(act, ScaledPermutation(perm, s32.double()))
        assert a.passed == b.passed == (act == "relu") and a.max_abs_error == b.max_abs_error


@pytest.mark.parametrize("kwargs,match", [
    ({"n_samples": 0}, "n_samples"), ({"n_samples": 2.5}, "n_samples"), ({"scale": -1.0}, "scale"),
    ({"scale": 0.0}, "scale"), ({"scale": float("nan")}, "scale"), ({"scale": (5.0, 1.0)}, "scale"),
    ({"scale": (0.0, 1.0)}, "scale"), ({"scale": "big"}, "scale"), ({"dtype": torch.int64}, "dtype"),
])
def test_bad_options_are_refused_by_name(kwargs, match):
    with pytest.raises(InvalidOptionError, match=match):
        check_intertwiner("relu", get_group("relu", 4).sample(seed=0), **kwargs)
    if "dtype" not in kwargs:
        with pytest.raises(InvalidOptionError, match=match):
            discover_group("relu", 4, **kwargs)


def test_an_activation_that_cannot_take_n_units_is_refused_clearly():
    with pytest.raises(InvalidOptionError, match="could not be applied"):  # a RuntimeError from torch before
        check_intertwiner(nn.PReLU(3), get_group("permutation", 8).sample(seed=0))
    with pytest.raises(InvalidOptionError, match="not elementwise"):
        check_intertwiner(lambda x: x.sum(-1), get_group("permutation", 4).sample(seed=0))


def test_an_overflowing_activation_is_checked_where_it_is_finite_and_says_so():
    # softplus with a large β overflows (exp(βx) = inf) beyond x ≈ 0.7: permutations still commute with it.
    # Before, the infinities made every check fail, and discover_group called its group trivial.
    fn = functools.partial(F.softplus, beta=1e3, threshold=1e9)
    found = discover_group(fn, scale=(1e-6, 1.0))
    assert found.group.name == "permutation", found.summary()
    res = check_intertwiner(torch.exp, generator_element("permutation", 8, seed=0))
    assert res.passed and res.n_checked < res.n_samples and "left out" in res.summary()
    assert np.isfinite(res.input_max) and res.errors.isnan().sum() == res.n_samples - res.n_checked
    with pytest.raises(InvalidOptionError, match="not finite"):
        check_intertwiner(torch.sqrt, generator_element("permutation", 8, seed=0))  # NaN on most inputs


def test_a_verdict_states_the_inputs_it_covers():
    res = check_intertwiner("relu", get_group("relu", 8).sample(seed=0))
    x = torch.randn(4096, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert res.input_max > 1e3 and "|x| ≤" in res.summary()
    old = check_intertwiner("relu", get_group("relu", 8).sample(seed=0), scale=3.0)  # one scale: the old inputs
    assert old.input_max < 3 * float(x.abs().max()) * 6 and old.scale == 3.0
    frame = res.to_frame()
    assert {"input_max", "n_checked", "worst_ratio"} <= set(frame.columns)


# ------------------------------------------------------------------ the catalogue: modules, partials, subclasses

class ShiftedReLU(nn.ReLU):
    def forward(self, x):
        return torch.relu(x - 1)


def test_a_subclass_with_its_own_forward_is_not_given_its_parents_group():
    import torch.ao.nn.quantized as nnq

    # torch.ao's quantized ReLU6 subclasses nn.ReLU: the catalogue gave it P·D₊, which ReLU6 does not have
    for module in (nnq.ReLU6(), ShiftedReLU()):
        with pytest.raises(InvalidOptionError, match="defines its own forward"):
            intertwiner_group(module, 4)
    found = discover_group(ShiftedReLU())
    assert found.group.name == "permutation"
    x = torch.tensor([[0.5, 2.0, 3.0, 4.0]], dtype=F64)
    assert direct_error(ShiftedReLU(), 2 * torch.eye(4, dtype=F64), x) > 0.5
    assert not wb.symmetry._graph_sites.is_activation(ShiftedReLU())


def test_a_nan_argument_is_refused():
    with pytest.raises(InvalidOptionError, match="NaN"):
        intertwiner_group(functools.partial(F.leaky_relu, negative_slope=float("nan")), 4)


@pytest.mark.parametrize("spec", [functools.partial(torch.clamp, min=0.0, max=20.0), nn.Hardtanh(0.0, 20.0),
                                  functools.partial(F.hardtanh, min_val=-20.0, max_val=20.0), nn.ReLU6(),
                                  functools.partial(F.softplus, beta=1e8), nn.LeakyReLU(1e-6), nn.ELU(2.0),
                                  nn.GELU(approximate="tanh"), functools.partial(F.threshold, threshold=-5.0, value=-5.0)])
def test_catalogue_and_discovery_agree_on_activations_with_arguments(spec):
    G, found = intertwiner_group(spec, 8), discover_group(spec)
    assert (found.group.name, found.group.phi) == (G.name, G.phi), found.summary()


@pytest.mark.parametrize("row", CATALOGUE, ids=lambda r: r["activation"])
def test_every_catalogue_group_sample_passes_directly_in_float64(row):
    fn = wb.groups.Activation(row["activation"])
    G = intertwiner_group(row["activation"], 6)
    x = torch.randn(256, 6, generator=torch.Generator().manual_seed(3), dtype=F64) * 5
    for seed in range(3):
        e = G.sample(seed=seed)
        direct = (fn(e.act(x)) - e.phi().act(fn(x))).abs().max()
        assert direct <= 1e-10 * max(1.0, float(fn(x).abs().max()) * 50 ** 3), (row["activation"], float(direct))
        assert check_intertwiner(fn, e).passed


# ------------------------------------------------------------------ match_neurons against scipy

def cosines(A, B):
    a = A / np.linalg.norm(A, axis=0, keepdims=True)
    b = B / np.linalg.norm(B, axis=0, keepdims=True)
    return b.T @ a  # [C_b, C_a]


@FAST
@given(st.integers(2, 12), st.integers(1, 30), st.integers(0, 10_000), st.booleans())
def test_match_neurons_reaches_scipys_optimum_on_cosines_computed_here(C, N, seed, signed):
    rng = np.random.default_rng(seed)
    A, B = rng.normal(size=(N, C)), rng.normal(size=(N, C))  # N < C included
    m = match_neurons(torch.tensor(A), torch.tensor(B), signed=signed)
    cos = cosines(A, B)
    score = np.abs(cos) if signed else cos
    r, c = linear_sum_assignment(score, maximize=True)
    assert sorted(m.perm.tolist()) == list(range(C))
    assert np.isclose(score[np.arange(C), m.perm.numpy()].sum(), score[r, c].sum(), atol=1e-12)
    np.testing.assert_allclose(m.similarity.numpy(), cos, atol=1e-12)
    matched = A[:, m.perm.numpy()]
    ls = (B * matched).sum(0) / (matched * matched).sum(0)  # least squares b ≈ s·a
    np.testing.assert_allclose(m.scale.numpy(), ls, rtol=1e-10)


@FAST
@given(st.integers(2, 10), st.integers(0, 10_000), st.booleans())
def test_an_applied_scaled_permutation_is_recovered_exactly(C, seed, signed):
    g = torch.Generator().manual_seed(seed)
    A = torch.relu(torch.randn(40, C, 3, generator=g, dtype=F64)) + 0.01  # [N, C, positions]
    perm = torch.randperm(C, generator=g)
    s = torch.exp(torch.randn(C, generator=g, dtype=F64))
    if signed:
        s = s * torch.where(torch.rand(C, generator=g) < 0.5, -1.0, 1.0).double()
    B = A[:, perm] * s.reshape(1, C, 1)
    m = match_neurons(A, B, signed=signed)
    assert torch.equal(m.perm, perm)
    torch.testing.assert_close(m.scale, s, rtol=1e-12, atol=0)
    torch.testing.assert_close(m.element.act(A, dim=1), B, rtol=1e-12, atol=0)
    family = "diagonal_permutation" if (s < 0).any() else "scaled_permutation"  # a sign flip is not in P·D₊
    assert get_group(family, C).contains(m.element) and m.element.group == family


@pytest.mark.parametrize("size", [1e-200, 1e-20, 1.0, 1e20, 1e200])
def test_matching_does_not_depend_on_the_units_size(size):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 5, generator=g, dtype=F64)
    perm, s = torch.tensor([2, 0, 4, 1, 3]), torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25], dtype=F64)
    m = match_neurons(A * size, A[:, perm] * s * size)
    assert torch.equal(m.perm, perm)  # with norms clamped at 1e-30, units of size 1e-20 had cosine ~0
    torch.testing.assert_close(m.scale, s, rtol=1e-12, atol=0)
    torch.testing.assert_close(m.quality, torch.ones(5, dtype=F64), rtol=0, atol=1e-12)


def test_dead_units_get_cosine_zero_and_an_invertible_element():
    g = torch.Generator().manual_seed(1)
    A = torch.relu(torch.randn(20, 4, generator=g, dtype=F64))
    A[:, 2] = 0  # a dead ReLU unit in both models
    m = match_neurons(A, A.clone())
    assert m.quality[2] == 0 and m.scale[2] == 1.0  # was scale 0: a singular "group element"
    assert check_intertwiner("relu", m.element).passed
    torch.testing.assert_close(m.element.act(A, dim=1), A, rtol=0, atol=0)


def test_ties_and_constant_units_give_a_valid_optimal_matching():
    A = torch.ones(10, 4, dtype=F64)  # every unit constant and identical: every matching is optimal
    m = match_neurons(A, A * 2)
    assert sorted(m.perm.tolist()) == [0, 1, 2, 3] and torch.allclose(m.scale, torch.full((4,), 2.0, dtype=F64))


@pytest.mark.parametrize("a,b,match", [
    (torch.full((5, 3), float("nan")), torch.ones(5, 3), "non-finite"),  # a ValueError from scipy before
    (torch.ones(5, 3), torch.tensor([[float("inf")] * 3] * 5), "non-finite"),
    (torch.ones(0, 3), torch.ones(0, 3), "at least one example"),  # matched nothing, silently, before
    (torch.ones(5, 3), torch.ones(5, 4), "same shape"),
    (torch.ones(5), torch.ones(5), "examples, units"),
])
def test_match_neurons_refuses_bad_input(a, b, match):
    with pytest.raises(InvalidOptionError, match=match):
        match_neurons(a, b)


# ------------------------------------------------------------------ interpretation_shift on known transforms

def relu_mlp(seed=0, sparse=False):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3)).double()
    if sparse:
        with torch.no_grad():
            model[0].bias -= 1.0  # units active on few examples: many exact zeros (ties)
    return model


def top_k_direct(model, X, k):
    h = torch.relu(model[0](X))  # [N, C], the site's activation computed here
    return h, h.topk(k, dim=0).indices.T


@pytest.mark.parametrize("group", ["permutation", "positive_diagonal", "scaled_permutation", None])
def test_interpretations_move_with_the_applied_element_and_nothing_else(group):
    model = relu_mlp(1)
    X = torch.randn(300, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    new, t = wb.random_intertwiner(model, seed=4, group=group, progress=False) if group else (model, None)
    site = "1"
    shift = wb.interpretation_shift(model, new, X, site, k=10, progress=False)
    h, top = top_k_direct(model, X, 10)
    h_new, top_new = top_k_direct(new, X, 10)
    perm = t.elements[site].perm if t else torch.arange(12)
    torch.testing.assert_close(h_new, t.elements[site].act(h, dim=1) if t else h, rtol=1e-12, atol=1e-12)
    # new unit u is old unit perm[u]: its top examples are the same set, and the matching finds perm
    assert torch.equal(shift.perm, perm)
    assert shift.overlap_matched.min() == 1.0
    for u in range(12):
        assert set(top_new[u].tolist()) == set(top[perm[u]].tolist())
    same_index = torch.tensor([len(set(top[u].tolist()) & set(top_new[u].tolist())) / 10 for u in range(12)], dtype=F64)
    torch.testing.assert_close(shift.overlap_same_index, same_index)
    if group in (None, "positive_diagonal"):
        assert shift.overlap_same_index.min() == 1.0  # zero shift: nothing moved
    else:
        assert shift.overlap_same_index.mean() < 0.5


def test_a_rotation_at_a_relu_site_is_a_negative_control_that_moves_interpretations():
    model = relu_mlp(1)
    X = torch.randn(300, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    new, _ = wb.random_intertwiner(model, seed=0, group="orthogonal", allow_non_symmetry=True, progress=False)
    assert (new(X) - model(X)).abs().max() > 1e-3  # the function changed
    shift = wb.interpretation_shift(model, new, X, "1", k=10, progress=False)
    assert shift.overlap_matched.mean() < 0.9


@pytest.mark.parametrize("kwargs,match", [({"k": 0}, "k is the number"), ({"k": -1}, "k is the number"),
                                          ({"k": 2.5}, "k is the number"), ({"batch_size": 0}, "batch_size")])
def test_interpretation_shift_refuses_bad_options(kwargs, match):
    model = relu_mlp(1)
    X = torch.randn(30, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    with pytest.raises(InvalidOptionError, match=match):  # k = 0 gave NaN overlaps, k = -1 a torch RuntimeError
        wb.interpretation_shift(model, model, X, "1", progress=False, **kwargs)
    with pytest.raises(InvalidOptionError, match="at least one example"):  # a torch.cat ValueError before
        wb.interpretation_shift(model, model, X[:0], "1", k=3, progress=False)
    other = nn.Sequential(nn.Linear(5, 10), nn.ReLU(), nn.Linear(10, 3)).double()
    with pytest.raises(InvalidOptionError, match="could not be read as the original's 12 units"):
        wb.interpretation_shift(model, other, X, "1", k=3, progress=False)


@pytest.mark.parametrize("act", [nn.Sigmoid(), nn.Tanh(), nn.Hardsigmoid()])
def test_affine_and_linear_sign_flips_are_matched_to_the_unit_they_flip(act):
    # σ(−x) = 1 − σ(x): the affine extension flips sigmoid units and the function is unchanged; the uncentred
    # cosine could not see 1 − a as a flipped a, and matched 7 of 16 units to the wrong unit before
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), act, nn.Linear(16, 3)).double()
    X = torch.randn(400, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    new, t = wb.random_intertwiner(model, seed=2, affine=True, progress=False)
    site = next(iter(t.elements))
    e = t.elements[site]
    with torch.no_grad():
        assert (e.scale < 0).any() and float((new(X) - model(X)).abs().max()) < 1e-12
        h, h_new = act(model[0](X)), act(new[0](X))
    shift = wb.interpretation_shift(model, new, X, site, k=10, progress=False)
    assert torch.equal(shift.perm, e.perm)
    for u in range(16):  # a kept unit keeps its top-k; a flipped unit's top-k is the old unit's bottom-k
        old = h[:, e.perm[u]] if e.scale[u] > 0 else -h[:, e.perm[u]]
        assert set(h_new[:, u].topk(10).indices.tolist()) == set(old.topk(10).indices.tolist())
        assert shift.overlap_matched[u] == (1.0 if e.scale[u] > 0 else len(
            set(h[:, e.perm[u]].topk(10).indices.tolist()) & set(h_new[:, u].topk(10).indices.tolist())) / 10)


def test_centred_matching_recovers_affine_flips_and_keeps_the_uncentred_scale():
    g = torch.Generator().manual_seed(5)
    A = torch.sigmoid(torch.randn(200, 6, generator=g, dtype=F64))
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    flip = torch.tensor([True, False, True, False, False, True])
    B = torch.where(flip, 1 - A[:, perm], A[:, perm])
    m = match_neurons(A, B, signed=True, centred=True)
    assert torch.equal(m.perm, perm)
    corr = np.corrcoef(B.T.numpy(), A.T.numpy())[:6, 6:]  # [C_b, C_a] Pearson, computed here
    np.testing.assert_allclose(m.similarity.numpy(), corr, atol=1e-12)
    np.testing.assert_allclose(m.quality.numpy(), 1.0, atol=1e-12)


TRUTH = {  # which scaled permutations D·P are intertwiners (φ(M) = M), derived by hand
    "relu": lambda s: bool((s > 0).all()), "leaky_relu": lambda s: bool((s > 0).all()),
    "tanh": lambda s: bool((s.abs() == 1).all()), "erf": lambda s: bool((s.abs() == 1).all()),
    "gelu": lambda s: bool((s == 1).all()), "sigmoid": lambda s: bool((s == 1).all()),
    "identity": lambda s: True,
}


@FAST
@given(st.sampled_from(sorted(TRUTH)), st.integers(2, 12), st.integers(0, 10_000),
       st.sampled_from(["ones", "positive", "signs", "signed", "one_off"]))
def test_the_verdict_on_a_random_scaled_permutation_matches_the_direct_answer(name, n, seed, kind):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    mag = torch.exp(torch.randn(n, generator=g, dtype=F64))
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    s = {"ones": torch.ones(n, dtype=F64), "positive": mag, "signs": sign, "signed": sign * mag,
         "one_off": torch.ones(n, dtype=F64).index_fill(0, torch.tensor([seed % n]), 1.5)}[kind]
    e = ScaledPermutation(perm, s)
    fn = wb.groups.Activation(name)
    x = torch.randn(512, n, generator=g, dtype=F64) * torch.logspace(-3, 3, 512, dtype=F64).unsqueeze(1)
    direct = direct_error(fn, e.matrix(), x) / max(1.0, float(fn(x).abs().max()))
    truth = TRUTH[name](s)
    assert (direct < 1e-12) == truth, (name, kind, direct)
    assert check_intertwiner(name, e, n_samples=512, seed=seed).passed == truth


@pytest.mark.parametrize("act", [nn.Tanh(), nn.Sigmoid()])
@pytest.mark.parametrize("seed", [0, 1])
def test_flipped_conv_units_are_matched_although_their_per_image_maxima_do_not_flip(act, seed):
    # an image's score is a unit's largest value over pixels; after a flip it is minus the old smallest, which
    # the old largest values do not predict: 7 of 16 tanh/sigmoid conv units were matched wrongly before
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), act, nn.Conv2d(16, 8, 3), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 3)).double()
    X = torch.randn(300, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    new, t = wb.random_intertwiner(model, seed=seed, affine=True, progress=False)
    site = next(iter(t.elements))
    e = t.elements[site]
    with torch.no_grad():
        assert (e.scale < 0).sum() >= 4 and float((new(X) - model(X)).abs().max()) < 1e-12
        h, h_new = act(model[0](X)).flatten(2), act(new[0](X)).flatten(2)  # [N, C, pixels]
    shift = wb.interpretation_shift(model, new, X, site, k=10, progress=False)
    assert torch.equal(shift.perm, e.perm)
    for u in range(16):  # computed here: a kept unit keeps its top images, a flipped one gets the old bottom ones
        old = h[:, e.perm[u]].amax(1) if e.scale[u] > 0 else -h[:, e.perm[u]].amin(1)
        assert set(h_new[:, u].amax(1).topk(10).indices.tolist()) == set(old.topk(10).indices.tolist())
    assert shift.overlap_matched[e.scale > 0].min() == 1.0


@pytest.mark.parametrize("eps", [1e-6, 1e-12])
def test_a_tiny_non_linearity_is_seen_down_to_float64_precision(eps):
    # below about 1e-13 relative (100·eps) a perturbation is float64 noise and no check can see it
    assert discover_group(lambda x: x + eps * torch.relu(x)).group.name == "scaled_permutation"  # not GL
    assert discover_group(lambda x: torch.relu(x) + eps * x * x).group.name == "permutation"  # not P·D₊
    assert discover_group(lambda x: torch.tanh(x) + eps * x * x).group.name == "permutation"  # not signed P


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [2, 5, 16])
def test_an_activation_computed_with_a_cancellation_keeps_its_group(seed, n):
    # sigmoid(x) − 1/2 is odd, but near 0 it is computed to eps·(1/2), not eps·σ(x): held to its own tiny values
    # alone, its negation failed on 7 of 48 (seed, n) pairs (the median-input floor this replaced); x³ + 2 − 2 lost
    # its scalings, and discover_group(x³ + 2, affine=True) lost its affine group (σ − σ(0) was formed first)
    assert discover_group(lambda x: torch.sigmoid(x) - 0.5, n, seed=seed, n_samples=1024).group.name == "signed_permutation"
    found = discover_group(lambda x: x ** 3 + 2 - 2, n, seed=seed, n_samples=1024).group
    assert (found.name, found.phi) == ("diagonal_permutation", ("power", 3))
    affine = discover_group(lambda x: x ** 3 + 2, n, seed=seed, n_samples=1024, affine=True).group
    assert (affine.name, affine.phi, affine.centre) == ("affine_diagonal_permutation", ("power", 3), 2.0)
    e = affine.sample(seed=seed)
    x = torch.randn(64, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    direct = (e.act(x) ** 3 + 2) - (e.phi().act(x ** 3 + 2) + affine.offset(e))  # σ(Mx) − φ(M)σ(x) − c, here
    assert float(direct.abs().max()) < 1e-9 * max(1.0, float((e.act(x) ** 3).abs().max()))


def test_the_explorer_matches_flipped_conv_units_as_interpretation_shift_does():
    from workbench.widgets._compute import explore, unit_extremes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(), nn.Conv2d(16, 8, 3), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 3)).double()
    X = torch.randn(300, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    site = wb.symmetry_map(model).sites[0]
    before, before_min = unit_extremes(model, [site], X)
    result, new = explore(model, site, None, 0, 1.0, X, before[site.name], before_min=before_min[site.name])
    e = result.transform.elements[site.name]
    assert (e.scale < 0).sum() >= 4 and torch.equal(result.matching.perm, e.perm)  # 7 of 16 were wrong before
    shift = wb.interpretation_shift(model, new, X, site.name, k=10, progress=False)
    assert torch.equal(result.shift.perm, shift.perm) and torch.equal(result.shift.overlap_matched, shift.overlap_matched)
