"""The layout push's per-push memo of gather indices, and the one-walk member listing behind ``views_like``.

Issue 17 (Python around the jobs): within one push, a weight's gather pass composes, per side (rows: every
memory axis but the last; columns: the last), one index and one scale from its moves. The stream's move is the
column side of every reader (W_Q, W_K, W_V, W_in, ...) and a layer's head move the row side of W_K and W_V, so
``_sides`` keeps each side by the ids of its moves and its shape, and a lifted head move (``HeadPermutation``)
keeps its index per axis length. Nothing drawn is kept past the push. Checked here directly, bit for bit,
against the moves applied one at a time with each element's own ``act`` — on weights that share one side and
differ on the other, and on weights of one shape moved by different elements (a memo keyed by shape alone, or by
the whole run's shape without the moves, would hand one weight another's index).

``_layout._members`` lists a module's parameters and buffers from one walk of its tree (a bridge's has thousands
of hook points); it must give exactly ``named_parameters`` then ``named_buffers`` (``remove_duplicate=False``),
and a class that names its members its own way is asked itself."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import workbench as wb
from workbench._errors import InvalidOptionError
from workbench.groups import ScaledPermutation
from workbench.models._layout import _members
from workbench.symmetry._layout_push import HeadPermutation, _push_slice

from test_layout_gather_compose import _sp, _stepwise  # (a scaled permutation; moves applied one at a time)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_push_memo_gives_every_weight_its_own_moves(dtype):
    g = torch.Generator().manual_seed(0)
    H, d, dh = 8, 256, 32  # [heads, d_model, d_head] weights, stored as a projection's [heads·d_head, d_model]
    stream, other_stream = _sp(d, g), _sp(d, g)
    heads, other_heads = _sp(H, g, False), _sp(H, g, False)
    lift = HeadPermutation(heads, 1)  # one lifted move for several weights, as _weight_ops now makes it
    cases = []

    def weight(shape_mem, order_back):
        return torch.randn(*shape_mem, generator=g, dtype=dtype).permute(*order_back)

    # W_K and W_V: the same moves on both sides (the memo's hit); W_Q: the same stream, another head move;
    # W_X: the same head move, another stream; a bias [heads, d_head]: the lifted move at another axis length
    for head_move, stream_move in [(lift, stream), (lift, stream), (HeadPermutation(other_heads, 1), stream),
                                   (lift, other_stream)]:
        x = weight((H, dh, d), (0, 2, 1))  # memory order: heads, d_head, d_model
        cases.append((x, [(1, stream_move), (0, head_move)]))
    cases.append((torch.randn(H, dh, generator=g, dtype=dtype), [(0, lift)]))  # b_K: rows only, H entries
    # the query heads of one group (heads 1 and 3 of blocks of 4), on head axes of two lengths: its index per length
    part = HeadPermutation(_sp(2, g, False), 4, heads=(1, 3))
    for n in (16, 24, 16):
        cases.append((torch.randn(n, dh, generator=g, dtype=dtype), [(0, part), (1, _sp(dh, g))]))
    casts: dict = {}  # one push's memo, shared by every weight as _jobs shares it
    for x, run in cases:
        out = torch.empty_like(x)
        _push_slice(x, out, run, -1, casts)
        assert torch.equal(out, _stepwise(x, run))
    assert any(k[0] == "side" for k in casts)  # the memo was used (else this test checks nothing new)


def test_head_permutation_index_per_length():
    g = torch.Generator().manual_seed(1)
    F = HeadPermutation(_sp(4, g, False), 3)
    fresh = HeadPermutation(ScaledPermutation(F.perm.clone()), 3)
    assert torch.equal(F.index(12), fresh._compute(12))
    assert F.index(12) is F.index(12)  # kept for the push
    with pytest.raises(InvalidOptionError):  # another length is its own question, refused as before
        F.index(13)
    part = HeadPermutation(_sp(2, g, False), 4, heads=(1, 3))
    x = torch.arange(16.0)
    assert torch.equal(part.act(x, 0), part.act(x, 0))
    want = torch.arange(16)
    p = part.perm
    for j, h in enumerate((1, 3)):
        want[h * 4:(h + 1) * 4] = torch.arange(4) + (1, 3)[int(p[j])] * 4
    assert torch.equal(part.index(16), want)


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = self.a  # the same module under two names
        self.c = nn.Linear(4, 4, bias=False)  # a None parameter
        self.register_buffer("kept", torch.ones(2))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)
        self.register_buffer("missing", None)
        self.tied = nn.Linear(4, 3)
        self.tied.weight = self.a.weight  # one parameter under two names


def _reference(m: nn.Module):
    return [*m.named_parameters(remove_duplicate=False), *m.named_buffers(remove_duplicate=False)]


def test_members_are_named_parameters_then_buffers():
    for m in (_Shared(), nn.Sequential(_Shared(), nn.ReLU(), nn.LayerNorm(3))):
        got, want = _members(m), _reference(m)
        assert [k for k, _ in got] == [k for k, _ in want]
        assert all(a is b for (_, a), (_, b) in zip(got, want))


def test_members_ask_a_class_that_names_its_own():
    class Renamed(_Shared):
        def named_parameters(self, *a, **k):
            for name, p in super().named_parameters(*a, **k):
                yield "own." + name, p

    got = _members(Renamed())
    assert got and all(k.startswith("own.") for k, t in got if isinstance(t, nn.Parameter))


def test_members_of_a_hugging_face_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=20, n_positions=8)
    m = transformers.GPT2LMHeadModel(cfg)  # tied embedding and unembedding
    got, want = _members(m), _reference(m)
    assert [k for k, _ in got] == [k for k, _ in want] and all(a is b for (_, a), (_, b) in zip(got, want))


# LayerNorm families only: Hugging Face's RMSNorm (Qwen2, LLaMA, Mistral, Gemma) computes in float32 even in a
# float64 model, so theirs is float32's floor (~1e-7), which verify measures; test_layout_bits pins their bits.
@pytest.mark.parametrize("family", ["phi", "gpt_neox", "gpt2", "opt", "opt350", "bert"])
def test_transform_preserves_the_function_in_float64(family):
    """Directly (not through verify): the transformed float64 model's logits against the original's."""
    pytest.importorskip("transformers")
    from benchmarks.coverage_text import build, shapes

    torch.manual_seed(0)
    model = build(*shapes(quick=True, positions=64)[family]).double()
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    new, _ = wb.random_intertwiner(model, seed=5)
    with torch.no_grad():
        a, b = model(ids).logits, new(ids).logits
    changed = sum(not torch.equal(p, q) for p, q in zip(model.parameters(), new.parameters()))
    assert changed > len(list(model.parameters())) // 2  # the weights did move
    assert float((a - b).abs().max() / a.abs().max()) < 1e-10
