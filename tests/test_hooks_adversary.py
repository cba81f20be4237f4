"""Adversarial models for the hook layer's other verbs: ``wb.intervene``, ``wb.hook_names`` and the name filters.

Every expected value is computed by hand, in float64, by calling the submodules directly with no hooks; an edit
must give exactly that, or be refused with workbench's own error. The capture's own adversaries (values written
in place, budgets, copies) are in test_capture_adversary.py.
"""
import copy
import re
import sys
import warnings

import pytest
import torch
from torch import nn

import workbench as wb
from workbench import HookNotFiredError, InvalidOptionError, UnknownNameError

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from conftest import make_transformer  # noqa: E402


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()


X = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3)


# ---------------------------------------------------------------- copies made inside the block
def test_a_copy_made_inside_an_intervene_block_is_not_edited_during_or_after_it():
    model = mlp()
    with torch.no_grad():
        plain = model[2](model[1](model[0](X)))
        edited = model[2](torch.zeros(4, 4, dtype=torch.float64))
    with wb.intervene(model, {"1": lambda a, n: a * 0}):
        twin = copy.deepcopy(model)  # copies the modules' hook dicts
        with torch.no_grad():
            assert torch.equal(model(X), edited) and torch.equal(twin(X), plain)
    with torch.no_grad():
        assert torch.equal(twin(X), plain) and torch.equal(model(X), plain)
    assert hooks_left(model) == 0 and hooks_left(twin) == 0  # the copy dropped the hooks at its first call


# ---------------------------------------------------------------- order of several edits of one module
def test_nested_and_repeated_edits_of_one_module_apply_in_the_order_given():
    model = mlp()
    with torch.no_grad():
        h = model[1](model[0](X))
        ones = model[2](torch.ones(4, 4, dtype=torch.float64))
        composed = model[2]((h + 1) * 2)
    zeros, one = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    with torch.no_grad(), wb.intervene(model, {"1": zeros}), wb.intervene(model, {"1": one}):
        assert torch.equal(model(X), ones)  # the inner block's edit applies last
    # "1" and the pattern "*1" select one module: the edits compose in the order of the dict
    with torch.no_grad(), wb.capture(model, names="1") as cache, \
            wb.intervene(model, {"1": lambda a, n: a + 1, "*1": lambda a, n: a * 2}):
        assert torch.equal(model(X), composed)
    assert torch.equal(cache["1"], (h + 1) * 2)  # a capture opened first still sees the final value
    assert hooks_left(model) == 0


# ---------------------------------------------------------------- names that never fire
class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.used(x)


def test_an_edit_whose_hook_never_fires_is_reported_not_silent():
    model, x = Unused(), torch.randn(2, 3)
    with pytest.warns(UserWarning, match=r"no effect.*'unused' \(its module was not called"):
        with wb.intervene(model, {"unused": lambda a, n: a * 0}):
            model(x)
    with pytest.raises(HookNotFiredError, match="'unused'"):
        with wb.intervene(model, {"unused": lambda a, n: a * 0, "used": lambda a, n: a}, strict=True):
            model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with wb.intervene(model, {"*": lambda a, n: a}):  # a pattern selects what may fire
            model(x)
        with wb.intervene(model, {"unused": lambda a, n: a}):  # the model never ran: nothing to report
            pass
    assert hooks_left(model) == 0


# ---------------------------------------------------------------- in-place edits of outputs that share memory
class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.ident = nn.Linear(3, 3), nn.Identity()

    def forward(self, x):
        h = self.lin(x)
        return self.ident(h) + h


def test_an_in_place_edit_of_an_output_sharing_memory_changes_only_that_activation():
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 2)).double()
    x = torch.randn(2, 2, 3, dtype=torch.float64)
    x0 = x.clone()
    with torch.no_grad(), wb.intervene(model, {"0": lambda a, n: a.mul_(0)}):
        out = model(x)
    assert torch.equal(x, x0)  # Flatten's output is a view of the caller's input
    assert torch.equal(out, model[1](torch.zeros(2, 6, dtype=torch.float64)))
    res = Residual().double()
    with torch.no_grad():
        expected = res.lin(x0[:, 0]) * 0 + res.lin(x0[:, 0])  # the identity's copy zeroed, the residual kept
        with wb.intervene(res, {"ident": lambda a, n: a.mul_(0)}):
            assert torch.equal(res(x0[:, 0]), expected)
        with wb.intervene(res, {"lin": lambda a, n: a.mul_(0)}):  # a fresh output: edited in place, as documented
            assert torch.equal(res(x0[:, 0]), torch.zeros(2, 3, dtype=torch.float64))


def test_a_function_returning_another_dtype_or_a_non_tensor_is_refused_by_workbench():
    model = mlp().float()
    for fn, match in [(lambda a, n: a.double(), "float64 tensor"), (lambda a, n: a > 0, "bool tensor"),
                      (lambda a, n: 3.0, "returned float")]:
        with pytest.raises(InvalidOptionError, match=match):
            with wb.intervene(model, {"1": fn}):
                model(X.float())
    assert hooks_left(model) == 0


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


# ---------------------------------------------------------------- compiled models
def test_a_compiled_model_is_edited_even_when_compiled_before_the_block():
    torch._dynamo.reset()
    model = mlp()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        plain = compiled(X)  # compiled here, with no hooks on
        edited = model[2](model[1](model[0](X)) * 2)
        with wb.intervene(compiled, {"_orig_mod.1": lambda a, n: a * 2}):
            assert torch.equal(compiled(X), edited)
        assert torch.equal(compiled(X), plain)
    assert hooks_left(compiled) == 0


# ---------------------------------------------------------------- generation with a KV cache
def test_an_edit_applies_at_every_step_of_a_cached_generation():
    from workbench.models._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=32,
                                       bos_token_id=0, eos_token_id=0)).double().eval()
    ids, shift = torch.randint(1, 50, (1, 4)), 3 * torch.randn(32, dtype=torch.float64)
    with wb.intervene(model, {"transformer.h.0.mlp": lambda a, n: a + shift}):
        generated = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        _, cache = wb.run_with_cache(model, generated)
    tensors = [n for n in cache.names if n != ""]  # every module with a tensor output (tuple outputs are refused)
    assert len(tensors) > 20 and cache.skipped
    with wb.intervene(model, {n: (lambda a, n: a) for n in tensors}):  # the identity everywhere: the same bits
        with torch.no_grad():
            same = model(generated, use_cache=False).logits
    handle = model.transformer.h[0].mlp.register_forward_hook(lambda m, a, out: out + shift)
    seq = ids
    with torch.no_grad():  # by hand: the whole sequence again at every step, no cache
        for _ in range(6):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    handle.remove()
    assert torch.equal(generated, seq)
    with torch.no_grad():
        plain_logits = model(generated, use_cache=False).logits
    assert torch.equal(same, plain_logits)
    assert hooks_left(model) == 0


def test_regex_and_callable_filters_matching_nothing_are_refused():
    model = mlp()
    for pattern in (re.compile("nothing"), lambda n: False, "zz*"):
        with pytest.raises(UnknownNameError, match="matches no hook name"):
            with wb.intervene(model, {pattern: lambda a, n: a}):
                model(X)
    assert hooks_left(model) == 0
