"""workbench.groups: elements, families, the activation catalogue, the numerical check, discovery, geodesics."""
import functools
import json

import matplotlib
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

matplotlib.use("Agg")

from workbench._errors import InvalidOptionError  # noqa: E402
from workbench.groups import (CATALOGUE, FAMILIES, GENERATORS, Dense, ScaledPermutation, activation_call,  # noqa: E402
                              catalogue_frame, check_intertwiner, discover_group, element_from_dict, geodesic,
                              get_group, identity, intertwiner_group)
from workbench.groups._catalogue import degree_of  # noqa: E402
from workbench.groups._discover import generator_element  # noqa: E402

F64 = torch.float64
FAST = settings(max_examples=12, deadline=None)
FAMILY_CASES = [(name, {}) for name in FAMILIES] + [("signed_permutation", {"phi": "abs"}),
                                                    ("diagonal_permutation", {"phi": ("power", 3)})]


def assert_close(a, b, atol=1e-10):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def expected_phi(M, phi):
    return {"identity": M, "abs": M.abs()}.get(phi, M ** 3 if phi == ("power", 3) else None)


# ---------------------------------------------------------------------------------------------- elements
@FAST
@given(case=st.sampled_from(FAMILY_CASES), n=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_element_algebra_agrees_with_dense_linear_algebra(case, n, seed):
    name, kw = case
    G = get_group(name, n, **kw)
    g, h = G.sample(seed=seed), G.sample(seed=seed + 1)
    M, N = g.matrix(), h.matrix()
    x = torch.randn(5, n, 3, dtype=F64, generator=torch.Generator().manual_seed(seed))  # [batch, n, c]
    assert_close(g.act(x, dim=1), torch.einsum("ij,bjc->bic", M, x))
    assert_close(g.act(x[:, :, 0], dim=-1), x[:, :, 0] @ M.T)
    assert_close(g.inverse().matrix(), torch.linalg.inv(M), atol=1e-8)
    assert_close(g.transpose().matrix(), M.T)
    assert_close((g @ h).matrix(), M @ N)
    assert (g.inverse() @ g).is_identity(atol=1e-9) and (g @ g.inverse()).is_identity(atol=1e-9)
    assert_close(g.phi().matrix(), expected_phi(M, kw.get("phi", "identity")))
    back = element_from_dict(json.loads(json.dumps(g.to_dict())))
    assert type(back) is type(g) and back.phi_kind == g.phi_kind and torch.equal(back.matrix(), M)
    assert G.contains(g) and G.contains(g @ h)
    assert G.offset(g) is None  # families are linear intertwiners


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "trivial"])
def test_same_seed_same_element_different_seed_different_element(name):
    G = get_group(name, 16)
    assert torch.equal(G.sample(seed=7).matrix(), G.sample(seed=7).matrix())
    assert torch.equal(G.sample(seed=7).matrix(), G.sample(generator=torch.Generator().manual_seed(7)).matrix())
    assert not torch.equal(G.sample(seed=7).matrix(), G.sample(seed=8).matrix())


def test_orthogonal_sampling_is_haar():
    gen = torch.Generator().manual_seed(0)
    Qs = torch.stack([get_group("orthogonal", 4).sample(generator=gen).matrix() for _ in range(500)])
    # entries have mean 0 and variance 1/n = 0.25: a mean's standard error is 0.022, thresholds ≈ 5σ
    assert Qs.mean(0).abs().max() < 0.11  # a QR without the sign correction gives max |mean| ≈ 0.42
    assert ((Qs ** 2).mean(0) - 0.25).abs().max() < 0.055  # E[Q_ij²] = 1/n
    dets = torch.linalg.det(Qs)
    assert_close(dets.abs(), torch.ones_like(dets), atol=1e-12)
    assert (dets > 0).sum() > 180 and (dets < 0).sum() > 180
    SO = torch.stack([get_group("special_orthogonal", 4).sample(generator=gen).matrix() for _ in range(200)])
    assert (torch.linalg.det(SO) > 0).all() and SO.mean(0).abs().max() < 0.18


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "trivial"])
def test_sample_many_draws_distinct_members_reproducibly(name):
    G = get_group(name, 9)
    many = G.sample_many(6, seed=3)
    assert len(many) == 6 and all(G.contains(e) for e in many)
    assert all(torch.equal(a.matrix(), b.matrix()) for a, b in zip(many, G.sample_many(6, seed=3)))
    assert all(not torch.equal(a.matrix(), b.matrix()) for i, a in enumerate(many) for b in many[i + 1:])
    assert G.sample_many(0, seed=3) == []
    with pytest.raises(InvalidOptionError, match="k ≥ 0"):
        G.sample_many(-1)


