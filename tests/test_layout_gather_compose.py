"""The layout push's gather pass composes several permutations of one axis into one index (issue 17).

A grouped-query weight (W_Q, W_O, b_Q) meets a permutation of its key/value groups and then one of the query
heads within each group, all on its head axis: they were one gather each. Now ``_gather_run`` lets them into
one run when at most one of the moves of an axis carries a scale, and ``_gathered`` composes them. Checked
directly against the moves applied one by one with each element's own ``act`` (bit for bit: one gather and the
same single product per entry), on the compiled kernel's sizes and torch's, and on a run that must break."""
from __future__ import annotations

import pytest
import torch

from workbench.groups import ScaledPermutation
from workbench.symmetry._layout_push import HeadPermutation, _gather_run, _gathered, _push_slice


def _sp(n: int, g: torch.Generator, scaled: bool = True) -> ScaledPermutation:
    scale = torch.exp(torch.randn(n, generator=g, dtype=torch.float64)) if scaled else None
    return ScaledPermutation(torch.randperm(n, generator=g), scale)


def _stepwise(x: torch.Tensor, run: list) -> torch.Tensor:
    for a, F in run:
        x = F.act(x, a)
    return x


def _runs(g: torch.Generator, heads: int, block: int, groups: int, scaled_at: int):
    """Moves on axis 0 of a [heads·…, …] weight: a group permutation (blocks of ``block`` heads), the heads within
    each group, and a scaled permutation of the whole axis at position ``scaled_at`` of the run (or none)."""
    per = heads // groups
    run = [(0, HeadPermutation(_sp(groups, g, False), block))]
    for k in range(groups):
        run.append((0, HeadPermutation(_sp(per, g, False), 1, tuple(range(k * per, (k + 1) * per)))))
    if scaled_at >= 0:
        run.insert(scaled_at, (0, _sp(heads, g, True)))
    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,cols", [(8, 16), (64, 512)])  # torch's path; the compiled kernel's size
@pytest.mark.parametrize("scaled_at", [-1, 0, 2, 4])
def test_moves_of_one_axis_compose_to_the_same_bits(dtype, rows, cols, scaled_at):
    g = torch.Generator().manual_seed(rows + scaled_at)
    x = torch.randn(rows, cols, generator=g, dtype=dtype)
    run = _runs(g, rows, rows // 2, 2, scaled_at) + [(1, _sp(cols, g, True))]
    assert _gather_run(run, 0, x) == len(run)  # one pass
    want = _stepwise(x, run)
    got = _gathered(x, run, None)
    assert torch.equal(got, want)
    out = torch.empty_like(x)  # written into the new model's tensor, as the push does
    _push_slice(x, out, run, -1, {})
    assert torch.equal(out, want)


def test_three_axes_in_memory_order():
    """A per-head weight [heads, d_model, d_head] stored as a fused projection's slice (heads·d_head rows of a
    [out, in] weight): the head axis's composed index and the stream's scaled permutation in one pass."""
    g = torch.Generator().manual_seed(3)
    h, d, dh = 8, 96, 32
    W = torch.randn(h * dh, d, generator=g)
    x = W.view(h, dh, d).transpose(1, 2)  # canonical [h, d, dh], memory order h, dh, d
    run = [(1, _sp(d, g, True))] + _runs(g, h, 4, 2, -1)
    assert _gather_run(run, 0, x) == len(run)
    assert torch.equal(_gathered(x, run, None), _stepwise(x, run))


def test_two_scales_on_one_axis_are_not_fused():
    """(x·s₁)·s₂ rounds twice; one product by s₁·s₂ would round once: another result, so the run breaks there."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 8, generator=g, dtype=torch.float32)
    run = [(0, _sp(16, g, True)), (1, _sp(8, g, False)), (0, _sp(16, g, True))]
    assert _gather_run(run, 0, x) == 2
    out = torch.empty_like(x)
    _push_slice(x, out, run, -1, {})
    assert torch.equal(out, _stepwise(x, run))


def test_a_wrong_composition_is_seen():
    """Negative control: composing the indices the other way round (f[i] for i[f]) moves entries elsewhere."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    a, b = _sp(8, g, False), _sp(8, g, False)
    while torch.equal(a.perm[b.perm], b.perm[a.perm]):
        b = _sp(8, g, False)
    want = _stepwise(x, [(0, a), (0, b)])
    assert torch.equal(x[a.perm[b.perm]], want)
    assert not torch.equal(x[b.perm[a.perm]], want)


def test_a_large_weight_is_one_gather_on_one_thread():
    """A weight above ``_SLICE`` whose moves are one gather pass in its dtype is one job on one thread (no scratch
    memory to bound, nothing to balance), and the same bits as the move itself; one that needs a product is still
    cut into slices, and on more threads the gather is too (jobs to balance)."""
    from workbench._threads import threads
    from workbench.groups import Dense
    from workbench.symmetry._layout_push import _SLICE, _jobs

    g = torch.Generator().manual_seed(11)
    cols = 256
    x = torch.randn(_SLICE // cols + 8, cols, generator=g)
    gather = [(1, _sp(cols, g, True))]
    Q = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))[0]
    product = [(1, Dense(Q, orthogonal=True))]
    out = torch.empty_like(x)
    with threads(1):
        calls, _ = _jobs([(x, out, gather)], {})
        assert len(calls) == 1
        assert len(_jobs([(x, torch.empty_like(x), product)], {})[0]) > 1
    with threads(2):
        assert len(_jobs([(x, torch.empty_like(x), gather)], {})[0]) > 1
    calls[0]()
    assert torch.equal(out, _stepwise(x, gather))


