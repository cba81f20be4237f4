"""verify's faster paths (issue 21, target 3) give the numbers and verdicts of the plain ones.

- the one-pass site check (workbench/symmetry/_verify_kernel.py) against the four norms computed here in
  float64, and verify with it against verify with torch's kernels, on every kind of hook point it takes
  (channels, flattened blocks, token-wise axes, offsets, sign flips), and a NaN reaching it;
- the float32 and float64 copies the worst rows' floor reuses (workbench/symmetry/_verify_floor.py): a
  weight changed in place (also through ``.data``, which moves no version counter), an attribute changed,
  and a cache made blind on purpose, each between two verifies, against expectations computed here.
"""
import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import workbench as wb
import workbench.symmetry._verify_floor as floor
import workbench.symmetry._verify_kernel as vk
from test_verdicts import deep_bn_cnn
from workbench.groups import Dense, ScaledPermutation
from workbench.symmetry._backend import Move

pytest.importorskip("numba")
ROWS_RULE = "most different rows"


def direct(h_new, h, move):
    """[‖h' − F·h − c‖, ‖h' − h‖, ‖h‖, ‖F·h + c‖] in float64, with torch, from the move's own recipe."""
    h_new, h = h_new.double(), h.double()
    want = move.apply(h)
    norm = torch.linalg.vector_norm
    return [norm(h_new - want).item(), norm(h_new - h).item(), norm(h).item(), norm(want).item()]


@settings(max_examples=40, deadline=None)
@given(A=st.integers(1, 4), n=st.integers(1, 9), K=st.integers(1, 40), dtype=st.sampled_from([torch.float32, torch.float64]),
       scaled=st.booleans(), offset=st.booleans(), seed=st.integers(0, 10_000))
def test_the_one_pass_sums_equal_torchs_norms(A, n, K, dtype, scaled, offset, seed):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    scale = (torch.rand(n, generator=g, dtype=torch.float64) + 0.5) * torch.where(torch.rand(n, generator=g) < 0.3, -1, 1)
    F = ScaledPermutation(perm, scale if scaled else None)
    move = Move(F, (A, n, K), 1, torch.randn(n, generator=g, dtype=torch.float64) if offset else None, 1)
    h = torch.randn(A, n, K, generator=g, dtype=dtype)
    h_new = move.apply(h) + 1e-3 * torch.randn(A, n, K, generator=g, dtype=dtype)
    run = vk.one_pass(move, h, small=True)
    assert run is not None
    got, want = run.sums(h_new, h), direct(h_new, h, move)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_a_nan_or_an_infinity_reaches_the_sums():
    n = 8
    move = Move(ScaledPermutation(torch.randperm(n)), (2, n, 600), 1, None, 1)
    h = torch.randn(2, n, 600)
    for bad in (float("nan"), float("inf")):
        h_new = move.apply(h)
        h_new[1, 3, 7] = bad
        sums = vk.one_pass(move, h).sums(h_new, h)
        assert not np.isfinite(sums[0]) and not np.isfinite(sums[1])


def test_the_loop_declines_what_it_does_not_cover():
    n = 16
    F = ScaledPermutation(torch.randperm(n))
    move = Move(F, (8, n, 64), 1, None, 1)
    h = torch.randn(8, n, 64)
    run = vk.one_pass(move, h)
    assert run is not None
    assert run.sums(h.transpose(0, 2).contiguous().transpose(0, 2), h) is None  # not contiguous
    assert run.sums(h.double(), h) is None  # another dtype
    assert vk.one_pass(move, h.half()) is None
    assert vk.one_pass(move, h[:, :, ::2]) is None  # a view of another size / not contiguous
    assert vk.one_pass(move, torch.randn(2, n, 4)) is None  # too small to repay the call
    assert vk.one_pass(Move(Dense(torch.eye(n, dtype=torch.float64)), (8, n, 64), 1, None, 1), h) is None
    bad = ScaledPermutation(torch.arange(n))
    bad.perm[0] = n  # an index the unchecked loop would read outside the activation
    assert vk.one_pass(Move(bad, (8, n, 64), 1, None, 1), h) is None


@pytest.fixture
def kernel_everywhere(monkeypatch):
    """verify with the loop on every hook point it covers, whatever its size."""
    monkeypatch.setattr(vk, "MIN_NUMEL", 0)


def checks(report):
    return {s.site: (s.equivariance_error, s.representation_change, s.observations) for s in report.sites}


