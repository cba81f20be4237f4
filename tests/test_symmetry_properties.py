"""Property tests: random architectures with the features that fooled the symmetry rules (issue 16).

Shared modules, tied weights, functional activations with random arguments, in-place ops, residual
additions, constants and BatchNorm. For every sampled model and seed, either the map freezes a place
with a stated reason (and then its parameters are untouched), or the transformed model's outputs equal
the original's in float64 to 1e-10 — computed here, not by ``verify``. Negative controls: at every
site, an element outside its group must make ``verify`` FAIL, and the test sees the output move.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from torch import nn

import workbench as wb
from models import randomise
from workbench.groups import Dense, ScaledPermutation, get_group
from workbench.symmetry._lattice import generators

F64 = torch.float64


# ------------------------------------------------------------------ the random architectures
def _activation(draw):
    """(callable applied in forward, whether it may run in place), arguments drawn at random."""
    slope = draw(st.sampled_from([0.0, 1.0, -1.0, 0.2, -0.4, 2.5]))
    alpha = draw(st.sampled_from([0.0, 0.5, 1.0]))
    lo = draw(st.sampled_from([-1.0, 0.0, -2.0, -math.inf]))
    hi = draw(st.sampled_from([1.0, 2.0, 6.0, math.inf]))
    lam = draw(st.sampled_from([0.0, 0.3]))
    beta = draw(st.sampled_from([0.5, 1.0, 3.0]))
    kind = draw(st.sampled_from(["relu", "relu_", "relu_module_inplace", "leaky", "leaky_inplace", "elu", "hardtanh",
                                 "clamp", "clamp_", "softplus", "softshrink", "tanh", "gelu", "sigmoid", "prelu",
                                 "prelu_channels", "abs_", "module_elu"]))
    return kind, dict(slope=slope, alpha=alpha, lo=lo, hi=hi, lam=lam, beta=beta)


class Act(nn.Module):
    """Applies one drawn activation in forward — functional calls are traced with their arguments."""

    def __init__(self, kind: str, p: dict, width: int):
        super().__init__()
        self.kind, self.p = kind, p
        if kind == "relu_module_inplace":
            self.m = nn.ReLU(inplace=True)
        elif kind == "prelu":
            self.m = nn.PReLU(init=p["slope"] if p["slope"] not in (0.0,) else 0.25)
        elif kind == "prelu_channels":
            self.m = nn.PReLU(width)
            with torch.no_grad():
                self.m.weight.copy_(torch.linspace(-0.5, 0.5, width))
        elif kind == "module_elu":
            self.m = nn.ELU(alpha=p["alpha"])

    def forward(self, h):
        k, p = self.kind, self.p
        if hasattr(self, "m"):
            out = self.m(h)
            return h if k == "relu_module_inplace" else out  # in place: later code reads the overwritten input
        if k == "relu":
            return F.relu(h)
        if k == "relu_":
            h.relu_()
            return h
        if k == "leaky":
            return F.leaky_relu(h, p["slope"])
        if k == "leaky_inplace":
            F.leaky_relu(h, p["slope"], inplace=True)
            return h
        if k == "elu":
            return F.elu(h, alpha=p["alpha"])
        if k == "hardtanh":
            lo, hi = max(p["lo"], -5.0), min(p["hi"], 5.0)
            return F.hardtanh(h, lo, hi if hi > lo else lo + 1.0)
        if k == "clamp":
            return torch.clamp(h, min=p["lo"], max=None if p["hi"] == math.inf else p["hi"])  # min=-inf: no bound
        if k == "clamp_":
            h.clamp_(p["lo"] if p["lo"] > -math.inf else -3.0, p["hi"] if p["hi"] < math.inf else 3.0)
            return h
        if k == "softplus":
            return F.softplus(h, beta=p["beta"])
        if k == "softshrink":
            return F.softshrink(h, p["lam"])
        if k == "abs_":
            h.abs_()
            return h
        return {"tanh": torch.tanh, "gelu": F.gelu, "sigmoid": torch.sigmoid}[k](h)


class Random(nn.Module):
    """A stack of ops on a hidden vector [batch, width], executed in the order drawn."""

    def __init__(self, ops: list, d_in: int = 4, d_out: int = 3):
        super().__init__()
        self.ops, self.mods = ops, nn.ModuleList()
        self.first = nn.Linear(d_in, ops[0][1] if ops and ops[0][0] == "width" else 4)
        width = self.first.out_features
        self.plan = []
        square: list[int] = []  # indices of width→width layers, to call again or to tie to

        def add(m: nn.Module) -> int:
            self.mods.append(m)
            return len(self.mods) - 1

        def square_layer(pick: int) -> int:
            fits = [i for i in square if self.mods[i].in_features == width]
            if fits:
                return fits[pick % len(fits)]
            square.append(add(nn.Linear(width, width)))
            return square[-1]

        for op in ops:
            kind = op[0]
            if kind == "linear":
                out, bn, tie = op[1], op[2], op[3]
                lin = nn.Linear(width, out)
                fits = [i for i in square if self.mods[i].in_features == width]
                if tie and out == width and fits:  # tie the weight to an earlier square layer's
                    lin.weight = self.mods[fits[tie % len(fits)]].weight
                i = add(lin)
                if out == width:
                    square.append(i)
                self.plan.append(("mod", i))
                if bn:
                    self.plan.append(("mod", add(nn.BatchNorm1d(out))))
                width = out
            elif kind == "act":
                self.plan.append(("mod", add(Act(op[1], op[2], width))))
            elif kind == "shared":  # call a width→width layer (again, if there is one)
                self.plan.append(("mod", square_layer(op[1])))
            elif kind == "twice":  # the same layer applied to its own output: lin(act(lin(h)))
                i, a = square_layer(op[1]), add(Act(op[2], op[3], width))
                self.plan += [("mod", i), ("mod", a), ("mod", i)]
            elif kind == "residual":
                block = nn.Sequential(nn.Linear(width, width), Act(op[1], op[2], width), nn.Linear(width, width))
                self.plan.append(("residual" if not op[3] else "residual_", add(block)))
            elif kind == "const":
                self.plan.append(("const", op[1]))
            elif kind == "norm":  # a BatchNorm wherever it falls: after a writer, or reading a stream
                self.plan.append(("mod", add(nn.BatchNorm1d(width))))
            elif kind == "siamese":  # one encoder on two branches read by different layers, then joined
                enc, act = add(nn.Linear(width, width)), add(Act(op[1], op[2], width))
                r1, r2 = add(nn.Linear(width, width)), add(nn.Linear(width, width))
                self.plan.append(("siamese", (enc, act, r1, r2)))
        self.last = nn.Linear(width, d_out)

    def forward(self, x):
        h = self.first(x)
        for what, arg in self.plan:
            if what == "mod":
                h = self.mods[arg](h)
            elif what == "residual":
                h = h + self.mods[arg](h)
            elif what == "residual_":
                h += self.mods[arg](h)  # an augmented assignment: in place at run time
            elif what == "const":
                h = h + arg if arg != 0 else h * 2.0
            elif what == "siamese":
                enc, act, r1, r2 = (self.mods[i] for i in arg)
                h = r1(act(enc(h))) + r2(act(enc(h * 2.0)))
        return self.last(h)


@st.composite
def random_models(draw):
    ops = [("width", draw(st.integers(1, 5)))]
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["linear", "act", "act", "shared", "twice", "residual", "const", "norm", "siamese"]))
        if kind == "linear":
            ops.append(("linear", draw(st.integers(1, 5)), draw(st.booleans()), draw(st.integers(0, 2))))
        elif kind == "act":
            ops.append(("act", *_activation(draw)))
        elif kind == "shared":
            ops.append(("shared", draw(st.integers(0, 3))))
        elif kind == "twice":
            ops.append(("twice", draw(st.integers(0, 3)), *_activation(draw)))
        elif kind == "residual":
            ops.append(("residual", *_activation(draw), draw(st.booleans())))
        elif kind == "const":
            ops.append(("const", draw(st.sampled_from([0.0, 0.5, -1.0]))))
        elif kind == "norm":
            ops.append(("norm",))
        else:
            ops.append(("siamese", *_activation(draw)))
    seed = draw(st.integers(0, 10_000))
    torch.manual_seed(seed)
    return randomise(Random(ops), seed).double(), seed, ops


def inputs(seed: int) -> torch.Tensor:
    """Rows at scales from 0.01 to 100: every activation is seen in its linear and its saturated regime."""
    x = torch.randn(24, 4, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    return x * torch.logspace(-2, 2, 24, dtype=F64)[:, None]


def column_change(model, new, x) -> float:
    """Largest |new − old| over each output column's own max |old| (the test's own comparison)."""
    with torch.no_grad():
        a, b = model(x), new(x)
    scale = a.abs().amax(0).clamp_min(1e-12 * a.abs().max().item() + 1e-300)
    return ((a - b).abs() / scale).max().item()


def touched(smap) -> set:
    names = set()
    for s in smap:
        names |= {p.name for p in s.writers} | {p.name for p in s.readers} | {bn for bn, _ in s.norms}
    return names


# ------------------------------------------------------------------ function preservation
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=random_models(), seed=st.integers(0, 50), sigma=st.sampled_from([0.3, 1.0]))
def test_random_models_keep_their_function_or_freeze_with_a_reason(arch, seed, sigma):
    model, _, ops = arch
    x = inputs(seed)
    smap = wb.symmetry_map(model, x)
    assert smap.trace_error is None, smap.trace_error
    assert all(reason.strip() for _, reason in smap.skipped), smap.skipped
    new, t = wb.random_intertwiner(model, seed=seed, scale_sigma=sigma, example=x)
    change = column_change(model, new, x)
    assert change < 1e-10, (ops, smap.to_frame(), smap.skipped, change)
    # frozen places are never transformed: every module no site names keeps its parameters bitwise
    moved = touched(smap)
    old_modules, new_modules = dict(model.named_modules()), dict(new.named_modules())
    old_params = dict(model.named_parameters())
    # a port names a module (its weight and bias move) or one parameter (a per-channel PReLU's slopes)
    moved_tensors = {id(getattr(old_modules[n], k, None)) for n in moved if n in old_modules for k in ("weight", "bias")}
    moved_tensors |= {id(old_params[n]) for n in moved if n in old_params}
    for name, m in old_modules.items():
        if name and name not in moved and not list(m.children()):
            for (pname, p), (_, q) in zip(m.named_parameters(recurse=False), new_modules[name].named_parameters(recurse=False)):
                if id(p) not in moved_tensors:
                    assert torch.equal(p, q), (name, pname, ops)


# ------------------------------------------------------------------ negative controls
def control_element(site, seed: int):
    """An element outside the site's group that the push can carry (None when none exists: GL, or
    P·D at a site a BatchNorm reads)."""
    gens, n, g = generators(site.group), site.n, torch.Generator().manual_seed(seed)
    dense_ok = not any(mode == "input" for _, mode in site.norms)
    if "general" in gens:
        return None
    if {"rotation", "rotation_ones"} & gens:  # continuous but not GL: a general map does not fix 1
        return get_group("gl", n).sample(g) if dense_ok else None
    if n >= 2 and dense_ok:
        return get_group("special_orthogonal", n).sample(g)
    perm = torch.randperm(n, generator=g)
    if "neg" not in gens:
        scale = torch.exp(0.3 * torch.randn(n, generator=g, dtype=F64))
        scale[0] = -scale[0]
    elif "pos_scale" not in gens:
        scale = torch.ones(n, dtype=F64)
        scale[0] = 2.5
    else:
        return None
    return ScaledPermutation(perm, scale, site.group.phi, "control")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=random_models(), seed=st.integers(0, 50))
def test_an_element_outside_the_group_fails_verify_whenever_it_moves_the_function(arch, seed):
    """An element outside a site's group changes the function wherever the inputs reach the
    nonlinearity; on a site these inputs keep in a linear regime (a hardtanh never saturated) it may
    not, and then the outputs really agree. So: verify FAILs every control that moved the outputs
    (measured here), and never calls outputs different that agree."""
    model, _, ops = arch
    x = inputs(seed)
    smap = wb.symmetry_map(model, x)
    for site in smap:
        e = control_element(site, seed)
        if e is None:
            continue
        t = wb.Transform({site.name: e}, {site.name: "control"}, forced=[site.name], model=type(model).__name__)
        broken = wb.apply_transform(model, t, example=x)
        change = column_change(model, broken, x)
        report = wb.verify(model, broken, x, transform=t)
        if change > 1e-9:
            assert report.verdict == "FAIL" and not report.function_preserved, (ops, site, change, report)
        elif change < 1e-12:
            assert report.function_preserved, (ops, site, change, report)


def _fixed_models():
    """Architectures whose every site the inputs below exercise: each control must move the function."""
    torch.manual_seed(0)
    relu_mlp = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    functional = Random([("width", 4), ("act", "leaky", dict(slope=0.2)), ("linear", 5, True, 0),
                         ("act", "hardtanh", dict(lo=0.0, hi=1.0)), ("siamese", "elu", dict(alpha=0.5)),
                         ("residual", "clamp_", dict(lo=-1.0, hi=1.0), True), ("act", "softplus", dict(beta=3.0))])
    normed = Random([("width", 3), ("linear", 3, False, 0), ("norm",), ("act", "prelu_channels", {}),
                     ("linear", 4, True, 0), ("act", "abs_", {})])
    return [randomise(m, 1).double() for m in (relu_mlp, functional, normed)]


def test_every_control_fails_on_models_whose_sites_the_inputs_exercise():
    x = inputs(3)
    controls = 0
    for model in _fixed_models():
        for site in wb.symmetry_map(model, x):
            e = control_element(site, 0)
            if e is None:
                continue
            t = wb.Transform({site.name: e}, {site.name: "control"}, forced=[site.name])
            broken = wb.apply_transform(model, t, example=x)
            assert column_change(model, broken, x) > 1e-6, site  # the function really moved
            assert wb.verify(model, broken, x, transform=t).verdict == "FAIL", site
            controls += 1
    assert controls >= 8


def test_the_generator_covers_every_feature():
    """The strategy above really produces shared modules, ties, in-place ops and functional arguments."""
    model = Random([("width", 3), ("linear", 3, True, 0), ("act", "leaky_inplace", dict(slope=0.2)),
                    ("linear", 3, False, 1), ("shared", 0), ("act", "relu_", {}),
                    ("residual", "clamp_", dict(lo=-1.0, hi=1.0), True), ("siamese", "tanh", {}), ("const", 0.5),
                    ("twice", 0, "gelu", {})])
    assert model.mods[3].weight is model.mods[0].weight  # tied
    model = randomise(model).double()
    smap = wb.symmetry_map(model, inputs(0))
    assert any("shared by" in n for s in smap for n in s.notes)  # the siamese encoder: one element
    new, _ = wb.random_intertwiner(model, seed=0, example=inputs(0))
    assert column_change(model, new, inputs(0)) < 1e-10
    # a weight tied between a writer that feeds a BatchNorm and one that does not: skipped, saying why
    tied = randomise(Random([("width", 3), ("linear", 3, True, 0), ("act", "tanh", {}), ("linear", 3, False, 1),
                             ("act", "tanh", {})])).double()
    assert tied.mods[3].weight is tied.mods[0].weight
    reasons = [r for _, r in wb.symmetry_map(tied, inputs(0)).skipped]
    assert any("shared by mods.0, mods.3, which would need different maps" in r for r in reasons), reasons


def test_copying_a_random_model_keeps_its_ties():
    """Guard for the test itself: the architectures tie weights as intended."""
    model = Random([("width", 3), ("linear", 3, False, 0), ("linear", 3, False, 1)])
    assert model.mods[1].weight is model.mods[0].weight
    twin = copy.deepcopy(model)
    assert twin.mods[1].weight is twin.mods[0].weight


@pytest.mark.parametrize("width", [1, 3])
def test_a_weight_tied_between_writers_of_two_batchnorms_is_not_folded_twice(width):
    """Found by hypothesis: lin2.weight = lin1.weight, each feeding its own BatchNorm, on a linear (GL) site.
    A dense element folds each BatchNorm (its own γ/σ) into its writer's rows; one tensor cannot hold both
    folds, and writing one of them moved the output by 14%. Such a tie is frozen, saying why."""
    model = randomise(Random([("width", width), ("linear", width, True, 0), ("linear", width, True, 1)]), 0).double()
    assert model.mods[2].weight is model.mods[0].weight
    x = inputs(0)
    smap = wb.symmetry_map(model, x)
    reasons = [r for _, r in smap.skipped]
    assert any("shared by mods.0, mods.2, which would need different maps" in r for r in reasons), reasons
    for seed in range(3):
        new, _ = wb.random_intertwiner(model, seed=seed, example=x)
        assert column_change(model, new, x) < 1e-10  # computed here, in float64
    # the same tie feeding one BatchNorm twice (one module called twice) takes one fold and stays a site
    shared = randomise(Random([("width", 3), ("linear", 3, False, 0), ("norm",), ("shared", 0), ("act", "tanh", {})]),
                       0).double()
    new, _ = wb.random_intertwiner(shared, seed=0, example=x)
    assert column_change(shared, new, x) < 1e-10
