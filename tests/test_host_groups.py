"""A host site's own group (docs/DERIVATIONS.md §6, §8): a concatenation, a zero-padding shortcut or a shuffled layout
moves by the block-diagonal of what it carries, so its group is the product of the carried sites' groups block by
block (and of its own family on the channels nothing carries), not its family over its whole width.

Membership is checked against the structure written out here (which channels each piece holds), and every verdict
about the function directly: the transformed model's float64 outputs against the original's (``changed``)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import workbench as wb
from models import TinyResNet, randomise
from test_vision_constructs import changed, weights
from workbench._errors import InvalidOptionError
from workbench.groups import Dense, ScaledPermutation
from workbench.symmetry import Transform

F64 = torch.float64


class Two(nn.Module):
    """The brief's reproducer: c(relu(cat(a(x), b(x)))), pieces of 4 and 5 channels with their own writers."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 5, 1), nn.Conv2d(9, 2, 1)

    def forward(self, x):
        return self.c(torch.relu(torch.cat([self.a(x), self.b(x)], 1))).mean((2, 3))


def test_the_map_s_table_shows_a_host_group_s_blocks_on_hover():
    """The HTML table's group cell is the registry name; its label (a host's blocks, which the name
    ``scaled_permutation_per_block`` does not say) is the cell's hover text, as to_frame's label column gives it."""
    import re

    smap = wb.symmetry_map(weights(Two()).eval(), torch.randn(2, 3, 5, 5))
    cells = dict(re.findall(r'<td title="([^"]*)">([a-z_]+)</td>', smap._repr_html_()))
    assert cells["scaled_permutation on each of 2 blocks (4 + 5)"] == "scaled_permutation_per_block"
    assert smap.to_frame().set_index("site").loc["cat", "label"] == "scaled_permutation on each of 2 blocks (4 + 5)"


def blocks_kept(e: ScaledPermutation, bounds) -> bool:
    """Whether the permutation maps each block [lo, hi) of channels onto itself."""
    return all(bool(((e.perm[lo:hi] >= lo) & (e.perm[lo:hi] < hi)).all()) for lo, hi in bounds)


def test_a_concatenation_s_group_holds_exactly_its_block_diagonal_elements():
    model = weights(Two()).double()
    x = torch.randn(3, 3, 5, 5, dtype=F64)
    smap = wb.symmetry_map(model, x)
    G = smap["cat"].group
    assert (G.name, G.n, G.label) == ("scaled_permutation_per_block", 9, "scaled_permutation on each of 2 blocks (4 + 5)")
    assert smap["cat"].privileged and not G.continuous
    drawn = G.sample_many(30, seed=1)
    assert all(blocks_kept(e, [(0, 4), (4, 9)]) and bool((e.scale > 0).all()) and G.contains(e) for e in drawn)
    assert any(not bool((e.perm == torch.arange(9)).all()) for e in drawn)  # not the identity alone
    cross = torch.arange(9)
    cross[[0, 8]] = cross[[8, 0]]
    assert not G.contains(ScaledPermutation(cross, None))  # the whole of scaled_permutation(9) accepted it
    inside = torch.tensor([1, 0, 3, 2, 8, 4, 5, 6, 7])
    assert G.contains(ScaledPermutation(inside, torch.rand(9, dtype=F64) + 0.5))
    assert not G.contains(ScaledPermutation(inside, -torch.ones(9, dtype=F64)))  # a ReLU reads it: no sign flips
    rotated = torch.eye(9, dtype=F64)
    rotated[:4, :4] = torch.linalg.qr(torch.randn(4, 4, dtype=F64))[0]
    assert not G.contains(Dense(rotated))
    # A sample of the host, with the pieces' elements read off its blocks: a symmetry, accepted unforced, and exact.
    e = drawn[0]
    pieces = {"a": ScaledPermutation(e.perm[:4], e.scale[:4]), "b": ScaledPermutation(e.perm[4:] - 4, e.scale[4:])}
    t = Transform({**pieces, "cat": e}, {"a": "scaled_permutation", "b": "scaled_permutation", "cat": G.name})
    assert changed(model, wb.apply_transform(model, t, example=x), x) < 1e-10
    # negative control: the cross-block permutation, forced, moves the outputs
    bad = Transform({"cat": ScaledPermutation(cross, None)}, {"cat": "forced"}, ["cat"])
    assert changed(model, wb.apply_transform(model, bad, example=x), x) > 1e-6
    # random_intertwiner's host elements are in the group, named after it, and survive a round trip
    new, t = wb.random_intertwiner(model, seed=4, example=x)
    assert G.contains(t.elements["cat"]) and t.groups["cat"] == G.name and changed(model, new, x) < 1e-10
    again = Transform.from_dict(t.to_dict())
    assert again.groups["cat"] == G.name and t.elements["cat"].group == G.name
    assert changed(model, wb.apply_transform(model, again, example=x), x) < 1e-10