@pytest.mark.parametrize("name", ["orthogonal", "special_orthogonal", "orthogonal_ones", "gl"])
@pytest.mark.parametrize("n", [1, 2, 5, 8, 33])
def test_a_batch_split_anywhere_draws_the_same_elements(name, n):
    """``sample_many(a)`` then ``sample_many(b)`` from one generator are ``sample_many(a + b)``'s elements: probing
    streams its random bases in chunks sized by the data's shape, and a chunk must not change which bases come
    out (groups/_families.py, ``_element_normals``). The same to rounding, not bit for bit: MKL's batched
    products (GL's U·s·Vᵀ, the reflection that fixes 1) may sum in another order for another batch size
    (measured: ≤ 1.2e-16). n = 5 draws 15 normals per Haar factor, which torch's sampler draws differently
    in a batch without the padding (other elements, O(1) apart)."""
    G = get_group(name, n)
    whole = G.sample_many(7, seed=11)
    g = torch.Generator().manual_seed(11)
    parts = G.sample_many(3, g) + G.sample_many(1, g) + G.sample_many(3, g)
    assert all((a.matrix() - b.matrix()).abs().max() <= 1e-14 * b.matrix().abs().max() for a, b in zip(whole, parts))
    if n > 1:  # the negative control: the next batch is other elements
        assert not torch.equal(G.sample_many(1, g)[0].matrix(), whole[0].matrix())


def test_batched_dense_samplers_are_haar():
    # O(4) drawn 2000 at once: the same moments as one by one (see test_orthogonal_sampling_is_haar)
    Qs = torch.stack([e.matrix() for e in get_group("orthogonal", 4).sample_many(2000, seed=1)])
    assert Qs.mean(0).abs().max() < 0.06 and ((Qs ** 2).mean(0) - 0.25).abs().max() < 0.03
    assert 900 < (torch.linalg.det(Qs) > 0).sum() < 1100
    # rotations fixing 1 are u·uᵀ plus a Haar rotation of 1's complement, so E[R] = u·uᵀ (every entry 1/n)
    Rs = torch.stack([e.matrix() for e in get_group("orthogonal_ones", 4).sample_many(2000, seed=2)])
    ones = torch.ones(4, dtype=torch.float64)
    assert_close(Rs @ ones, ones.expand(2000, 4), atol=1e-12)
    assert_close(Rs @ Rs.mT, torch.eye(4, dtype=torch.float64).expand(2000, 4, 4), atol=1e-12)
    assert (Rs.mean(0) - 0.25).abs().max() < 0.03
    assert 900 < (torch.linalg.det(Rs) > 0).sum() < 1100  # reflections of the complement too
    # GL: log-normal singular values with the group's σ
    s = torch.linalg.svdvals(torch.stack([e.matrix() for e in get_group("gl", 8, sigma=0.5).sample_many(500, seed=0)]))
    assert abs(s.log().std().item() - 0.5) < 0.03 and abs(s.log().mean().item()) < 0.03


def test_lognormal_scales_have_mean_one_and_settable_sigma():
    for sigma in (1.0, 0.3):
        for G in (get_group("relu", 20000, sigma=sigma), intertwiner_group("relu", 20000, sigma=sigma),
                  get_group("positive_diagonal", 20000, sigma=sigma)):
            s = G.sample(seed=0).scale
            assert abs(s.mean().item() - 1.0) < 0.05 and (s > 0).all()
            assert abs(s.log().std().item() - sigma) < 0.03


