"""Per-expert moves of the fastest memory axis in one compiled pass (issue 17, GPT-OSS).

GPT-OSS stores its experts' gate and up input-major (``gate_up_proj`` [experts, d_model, 2·d_mlp], gate and up
interleaved on the last axis), so each expert's scaled permutation of its hidden units moves columns, one column index
per expert; Mixtral's down projections ([experts, d_model, d_mlp]) too. ``_cols_run`` takes such a per-expert move and
the rows' moves after it (the stream's, the experts' order) into one pass of ``_kernels_numba.gather_headwise_cols``.
Checked here bit for bit against the moves applied one at a time with each element's own ``act``, on strided
(interleaved) and contiguous weights, with and without scales, in both dtypes; against the push with the compiled pass
refused (a whole GPT-OSS transform); and with negative controls (the column index of the output row's expert instead of
the source row's moves entries elsewhere; an expert left out of the move, or scales on some experts only, is not taken).
The gate and up halves of one tensor are one such pass over the whole (``_fused_halves``), checked against a hand loop,
torch's gathers and the two halves pushed apart, with the halves' moves swapped as a negative control and indices
outside a half refused.
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


def _halves_run(experts: int, d: int, n: int, g, scaled: bool, dtype):
    """The gate's and the up's moves as the push gives them: each its own per-expert moves of its columns (different
    ones here, which the push's GPT-OSS elements are not, so that a swap shows), the same stream and experts' moves."""
    gate = _run(experts, d, n, g, scaled, dtype)
    up = [(2, {e: _sp(n, g, scaled) for e in range(experts)})] + gate[1:]
    return gate, up


def _hand_loop(storage: torch.Tensor, gate: list, up: list) -> torch.Tensor:
    """The whole [experts, d_model, 2n] after the moves, entry by entry: new[e, i, 2j + b] = (old[h, k, 2·q_b[h][j] + b]
    · c_b[h][j]) · sign[i], h the experts' order at e, k the stream's index at i, b = 0 the gate, 1 the up."""
    E, d, two_n = storage.shape
    stream, order = gate[1][1], gate[2][1]
    new = torch.empty_like(storage)
    for e in range(E):
        h = int(order.perm[e])
        for i in range(d):
            k = int(stream.perm[i])
            for j in range(two_n // 2):
                for b, run in enumerate((gate, up)):
                    f = run[0][1][h]
                    v = storage[h, k, 2 * int(f.perm[j]) + b]
                    if f.scale is not None:
                        v = v * f.scale[j].to(storage.dtype)
                    new[e, i, 2 * j + b] = v * stream.scale[i].to(storage.dtype)
    return new


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("n", [7, 37])  # rows of 14 entries (no whole cache line) and of 74 (whole lines, unaligned)
def test_gate_and_up_take_one_pass_with_a_hand_loops_bits(monkeypatch, dtype, scaled, n):
    """GPT-OSS's interleaved halves, each with its own moves of its columns: ``_fused_halves`` makes them one job on the
    whole tensor, which takes one compiled pass (not two) and gives a hand loop's bits, as do torch's gathers
    (the kernels refused, as WORKBENCH_NUMBA=0) and the two halves pushed one after the other (the code before it).
    Without column scales the whole's contiguous rows take ``_stream_row``'s lines (``_kernels_numba._headwise_row``).
    Negative control: the halves' moves interleaved the wrong way round (the up's on the gate's columns) differ."""
    from workbench.symmetry._layout_gathers import _fused_halves, _interleave

    g = torch.Generator().manual_seed(11 + scaled + n)
    E, d = 3, 5
    storage, gate, up = _interleaved(E, d, n, dtype, g)
    ops_g, ops_u = _halves_run(E, d, n, g, scaled, dtype)
    want = _hand_loop(storage, ops_g, ops_u)

    def pushed(jobs):
        new = torch.full_like(storage, float("nan"))
        views = {"gate": new[:, :, 0::2], "in": new[:, :, 1::2]}
        for x, out, run in jobs(views):
            _push_slice(x, out, run, -1, {})
        return new

    def fused(views):
        return _fused_halves({"gate": (gate, views["gate"], ops_g), "in": (up, views["in"], ops_u)})

    calls = []
    fast = _kernels.headwise_cols_into
    monkeypatch.setattr(_kernels, "headwise_cols_into", lambda *a, **k: calls.append(a[0].shape) or fast(*a, **k))
    one = pushed(fused)
    assert calls == [(E, d, 2 * n)]  # one pass over the whole tensor
    assert torch.equal(one, want)
    assert torch.equal(pushed(lambda v: [(gate, v["gate"], ops_g), (up, v["in"], ops_u)]), want)  # two passes, as before
    with monkeypatch.context() as m:
        m.setattr(_kernels, "_kernels", lambda: None)  # torch's gathers throughout
        assert torch.equal(pushed(fused), want)
    swapped = [(2, {e: _interleave(ops_u[0][1][e], ops_g[0][1][e]) for e in range(E)})] + ops_g[1:]
    assert not torch.equal(pushed(lambda v: [(storage, v["gate"].as_strided(storage.shape, storage.stride()), swapped)]),
                           want)


def test_halves_whose_moves_differ_elsewhere_stay_two_jobs():
    """Only halves moved alike but for their columns fuse: another stream move on one half, scales on one half only, or
    destinations that are not one tensor's halves leave two jobs (each pushed as before)."""
    from workbench.symmetry._layout_gathers import _fused_halves

    g = torch.Generator().manual_seed(13)
    E, d, n = 3, 4, 6
    storage, gate, up = _interleaved(E, d, n, torch.float64, g)
    _, new_gate, new_up = _interleaved(E, d, n, torch.float64, g)
    ops_g, ops_u = _halves_run(E, d, n, g, False, torch.float64)
    other_stream = [ops_u[0], (1, _sp(d, g, True)), ops_u[2]]
    one_scaled = [(2, {e: _sp(n, g, True) for e in range(E)})] + ops_u[1:]
    for halves in ({"gate": (gate, new_gate, ops_g), "in": (up, new_up, other_stream)},
                   {"gate": (gate, new_gate, ops_g), "in": (up, new_up, one_scaled)},
                   {"gate": (gate, new_gate, ops_g), "in": (up, torch.empty_like(up), ops_u)}):
        assert [job[0] for job in _fused_halves(halves)] == [gate, up]
    jobs = _fused_halves({"gate": (gate, new_gate, ops_g), "in": (up, new_up, ops_u), "other": (storage, storage, [])})
    assert [tuple(job[0].shape) for job in jobs] == [(E, d, 2 * n), (E, d, 2 * n)]  # the pair fused, the rest kept


def test_an_index_outside_a_half_is_refused_with_our_error():
    """A per-expert move naming a column outside its half (a hand-made element, never validated) is refused by name,
    not left to torch's gather: n on the gate would be column 2n, -1 on the up column -1 of the whole."""
    from workbench._errors import InvalidOptionError
    from workbench.symmetry._layout_gathers import _fused_halves

    g = torch.Generator().manual_seed(17)
    E, d, n = 2, 3, 4
    _, gate, up = _interleaved(E, d, n, torch.float32, g)
    _, new_gate, new_up = _interleaved(E, d, n, torch.float32, g)
    ops_g, ops_u = _halves_run(E, d, n, g, False, torch.float32)
    for bad, half in ((torch.tensor([0, 1, 2, n]), "gate"), (torch.tensor([-1, 0, 1, 2]), "in")):
        per = {e: ScaledPermutation(bad) for e in range(E)}  # (no validate: the push sees what it is given)
        g_ops = [(2, per)] + ops_g[1:] if half == "gate" else ops_g
        u_ops = [(2, per)] + ops_u[1:] if half == "in" else ops_u
        with pytest.raises(InvalidOptionError, match="outside 0..3"):
            _fused_halves({"gate": (gate, new_gate, g_ops), "in": (up, new_up, u_ops)})


def test_a_gpt_oss_transform_has_the_same_bits_with_its_halves_apart(monkeypatch):
    """A whole GPT-OSS transform (tiny shapes, both dtypes) with gate and up in one pass a layer and with the halves
    pushed apart (the code before ``_fused_halves``): the same bits in every weight."""
    pytest.importorskip("transformers")
    import workbench as wb
    from benchmarks.coverage_text import build, shapes
    from workbench.symmetry import _layout_push

    fuse = _layout_push._fused_halves
    for dtype in (torch.float32, torch.float64):
        model = build(*shapes(True)["gpt_oss"]).to(dtype)
        calls = []
        monkeypatch.setattr(_layout_push, "_fused_halves", lambda w: calls.append(len(w) - len(fuse(w))) or fuse(w))
        new, _ = wb.random_intertwiner(model, seed=4)
        # every push of the transform: gate and up, and their biases, one job each a layer
        assert calls and set(calls) == {2 * model.config.num_hidden_layers}
        monkeypatch.setattr(_layout_push, "_fused_halves", lambda w: list(w.values()))
        ref, _ = wb.random_intertwiner(model, seed=4)
        for (k, a), (_, b) in zip(new.state_dict().items(), ref.state_dict().items()):
            assert torch.equal(a, b), k
