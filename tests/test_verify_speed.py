"""verify's cheaper paths (issue 21) give the verdicts of the full ones.

The float32 own-rounding floor is first measured on the batch's two most different rows; a PASS on that
floor is final, a FAIL is judged again on the whole batch's floor, and a model that mixes rows never
uses the rows alone. Every expectation here is computed by the test itself in float64.
"""
import copy

import pytest
import torch
from torch import nn

import workbench as wb
from test_verdicts import deep_bn_cnn

ROWS_RULE = "most different rows"  # what the rule says when the floor came from the worst rows alone


def own_floor(model, x):
    """This model's own float32 rounding, measured here: float32 outputs against a float64 copy's, each output
    column over its own largest |value|."""
    with torch.no_grad():
        a32, a64 = model(x).double(), copy.deepcopy(model).double()(x.double())
    a32, a64 = a32.reshape(len(a32), -1), a64.reshape(len(a64), -1)
    return ((a32 - a64).abs() / a64.abs().amax(0)).max().item()


def relative_change(model, new, x):
    with torch.no_grad():
        a, b = model(x).double(), new(x).double()
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return ((a - b).abs() / a.abs().amax(0)).max().item()


@pytest.fixture(scope="module")
def deep():
    model, x = deep_bn_cnn(), torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    new, t = wb.random_intertwiner(model, seed=0, example=x)
    return model, x, new, t


def test_an_exact_transform_passes_on_the_worst_rows_floor(deep):
    model, x, new, t = deep
    own = own_floor(model, x)
    assert relative_change(model, new, x) > 1e-5  # the strict float32 check fails: the floor is needed
    report = wb.verify(model, new, x, transform=t)
    assert report.verdict == "PASS", report.summary()
    assert ROWS_RULE in report.rule and "own rounding" in report.rule
    # the rows' floor is the whole batch's within sampling: never above it by much, never far below
    assert 0.5 * 10 * own <= report.tolerance <= 1.5 * 10 * own


def test_a_fail_is_judged_on_the_whole_batch_floor(deep):
    """A 1e-3 change in one output weight and a forced rotation FAIL, and the tolerance they fail against is
    the whole batch's floor (the rows' one never decides a FAIL)."""
    model, x, new, t = deep
    own = own_floor(model, x)
    broken = copy.deepcopy(new)
    with torch.no_grad():
        broken[-1].weight[3].mul_(1 + 1e-3)
    assert relative_change(model, broken, x) > 1e-4
    report = wb.verify(model, broken, x, transform=t)
    assert report.verdict == "FAIL"
    assert ROWS_RULE not in report.rule and "own rounding" in report.rule
    assert report.tolerance == pytest.approx(10 * own, rel=0.2)
    rotated, tr = wb.random_intertwiner(model, seed=0, example=x, group="orthogonal", allow_non_symmetry=True)
    report = wb.verify(model, rotated, x, transform=tr)
    assert report.verdict == "FAIL" and ROWS_RULE not in report.rule


class RowMixing(nn.Module):
    """The deep CNN, then every output row plus half the batch's mean output: two rows alone compute another
    function than the same rows in the batch."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        y = self.net(x)
        return y + 0.5 * y.mean(0, keepdim=True)


def test_a_model_that_mixes_rows_is_measured_on_the_whole_batch():
    model, x = RowMixing(deep_bn_cnn()).eval(), torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the adversary: the rows alone really are another function (10x beyond the floor)
        alone, batch = model(x[:2]), model(x)[:2]
    assert ((alone - batch).abs() / batch.abs().amax(0)).max() > 1e-4
    new, t = wb.random_intertwiner(model, seed=0, example=x)
    own = own_floor(model, x)
    report = wb.verify(model, new, x, transform=t)
    if relative_change(model, new, x) > 1e-5:  # the floor was needed: it is the whole batch's
        assert ROWS_RULE not in report.rule and "own rounding" in report.rule, report.rule
        assert report.tolerance == pytest.approx(10 * own, rel=0.2)
    assert report.verdict == "PASS", report.summary()
    broken = copy.deepcopy(new)
    with torch.no_grad():
        broken.net[-1].weight[3].mul_(1 + 1e-3)
    assert wb.verify(model, broken, x, transform=t).verdict == "FAIL"


class BatchSum(nn.Module):
    """One output row for the whole batch: no output row belongs to one input row."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).sum(0, keepdim=True)