def test_contains_own_samples_and_rejects_others():
    perm = torch.tensor([1, 2, 0, 4, 3])  # a 3-cycle times a swap: det −1
    el = {"P": ScaledPermutation(perm), "PD+": ScaledPermutation(perm, [2.0, 0.5, 1, 3, 1]),
          "PD±": ScaledPermutation(perm, [1.0, -1, 1, 1, -1]), "PD": ScaledPermutation(perm, [2.0, -1, 0.5, 1, 3]),
          "D+": ScaledPermutation(torch.arange(5), [2.0, 0.5, 1, 3, 1]), "I": identity(5),
          "R": get_group("special_orthogonal", 5).sample(seed=0), "A": get_group("gl", 5).sample(seed=0)}
    el["R-"] = el["R"] @ ScaledPermutation(torch.arange(5), [-1.0, 1, 1, 1, 1])
    members = {"permutation": {"P", "I"}, "scaled_permutation": {"P", "PD+", "D+", "I"},
               "signed_permutation": {"P", "PD±", "I"}, "diagonal_permutation": {"P", "PD+", "PD±", "PD", "D+", "I"},
               "positive_diagonal": {"D+", "I"}, "orthogonal": {"P", "PD±", "R", "R-", "I"},
               "special_orthogonal": {"R", "I"}, "gl": set(el), "trivial": {"I"},
               "orthogonal_ones": {"P", "I"},  # rotations fixing 1: permutations do, sign flips and R do not
               "rotary": set(el),  # with no rotary pairs given, every dimension is free: GL
               "rotary_orthogonal": {"I"}}  # no pairs: ±1 on every dimension (no sign flip above is diagonal)
    assert set(members) == set(FAMILIES)
    for name, inside in members.items():
        G = get_group(name, 5)
        assert {k for k, e in el.items() if G.contains(e)} == inside, name
        assert not G.contains(identity(4))  # wrong n


def test_normed_rotary_group_rotates_free_pairs_flips_rigid_ones_and_signs_the_rest():
    """rotary_orthogonal (a QK space behind per-head q/k RMSNorms): orthogonal draws; on a pair not listed as rigid a
    rotation, on a rigid pair ±I, ±1 on an unpaired dimension. A scaled rotation, a rotation of a rigid pair and a
    mixing of the unpaired dimensions are not members; rigid pairs must be pairs."""
    import math

    G = get_group("rotary_orthogonal", 7, pairs=((0, 3), (1, 4), (2, 5)), rigid=((1, 4),))
    assert G.continuous and G.free == (6,)
    for e in G.sample_many(20, seed=0):
        M = e.matrix()
        assert G.contains(e) and e.orthogonal and torch.allclose(M @ M.T, torch.eye(7, dtype=torch.float64), atol=1e-15)
        assert torch.equal(M[[1, 4]][:, [1, 4]].abs(), torch.eye(2, dtype=torch.float64)) and abs(float(M[6, 6])) == 1
    angles = torch.stack([torch.atan2(e.matrix()[3, 0], e.matrix()[0, 0]) for e in G.sample_many(200, seed=1)])
    assert angles.min() < -2.5 and angles.max() > 2.5  # rotations all round the circle

    def pairs_map(t0, t1, t2, s=1.0, last=1.0):
        M = torch.zeros(7, 7, dtype=torch.float64)
        for (a, b), t in zip(((0, 3), (1, 4), (2, 5)), (t0, t1, t2)):
            M[[a, a, b, b], [a, b, a, b]] = s * torch.tensor([math.cos(t), -math.sin(t), math.sin(t), math.cos(t)], dtype=torch.float64)
        M[6, 6] = last
        return Dense(M)

    assert G.contains(pairs_map(0.3, math.pi, -1.0, last=-1.0))
    assert not G.contains(pairs_map(0.3, 0.5, -1.0))  # the rigid pair turned
    assert not G.contains(pairs_map(0.3, 0.0, -1.0, s=1.5))  # scaled
    assert not G.contains(pairs_map(0.3, 0.0, -1.0, last=2.0))
    assert not get_group("rotary_orthogonal", 4, pairs=((0, 2), (1, 3)), rigid=((0, 2), (1, 3))).continuous
    with pytest.raises(ValueError, match="rigid pairs"):
        get_group("rotary_orthogonal", 4, pairs=((0, 2), (1, 3)), rigid=((0, 1),))


