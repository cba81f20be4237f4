"""The Haar draw's QR (workbench/groups/_haar.py): the compiled Householder loop against LAPACK's QR, its law,
and the torch fallback.

Q and sign(diag R) of an invertible G are unique, so the compiled loop must give LAPACK's Q to rounding: the
bound is the QR factor's own sensitivity, κ(G)·ε (measured: ≤ 2.4·κ·ε at n = 2, ≤ 0.21·κ·ε at n = 64; the
test allows 10·κ·ε). A wrong reflector sign, a wrong τ or a mis-ordered accumulation moves Q by O(1).
Nothing here is timed (the speed is measured by hand; see the module docstring of _haar_numba).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from workbench._errors import InvalidOptionError, MissingDependencyError
from workbench.groups import _haar, get_group
from workbench.groups._families import _haar as haar_draw, _normal

F64 = torch.float64
EPS = torch.finfo(F64).eps


def gaussians(k: int, n: int, seed: int) -> torch.Tensor:
    return _normal((k, n, n), torch.Generator().manual_seed(seed))


def lapack(G: torch.Tensor):
    Q, R = torch.linalg.qr(G)
    return Q, torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)


@pytest.fixture
def numba_off(monkeypatch):
    """numba absent, as in an install without the ``fast`` extra."""
    monkeypatch.setattr(_haar, "_state", {"kernel": None, "tried": True})


@pytest.fixture
def kernel():
    pytest.importorskip("numba")
    if _haar._kernel() is None:
        pytest.skip("the compiled Haar QR is off (WORKBENCH_NUMBA=0)")


# ------------------------------------------------------------------ the compiled loop is LAPACK's QR, to rounding
@pytest.mark.parametrize("n, k", [(1, 5), (2, 400), (3, 200), (4, 200), (7, 100), (8, 100), (9, 60), (17, 30),
                                  (64, 40), (65, 8), (128, 4), (200, 2)])
def test_compiled_qr_equals_lapacks_for_the_same_gaussians(kernel, n, k):
    G = gaussians(k, n, seed=n)
    Q, d = _haar.haar_qr(G, fast=True)
    Q0, d0 = lapack(G)
    assert Q.shape == (k, n, n) and d.shape == (k, 1, n) and Q.dtype == d.dtype == F64
    assert torch.equal(d, d0)  # every sign of R's diagonal as LAPACK's
    err = (Q * d - Q0 * d0).abs().amax((-2, -1))
    assert (err <= 10 * torch.linalg.cond(G) * EPS).all(), (err / (torch.linalg.cond(G) * EPS)).max()
    # as orthogonal as LAPACK's Q (measured: max |QᵀQ − I| 1.6e-15 against LAPACK's 1.8e-15 at n = 64)
    eye = torch.eye(n, dtype=F64)
    ours, theirs = ((q.mT @ q - eye).abs().max().item() for q in (Q, Q0))
    assert ours <= 1.5 * theirs + 2 * EPS


def test_compiled_qr_on_columns_already_reduced(kernel):
    """Columns with zeros below the diagonal take dlarfg's τ = 0 branch (H = I, R's entry keeps its sign);
    a triangular input with a negative diagonal must give Q = I and those signs, as LAPACK does."""
    g = torch.Generator().manual_seed(0)
    T = torch.randn(3, 6, 6, generator=g, dtype=F64).triu()
    T[:, 2, 2] = -abs(T[:, 2, 2])
    G = torch.randn(3, 6, 6, generator=g, dtype=F64)
    G[:, 3:, 1] = 0.0  # one column reduced midway, the rest not
    for A in (T, G):
        Q, d = _haar.haar_qr(A, fast=True)
        Q0, d0 = lapack(A)
        assert torch.equal(d, d0)
        assert (Q * d - Q0 * d0).abs().max() < 1e-13
    Q, d = _haar.haar_qr(T, fast=True)
    assert torch.equal(Q, torch.eye(6, dtype=F64).expand(3, 6, 6)) and (d[:, 0, 2] == -1).all()


def test_the_input_is_left_as_it_was(kernel):
    G = gaussians(4, 16, seed=0)
    before = G.clone()
    _haar.haar_qr(G, fast=True)
    assert torch.equal(G, before)


def test_a_groups_draw_is_the_compiled_loops_output(kernel):
    """O(n) and GL(n) draws take the compiled loop where numba is installed: the same bits as calling it on the
    generator's Gaussians (so the test above covers what the groups return)."""
    Q, d = _haar.haar_qr(gaussians(5, 64, seed=3), fast=True)
    drawn = torch.stack([e.matrix() for e in get_group("orthogonal", 64).sample_many(5, seed=3)])
    assert torch.equal(drawn, Q * d)


# ------------------------------------------------------------------ the law: Haar on O(n)
def _entry_cdf(n: int):
    """CDF of one entry of a Haar matrix on O(n): x² ~ Beta(1/2, (n−1)/2), symmetric in sign."""
    beta = stats.beta(0.5, (n - 1) / 2)
    return lambda x: 0.5 + 0.5 * np.sign(x) * beta.cdf(np.square(x))


