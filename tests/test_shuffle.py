"""Channel shuffle and ``chunk`` in the graph backend (docs/DERIVATIONS.md §8): ShuffleNetV2's units.

Which channels of a branch output may be permuted among themselves is computed here without the workbench:
the units' data movement (chunk, cat, the real ``channel_shuffle``) is run on labels, and two channels are
interchangeable iff the same conv reads them (``route``). Every transform is checked directly in float64
(``changed``), and hand-made elements that ignore the shuffle or cross a chunk must move the outputs."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import workbench as wb
from test_vision_constructs import changed, forced, one_thread, randomised  # noqa: F401  (one_thread: a fixture)
from workbench._errors import InvalidOptionError

F64 = torch.float64


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    return torch.transpose(x, 1, 2).contiguous().view(b, c, h, w)


def branch(cin: int, b: int) -> nn.Sequential:
    """conv1×1 → BN → ReLU → depthwise 3×3 → BN → conv1×1 → BN → ReLU (ShuffleNetV2's branch 2)."""
    return nn.Sequential(nn.Conv2d(cin, b, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(),
                         nn.Conv2d(b, b, 3, padding=1, groups=b, bias=False), nn.BatchNorm2d(b),
                         nn.Conv2d(b, b, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU())


class Unit(nn.Module):
    def __init__(self, cin: int, b: int, two: bool):
        super().__init__()
        self.two = two
        self.b1 = branch(cin, b) if two else nn.Sequential()
        self.b2 = branch(cin if two else b, b)

    def forward(self, x):
        if self.two:  # the stride-2 unit: both branches read the whole input
            out = torch.cat((self.b1(x), self.b2(x)), dim=1)
        else:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.b2(x2)), dim=1)
        return channel_shuffle(out, 2)


class Shuffle(nn.Module):
    """stem → one two-branch unit → ``units - 1`` chunk units → conv → mean → fc."""

    def __init__(self, b: int, units: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 2 * b, 3, padding=1, bias=False), nn.BatchNorm2d(2 * b), nn.ReLU())
        self.units = nn.Sequential(*[Unit(2 * b, b, i == 0) for i in range(units)])
        self.head = nn.Sequential(nn.Conv2d(2 * b, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.head(self.units(self.stem(x))).mean([2, 3]))


def route(units: list[tuple[str, bool]], C_of: dict, final: str) -> dict:
    """For each branch output (its last conv's name), the reader of each of its channels, by running the units'
    data movement on labels: ``units`` in order as (name, two-branch?) with C_of[name] the channels a unit writes;
    a two-branch unit's input and the model's last tensor are read whole by one reader."""
    readers: dict = {}
    state: list = []  # per channel of the current tensor: (writer, channel)

    def read(labels, who):
        for w, c in labels:
            readers.setdefault(w, {})[c] = who

    for name, two in units:
        C, half = C_of[name], C_of[name] // 2
        if two:
            read(state, name)
            out = [(f"{name}.b1", i) for i in range(half)] + [(f"{name}.b2", i) for i in range(half)]
        else:
            read(state[half:], name)
            out = state[:half] + [(f"{name}.b2", i) for i in range(half)]
        index = channel_shuffle(torch.arange(C).view(1, C, 1, 1), 2).flatten().tolist()  # the real shuffle
        state = [out[i] for i in index]
    read(state, final)
    return readers


def partition(labels) -> set:
    groups: dict = {}
    for c, v in enumerate(labels):
        groups.setdefault(v, set()).add(c)
    return {frozenset(s) for s in groups.values()}


def expected_classes(readers: dict, writer: str, n: int) -> set:
    return partition([readers.get(writer, {}).get(c) for c in range(n)])


def site_classes(site) -> set:
    return partition(site.group.labels) if site.group.name.startswith("classed_") else {frozenset(range(site.n))}


def site_written_by(smap, writer: str):
    return next(s for s in smap if any(p.name == writer for p in s.writers))


def hand_routes(model: Shuffle) -> dict:
    units = [(f"units.{i}", u.two) for i, u in enumerate(model.units)]
    C = model.stem[0].out_channels
    readers = route(units, {n: C for n, _ in units}, "head")
    return {f"{w}.5": r for w, r in readers.items()}  # "units.0.b2" → its last conv "units.0.b2.5"


def model_and_input(b: int, units: int, seed: int = 0):
    torch.manual_seed(seed)
    model = randomised(Shuffle(b, units), seed)
    return model, torch.randn(2, 3, 6, 6, dtype=F64, generator=torch.Generator().manual_seed(seed + 1))


def test_a_shuffle_block_takes_the_route_classes_of_the_derivation():
    model, x = model_and_input(4, 3)
    smap = wb.symmetry_map(model, x)
    assert smap.trace_error is None and [r for _, r in smap.skipped] == ["the model's output"]
    routes = hand_routes(model)
    for writer in ("units.0.b1.5", "units.0.b2.5", "units.1.b2.5", "units.2.b2.5"):
        site = site_written_by(smap, writer)
        assert site_classes(site) == expected_classes(routes, writer, site.n), writer
        family = site.group.base.name if site.group.name.startswith("classed_") else site.group.name
        assert family == "scaled_permutation", (writer, site.group.name)  # ReLU: D₊·P within the classes
    # with 4 channels a branch and 3 units, unit 0's branch outputs split (channel 0 passes unit 1 to unit 2's conv)
    assert len(site_classes(site_written_by(smap, "units.0.b1.5"))) > 1
    assert len(site_classes(site_written_by(smap, "units.2.b2.5"))) == 1  # the last unit: all read by the head


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_shuffle_block_keeps_its_function(seed):
    model, x = model_and_input(4, 3, seed)
    new, t = wb.random_intertwiner(model, seed=seed, example=x)
    assert changed(model, new, x) < 1e-10
    moved = [n for n, e in t.elements.items() if not torch.equal(e.perm, torch.arange(e.n))]
    assert any("b2" in n or "b1" in n for n in moved)  # the branch outputs really move
    assert wb.verify(model, new, x, transform=t).verdict == "PASS"
    m32 = model.float()
    new32, t32 = wb.random_intertwiner(m32, seed=seed, example=x.float())
    assert wb.verify(m32, new32, x.float(), transform=t32).verdict == "PASS"


def hand_push(model: Shuffle, writer: str, perm: torch.Tensor, shuffled: bool) -> Shuffle:
    """``model`` with the branch output ``writer`` (its last conv) permuted by ``perm`` and every conv reading its
    channels compensated at the columns where they arrive: through the shuffles (``shuffled``), or as if the units
    concatenated without shuffling (an element that ignores the shuffle)."""
    import copy

    new = copy.deepcopy(model)
    mods = dict(new.named_modules())
    unit, br = writer.split(".")[1], writer.split(".")[2]
    bn = mods[f"units.{unit}.{br}.6"]
    with torch.no_grad():
        mods[writer].weight.copy_(mods[writer].weight[perm])
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            t.copy_(t[perm])
    cols = columns(model, shuffled)
    label = f"units.{unit}.{br}"
    for reader, layout in cols.items():
        conv = mods[reader]
        pos = {lab: j for j, lab in enumerate(layout)}
        W = conv.weight.detach().clone()
        for j, (w, c) in enumerate(layout):
            if w == label and (w, int(perm[c])) in pos:
                W[:, j] = conv.weight[:, pos[(w, int(perm[c]))]]
        with torch.no_grad():
            conv.weight.copy_(W)
    return new


def columns(model: Shuffle, shuffled: bool) -> dict:
    """Per conv reading a unit's input, the (branch, channel) at each of its input columns."""
    C, half = model.stem[0].out_channels, model.stem[0].out_channels // 2
    state, out = [("stem", i) for i in range(C)], {}
    for i, u in enumerate(model.units):
        if u.two:
            out[f"units.{i}.b1.0"] = out[f"units.{i}.b2.0"] = list(state)
            new = [(f"units.{i}.b1", j) for j in range(half)] + [(f"units.{i}.b2", j) for j in range(half)]
        else:
            out[f"units.{i}.b2.0"] = state[half:]
            new = state[:half] + [(f"units.{i}.b2", j) for j in range(half)]
        index = channel_shuffle(torch.arange(C).view(1, C, 1, 1), 2).flatten().tolist() if shuffled else range(C)
        state = [new[j] for j in index]
    out["head.0"] = state
    return out


def test_an_element_that_ignores_the_shuffle_changes_the_output():
    model, x = model_and_input(4, 3)
    routes = hand_routes(model)
    writer = "units.0.b2.5"
    classes = sorted(expected_classes(routes, writer, 4), key=min)
    big = next(sorted(c) for c in classes if len(c) > 1)
    perm = torch.arange(4)
    perm[big[0]], perm[big[1]] = big[1], big[0]  # a swap inside one class: a symmetry
    assert changed(model, hand_push(model, writer, perm, shuffled=True), x) < 1e-10
    assert changed(model, hand_push(model, writer, perm, shuffled=False), x) > 1e-6
    # a swap across classes: no reader can take it (one channel is read by a conv, the other passes on)
    a, b = min(classes[0]), min(classes[1])
    cross = torch.arange(4)
    cross[a], cross[b] = b, a
    assert changed(model, hand_push(model, writer, cross, shuffled=True), x) > 1e-6
    site = site_written_by(wb.symmetry_map(model, x), writer)
    with pytest.raises(InvalidOptionError, match="chunk or channel shuffle"):
        forced(model, site.name, cross, x=x)
    from workbench.groups import ScaledPermutation

    assert site.group.contains(ScaledPermutation(perm)) and not site.group.contains(ScaledPermutation(cross))


def test_a_chunk_read_by_something_unknown_freezes_what_it_carries():
    class Odd(Shuffle):
        def forward(self, x):
            y = self.units(self.stem(x))
            a, b = y.chunk(2, dim=1)
            return self.fc(self.head(torch.cat((a, b.cumsum(1)), 1)).mean([2, 3]))

    torch.manual_seed(0)
    model = randomised(Odd(4, 2))
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    smap = wb.symmetry_map(model, x)
    frozen = " ".join(r for _, r in smap.skipped)
    assert "cumsum" in frozen and "cannot move" in frozen
    new, t = wb.random_intertwiner(model, seed=0, example=x)
    assert changed(model, new, x) < 1e-10


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 5), units=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_random_shuffle_blocks_keep_their_function(b, units, seed):
    model, x = model_and_input(b, units, seed)
    smap = wb.symmetry_map(model, x)
    assert [r for _, r in smap.skipped] == ["the model's output"]
    routes = hand_routes(model)
    for writer in routes:
        if writer.startswith("units"):
            site = site_written_by(smap, writer)
            assert site_classes(site) == expected_classes(routes, writer, site.n), writer
    new, t = wb.random_intertwiner(model, seed=seed, example=x)
    assert changed(model, new, x) < 1e-10


