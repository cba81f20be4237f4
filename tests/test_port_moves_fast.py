"""The shortcuts ``_port_moves`` takes on a transform's hot path (helper 34), each against the general path it
replaces, exactly: the same composed operator (the same index, the same block matrices at the same places) and
so the same bits, and the moves done one at a time in float64 as the ground truth.

- ``_Axis._moved_blocks``: a permutation (a head permutation of one section of a packed projection) after dense
  blocks looks only at the blocks inside its range; the general path checked every block of the axis. A block
  that is one whole unit of a head permutation is placed by the permutation's inverse (``_head_units``), without
  the NumPy check: all three (units, NumPy check, general path) are compared.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from workbench.groups import Dense, ScaledPermutation
from workbench.symmetry import _port_moves as pm
from workbench.symmetry._layout_push import HeadPermutation
from workbench.symmetry._port_moves import _act_slice

F64 = torch.float64


def _dense(n: int, g: torch.Generator) -> Dense:
    return Dense(torch.randn(n, n, generator=g, dtype=F64) + 3 * torch.eye(n, dtype=F64), cond=5.0)


def _state(op: pm._Axis):
    return (None if op.idx is None else op.idx.tolist(), None if op.scale is None else op.scale.tolist(),
            [(s, n, C.tolist(), cond) for s, (n, C, cond) in op.blocks.items()], list(op.starts))  # (in order)


def _general_only(monkeypatch):
    monkeypatch.setattr(pm._Axis, "_moved_blocks", lambda self, a, b, f_idx, units=None: None)


def _no_units(monkeypatch):  # the shortcut's NumPy check instead of the head permutation's whole units
    monkeypatch.setattr(pm, "_head_units", lambda F: None)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.sampled_from([1, 2, 3]), heads=st.integers(1, 5),
       before=st.integers(0, 3), after=st.integers(0, 3), nblocks=st.integers(0, 10), signed=st.booleans(),
       slack=st.integers(0, 2))
def test_a_permutation_after_blocks_composes_as_the_general_path_does(seed, n, heads, before, after, nblocks,
                                                                      signed, slack):
    """Blocks inside, outside and straddling the permuted range (aligned or not, of the head size or not), a
    stream's signed permutation composed first or not: the state equals the general path's, and the value the
    moves one at a time."""
    g = torch.Generator().manual_seed(seed)
    a, L = before * n + slack, (before + heads + after) * n + 2 * slack
    b = a + heads * n
    W = torch.randn(L, 3, generator=g, dtype=F64)
    moves = []
    if signed:
        s = torch.where(torch.rand(L, generator=g) < 0.5, -1.0, 1.0).double()
        moves.append((ScaledPermutation(torch.randperm(L, generator=g), s), None))
    for _ in range(nblocks):  # some straddle others (not composable: they make the general path fall back)
        size = int(torch.randint(1, min(3, L) + 1, (1,), generator=g))
        start = int(torch.randint(0, L - size + 1, (1,), generator=g))
        if bool(torch.rand(1, generator=g) < 0.7):  # mostly aligned heads, as a packed projection has
            size, start = n, a + n * int(torch.randint(0, heads, (1,), generator=g))
        moves.append((_dense(size, g), (start, start + size)))
    moves.append((HeadPermutation(ScaledPermutation(torch.randperm(heads, generator=g)), n), (a, b)))

    def composed():
        m = pm.Moves(W)
        for F, sl in moves:
            m.add(F, 0, sl)
        return m

    fast = composed()
    with pytest.MonkeyPatch.context() as mp:
        _no_units(mp)
        checked = composed()
    with pytest.MonkeyPatch.context() as mp:
        _general_only(mp)
        general = composed()
    for other in (checked, general):
        assert (fast.base is W) == (other.base is W) and set(fast.axes) == set(other.axes)
        if 0 in fast.axes:
            assert _state(fast.axes[0]) == _state(other.axes[0])
        assert torch.equal(fast.value(F64), other.value(F64))
    expect = W.clone()
    for F, sl in moves:
        expect = _act_slice(expect, F, 0, sl, False)
    assert torch.allclose(fast.value(F64), expect, atol=1e-12 * float(expect.abs().max()), rtol=0)


def test_heads_of_one_section_move_and_the_other_sections_blocks_stay():
    """A negative control for the shortcut's reach: q, k and v blocks of 3 heads, the heads of the k section
    permuted only. The k blocks move, the q and v blocks keep their places (a shortcut that moved every block,
    or none, fails here)."""
    g = torch.Generator().manual_seed(1)
    H, dh = 3, 2
    W = torch.randn(3 * H * dh, 4, generator=g, dtype=F64)
    m, expect = pm.Moves(W), W.clone()
    Ms = [_dense(dh, g) for _ in range(3 * H)]
    steps = [(Ms[j], (j * dh, (j + 1) * dh)) for j in range(3 * H)]
    steps.append((HeadPermutation(ScaledPermutation(torch.tensor([2, 0, 1])), dh), (H * dh, 2 * H * dh)))
    for F, sl in steps:
        m.add(F, 0, sl)
        expect = _act_slice(expect, F, 0, sl, False)
    op = m.axes[0]
    place = {id(C): s for s, (_, C, _) in op.blocks.items()}
    assert [place[id(Ms[j].M)] for j in range(3 * H)] == [0, 2, 4, 8, 10, 6, 12, 14, 16]
    assert op.idx[H * dh:2 * H * dh].tolist() == [10, 11, 6, 7, 8, 9]
    assert torch.allclose(m.value(F64), expect, atol=1e-12, rtol=0)
