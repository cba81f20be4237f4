"""The layout push's per-head product (``_layout_push._per_head_product``): every memory order a weight can lie in,
both axes a head map can act on, written into the new model's tensor only where that tensor lies the same way."""
from __future__ import annotations

import itertools

import pytest
import torch

from workbench.symmetry._layout_push import _per_head_product


def _laid_out(shape, order, g):
    """A tensor of ``shape`` whose dimensions lie in memory in ``order`` (slowest first)."""
    return torch.randn([shape[d] for d in order], generator=g, dtype=torch.float64).permute(
        [order.index(d) for d in range(len(shape))])


@pytest.mark.parametrize("axis", [1, 2])
@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_each_head_moved_by_its_own_matrix_in_any_layout(axis, order):
    g = torch.Generator().manual_seed(0)
    shape = (3, 5, 7)
    x = _laid_out(shape, order, g)
    n = shape[axis]
    M = torch.randn(3, n, n, generator=g, dtype=torch.float64)
    want = torch.stack([M[h] @ x[h] if axis == 1 else x[h] @ M[h].T for h in range(3)])  # by hand, head by head
    out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
    got = _per_head_product(x, M, axis, out)
    assert got is out and torch.allclose(got, want, rtol=1e-14, atol=1e-14)
    other = torch.empty(x.shape, dtype=x.dtype).transpose(1, 2).contiguous().transpose(1, 2)  # laid out otherwise
    got = _per_head_product(x, M, axis, other if other.stride() != x.stride() else None)
    assert got.stride() == x.stride() and torch.allclose(got, want, rtol=1e-14, atol=1e-14)
    assert torch.equal(x, _laid_out(shape, order, torch.Generator().manual_seed(0)))  # the input is not written


def test_never_written_in_place_or_across_dtypes():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    M = torch.randn(2, 4, 4, generator=g, dtype=torch.float64)
    want = torch.stack([M[h] @ x[h] for h in range(2)])
    before = x.clone()
    got = _per_head_product(x, M, 1, x)  # the source as its own destination: new memory instead
    assert got is not x and torch.equal(x, before) and torch.allclose(got, want, rtol=1e-14, atol=0)
    out32 = torch.empty(2, 4, 6, dtype=torch.float32)
    got = _per_head_product(x, M, 1, out32)  # another dtype: returned in x's, the caller casts
    assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-14, atol=0)