# ------------------------------------------------------------------------------------------- catalogue
@pytest.mark.parametrize("row", CATALOGUE, ids=lambda r: r["activation"])
def test_catalogue_members_pass_and_non_members_fail(row):
    act = row["activation"]
    G = intertwiner_group(act, 6)
    assert (G.name, G.label, G.source, G.activation) == (row["group"], row["label"], "catalogue", act)
    for seed in range(3):
        res = check_intertwiner(act, G.sample(seed=seed), n_samples=1024, seed=seed)
        assert res.passed and res.max_rel_error < 1e-13, res.summary()
    d = degree_of(G.phi)
    for gen in GENERATORS:
        res = check_intertwiner(act, generator_element(gen, 6, degree=d, seed=1), n_samples=1024)
        assert res.passed == (gen in row["members"]), (gen, res.summary())
        assert res.passed or res.max_abs_error > 1e-2  # a failure is gross, not a rounding artefact
    assert set(row["members"]) | set(row["non_members"]) == set(GENERATORS)


@pytest.mark.parametrize("activation, family", [
    ("relu", "special_orthogonal"), ("relu", "signed_permutation"),  # rotation, negation at ReLU
    ("gelu", "scaled_permutation"), ("relu6", "scaled_permutation"), ("sigmoid", "scaled_permutation"),
    ("tanh", "gl"), ("tanh", "scaled_permutation"), ("sigmoid", "signed_permutation"),  # sign flip, no affine
    ("gaussian", "special_orthogonal"), (nn.SiLU(), "signed_permutation")])
def test_named_non_members_fail(activation, family):
    g = get_group(family, 8).sample(seed=1)
    scale = getattr(g, "scale", None)
    assert scale is None or (scale < 0).any() or family == "scaled_permutation"
    res = check_intertwiner(activation, g, n_samples=512)
    assert not res.passed and res.max_abs_error > 1e-2 and res.summary().startswith("FAILED")


@pytest.mark.parametrize("spec, name, phi", [
    (None, "gl", "identity"), (nn.Identity(), "gl", "identity"), ("linear", "gl", "identity"),
    (nn.ReLU(), "scaled_permutation", "identity"), (torch.relu, "scaled_permutation", "identity"),
    (F.relu, "scaled_permutation", "identity"), (nn.LeakyReLU(0.2), "scaled_permutation", "identity"),
    (nn.PReLU(), "scaled_permutation", "identity"), (nn.LeakyReLU(1.0), "gl", "identity"),
    (nn.LeakyReLU(-1.0), "diagonal_permutation", "abs"), (nn.GELU(approximate="tanh"), "permutation", "identity"),
    (F.gelu, "permutation", "identity"), (nn.Mish(), "permutation", "identity"), (nn.ELU(), "permutation", "identity"),
    (nn.SELU(), "permutation", "identity"), (nn.ReLU6(), "permutation", "identity"),
    (nn.Hardswish(), "permutation", "identity"), (nn.Softplus(), "permutation", "identity"),
    (torch.sigmoid, "permutation", "identity"), (F.silu, "permutation", "identity"),
    (nn.Hardtanh(), "signed_permutation", "identity"), (nn.Hardtanh(-2.0, 2.0), "signed_permutation", "identity"),
    (nn.Hardtanh(0.0, 1.0), "permutation", "identity"), (nn.Softsign(), "signed_permutation", "identity"),
    (torch.tanh, "signed_permutation", "identity"), ("exp(-x^2)", "signed_permutation", "abs"),
    ("x^3", "diagonal_permutation", ("power", 3)), ("power:3", "diagonal_permutation", ("power", 3)),
    ("x**2", "diagonal_permutation", ("power", 2)), ("power:1", "gl", "identity"),
    (" Leaky-ReLU ", "scaled_permutation", "identity"), ("GELU_new", "permutation", "identity"),
    ("swish", "permutation", "identity")])
def test_modules_functions_and_spellings_map_to_their_group(spec, name, phi):
    G = intertwiner_group(spec, 5)
    assert (G.name, G.phi, G.source) == (name, phi, "catalogue")
    assert check_intertwiner(spec, G.sample(seed=0), n_samples=512).passed