def test_a_zero_padding_shortcut_s_new_channels_take_its_family_and_nothing_else():
    """The host of a CIFAR ResNet's stride-2 block (conv output + zero-padded shortcut, then ReLU): its carried
    channels take the shortcut's element, its new channels scaled permutations among themselves. A rotation of the
    new channels in a hand-made transform was accepted unforced (nothing checked them) and moved the outputs."""
    model = randomise(TinyResNet("option_a")).double()
    x = torch.randn(3, 3, 8, 8, dtype=F64)
    host = next(s for s in wb.symmetry_map(model, x) if s.embeds)
    (piece, start, count, _), = host.embeds
    G = host.group
    free = [c for c in range(host.n) if not start <= c < start + count]
    assert G.label == f"scaled_permutation on each of 2 blocks ({count} + {len(free)} free)" and list(G.free) == free
    for e in G.sample_many(20, seed=3):
        assert G.contains(e) and blocks_kept(e, [(start, start + count)]) and set(e.perm[free].tolist()) == set(free)
    swap = torch.arange(host.n)
    swap[[start, free[0]]] = swap[[free[0], start]]
    assert not G.contains(ScaledPermutation(swap, None))
    rotation = torch.eye(host.n, dtype=F64)
    idx = torch.tensor(free)
    rotation[idx.unsqueeze(1), idx] = torch.linalg.qr(torch.randn(len(free), len(free), dtype=F64))[0]
    assert not G.contains(Dense(rotation))
    with pytest.raises(InvalidOptionError, match="nothing carries into it"):
        wb.apply_transform(model, Transform({host.name: Dense(rotation)}, {host.name: "gl"}), example=x)
    forced = Transform({host.name: Dense(rotation)}, {host.name: "gl"}, [host.name])
    assert changed(model, wb.apply_transform(model, forced, example=x), x) > 1e-3  # the refusal is needed: 1.4 here
    perm = torch.arange(host.n)
    perm[idx] = idx[torch.randperm(len(free), generator=torch.Generator().manual_seed(0))]
    scale = torch.ones(host.n, dtype=F64)
    scale[idx] = torch.rand(len(free), dtype=F64) + 0.5
    ok = ScaledPermutation(perm, scale)
    assert G.contains(ok)  # identity on the carried channels (the shortcut is not chosen), D₊·P on the new ones
    assert changed(model, wb.apply_transform(model, Transform({host.name: ok}, {host.name: G.name}), example=x), x) < 1e-10


class Pieces(nn.Module):
    """cat of k pieces, each conv → its own activation (or none), then the reader: a ReLU and a conv, or a conv."""

    def __init__(self, widths, acts, relu):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3, w, 1) for w in widths)
        self.acts, self.relu = [{"relu": torch.relu, "tanh": torch.tanh, "none": lambda h: h}[a] for a in acts], relu
        self.out = nn.Conv2d(sum(widths), 2, 1)

    def forward(self, x):
        h = torch.cat([act(conv(x)) for conv, act in zip(self.convs, self.acts)], 1)
        return self.out(torch.relu(h) if self.relu else h).mean((2, 3))


@settings(max_examples=25, deadline=None)
@given(widths=st.lists(st.integers(1, 5), min_size=1, max_size=4), data=st.data(), relu=st.booleans(),
       seed=st.integers(0, 99))
def test_a_host_group_is_the_product_of_its_pieces_over_piece_sizes(widths, data, relu, seed):
    acts = data.draw(st.lists(st.sampled_from(["relu", "tanh", "none"]), min_size=len(widths), max_size=len(widths)))
    torch.manual_seed(seed)
    model = weights(Pieces(widths, acts, relu), seed).double()
    x = torch.randn(3, 3, 4, 4, dtype=F64)
    smap = wb.symmetry_map(model, x)
    host = next(s for s in smap if s.embeds)
    G = host.group
    bounds = [(sum(widths[:i]), sum(widths[:i + 1])) for i in range(len(widths))]
    assert G.n == sum(widths) and [(a, a + c) for _, a, c, _ in host.embeds] == bounds
    assert G.continuous == any(smap[p].group.continuous for p, *_ in host.embeds) == (not host.privileged)
    for e in G.sample_many(5, seed=seed):
        assert G.contains(e)
        if isinstance(e, ScaledPermutation):
            assert blocks_kept(e, bounds)
        else:  # a GL piece: zero outside the diagonal blocks
            mask = torch.zeros(G.n, G.n, dtype=torch.bool)
            for lo, hi in bounds:
                mask[lo:hi, lo:hi] = True
            assert bool((e.matrix()[~mask] == 0).all())
    new, t = wb.random_intertwiner(model, seed=seed, example=x)
    assert changed(model, new, x) < 1e-10 and G.contains(t.elements[host.name])
    if len(widths) > 1:  # a transposition across two pieces is outside it
        cross = torch.arange(G.n)
        cross[[0, G.n - 1]] = cross[[G.n - 1, 0]]
        assert not G.contains(ScaledPermutation(cross, None))


