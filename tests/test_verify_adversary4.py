"""Adversarial checks of wb.verify, fourth round: a model returning other fields beside its outputs (a mixture's
load-balancing loss, ``output_router_logits=True``) is judged on its outputs and on those fields, never on a field
instead of its outputs.

Every answer is checked directly: both models run here and compared, never by asking verify.
"""
import copy
import re

import pytest
import torch

import workbench as wb

pytestmark = pytest.mark.filterwarnings("ignore")
pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

X = torch.tensor([[3, 7, 11, 19, 23, 29], [5, 13, 17, 31, 37, 41]])


def moved(model, other, x=X):
    """(largest change of the log-probabilities relative to their position's largest, relative change of aux_loss),
    computed here."""
    with torch.no_grad():
        a, b = model(x), other(x)
    la, lb = a.logits.log_softmax(-1), b.logits.log_softmax(-1)
    per = (la - lb).abs() / la.abs().amax(-1, keepdim=True)
    return float(per.max()), float(abs(a.aux_loss - b.aux_loss) / a.aux_loss)


def test_a_field_beside_the_outputs_never_answers_for_them():
    """A float64 Mixtral returning its aux_loss, its head given a cancelling direction (test_verify_adversary3's: the
    float32 rounding of its RMSNorms raises verify's tolerance to 4e-5), the second router's row 2 scaled by 1 + 1e-3
    after an exact draw: log-probabilities 1.5e-3 away at one position (relative to its largest), aux_loss 1.5e-5
    (computed here). aux_loss, beyond its own 8
    float32 units, replaced the log-probabilities as what was compared, and at the raised 4e-5 verify said PASS with
    the logits never compared. The log-probabilities are now compared whatever the other fields say, and FAIL."""
    from test_hf_mixtral import build
    from test_verify_adversary3 import cancelled
    from test_verify_routing import sparse

    model = cancelled(build(seed=0), X)
    model.config.output_router_logits = True
    new, t = wb.random_intertwiner(model, seed=0, sites=["blocks.0.attn.ov.0"])
    report = wb.verify(model, new, X, t)
    assert report.passed, report.summary()
    wrong = copy.deepcopy(new)
    with torch.no_grad():
        sparse(wrong)[1].gate.weight[2] *= 1 + 1e-3
    logp, aux = moved(model, wrong)
    assert logp > 1e-3 and 1e-6 < aux < 1e-4
    report = wb.verify(model, wrong, X, t)
    assert report.tolerance > aux, report.summary()  # (aux_loss alone would pass at the raised tolerance)
    assert not report.passed and report.compared == "log-probabilities", report.summary()
    assert report.max_rel_diff > 1e-3
    assert "also beyond their tolerance" not in report.rule  # (aux_loss is within the raised tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_outputs_head_the_report_where_they_fail_with_another_field(dtype):
    """Both the log-probabilities (10% away) and aux_loss (0.3%) of a Mixtral whose router row was scaled by 1.2 after an
    exact draw fail (computed here): the report headed with aux_loss, its rows 1, and showed nothing of the logits. It
    now heads with the log-probabilities (the model's function, what a researcher asks first) and names aux_loss in the
    rule; where only aux_loss fails it still heads the report (test_verify_adversary3)."""
    from test_verify_adversary2 import mixtral_with_aux
    from test_verify_routing import X, sparse

    model = mixtral_with_aux(k=2).to(dtype)
    new, t = wb.random_intertwiner(model, seed=1, sites=["resid"])
    wrong = copy.deepcopy(new)
    with torch.no_grad():
        sparse(wrong)[1].gate.weight[2] *= 1.2
    logp, aux = moved(model, wrong, X)
    assert logp > 1e-2 and aux > 1e-3
    report = wb.verify(model, wrong, X, t)
    assert not report.passed and report.compared == "log-probabilities", report.summary()
    assert report.max_rel_diff > 1e-2 and report.rows == X.numel()
    assert "also beyond their tolerance: aux_loss" in report.rule


def test_a_field_only_one_model_returns_is_refused_not_left_out():
    """The new model built with output_router_logits off returns no aux_loss (checked here): the field could not be
    compared and was left out without a word, verify PASSing on the logits alone. Now a refusal naming the field, in
    either direction."""
    from test_verify_adversary2 import mixtral_with_aux
    from test_verify_routing import X

    model = mixtral_with_aux(k=2).double()
    new, t = wb.random_intertwiner(model, seed=1, sites=["resid"])
    assert wb.verify(model, new, X, t).passed
    without = copy.deepcopy(new)
    without.config.output_router_logits = False
    with torch.no_grad():
        assert model(X).aux_loss is not None and without(X).get("aux_loss") is None
    with pytest.raises(wb.InvalidOptionError, match="'aux_loss' is returned by model only"):
        wb.verify(model, without, X, t)
    plain = copy.deepcopy(model)
    plain.config.output_router_logits = False
    with pytest.raises(wb.InvalidOptionError, match="'aux_loss' is returned by new_model only"):
        wb.verify(plain, new, X, t)