def test_per_channel_prelu_allows_only_positive_diagonal_scalings():
    prelu = nn.PReLU(6)
    with torch.no_grad():
        prelu.weight.copy_(torch.linspace(0.1, 0.6, 6))
    G = intertwiner_group(prelu, 6)
    assert G.name == "positive_diagonal" and G.activation.startswith("PReLU")
    assert check_intertwiner(prelu, G.sample(seed=0)).passed
    assert not check_intertwiner(prelu, get_group("permutation", 6).sample(seed=0)).passed
    assert prelu.weight.dtype == torch.float32  # the float64 check used a copy
    with pytest.raises(InvalidOptionError, match=r"one slope per channel, so it acts on 6 units, but n=4"):
        intertwiner_group(prelu, 4)


def test_sigmoid_affine_extension_passes_sign_flips_only_with_the_offset():
    for act in ("sigmoid", nn.Hardsigmoid()):
        G = intertwiner_group(act, 8, affine=True)
        assert (G.name, G.source) == ("affine_signed_permutation", "affine extension") and "offset" in G.label
        g = G.sample(seed=0)
        assert (g.scale < 0).any()
        c = G.offset(g)
        assert c.dtype == F64 and c.shape == (8,)
        assert_close(c, (1 - g.scale) / 2)  # c_i = (1 − s_i)/2
        assert check_intertwiner(act, g).passed  # sampled from an affine group: offset found
        assert check_intertwiner(act, g, group=G).passed
        res = check_intertwiner(act, ScaledPermutation(g.perm, g.scale))  # the same matrix, no offset
        assert not res.passed and res.max_abs_error == pytest.approx(1.0, abs=1e-12)
        linear = intertwiner_group(act, 8)
        assert linear.offset(g) is None and not check_intertwiner(act, g, group=linear).passed


@pytest.mark.parametrize("act", ["relu", "tanh", "gelu", "softplus", "gaussian"])
def test_affine_extension_adds_nothing_elsewhere_and_says_so(act):
    G, L = intertwiner_group(act, 4, affine=True), intertwiner_group(act, 4)
    assert (G.name, G.phi, G.source) == (L.name, L.phi, "affine extension")
    assert "adds nothing" in G.label and G.offset(G.sample(seed=0)) is None


def test_catalogue_table_lists_groups_and_non_members():
    frame = catalogue_frame()
    assert {"activation", "group", "label", "phi", "members", "non_members"} <= set(frame.columns)
    rows = {r["activation"]: r for r in CATALOGUE}
    assert {"negation", "rotation"} <= set(rows["relu"]["non_members"])
    assert rows["gaussian"]["phi"] == "abs(A)" and rows["power:3"]["phi"] == "A^⊙3"
    assert rows["sigmoid"]["affine_group"] == "affine_signed_permutation"


# ------------------------------------------------------------------------------------------- discovery
@pytest.mark.parametrize("row", CATALOGUE, ids=lambda r: r["activation"])
def test_discover_group_agrees_with_the_catalogue(row):
    act = row["activation"]
    found, G = discover_group(act, 6, n_samples=512), intertwiner_group(act, 6)
    assert found.members == row["members"], found.to_frame()
    assert (found.group.name, found.group.phi, found.group.source) == (G.name, G.phi, "empirical")
    found_a, G_a = discover_group(act, 6, affine=True, n_samples=512), intertwiner_group(act, 6, affine=True)
    assert found_a.group.name == G_a.name
    g = G_a.sample(seed=0)
    c1, c2 = found_a.group.offset(g), G_a.offset(g)
    assert (c1 is None) == (c2 is None) and (c1 is None or torch.allclose(c1, c2))


