"""A parameter port's moves composed before they touch the tensor (workbench/symmetry/_port_moves.py), GL draws that
keep their exact inverse (``Dense.inv``, ``Dense.cond``), and the precision a dense product runs in.

Every composed result is checked against the moves done one at a time in float64 (``_act_slice``, the path they
replace); the float32 products against the exact product, entrywise, with the bound the module's docstring argues;
the transformed models directly in float64, with negative controls that must move the outputs."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

import workbench as wb
from workbench.groups import Dense, ScaledPermutation, element_from_dict, get_group
from workbench.symmetry import _port_moves as pm
from workbench.symmetry._port_moves import _act_slice, _Tiled
from workbench.symmetry._layout_push import HeadPermutation

F64 = torch.float64


# ------------------------------------------------------------------ GL draws keep their exact inverse
@pytest.mark.parametrize("n", [1, 5, 64])
def test_gl_draws_carry_their_inverse_and_condition_number(n):
    for e in get_group("gl", n, sigma=1.0).sample_many(6, seed=n):
        eye = torch.eye(n, dtype=F64)
        assert torch.allclose(e.M @ e.inverse().M, eye, atol=1e-13 * e.cond, rtol=0)
        assert torch.allclose(e.inverse().M, torch.linalg.inv(e.M), atol=1e-12 * e.cond, rtol=0)
        assert e.cond == pytest.approx(float(torch.linalg.cond(e.M)), rel=1e-9)
        assert torch.equal(e.inverse().inverse().M, e.M)  # no second inversion: the same matrix back
        dual = e.inverse().transpose()  # what a reader moves by: (M⁻¹)ᵀ
        assert torch.allclose(dual.M.T @ e.M, eye, atol=1e-13 * e.cond, rtol=0) and dual.cond == e.cond


def test_the_inverse_and_condition_number_survive_a_round_trip_and_a_hand_made_element_has_neither():
    e = get_group("gl", 7).sample(seed=3)
    back = element_from_dict(json.loads(json.dumps(e.to_dict())))
    assert torch.equal(back.M, e.M) and torch.equal(back.inverse().M, e.inverse().M) and back.cond == e.cond
    hand = Dense(e.M.clone())  # no factors: inverted by LU, condition unknown, so never a float32 product
    assert hand.cond is None and "inverse" not in hand.to_dict()
    assert torch.allclose(hand.inverse().M, e.inverse().M, atol=1e-12, rtol=0)
    assert not pm.dense_ok(hand, torch.float32) and pm.dense_ok(e, torch.float32)
    q = get_group("orthogonal", 7).sample(seed=1)
    assert q.cond == 1.0 and torch.equal(q.inverse().M, q.M.T)


def test_same_seed_same_gl_elements_as_before_the_factored_inverse():
    """The draw itself is unchanged: M = U·diag(s)·Vᵀ from the same generator stream."""
    G = get_group("gl", 6, sigma=0.7)
    a = G.sample_many(3, seed=11)
    assert all(torch.equal(x.M, y) for x, y in zip(a, G._matrices(3, torch.Generator().manual_seed(11))))


# ------------------------------------------------------------------ composition equals the moves one by one
def _move(kind: str, L: int, g: torch.Generator):
    """A random move on an axis of length L: (F, slice)."""
    if kind == "perm":
        return ScaledPermutation(torch.randperm(L, generator=g)), None
    if kind == "signed":
        s = torch.where(torch.rand(L, generator=g) < 0.5, -1.0, 1.0).double()
        return ScaledPermutation(torch.randperm(L, generator=g), s * torch.exp(torch.randn(L, generator=g, dtype=F64))), None
    if kind == "heads":  # whole blocks of 2 on the first half
        return HeadPermutation(ScaledPermutation(torch.randperm(L // 4, generator=g)), 2), (0, L // 2)
    if kind == "tiled":
        return _Tiled(ScaledPermutation(torch.randperm(L // 2, generator=g)), 2), None
    n, k = 2, int(torch.randint(0, L // 2, (1,), generator=g))
    if kind == "block":  # a dense map on an aligned block of 2
        return Dense(torch.randn(n, n, generator=g, dtype=F64) + 3 * torch.eye(n, dtype=F64), cond=5.0), (2 * k, 2 * k + n)
    # "odd": a dense map on a block that may straddle the others (the fallback path)
    start = int(torch.randint(0, L - 3, (1,), generator=g))
    return Dense(torch.randn(3, 3, generator=g, dtype=F64) + 3 * torch.eye(3, dtype=F64)), (start, start + 3)


@settings(max_examples=60, deadline=None)
@given(kinds=st.lists(st.tuples(st.integers(0, 1), st.sampled_from(["perm", "signed", "heads", "tiled", "block", "odd"])),
                      min_size=1, max_size=8),
       dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 1000))
def test_composed_moves_equal_the_moves_one_by_one(kinds, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    L0, L1 = 8, 12
    own = torch.randn(L0, L1, generator=g, dtype=F64).to(dtype)
    before = own.clone()
    moves, expect = pm.Moves(own), own.double().clone()
    for axis, kind in kinds:
        F, sl = _move(kind, (L0, L1)[axis], g)
        moves.add(F, axis, sl)
        expect = _act_slice(expect, F, axis, sl, False)
    got = moves.value(F64)
    # rounding scales with the entries: repeated dense moves on one block grow them to ~10⁴ (hypothesis seed 150),
    # where the two float64 orders of products differ by ~1e-12 absolute, ~1 ulp of the largest entry
    scale = max(1.0, float(expect.abs().max()))
    assert torch.allclose(got, expect, atol=1e-13 * scale, rtol=0)
    if moves.bound is not None:  # what lets a copy skip its range check must bound the result
        assert float(got.abs().max()) <= moves.bound * (1 + 1e-12)
    out = torch.empty_like(own)
    written = moves.value(out=out)  # in the tensor's own dtype where allowed, written into ``out``
    assert torch.allclose(out.double(), expect, atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=1e-5)
    assert written.dtype in (dtype, F64)
    assert torch.equal(own, before)  # the model's own tensor is never written


def test_a_packed_projection_takes_one_gather_and_one_batched_product():
    """The in-projection of a 3-head attention: per-head maps on q, k, v blocks, then the head permutation, and the
    stream's signed permutation on the columns — composed into one axis operator per axis (no fallback)."""
    g = torch.Generator().manual_seed(0)
    H, dh, d = 3, 4, 10
    W = torch.randn(3 * H * dh, d, generator=g, dtype=F64)
    moves, expect = pm.Moves(W), W.clone()
    stream = ScaledPermutation(torch.randperm(d, generator=g), torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0).double())
    steps = [(stream.inverse().transpose(), 1, None)]
    for h, e in enumerate(get_group("gl", dh).sample_many(2 * H, seed=1)[:H]):
        steps += [(e, 0, (h * dh, (h + 1) * dh)), (e.inverse().transpose(), 0, (H * dh + h * dh, H * dh + (h + 1) * dh))]
    perm = HeadPermutation(ScaledPermutation(torch.tensor([2, 0, 1])), dh)
    steps += [(perm, 0, (s * H * dh, (s + 1) * H * dh)) for s in range(3)]
    for F, axis, sl in steps:
        moves.add(F, axis, sl)
        expect = _act_slice(expect, F, axis, sl, False)
    assert set(moves.axes) == {0, 1} and moves.base is W  # nothing was done yet: every move composed
    assert len(moves.axes[0].blocks) == 2 * H and moves.axes[1].idx is not None
    assert torch.allclose(moves.value(), expect, atol=1e-12, rtol=0)


