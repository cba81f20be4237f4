"""Adversarial models for the capture: every way a captured value could differ from what its module produced.

Each model writes into a captured value by some route; the reference is computed by hand with no hooks
(``lin(x).clone()`` before anything writes). A capture must give exactly the reference, or refuse
(``ActivationOverwrittenError``); a documented limitation is pinned as such. Negative controls show that a
hand-written hook keeping a reference gets the wrong value in the same model, so the reference would catch it.
"""
import copy
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import _get_current_function_mode_stack as mode_stack

import workbench as wb
from workbench import ActivationOverwrittenError, CacheBudgetError, InvalidOptionError
from workbench._errors import UnsupportedModelError
from workbench.hooks._capture import _COPY_AT_CAPTURE

# A custom operator that writes its argument and has no "_" in its name (torch.library, as extensions declare them).
_LIB = torch.library.Library("wb_adversary", "FRAGMENT")
_LIB.define("shift(Tensor(a!) x, float k) -> ()")


def _shift(x, k):
    x.add_(k)


_LIB.impl("shift", _shift, "CPU")

# Routes of a write into the value ``h`` of module ``lin``, seen by the write guard (same thread, torch calls).
SEEN = {
    "aten_overload_add_": lambda h: torch.ops.aten.add_.Tensor(h, torch.ones_like(h)),
    "aten_overload_relu_": lambda h: torch.ops.aten.relu_.default(h),
    "aten_overload_copy_": lambda h: torch.ops.aten.copy_.default(h, torch.zeros_like(h)),
    "aten_overload_foreach": lambda h: torch.ops.aten._foreach_add_.Scalar([h.detach()], 1.0),
    "aten_packet_add_": lambda h: torch.ops.aten.add_(h, torch.ones_like(h)),
    "aten_out": lambda h: torch.ops.aten.add.out(h.detach(), h.detach(), out=h.detach()),
    "copy_": lambda h: h.copy_(torch.zeros_like(h)),
    "relu_module_inplace": lambda h: nn.ReLU(inplace=True)(h),
    "t_then_write": lambda h: h.detach().t_().mul_(2),
    "as_strided": lambda h: h.as_strided((2,), (1,)).fill_(9),
    "column_fill_": lambda h: h[:, 0].fill_(0),
    "flat_view_setitem": lambda h: h.view(-1).__setitem__(0, 5.0),
    "transpose_view": lambda h: h.transpose(0, 1).mul_(2),
    "unbind_view": lambda h: h.unbind(0)[0].mul_(2),
    "index_put_": lambda h: h.index_put_((torch.tensor([0]),), torch.tensor(4.0)),
    "scatter_": lambda h: h.scatter_(1, torch.zeros(h.shape[0], 1, dtype=torch.long), 7.0),
    "masked_fill_": lambda h: h.masked_fill_(h > 0, 0.0),
    "resize_": lambda h: h.detach().resize_(h.numel()).fill_(1),
    "set_then_write": lambda h: torch.empty(0).set_(h.detach()).fill_(2),
    "detach_zero_": lambda h: h.detach().zero_(),
    "swap_tensors": lambda h: torch.utils.swap_tensors(h, torch.zeros_like(h)),
    "complex_view": lambda h: torch.view_as_complex(h.detach().view(h.shape[0], -1, 2)).mul_(2j),
    "int_bitcast_view": lambda h: h.detach().view(torch.int32).bitwise_xor_(1),
    "dlpack_alias": lambda h: torch.from_dlpack(h.detach()).mul_(2),
    "custom_op_packet": lambda h: torch.ops.wb_adversary.shift(h, 1.0),
    "custom_op_overload": lambda h: torch.ops.wb_adversary.shift.default(h, 1.0),
    "keyword_input": lambda h: torch.relu_(input=h),
    "numpy_bool_inplace_flag": lambda h: F.relu(h, inplace=np.True_),
}


class Writer(nn.Module):
    def __init__(self, write):
        super().__init__()
        self.write = write
        self.lin, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.lin(x)
        self.write(h)
        return self.head(h)


