"""The capture core runs the user's forward exactly once, and a failed forward leaves nothing stale.

Each model here writes in place into a value that is captured (the cases a re-run used to repair).
References are computed by hand on a deep copy, with no hooks, copying every value before the
in-place op; the capture must give the same values and leave the model exactly as one plain forward.
"""
import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import workbench as wb
from workbench.hooks._capture import _COPY_AT_CAPTURE

INPLACE = {
    "iadd": lambda h: h.__iadd__(1.5),
    "functional_relu": lambda h: F.relu(h, inplace=True),
    "positional_inplace": lambda h: F.leaky_relu(h, 0.1, True),
    "torch_namespace": lambda h: torch.relu_(h),
    "method_relu_": lambda h: h.relu_(),
    "setitem": lambda h: h.__setitem__((slice(None), 0), 7.0),
    "out_kwarg": lambda h: torch.add(h.detach(), 2.0, out=h.detach()),  # out= needs no autograd
    "view_write": lambda h: h.view(-1).mul_(3.0),
    "data_write": lambda h: h.data.sub_(1.0),
    "foreach": lambda h: torch._foreach_mul_([h.detach()], 2.0),  # as an optimizer step writes
}


class Writer(nn.Module):
    """lin -> (an in-place write into lin's output) -> head; counts its own calls; a buffer is
    reassigned (not updated in place) on every call."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.lin, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        self.steps = self.steps + 1  # reassigned: a re-run would leave it at 2
        h = self.lin(x)
        INPLACE[self.kind](h)
        return self.head(h)


def by_hand(model: Writer, x):
    """lin's output and the model's output, copied by hand with no hooks at all."""
    with torch.no_grad():
        lin = model.lin(x).clone()
        h = lin.clone()
        INPLACE[model.kind](h)
        return lin, model.head(h)


@pytest.mark.parametrize("kind", sorted(INPLACE))
def test_forward_runs_once_and_values_are_exact(kind):
    torch.manual_seed(0)
    model, x = Writer(kind), torch.randn(5, 4)
    twin = copy.deepcopy(model)
    lin_ref, out_ref = by_hand(twin, x)
    twin(x)  # the twin runs one plain forward: the state the model must end in
    fired = []
    user = model.register_forward_hook(lambda m, a, o: fired.append(1))
    out, cache = wb.run_with_cache(model, x, names=["lin", "head"])
    user.remove()
    assert fired == [1] and model.calls == 1 and int(model.steps) == 1
    assert int(twin.steps) == int(model.steps)
    torch.testing.assert_close(cache["lin"], lin_ref, rtol=0, atol=0)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    assert model not in _COPY_AT_CAPTURE  # the guard saw the write: nothing had to be learned


def test_the_negative_control_shows_the_write_would_corrupt_a_reference():
    """Without the guard (a hand-written hook keeping the reference) the in-place op corrupts it."""
    torch.manual_seed(0)
    model, x = Writer("functional_relu"), torch.randn(5, 4)
    lin_ref, _ = by_hand(model, x)
    kept = {}
    h = model.lin.register_forward_hook(lambda m, a, o: kept.setdefault("lin", o.detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    assert (lin_ref < 0).any() and not torch.equal(kept["lin"], lin_ref)


class TrainBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.bn, self.drop, self.head = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Linear(8, 2)

    def forward(self, x):
        h = self.bn(self.lin(x))
        h.relu_()  # overwrites the captured BatchNorm output
        return self.head(self.drop(h))


def test_batchnorm_in_train_mode_updates_statistics_exactly_once():
    torch.manual_seed(0)
    model, x = TrainBN().train(), torch.randn(16, 6)
    twin = copy.deepcopy(model)
    torch.manual_seed(7)
    plain = twin(x)
    rng_plain = torch.get_rng_state()
    with torch.no_grad():
        bn_ref = nn.functional.batch_norm(model.lin(x), None, None, model.bn.weight, model.bn.bias, True)
    torch.manual_seed(7)
    out, cache = wb.run_with_cache(model, x, names=["bn", "drop"])
    assert torch.equal(torch.get_rng_state(), rng_plain)  # dropout drew its mask once
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    for k, v in twin.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k  # running stats, num_batches_tracked
    assert int(model.bn.num_batches_tracked) == 1
    torch.testing.assert_close(cache["bn"], bn_ref, rtol=1e-6, atol=1e-6)
    assert (cache["bn"] < 0).any()


class Unseen(nn.Module):
    """Writes into lin's output where the write guard cannot see it."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.lin, self.head = how, nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.lin(x)
        if self.how == "disabled":
            with torch._C.DisableTorchFunction():
                h.mul_(-1.0)
        else:  # another thread: torch function modes are per thread
            t = threading.Thread(target=lambda: h.mul_(-1.0))
            t.start()
            t.join()
        return self.head(h)


