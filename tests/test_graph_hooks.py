"""Forward hooks on the modules of a traced model. The rules read a leaf module by its class (a ReLU's group, a
Linear's weights), and fx records a leaf's call as one node, without its hooks, while the model runs them: a hook
that returns a new output or input changes what the map describes. A hooked leaf is left alone, saying so (a
container's hooks fx traces as ops, which the rules judge like any other). Each answer is checked here directly in
float64 (the elements applied by hand, never by asking verify)."""
import pytest
import torch
from torch import nn

import workbench as wb

F64 = torch.float64
W = torch.linspace(0.5, 2.0, 6, dtype=F64)  # a different factor per unit


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(6, 6), nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(x))


class Net(nn.Module):
    """Linear → act → Block (Linear → ReLU) → Linear."""

    def __init__(self, act: nn.Module):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.act, self.block, self.fc2 = nn.Linear(5, 6), act, Block(), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(self.block(self.act(self.fc1(x))))


def _x() -> torch.Tensor:
    return torch.randn(64, 5, dtype=F64, generator=torch.Generator().manual_seed(1)) * 3


def _moved_by_hand(model: Net, where: str, s: torch.Tensor) -> Net:
    """fc1's (where='act') or block.fc's (where='block') output units reversed and times s > 0, the next Linear's
    inputs undone: a P·D₊ element, exact for a hookless ReLU there."""
    import copy

    new = copy.deepcopy(model)
    writer, reader = (new.fc1, new.block.fc) if where == "act" else (new.block.fc, new.fc2)
    with torch.no_grad():
        writer.weight.copy_(s[:, None] * writer.weight.flip(0)), writer.bias.copy_(s * writer.bias.flip(0))
        reader.weight.copy_((reader.weight / s.flip(0)[None, :]).flip(1))
    return new


HOOKS = {
    "per-unit factor on the ReLU's output": ("act", lambda m: m.act.register_forward_hook(lambda mod, i, o: o * W)),
    "constant added to the ReLU's input": ("act", lambda m: m.act.register_forward_pre_hook(lambda mod, i: (i[0] + 1.0,))),
    "per-unit factor on a block's output": ("block", lambda m: m.block.register_forward_hook(lambda mod, i, o: o * W)),
}


@pytest.mark.parametrize("case", sorted(HOOKS))
def test_a_hook_that_changes_a_modules_output_leaves_its_site_alone(case):
    """Before, the map read the hooked ReLU as a plain ReLU: P·D₊, and a random transform changed the function by 0.66
    while calling it a symmetry. A hook on the block (a container) is traced: its product is an op the rules refuse."""
    where, register = HOOKS[case]
    model, x = Net(nn.ReLU()).double().eval(), _x()
    s = torch.exp(torch.linspace(-1.0, 1.0, 6, dtype=F64)).flip(0)
    with torch.no_grad():
        ref = model(x)
        assert float((_moved_by_hand(model, where, s)(x) - ref).abs().max()) < 1e-12  # hookless: a symmetry
        register(model)
        assert float((_moved_by_hand(model, where, s)(x) - model(x)).abs().max()) > 1e-2  # hooked: not one
        ref = model(x)
    smap = wb.symmetry_map(model, example=x[:1])
    if where == "act":
        assert any(name == "act" and "has forward hooks" in why for name, why in smap.skipped), smap.skipped
    moved = {"act": "act", "block": "block.act"}[where]
    assert moved not in [s.name for s in smap.sites]
    for seed in range(3):
        new, _ = wb.random_intertwiner(model, seed=seed, example=x[:1])
        with torch.no_grad():
            assert float((new(x) - ref).abs().max() / ref.abs().max()) < 1e-10


@pytest.mark.parametrize("case", ["per-unit factor on the ReLU's output", "per-unit factor on a block's output"])
def test_a_hook_registered_after_the_model_was_mapped_gets_a_new_map(case):
    """The map is memoised per model object; the key left hooks out, so a hook added later got the hookless map (the
    block's hook, traced as a product, was never seen either)."""
    where, register = HOOKS[case]
    moved = {"act": "act", "block": "block.act"}[where]
    model, x = Net(nn.ReLU()).double().eval(), _x()
    assert moved in [s.name for s in wb.symmetry_map(model, example=x[:1]).sites]
    handle = register(model)
    assert moved not in [s.name for s in wb.symmetry_map(model, example=x[:1]).sites]
    with torch.no_grad():
        ref = model(x)
        for seed in range(3):
            new, _ = wb.random_intertwiner(model, seed=seed, example=x[:1])
            assert float((new(x) - ref).abs().max() / ref.abs().max()) < 1e-10
    handle.remove()
    assert moved in [s.name for s in wb.symmetry_map(model, example=x[:1]).sites]


def test_a_global_forward_hook_is_a_map_refused_saying_so():
    model, x = Net(nn.ReLU()).double().eval(), _x()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, i, o: o)
    try:
        smap = wb.symmetry_map(model, example=x[:1])
    finally:
        handle.remove()
    assert not smap.sites and "global forward hooks are registered" in smap.trace_error
    assert wb.symmetry_map(model, example=x[:1]).sites  # removed: mapped again


def test_workbench_own_capture_hooks_observe_and_leave_the_map_as_it_is():
    """A capture's hooks return nothing and write nothing the forward reads: a map made while one is open (a notebook
    maps the model it is capturing) is the model's own. Marking every hooked leaf as left alone skipped every site
    there (the capture hooks every module); an intervene's edit, which changes outputs, is still a hook that counts."""
    model, x = Net(nn.ReLU()).double().eval(), _x()
    alone = [(s.name, s.group.name) for s in wb.symmetry_map(model, example=x[:1]).sites]
    assert alone == [("act", "scaled_permutation"), ("block.act", "scaled_permutation")]
    with torch.no_grad():
        ref = model(x)
    with wb.capture(model) as cache:
        model(x)
        assert [(s.name, s.group.name) for s in wb.symmetry_map(model, example=x[:1]).sites] == alone
        new, _ = wb.random_intertwiner(model, seed=0, example=x[:1])
    assert "act" in cache.names
    with torch.no_grad():
        assert float((new(x) - ref).abs().max() / ref.abs().max()) < 1e-10
    with wb.intervene(model, {"act": lambda out: out * W}):
        assert "act" not in [s.name for s in wb.symmetry_map(model, example=x[:1]).sites]