def verify_both_ways(monkeypatch, *args, **kwargs):
    """(report with the compiled loop, report with torch's kernels only)."""
    with monkeypatch.context() as m:
        m.setattr(vk, "MIN_NUMEL", 0)
        fast = wb.verify(*args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(vk, "_state", {"tried": True, "kernel": None})
        plain = wb.verify(*args, **kwargs)
    return fast, plain


def same_checks(fast, plain, rel):
    a, b = checks(fast), checks(plain)
    assert a.keys() == b.keys()
    for site in a:
        assert a[site][2] == b[site][2] > 0, site
        assert a[site][1] == pytest.approx(b[site][1], rel=rel)
        # the equivariance error is rounding: equal to the rounding of the expected value (float32 in torch,
        # float64 in the loop), so compared against the tolerance, not to each other's digits
        assert max(a[site][0], b[site][0]) <= fast.tolerance


def test_verify_with_the_loop_equals_verify_with_torch_on_a_cnn_with_pools_and_a_flatten(monkeypatch):
    model = deep_bn_cnn()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    new, t = wb.random_intertwiner(model, seed=1, example=x)
    fast, plain = verify_both_ways(monkeypatch, model, new, x, transform=t, tolerance=1e-4)
    assert fast.verdict == plain.verdict == "PASS"
    same_checks(fast, plain, 1e-5)
    assert any(o.block > 1 for s in wb.symmetry_map(model, x[:1]) for o in s.observed)  # a flattened block: covered


def test_verify_with_the_loop_equals_verify_with_torch_with_offsets_and_sign_flips(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 64), nn.Sigmoid(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3)).double().eval()
    new, t = wb.random_intertwiner(model, seed=4, affine=True)
    assert any((e.scale < 0).any() for e in t.elements.values())
    x = torch.randn(100, 5, dtype=torch.float64)
    fast, plain = verify_both_ways(monkeypatch, model, new, x, transform=t)
    assert fast.verdict == plain.verdict == "PASS"
    same_checks(fast, plain, 1e-9)
    # the offsets are needed: without them the same flips move the function, and the loop sees it at the sites
    # (declared forced: apply_transform refuses to replay an element outside the site's group otherwise)
    flips = wb.Transform(t.elements, t.groups, forced=list(t.elements), seed=4, model=t.model, affine=False)
    broken = wb.apply_transform(model, flips)
    fast, plain = verify_both_ways(monkeypatch, model, broken, x, transform=t)
    assert fast.verdict == plain.verdict == "FAIL" and not fast.equivariant and not plain.equivariant