@pytest.mark.parametrize("n, k", [(8, 4000), (64, 600)])
def test_compiled_draws_are_haar(kernel, n, k):
    """An entry's distribution (Kolmogorov–Smirnov against the exact law), the trace's moments (E tr = 0 and
    E tr² = 1 for every n ≥ 2: Diaconis & Shahshahani 1994) and the balance of det = ±1; the same statistics
    of Q without the sign correction (always det (−1)^{n−1}, Q₀₀ < 0) fail every one of them."""
    Q, d = _haar.haar_qr(gaussians(k, n, seed=1), fast=True)
    cdf = _entry_cdf(n)

    def verdicts(H):
        tr = H.diagonal(dim1=-2, dim2=-1).sum(-1)
        positive = int((torch.linalg.det(H) > 0).sum())
        return (stats.kstest(H[:, 0, 0].numpy(), cdf).pvalue > 1e-3,
                stats.kstest(H[:, n // 2, n - 1].numpy(), cdf).pvalue > 1e-3,
                abs(tr.mean().item()) < 5 / k ** 0.5,  # sd of tr is 1
                abs((tr ** 2).mean().item() - 1) < 5 * 2 ** 0.5 / k ** 0.5,  # var of tr² ≈ 2
                abs(positive - k / 2) < 5 * (k / 4) ** 0.5)  # Binomial(k, 1/2)

    assert all(verdicts(Q * d))
    wrong = verdicts(Q)  # the control: the QR factor alone is not Haar
    assert not wrong[0] and not wrong[4]


def test_orthogonal_group_draws_are_orthogonal_for_every_size():
    """Through the group, whichever path runs (n = 768 always takes torch's QR): orthogonal to rounding, and
    special_orthogonal's determinant +1."""
    for n, k in ((1, 50), (2, 200), (4, 100), (64, 20), (129, 2), (768, 1)):
        Q = torch.stack([e.matrix() for e in get_group("orthogonal", n).sample_many(k, seed=n)])
        eye = torch.eye(n, dtype=F64)
        assert (Q.mT @ Q - eye).abs().max() < 20 * n ** 0.5 * EPS
    Q = torch.stack([e.matrix() for e in get_group("orthogonal", 1).sample_many(400, seed=0)])
    assert 150 < int((Q == 1).sum()) < 250  # O(1) = {±1}, each half the time


# ------------------------------------------------------------------ numba off: torch's QR, the same draws to rounding
def test_without_numba_the_draw_is_torchs_qr(numba_off):
    Q, d = _haar.haar_qr(gaussians(6, 16, seed=0))
    Q0, d0 = lapack(gaussians(6, 16, seed=0))
    assert torch.equal(Q, Q0) and torch.equal(d, d0)
    assert torch.equal(haar_draw(6, 16, torch.Generator().manual_seed(0)), Q0 * d0)
    with pytest.raises(MissingDependencyError, match="numba is not available"):
        _haar.haar_qr(gaussians(1, 4, seed=0), fast=True)


def test_a_seed_draws_the_same_elements_with_and_without_numba(kernel, monkeypatch):
    """The one promise across installs: the same elements up to rounding (κ·ε), never other elements."""
    on = [e.matrix() for e in get_group("gl", 64, sigma=0.5).sample_many(4, seed=9)]
    on_o = [e.matrix() for e in get_group("orthogonal", 32).sample_many(4, seed=9)]
    monkeypatch.setattr(_haar, "_state", {"kernel": None, "tried": True})
    off = [e.matrix() for e in get_group("gl", 64, sigma=0.5).sample_many(4, seed=9)]
    off_o = [e.matrix() for e in get_group("orthogonal", 32).sample_many(4, seed=9)]
    for a, b in zip(on + on_o, off + off_o):
        assert not torch.equal(a, b)  # the two paths did run
        assert (a - b).abs().max() <= 1e-12 * b.abs().max()


def test_inputs_the_loop_does_not_take_go_to_torch(kernel):
    for G in (gaussians(2, 5, seed=0).float(), gaussians(2, 200, seed=0)[:, :, :150]):
        Q, d = _haar.haar_qr(G)
        Q0, d0 = lapack(G)
        assert torch.equal(Q, Q0) and torch.equal(d, d0)
    with pytest.raises(InvalidOptionError, match="float64"):
        _haar.haar_qr(gaussians(2, 5, seed=0).float(), fast=True)
    big = gaussians(1, _haar.FAST_MAX_N + 1, seed=0)
    assert torch.equal(_haar.haar_qr(big)[0], lapack(big)[0])  # beyond FAST_MAX_N: torch's QR


def test_a_loop_that_fails_falls_back_to_torch(kernel, monkeypatch, caplog):
    def broken(A, Q, d):
        raise RuntimeError("LLVM says no")  # what a numba/llvmlite that cannot lower the loop would raise

    monkeypatch.setattr(_haar, "_state", {"kernel": broken, "tried": True})
    G = gaussians(3, 8, seed=0)
    Q, d = _haar.haar_qr(G)
    assert torch.equal(Q, lapack(G)[0]) and "LLVM says no" in caplog.text
    assert _haar._state["kernel"] is None  # not tried again


def test_workbench_numba_0_turns_the_loop_off():
    code = "from workbench.groups import _haar; assert _haar._kernel() is None; print('off')"
    env = dict(os.environ, WORKBENCH_NUMBA="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "off" in out.stdout, out.stderr
