"""The symmetry map cached by the model's *structure* (workbench/symmetry/_map.py ``_structure_key``).

A new object of an architecture already seen reuses its map; every adversary below differs from a model
seen before only where the structural key must see it, and must get its own map. Each answer is checked
directly: the transform's new model computes the same function (float64, compared here), and the map
equals one derived afresh by the backend (no cache involved).
"""
import copy
import gc
import types
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import workbench as wb
from models import same_function  # every model here is built in eval mode: its eval() tells no structures apart
from workbench.symmetry import _map
from workbench.symmetry._backend import backend_for

F64 = torch.float64


@pytest.fixture(autouse=True)
def empty_structure_cache():
    _map._BY_STRUCTURE.clear()
    yield
    _map._BY_STRUCTURE.clear()


def described(smap):
    """A map as comparable values: each site's name, size, group, ports, norms, hook points, embeddings."""
    return [(s.name, s.n, s.group.name, s.activation, s.hook_name, s.writers, s.readers, s.norms, s.observed,
             s.embeds, s.affine) for s in smap] + [smap.skipped]


def fresh(model):
    """The map derived now by the backend, bypassing both memos."""
    return described(backend_for(model).site_map(model, None, False))


def sites(model):
    return [(s.name, s.n, s.group.name) for s in wb.symmetry_map(model)]


def preserved(model, x):
    """The function is unchanged by a random transform, and the map is what a fresh derivation gives."""
    new, _ = wb.random_intertwiner(model, seed=1)
    assert same_function(model, new, x) < 1e-10
    assert described(wb.symmetry_map(model)) == fresh(model)


class Branching(nn.Module):
    """A forward that branches on a plain attribute (public or private)."""

    def __init__(self, mode="relu", private="relu"):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 2)
        self.mode, self._private = mode, private

    @staticmethod
    def act(x, how):
        return {"relu": torch.relu, "tanh": torch.tanh, "none": lambda v: v}[how](x)

    def forward(self, x):
        return self.c(self.act(self.b(self.act(self.a(x), self.mode)), self._private))


def mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).double().eval()


# drawn from its own generator: a module-level draw from the global one happens at collection, so it would
# depend on which test modules were collected first (one file alone vs the whole suite)
x = torch.randn(7, 4, dtype=F64, generator=torch.Generator().manual_seed(0))


def test_a_new_object_of_a_seen_architecture_reuses_the_map_and_holds_no_model(monkeypatch):
    model = mlp()
    first = sites(model)
    calls = []
    real = type(backend_for(model)).site_map
    monkeypatch.setattr(type(backend_for(model)), "site_map", lambda self, *a: calls.append(1) or real(self, *a))
    other = mlp()  # new object, new tensors, same structure
    assert sites(other) == first and not calls
    calls.append("fresh")  # (fresh() below calls the backend itself)
    preserved(other, x)
    # the cached entry names modules; it keeps no model alive
    ref = weakref.ref(other)
    del other
    gc.collect()
    assert ref() is None


def test_a_forward_branching_on_an_attribute_gets_its_own_map():
    for mode, private in [("relu", "relu"), ("tanh", "relu"), ("none", "relu"), ("relu", "tanh"), ("relu", "none")]:
        model = Branching(mode, private).double().eval()
        preserved(model, x)
    # the same object, its attributes changed between two calls (the memo per object must see it too)
    model = Branching().double().eval()
    sites(model)
    for mode, private in [("tanh", "relu"), ("tanh", "none"), ("relu", "relu")]:
        model.mode, model._private = mode, private
        preserved(model, x)
    # and a class attribute changed on the class
    model = Branching().double().eval()
    sites(model)
    Sub = type("Sub", (Branching,), {"act": staticmethod(lambda v, how: torch.tanh(v))})
    preserved(Sub().double().eval(), x)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, inp):
        return self.b(torch.relu(self.a(inp)))