# Every parameterised activation of the catalogue, with the values that enlarge its group among the draws.
PARAMETERISED = {
    F.leaky_relu: {"negative_slope": [0.0, 1.0, -1.0, 0.01, 0.3, -0.5, 2.0]},
    F.elu: {"alpha": [0.0, 0.5, 1.0, 2.0, -0.7]},
    F.celu: {"alpha": [0.5, 1.0, 3.0]},
    F.softplus: {"beta": [0.5, 1.0, 3.0, -1.0]},
    F.hardtanh: {"min_val": [-1.0, 0.0, -2.0, -0.5], "max_val": [1.0, 2.0, 6.0, 0.5]},
    torch.clamp: {"min": [None, 0.0, -1.0, float("-inf")], "max": [None, 0.0, 1.0, float("inf")]},
    torch.clamp_min: {"min": [0.0, -1.0, 1.0]},
    torch.clamp_max: {"max": [0.0, -1.0, 1.0]},
    F.softshrink: {"lambd": [0.0, 0.5, 1.5]},
    F.hardshrink: {"lambd": [0.0, 0.5, -1.0]},
    F.threshold: {"threshold": [0.0, -1.0, 1.0, float("-inf")], "value": [0.0, 0.5]},
    F.gelu: {"approximate": ["none", "tanh"]},
}


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_parameterised_activations_get_the_group_their_arguments_give(data):
    """The catalogue reads every argument: its group equals the one found numerically for those values."""
    fn = data.draw(st.sampled_from(list(PARAMETERISED)))
    kwargs = {k: data.draw(st.sampled_from(v)) for k, v in PARAMETERISED[fn].items()}
    if fn is torch.clamp and kwargs["min"] is None and kwargs["max"] is None:
        kwargs["max"] = float("inf")  # torch.clamp needs one bound
    if fn is F.hardtanh and kwargs["min_val"] > kwargs["max_val"]:
        kwargs["min_val"], kwargs["max_val"] = kwargs["max_val"], kwargs["min_val"]
    act = activation_call(fn, (), kwargs)
    G, found = intertwiner_group(act, 6), discover_group(act, 6, n_samples=512)
    assert (G.name, G.phi) == (found.group.name, found.group.phi), (fn.__name__, kwargs, found.summary())
    assert check_intertwiner(act, G.sample(seed=1), n_samples=512).passed


def test_activation_call_refuses_what_it_cannot_read():
    with pytest.raises(InvalidOptionError, match=r"knows no argument 'slope'"):
        activation_call(F.leaky_relu, (), {"slope": 0.2})
    with pytest.raises(InvalidOptionError, match=r"not a plain number"):
        activation_call(F.leaky_relu, (torch.tensor(0.2),))
    with pytest.raises(InvalidOptionError, match=r"binds the input position"):
        intertwiner_group(functools.partial(F.leaky_relu, 0.2), 3)
    with pytest.raises(InvalidOptionError, match=r"no catalogue entry for the function"):
        activation_call(torch.exp, ())


@pytest.mark.parametrize("fn, name, phi", [
    (lambda x: x ** 3 + x, "signed_permutation", "identity"),  # odd, not homogeneous
    (lambda x: torch.where(x > 0, 2 * x, 0.5 * x), "scaled_permutation", "identity"),  # positively homogeneous
    (lambda x: torch.relu(x) ** 2, "scaled_permutation", ("power", 2)),  # Primer's squared ReLU, degree 2
    (lambda x: torch.sin(x * torch.arange(1.0, 7.0, dtype=x.dtype)), "trivial", "identity"),  # units differ
    (lambda x: 2 * x, "gl", "identity")])
def test_discover_group_outside_the_catalogue(fn, name, phi):
    found = discover_group(fn, 6, n_samples=512)
    assert (found.group.name, found.group.phi, found.group.source) == (name, phi, "empirical")
    assert found.activation == "<lambda>" and "empirical" in found.summary()
    for seed in range(2):
        assert check_intertwiner(fn, found.group.sample(seed=seed)).passed
    with pytest.raises(InvalidOptionError, match=r"no catalogue entry for the function '<lambda>'.*discover_group"):
        intertwiner_group(fn, 6)


def test_discover_group_finds_affine_symmetries_of_a_shifted_relu():
    shifted = lambda x: torch.relu(x) + 1  # noqa: E731
    assert discover_group(shifted, 5).group.name == "permutation"
    G = discover_group(shifted, 5, affine=True).group
    assert (G.name, G.source) == ("affine_scaled_permutation", "empirical")
    g = G.sample(seed=0)
    assert check_intertwiner(shifted, g, group=G).passed and check_intertwiner(shifted, g).passed
    assert not check_intertwiner(shifted, ScaledPermutation(g.perm, g.scale)).passed  # no offset


@pytest.mark.parametrize("module", [nn.ReLU(inplace=True), nn.ELU(inplace=True), nn.Hardtanh(inplace=True)])
def test_in_place_modules_are_checked_on_copies(module):
    G = intertwiner_group(module, 5)
    assert check_intertwiner(module, G.sample(seed=0), n_samples=256).passed
    assert discover_group(module, 5, n_samples=256).group.name == G.name