@pytest.mark.parametrize("how", ["disabled", "thread"])
def test_an_unseen_overwrite_is_refused_then_copied_next_time(how):
    torch.manual_seed(0)
    model, x = Unseen(how), torch.randn(5, 4)
    _COPY_AT_CAPTURE.pop(model, None)
    with torch.no_grad():
        lin_ref = model.lin(x).clone()
    fired = []
    user = model.register_forward_pre_hook(lambda m, a: fired.append(1))
    with pytest.raises(wb.ActivationOverwrittenError, match=r"\['lin'\].*copies these names") as err:
        with wb.capture(model, names=["lin", "head"]) as cache:
            model(x)
    assert isinstance(err.value, RuntimeError)
    assert fired == [1]  # refused, not re-run
    assert len(cache) == 0 and "overwritten in place" in cache.unfired["lin"]  # no wrong value readable
    with pytest.raises(KeyError, match="has no value.*overwritten in place"):
        cache["lin"]
    assert "ActivationOverwrittenError" in cache.failures[0]
    assert _COPY_AT_CAPTURE[model] == {"lin"}
    out, again = wb.run_with_cache(model, x, names=["lin", "head"])  # learned: copied at capture
    assert fired == [1, 1]
    torch.testing.assert_close(again["lin"], lin_ref, rtol=0, atol=0)
    user.remove()


def test_an_unseen_overwrite_of_a_sub_module_call_drops_that_value():
    torch.manual_seed(0)
    model, x = Unseen("disabled"), torch.randn(5, 4)
    _COPY_AT_CAPTURE.pop(model, None)
    with pytest.raises(wb.ActivationOverwrittenError):
        with wb.capture(model, names=["lin", "head"]) as cache:
            model.lin(x).mul_(1)  # guarded: copied first
            with torch._C.DisableTorchFunction():
                model.lin(x).mul_(-1)  # unseen: refused at the end of the block
    assert "lin" not in cache and "overwritten in place" in cache.skipped["lin"]


def test_capture_stays_exact_until_the_block_ends():
    """An in-place write after the forward, still inside the block, does not reach the cache."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(3, 4)), torch.randn(2, 3)
    with wb.capture(model, names="0") as cache:
        out = model(x)
        want = out.detach().clone()
        out.detach().zero_()
    torch.testing.assert_close(cache["0"], want, rtol=0, atol=0)


# ------------------------------------------------------------------ item 6: failed forwards
class Failing(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.fail = False

    def forward(self, x):
        h = self.a(x)
        if self.fail:
            raise ValueError("inside forward")
        return self.b(h)


def test_a_failed_forward_leaves_no_value_and_says_what_it_missed():
    torch.manual_seed(0)
    model, x = Failing(), torch.randn(2, 3)
    model.fail = True
    with pytest.raises(ValueError, match="inside forward"):
        with wb.capture(model, names=["a", "b"]) as cache:
            model(x)
    assert len(cache) == 0 and "a" not in cache  # 'a' fired, but in a forward that failed
    assert "b" in cache.unfired and "ValueError" in cache.unfired["b"]
    assert len(cache.failures) == 1 and "names it never reached: ['b']" in cache.failures[0]
    with pytest.raises(KeyError, match="has no value.*ValueError"):
        cache["b"]


def test_a_failed_forward_inside_the_block_is_rolled_back_at_once():
    torch.manual_seed(0)
    model = Failing()
    x1, x2 = torch.randn(2, 3), torch.randn(2, 3)
    with torch.no_grad():
        a1, b1 = model.a(x1), model.b(model.a(x1))
    with wb.capture(model, names=["a", "b"]) as cache:
        model(x1)
        model.fail = True
        with pytest.raises(ValueError):
            model(x2)
        # read inside the block, right after the failure: only the first forward's values
        assert len(cache.calls("a")) == 1 and len(cache.failures) == 1
        torch.testing.assert_close(cache["a"], a1, rtol=0, atol=0)
    torch.testing.assert_close(cache["b"], b1, rtol=0, atol=0)
    assert "never reached: ['b']" in cache.failures[0] and "failed forward" in repr(cache)


def test_a_reused_capture_object_never_shows_the_previous_values():
    torch.manual_seed(0)
    model = Failing()
    ctx = wb.capture(model, names=["a", "b"])
    with ctx as first:
        model(torch.randn(2, 3))
    kept = first["b"].clone()
    model.fail = True
    with pytest.raises(ValueError):
        with ctx as second:
            model(torch.randn(2, 3))
    assert len(second) == 0 and set(second.unfired) == {"a", "b"}  # nothing of `first` leaks in
    assert "discarded" in second.unfired["a"] and "before reaching it" in second.unfired["b"]
    torch.testing.assert_close(first["b"], kept, rtol=0, atol=0)  # the first cache is untouched


def test_keyboard_interrupt_inside_the_forward_rolls_back_too():
    class Interrupting(Failing):
        def forward(self, x):
            self.a(x)
            raise KeyboardInterrupt

    model = Interrupting()
    before = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}
    with pytest.raises(KeyboardInterrupt):
        with wb.capture(model, names=["a", "b"]) as cache:
            model(torch.randn(2, 3))
    assert len(cache) == 0 and "KeyboardInterrupt" in cache.failures[0]
    assert before == {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}
    assert torch.overrides._get_current_function_mode() is None  # the write guard is gone too
