"""Heads whose logits are values, not a softmax's: verify compares them as they are.

A Hugging Face classifier with ``num_labels=1`` is a regression (its loss is the squared error of the one logit), and
one with ``problem_type="multi_label_classification"`` reads a sigmoid of each logit. verify compared every Hugging
Face head by its log-probabilities, which a constant shift per row leaves unchanged: a single logit's log-probability is
0 whatever the logit is. Found: LlamaForSequenceClassification (and BERT's, ViT's, a token classifier) with one label,
its score head scaled by −3 in the transformed model — the outputs changed by 400%, computed here — and verify said
PASS. Both are compared as logits now (the rows' own scale), and a multi-label classifier whose every logit of a row is
shifted by the same constant (log-probabilities unchanged, every sigmoid moved) FAILs too.

The models are test_hf_config_hunt's and test_hf_vit's tiny random float64 ones; outputs are computed here with Hugging
Face's own forward (RMSNorms given their formula in float64).
"""
import copy

import pytest
import torch

import workbench as wb
from test_hf_config_hunt import build, outputs
from test_hf_families import FAIL, IDS, TOL, rel
from test_hf_vit import PIXELS, build as build_vit
from test_hf_families_more import exact

pytestmark = pytest.mark.filterwarnings("ignore")
pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")


def logits(model, inputs):
    """The raw logits of ``model``'s own forward in float64 (norms exact), on tokens or pixels."""
    with torch.no_grad():
        if inputs.is_floating_point():
            return copy.deepcopy(model)(pixel_values=inputs).logits
        return exact(model)(input_ids=inputs).logits


ONE_LABEL = [("llama", "LlamaForSequenceClassification", "score", IDS),
             ("bert", "BertForSequenceClassification", "classifier", IDS),
             ("gpt2", "GPT2ForTokenClassification", "classifier", IDS),
             ("vit", "ViTForImageClassification", "classifier", PIXELS)]


@pytest.mark.parametrize("family,cls,head,inputs", ONE_LABEL, ids=[c for _, c, _, _ in ONE_LABEL])
def test_a_one_label_head_is_compared_by_its_logits(family, cls, head, inputs):
    """An exact transform keeps the one logit (computed here) and passes; the same model with its head's weight scaled
    by −3 changes it (by 400% where the head has no bias, 35% for BERT's) and FAILs (it passed: log-probabilities, all 0)."""
    model = (build_vit(cls, num_labels=1) if family == "vit"
             else build(family, dict(num_labels=1, pad_token_id=0), cls=cls))
    new, t = wb.random_intertwiner(model, seed=1, example=inputs if family == "vit" else None)
    old = logits(model, inputs)
    assert old.shape[-1] == 1 and rel(logits(new, inputs), old) <= TOL
    report = wb.verify(model, new, inputs, transform=t)  # (an encoder names its stream, the head agreeing too)
    assert report.passed and report.compared == ("encoder outputs" if family == "bert" else "logits"), report.summary()
    bad = copy.deepcopy(new)
    with torch.no_grad():
        bad.get_submodule(head).weight.mul_(-3.0)
    assert rel(logits(bad, inputs), old) > 0.1
    report = wb.verify(model, bad, inputs, transform=t)
    assert not report.passed and report.compared == "logits", report.summary()


def test_a_float32_regression_head_verifies_at_its_floor():
    """In float32 (its tolerance, or its own rounding's floor, measured on the logits as compared): exact passes."""
    model = build("llama", dict(num_labels=1, pad_token_id=0), cls="LlamaForSequenceClassification").float()
    new, t = wb.random_intertwiner(model, seed=2)
    report = wb.verify(model, new, IDS, transform=t)
    assert report.passed and report.compared == "logits", report.summary()


def test_a_multi_label_head_is_compared_by_its_logits():
    """problem_type="multi_label_classification": each logit is read through its own sigmoid. Every logit of a row
    shifted by one constant (the classifier's bias + 0.5) leaves the log-probabilities as they were, computed here, and
    moves every sigmoid: FAIL. A single-label classifier (the default) is still compared by log-probabilities."""
    model = build("bert", dict(num_labels=3, problem_type="multi_label_classification"), cls="BertForSequenceClassification")
    new, t = wb.random_intertwiner(model, seed=3)
    assert wb.verify(model, new, IDS, transform=t).passed
    bad = copy.deepcopy(new)
    with torch.no_grad():
        bad.classifier.bias.add_(0.5)
    old, got = outputs(model)["logits"], outputs(bad)["logits"]  # (log-softmaxed)
    assert rel(got, old) <= TOL
    assert rel(logits(bad, IDS).sigmoid(), logits(model, IDS).sigmoid()) > FAIL
    report = wb.verify(model, bad, IDS, transform=t)
    assert not report.passed and report.compared == "logits", report.summary()
    single = build("bert", dict(num_labels=3), cls="BertForSequenceClassification")
    new, t = wb.random_intertwiner(single, seed=3)
    bad = copy.deepcopy(new)
    with torch.no_grad():
        bad.classifier.bias.add_(0.5)
    assert wb.verify(single, bad, IDS, transform=t).passed  # a shift of a softmax's logits is no change
