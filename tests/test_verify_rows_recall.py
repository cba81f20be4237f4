"""verify's worst-rows floor recalls each row's outputs from any earlier sample of the same, unchanged copies.

A new transform of the same model and batch picks other worst rows (on this CNN, 33 transforms picked 33 pairs
out of 22 rows), so the copies' outputs are kept and recalled row by row. Each row's float32 and float64 outputs
come from one earlier sample, and only when every row is found: a row's float32 output beside a float64 output of
another sample would measure a model that mixes rows against another function (the adversary below). Every
expectation is computed here: reports of the full computation (kept outputs emptied), the copies' calls counted
with their own hooks, the function's change computed in float64.
"""
import copy

import pytest
import torch

import workbench as wb
import workbench.symmetry._verify as verify_module
import workbench.symmetry._verify_floor as floor
from test_verify_kernel import deep  # noqa: F401  (a fixture, used by name)
from test_verify_speed import RowMixing, own_floor, relative_change
from test_verdicts import deep_bn_cnn

ROWS_RULE = "most different rows"


def kept(model) -> list:
    return floor._COPIES[id(model)][5]


def copy_calls(model) -> list:
    """(copy, rows) of each forward of ``model``'s kept copies, recorded by hooks on the copies."""
    calls = []
    _, _, low, high, _, _ = floor._COPIES[id(model)]
    low.register_forward_pre_hook(lambda m, a: calls.append(("float32", len(a[0]))))
    high.register_forward_pre_hook(lambda m, a: calls.append(("float64", len(a[0]))))
    return calls


def report_of(r):
    return (r.verdict, r.tolerance, r.floor, r.max_rel_diff, r.rule)


def recording_rows(monkeypatch) -> list:
    """The worst rows each verify measures the floor on, recorded as verify computes them."""
    seen, real = [], verify_module._floor_rows

    def record(*args, **kwargs):
        rows = real(*args, **kwargs)
        seen.append(None if rows is None else tuple(rows.tolist()))
        return rows
    monkeypatch.setattr(verify_module, "_floor_rows", record)
    return seen


def forcing_rows(monkeypatch, rows: tuple) -> None:
    monkeypatch.setattr(verify_module, "_floor_rows", lambda *a, **k: torch.tensor(rows))


def test_rows_seen_in_different_samples_are_recalled_together_with_the_same_report(deep, monkeypatch):
    """New transforms of one model and batch, each verified once: the first whose two worst rows were both seen
    before, in different samples, runs neither copy, and its report is the full computation's."""
    model, x, _, _ = deep
    rows = recording_rows(monkeypatch)
    seen: set = set()
    for seed in range(1, 16):
        new, t = wb.random_intertwiner(model, seed=seed, example=x)
        before = len(rows)
        if seed > 1:
            calls = copy_calls(model)
        report = wb.verify(model, new, x, transform=t)
        assert report.verdict == "PASS", report.summary()
        pair = rows[before]
        assert pair is not None and ROWS_RULE in report.rule
        if seed > 1 and set(pair) <= seen and pair not in rows[:before]:
            assert calls == []  # every row recalled: neither copy ran
            kept(model).clear()  # the full computation, for reference
            assert report_of(wb.verify(model, new, x, transform=t)) == report_of(report)
            return
        seen |= set(pair)
    pytest.fail(f"no transform's worst rows were all seen before in other samples: {rows}")


def test_a_row_not_seen_before_runs_both_copies_on_every_row(deep, monkeypatch):
    model, x, new, t = deep
    wb.verify(model, new, x, transform=t)
    kept(model).clear()
    forcing_rows(monkeypatch, (0, 1))
    first = wb.verify(model, new, x, transform=t)
    calls = copy_calls(model)
    forcing_rows(monkeypatch, (1, 2))  # row 1 seen, row 2 not
    report = wb.verify(model, new, x, transform=t)
    assert calls[:2] == [("float32", 2), ("float64", 2)]
    assert report.max_rel_diff == first.max_rel_diff


def mixing_model():
    model, x = RowMixing(deep_bn_cnn()).eval(), torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    new, t = wb.random_intertwiner(model, seed=0, example=x)
    broken = copy.deepcopy(new)
    with torch.no_grad():
        broken.net[-1].weight[3].mul_(1 + 1e-3)
    assert relative_change(model, broken, x) > 1e-4  # computed here: the broken transform changes the function
    return model, x, new, broken, t


def test_a_float64_output_of_another_sample_would_carry_a_broken_transform():
    """Why a row's two outputs must come from one sample (the premise of the next test, computed here): for the
    mixing model, the rows (1, 5) in float32 now, beside row 1's float64 output in its earlier sample (0, 1) and row
    5's alone (what recalling only the float64 forward of seen rows would pair), differ by the change of function
    between the companies; verify's safety net (the float32 rows against the caller's batch) would accept it, and 10x
    it exceeds the broken transform's change."""
    model, x, new, broken, t = mixing_model()
    with torch.no_grad():
        high = copy.deepcopy(model).double()
        low_now = model(x[[1, 5]]).double()
        mixed64 = torch.stack([high(x[[0, 1]].double())[1], high(x[[5]].double())[0]])
        scale = model(x).double().abs().amax(0)
        batch = model(x)[[1, 5]].double()
    wrong_floor = ((low_now - mixed64).abs() / scale).max().item()
    alone = ((low_now - batch).abs() / scale).max().item()
    assert alone <= wrong_floor and 10 * wrong_floor > 10 * relative_change(model, broken, x)