# ------------------------------------------------------------------ which precision a product runs in
def test_float32_products_only_for_well_conditioned_known_maps_on_float32_weights():
    good = get_group("gl", 8, sigma=0.5).sample(seed=0)
    bad = Dense(torch.diag(torch.logspace(0, 6, 8, dtype=F64)), cond=1e6)
    unknown = Dense(good.M.clone())
    W = torch.randn(16, 8)
    for e, want in ((good, torch.float32), (bad, F64), (unknown, F64)):
        m = pm.Moves(W)
        m.add(e, 1, None)
        assert m.value().dtype == want
    for dtype in (F64, torch.float16, torch.bfloat16):  # float64 stays float64; half precisions compute in float64
        m = pm.Moves(W.to(dtype))
        m.add(good, 1, None)
        assert m.value().dtype == F64
    m = pm.Moves(W.half())  # a permutation alone is exact in any dtype
    m.add(ScaledPermutation(torch.randperm(8)), 1, None)
    assert m.value().dtype == torch.float16


def test_a_float32_product_errs_within_the_bound_of_the_argument():
    """|W'₃₂ − A·W| ≤ γ_n·|A|·|W| + u·|A·W| entrywise (module docstring), on a ViT-sized block."""
    g = torch.Generator().manual_seed(0)
    A = get_group("gl", 64, sigma=1.0).sample(seed=2)
    W = torch.randn(64, 768, generator=g)
    m = pm.Moves(W)
    m.add(A, 0, None)
    got = m.value()
    assert got.dtype == torch.float32
    exact = A.M @ W.double()
    u = 2.0 ** -24
    bound = (64 * u / (1 - 64 * u)) * (A.M.abs() @ W.double().abs()) + u * exact.abs()
    assert bool(((got.double() - exact).abs() <= bound + 1e-30).all())


# ------------------------------------------------------------------ whole models
def _vit(dtype):
    pytest.importorskip("torchvision")
    from workbench.models import ensure_torchvision_importable, require

    ensure_torchvision_importable()
    model = require("torchvision").models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                             hidden_dim=16, mlp_dim=32, num_classes=5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = name.endswith("weight") and p.ndim == 1
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 0.5) + (1.0 if gain else 0.0))
    return model.eval().to(dtype)


