"""The graph backend's per-map port plan (``_graph_stream._site_ports``): a site's parameter ports, parsed once per
map and replayed by every transform of every model of that structure. Adversarial cases: models of one structure
with other weights (the plan must not carry a weight, an element or a model), and models that look alike but that
the structural key must tell apart (LayerNorm gains of 1 or not: rotations or permutations of the stream; a tied
class head). Every verdict is checked directly, outputs compared here in float64, never by asking ``verify``."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import workbench as wb
from workbench.groups import Dense, ScaledPermutation
from workbench.symmetry import _graph_stream

from test_vision_transformers import changed, folded, image, randomised, stream, tv_vit

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    from workbench._threads import threads

    with threads(1):
        yield


def _plain(x) -> bool:
    """What a plan entry may hold: names, numbers, slices as pairs, None."""
    return x is None or isinstance(x, (str, int)) or (isinstance(x, tuple) and all(map(_plain, x)))


def _plans_of(smap) -> list:
    return [_graph_stream._PORTS[id(s)] for s in smap.sites if id(s) in _graph_stream._PORTS]


def test_models_of_one_structure_with_other_weights_share_the_plan_and_each_keeps_its_function():
    x = image()
    a, b = randomised(tv_vit(), seed=1), randomised(tv_vit(), seed=2)
    assert changed(a, b, x) > 1e-3  # other weights: other functions
    new_a, ta = wb.random_intertwiner(a, seed=0, example=x)
    smap = wb.symmetry_map(a, x)
    plans = _plans_of(smap)
    assert plans and any(entry[4] for entry in plans)  # the attention's packed weights, the class token, ...
    for ref, writers, readers, _, ports in plans:  # names and numbers only: no tensor, module or element
        assert all(_plain(p) for p in ports) and isinstance(ref, weakref.ref)
    n_before = len(_graph_stream._PORTS)
    new_b, tb = wb.random_intertwiner(b, seed=0, example=x)
    assert len(_graph_stream._PORTS) == n_before  # b replayed a's plan: the same map, nothing planned again
    assert [id(e) for e in _plans_of(wb.symmetry_map(b, x))] == [id(e) for e in plans]
    assert changed(a, new_a, x) < 1e-10 and changed(b, new_b, x) < 1e-10
    assert changed(a, new_a.eval(), x) < 1e-10 and changed(new_a, new_b, x) > 1e-3  # each kept its own weights
    # one seed, one structure: the same elements, pushed into different weights
    for name, e in ta.elements.items():
        f = tb.elements[name]
        assert torch.equal(e.matrix(), f.matrix())
    # the plan keeps no model alive
    ref = weakref.ref(a)
    del a, new_a, ta
    gc.collect()
    assert ref() is None


def test_a_layernorm_gain_the_key_sees_gets_its_own_plan_and_group():
    """Gains of 1 (folded) make the stream a rotation site; other gains a permutation site. Same names, shapes and
    classes: only the key's reading of the gains tells them apart. A plan reused across them would move the gains
    of the folded model by a permutation part it does not have (a rotation has none), or refuse."""
    x = image()
    plain = randomised(tv_vit(), seed=3)
    flat = folded(randomised(tv_vit(), seed=3))
    new_p, tp = wb.random_intertwiner(plain, seed=4, example=x)
    new_f, tf = wb.random_intertwiner(flat, seed=4, example=x)
    sp, sf = stream(wb.symmetry_map(plain, x)), stream(wb.symmetry_map(flat, x))
    assert sp is not sf
    assert isinstance(tp.elements[sp.name], ScaledPermutation) and isinstance(tf.elements[sf.name], Dense)
    assert changed(plain, new_p, x) < 1e-10 and changed(flat, new_f, x) < 1e-10
    # a negative control: the folded model's rotation pushed with the plain model's gains is not a symmetry
    unfolded = randomised(tv_vit(), seed=3)
    moved = wb.apply_transform(unfolded, wb.symmetry.Transform({sf.name: tf.elements[sf.name]}, {sf.name: "forced"},
                                                               [sf.name]), example=x[:1])
    assert changed(unfolded, moved, x) > 1e-3


def test_tied_and_untied_weights_of_one_shape_are_each_transformed_exactly():
    """A tied weight must be moved once, by the one element both of its uses agree on (or the site freezes); an
    untied twin of the same names and shapes moves each copy by its own site. Each checked directly."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 12, dtype=F64, generator=g)

    class TwoHeads(nn.Module):
        def __init__(self, tie: bool):
            super().__init__()
            self.a = nn.Linear(12, 8)
            self.b = nn.Linear(12, 8)
            self.c = nn.Linear(8, 3)
            self.d = nn.Linear(8, 3)
            if tie:
                self.b.weight = self.a.weight

        def forward(self, x):
            return self.c(torch.relu(self.a(x))) + self.d(torch.relu(self.b(x)))

    for tie in (False, True, False):
        torch.manual_seed(1)
        model = TwoHeads(tie).double().eval()
        new, t = wb.random_intertwiner(model, seed=2, example=x)
        with torch.no_grad():
            a, b = model(x), new(x)
        assert ((a - b).abs().max() / a.abs().max()).item() < 1e-10
        assert (new.b.weight is new.a.weight) == tie
        if not tie:  # two sites, each moved: the weights changed
            assert not torch.equal(new.a.weight, model.a.weight) and not torch.equal(new.b.weight, model.b.weight)


def test_a_partial_or_a_dict_attribute_is_keyed_by_its_values():
    """torchvision's ViT keeps ``norm_layer`` (a functools.partial) and timm's ``feature_info`` (dicts): keyed by
    value, so a model built again shares the map (and the plan); other arguments or entries are another key."""
    import functools

    from workbench.symmetry._map import _structure_key

    class Holder(nn.Module):
        def __init__(self, extra):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.extra = extra

        def forward(self, x):
            return self.fc(x)

    def key(extra):
        return _structure_key(Holder(extra), None, False)

    same = [key(functools.partial(nn.LayerNorm, eps=1e-6)), key(functools.partial(nn.LayerNorm, eps=1e-6))]
    assert same[0] is not None and same[0] == same[1]
    assert key(functools.partial(nn.LayerNorm, eps=1e-5)) != same[0]
    assert key(functools.partial(nn.GroupNorm, eps=1e-6)) != same[0]
    assert key([{"module": "a", "num_chs": 4}]) == key([{"module": "a", "num_chs": 4}])
    assert key([{"module": "a", "num_chs": 4}]) != key([{"module": "a", "num_chs": 5}])
    assert key({"a": 1, "b": 2}) != key({"b": 2, "a": 1})  # in order: a forward may iterate it
    assert key({"a": 1}) != key({"a": True})
    assert key(functools.partial(print)) is not None
    assert key(functools.partial(nn.Linear(2, 2).forward)) is None  # a bound method (an object): keyed per object
    assert key({"a": object()}) is None