def test_per_channel_prelu_is_discovered_as_positive_diagonal():
    prelu = nn.PReLU(6)
    with torch.no_grad():
        prelu.weight.copy_(torch.linspace(0.1, 0.6, 6))
    found = discover_group(prelu, 6, n_samples=512)
    assert not found.holds["permutation"] and found.holds["positive_scaling"]
    assert found.group.name == intertwiner_group(prelu, 6).name == "positive_diagonal"


# --------------------------------------------------------------------------------------------- reports
def test_reports_render_and_record_their_seed():
    g = get_group("relu", 6).sample(seed=0)
    res = check_intertwiner("relu", g, seed=3, n_samples=256)
    frame = res.to_frame()
    assert len(frame) == 1 and frame.loc[0, "passed"] and frame.loc[0, "seed"] == 3
    assert res.errors.shape == (256,) and "passed" in repr(res) and "<table" in res._repr_html_()
    bad = check_intertwiner("gelu", g, n_samples=256)
    assert not torch.equal(bad.errors, check_intertwiner("gelu", g, seed=1, n_samples=256).errors)
    assert torch.equal(bad.errors, check_intertwiner("gelu", g, n_samples=256).errors)
    f32 = check_intertwiner("sigmoid", get_group("permutation", 6).sample(seed=0), dtype=torch.float32)
    assert f32.passed and f32.dtype == "float32" and f32.tolerance > 1e3 * res.tolerance
    found = discover_group("tanh", 4, affine=True, n_samples=256)
    assert len(found.to_frame()) == len(GENERATORS)  # tanh(0) = 0: no second round
    assert len(discover_group("sigmoid", 4, affine=True, n_samples=256).to_frame()) == 2 * len(GENERATORS)
    for report in (res, bad, found):
        ax = report.plot()
        assert ax.figure is not None
    import matplotlib.pyplot as plt
    plt.close("all")


# -------------------------------------------------------------------------------------------- geodesic
@FAST
@given(n=st.integers(2, 8), seed=st.integers(0, 2**31 - 1), a=st.floats(0, 0.5), b=st.floats(0, 0.5))
def test_geodesic_is_a_one_parameter_group_of_rotations(n, seed, a, b):
    Q = get_group("special_orthogonal", n).sample(seed=seed)
    Qa, Qb, Qab = geodesic(Q, a), geodesic(Q, b), geodesic(Q, a + b)
    assert_close((Qa @ Qb).matrix(), Qab.matrix())
    for R in (Qa, Qab):
        assert_close(R.matrix().T @ R.matrix(), torch.eye(n, dtype=F64), atol=1e-12)
        assert torch.linalg.det(R.matrix()).item() == pytest.approx(1.0, abs=1e-10)
        assert R.orthogonal and get_group("special_orthogonal", n).contains(R)
    assert torch.equal(geodesic(Q, 0.0).matrix(), torch.eye(n, dtype=F64))
    assert_close(geodesic(Q, 1.0).matrix(), Q.matrix())
    dist = [torch.linalg.norm(geodesic(Q, t).matrix() - torch.eye(n, dtype=F64)).item() for t in (0.25, 0.5, 1.0)]
    assert dist[0] <= dist[1] <= dist[2] + 1e-12  # moves steadily away from the identity


@pytest.mark.parametrize("theta", [1e-13, 1e-9, 3e-7])
def test_geodesic_of_a_tiny_rotation_keeps_it(theta):
    """A 2×2 block whose angle was below 1e-12 was read as two 1×1 blocks, so Q¹ came back as the identity (off by
    θ). LAPACK's real Schur form zeroes the subdiagonal of a deflated block: only an exact 0 means no rotation."""
    c, s = math.cos(theta), math.sin(theta)
    Q = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    half = torch.tensor([[math.cos(theta / 2), -math.sin(theta / 2), 0.0], [math.sin(theta / 2), math.cos(theta / 2), 0.0],
                         [0.0, 0.0, 1.0]], dtype=F64)
    assert float((geodesic(Q, 1.0).matrix() - Q).abs().max()) <= 1e-3 * theta
    assert float((geodesic(Q, 0.5).matrix() - half).abs().max()) <= 1e-3 * theta


