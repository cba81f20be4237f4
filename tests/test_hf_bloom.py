"""BLOOM: ALiBi positions (a per-head bias m_h·(j − i) on the scores), a LayerNorm on the embedding, q, k, v fused and
interleaved per head in ``query_key_value``, a tanh-approximated GELU hard-coded in its MLP, tied embeddings.
docs/DERIVATIONS.md §10, BLOOM.

ALiBi's bias depends on neither q nor k: each head's QK space takes any A ∈ GL(d_head). Each head has its own slope,
so permuting heads is not a symmetry (checked by hand here, and the map leaves heads alone, saying why).
TransformerLens's BLOOM adapter leaves its activation at the default "relu": the layout states it (``_hf._ACTIVATIONS``),
and the test computes it from the module. BLOOM's attention takes its softmax in float32 even in a float64 model: the
direct checks give it its formula in float64 (``logp``).
"""
import copy
import math

import pytest
import torch

import workbench as wb
from test_hf_families import (FAIL, IDS, as_raw, bridged_exactly, exact_everywhere, folded_exactly, random_model,
                              TOL, refused_and_wrong, rel, sheared)

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

SHAPE = dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=50)


def build(seed=0, **kw):
    return random_model("BloomForCausalLM", "BloomConfig", {**SHAPE, **kw}, seed,
                        embedding=lambda name: name.endswith("word_embeddings.weight"))


class _Float64Softmax:
    """torch.nn.functional with its softmax in the input's dtype (BLOOM's attention asks for float32)."""

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    @staticmethod
    def softmax(x, dim=-1, dtype=None):
        return torch.nn.functional.softmax(x, dim=dim)


def logp(model):
    from transformers.models.bloom import modeling_bloom

    own, modeling_bloom.F = modeling_bloom.F, _Float64Softmax()
    try:
        with torch.no_grad():
            return as_raw(model)(input_ids=IDS).logits.log_softmax(-1)
    finally:
        modeling_bloom.F = own


def test_the_mlp_activation_is_a_tanh_gelu_and_the_adapter_misstates_it():
    model = build()
    x = torch.randn(3, 7, 128, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gelu_tanh = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    assert torch.allclose(model.transformer.h[0].mlp.gelu_impl(x), gelu_tanh, rtol=0, atol=1e-8)  # (its 0.79788456)
    assert wb.models.hf.adapter(model).cfg.act_fn == "relu" and wb.models.hf.facts(model)["act_fn"] == "gelu_new"
    assert model.lm_head.weight is model.transformer.word_embeddings.weight


def test_map_groups_and_exact_random_intertwiner():
    """Tied LayerNorm stream (behind the embedding's LayerNorm): P; per head GL on QK (ALiBi) and OV; GELU: P; no head
    permutations. Exact, verified; one step larger at the MLP (the ReLU group the adapter's act_fn would give) and
    the stream refused and wrong."""
    model = build()
    smap, _, _, _ = exact_everywhere(model, {"resid": {"permutation"}, "blocks.attn.qk": {"gl"}, "blocks.attn.ov": {"gl"},
                                             "blocks.mlp": {"permutation"}}, logp, skipped="ALiBi gives each head")
    assert not any(".heads" in s.name for s in smap) and len(smap.skipped) == 2
    for site, larger in (("resid", "signed_permutation"), ("blocks.1.mlp", "scaled_permutation")):
        refused_and_wrong(model, site, larger)


def test_permuting_heads_moves_the_alibi_biases():
    """By hand: swapping heads 0 and 1 (their q, k, v rows and their columns of the output projection) changes the
    log-probabilities, since the two heads have different ALiBi slopes."""
    model = build()
    new = copy.deepcopy(model)
    attn = new.transformer.h[0].self_attention
    order = torch.tensor([1, 0, 2, 3])
    with torch.no_grad():
        attn.query_key_value.weight.copy_(attn.query_key_value.weight.view(4, 3 * 8, 32)[order].reshape(96, 32))
        attn.query_key_value.bias.copy_(attn.query_key_value.bias.view(4, 3 * 8)[order].reshape(96))
        attn.dense.weight.copy_(attn.dense.weight.view(32, 4, 8)[:, order].reshape(32, 32))
    assert rel(logp(new), logp(model)) > FAIL


def test_fold_keeps_the_embedding_norm_and_the_stream_at_permutations():
    """Folding moves the blocks' and the final norm's gains into their readers; the embedding's LayerNorm writes the
    stream (no reader to take its gain), so the folded stream stays at permutations, exact."""
    model = build()
    f = folded_exactly(model, "permutation", logp)
    assert torch.equal(f.transformer.word_embeddings_layernorm.weight, model.transformer.word_embeddings_layernorm.weight)


def test_a_shear_along_one_over_the_embedding_gain_passes_by_hand():
    """Beyond s·P (the map's note; docs/DERIVATIONS.md §10, CLIP's bullet): the stream's shear h ↦ h + (a·h)·1 with
    a ∝ 1/γ of the embedding's LayerNorm passes (its bias takes (a·β)·1; every block writer is sheared; every reader is
    a centring norm, and the tied embedding sits before that norm, unmoved): the same log-probabilities, the stream
    moved by the shear. Along a random a the stream is not the sheared one (that norm cannot add (a·(γ⊙n))·1)."""
    model = build()
    writers = ("word_embeddings_layernorm.bias", "self_attention.dense.weight", "self_attention.dense.bias",
               "dense_4h_to_h.weight", "dense_4h_to_h.bias")

    def stream(m):  # the first block's output
        with torch.no_grad():
            return m.transformer(input_ids=IDS, output_hidden_states=True).hidden_states[1]

    old, a = stream(model), 0.7 / model.transformer.word_embeddings_layernorm.weight
    new = sheared(model, a, writers)
    assert rel(logp(new), logp(model)) <= TOL and rel(stream(new), old + (old @ a)[..., None]) <= TOL
    assert rel(stream(new), old) > FAIL
    a = torch.randn(32, generator=torch.Generator().manual_seed(5), dtype=torch.float64) / 8
    assert rel(stream(sheared(model, a, writers)), old + (old @ a)[..., None]) > FAIL


def test_residual_after_the_norm_is_refused():
    smap = wb.symmetry_map(build(apply_residual_connection_post_layernorm=True))
    assert len(smap) == 0 and "apply_residual_connection_post_layernorm" in smap.skipped[0][1]


def test_bridge_around_bloom_is_exact(tmp_path_factory):
    model = build()
    model.config.architectures = ["BloomForCausalLM"]
    bridged_exactly(model, tmp_path_factory.getbasetemp(), logp)
