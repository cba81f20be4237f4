"""The capture core on plain modules: exact values, hook hygiene, budgets, reductions, interventions."""
import re
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import workbench as wb
from workbench.hooks._capture import _COPY_AT_CAPTURE

from conftest import randomise_bn


def hook_counts(model):
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}


def manual_bn_relu(net, x):
    """Reference values computed by hand, module by module, with no hooks at all."""
    with torch.no_grad():
        z = net[0](x)
        bn = nn.functional.batch_norm(z, net[1].running_mean, net[1].running_var, net[1].weight, net[1].bias,
                                      False, 0.0, net[1].eps)
    return z, bn


# ------------------------------------------------------------------ in-place safety
def test_inplace_relu_does_not_corrupt_captured_bn_output(resnet_block_net, images):
    net = resnet_block_net
    _COPY_AT_CAPTURE.pop(net, None)
    z, bn = manual_bn_relu(net, images)
    out, cache = wb.run_with_cache(net, images, names=["0", "1", "2"])
    assert (bn < 0).any(), "the test needs negative BatchNorm outputs for ReLU to overwrite"
    torch.testing.assert_close(cache["1"], bn, rtol=0, atol=1e-6)
    torch.testing.assert_close(cache["2"], bn.clamp_min(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(out, net(images), rtol=0, atol=0)
    # ReLU(inplace=True) is a module: its input was copied just before it ran, nothing to re-run.
    assert "1" not in _COPY_AT_CAPTURE.get(net, ())


def test_functional_inplace_add_in_forward_is_copied_before_the_write(resnet_block_net, images):
    net = resnet_block_net
    with torch.no_grad():
        h = net[2](net[1](net[0](images)))
        blk = net[3]
        a = blk.relu(blk.bn1(blk.conv1(h.clone())))
        bn2 = blk.bn2(blk.conv2(a))
    _COPY_AT_CAPTURE.pop(net, None)
    forwards = []
    user = net.register_forward_pre_hook(lambda m, a: forwards.append(1))
    _, cache = wb.run_with_cache(net, images, names=["3.bn2", "3.conv2"])
    user.remove()
    # `out += identity` in Block.forward wrote into bn2's output; the write guard copied it just before.
    torch.testing.assert_close(cache["3.bn2"], bn2, rtol=0, atol=1e-6)
    assert forwards == [1]  # the forward ran once: nothing was re-run
    assert net not in _COPY_AT_CAPTURE  # nothing to learn: the guard saw the write


def test_reused_module_records_every_call(resnet_block_net, images):
    _, cache = wb.run_with_cache(resnet_block_net, images, names="3.relu")
    calls = cache.calls("3.relu")
    assert len(calls) == 2
    assert not torch.equal(calls[0], calls[1])
    with pytest.raises(wb.UnknownNameError, match=re.escape("cache.calls('3.relu')")):
        cache["3.relu"]
    with pytest.raises(KeyError):  # a KeyError, as a Mapping user would guess
        cache["3.relu"]


def test_weight_shared_module_called_in_a_loop():
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = nn.Linear(4, 4)

        def forward(self, x):
            for _ in range(3):
                x = torch.tanh(self.cell(x))
            return x

    torch.manual_seed(0)
    model, x = Recurrent(), torch.randn(2, 4)
    _, cache = wb.run_with_cache(model, x, names="cell")
    expected, h = [], x
    for _ in range(3):
        expected.append(model.cell(h))
        h = torch.tanh(expected[-1])
    assert len(cache.calls("cell")) == 3
    for got, want in zip(cache.calls("cell"), expected):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)


def test_train_mode_rerun_leaves_model_as_one_plain_forward():
    """Re-running to repair an overwrite must not double-update BatchNorm stats or change dropout."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(8, 2))
    net.train()
    _COPY_AT_CAPTURE.pop(net, None)
    x = torch.randn(16, 6)
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    twin = nn.Sequential(*[m for m in net])  # same modules: compare against a plain forward below
    torch.manual_seed(123)
    out, cache = wb.run_with_cache(net, x, names=["1", "3"])
    after_capture = {k: v.clone() for k, v in net.state_dict().items()}
    rng_after = torch.get_rng_state()
    net.load_state_dict(reference)
    torch.manual_seed(123)
    plain = twin(x)
    assert torch.equal(rng_after, torch.get_rng_state())
    for k, v in net.state_dict().items():
        assert torch.equal(after_capture[k], v), k
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    assert (cache["1"] < 0).any()
    assert net.training


def test_inference_mode_values_are_exact(resnet_block_net, images):
    _, bn = manual_bn_relu(resnet_block_net, images)
    with torch.inference_mode():
        _, cache = wb.run_with_cache(resnet_block_net, images, names="1")
    torch.testing.assert_close(cache["1"], bn, rtol=0, atol=1e-6)


def test_a_sub_module_call_is_guarded_too(resnet_block_net, images):
    """The write guard covers every torch call inside the context, not only a root forward."""
    _COPY_AT_CAPTURE.pop(resnet_block_net, None)
    block = resnet_block_net[3]
    x = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
    with wb.capture(resnet_block_net, names="3.bn2") as cache:
        block(x)  # a sub-module call: `out += identity` still runs under the guard
    torch.testing.assert_close(cache["3.bn2"], want, rtol=0, atol=1e-6)
    assert resnet_block_net not in _COPY_AT_CAPTURE


# ------------------------------------------------------------------ hygiene
def test_hooks_removed_after_exception_and_user_hooks_kept(resnet_block_net, images):
    net = resnet_block_net
    seen = []
    user = net[1].register_forward_hook(lambda m, a, o: seen.append(1))
    before = hook_counts(net)
    with pytest.raises(RuntimeError, match="boom"):
        with wb.capture(net, names=None):
            net(images)
            raise RuntimeError("boom")
    assert hook_counts(net) == before
    with pytest.raises(KeyboardInterrupt):
        with wb.capture(net, names="*"):
            raise KeyboardInterrupt
    assert hook_counts(net) == before
    seen.clear()
    net(images)
    assert seen == [1]  # the user's hook survived, and ours are gone
    user.remove()


def test_inplace_modules_need_no_rerun():
    """Values about to be overwritten by an in-place module are copied just before it runs, so the
    forward runs once (a re-run, needed only for functional in-place ops, calls user hooks again)."""
    torch.manual_seed(0)
    net = randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True))).eval()
    _COPY_AT_CAPTURE.pop(net, None)
    forwards = []
    user = net.register_forward_pre_hook(lambda m, a: forwards.append(1))
    x = torch.randn(2, 3, 6, 6)
    _, bn = manual_bn_relu(net, x)
    _, cache = wb.run_with_cache(net, x, names=["1", "2"])
    assert forwards == [1]
    torch.testing.assert_close(cache["1"], bn, rtol=0, atol=1e-6)
    assert net not in _COPY_AT_CAPTURE
    user.remove()


def test_exception_inside_forward_removes_hooks(images):
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x):
            self.a(x)
            raise ValueError("inside forward")

    model = Bad()
    before = hook_counts(model)
    with pytest.raises(ValueError, match="inside forward"):
        wb.run_with_cache(model, torch.randn(2, 3))
    assert hook_counts(model) == before


def test_model_state_is_untouched(resnet_block_net, images):
    net = resnet_block_net
    net[0].weight.requires_grad_(False)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    training = {n: m.training for n, m in net.named_modules()}
    wb.run_with_cache(net, images, names="*")
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in net.named_parameters()}
    assert training == {n: m.training for n, m in net.named_modules()}


def test_gradients_still_flow_through_a_captured_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    x = torch.randn(5, 3)
    with wb.capture(model, names="*") as cache:
        loss = model(x).sum()
    loss.backward()
    assert model[0].weight.grad is not None
    assert not cache["0"].requires_grad  # stored values are detached


# ------------------------------------------------------------------ names and errors
def test_unknown_name_lists_nearest_valid_names(resnet_block_net, images):
    with pytest.raises(wb.UnknownNameError, match=r"'3\.bn3'.*Nearest valid names: \[.*'3\.bn2'"):
        wb.run_with_cache(resnet_block_net, images, names=["1", "3.bn3"])
    with pytest.raises(wb.UnknownNameError, match="glob pattern 'layer9.*' matches no hook name"):
        wb.run_with_cache(resnet_block_net, images, names="layer9.*")
    with pytest.raises(wb.UnknownNameError, match="regex"):
        wb.run_with_cache(resnet_block_net, images, names=re.compile(r"^nothing$"))
    with pytest.raises(ValueError):  # also a ValueError
        wb.run_with_cache(resnet_block_net, images, names=lambda n: False)
    assert hook_counts(resnet_block_net) == {n: (0, 0) for n, _ in resnet_block_net.named_modules()}


def test_filters_mix_exact_glob_regex_and_callables(resnet_block_net, images):
    names = ["0", "3.*", re.compile(r"^[56]$"), lambda n: n == "4"]
    _, cache = wb.run_with_cache(resnet_block_net, images, names=names)
    assert set(cache) == {"0", "3.conv1", "3.bn1", "3.relu", "3.conv2", "3.bn2", "4", "5", "6"}


def test_unfired_name_warns_or_raises_with_strict():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    model, x = Branchy(), torch.randn(1, 2)
    with pytest.warns(UserWarning, match="never fired: 'unused'"):
        _, cache = wb.run_with_cache(model, x, names=["used", "unused"])
    assert "unused" in cache.unfired and set(cache) == {"used"}
    with pytest.raises(wb.HookNotFiredError, match="'unused'"):
        wb.run_with_cache(model, x, names=["unused"], strict=True)
    with warnings.catch_warnings():  # a pattern that matches an unused module is not a mistake
        warnings.simplefilter("error")
        wb.run_with_cache(model, x, names="*")


def test_invalid_options_are_named():
    model = nn.Linear(2, 2)
    with pytest.raises(wb.InvalidOptionError, match=r"reduce='spatial_men'.*Did you mean 'spatial_mean'"):
        wb.run_with_cache(nn.Sequential(model), torch.randn(1, 2), reduce="spatial_men")
    with pytest.raises(TypeError, match="dtype"):
        wb.run_with_cache(nn.Sequential(model), torch.randn(1, 2), dtype="float16")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        wb.hook_names(lambda x: x)


# ------------------------------------------------------------------ budget
def test_budget_stops_cleanly_and_says_what_was_needed(resnet_block_net, images):
    _, full = wb.run_with_cache(resnet_block_net, images)
    before = hook_counts(resnet_block_net)
    with pytest.raises(wb.CacheBudgetError, match=r"needs .*KiB, over the memory budget of 1\.0 KiB") as err:
        wb.run_with_cache(resnet_block_net, images, budget=1024)
    assert isinstance(err.value, MemoryError)
    assert "reduce=" in str(err.value) and "harvest" in str(err.value)
    assert hook_counts(resnet_block_net) == before
    # The budget exactly at what is needed passes; one byte less fails.
    wb.run_with_cache(resnet_block_net, images, budget=full.nbytes)
    with pytest.raises(wb.CacheBudgetError):
        wb.run_with_cache(resnet_block_net, images, budget=full.nbytes - 1)


def test_aliased_and_view_activations_count_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 8)
            self.again = self.lin  # one module under two paths
            self.ident, self.flat = nn.Identity(), nn.Flatten()

        def forward(self, x):
            return self.flat(self.ident(self.lin(x)))

    model = Tied()
    names = wb.hook_names(model)
    assert list(names) == ["lin", "ident", "flat"] and names.aliases == {"again": "lin"}
    _, cache = wb.run_with_cache(model, torch.randn(3, 4))
    # Identity and Flatten return Linear's storage: three names, one tensor's worth of memory.
    assert cache.nbytes == 3 * 8 * 4
    assert torch.equal(cache["again"], cache["lin"])
    wb.run_with_cache(model, torch.randn(3, 4), budget=3 * 8 * 4)


def test_budget_from_environment(monkeypatch, images, resnet_block_net):
    monkeypatch.setenv("WORKBENCH_CACHE_BUDGET", "1KB")
    with pytest.raises(wb.CacheBudgetError):
        wb.run_with_cache(resnet_block_net, images)


# ------------------------------------------------------------------ reduce, device, dtype, stop_at
def test_reductions_applied_before_storing(resnet_block_net, images):
    _, full = wb.run_with_cache(resnet_block_net, images, names=["0", "6"])
    _, mean = wb.run_with_cache(resnet_block_net, images, names=["0", "6"], reduce="spatial_mean")
    _, mx = wb.run_with_cache(resnet_block_net, images, names="0", reduce="spatial_max")
    _, fn = wb.run_with_cache(resnet_block_net, images, names="0", reduce=lambda a: a[:, :2, 0, 0])
    torch.testing.assert_close(mean["0"], full["0"].mean(dim=(2, 3)))
    torch.testing.assert_close(mean["6"], full["6"])  # no spatial axes: unchanged
    torch.testing.assert_close(mx["0"], full["0"].amax(dim=(2, 3)))
    torch.testing.assert_close(fn["0"], full["0"][:, :2, 0, 0])
    assert mean.nbytes < full.nbytes


def test_token_mean_and_its_error():
    model = nn.Sequential(nn.Linear(4, 6))
    x = torch.randn(2, 5, 4)
    _, cache = wb.run_with_cache(model, x, reduce="token_mean")
    torch.testing.assert_close(cache["0"], model(x).mean(dim=1).detach())
    with pytest.raises(ValueError, match=r"token_mean.*shape \(2, 6\)"):
        wb.run_with_cache(model, torch.randn(2, 4), reduce="token_mean")


def test_dtype_and_device(resnet_block_net, images):
    _, cache = wb.run_with_cache(resnet_block_net, images, names="1", dtype=torch.float64, device="cpu")
    assert cache["1"].dtype == torch.float64
    moved = cache.to(torch.float16)
    assert moved["1"].dtype == torch.float16 and cache["1"].dtype == torch.float64


def test_stop_at_skips_the_rest_of_the_forward(resnet_block_net, images):
    called = []
    handle = resnet_block_net[6].register_forward_hook(lambda m, a, o: called.append(1))
    out, cache = wb.run_with_cache(resnet_block_net, images, names=["0", "3.bn1"], stop_at=True)
    assert out is None and called == [] and set(cache) == {"0", "3.bn1"}
    with wb.capture(resnet_block_net, names=["0", "1"], stop_at="0") as cache:
        resnet_block_net(images)
        pytest.fail("the with block is left when the forward stops")
    assert set(cache) == {"0"}
    handle.remove()
    assert hook_counts(resnet_block_net) == {n: (0, 0) for n, _ in resnet_block_net.named_modules()}
    with pytest.raises(wb.InvalidOptionError, match="stop_at"):
        wb.run_with_cache(resnet_block_net, images, names="0", stop_at="1")


def test_non_tensor_outputs_need_a_picking_reduce():
    class Pair(nn.Module):
        def forward(self, x):
            return x + 1, x - 1

    model = nn.Sequential()
    model.add_module("pair", Pair())
    wrapper = nn.Sequential(nn.Linear(2, 2), model)
    with pytest.raises(wb.InvalidOptionError, match=r"returned tuple.*lambda out: out if torch.is_tensor\(out\) else out\[0\]"):
        wb.run_with_cache(wrapper, torch.randn(1, 2), names="1.pair")
    _, cache = wb.run_with_cache(wrapper, torch.randn(1, 2), names="*")
    assert "1.pair" in cache.skipped and "0" in cache


# ------------------------------------------------------------------ interventions
def test_intervene_with_tensor_and_function_and_capture_sees_it(resnet_block_net, images):
    net = resnet_block_net
    before = hook_counts(net)
    zero = torch.zeros(8)[None, :, None, None]
    with wb.intervene(net, {"4": lambda a, name: a * 0 + 1}):
        out = net(images)
    torch.testing.assert_close(out, net[6](torch.ones(4, 8)).detach().expand_as(out))
    with wb.capture(net, names=["2"]) as cache, wb.intervene(net, {"2": zero}):
        net(images)
    assert torch.count_nonzero(cache["2"]) == 0  # capture registered first, still sees the edit
    assert hook_counts(net) == before


def test_intervene_rejects_wrong_shapes_and_keeps_the_callers_tensor(resnet_block_net, images):
    with pytest.raises(wb.InvalidOptionError, match=r"shape \(3,\).*\(4, 8, 8, 8\)"):
        with wb.intervene(resnet_block_net, {"1": torch.zeros(3)}):
            resnet_block_net(images)
    with pytest.raises(wb.InvalidOptionError, match=r"returned \(4, 8\)"):
        with wb.intervene(resnet_block_net, {"1": lambda a, n: a[:, :, 0, 0]}):
            resnet_block_net(images)
    patch = torch.full((4, 8, 8, 8), -1.0)
    with wb.intervene(resnet_block_net, {"1": patch}):
        resnet_block_net(images)  # ReLU(inplace=True) runs on the replacement...
    assert (patch == -1).all()  # ...but never on the caller's tensor
    assert hook_counts(resnet_block_net) == {n: (0, 0) for n, _ in resnet_block_net.named_modules()}


# ------------------------------------------------------------------ property over random architectures
@settings(max_examples=25, deadline=None)
@given(widths=st.lists(st.integers(1, 7), min_size=1, max_size=4),
       act=st.sampled_from(["relu", "relu_inplace", "gelu", "tanh"]), seed=st.integers(0, 10_000))
def test_capture_matches_a_manual_forward_on_random_mlps(widths, act, seed):
    torch.manual_seed(seed)
    acts = {"relu": nn.ReLU, "relu_inplace": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU, "tanh": nn.Tanh}
    layers, d = [], 3
    for w in widths:
        layers += [nn.Linear(d, w), acts[act]()]
        d = w
    model = nn.Sequential(*layers)
    x = torch.randn(5, 3, dtype=torch.float32)
    expected, h = {}, x
    with torch.no_grad():
        for i, layer in enumerate(model):
            h = layer(h.clone())
            expected[str(i)] = h.clone()
    out, cache = wb.run_with_cache(model, x)
    assert list(cache) == [str(i) for i in range(len(model))]
    for name, value in expected.items():
        torch.testing.assert_close(cache[name], value, rtol=0, atol=0)