def test_geodesic_handles_eigenvalue_minus_one():
    U = get_group("orthogonal", 5).sample(seed=2).matrix()
    for Q in (U @ torch.diag(torch.tensor([-1.0, -1, 1, 1, 1], dtype=F64)) @ U.T, -torch.eye(2, dtype=F64)):
        half = geodesic(Q, 0.5)
        assert_close((half @ half).matrix(), Q)
        assert torch.linalg.det(half.matrix()).item() == pytest.approx(1.0)
    assert_close(geodesic(torch.eye(3).numpy(), 0.3).matrix(), torch.eye(3, dtype=F64))


def test_geodesic_refuses_reflections_and_non_rotations():
    Q = get_group("orthogonal", 4).sample(seed=0)
    Q = Q if torch.linalg.det(Q.matrix()) < 0 else Q @ ScaledPermutation(torch.arange(4), [-1.0, 1, 1, 1])
    with pytest.raises(InvalidOptionError, match=r"det −1.*Sample from 'special_orthogonal'"):
        geodesic(Q, 0.5)
    with pytest.raises(ValueError, match=r"needs an orthogonal Q"):
        geodesic(get_group("gl", 4).sample(seed=0), 0.5)
    with pytest.raises(InvalidOptionError, match=r"square"):
        geodesic(torch.ones(2, 3), 0.5)


# ---------------------------------------------------------------------------------------------- errors
def test_unknown_activation_names_suggest_the_nearest():
    with pytest.raises(InvalidOptionError, match=r"unknown activation 'relu7'; did you mean 'relu6'.*known: \[.*"
                                                  r"for an activation not in the catalogue use wb.discover_group"):
        intertwiner_group("relu7", 4)
    with pytest.raises(ValueError, match=r"did you mean 'gelu_new'"):
        intertwiner_group("gelu_neww", 4)


def test_unknown_modules_and_objects_are_refused_clearly():
    with pytest.raises(InvalidOptionError, match=r"no catalogue entry for the module Softmax.*discover_group"):
        intertwiner_group(nn.Softmax(dim=-1), 4)
    with pytest.raises(TypeError, match=r"an activation is a name such as 'relu'.*got int 42"):
        intertwiner_group(42, 4)


@pytest.mark.parametrize("n", [0, -3, "8", 2.5, True])
def test_bad_n_is_refused(n):
    with pytest.raises(InvalidOptionError, match=r"intertwiner_group\('relu', n=.*\): n is the number of hidden units"):
        intertwiner_group("relu", n)


def test_other_bad_inputs_are_refused():
    with pytest.raises(InvalidOptionError, match=r"discover_group needs n ≥ 2 units"):
        discover_group("relu", n=1)
    with pytest.raises(InvalidOptionError, match=r"integer d ≥ 1"):
        intertwiner_group("x^1.5", 4)
    with pytest.raises(InvalidOptionError, match=r"integer d ≥ 1"):
        intertwiner_group("power:0", 4)
    with pytest.raises(InvalidOptionError, match=r"needs a group element"):
        check_intertwiner("relu", torch.eye(3))
    with pytest.raises(InvalidOptionError, match=r"is not elementwise"):
        check_intertwiner(lambda x: x.sum(-1, keepdim=True), identity(3))
    with pytest.raises(InvalidOptionError, match=r"acts on 3 dimensions, but this place has 4"):
        check_intertwiner("relu", identity(4), group=get_group("relu", 3))
    with pytest.raises(InvalidOptionError, match=r"generator='flip' is not a valid option.*'negation'"):
        generator_element("flip", 4)


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_scaled_permutation_act_into_out_is_its_matrix(dim):
    """``act(x, dim, out=…)`` (how a transform writes each expert's slice of a mixture's weights in place) gives the
    same values as ``act`` and as the element's matrix along ``dim``; ``out`` is the tensor returned."""
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    n = x.shape[dim]
    e = ScaledPermutation(torch.randperm(n, generator=g), torch.randn(n, generator=g, dtype=torch.float64))
    out = torch.empty_like(x)
    got = e.act(x, dim, out=out)
    assert got is out and torch.equal(got, e.act(x, dim))
    want = torch.movedim(torch.tensordot(e.matrix(), torch.movedim(x, dim, 0), dims=1), 0, dim)
    assert torch.allclose(got, want, rtol=0, atol=1e-14)