def reference(model, x):
    with torch.no_grad():
        return (model.lin if hasattr(model, "lin") else model.a)(x).clone()


def by_reference_hook(model, x):
    """The negative control: a hand-written hook keeping a reference to lin's output."""
    kept = []
    handle = model.lin.register_forward_hook(lambda m, a, o: kept.append(o.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return kept[0]


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()) and not mode_stack()


@pytest.mark.parametrize("route", sorted(SEEN))
def test_every_route_the_guard_sees_gives_the_value_as_produced(route):
    torch.manual_seed(0)
    model, x = Writer(SEEN[route]), torch.randn(5, 4)
    ref = reference(model, x)
    if route not in ("swap_tensors",):  # swap_tensors moves h's memory away: a kept reference stays right
        assert not torch.equal(by_reference_hook(model, x), ref)  # the write does reach a kept reference
    with torch.no_grad():
        _, cache = wb.run_with_cache(model, x, names=["lin", "head"])
    torch.testing.assert_close(cache["lin"], ref, rtol=0, atol=0)
    assert model not in _COPY_AT_CAPTURE  # seen by the guard, not refused by the version check
    assert no_hooks_left(model)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64, torch.bfloat16, torch.float16])
def test_outputs_of_every_dtype_written_in_place_are_kept_as_produced(dtype):
    class Cast(nn.Module):
        def forward(self, x):
            return (x * 3).to(dtype)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.cast = Cast()

        def forward(self, x):
            y = self.cast(x)
            produced = y.clone()
            y.logical_not_() if dtype == torch.bool else y.zero_()
            return produced

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        produced, cache = wb.run_with_cache(M(), x, names=["cast"])
    assert cache["cast"].dtype == dtype and torch.equal(cache["cast"], produced)