def test_verify_with_the_loop_equals_verify_with_torch_on_token_wise_sites(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(4, 50, 6)  # [batch, tokens, features]: the sites act on the last axis
    new, t = wb.random_intertwiner(model, seed=3, example=x)
    fast, plain = verify_both_ways(monkeypatch, model, new, x, transform=t)
    assert fast.verdict == plain.verdict == "PASS"
    same_checks(fast, plain, 1e-5)


@pytest.mark.slow
def test_a_forced_non_symmetry_fails_with_the_loop(kernel_everywhere):
    """Negative control: an element forced onto a site it does not preserve, and a 1e-3 nudge of a weight."""
    model = deep_bn_cnn()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    new, t = wb.random_intertwiner(model, seed=0, example=x)
    out = nudged = copy.deepcopy(new)
    with torch.no_grad():
        out[-1].weight[3].mul_(1 + 1e-3)
        assert (out(x) - new(x)).abs().max() > 1e-4 * new(x).abs().max()  # computed here: the function moved
    assert wb.verify(model, out, x, transform=t).verdict == "FAIL"
    # a conv row 1e-3 off: the outputs move by ~2e-6 only (under the floor), the site right after it moves more
    nudged = copy.deepcopy(new)
    with torch.no_grad():
        nudged[3].weight[3].mul_(1 + 1e-3)
        h, h_nudged, want = new[:4](x).double(), nudged[:4](x).double(), new[:4](x).double()
        h_nudged[:, 3] /= 1 + 1e-3
        assert torch.allclose(h_nudged, h, rtol=1e-5, atol=1e-6)  # the nudge is all that differs there
    report = wb.verify(model, nudged, x, transform=t)
    assert report.verdict == "FAIL" and not report.equivariant, report.summary()
    site = next(s for s in wb.symmetry_map(model, x[:1]) if s.name in t.elements)
    g = torch.Generator().manual_seed(5)
    forced = wb.Transform({site.name: ScaledPermutation(torch.randperm(site.n, generator=g),
                                                        torch.rand(site.n, generator=g, dtype=torch.float64) - 0.5)},
                          {site.name: "forced"}, forced=[site.name], seed=0, model=t.model)
    broken = wb.apply_transform(model, forced)
    with torch.no_grad():  # computed here: the forced element moves the function
        assert (broken(x) - model(x)).abs().max() > 1e-3 * model(x).abs().max()
    assert wb.verify(model, broken, x, transform=forced).verdict == "FAIL"


# ------------------------------------------------------------------ the copies the worst rows' floor reuses
@pytest.fixture
def deep():
    model, x = deep_bn_cnn(), torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    new, t = wb.random_intertwiner(model, seed=0, example=x)
    floor._COPIES.clear()
    return model, x, new, t


def copies_of(model):
    entry = floor._COPIES.get(id(model))
    return None if entry is None or entry[0]() is not model else entry[2:4]


def test_the_copies_are_reused_while_the_model_is_unchanged(deep, monkeypatch):
    model, x, new, t = deep
    first = wb.verify(model, new, x, transform=t)
    assert ROWS_RULE in first.rule and first.verdict == "PASS"
    kept = copies_of(model)
    assert kept is not None
    made = []
    real = copy.deepcopy
    monkeypatch.setattr(floor.copy, "deepcopy", lambda *a, **k: made.append(1) or real(*a, **k))
    second = wb.verify(model, new, x, transform=t)
    assert not made and copies_of(model)[0] is kept[0]  # no copy made: the same objects ran
    assert (second.verdict, second.tolerance, second.max_rel_diff) == (first.verdict, first.tolerance, first.max_rel_diff)


@pytest.mark.parametrize("how", [pytest.param("no_grad", marks=pytest.mark.slow), "data",
                                 pytest.param("attribute", marks=pytest.mark.slow)])
def test_a_change_between_two_verifies_is_never_hidden_by_the_copies(deep, how):
    """The stale-cache adversary: verify (copies kept), change the original model in place, verify again. The
    copies must be made again (their weights equal the changed model's), and the verdict must follow the
    change: the exact transform of the unchanged model is no longer one of the changed model (FAIL), which
    the test computes itself."""
    model, x, new, t = deep
    assert wb.verify(model, new, x, transform=t).verdict == "PASS"
    before = copies_of(model)
    if how == "no_grad":
        with torch.no_grad():
            model[0].weight[2].mul_(1.5)
    elif how == "data":
        version = model[0].weight._version
        model[0].weight.data[2].mul_(1.5)
        assert model[0].weight._version == version  # the adversary: no version counter moved
    else:
        model[1].eps = 0.5  # a plain attribute, no tensor touched
    with torch.no_grad():
        moved = ((model(x) - new(x)).abs().max() / model(x).abs().max()).item()
    assert moved > 1e-4  # computed here: the two models now differ
    report = wb.verify(model, new, x, transform=t)
    assert report.verdict == "FAIL", report.summary()
    after = copies_of(model)
    if after is not None:
        assert after[0] is not before[0]
        for a, b in zip(floor._tensors(model), floor._tensors(after[0])):
            assert torch.equal(a, b)
        assert after[0][1].eps == model[1].eps


def test_an_exact_transform_of_the_changed_model_passes_after_the_change(deep):
    model, x, new, t = deep
    assert wb.verify(model, new, x, transform=t).verdict == "PASS"
    model[0].weight.data.mul_(1.5)  # through .data: invisible to version counters
    new2 = wb.apply_transform(model, t)
    report = wb.verify(model, new2, x, transform=t)
    assert report.verdict == "PASS", report.summary()
    assert torch.equal(copies_of(model)[0][0].weight, model[0].weight)


def test_a_blind_cache_still_cannot_carry_a_stale_floor(deep, monkeypatch):
    """If the checks of the copies missed a change (made blind here on purpose), the rows' floor is still not
    used: the float32 copy's outputs on the rows disagree with the caller's model's beyond that floor, so the
    whole batch is measured on fresh copies, and the verdict is the one computed here."""
    model, x, new, t = deep
    assert wb.verify(model, new, x, transform=t).verdict == "PASS"
    monkeypatch.setattr(floor, "_same_values", lambda a, b: True)
    monkeypatch.setattr(floor, "_structure", lambda m: "blind")
    floor._COPIES[id(model)] = floor._COPIES[id(model)][:1] + ("blind",) + floor._COPIES[id(model)][2:]
    with torch.no_grad():
        model[0].weight.mul_(1.01)
    new2 = wb.apply_transform(model, t)  # an exact transform of the changed model
    stale = copies_of(model)[0]
    assert not torch.equal(stale[0].weight, model[0].weight)  # the kept copy is stale
    report = wb.verify(model, new2, x, transform=t)
    assert report.verdict == "PASS" and ROWS_RULE not in report.rule, report.rule  # the whole batch decided
    nudged = copy.deepcopy(new2)
    with torch.no_grad():
        nudged[-1].weight[3].mul_(1 + 1e-3)
    assert wb.verify(model, nudged, x, transform=t).verdict == "FAIL"


def test_the_copies_do_not_outlive_the_model():
    import gc

    floor._COPIES.clear()
    model, x = deep_bn_cnn(), torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    new, t = wb.random_intertwiner(model, seed=0, example=x)
    assert ROWS_RULE in wb.verify(model, new, x, transform=t).rule
    assert id(model) in floor._COPIES
    ident = id(model)
    del model, new
    gc.collect()
    assert ident not in floor._COPIES


def test_the_original_and_the_new_model_keep_their_copies_side_by_side():
    """A verify measures the original's floor and, where that does not carry the verdict, the new model's: both
    pairs of copies stay (the least recently used of three goes)."""
    floor._COPIES.clear()
    a, b, c = (nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3))
    first_a, first_b = floor._copies(a), floor._copies(b)
    assert floor._copies(a)[0] is first_a[0] and floor._copies(b)[1] is first_b[1]
    floor._copies(c)  # a is now the least recently used
    assert floor._copies(b)[0] is first_b[0] and floor._copies(a)[0] is not first_a[0]
    assert first_a[0][0].weight.dtype == torch.float32 and first_a[1][0].weight.dtype == torch.float64
