"""wb.hook_names on plain modules and the shared name-filter rules."""
import re

import pytest
import torch
from torch import nn

import workbench as wb


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        self.head_a, self.head_b = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x, use_b=False):
        h = self.trunk(x)
        return self.head_b(h) if use_b else self.head_a(h)


def test_plain_module_names_are_named_modules_paths():
    names = wb.hook_names(Branchy())
    assert list(names) == ["trunk", "trunk.0", "trunk.1", "head_a", "head_b"]
    assert names.family == "module" and names.unfired is None
    assert names.firing == list(names)  # unknown without an example: nothing is claimed
    assert repr(names) == "HookNames(5 names, 0 aliases)"


def test_example_input_tells_which_modules_fire_without_side_effects():
    model, x = Branchy(), torch.randn(2, 3)
    state = torch.get_rng_state()
    names = wb.hook_names(model, example=x)
    assert names.unfired == {"head_b": "not called on the example input"}
    assert "head_b" not in names.firing
    assert torch.equal(state, torch.get_rng_state())
    assert all(not m._forward_hooks for m in model.modules())
    frame = names.to_frame()
    assert frame.set_index("name").loc["head_b", "fires"] == False  # noqa: E712
    assert "<table>" in names._repr_html_()


def test_regex_uses_search_semantics_and_lists_keep_model_order():
    model = Branchy()
    _, cache = wb.run_with_cache(model, torch.randn(2, 3), names=[re.compile(r"\.1$"), "trunk.0", "head_*"])
    assert cache.names == ["trunk.0", "trunk.1", "head_a"]  # in the order they fired
    assert "head_b" in cache.unfired


def test_empty_and_wrongly_typed_filters():
    with pytest.raises(wb.UnknownNameError, match="selects no hook name"):
        wb.run_with_cache(Branchy(), torch.randn(1, 3), names=[])
    with pytest.raises(wb.UnknownNameError, match="got int 3"):
        wb.run_with_cache(Branchy(), torch.randn(1, 3), names=[3])


def test_cache_mapping_behaviour_and_reprs():
    _, cache = wb.run_with_cache(Branchy(), torch.randn(2, 3), names="trunk.*")
    assert len(cache) == 2 and set(cache.keys()) == {"trunk.0", "trunk.1"}
    assert "trunk.0" in cache and "nope" not in cache
    assert repr(cache) == "ActivationCache(2 names, 64 B)"
    frame = cache.to_frame()
    assert frame.to_dict("records")[0] == {"name": "trunk.0", "shape": (2, 4), "dtype": "float32", "calls": 1, "bytes": 32}
    assert "trunk.1" in cache._repr_html_()
    with pytest.raises(KeyError, match=r"'trunk\.2' is not in this cache.*Nearest names: \['trunk\.1', 'trunk\.0'\]"):
        cache["trunk.2"]