def test_a_forward_replaced_on_an_instance_gets_its_own_map():
    model = nn.Sequential(Block()).double().eval()
    preserved(model, x)  # cached: a ReLU site, positive scalings
    other = nn.Sequential(Block()).double().eval()
    other[0].forward = types.MethodType(lambda self, inp: self.b(torch.tanh(self.a(inp))), other[0])
    assert _map._structure_key(other, None, False) is None
    preserved(other, x)  # positive scalings through tanh would change it
    assert sites(other)[0][2] == "signed_permutation" and sites(model)[0][2] == "scaled_permutation"


def test_tied_and_untied_weights_of_the_same_shapes_get_their_own_maps():
    untied = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).double().eval()
    preserved(untied, x)
    tied = copy.deepcopy(untied)
    tied[2].weight = tied[0].weight
    assert len(sites(tied)) == 0  # a tie across two sites freezes them
    preserved(tied, x)
    assert len(sites(untied)) == 2


def test_a_layernorm_gain_of_one_or_not_gets_its_own_map():
    class Res(nn.Module):
        def __init__(self, c=6):
            super().__init__()
            self.embed, self.ln, self.fc1 = nn.Linear(4, c), nn.LayerNorm(c), nn.Linear(c, 2 * c)
            self.fc2, self.head = nn.Linear(2 * c, c), nn.Linear(c, 2)

        def forward(self, inp):
            h = self.embed(inp)
            h = h + self.fc2(torch.relu(self.fc1(self.ln(h))))
            return self.head(h)

    ones = Res().double().eval()
    preserved(ones, x)
    gains = Res().double().eval()
    with torch.no_grad():
        gains.ln.weight.uniform_(0.5, 2.0)
    preserved(gains, x)
    assert dict((n, g) for n, _, g in sites(ones))["embed"] != dict((n, g) for n, _, g in sites(gains))["embed"]


def test_a_module_swapped_in_place_between_two_calls_gets_its_own_map():
    model = mlp()
    preserved(model, x)
    other = mlp()
    sites(other)
    other[1] = nn.GELU()  # the same object, another activation
    preserved(other, x)
    assert sites(other)[0][2] == "permutation"
    other[3] = nn.Tanh()
    preserved(other, x)


def test_another_dtype_prelu_slope_or_hook_gets_its_own_map():
    single = mlp().float()
    new, _ = wb.random_intertwiner(single, seed=0)
    preserved(mlp(), x)  # the float64 model after the float32 one
    assert _map._structure_key(mlp(), None, False) != _map._structure_key(single, None, False)
    prelu = nn.Sequential(nn.Linear(4, 6), nn.PReLU(), nn.Linear(6, 2)).double().eval()
    preserved(prelu, x)
    identity = copy.deepcopy(prelu)
    with torch.no_grad():
        identity[1].weight.fill_(1.0)  # slope 1: the identity, which GL passes
    preserved(identity, x)
    assert sites(identity)[0][2] == "gl"
    hooked = mlp()
    hooked[1].register_forward_hook(lambda m, i, o: torch.tanh(o))  # changes what the ReLU computes
    assert _map._structure_key(hooked, None, False) is None


def test_attributes_the_key_cannot_describe_leave_the_model_keyed_per_object():
    class Holder(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.a, self.b, self.fn = nn.Linear(4, 6), nn.Linear(6, 2), fn
            self.scale = torch.ones(6)  # a tensor that is not a buffer

        def forward(self, inp):
            return self.b(self.fn(self.a(inp)) * self.scale.to(inp.dtype))

    relu = Holder(F.relu).double().eval()
    assert _map._structure_key(relu, None, False) is None
    preserved(relu, x)
    preserved(Holder(torch.tanh).double().eval(), x)


def test_one_module_at_two_places_or_two_modules_get_their_own_maps():
    lin = nn.Linear(6, 6)
    two = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)).double().eval()
    preserved(two, x)
    shared_relu = nn.ReLU()
    one = nn.Sequential(nn.Linear(4, 6), shared_relu, nn.Linear(6, 6), shared_relu, nn.Linear(6, 2)).double().eval()
    assert _map._structure_key(one, None, False) != _map._structure_key(two, None, False)
    preserved(one, x)
    tied = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), lin, nn.ReLU(), lin, nn.ReLU(), nn.Linear(6, 2)).double().eval()
    preserved(tied, x)
    untied = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(),
                           nn.Linear(6, 2)).double().eval()
    preserved(untied, x)


