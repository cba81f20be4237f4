"""RoBERTa: BERT's encoder — an embedding LayerNorm, post-LN blocks, q/k/v/o biases, a GELU MLP — with positions
counted from ``padding_idx + 1`` (a pad takes the padding row) and its own heads: the MLM head (dense, GELU, LayerNorm,
decoder tied to the word embedding) and a sequence classifier that reads the first token's final stream through
dense → tanh → out_proj (BERT's reads the pooler). XLM-RoBERTa is the same modules under other class names (transformers
generates one file from the other). docs/DERIVATIONS.md §10.

Which rows of the position table a token reads does not touch the channel axis, so the groups are BERT's; what is
checked here is that the modules compute what that argument reads (the position rows, the classifier's input), then the
map, the draws, the heads, a bridge and the negative controls, each output computed directly in float64.
"""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import workbench as wb
from test_hf_config_hunt import build, outputs, preserved
from test_hf_families import IDS, TOL, bridged_exactly, kinds, rel

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

# BERT's groups (DERIVATIONS §10): the post-LN stream takes permutations only, every head GL on queries/keys and on
# values/outputs and the heads permuted, the GELU MLP's neurons permutations.
BERT_LIKE = {"resid": {"permutation"}, "blocks.attn.qk": {"gl"}, "blocks.attn.ov": {"gl"},
             "blocks.attn.heads": {"permutation"}, "blocks.mlp": {"permutation"}}
PAD = 1  # RoBERTa's padding_idx (its config's pad_token_id)
PADDED = IDS.clone()
PADDED[0, -3:] = PAD  # a padded row: those positions read the padding row of the position table
MASK = (PADDED != PAD).long()


FAMILIES = {"roberta": "Roberta", "xlm-roberta": "XLMRoberta"}  # family: its classes' prefix


def roberta(head="ForMaskedLM", family="roberta", seed=0, **kw):
    return build(family, kw, cls=FAMILIES[family] + head, seed=seed)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_modules_compute_what_the_argument_reads(family):
    """Positions count non-pad tokens from padding_idx + 1, pads read row padding_idx; the sum goes through the embedding
    LayerNorm into the stream. The sequence classifier reads the first token's final stream (dense, tanh, out_proj)."""
    model = roberta("ForSequenceClassification", family, num_labels=3)
    emb = model.roberta.embeddings
    seen = {}
    hook = emb.LayerNorm.register_forward_hook(lambda m, a, o: seen.__setitem__("ln_in", a[0]))
    head = model.classifier.register_forward_hook(lambda m, a, o: seen.__setitem__("features", a[0]))
    try:
        with torch.no_grad():
            logits = model(input_ids=PADDED, attention_mask=MASK).logits
    finally:
        hook.remove()
        head.remove()
    with torch.no_grad():
        stream = model.roberta(input_ids=PADDED, attention_mask=MASK).last_hidden_state
    positions = torch.where(PADDED != PAD, MASK.cumsum(1) + PAD, torch.full_like(PADDED, PAD))
    want = emb.word_embeddings.weight[PADDED] + emb.position_embeddings.weight[positions] + emb.token_type_embeddings.weight[0]
    assert torch.allclose(seen["ln_in"], want, rtol=0, atol=1e-13)
    assert torch.equal(seen["features"], stream)
    c = model.classifier
    direct = torch.tanh(stream[:, 0] @ c.dense.weight.T + c.dense.bias) @ c.out_proj.weight.T + c.out_proj.bias
    assert torch.allclose(logits, direct, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head,kw", [("ForMaskedLM", {}), ("ForMaskedLM", dict(tie_word_embeddings=False)),
                                     ("ForCausalLM", dict(is_decoder=True)), ("ForSequenceClassification", dict(num_labels=3)),
                                     ("ForTokenClassification", dict(num_labels=3))])
def test_map_groups_and_exact_random_intertwiner(family, head, kw):
    model = roberta(head, family, **kw)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    smap = wb.symmetry_map(model)
    assert not smap.skipped and kinds(smap) == BERT_LIKE, smap.skipped
    assert preserved(model, seeds=(1, 2)) <= TOL  # every output, computed here in float64; verify passes on each
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_padded_inputs_are_exact():
    model = roberta()
    new, t = wb.random_intertwiner(model, seed=4)
    with torch.no_grad():
        a = model(input_ids=PADDED, attention_mask=MASK).logits.log_softmax(-1)
        b = new(input_ids=PADDED, attention_mask=MASK).logits.log_softmax(-1)
    assert rel(b, a) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_the_base_model_pooler_and_stream(family):
    """RobertaModel: the pooler (dense and tanh on the first token's stream) reads the stream, so its output is unchanged;
    the last hidden state is the stream itself, moved by the stream's permutation."""
    model = roberta("Model", family)
    assert kinds(wb.symmetry_map(model)) == BERT_LIKE
    new, t = wb.random_intertwiner(model, seed=3)
    with torch.no_grad():
        a, b = model(input_ids=IDS), new(input_ids=IDS)
    perm = t.elements["resid"].perm
    assert float((b.pooler_output - a.pooler_output).abs().max() / a.pooler_output.abs().max()) <= TOL
    assert float((b.last_hidden_state - a.last_hidden_state[..., perm]).abs().max()) <= TOL * float(a.last_hidden_state.abs().max())
    assert wb.verify(model, new, IDS, transform=t).passed