class Stats(nn.Module):
    """Returns its running mean (a buffer), which a functional batch norm in training mode then updates."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)

    def forward(self, x):
        return self.mean


class StatsUser(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.stats, self.lin = Stats(norm), nn.Linear(4, 4)

    def forward(self, x):
        m = self.stats(x)
        if self.stats.norm == "batch_norm":
            F.batch_norm(x, self.stats.mean, self.stats.var, training=True, momentum=0.5)
        elif self.stats.norm == "torch.batch_norm":
            torch.batch_norm(x, None, None, self.stats.mean, self.stats.var, True, 0.5, 1e-5, False)
        else:
            F.instance_norm(x.t().reshape(1, 4, -1), self.stats.mean, self.stats.var, momentum=0.5)
        return self.lin(x) + m


@pytest.mark.parametrize("norm", ["batch_norm", "torch.batch_norm", "instance_norm"])
def test_running_statistics_written_by_a_norm_function_are_kept_as_produced(norm):
    """F.batch_norm writes its running statistics (not its first argument) without moving their version
    counter: nothing but the guard can see it."""
    torch.manual_seed(0)
    model, x = StatsUser(norm), torch.randn(6, 4)
    produced = model.stats.mean.clone()
    kept = []
    handle = model.stats.register_forward_hook(lambda m, a, o: kept.append(o.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    assert not torch.equal(kept[0], produced)  # negative control: the update reaches a kept reference
    model.stats.mean.copy_(produced)
    with torch.no_grad():
        _, cache = wb.run_with_cache(model, x, names=["stats"])
    assert torch.equal(cache["stats"], produced) and model not in _COPY_AT_CAPTURE


def test_an_embedding_renormalising_its_weight_is_kept_as_produced():
    class Weight(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 4, max_norm=0.1)

        def forward(self, i):
            return self.emb.weight  # the output is the weight, which the lookup below renormalises

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = Weight()

        def forward(self, i):
            w = self.w(i)
            return self.w.emb(i) + 0 * w.sum()

    torch.manual_seed(0)
    model, i = M(), torch.tensor([[0, 1]])
    produced = model.w.emb.weight.detach().clone()
    with torch.no_grad():
        _, cache = wb.run_with_cache(model, i, names=["w"])
    assert torch.equal(cache["w"], produced) and model not in _COPY_AT_CAPTURE
    assert not torch.equal(model.w.emb.weight, produced)  # the renormalisation did write the weight


def test_share_memory_moving_a_value_is_copied_first():
    model = Writer(lambda h: (h.share_memory_(), h.mul_(2)))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    ref = reference(model, x)
    with torch.no_grad():
        _, cache = wb.run_with_cache(model, x, names=["lin"])
    assert torch.equal(cache["lin"], ref) and model not in _COPY_AT_CAPTURE


class Aliases(nn.Module):
    """lin's output under three names (a flattening view, an identity), then written through the last alias;
    an empty slice of it; and lin called again on the written value (a shared module)."""

    def __init__(self):
        super().__init__()
        self.lin, self.flat, self.same, self.empty = nn.Linear(4, 4), nn.Flatten(0), nn.Identity(), nn.Identity()

    def forward(self, x):
        h = self.lin(x)
        f = self.same(self.flat(h))
        self.empty(f[:0])
        f.mul_(-1)
        again = self.lin(h)
        again.t_().fill_(0)
        return h


@pytest.mark.parametrize("grad", ["no_grad", "enable_grad", "inference_mode"])
@pytest.mark.parametrize("dtype", [None, torch.float32, torch.float64])
def test_aliases_shared_modules_and_conversions_keep_the_values_as_produced(grad, dtype):
    torch.manual_seed(0)
    model, x = Aliases(), torch.randn(3, 4)
    with torch.no_grad():
        first = model.lin(x).clone()
        second = model.lin(-first).clone()
    mode = {"no_grad": torch.no_grad, "enable_grad": torch.enable_grad, "inference_mode": torch.inference_mode}[grad]
    with mode():
        _, cache = wb.run_with_cache(model, x, dtype=dtype)
    want = dtype or torch.float32
    assert [torch.equal(t, r.to(want)) for t, r in zip(cache.calls("lin"), [first, second])] == [True, True]
    assert torch.equal(cache["flat"], first.flatten(0).to(want)) and torch.equal(cache["same"], cache["flat"])
    assert cache["empty"].shape == (0,) and not any(t.requires_grad for n in cache for t in cache.calls(n))
    assert no_hooks_left(model)


# ---------------------------------------------------------------- writes after the capture ended
class Pos(nn.Module):
    """Returns a view of its parameter (a positional embedding): the output shares the weight's memory."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(8, 4))

    def forward(self, x):
        return self.W[: x.shape[1]].expand(x.shape[0], -1, -1)


class Running(nn.Module):
    """Returns its buffer after updating it in place: the next forward writes into the previous output."""

    def __init__(self):
        super().__init__()
        self.register_buffer("acc", torch.zeros(3))

    def forward(self, x):
        self.acc.mul_(0.5).add_(x.mean(0))
        return self.acc


def test_a_value_written_after_the_block_is_refused_never_read_wrong():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 3), nn.Tanh()), torch.randn(2, 4)
    with torch.no_grad():
        out, cache = wb.run_with_cache(model, x, names=["0", "1"])
    produced, first = out.clone(), cache["0"].clone()
    out.mul_(0)  # the caller edits the model's output, which is the last module's value
    with pytest.raises(ActivationOverwrittenError, match=r"'1' is no longer the value its module produced"):
        cache["1"]
    with pytest.raises(ActivationOverwrittenError):
        cache.calls("1")
    with pytest.raises(ActivationOverwrittenError):
        cache.to(torch.float64)
    torch.testing.assert_close(cache["0"], first, rtol=0, atol=0)  # untouched names still read
    # negative control: what the cache would have handed back without the check
    assert not torch.equal(cache._calls["1"][0], produced)


def test_a_read_inside_the_block_refuses_a_value_an_unseen_op_wrote():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 3), nn.Tanh()), torch.randn(2, 4)
    with torch.no_grad():
        ref = model[0](x).clone()
    with pytest.raises(ActivationOverwrittenError, match="when the block ends"):
        with torch.no_grad(), wb.capture(model, names=["0"]) as cache:
            model(x)
            assert torch.equal(cache["0"], ref)
            with torch._C.DisableTorchFunction():  # unseen by the guard: only the version counter moves
                cache._calls["0"][0].mul_(2)
            cache["0"]
    assert no_hooks_left(model)


