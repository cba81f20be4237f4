"""Phi-3: a fused q/k/v projection ([q | k | v] rows, GQA) and a fused gate/up projection ([gate | up] rows) in a
Llama-like decoder (RMSNorm, SiLU-gated MLP, rotary). docs/DERIVATIONS.md §10, Phi-3.

The fused tensors are read through TransformerLens's own splits, measured on index-valued weights
(workbench/models/_hf_entries.py, ``_measured_split``), as strided views: the gate and up halves are the two
``mlp.gate``/``mlp.in`` entries of one parameter. Checked here: the MLP's form and the split order computed from the modules; the map's groups; a random
element of every site exact in float64, computed directly; a hand-made element on the wrong half refused by the
function; fold, bridge (its split copies rebuilt after a transform) and a property over shapes.
"""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import workbench as wb
from test_hf_families import (DECODER, FAIL, LLAMA_LIKE, TOL, bridged_exactly, decoder_shapes, exact_everywhere,
                              folded_exactly, logp, random_model, refused_and_wrong, rel)

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

SHAPE = DECODER


def build(seed=0, **kw):
    return random_model("Phi3ForCausalLM", "Phi3Config", {**SHAPE, **kw}, seed)


def test_the_fused_projections_split_as_the_modules_compute():
    """The MLP is down(up ⊙ silu(gate)) with gate the first half of gate_up_proj's rows; the layout's views are those
    halves and q, k, v's row blocks of qkv_proj, as views of the model's own tensors (writing one writes the model)."""
    model = build()
    mlp, attn = model.model.layers[0].mlp, model.model.layers[0].self_attn
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gate, up = mlp.gate_up_proj.weight[:48], mlp.gate_up_proj.weight[48:]
    want = mlp.down_proj((x @ up.T) * torch.nn.functional.silu(x @ gate.T))
    assert torch.allclose(mlp(x), want, rtol=0, atol=1e-13)
    views = wb.models.hf.views(model)
    assert torch.equal(views["blocks.0.mlp.gate.weight"], gate) and torch.equal(views["blocks.0.mlp.in.weight"], up)
    assert views["blocks.0.mlp.gate.weight"].untyped_storage().data_ptr() == mlp.gate_up_proj.weight.untyped_storage().data_ptr()
    qkv = attn.qkv_proj.weight
    for part, rows in (("q", slice(0, 32)), ("k", slice(32, 48)), ("v", slice(48, 64))):
        assert torch.equal(views[f"blocks.0.attn.{part}.weight"].reshape(-1, 32), qkv[rows])
    cfg = wb.models.hf.adapter(model).cfg
    assert cfg.normalization_type == "RMS" and cfg.gated_mlp and cfg.act_fn == "silu" and not cfg.parallel_attn_mlp


def test_map_groups_and_exact_random_intertwiner():
    model = build()
    exact_everywhere(model, LLAMA_LIKE)
    one, t1 = wb.random_intertwiner(model, seed=2, sites=["blocks.0.mlp"])  # the gate half by P, the up half by D·P
    M = t1.elements["blocks.0.mlp"].matrix()
    a, b = model.model.layers[0].mlp.gate_up_proj.weight, one.model.layers[0].mlp.gate_up_proj.weight
    P = M.abs().sign()
    assert torch.allclose(b[:48], P @ a[:48], rtol=0, atol=1e-12) and torch.allclose(b[48:], M @ a[48:], rtol=0, atol=1e-12)
    assert not torch.allclose(M.abs(), P)  # a scaling, not only a permutation
    for site, larger in (("resid", "orthogonal"), ("blocks.1.mlp", "gl")):
        refused_and_wrong(model, site, larger)


def test_a_scaling_on_the_gate_half_is_not_a_symmetry():
    """By hand: the up half's rows take a diagonal D (down_proj's columns D⁻¹) exactly; the same D on the gate half
    does not (SiLU is not homogeneous) — the halves are where the layout says."""
    model = build()
    ref = logp(model)
    d = torch.linspace(0.5, 2.0, 48, dtype=torch.float64)

    def scaled(rows):
        new = copy.deepcopy(model)
        mlp = new.model.layers[0].mlp
        with torch.no_grad():
            mlp.gate_up_proj.weight[rows] *= d[:, None]
            mlp.down_proj.weight /= d
        return new

    assert rel(logp(scaled(slice(48, 96))), ref) <= TOL
    assert rel(logp(scaled(slice(0, 48))), ref) > FAIL


def test_fold_then_the_orthogonal_stream():
    model = build()
    folded_exactly(model, "orthogonal", seed=3)


def test_bridge_around_phi3_is_exact(tmp_path_factory):
    """verify runs the new bridge's own forward, whose gate/up and q/k/v are split copies made at boot: they must be
    the transformed weights' (a copy left from the original would fail it)."""
    _, report = bridged_exactly(build(), tmp_path_factory.getbasetemp())
    assert report.floor is not None and report.max_abs_diff <= 10 * report.floor  # float32 RMSNorms inside


@settings(max_examples=8, deadline=None)
@given(kw=st.builds(lambda d, f: {**d, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default",
                                                             "partial_rotary_factor": f}},
                    decoder_shapes(), st.sampled_from([0.5, 1.0])),
       seed=st.integers(0, 2 ** 16))
def test_property_random_shapes_are_exact(kw, seed):
    model = build(seed=seed % 5, **kw)
    new, _ = wb.random_intertwiner(model, seed=seed)
    assert rel(logp(new), logp(model)) <= TOL, kw