def _changed(a, b, x):
    with torch.no_grad():
        ya, yb = a(x).double(), b(x).double()
    return float(((ya - yb).abs() / ya.abs().amax(0)).max())


def test_a_float32_vit_transform_stays_within_its_own_rounding_and_float64_stays_exact():
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=F64)
    m64 = _vit(F64)
    new64, t = wb.random_intertwiner(m64, seed=0, example=x)
    assert _changed(m64, new64, x) < 1e-10
    m32 = _vit(torch.float32)
    new32 = wb.apply_transform(m32, t, example=x.float())
    x32 = x.float()
    with torch.no_grad():
        ref = m64(x32.double())  # the exact function at the float32 inputs
        own = float(((m32(x32).double() - ref).abs() / ref.abs().amax(0)).max())  # the float32 model's own rounding
        err = float(((new32(x32).double() - ref).abs() / ref.abs().amax(0)).max())
    assert err < max(50 * own, 1e-5)
    assert wb.verify(m32, new32, x.float(), transform=t).verdict == "PASS"
    # a negative control: the same elements with one head's key map left out must move the outputs
    qk = next(n for n in t.elements if ".qk." in n)
    site = wb.symmetry_map(m64, x[:1])[qk]
    key = next(p for p in site.readers if "bias" not in p.name)
    param, rows = key.name.split("[")
    a, b = map(int, rows.rstrip("]").split(":"))
    with torch.no_grad():
        dict(new32.named_parameters())[param][a:b] = dict(m32.named_parameters())[param][a:b]
    assert _changed(m32, new32, x.float()) > 1e-3


def test_a_float16_vit_still_refuses_what_it_cannot_hold():
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    m16 = _vit(torch.float16)
    with pytest.raises(ValueError, match="beyond torch.float16's largest value"):
        wb.random_intertwiner(m16, seed=0, scale_sigma=6.0, example=x.half())
    before = {k: v.clone() for k, v in m16.state_dict().items()}
    with pytest.raises(ValueError, match="beyond torch.float16's largest value"):
        wb.random_intertwiner(m16, seed=0, scale_sigma=6.0, example=x.half(), inplace=True)
    assert all(torch.equal(before[k], v) for k, v in m16.state_dict().items())  # nothing was written


def test_the_bound_that_spares_a_copy_its_range_check_bounds_the_result():
    """The compiled gather reports max|W| as it reads it, and the bound built on it must bound the result; torch's
    path (no numba, or WORKBENCH_NUMBA=0) reports nothing, and then no bound may be claimed (the copy's range
    check then reads the result itself). Either way the value is the moves done one by one."""
    from workbench.symmetry import _kernels

    compiled = _kernels._kernels() is not None
    g = torch.Generator().manual_seed(3)
    W = torch.randn(256, 128, generator=g) * 100
    m = pm.Moves(W)
    p, s = torch.randperm(128, generator=g), torch.rand(128, generator=g, dtype=F64) * 4 - 2
    m.add(ScaledPermutation(p, s), 1, None)
    elements = get_group("gl", 64, sigma=1.0).sample_many(4, seed=0)
    for h, e in enumerate(elements):
        m.add(e, 0, (64 * h, 64 * (h + 1)))
    out = torch.empty_like(W)
    v = m.value(out=out)
    assert v is out
    if compiled:
        assert m.bound is not None and float(out.abs().max()) <= m.bound
    else:
        assert m.bound is None
    expected = W.double()[:, p] * s[None, :]
    for h, e in enumerate(elements):
        expected[64 * h:64 * (h + 1)] = e.M @ expected[64 * h:64 * (h + 1)]
    assert torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-3 * float(expected.abs().max()))


def test_a_tiled_map_that_cannot_compose_is_applied_once():
    """A tiled dense map (Swin's patch merging: blockdiag(F, F)) whose second block straddles a block already
    pending on the axis cannot be composed; its first block had already been inserted, so the fallback (the pending
    moves done, then the map whole) applied that block twice (helper 21 found it by reading; no model reaches it
    today). Checked against the moves done one at a time, in float64."""
    from workbench.groups import Dense
    from workbench.symmetry._port_moves import Moves, _Tiled

    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 5, dtype=torch.float64, generator=g)
    B = Dense(torch.randn(2, 2, dtype=torch.float64, generator=g) + 2 * torch.eye(2, dtype=torch.float64))
    F = Dense(torch.randn(4, 4, dtype=torch.float64, generator=g) + 3 * torch.eye(4, dtype=torch.float64))
    moves = Moves(W)
    moves.add(B, 0, (4, 6))  # pending block on rows 4-5
    moves.add(_Tiled(F, 2), 0, None)  # rows 0-3 compose, rows 4-7 straddle the pending block
    expected = W.clone()
    expected[4:6] = B.M @ expected[4:6]
    expected = torch.cat([F.M @ expected[:4], F.M @ expected[4:]])
    assert torch.allclose(moves.value(torch.float64), expected, rtol=0, atol=1e-12)