def test_an_optimizer_step_on_a_weight_the_output_views_is_refused_after_the_block():
    torch.manual_seed(0)
    model = nn.Sequential(Pos(), nn.Linear(4, 4))
    x = torch.randn(2, 5, 4)
    out, cache = wb.run_with_cache(model, x, names=["0"])
    produced = cache["0"].clone()
    out.sum().backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert not torch.equal(cache._calls["0"][0], produced)  # the held view did change
    with pytest.raises(ActivationOverwrittenError, match="optimizer step"):
        cache["0"]


def test_the_next_forward_writing_a_returned_buffer_is_refused_after_the_block_and_copied_inside():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 3), Running()), torch.randn(2, 4)
    refs = []
    with torch.no_grad(), wb.capture(model, names=["1"]) as inside:
        model(x)
        refs.append(model[1].acc.clone())
        model(x)
        refs.append(model[1].acc.clone())
    assert [torch.equal(a, b) for a, b in zip(inside.calls("1"), refs)] == [True, True]
    # this model's "1" was copied by the guard above, so later captures copy it in the hook: exact for good
    with torch.no_grad():
        _, learned = wb.run_with_cache(model, x, names=["1"])
        produced = model[1].acc.clone()
        model(x)
    assert torch.equal(learned["1"], produced)
    fresh = nn.Sequential(nn.Linear(4, 3), Running())  # never captured: "1" is held by reference
    with torch.no_grad():
        _, after = wb.run_with_cache(fresh, x, names=["1"])
        fresh(x)  # a forward outside any capture updates the buffer the cached value is
    with pytest.raises(ActivationOverwrittenError):
        after["1"]


# ---------------------------------------------------------------- sparse, TorchScript, re-entry, out of order
class Sparse(nn.Module):
    def forward(self, x):
        return x.to_sparse()


class SparseWriter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.sp = nn.Linear(4, 3), Sparse()

    def forward(self, x):
        y = self.sp(self.lin(x))
        produced = y.to_dense().clone()
        y._values().mul_(2)  # writes the values tensor the output shares
        return produced


def test_sparse_outputs_are_kept_as_produced_and_counted():
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    model = SparseWriter()
    kept = []
    handle = model.sp.register_forward_hook(lambda m, a, o: kept.append(o.detach()))
    with torch.no_grad():
        produced = model(x)
    handle.remove()
    assert not torch.equal(kept[0].to_dense(), produced)  # negative control: a kept reference is written
    with torch.no_grad():
        produced, cache = wb.run_with_cache(model, x, names=["sp"])
    assert cache["sp"].is_sparse and torch.equal(cache["sp"].to_dense(), produced)
    assert cache.nbytes > 0 and no_hooks_left(model)


def test_harvest_refuses_sparse_values_clearly(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), Sparse())
    with pytest.raises(InvalidOptionError, match="to_dense"):
        wb.harvest(model, [torch.randn(2, 4)], names=["1"], path=tmp_path / "acts", progress=False)
    assert no_hooks_left(model)


@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_values_inside_torch_func_transforms_are_refused_clearly(transform):
    model, xs = nn.Sequential(nn.Linear(4, 4), nn.Tanh()), torch.randn(5, 3, 4)
    with pytest.raises(UnsupportedModelError, match=r"'0'.*torch.func transform.*direct call"):
        with wb.capture(model, names=["0"]):
            if transform == "vmap":
                torch.func.vmap(model)(xs)
            else:
                params = dict(model.named_parameters())
                torch.func.grad(lambda p, x: torch.func.functional_call(model, p, x).sum())(params, xs[0])
    assert no_hooks_left(model)


def test_a_reduce_writing_into_the_output_is_refused_rather_than_changing_the_forward():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), torch.randn(3, 4)
    with torch.no_grad():
        plain = model(x)
        with pytest.raises(InvalidOptionError, match=r"reduce wrote into the output of '0' in place"):
            wb.run_with_cache(model, x, names=["0"], reduce=lambda out: out.relu_().mean(0, keepdim=True))
        out, cache = wb.run_with_cache(model, x, names=["0"], reduce=lambda out: out.relu().mean(0, keepdim=True))
    assert torch.equal(out, plain) and no_hooks_left(model)


