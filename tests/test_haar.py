"""The Haar draw (workbench/groups/_haar.py): Householder reflections of Gaussian vectors (Stewart's method), the
compiled loop against torch's path and against the definition written out here, the claim that it is the QR's Q
as a function of the QR's own vectors, its law, and the fallbacks.

The definition (the module docstring): H_j reflects coordinates j … n−1 and maps x_j = G[j:, j] to β_j·e_j with
β_j = −sign(x_j[0])·‖x_j‖ (+ for a zero x_j[0]), Q = H_0·…·H_{n−1} and d = sign(β). A wrong reflector sign, a
wrong τ or a mis-ordered product moves Q by O(1); the two paths and the reference agree to a few n·ε.
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


def reference(G: torch.Tensor):
    """Q and d of the module docstring's definition, one explicit n×n reflection matrix at a time (float64)."""
    k, n = G.shape[0], G.shape[-1]
    Qs, ds = [], []
    for b in range(k):
        Q, d = torch.eye(n, dtype=F64), torch.zeros(n, dtype=F64)
        for j in range(n):
            x = G[b, j:, j]
            norm = torch.linalg.vector_norm(x)
            beta = -norm if x[0] >= 0 else norm
            u = x.clone()
            u[0] -= beta  # H·x = β·e_j for H = I − 2uuᵀ/uᵀu, u = x − β·e_j
            H = torch.eye(n, dtype=F64)
            if (u * u).sum() > 0 and x[1:].abs().sum() > 0:  # a zero tail: H = I (dlarfg's convention)
                H[j:, j:] -= 2 * torch.outer(u, u) / (u * u).sum()
            else:
                beta = x[0]
            Q = Q @ H
            d[j] = torch.sign(beta)
        Qs.append(Q)
        ds.append(d)
    return torch.stack(Qs), torch.stack(ds).unsqueeze(-2)


@pytest.fixture
def numba_off(monkeypatch):
    """numba absent, as in an install without the ``fast`` extra."""
    monkeypatch.setattr(_haar, "_state", {"kernel": None, "tried": True})


@pytest.fixture
def kernel():
    pytest.importorskip("numba")
    if _haar._kernel() is None:
        pytest.skip("the compiled Haar draw is off (WORKBENCH_NUMBA=0)")


# ------------------------------------------------------------------ both paths compute the definition
@pytest.mark.parametrize("n, k", [(1, 5), (2, 200), (3, 100), (4, 100), (7, 50), (8, 50), (9, 30), (17, 10),
                                  (64, 6), (65, 3), (128, 2), (256, 1)])
def test_both_paths_are_the_definition_for_the_same_gaussians(kernel, n, k):
    G = gaussians(k, n, seed=n)
    Q0, d0 = reference(G)
    tol = 8 * n * EPS
    for fast in (True, False):
        Q, d = _haar.haar_reflections(G, fast=fast)
        assert Q.shape == (k, n, n) and d.shape == (k, 1, n) and Q.dtype == d.dtype == F64
        assert torch.equal(d, d0)
        assert (Q - Q0).abs().max() <= tol, ((Q - Q0).abs().max() / (n * EPS), fast)
    # as orthogonal as LAPACK's own accumulation (torch's path)
    eye = torch.eye(n, dtype=F64)
    ours, theirs = ((q.mT @ q - eye).abs().max().item() for q in (_haar.haar_reflections(G, fast=True)[0],
                                                                  _haar.haar_reflections(G, fast=False)[0]))
    assert ours <= 2 * theirs + 4 * EPS


def test_the_upper_triangle_is_not_read(kernel):
    G = gaussians(4, 12, seed=0)
    L = G.tril()
    for fast in (True, False):
        Q, d = _haar.haar_reflections(G, fast=fast)
        Q1, d1 = _haar.haar_reflections(L, fast=fast)
        assert torch.equal(Q, Q1) and torch.equal(d, d1)


