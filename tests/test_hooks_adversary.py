"""Adversarial models for the hook layer's other verbs: ``wb.intervene``, ``wb.hook_names`` and the name filters.

Every expected value is computed by hand, in float64, by calling the submodules directly with no hooks; an edit
must give exactly that, or be refused with workbench's own error. The capture's own adversaries (values written
in place, budgets, copies) are in test_capture_adversary.py.
"""
import re
import sys

import pytest
import torch
from torch import nn

import workbench as wb
from workbench import UnknownNameError

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from conftest import make_transformer  # noqa: E402


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()


X = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3)


# ---------------------------------------------------------------- names
class GlobKeys(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.d = nn.ModuleDict({"a[1]": nn.Linear(3, 3), "a1": nn.Linear(3, 3), "b*": nn.Linear(3, 3)})

    def forward(self, x):
        return self.d["b*"](self.d["a1"](self.d["a[1]"](x)))


def test_names_holding_glob_characters_select_their_own_module():
    model = GlobKeys().double()
    a, a1, b = model.d["a[1]"], model.d["a1"], model.d["b*"]
    with torch.no_grad():
        h = a(X)
        _, cache = wb.run_with_cache(model, X, names=["d.a[1]", "d.b*"])
        assert cache.names == ["d.a[1]", "d.b*"] and torch.equal(cache["d.a[1]"], h)
        assert torch.equal(cache["d.b*"], b(a1(h)))
        with wb.intervene(model, {"d.a[1]": lambda t, n: t * 0}):
            assert torch.equal(model(X), b(a1(torch.zeros(4, 3, dtype=torch.float64))))
    # a pattern is still a pattern where no module bears its name
    _, cache = wb.run_with_cache(model, X, names="d.a[0-9]")
    assert cache.names == ["d.a1"]


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.b(self.a(x))


def test_memoised_names_follow_modules_registered_again_under_other_names():
    model = Two().double()
    wb.run_with_cache(model, X)  # memoises the names
    first, second = model.a, model.b
    del model.a, model.b
    model.b, model.a = first, second  # the same objects, in the same order, under swapped names
    with torch.no_grad(), wb.intervene(model, {"a": lambda t, n: t * 0}):
        out = model(X)
        assert torch.equal(out, model.b(torch.zeros(4, 3, dtype=torch.float64)))  # the module now called a
    model.alias = model.b  # a second name for a module already there
    _, cache = wb.run_with_cache(model, X, names="alias")
    with torch.no_grad():
        assert torch.equal(cache["alias"], model.b(model.a(X)))


def test_hook_names_follow_transformer_lens_flags_switched_after_the_first_call():
    model = make_transformer()
    assert "blocks.0.hook_mlp_in" in wb.hook_names(model).unfired
    model.cfg.use_hook_mlp_in = True
    assert "blocks.0.hook_mlp_in" not in wb.hook_names(model).unfired
    assert "blocks.0.hook_mlp_in" in wb.hook_names(model).firing


def test_regex_and_callable_filters_matching_nothing_are_refused():
    model = mlp()
    for pattern in (re.compile("nothing"), lambda n: False, "zz*"):
        with pytest.raises(UnknownNameError, match="matches no hook name"):
            with wb.intervene(model, {pattern: lambda a, n: a}):
                model(X)
    assert hooks_left(model) == 0
