"""What ``_port_moves`` keeps for the length of one push (helper 35), against the same values computed without it:

- ``_stacked``: a packed projection's weight and bias carry the same dense blocks (each head's map on its rows),
  stacked, reduced and converted once per push. The bias reuses the weight's stack only where its blocks are the
  same matrices (by identity), in the same order and dtype; the values are the same bits either way.
"""
from __future__ import annotations

import torch

from workbench.groups import Dense, ScaledPermutation
from workbench.symmetry import _port_moves as pm

F64 = torch.float64


def _maps(heads: int, n: int, g: torch.Generator) -> list[Dense]:
    return [Dense(torch.randn(n, n, generator=g, dtype=F64) + 3 * torch.eye(n, dtype=F64), cond=5.0)
            for _ in range(heads)]


def _moved(t: torch.Tensor, maps: list[Dense], perm: ScaledPermutation, memo) -> torch.Tensor:
    m = pm.Moves(t)
    m.add(perm, 0, None)
    n = maps[0].n
    for h, F in enumerate(maps):
        m.add(F, 0, (h * n, (h + 1) * n))
    out = torch.empty_like(t)
    m.value(out=out, memo=memo)
    return out


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def test_a_bias_reuses_its_weights_stacked_blocks_with_the_same_bits(monkeypatch):
    g = torch.Generator().manual_seed(0)
    heads, n, d = 6, 4, 5
    L = heads * n
    maps = _maps(heads, n, g)
    perm = ScaledPermutation(torch.randperm(L, generator=g), torch.rand(L, generator=g, dtype=F64) + 0.5)
    W, b = torch.randn(L, d, generator=g), torch.randn(L, generator=g)
    memo: dict = {}
    stacks = []
    real = torch.stack

    def counted(*args, **kw):
        stacks.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(torch, "stack", counted)
    w_memo, b_memo = _moved(W, maps, perm, memo), _moved(b, maps, perm, memo)
    monkeypatch.setattr(torch, "stack", real)
    assert len(stacks) == 1 and len(memo) == 1  # the bias found the weight's stack
    assert _bits(w_memo) == _bits(_moved(W, maps, perm, None))
    assert _bits(b_memo) == _bits(_moved(b, maps, perm, None))
    # other matrices (equal values, other objects), or the same in another dtype: a stack of their own
    again = [Dense(F.M.clone(), cond=F.cond) for F in maps]
    assert _bits(_moved(b, again, perm, memo)) == _bits(b_memo) and len(memo) == 2
    b64 = _moved(b.double(), maps, perm, memo)
    assert len(memo) == 3 and _bits(b64) == _bits(_moved(b.double(), maps, perm, None))


def test_a_memo_entry_keeps_its_blocks_alive():
    """The key is the blocks' ids: the entry holds the blocks, so no other tensor can take an id while the memo
    lives (a freed block's id reused by a new matrix would otherwise read the old stack)."""
    g = torch.Generator().manual_seed(1)
    memo: dict = {}
    Cs = [torch.randn(3, 3, generator=g, dtype=F64) for _ in range(2)]
    S, norm = pm._stacked(Cs, torch.float32, torch.device("cpu"), memo)
    (entry,) = memo.values()
    assert all(a is b for a, b in zip(entry[0], Cs)) and entry[1] is S
    assert norm == float(torch.stack(Cs).abs().sum(-1).max())
    assert torch.equal(S, torch.stack(Cs).float())