def test_columns_with_nothing_below_the_diagonal(kernel):
    """A zero tail takes dlarfg's τ = 0 branch (H = I, β = α keeps its sign): a triangular input with a negative
    diagonal entry gives Q = I and that sign, on both paths, as the definition does."""
    g = torch.Generator().manual_seed(0)
    T = torch.randn(3, 6, 6, generator=g, dtype=F64).triu()
    T[:, 2, 2] = -abs(T[:, 2, 2])
    G = torch.randn(3, 6, 6, generator=g, dtype=F64)
    G[:, 3:, 1] = 0.0  # one column with a zero tail, the rest not
    for A in (T, G):
        Q0, d0 = reference(A)
        for fast in (True, False):
            Q, d = _haar.haar_reflections(A, fast=fast)
            assert torch.equal(d, d0) and (Q - Q0).abs().max() < 1e-14
    for fast in (True, False):
        Q, d = _haar.haar_reflections(T, fast=fast)
        assert (Q - torch.eye(6, dtype=F64)).abs().max() == 0 and (d[:, 0, 2] == -1).all()


def test_the_input_is_left_as_it_was(kernel):
    G = gaussians(4, 16, seed=0)
    before = G.clone()
    for fast in (True, False):
        _haar.haar_reflections(G, fast=fast)
        assert torch.equal(G, before)


# ------------------------------------------------------------------ the derivation: a QR's Q from its own vectors
@pytest.mark.parametrize("n", [2, 5, 16, 64])
def test_a_qrs_q_is_this_function_of_the_qrs_vectors(kernel, n):
    """The module docstring's argument: a Householder QR of G reflects x_j = (H_{j−1}·…·H_0·G)[j:, j] at step j.
    Fed those x_j, the draw must return the QR's own Q and sign(diag R) (LAPACK's, to κ·ε) — the same function;
    fed G's raw columns instead (what a draw does), it returns another orthogonal matrix (for n ≥ 3: at n = 2 only
    x_0 is reflected, and it is G's first column either way)."""
    G = gaussians(3, n, seed=n)
    A, tau = torch.geqrf(G)
    X = torch.zeros_like(G)
    for b in range(3):
        P = G[b].clone()
        for j in range(n):
            X[b, j:, j] = P[j:, j]
            v = torch.zeros(n, dtype=F64)
            v[j], v[j + 1:] = 1.0, A[b, j + 1:, j]
            P = P - tau[b, j] * torch.outer(v, v @ P)  # H_j·P
    Q0, R0 = torch.linalg.qr(G)
    d0 = torch.sign(torch.diagonal(R0, dim1=-2, dim2=-1)).unsqueeze(-2)
    Q, d = _haar.haar_reflections(X, fast=True)
    assert torch.equal(d, d0)
    assert (Q * d - Q0 * d0).abs().max() <= 10 * torch.linalg.cond(G).max() * EPS
    other, _ = _haar.haar_reflections(G, fast=True)
    assert (other - Q).abs().max() > 0.1 if n > 2 else torch.equal(other, Q)


# ------------------------------------------------------------------ the law: Haar on O(n)
def _entry_cdf(n: int):
    """CDF of one entry of a Haar matrix on O(n): x² ~ Beta(1/2, (n−1)/2), symmetric in sign."""
    beta = stats.beta(0.5, (n - 1) / 2)
    return lambda x: 0.5 + 0.5 * np.sign(x) * beta.cdf(np.square(x))


