"""verify's worst-rows floor recalls the copies' outputs on rows it has seen: the same floor, never a stale one.

The two forwards on the rows (the float32 copy's and the float64 copy's) are kept with the copies and reused
when the same, unchanged copies see equal inputs. Each expectation is computed here: the verdicts of the full
computation (memo emptied), the copies' calls counted with their own hooks, outputs compared in float64.
"""
import copy

import torch

import workbench as wb
import workbench.symmetry._verify_floor as floor
from test_verify_kernel import deep  # noqa: F401  (a fixture, used by name)

ROWS_RULE = "most different rows"


def copy_calls(model) -> list:
    """Forward calls of ``model``'s kept copies, recorded by hooks on the copies (the model's own hooks are part
    of what the copies are checked against; the copies' are not)."""
    calls = []
    _, _, low, high, _, _ = floor._COPIES[id(model)]
    low.register_forward_pre_hook(lambda m, a: calls.append("float32"))
    high.register_forward_pre_hook(lambda m, a: calls.append("float64"))
    return calls


def same(a, b):
    return (a.verdict, a.tolerance, a.floor, a.max_rel_diff, a.rule) == (b.verdict, b.tolerance, b.floor, b.max_rel_diff,
                                                                          b.rule)


def test_a_repeated_verify_recalls_the_rows_outputs_and_gives_the_same_report(deep):
    model, x, new, t = deep
    first = wb.verify(model, new, x, transform=t)
    assert first.verdict == "PASS" and ROWS_RULE in first.rule  # the rows' floor carried the verdict
    calls = copy_calls(model)
    again = wb.verify(model, new, x, transform=t)
    assert calls == [] and same(again, first)  # neither copy ran, and nothing in the report moved
    floor._COPIES[id(model)][5].clear()  # the full computation, for reference
    fresh = wb.verify(model, new, x, transform=t)
    assert calls == ["float32", "float64"] and same(fresh, first)


def test_other_inputs_on_the_same_rows_run_the_copies_again(deep):
    model, x, new, t = deep
    wb.verify(model, new, x, transform=t)
    calls = copy_calls(model)
    x2 = x * (1 + 1e-6)  # every row changed, by less than anything a verdict sees
    report = wb.verify(model, new, x2, transform=t)
    assert calls == ["float32", "float64"] and report.verdict == "PASS"


def test_a_nudged_transform_after_a_recall_still_fails(deep):
    """The recalled floor is judged against this call's outputs: a 1e-3 change of one output weight FAILs, and the
    test checks that change itself in float64."""
    model, x, new, t = deep
    assert wb.verify(model, new, x, transform=t).verdict == "PASS"
    nudged = copy.deepcopy(new)
    with torch.no_grad():
        nudged[-1].weight[3].mul_(1 + 1e-3)
        a, b = copy.deepcopy(new).double()(x.double()), copy.deepcopy(nudged).double()(x.double())
    assert ((a - b).abs() / a.abs().amax(0)).max().item() > 1e-4
    assert wb.verify(model, nudged, x, transform=t).verdict == "FAIL"


def test_the_recalled_outputs_go_with_the_copies_when_the_model_changes(deep):
    model, x, new, t = deep
    wb.verify(model, new, x, transform=t)
    kept = floor._COPIES[id(model)][5]
    assert len(kept) == 1
    model[0].weight.data.mul_(1.5)  # through .data: no version counter moves
    new2 = wb.apply_transform(model, t)
    report = wb.verify(model, new2, x, transform=t)
    assert report.verdict == "PASS", report.summary()
    assert floor._COPIES[id(model)][5] is not kept  # new copies, new outputs
    model64 = copy.deepcopy(model).double()  # the transform is exact for the changed model: checked in float64
    with torch.no_grad():
        a, b = model64(x.double()), wb.apply_transform(model64, t, example=x.double())(x.double())
    assert ((a - b).abs() / a.abs().amax(0)).max().item() < 1e-10


def test_a_stale_recall_cannot_carry_a_floor(deep):
    """The adversary: outputs kept under inputs that match but computed by another model (as a missed change of
    the model would leave them). The float32 copy's recalled outputs disagree with the caller's model's, so the
    rows' floor is refused and the whole batch decides, with the verdict computed here."""
    model, x, new, t = deep
    wb.verify(model, new, x, transform=t)
    kept = floor._COPIES[id(model)][5]
    seen, threads, low_out, out64 = kept[0]
    kept[0] = (seen, threads, low_out * 1.01, out64 * 1.01)
    report = wb.verify(model, new, x, transform=t)
    assert report.verdict == "PASS" and ROWS_RULE not in report.rule, report.rule
