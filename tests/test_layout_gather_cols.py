"""Per-expert moves of the fastest memory axis in one compiled pass (issue 17, GPT-OSS).

GPT-OSS stores its experts' gate and up input-major (``gate_up_proj`` [experts, d_model, 2·d_mlp], gate and up
interleaved on the last axis), so each expert's scaled permutation of its hidden units moves columns, one column index
per expert; Mixtral's down projections ([experts, d_model, d_mlp]) too. ``_cols_run`` takes such a per-expert move and
the rows' moves after it (the stream's, the experts' order) into one pass of ``_kernels_numba.gather_headwise_cols``.
Checked here bit for bit against the moves applied one at a time with each element's own ``act``, on strided
(interleaved) and contiguous weights, with and without scales, in both dtypes; against the push with the compiled pass
refused (a whole GPT-OSS transform); and with negative controls (the column index of the output row's expert instead of
the source row's moves entries elsewhere; an expert left out of the move, or scales on some experts only, is not taken).
"""
from __future__ import annotations

import pytest
import torch

from workbench.groups import ScaledPermutation
from workbench.symmetry import _kernels
from workbench.symmetry._layout_push import _cols_run, _gathered_cols, _push_slice

from test_layout_gather_compose import _per_head_stepwise, _sp

numba = pytest.importorskip("numba", reason="the compiled pass needs numba (the dev extra installs it)")


def _interleaved(experts: int, d: int, n: int, dtype, g):
    """GPT-OSS's gate and up: canonical [experts, d_model, n] views of one [experts, d_model, 2n] tensor, every other
    column (gate at 2i, up at 2i + 1)."""
    storage = torch.randn(experts, d, 2 * n, generator=g, dtype=dtype)
    return storage, storage[:, :, 0::2], storage[:, :, 1::2]


def _run(experts: int, d: int, n: int, g, scaled: bool, dtype):
    signs = torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0).to(dtype)
    return [(2, {e: _sp(n, g, scaled) for e in range(experts)}), (1, ScaledPermutation(torch.randperm(d, generator=g), signs)),
            (0, _sp(experts, g, False))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("experts,d,n", [(3, 5, 7), (8, 64, 96)])
def test_interleaved_experts_take_one_pass_with_the_same_bits(dtype, scaled, experts, d, n):
    g = torch.Generator().manual_seed(experts + n + scaled)
    _, gate, up = _interleaved(experts, d, n, dtype, g)
    run = _run(experts, d, n, g, scaled, dtype)
    assert _cols_run(run, 0, gate) == len(run)
    for x in (gate, up):
        want = _per_head_stepwise(x, run)
        new_storage, new_gate, new_up = _interleaved(experts, d, n, dtype, g)
        out = new_gate if x is gate else new_up
        before = new_storage.clone()
        _push_slice(x, out, run, -1, {})  # written into the new model's strided view, as the push does
        assert torch.equal(out, want)
        other = new_up if x is gate else new_gate  # the other half of every row is not touched
        assert torch.equal(other, (before[:, :, 1::2] if x is gate else before[:, :, 0::2]))
        assert torch.equal(_gathered_cols(x, run, None, {}), want)  # into new memory


def test_a_contiguous_down_projection_takes_it_too():
    """Mixtral's down projection, canonical [experts, n, d_model] stored as [experts, d_model, n]: its hidden axis is
    the fastest, so each expert's move of its hidden units is a column move there."""
    g = torch.Generator().manual_seed(3)
    E, n, d = 4, 24, 16
    x = torch.randn(E, d, n, generator=g).transpose(1, 2)  # canonical [E, n, d], n fastest in memory
    run = [(1, {e: _sp(n, g, True) for e in range(E)}), (2, _sp(d, g, True)), (0, _sp(E, g, False))]
    assert _cols_run(run, 0, x) == len(run)
    out = torch.empty(E, d, n).transpose(1, 2)
    _push_slice(x, out, run, -1, {})
    assert torch.equal(out, _per_head_stepwise(x, run))


def test_what_it_does_not_take_keeps_the_moves_one_by_one():
    """An expert left out of the move, scales on some experts only, or a per-expert move of the rows: not this pass
    (the push applies them in turn, with the same result as ever)."""
    g = torch.Generator().manual_seed(5)
    E, d, n = 4, 8, 6
    _, gate, _ = _interleaved(E, d, n, torch.float32, g)
    partial = [(2, {e: _sp(n, g, False) for e in range(E - 1)}), (0, _sp(E, g, False))]
    mixed = [(2, {e: _sp(n, g, e % 2 == 0) for e in range(E)}), (0, _sp(E, g, False))]
    for run in (partial, mixed):
        assert _cols_run(run, 0, gate) == 0
        out = torch.empty_like(gate)
        _push_slice(gate, out, run, -1, {})
        assert torch.equal(out, _per_head_stepwise(gate, run))
    rows = torch.randn(E, n, d, generator=g)  # each expert's hidden units as rows: _headwise_rows' case, not this one
    assert _cols_run([(1, {e: _sp(n, g, False) for e in range(E)})], 0, rows) == 0


def test_the_source_rows_expert_picks_the_column_index():
    """Negative control: after the experts' order moves, row (e, i) comes from expert h = perm[e], whose own column
    index must apply; taking expert e's instead moves entries elsewhere."""
    g = torch.Generator().manual_seed(7)
    E, d, n = 3, 4, 8
    x = torch.randn(E, d, n, generator=g, dtype=torch.float64)
    per = {e: _sp(n, g, False) for e in range(E)}
    order = ScaledPermutation(torch.tensor([1, 2, 0]), None)
    run = [(2, per), (0, order)]
    got = _gathered_cols(x, run, None, {})
    assert torch.equal(got, _per_head_stepwise(x, run))
    wrong = torch.stack([x[order.perm[e]][:, per[e].perm] for e in range(E)])
    assert not torch.equal(got, wrong)


def test_a_gpt_oss_transform_has_the_same_bits_without_the_pass(monkeypatch):
    """A whole GPT-OSS transform (tiny shapes, both dtypes) with the compiled pass and with it refused (the moves one
    by one, the code before it): the same bits in every weight."""
    pytest.importorskip("transformers")
    import workbench as wb
    from benchmarks.coverage_text import build, shapes

    calls = []
    fast = _kernels.headwise_cols_into

    def counted(*args, **kwargs):
        calls.append(1)
        return fast(*args, **kwargs)
    for dtype in (torch.float32, torch.float64):
        model = build(*shapes(True)["gpt_oss"]).to(dtype)
        monkeypatch.setattr(_kernels, "headwise_cols_into", counted)
        new, _ = wb.random_intertwiner(model, seed=4)
        assert calls  # the pass ran
        monkeypatch.setattr(_kernels, "headwise_cols_into", lambda *a, **k: False)
        ref, _ = wb.random_intertwiner(model, seed=4)
        for (k, a), (_, b) in zip(new.state_dict().items(), ref.state_dict().items()):
            assert torch.equal(a, b), k
