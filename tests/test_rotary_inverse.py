"""A rotary commutant's draw carries its exact inverse and condition number from its blocks.

``RotaryCommutant`` (per rotary pair s·R(θ), any invertible block on the dimensions no pair covers) used to hand
the push a bare matrix, whose dual then found the free block's inverse by an LU and its singular values by an
SVD. It now returns (sR)ᵀ/s² on each pair and the GL draw's V·diag(1/s)·Uᵀ on the free block, with cond from the
drawn singular values. Checked here directly in float64, never through a push: the matrices are the draws they
were (the same random numbers consumed, bit for bit), ``M·M⁻¹ = I``, and ``cond`` is the 2-norm condition number
numerically; the structure of M⁻¹ is the structure of M."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.groups._families import GeneralLinear, RotaryCommutant, _normal

F64 = torch.float64


def reference_matrices(G: RotaryCommutant, k: int, g: torch.Generator) -> torch.Tensor:
    """The draw as it was made before (the same steps, GeneralLinear's matrices alone on the free block)."""
    M = torch.zeros(k, G.n, G.n, dtype=F64)
    if G.pairs:
        a, b = torch.tensor(G.pairs).T
        s = torch.exp(G.sigma * _normal((k, len(a)), g))
        t = 2 * torch.pi * torch.rand(k, len(a), generator=g, dtype=F64)
        c, si = s * t.cos(), s * t.sin()
        M[:, a, a], M[:, a, b], M[:, b, a], M[:, b, b] = c, -si, si, c
    if G.free and k:
        idx = torch.tensor(G.free)
        M[:, idx.unsqueeze(1), idx.unsqueeze(0)] = GeneralLinear(len(G.free), sigma=G.sigma)._matrices(k, g)
    return M


@st.composite
def rotary_groups(draw):
    half = draw(st.integers(1, 6))
    free = draw(st.integers(0, 5))
    n = 2 * half + free
    adjacent = draw(st.booleans())
    pairs = [(2 * i, 2 * i + 1) for i in range(half)] if adjacent else [(i, i + half) for i in range(half)]
    return RotaryCommutant(n, pairs=pairs, sigma=draw(st.sampled_from([0.1, 0.5, 1.5]))), draw(st.integers(1, 5)), \
        draw(st.integers(0, 2**31 - 1))


@settings(max_examples=40, deadline=None)
@given(rotary_groups())
def test_a_rotary_draw_carries_its_exact_inverse_and_condition_number(case):
    G, k, seed = case
    elements = G.sample_many(k, torch.Generator().manual_seed(seed))
    M0 = reference_matrices(G, k, torch.Generator().manual_seed(seed))
    for e, m0 in zip(elements, M0):
        assert torch.equal(e.M, m0)  # the same draws: no random number consumed or computed differently
        assert e.inv is not None and e.cond is not None
        eye = torch.eye(G.n, dtype=F64)
        assert float((e.M @ e.inv - eye).abs().max()) < 1e-10 * max(1.0, e.cond)
        assert float((e.inv @ e.M - eye).abs().max()) < 1e-10 * max(1.0, e.cond)
        sv = torch.linalg.svdvals(e.M)
        assert e.cond == pytest.approx(float(sv[0] / sv[-1]), rel=1e-9)
        assert torch.equal(e.inv != 0, e.M != 0) or not bool((e.M == 0).any())  # no entry outside M's blocks


def test_a_group_without_pairs_draws_what_gl_draws_on_its_free_block():
    """No rotary pair (every dimension free) is a GL block: returned as before, without the pairs' inverse."""
    G = RotaryCommutant(4, pairs=())
    (e,) = G.sample_many(1, torch.Generator().manual_seed(3))
    assert torch.equal(e.M, reference_matrices(G, 1, torch.Generator().manual_seed(3))[0])


def test_a_wrong_inverse_would_be_caught():
    """Negative control: the checks above fail on an inverse that is off in one entry of the free block."""
    G = RotaryCommutant(6, pairs=[(0, 1), (2, 3)])
    (e,) = G.sample_many(1, torch.Generator().manual_seed(0))
    bad = e.inv.clone()
    bad[5, 4] += 1e-6
    assert float((e.M @ bad - torch.eye(6, dtype=F64)).abs().max()) > 1e-10 * e.cond