class Configured(nn.Module):
    """A forward that reads an attribute the per-object key did not hold: a config object, a dict, a list, a function."""

    def __init__(self, cfg, fn=F.relu):
        super().__init__()
        self.a, self.b, self.cfg, self.fn = nn.Linear(4, 6), nn.Linear(6, 2), cfg, fn

    def forward(self, inp):
        h = self.a(inp)
        if isinstance(self.cfg, list):
            h = F.leaky_relu(h, self.cfg[0])
        else:
            how = self.cfg["act"] if isinstance(self.cfg, dict) else self.cfg.act
            h = self.fn(h) if how == "fn" else torch.tanh(h) if how == "tanh" else torch.relu(h)
        return self.b(h)


class Nested:
    """A config whose activation sits one object deeper, beside a field no value key describes (a function)."""

    def __init__(self):
        self.block = types.SimpleNamespace(act="relu", init=nn.init.zeros_)

    @property
    def act(self):
        return self.block.act


@pytest.mark.parametrize("how", ["namespace", "dict", "list", "function", "nested"])
def test_an_attribute_changed_in_place_after_a_first_map_gets_its_own_map(how):
    """The per-object memo held plain attributes only: ``model.cfg.act = "tanh"`` (or a dict or list changed in place,
    or ``model.fn = torch.tanh``) after a first map served the ReLU's map, and the transform drew scalings at a tanh
    (or a rotation at a ReLU, after a slope of 1) that moved the function by 0.14 to 0.66."""
    cfg = {"namespace": types.SimpleNamespace(act="relu"), "dict": {"act": "relu"}, "list": [1.0],
           "function": types.SimpleNamespace(act="fn"), "nested": Nested()}[how]
    model = Configured(cfg).double().eval()
    before = sites(model)
    if how == "namespace":
        model.cfg.act = "tanh"
    elif how == "dict":
        model.cfg["act"] = "tanh"
    elif how == "nested":  # (was keyed by the config's identity: its inner object holds a function)
        model.cfg.block.act = "tanh"
    elif how == "list":
        model.cfg[0] = 0.0  # leaky_relu with slope 1 (GL) becomes a ReLU
    else:
        model.fn = torch.tanh
    assert sites(model) != before
    preserved(model, x)


class ModeBranch(nn.Module):
    """A forward whose branch on ``self.training`` picks the activation (as dropout or batch statistics pick theirs)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, inp):
        h = self.a(inp)
        return self.b(torch.relu(h) if self.training else torch.tanh(h))


def test_a_model_in_training_mode_is_mapped_as_verify_runs_it_in_eval_mode():
    """The trace ran in the model's own mode (the keys leave ``training`` out, saying maps are traced in eval mode): a
    model mapped in training mode got its ReLU branch's scalings, which moved the eval-mode function verify compares by
    0.26; and a twin in eval mode would have been served that map by structure."""
    model = ModeBranch().double().train()
    assert [s.group.name for s in wb.symmetry_map(model)] == ["signed_permutation"]  # tanh: the eval branch
    assert model.training  # the model's own mode is left as it was
    for seed in range(3):
        new, t = wb.random_intertwiner(model, seed=seed)
        assert same_function(model, new, x) < 1e-10  # (puts both in eval mode)
        assert wb.verify(model.train(), new, x, t).verdict == "PASS"
    twin = ModeBranch().double().eval()
    assert described(wb.symmetry_map(twin)) == fresh(twin)
