"""Sub-modules torch.fx cannot trace into are kept whole (``models/_trace.trace_kept_whole``), and the rest of the model
is mapped. Found by the timm sweep (benchmarks/sweep_timm.py): ConViT, Twins, TinyViT, MobileViT, EfficientViT and
timm's VGG had 0 sites because one sub-module branches on a tensor's shape; now the modules that do are opaque to the
rules (what they read and make cannot move) and the others are sites.

Each verdict is checked directly in float64 (``changed``, each output unit against its own scale), with the adversaries
that would fool a kept-whole module: a Linear subclass whose rewritten forward the rules must not read as a Linear, a
weight shared with a module outside, modules nested in one another, and a branch in the model's own forward."""
from __future__ import annotations

import torch
from torch import nn

import workbench as wb
from test_vision_constructs import changed, forced

F64 = torch.float64


class Branchy(nn.Module):
    """A block whose forward branches on its input's shape (timm's window attention, ConvMlp, MobileViT's unfold)."""

    def __init__(self, c):
        super().__init__()
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        if x.shape[-1] > 1:  # control flow on a traced value: fx cannot trace this forward
            x = x * 1.0
        return torch.tanh(self.fc(x))


class LinearWithABranch(nn.Linear):
    """A Linear subclass whose rewritten forward is not a Linear: the rules must not take it for one."""

    def forward(self, x):
        if x.shape[0] > 0:
            return torch.relu(super().forward(x)) ** 2
        return super().forward(x)


class Net(nn.Module):
    def __init__(self, inner: nn.Module, c=6, tie=False):
        super().__init__()
        self.a, self.b, self.c, self.head = nn.Linear(4, c), nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, 3)
        self.inner = inner
        if tie:  # the kept-whole module's weight is also the weight of a module outside it
            self.c.weight = inner.fc.weight

    def forward(self, x):
        h = torch.relu(self.a(x))  # a site: read by b
        h = torch.relu(self.b(h))  # read by the kept-whole module: frozen
        h = self.inner(h)
        return self.head(torch.relu(self.c(h)))  # c's output: a site read by head


def built(inner, **kw):
    torch.manual_seed(0)
    return Net(inner, **kw).double().eval()


def sites(smap) -> dict:
    return {s.name: s.group.name for s in smap}


def test_a_submodule_fx_cannot_trace_is_kept_whole_and_the_rest_is_mapped():
    model = built(Branchy(6))
    x = torch.randn(5, 4, dtype=F64)
    smap = wb.symmetry_map(model, x[:1])
    assert sites(smap) == {"a": "scaled_permutation", "c": "scaled_permutation"}, (sites(smap), smap.skipped)
    reasons = " ".join(r for _, r in smap.skipped)
    assert "inner (Branchy) is kept whole" in reasons and "x.shape[-1] > 1" in reasons
    for seed in range(3):
        new, _ = wb.random_intertwiner(model, seed=seed, example=x[:1])
        assert changed(model, new, x) < 1e-10
    # negative control: a permutation at a site pushed into its writer only moves the outputs
    bad = forced(model, "a", torch.roll(torch.arange(6), 1), [1.0] * 5 + [-1.0], x=x[:1])
    assert changed(model, bad, x) > 1e-6


def test_a_kept_whole_linear_subclass_is_not_read_as_a_linear():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = LinearWithABranch(6, 6)

        def forward(self, x):
            return self.fc(x)

    model = built(Holder())
    x = torch.randn(5, 4, dtype=F64)
    smap = wb.symmetry_map(model, x[:1])
    # read as a Linear, b's output and fc's output would be sites (fc a reader and a writer); kept whole, neither is
    assert "inner.fc" in " ".join(r for _, r in smap.skipped)
    assert set(sites(smap)) == {"a", "c"}, sites(smap)
    for seed in range(3):
        new, _ = wb.random_intertwiner(model, seed=seed, example=x[:1])
        assert changed(model, new, x) < 1e-10


def test_a_weight_shared_with_a_kept_whole_module_does_not_move():
    model = built(Branchy(6), tie=True)
    x = torch.randn(5, 4, dtype=F64)
    smap = wb.symmetry_map(model, x[:1])
    assert "c" not in sites(smap), sites(smap)  # c's weight is also inside the opaque module
    for seed in range(3):
        new, _ = wb.random_intertwiner(model, seed=seed, example=x[:1])
        assert changed(model, new, x) < 1e-10
        assert new.c.weight is new.inner.fc.weight or torch.equal(new.c.weight, new.inner.fc.weight)