def test_nested_jagged_outputs_are_kept_as_private_copies():
    class Double(nn.Module):
        def forward(self, x):
            return x * 2

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.twice = Double()

        def forward(self, x):
            y = self.twice(x)
            produced = y.values().clone()
            y.values().zero_()  # writes the memory the output shares
            return produced

    nt = torch.nested.nested_tensor([torch.randn(2, 4), torch.randn(3, 4)], layout=torch.jagged)
    with torch.no_grad():
        produced, cache = wb.run_with_cache(M(), nt, names=["twice"])
    assert cache["twice"].is_nested and torch.equal(cache["twice"].values(), produced)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        h.relu_()
        return self.b(h)


def test_torchscript_modules_are_refused_or_skipped_with_a_reason():
    x = torch.randn(3, 4)
    scripted = torch.jit.script(Inner())
    with pytest.raises(UnsupportedModelError, match="TorchScript"):
        wb.capture(scripted)
    model = nn.Sequential(torch.jit.script(Inner()), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModelError, match=r"inside a TorchScript module \(\['0'\]\)"):
        wb.capture(model, names=["0.a"])
    with torch.no_grad():
        out, cache = wb.run_with_cache(model, x)
    assert list(cache) == ["1"] and "TorchScript" in cache.skipped["0"]
    torch.testing.assert_close(cache["1"], out, rtol=0, atol=0)
    assert not mode_stack() and not model[1]._forward_hooks


def test_a_capture_object_entered_inside_its_own_block_is_refused():
    model, x = Inner(), torch.randn(3, 4)
    ref = reference(model, x)
    ctx = wb.capture(model, names=["a"])
    with torch.no_grad(), ctx as cache:
        with pytest.raises(InvalidOptionError, match="already open"):
            with ctx:
                pass
        model(x)
    assert [torch.equal(t, ref) for t in cache.calls("a")] == [True]  # hooks were not attached twice
    assert no_hooks_left(model)


def test_captures_left_out_of_order_each_remove_their_own_guard():
    model, x = Inner(), torch.randn(3, 4)
    ref = reference(model, x)
    first, second = wb.capture(model, names=["a"]), wb.capture(model, names=["a"])
    a, b = first.__enter__(), second.__enter__()
    with torch.no_grad():
        model(x)
        first.__exit__(None, None, None)  # the second's guard must stay: it still guards its values
        model(x)  # h.relu_() writes again: only the second's guard can copy its value first
    second.__exit__(None, None, None)
    assert torch.equal(a["a"], ref)
    assert [torch.equal(t, ref) for t in b.calls("a")] == [True, True]
    assert model not in _COPY_AT_CAPTURE and no_hooks_left(model)