def torchvision_routes(model) -> dict:
    units, C_of = [], {}
    for stage in ("stage2", "stage3", "stage4"):
        for i, u in enumerate(getattr(model, stage)):
            name = f"{stage}.{i}"
            units.append((name, u.stride > 1))
            C_of[name] = 2 * u.branch2[0].out_channels
    readers = route(units, C_of, "conv5")
    return {f"{w[:-3]}.branch1.2" if w.endswith(".b1") else f"{w[:-3]}.branch2.5": r for w, r in readers.items()}


@pytest.mark.slow
def test_shufflenet_v2_maps_its_branches_and_keeps_its_function(one_thread):
    from workbench.models import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torchvision

    model = randomised(torchvision.models.shufflenet_v2_x0_5(weights=None))
    x = torch.randn(2, 3, 64, 64, dtype=F64, generator=torch.Generator().manual_seed(1))
    smap = wb.symmetry_map(model, x)
    assert len(smap) > 18 and [r for _, r in smap.skipped] == ["the model's output"]
    routes = torchvision_routes(model)
    for writer in routes:
        if writer != "conv5":
            site = site_written_by(smap, writer)
            assert site_classes(site) == expected_classes(routes, writer, site.n), writer
    sizes = lambda w: sorted((len(c) for c in site_classes(site_written_by(smap, w))), reverse=True)  # noqa: E731
    assert sizes("stage2.0.branch1.2") == [12, 6, 3, 3]  # DERIVATIONS §8
    assert sizes("stage3.0.branch1.2") == [24, 12, 6, 3, 1, 1, 1]
    assert sizes("stage2.3.branch2.5") == [24]  # a stage's last unit: all read by the next stage
    for seed in (0, 1):
        new, t = wb.random_intertwiner(model, seed=seed, example=x)
        assert changed(model, new, x) < 1e-10
        assert wb.verify(model, new, x, transform=t).verdict == "PASS"
    m32 = model.float()
    new, t = wb.random_intertwiner(m32, seed=0, example=x.float())
    assert wb.verify(m32, new, x.float(), transform=t).verdict == "PASS"