def _per_head_stepwise(x: torch.Tensor, run: list) -> torch.Tensor:
    """``run`` applied one move at a time: a per-head dict by each head's own ``act`` on its slice (heads on axis 0)."""
    for a, F in run:
        if isinstance(F, dict):
            y = x.clone()
            for h, f in F.items():
                y[h] = f.act(x[h], a - 1)
            x = y
        else:
            x = F.act(x, a)
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("experts,n,d", [(3, 5, 7), (8, 64, 512)])  # torch's path; the compiled kernel's size
@pytest.mark.parametrize("order", ["hidden_first", "experts_first"])
def test_a_mixtures_per_expert_moves_join_the_gather_pass(dtype, experts, n, d, order):
    """A mixture's fused gate/up weight, canonical [experts, d_model, n] as a strided view of its [experts, n, d_model]
    storage: each expert's scaled permutation of its hidden units (a per-head dict, one expert left out), the experts'
    order and the stream's signed permutation compose into one gather (one row index over experts·n, one column index)
    with the same bits as the moves one by one; the down projection, whose hidden axis is the fastest, does not join."""
    g = torch.Generator().manual_seed(experts + n)
    storage = torch.randn(experts, n, d, generator=g, dtype=dtype)
    x = storage.transpose(1, 2)  # canonical [experts, d_model, n], hidden units slower than d_model in memory
    per_expert = {e: _sp(n, g, True) for e in range(experts) if e != 1}
    signs = ScaledPermutation(torch.randperm(d, generator=g), torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0).double())
    moves = [(2, per_expert), (0, _sp(experts, g, False))]
    run = (moves if order == "hidden_first" else moves[::-1]) + [(1, signs)]
    assert _gather_run(run, 0, x) == len(run)
    want = _per_head_stepwise(x, run)
    assert torch.equal(_gathered(x, run, None), want)
    out = torch.empty_like(storage).transpose(1, 2)
    _push_slice(x, out, run, -1, {})
    assert torch.equal(out, want)
    # two scaled moves of the rows cannot share one product per entry: the run breaks before the second
    assert _gather_run([(2, per_expert), (0, _sp(experts, g, True))], 0, x) == 1
    # the down projection [experts, n, d_model] stored as [experts, d_model, n]: its hidden axis is the fastest
    down = torch.randn(experts, d, n, generator=g, dtype=dtype).transpose(1, 2)
    assert _gather_run([(1, per_expert)], 0, down) == 0