def test_an_outer_captures_stop_at_ends_its_own_block_not_the_inner_one():
    """The inner capture used to take the outer one's stop for its own: the code after the inner block ran
    and the outer capture discarded the value it had stopped for."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)), torch.randn(2, 4)
    with torch.no_grad():
        ref = model[0](x).clone()
    ran_on = []
    with torch.no_grad(), wb.capture(model, names=["0"], stop_at=True) as outer:
        with wb.capture(model, names=["0", "1", "2"]) as inner:
            model(x)
        ran_on.append("after the inner block")
    assert ran_on == [] and torch.equal(outer["0"], ref) and outer.failures == []
    assert list(inner) == [] and "stop_at of another capture" in inner.failures[0]
    assert no_hooks_left(model)


class OnEachItem(nn.Module):
    """Calls itself on each item of a list input (a common way to take lists), after a module of its own."""

    def __init__(self, fail_once=False):
        super().__init__()
        self.pre, self.lin, self.fail_once = nn.Linear(4, 4), nn.Linear(4, 4), fail_once

    def forward(self, x):
        if isinstance(x, list):
            p = self.pre(x[0])
            if self.fail_once:
                try:
                    self(None)  # an inner call that raises, caught by the forward itself
                except TypeError:
                    pass
            return [self(t) for t in x] + [p]
        return self.lin(x)


@pytest.mark.parametrize("fail_once", [False, True])
def test_a_model_calling_itself_inside_its_forward_keeps_every_value_and_reports_no_failure(fail_once):
    """Each inner call used to be taken for a new forward after an interrupted one: the outer forward's values
    were discarded ('pre' lost) and a failure was reported although nothing failed."""
    torch.manual_seed(0)
    model, xs = OnEachItem(fail_once), [torch.randn(2, 4), torch.randn(3, 4)]
    with torch.no_grad():
        refs = [model.lin(t).clone() for t in xs]
        pre = model.pre(xs[0]).clone()
        _, cache = wb.run_with_cache(model, xs, names=["lin", "pre"])
    assert cache.failures == [] and cache.unfired == {}
    assert [torch.equal(a, b) for a, b in zip(cache.calls("lin"), refs)] == [True, True]
    assert torch.equal(cache["pre"], pre) and no_hooks_left(model)


def test_a_budget_fitting_exactly_what_is_kept_is_enough_when_the_guard_copies():
    model, x = Inner(), torch.randn(3, 4)  # a's output is copied by the guard before relu_ writes it
    kept = 2 * 3 * 4 * 4
    with torch.no_grad():
        _, cache = wb.run_with_cache(model, x, names=["a", "b"], budget=kept)
    assert cache.nbytes == kept and torch.equal(cache["a"], reference(model, x))
    with torch.no_grad(), pytest.raises(CacheBudgetError, match="needs 96 B"):
        wb.run_with_cache(model, x, names=["a", "b"], budget=kept - 1)
    assert no_hooks_left(model)


# ---------------------------------------------------------------- harvest
@pytest.mark.parametrize("route", ["aten_overload_add_", "column_fill_", "relu_module_inplace", "resize_"])
def test_harvest_stores_a_value_overwritten_in_place_as_produced(tmp_path, route):
    torch.manual_seed(0)
    model = Writer(SEEN[route])
    batches = [torch.randn(5, 4) for _ in range(3)]
    store = wb.harvest(model, batches, names=["lin"], path=tmp_path / "acts", progress=False)
    assert store.complete
    got = np.asarray(store["lin"])
    want = torch.cat([reference(model, b) for b in batches]).numpy()
    np.testing.assert_array_equal(got, want)
    assert no_hooks_left(model)


def test_harvest_names_a_module_whose_output_it_cannot_store_instead_of_saying_it_never_fired(tmp_path):
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            h = self.lin(x)
            return h, h

    model = nn.Sequential(Pair())
    with pytest.raises(InvalidOptionError, match=r"cannot store '0': its module returned tuple.*reduce=lambda"):
        wb.harvest(model, [torch.randn(2, 4)], path=tmp_path / "acts", progress=False)
    assert no_hooks_left(model)
    store = wb.harvest(model, [torch.randn(2, 4)], names=["0"], reduce=lambda out: out[0], progress=False)
    assert store["0"].shape == (2, 4)


# ---------------------------------------------------------------- documented limitations (docs/ARCHITECTURE.md)
def _numpy_write(h):
    h.detach().numpy()[0, 0] = 123.0


def _data_write_on_a_thread(h):
    t = threading.Thread(target=lambda: h.data.mul_(3))
    t.start()
    t.join()


def _storage_write(h):
    h.untyped_storage().fill_(0)


@pytest.mark.parametrize("write", [_numpy_write, _data_write_on_a_thread, _storage_write])
def test_writes_outside_torch_calls_and_version_counters_are_a_documented_limitation(write):
    """NumPy views, ``.data`` (a fresh version counter) off the guard's thread, and storage objects write
    memory with no torch call the guard sees and no version counter moving: the capture cannot tell, and
    keeps the written value. This pins that documented behaviour (docs/ARCHITECTURE.md, "What the capture
    cannot see"); if it changes, update the docs."""
    torch.manual_seed(0)
    model, x = Writer(write), torch.randn(5, 4)
    ref = reference(model, x)
    with torch.no_grad():
        _, cache = wb.run_with_cache(model, x, names=["lin"])
    assert not torch.equal(cache["lin"], ref)
    assert no_hooks_left(model)



# ---------------------------------------------------------------- torch.compile
class Compiled(Inner):
    """Inner with a second in-place write (an indexed assignment) for the compiler to trace."""

    def forward(self, x):
        h = self.a(x).relu_()
        h[:, 0] = 5.0
        return self.b(h)


@pytest.mark.parametrize("whole", [True, False], ids=["compiled_model", "compiled_submodule"])
def test_a_compiled_model_gives_the_values_as_produced(whole):
    """Dynamo traces through the write guard (aot_eager: its graphs, without a C++ compiler)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    plain, x = Compiled(), torch.randn(3, 4)
    ref = reference(plain, x)
    compiled = torch.compile(plain, backend="aot_eager")
    model = compiled if whole else nn.Sequential(compiled)
    key = "_orig_mod.a" if whole else "0._orig_mod.a"
    with torch.no_grad():
        for _ in range(2):  # the second run uses the compiled graph (and copies in the hook)
            out, cache = wb.run_with_cache(model, x)
            assert torch.equal(cache[key], ref) and torch.equal(out, plain(x))
    assert no_hooks_left(model)


def test_an_intermediate_only_the_cache_holds_is_the_callers_to_edit():
    # Container semantics for what only the cache holds: the caller normalising a value in place reads it back
    # edited (as from any dict of tensors), while a value sharing memory with the model or the caller's output is
    # still refused once written (the tests above).
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(3, 4)
    with torch.no_grad():
        out, cache = wb.run_with_cache(model, x)
        a = cache["0"]
        a /= a.norm()
    assert cache["0"] is a and torch.equal(cache["0"], a)
    assert abs(float(cache["0"].norm()) - 1.0) < 1e-6
    out.mul_(0)  # the caller's output is the last module's value: that one is refused
    with pytest.raises(ActivationOverwrittenError, match="'2' is no longer the value its module produced"):
        cache["2"]


def test_a_value_that_is_the_callers_input_is_refused_once_the_input_is_written():
    model, x = nn.Sequential(nn.Identity(), nn.Linear(4, 2)), torch.randn(3, 4)
    with torch.no_grad():
        _, cache = wb.run_with_cache(model, x, names=["0"])
        kept = x.clone()
        assert torch.equal(cache["0"], kept)
        x.copy_(torch.randn(3, 4))  # a loop refilling its input buffer for the next batch
    with pytest.raises(ActivationOverwrittenError, match="'0' is no longer"):
        cache["0"]


def test_a_copy_made_inside_an_open_capture_and_the_maps_own_run_record_nothing():
    # copy.deepcopy copies a module's hook dicts. A copy made inside the block (random_intertwiner's new model, a
    # user's deepcopy) used to carry a deep copy of the whole capture, captured values included: its forwards ran
    # that second capture, which refused them (ActivationOverwrittenError naming every name) and kept running after
    # the block. Now the copy's hooks share the capture and ignore modules they were not registered on.
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval(), torch.randn(3, 4)
    with torch.no_grad():
        want = model(x).clone()
        with wb.capture(model) as cache:
            model(x)
            new, t = wb.random_intertwiner(model, seed=0)
            wb.symmetry_map(model, torch.randn(5, 4))
            before = {k: len(cache.calls(k)) for k in cache}
            # the map's one-example runs are the verb's own: not recorded (only the caller's forward is)
            assert before == {"0": 1, "1": 1, "2": 1}
            out = new(x)
            twin = copy.deepcopy(model)
            twin(x)
            assert {k: len(cache.calls(k)) for k in cache} == before
        for _ in range(2):  # after the block too: the copies run as plain models
            assert torch.allclose(new(x), want, atol=1e-5) and torch.equal(twin(x), want)
    assert torch.allclose(out, want, atol=1e-5)
    assert {k: len(cache.calls(k)) for k in cache} == before
    assert torch.equal(cache.calls("2")[0], want)
    assert no_hooks_left(model)