class Groups(nn.Module):
    """g branches concatenated and shuffled in g groups, chunked in g, pieces 1… through a layer, shuffled again."""

    def __init__(self, act, g: int, b: int = 4):
        super().__init__()
        self.g = g
        self.stem = nn.Conv2d(3, g * b, 1)
        self.bs = nn.ModuleList([nn.Sequential(nn.Conv2d(g * b, b, 1), act()) for _ in range(g)])
        self.mid = nn.ModuleList([nn.Sequential(nn.Conv2d(b, b, 1), act()) for _ in range(g)])
        self.head = nn.Conv2d(g * b, 5, 1)

    def forward(self, x):
        x = self.stem(x)
        parts = channel_shuffle(torch.cat([m(x) for m in self.bs], 1), self.g).chunk(self.g, dim=1)
        z = torch.cat([parts[0]] + [self.mid[i](parts[i]) for i in range(1, self.g)], 1)
        return self.head(channel_shuffle(z, self.g)).mean([2, 3])


# The family each branch takes, within its classes (a linear branch: scaled permutations, smaller than the
# block-diagonal maps the derivation allows).
FAMILY = {nn.ReLU: "scaled_permutation", nn.Tanh: "signed_permutation", nn.GELU: "permutation",
          nn.Identity: "diagonal_permutation"}


