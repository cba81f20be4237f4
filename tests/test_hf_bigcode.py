"""GPT-BigCode (StarCoder 1, SantaCoder): GPT-2's blocks with multi-query attention — one key and one value head for all
query heads, fused in ``c_attn`` as [q | k | v] rows. docs/DERIVATIONS.md §10, GPT-BigCode.

TransformerLens's split of ``c_attn`` assumes multi-query attention; a configuration without it (``multi_query=False``)
is refused with the split's own failure named, never a crash.
"""

import pytest
import torch

import workbench as wb
from test_hf_families import bridged_exactly, exact_everywhere, folded_exactly, logp, random_model, refused_and_wrong

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

SHAPE = dict(n_embd=32, n_layer=2, n_head=4, n_positions=16, vocab_size=50, n_inner=48, multi_query=True)


def build(seed=0, **kw):
    return random_model("GPTBigCodeForCausalLM", "GPTBigCodeConfig", {**SHAPE, **kw}, seed,
                        embedding=lambda name: name.endswith(("wte.weight", "wpe.weight")))


def test_fused_multi_query_projection_and_block_form():
    """c_attn's rows are [q (heads·d_head) | k (d_head) | v (d_head)]; the layout's q, k, v are views of those blocks;
    the MLP is c_proj(gelu_tanh(c_fc(x))); the embedding is tied and positions are learned."""
    model = build()
    attn, mlp = model.transformer.h[0].attn, model.transformer.h[0].mlp
    views = wb.models.hf.views(model)
    w = attn.c_attn.weight
    assert w.shape == (48, 32)
    for part, rows in (("q", slice(0, 32)), ("k", slice(32, 40)), ("v", slice(40, 48))):
        assert torch.equal(views[f"blocks.0.attn.{part}.weight"].reshape(-1, 32), w[rows])
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = mlp.c_proj(torch.nn.functional.gelu(mlp.c_fc(x), approximate="tanh"))
    assert torch.allclose(mlp(x), want, rtol=0, atol=1e-13)
    assert model.lm_head.weight is model.transformer.wte.weight
    cfg = wb.models.hf.adapter(model).cfg
    assert cfg.normalization_type == "LN" and cfg.positional_embedding_type == "standard" and cfg.n_key_value_heads == 1


def test_map_groups_and_exact_random_intertwiner():
    """Tied LayerNorm stream: P; one QK map GL(d_head) and one OV map for the single key/value head, shared by every
    query head; query heads permuted among themselves; GELU: P. Exact, verified; one step larger is refused and wrong."""
    model = build()
    smap, _, _, _ = exact_everywhere(model, {"resid": {"permutation"}, "blocks.attn.qk": {"gl"}, "blocks.attn.ov": {"gl"},
                                             "blocks.mlp": {"permutation"}, "blocks.attn.heads": {"permutation"}},
                                     skipped="one key/value head")
    assert sum(s.name.startswith("blocks.0.attn.qk.") for s in smap) == 1
    for site, larger in (("resid", "signed_permutation"), ("blocks.1.mlp", "signed_permutation")):
        refused_and_wrong(model, site, larger)


def test_without_multi_query_the_split_fails_and_is_refused():
    model = build(multi_query=False)
    smap = wb.symmetry_map(model)
    assert len(smap) == 0 and "split of the fused projection" in smap.skipped[0][1]
    with pytest.raises(wb.UnsupportedModelError, match="split"):
        wb.random_intertwiner(model)


def test_fold_then_the_folded_stream():
    model = build()
    folded_exactly(model, "orthogonal_ones", logp)


def test_bridge_around_gpt_bigcode_is_exact(tmp_path_factory):
    model = build()
    model.config.architectures = ["GPTBigCodeForCausalLM"]
    bridged_exactly(model, tmp_path_factory.getbasetemp())