def test_outputs_that_are_not_one_row_per_input_use_the_whole_batch():
    model, x = BatchSum(deep_bn_cnn()).eval(), torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    new, t = wb.random_intertwiner(model, seed=1, example=x)
    report = wb.verify(model, new, x, transform=t)
    assert ROWS_RULE not in report.rule
    assert relative_change(model, new, x) <= report.tolerance
    assert report.verdict == "PASS", report.summary()


# ------------------------------------------------------------------ the new model compared as it runs (watch)
class InPlace(nn.Module):
    """conv → bn → relu(inplace) → (+= skip): the bn output is overwritten twice after it is produced."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn(self.conv(x)))
        out += 1.0
        return out


def test_watch_sees_each_value_before_a_later_in_place_write_and_leaves_no_hook():
    model, x = InPlace().eval(), torch.randn(2, 3, 5, 5)
    seen = {}
    with torch.no_grad():
        expected_bn = model.bn(model.conv(x)).clone()  # computed here, outside any hook
        with wb.hooks.watch(model, {"bn": lambda h, name: seen.setdefault(name, h.clone())}):
            model(x)
    assert torch.equal(seen["bn"], expected_bn)  # the relu_ and += that followed did not reach it
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(ZeroDivisionError):  # an exception inside the block removes the hooks too
        with wb.hooks.watch(model, {"bn": lambda h, name: 1 / 0}):
            model(x)
    assert not any(m._forward_hooks for m in model.modules())


def test_an_in_place_model_forced_off_its_group_fails_and_an_exact_transform_passes():
    """The watched comparison of the new model happens before its in-place ReLU and +=: a forced rotation at
    the ReLU must FAIL, an exact P·D must PASS (both checked here directly in float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(InPlace(), nn.Flatten(), nn.Linear(100, 3)).eval()
    x = torch.randn(16, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    new, t = wb.random_intertwiner(model, seed=0, example=x)
    assert relative_change(model.double(), new.double(), x.double()) < 1e-10
    model, new = model.float(), new.float()
    assert wb.verify(model, new, x, transform=t).verdict == "PASS"
    rotated, tr = wb.random_intertwiner(model, seed=0, example=x, group="orthogonal", allow_non_symmetry=True)
    assert relative_change(model, rotated, x) > 1e-3
    report = wb.verify(model, rotated, x, transform=tr)
    assert report.verdict == "FAIL" and not report.equivariant


class CallsTwice(nn.Module):
    def __init__(self, shared=True):
        super().__init__()
        self.a, self.b, self.relu = nn.Linear(4, 6), nn.Linear(6, 6), nn.ReLU()
        self.relu2 = self.relu if shared else nn.ReLU()
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.relu2(self.b(self.relu(self.a(x)))))


def test_a_new_model_that_never_produces_an_observed_activation_fails():
    """The same function, but the new model's second ReLU is another module: the original's second call of
    ``relu`` has no counterpart, so that hook point cannot match (FAIL, never a silent pass)."""
    torch.manual_seed(0)
    model, x = CallsTwice().eval(), torch.randn(8, 4)
    new, t = wb.random_intertwiner(model, seed=0, example=x)
    assert wb.verify(model, new, x, transform=t).verdict == "PASS"
    split = copy.deepcopy(new)
    split.relu2 = nn.ReLU()
    assert relative_change(new, split, x) == 0  # the function is the same
    observed = {(o.name, o.call) for s in wb.symmetry_map(model, x[:1]) for o in s.observed}
    assert ("relu", 1) in observed  # the second call is a hook point of a site
    report = wb.verify(model, split, x, transform=t)
    assert report.verdict == "FAIL" and not report.equivariant


class Counting(nn.Module):
    """Counts its forwards (a stateful module: a counter, a cache)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.forwards = net, 0

    def forward(self, x):
        self.forwards += 1
        return self.net(x)


def test_the_worst_rows_run_on_a_copy_not_on_the_callers_model(deep):
    model, x, _, _ = deep
    counting = Counting(model).eval()
    new, t = wb.random_intertwiner(counting, seed=0, example=x)
    counting.forwards = 0
    fixed = wb.verify(counting, new, x, transform=t, tolerance=1e-4)  # a given tolerance: no floor measured
    plain_count, counting.forwards = counting.forwards, 0
    report = wb.verify(counting, new, x, transform=t)
    assert ROWS_RULE in report.rule and fixed.verdict == report.verdict == "PASS"  # the rows path ran
    assert counting.forwards == plain_count  # and the caller's model saw no forward of its own for it


class FixedBatch(nn.Module):
    """Runs only at the batch size it was built for (a reshape with the size written in)."""

    def __init__(self, net, batch):
        super().__init__()
        self.net, self.batch = net, batch

    def forward(self, x):
        return self.net(x).reshape(self.batch, -1)


def test_a_model_that_needs_its_batch_size_is_measured_on_the_whole_batch():
    model = FixedBatch(deep_bn_cnn(), 32).eval()
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    new = FixedBatch(wb.random_intertwiner(model.net, seed=0, example=x)[0], 32).eval()
    with pytest.raises(RuntimeError):
        model(x[:2])  # the adversary: two rows alone do not run
    report = wb.verify(model, new, x)  # no transform: the outputs alone, the floor still measured
    assert relative_change(model, new, x) <= report.tolerance
    assert ROWS_RULE not in report.rule and "own rounding" in report.rule
    assert report.verdict == "NOT CHECKED"  # outputs agree; no site was given to check


def test_a_transform_whose_own_rounding_exceeds_the_originals_passes_and_a_nudge_still_fails():
    """Found by hypothesis: an MLP with identity activations (GL sites) and a dense element with scale_sigma=1
    leaves the new model's weights worse conditioned, so the NEW model's float32 rounding (1.2e-5 here) is
    above the dtype's 1e-5 while the original's is far below it: measured on the original alone, an exact
    transform was a FAIL. The new model's own floor counts too; a transform that is not a symmetry computes
    another function in both precisions, so its floor stays small and a 1e-3 nudge still FAILs.

    The case is searched for, not pinned to one seed: which transform seed gives a floor above 1e-5 depends on
    the draws' stream (seed 4 did until the Haar draws changed on 2026-12-04; then its floor was 9e-7 and the
    test no longer tested this). Measured then: 2 of the first 70 seeds exceed 1e-5 (68: 1.2e-5)."""
    from test_symmetry import ACTIVATIONS, mlp

    model = mlp([3, 6, 6], ACTIVATIONS["identity"], bias=True, batchnorm=False, seed=4).double()
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(4)).double()
    m32, x32 = copy.deepcopy(model).float(), x.float()
    for seed in range(400):  # the premise, measured here: the new model rounds above the dtype's tolerance
        _, t = wb.random_intertwiner(model, seed=seed, scale_sigma=1.0)
        new32 = wb.apply_transform(m32, t)
        if own_floor(new32, x32) > 1e-5:
            break
    else:
        pytest.fail("no transform seed below 400 gives a new model whose float32 rounding exceeds 1e-5")
    assert own_floor(new32, x32) > 10 * own_floor(m32, x32)
    report = wb.verify(m32, new32, x32, transform=t)
    assert report.passed and report.max_rel_diff < report.tolerance <= 10 * max(own_floor(new32, x32), 1e-6) * 1.5
    nudged = copy.deepcopy(new32)
    with torch.no_grad():
        nudged[-1].weight[0, 0] += 1e-3 * nudged[-1].weight.abs().max()
    assert relative_change(m32, nudged, x32) > 1e-4  # computed here: the function really moved
    assert wb.verify(m32, nudged, x32, transform=t).verdict == "FAIL"
