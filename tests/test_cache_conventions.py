"""The cache the way TransformerLens users read it — with TransformerLens's own numbers, 3.x and 4.x.

A notebook written for TransformerLens (``cache["resid_post", 0]``, ``accumulated_resid``,
``decompose_resid``, ``names_filter=``) runs unchanged on ``wb.run_with_cache`` and gives the values
``model.run_with_cache`` gives. On plain modules the generic subset works and the rest says why not.
"""
import pytest
import torch
from torch import nn

import workbench as wb
from conftest import make_transformer

pytestmark = pytest.mark.transformer


@pytest.fixture(scope="module")
def model():
    return make_transformer(seed=3).eval()


@pytest.fixture
def model_and_caches(model):
    # Fresh caches for each test (the model is shared): TransformerLens's ActivationCache writes into itself —
    # stack_head_results computes blocks.{l}.attn.hook_result and stores it in cache_dict — so one module-wide
    # cache made test_keys_are_transformer_lens_keys fail whenever it ran after that method's test (found by
    # running this file in reverse order).
    tokens = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, theirs = model.run_with_cache(tokens)
        _, ours = wb.run_with_cache(model, tokens)
    return model, ours, theirs


def _same(a, b):
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=0), (a - b).abs().max()
    else:
        assert a == b


def test_keys_are_transformer_lens_keys(model_and_caches):
    _, ours, theirs = model_and_caches
    assert set(ours) == set(theirs.keys())  # aliases included, as TransformerLens lists them
    for key in theirs.keys():
        assert torch.equal(ours[key], theirs[key])


@pytest.mark.parametrize("key", [("resid_post", 0), ("resid_pre", -1), ("pattern", 1), ("q", 0, "attn"),
                                 "resid_post", "embed"])
def test_tuple_and_shorthand_keys(model_and_caches, key):
    _, ours, theirs = model_and_caches
    try:
        want = theirs[key]
    except Exception as exc:  # TransformerLens refuses it: so do we, with our own error
        with pytest.raises(wb.WorkbenchError):
            ours[key]
        return
    assert torch.equal(ours[key], want)


@pytest.mark.parametrize("call", [
    lambda c: c.accumulated_resid(),
    lambda c: c.accumulated_resid(layer=1, incl_mid=True, return_labels=True),
    lambda c: c.accumulated_resid(apply_ln=True),
    lambda c: c.decompose_resid(return_labels=True),
    lambda c: c.decompose_resid(layer=1, mode="attn"),
    lambda c: c.stack_activation("resid_post"),
    lambda c: c.apply_ln_to_stack(c.accumulated_resid(), layer=-1),
    lambda c: c.stack_head_results(layer=1, return_labels=True),
    lambda c: c.logit_attrs(c.accumulated_resid(pos_slice=-1), tokens=torch.tensor([3, 5]), pos_slice=-1),
])
def test_methods_give_transformer_lens_numbers(model_and_caches, call):
    _, ours, theirs = model_and_caches
    _same(call(ours), call(theirs))


def test_names_filter_is_an_alias_of_names(model_and_caches):
    model, _, theirs = model_and_caches
    tokens = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    _, cache = wb.run_with_cache(model, tokens, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert sorted(cache.names) == sorted(n for n in theirs.keys() if n.endswith("hook_resid_post"))
    with pytest.raises(wb.InvalidOptionError, match="not both"):
        wb.run_with_cache(model, tokens, names="*", names_filter="*")


def test_plain_modules_get_the_generic_subset_and_a_clear_error_otherwise():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    net = Net()
    x = torch.randn(5, 4)
    _, cache = wb.run_with_cache(net, x)
    assert torch.equal(cache["layers", 2], cache["layers.2"])
    assert torch.equal(cache["1", 0], cache["layers.0.1"])  # the ReLU inside layer 0
    assert torch.equal(cache["1", -1], cache["layers.2.1"])
    stacked = cache.stack_activation("1")
    assert stacked.shape == (3, 5, 4) and torch.equal(stacked[1], cache["layers.1.1"])
    with pytest.raises(wb.UnknownNameError, match="no captured name has 'relu' in layer 0"):
        cache["relu", 0]
    with pytest.raises(wb.InvalidOptionError, match="TransformerLens model"):
        cache.accumulated_resid()
    with pytest.raises(AttributeError):
        cache.no_such_method