def _verdicts(H: torch.Tensor, n: int) -> tuple:
    k = H.shape[0]
    cdf = _entry_cdf(n)
    tr = H.diagonal(dim1=-2, dim2=-1).sum(-1)
    positive = int((torch.linalg.det(H) > 0).sum())
    return (stats.kstest(H[:, 0, 0].numpy(), cdf).pvalue > 1e-3,
            stats.kstest(H[:, n // 2, n - 1].numpy(), cdf).pvalue > 1e-3,
            stats.kstest(H[:, n - 1, 0].numpy(), cdf).pvalue > 1e-3,
            abs(tr.mean().item()) < 5 / k ** 0.5,  # sd of tr is 1
            abs((tr ** 2).mean().item() - 1) < 5 * 2 ** 0.5 / k ** 0.5,  # var of tr² ≈ 2
            abs(positive - k / 2) < 5 * (k / 4) ** 0.5)  # Binomial(k, 1/2)


@pytest.mark.parametrize("n, k", [(8, 4000), (64, 600)])
def test_draws_are_haar(n, k):
    """Through the group draw (whichever path runs): three entries' distributions (Kolmogorov–Smirnov against the
    exact law), the trace's moments (E tr = 0 and E tr² = 1 for every n ≥ 2: Diaconis & Shahshahani 1994) and
    the balance of det = ±1. The controls fail: Q without the signs (always det (−1)^{n−1}, Q₀₀ < 0 …), and
    reflections of one Gaussian vector reused for every column (Q then depends on too few numbers)."""
    g = torch.Generator().manual_seed(1)
    Q, d = haar_draw(k, n, g, signs=True)
    assert all(_verdicts(Q * d, n))
    wrong = _verdicts(Q, n)
    assert not wrong[0] and not wrong[5]
    G = _normal((k, n, 1), g).expand(k, n, n).contiguous()  # one vector's tail in every column
    Qr, dr = _haar.haar_reflections(G)
    assert not all(_verdicts(Qr * dr, n))


def test_group_draws_are_the_reflections_of_the_generators_normals():
    """O(n) and GL(n) draws go through ``_haar`` with the generator's n(n+1)/2 normals per matrix, row by row
    over the lower triangle: the same bits as calling it on those numbers."""
    n, k = 64, 5
    L = torch.zeros(k, n, n, dtype=F64)
    rows, cols = torch.tril_indices(n, n)
    L[:, rows, cols] = _normal((k, rows.numel()), torch.Generator().manual_seed(3))
    Q, d = _haar.haar_reflections(L)
    drawn = torch.stack([e.matrix() for e in get_group("orthogonal", n).sample_many(k, seed=3)])
    assert torch.equal(drawn, Q * d)


def test_orthogonal_group_draws_are_orthogonal_for_every_size():
    """Through the group, whichever path runs (n = 768 always takes torch's): orthogonal to rounding, and
    special_orthogonal's determinant +1."""
    for n, k in ((1, 50), (2, 200), (4, 100), (64, 20), (257, 2), (768, 1)):
        Q = torch.stack([e.matrix() for e in get_group("orthogonal", n).sample_many(k, seed=n)])
        eye = torch.eye(n, dtype=F64)
        assert (Q.mT @ Q - eye).abs().max() < 20 * n ** 0.5 * EPS
    Q = torch.stack([e.matrix() for e in get_group("orthogonal", 1).sample_many(400, seed=0)])
    assert 150 < int((Q == 1).sum()) < 250  # O(1) = {±1}, each half the time


# ------------------------------------------------------------------ numba off: torch's path, the same draws to rounding
def test_without_numba_the_draw_is_torchs_path(numba_off):
    G = gaussians(6, 16, seed=0)
    Q, d = _haar.haar_reflections(G)
    Q0, d0 = _haar._reflections_torch(G)
    assert torch.equal(Q, Q0) and torch.equal(d, d0)
    with pytest.raises(MissingDependencyError, match="numba is not available"):
        _haar.haar_reflections(gaussians(1, 4, seed=0), fast=True)


def test_a_seed_draws_the_same_elements_with_and_without_numba(kernel, monkeypatch):
    """The one promise across installs: the same elements up to rounding, never other elements."""
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
        with pytest.raises(InvalidOptionError, match="float64"):
            _haar.haar_reflections(G, fast=True)
    G = gaussians(2, 5, seed=0).float()
    for A in (G, gaussians(1, _haar.FAST_MAX_N + 1, seed=0)):  # float32; beyond FAST_MAX_N
        Q, d = _haar.haar_reflections(A)
        Q0, d0 = _haar._reflections_torch(A)
        assert torch.equal(Q, Q0) and torch.equal(d, d0) and Q.dtype == A.dtype


def test_a_loop_that_fails_falls_back_to_torch(kernel, monkeypatch, caplog):
    def broken(A, Q, d):
        raise RuntimeError("LLVM says no")  # what a numba/llvmlite that cannot lower the loop would raise

    monkeypatch.setattr(_haar, "_state", {"kernel": broken, "tried": True})
    G = gaussians(3, 8, seed=0)
    Q, d = _haar.haar_reflections(G)
    assert torch.equal(Q, _haar._reflections_torch(G)[0]) and "LLVM says no" in caplog.text
    assert _haar._state["kernel"] is None  # not tried again


def test_workbench_numba_0_turns_the_loop_off():
    code = "from workbench.groups import _haar; assert _haar._kernel() is None; print('off')"
    env = dict(os.environ, WORKBENCH_NUMBA="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "off" in out.stdout, out.stderr