def test_nested_untraceable_modules_are_kept_whole_from_the_inside_out():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.inner = nn.Linear(6, 6), Branchy(6)

        def forward(self, x):
            x = self.inner(torch.relu(self.fc(x)))
            if x.shape[0] > 0:  # the outer module branches too: kept whole after its inner one
                x = x + 0.0
            return x

    model = built(Outer())
    x = torch.randn(5, 4, dtype=F64)
    smap = wb.symmetry_map(model, x[:1])
    reasons = " ".join(r for _, r in smap.skipped)
    assert "inner (Outer) is kept whole" in reasons, reasons
    assert sites(smap) == {"a": "scaled_permutation", "c": "scaled_permutation"}, sites(smap)
    new, _ = wb.random_intertwiner(model, seed=0, example=x[:1])
    assert changed(model, new, x) < 1e-10


def test_a_branch_in_the_models_own_forward_is_still_refused_with_its_line_and_a_hint():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            if x.shape[0] > 0:
                x = x * 1.0
            return self.b(torch.relu(self.a(x)))

    model = Root().double().eval()
    smap = wb.symmetry_map(model, torch.randn(2, 4, dtype=F64))
    assert len(smap) == 0
    why = smap.skipped[0][1]
    assert "x.shape[0] > 0" in why and "map a part of it" in why, why


def resample_table(table: torch.Tensor, n: int) -> torch.Tensor:
    """A module-level helper that branches on a size (timm's resample_abs_pos_embed): fx cannot trace into it."""
    if table.shape[0] != n:
        table = table[:n]
    return table


class WithTable(nn.Module):
    """The branch is in a function the model's own forward calls: that function is kept whole (one recorded call)."""

    def __init__(self, c=6):
        super().__init__()
        self.table = nn.Parameter(torch.randn(8, c, dtype=F64))
        self.a, self.b, self.head = nn.Linear(4, c), nn.Linear(c, c), nn.Linear(c, 3)

    def forward(self, x):
        h = self.a(x) + resample_table(self.table, x.shape[0])  # the stream meets the kept-whole call: frozen
        h = self.b(torch.relu(h))  # the ReLU's space, written by a and read by b... a is frozen with the stream
        return self.head(torch.relu(h))  # b's output: a site read by head


def test_a_function_fx_cannot_trace_is_kept_whole_and_the_rest_is_mapped():
    torch.manual_seed(0)
    model = WithTable().double().eval()
    x = torch.randn(5, 4, dtype=F64)
    smap = wb.symmetry_map(model, x)
    reasons = " ".join(r for _, r in smap.skipped)
    assert "resample_table() is kept whole" in reasons and "table.shape[0] != n" in reasons, reasons
    assert sites(smap) == {"b": "scaled_permutation"}, (sites(smap), smap.skipped)
    for seed in range(3):
        new, _ = wb.random_intertwiner(model, seed=seed, example=x)
        assert changed(model, new, x) < 1e-10
    bad = forced(model, "b", torch.roll(torch.arange(6), 1), [1.0] * 5 + [-1.0], x=x)
    assert changed(model, bad, x) > 1e-6


def test_every_module_of_a_class_fx_cannot_trace_is_kept_whole_at_once():
    """Forty blocks of one untraceable class (timm's PNASNet has more than the 32 retries allow one by one)."""

    class Deep(nn.Module):
        def __init__(self, n=40, c=4):
            super().__init__()
            self.a, self.head = nn.Linear(4, c), nn.Linear(c, 3)
            self.blocks = nn.ModuleList([Branchy(c) for _ in range(n)])

        def forward(self, x):
            h = torch.relu(self.a(x))
            for block in self.blocks:
                h = h + block(h)
            return self.head(h)

    torch.manual_seed(0)
    model = Deep().double().eval()
    x = torch.randn(3, 4, dtype=F64)
    smap = wb.symmetry_map(model, x[:1])
    reasons = " ".join(r for _, r in smap.skipped)
    assert "blocks.39 (Branchy) is kept whole" in reasons, reasons[:500]
    new, _ = wb.random_intertwiner(model, seed=0, example=x[:1])
    assert changed(model, new, x) < 1e-10


def avg_pool_mixing(x: torch.Tensor) -> torch.Tensor:
    """Named like a pooling, but mixes channels (and branches on a shape, so it is kept whole): the rules must not go
    by its name."""
    if x.shape[0] > 0:
        x = x.flip(1)  # reverses the channels
    return x


def test_a_kept_whole_function_is_not_read_by_its_name():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Linear(4, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            h = avg_pool_mixing(h)  # read as an average pooling, the ReLU's space would pass it and move
            return self.head(torch.relu(self.b(h)).mean((2, 3)))

    torch.manual_seed(0)
    model = Net().double().eval()
    x = torch.randn(3, 3, 5, 5, dtype=F64)
    smap = wb.symmetry_map(model, x[:1])
    assert "avg_pool_mixing() is kept whole" in " ".join(r for _, r in smap.skipped)
    assert "a" not in sites(smap), sites(smap)
    for seed in range(3):
        new, _ = wb.random_intertwiner(model, seed=seed, example=x[:1])
        assert changed(model, new, x) < 1e-10