@pytest.mark.parametrize("case", ["field", "both", "outputs"])
def test_the_report_says_what_failed(case):
    """Where only aux_loss failed (a float64 Mixtral, top-1 routing, its second router's row scaled by 1 + 1e-3: the
    log-probabilities unchanged, aux_loss 3e-6 away, computed here), the summary read "FAIL on the 4 inputs given
    (1 rows): max relative output (field 'aux_loss' of the models' outputs) difference …; worst at []" and its rule
    described the one number as "aux_loss on the 1 rows …, column over rows". The summary now says aux_loss changed
    (the outputs agreeing) by how much against its own tolerance, the rows are the outputs', and the rule is theirs with
    the field's comparison beside it. Where both fail (the router row scaled by 1.2, top 2) the log-probabilities head
    and the summary says aux_loss also changed; where only the outputs fail (a head row moved) it names no field."""
    from test_verify_adversary2 import mixtral_with_aux
    from test_verify_routing import X, sparse

    model = mixtral_with_aux(k=2 if case == "both" else 1).double()
    new, t = wb.random_intertwiner(model, seed=1, sites=["resid"])
    wrong = copy.deepcopy(new)
    with torch.no_grad():
        if case == "outputs":
            wrong.lm_head.weight[3] *= 1.01
        else:
            sparse(wrong)[1].gate.weight[2] *= 1 + 1e-3 if case == "field" else 1.2
    logp, aux = moved(model, wrong, X)
    assert (logp > 1e-4) == (case != "field") and (aux > 2e-6) == (case != "outputs"), (logp, aux)
    report = wb.verify(model, wrong, X, t)
    text, rows = report.summary(), X.numel()
    assert report.verdict == "FAIL" and report.rows == rows and "1 rows" not in text + report.rule
    assert text.startswith(f"FAIL on the {len(X)} inputs given ({rows} rows): "), text
    assert report.rule.startswith(f"log-probabilities on the {rows} rows of the given inputs only"), report.rule
    assert "the other fields the models return (aux_loss), each element-wise" in report.rule
    if case == "field":
        assert report.compared == "aux_loss" and report.max_rel_diff == pytest.approx(aux, rel=1e-3)
        assert re.search(r": 'aux_loss' \(returned beside the outputs, which agree\) changed by 3\.\d\de-06 relative "
                         r"\(tolerance 9\.5e-07, float64 model\); worst: 0\.99\d+ → 0\.99\d+;", text), text
        assert "; beyond their tolerance: aux_loss changed by" in report.rule and "also beyond" not in report.rule
    elif case == "both":
        assert report.compared == "log-probabilities" and "max relative log-probability difference" in text
        assert re.search(r"; also 'aux_loss' changed by \d\.\d\de-0\d relative \(tolerance 9\.5e-07\)", text), text
        assert "; also beyond their tolerance: aux_loss changed by" in report.rule
    else:
        assert report.compared == "log-probabilities" and "aux_loss" not in text and not report.fields_beyond
        assert "beyond their tolerance" not in report.rule


def with_extra():
    """A Hugging Face ModelOutput class with ``logits`` and one more field, ``extra`` (any value)."""
    from dataclasses import dataclass
    from typing import Any, Optional

    from transformers.utils import ModelOutput

    @dataclass
    class Out(ModelOutput):
        logits: Optional[torch.Tensor] = None
        extra: Any = None

    return Out


def test_a_tuple_field_is_judged_element_by_element():
    """A plain model returning a ModelOutput with a field ``extra=(c(h), 2·x)`` beside its logits (h the hidden layer a
    permutation moves): verify left the tuple out without a word, and a new model whose c was tripled (extra[0] 1.3 away,
    logits unchanged, computed here) PASSed. Each tensor in it is now judged like any other field (an exact transform
    still PASSes), and a field verify cannot compare (an object) is refused naming it. Hugging Face's own tuples of
    representations (hidden_states, past_key_values, router_logits: ``_backend.REPRESENTATIONS``) stay uncompared."""
    Out = with_extra()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3), torch.nn.Linear(8, 2)
            self.other = None

        def forward(self, x):
            h = torch.relu(self.a(x))
            return Out(logits=self.b(h), extra=(self.c(h), 2 * x) if self.other is None else self.other)

    torch.manual_seed(0)
    model = Net().double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    new, t = wb.random_intertwiner(model, seed=0)
    assert wb.verify(model, new, x, t).passed
    bad = copy.deepcopy(new)
    with torch.no_grad():
        bad.c.weight.mul_(3)
        a, b = model(x), bad(x)
    assert (a.logits - b.logits).abs().max() < 1e-12 and (a.extra[0] - b.extra[0]).abs().max() > 1
    report = wb.verify(model, bad, x, t)
    assert not report.passed and report.compared == "extra[0]", report.summary()
    assert [f[0] for f in report.fields_beyond] == ["extra[0]"]
    model.other = new.other = object()
    with pytest.raises(wb.UnsupportedModelError, match="'extra' is of type object"):
        wb.verify(model, new, x, t)


def test_an_empty_field_agrees_and_a_field_that_is_not_finite_is_named():
    """A field holding no values (``torch.zeros(0)`` in both models) raised torch's "cannot reshape tensor of 0
    elements" from inside verify; it holds nothing to compare, so it agrees. A field that is NaN in the new model only,
    the outputs finite and equal (computed here), was reported as "the new model's outputs are not finite"."""
    Out = with_extra()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)
            self.extra = torch.zeros(0, 3, dtype=torch.float64)

        def forward(self, x):
            return Out(logits=self.b(torch.relu(self.a(x))), extra=self.extra)

    torch.manual_seed(0)
    model = Net().double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    new, t = wb.random_intertwiner(model, seed=0)
    assert wb.verify(model, new, x, t).passed
    model.extra, new.extra = torch.tensor(1.0, dtype=torch.float64), torch.tensor(float("nan"), dtype=torch.float64)
    with torch.no_grad():
        a, b = model(x), new(x)
    assert b.logits.isfinite().all() and (a.logits - b.logits).abs().max() < 1e-12 and b.extra.isnan()
    report = wb.verify(model, new, x, t)
    assert not report.passed and report.compared == "extra", report.summary()
    assert "the new model's 'extra' is not finite" in report.summary() and "outputs are not finite" not in report.summary()