@pytest.mark.parametrize("act", list(FAMILY))
@pytest.mark.parametrize("g", [2, 3])
def test_other_activations_and_group_counts_keep_their_function(act, g):
    model = randomised(Groups(act, g))
    x = torch.randn(2, 3, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(g))
    smap = wb.symmetry_map(model, x)
    assert [r for _, r in smap.skipped] == ["the model's output"]
    branches = [site_written_by(smap, f"bs.{i}.0") for i in range(g)]
    assert {s.group.name for s in branches} == {f"classed_{FAMILY[act]}"}
    assert all(len(site_classes(s)) > 1 for s in branches)
    new, t = wb.random_intertwiner(model, seed=g, example=x)
    assert changed(model, new, x) < 1e-10


def test_a_linear_space_shuffled_whole_takes_any_invertible_map():
    class Whole(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.h = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 5, 1)

        def forward(self, x):
            return self.h(channel_shuffle(torch.cat([self.a(x), self.b(x)], 1), 2)).mean([2, 3])

    model = randomised(Whole())
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    smap = wb.symmetry_map(model, x)
    assert smap["a"].group.name == smap["b"].group.name == "gl"  # carried whole: no class to keep
    new, t = wb.random_intertwiner(model, seed=1, example=x)
    assert changed(model, new, x) < 1e-10
    assert not torch.equal(new.h.weight, model.h.weight)  # the shuffled reader moved by S·blockdiag(Q_a, Q_b)·Sᵀ