class Shapes(nn.Module):
    """A site carried twice (``twice``), a concatenation of a concatenation (``nested``), |·| pieces (φ = abs)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a, self.b, self.d = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 5, 1), nn.Conv2d(3, 2, 1)
        self.c = nn.Conv2d({"twice": 13, "nested": 11, "abs": 9}[kind], 2, 1)

    def forward(self, x):
        if self.kind == "abs":
            return self.c(torch.cat([self.a(x).abs(), self.b(x).abs()], 1)).mean((2, 3))
        a, b = torch.relu(self.a(x)), torch.relu(self.b(x))
        h = torch.cat([a, b, a], 1) if self.kind == "twice" else torch.cat([torch.cat([a, b], 1), torch.relu(self.d(x))], 1)
        return self.c(torch.relu(h)).mean((2, 3))


@pytest.mark.parametrize("kind", ["twice", "nested", "abs"])
def test_hosts_of_repeated_nested_and_abs_pieces(kind):
    model = weights(Shapes(kind)).double()
    x = torch.randn(3, 3, 4, 4, dtype=F64)
    smap = wb.symmetry_map(model, x)
    hosts = [s for s in smap if s.embeds]
    for seed in range(3):
        new, t = wb.random_intertwiner(model, seed=seed, example=x)
        assert changed(model, new, x) < 1e-10
        assert all(h.group.contains(t.elements[h.name]) and h.group.contains(h.group.sample(seed=seed)) for h in hosts)
    G = hosts[-1].group
    if kind == "twice":  # a's element on channels 0–3 and 9–12 at once: different ones there are no element
        assert G.label.endswith("a site carried twice takes one element on its blocks")
        e = G.sample(seed=0)
        perm = e.perm.clone()
        perm[9:13] = 9 + torch.roll(e.perm[:4], 1)  # another permutation of a's channels than on 0–3
        assert not G.contains(ScaledPermutation(perm, e.scale))
    elif kind == "nested":  # the outer host's block for the inner one is the inner host's group
        inner, outer = hosts
        assert outer.group.pieces[inner.name] is inner.group
        cross = torch.arange(11)
        cross[[0, 8]] = cross[[8, 0]]  # inside the inner block, across its pieces
        assert not outer.group.contains(ScaledPermutation(cross, None))
    else:  # the concatenation reads |a(x)|, |b(x)|: its element is |D|·P, no sign flips
        assert G.label == "φ(diagonal_permutation) on each of 2 blocks (4 + 5)"
        flip = torch.ones(9, dtype=F64)
        flip[2] = -1
        assert not G.contains(ScaledPermutation(torch.arange(9), flip))
        forced = Transform({"cat": ScaledPermutation(torch.arange(9), flip)}, {"cat": "forced"}, ["cat"])
        assert changed(model, wb.apply_transform(model, forced, example=x), x) > 1e-6


def _torchvision():
    pytest.importorskip("torchvision")
    from workbench.models import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torchvision

    return torchvision


@pytest.mark.slow
@pytest.mark.parametrize("name", ["densenet121", "squeezenet1_1", "shufflenet_v2_x0_5"])
def test_torchvision_hosts_have_their_own_groups_and_still_transform_exactly(name):
    tv = _torchvision()
    torch.manual_seed(0)
    model = randomise(getattr(tv.models, name)(weights=None)).double()
    x = torch.randn(2, 3, 32 if name == "densenet121" else 64, 32 if name == "densenet121" else 64, dtype=F64)
    smap = wb.symmetry_map(model, x)
    hosts = [s for s in smap if s.embeds]
    assert hosts and all(h.group.name.endswith("_per_block") and h.privileged for h in hosts)
    new, t = wb.random_intertwiner(model, seed=1, example=x)
    assert changed(model, new, x) < 1e-10
    assert all(h.group.contains(t.elements[h.name]) for h in hosts)
    for h in hosts[-2:]:
        assert h.group.contains(h.group.sample(seed=2))
        if all(isinstance(start, int) for _, start, *_ in h.embeds) and len(h.embeds) > 1:
            cross = torch.arange(h.n)
            cross[[0, h.n - 1]] = cross[[h.n - 1, 0]]
            assert not h.group.contains(ScaledPermutation(cross, None))