@pytest.mark.parametrize("site,group", [("resid", "signed_permutation"), ("blocks.0.mlp", "diagonal_permutation")])
def test_negative_controls_one_step_outside(site, group):
    """A sign per channel of the post-LN stream (a LayerNorm subtracts the mean over channels, which such signs do not
    keep) and a positive scale per GELU neuron (GELU is not homogeneous) change the masked-LM log-probabilities; refused
    without allow_non_symmetry, forced they fail verify."""
    model = roberta()
    with pytest.raises(ValueError, match="not a symmetry"):
        wb.random_intertwiner(model, sites=[site], group=group)
    bad, bt = wb.random_intertwiner(model, seed=5, sites=[site], group=group, allow_non_symmetry=True)
    assert rel(outputs(bad)["logits"], outputs(model)["logits"]) > 1e-6
    assert not wb.verify(model, bad, IDS, transform=bt).passed


def test_untie_embeddings_keeps_the_head_bias():
    """wb.untie_embeddings: the untied decoder adds its own bias and lm_head.bias (tied to it before) carries the value it
    was tied to; the same outputs, and the untied model is read and exact."""
    tied = roberta()
    untied = wb.untie_embeddings(tied)
    assert not untied.config.tie_word_embeddings and untied.lm_head.bias is not untied.lm_head.decoder.bias
    assert torch.equal(untied.lm_head.bias, tied.lm_head.decoder.bias)
    assert rel(outputs(untied)["logits"], outputs(tied)["logits"]) == 0.0
    assert not wb.symmetry_map(untied).skipped and preserved(untied) <= TOL


def test_fold_layernorm_is_refused_post_ln():
    with pytest.raises(wb.InvalidOptionError, match="post-LayerNorm"):
        wb.fold_layernorm(roberta())


def test_bridge_around_roberta_is_exact(tmp_path_factory):
    model = roberta()
    model.config.architectures = ["RobertaForMaskedLM"]
    bridged_exactly(model, tmp_path_factory.getbasetemp(), logp=lambda m: outputs(m)["logits"])


@pytest.mark.parametrize("head,words", [("ForQuestionAnswering", "qa_outputs"), ("ForMultipleChoice", "classifier")])
def test_heads_without_one_output_are_refused_by_name(head, words):
    """As for BERT: a question-answering head gives start and end logits, a multiple-choice head reads the pooler of
    each choice: not read here, refused naming the head."""
    model = roberta(head)
    smap = wb.symmetry_map(model)
    assert len(smap) == 0 and words in smap.skipped[0][1], smap.skipped
    with pytest.raises(wb.UnsupportedModelError, match=words):
        wb.random_intertwiner(model, seed=0)


def test_cross_attention_is_refused_by_name():
    model = roberta("ForCausalLM", is_decoder=True, add_cross_attention=True)
    smap = wb.symmetry_map(model)
    assert len(smap) == 0 and "crossattention" in smap.skipped[0][1], smap.skipped
    untouched = copy.deepcopy(model)
    with pytest.raises(wb.UnsupportedModelError, match="crossattention"):
        wb.random_intertwiner(model, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), untouched.state_dict().values()))


@settings(max_examples=8, deadline=None)
@given(family=st.sampled_from(sorted(FAMILIES)), head=st.sampled_from(["ForMaskedLM", "ForSequenceClassification",
                                                                       "ForTokenClassification"]),
       heads=st.sampled_from([2, 4]), d_head=st.sampled_from([4, 8]), layers=st.integers(1, 2), seed=st.integers(0, 2 ** 16))
def test_property_random_shapes_are_exact(family, head, heads, d_head, layers, seed):
    """Random widths, heads and depths of either family and head class: a random element of every site is exact in
    float64 (every output, computed here)."""
    model = roberta(head, family, seed % 5, hidden_size=heads * d_head, num_attention_heads=heads,
                    num_hidden_layers=layers, num_labels=3)
    new, _ = wb.random_intertwiner(model, seed=seed)
    old, got = outputs(model), outputs(new)
    assert max(rel(got[k], old[k]) for k in old) <= TOL, (family, head)