@pytest.mark.slow
def test_a_model_that_mixes_rows_is_never_judged_on_recalled_rows():
    """The adversary: every row's output depends on the others in its batch. Samples (0, 1) and (2, 3) are kept;
    then the pair (1, 2), made of both, is recalled, and the pair (1, 5), half seen, runs both copies on both rows:
    each time the rows' outputs disagree with the caller's batch beyond their floor, so the whole batch decides,
    and the broken transform FAILs."""
    model, x, new, broken, t = mixing_model()
    floor._COPIES.clear()
    with pytest.MonkeyPatch.context() as mp:
        for rows in ((0, 1), (2, 3)):  # each sample's outputs are kept, though the rows' floor is refused
            forcing_rows(mp, rows)
            wb.verify(model, broken, x, transform=t)
        assert len(kept(model)) == 2
        for rows, ran in (((1, 2), []), ((1, 5), [("float32", 2), ("float64", 2)])):
            forcing_rows(mp, rows)
            calls = copy_calls(model)
            report = wb.verify(model, broken, x, transform=t)
            assert calls == ran
            assert report.verdict == "FAIL" and ROWS_RULE not in report.rule, report.rule
    assert report.tolerance == pytest.approx(10 * own_floor(model, x), rel=0.2)


@pytest.mark.slow
def test_a_model_changed_in_place_recalls_nothing_and_is_judged_again(deep, monkeypatch):
    """The stale-cache adversary: samples kept, then a weight changed through ``.data`` (no version counter
    moves). Nothing kept is recalled (both copies run again on the rows) and the verdicts follow the change."""
    model, x, new, t = deep
    for seed in (1, 2, 3):
        other, tr = wb.random_intertwiner(model, seed=seed, example=x)
        wb.verify(model, other, x, transform=tr)
    old_kept = kept(model)
    assert len(old_kept) >= 3
    model[0].weight.data[2].mul_(1.5)
    assert relative_change(model, new, x) > 1e-4  # computed here: the old transform no longer preserves it
    assert wb.verify(model, new, x, transform=t).verdict == "FAIL"
    new2 = wb.apply_transform(model, t)
    rows = recording_rows(monkeypatch)
    report = wb.verify(model, new2, x, transform=t)
    assert kept(model) is not old_kept and len(kept(model)) >= 1  # new copies, their own samples
    assert report.verdict == "PASS", report.summary()
    assert rows[-1] is not None
    model64 = copy.deepcopy(model).double()  # the transform is exact for the changed model: checked in float64
    with torch.no_grad():
        a, b = model64(x.double()), wb.apply_transform(model64, t, example=x.double())(x.double())
    assert ((a - b).abs() / a.abs().amax(0)).max().item() < 1e-10


def test_the_kept_samples_are_bounded_in_number_and_bytes(monkeypatch):
    outputs: list = []
    for i in range(floor.OUTPUTS_KEPT + 3):
        floor._remember(outputs, torch.full((2, 3), float(i)), torch.zeros(2, 1), torch.zeros(2, 1, dtype=torch.float64))
    assert len(outputs) == floor.OUTPUTS_KEPT and outputs[0][0][0, 0].item() == 3.0  # the oldest went first
    monkeypatch.setattr(floor, "OUTPUTS_MAX_BYTES", 100)
    floor._remember(outputs, torch.zeros(2, 30), torch.zeros(2, 1), torch.zeros(2, 1, dtype=torch.float64))
    assert len(outputs) == 1  # 240 bytes alone: kept, the rest dropped
    floor._remember(outputs, torch.zeros(3), torch.zeros(1), torch.zeros(1, dtype=torch.float64))
    assert len(outputs) == 1  # outputs that are not one row per input row are not kept
    assert floor._recall(outputs, torch.zeros(1, 30)) is not None and floor._recall(outputs, torch.ones(1, 30)) is None


@pytest.mark.parametrize("towards, rows_floor_used", [(0.6, True), (1.5, False)])
def test_rows_that_round_otherwise_than_the_batch_count_up_to_twice_their_floor(deep, monkeypatch, towards,
                                                                                  rows_floor_used):
    """A batch of two rows may run other kernels than the whole batch (ResNet-18 does), each correctly rounded.
    Stand-in for such a kernel: the float32 copy's outputs on the rows moved ``towards`` their float64 values by that
    fraction of their own rounding error e. At 0.6 the rows' floor is 0.4e and they sit 0.6e from the batch's
    outputs (this CNN's rows alone round bitwise as in the batch): 1.5x the floor, within ALONE_SLACK, so the rows'
    floor stands (the rule of 1x refused it, for a 5x costlier whole-batch floor). At 1.5 (floor 0.5e, 1.5e away:
    3x) it is refused and the whole batch decides. Either way the exact transform passes, and the tolerance is
    computed here from the rows' outputs."""
    model, x, new, t = deep
    low, high, _ = floor._copies(model)
    with torch.no_grad():
        assert torch.equal(low(x[:2]), model(x)[:2])  # the premise: the batch's and the rows' float32 agree bitwise

    def other_kernel(module, args, out):
        with torch.no_grad():
            exact = high(args[0].double())
        return (out.double() + towards * (exact - out.double())).float()
    low.register_forward_hook(other_kernel)
    rows = recording_rows(monkeypatch)
    report = wb.verify(model, new, x, transform=t)
    assert report.verdict == "PASS", report.summary()
    assert (ROWS_RULE in report.rule) is rows_floor_used, report.rule
    if rows_floor_used:
        picked = list(rows[-1])
        with torch.no_grad():
            out32, out64 = model(x[picked]).double(), high(x[picked].double())
            scale = model(x).double().abs().amax(0)
        e = ((out32 - out64).abs() / scale).max().item()
        assert report.tolerance == pytest.approx(10 * (1 - towards) * e, rel=0.02)  # (the blend is rounded to float32)
