"""Mixtures of experts as a checkpoint loads them: Hugging Face's default experts implementation, ``grouped_mm``.

The family tests build their float64 models with the ``eager`` experts, because ``grouped_mm`` computes in float32,
bfloat16 or float16 only. A float32 model with the default is what a user has; workbench measures on float64 copies
of it (the rotary pairs inside ``symmetry_map``, verify's floor, ``verify(dtype=torch.float64)``), which run the
``eager`` experts (``models._hf_build.eager_experts``): before they did, ``symmetry_map`` failed inside
transformers ("Expected mat_a to be Float32, BFloat16 or Float16 matrix, got Double"). Here, per family, a random
float32 model with the default: the transformed model keeps ``grouped_mm`` and its log-probabilities are the
original's to within the float32 floor, computed directly against a float64 ``eager`` copy of the original's
weights; verify passes in float32 and in float64 and fails on a moved expert weight; the model keeps its own
implementation.
"""
import copy

import pytest
import torch

import workbench as wb
from test_hf_families import IDS, random_model
import test_hf_gpt_oss
import test_hf_mixtral
import test_hf_olmoe
import test_hf_qwen2_moe
import test_hf_qwen3_moe

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")

FAMILIES = {"mixtral": ("MixtralForCausalLM", "MixtralConfig", test_hf_mixtral.SHAPE),
            "olmoe": ("OlmoeForCausalLM", "OlmoeConfig", test_hf_olmoe.SHAPE),
            "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", test_hf_qwen3_moe.SHAPE),
            "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", test_hf_qwen2_moe.SHAPE),
            "gpt_oss": ("GptOssForCausalLM", "GptOssConfig", test_hf_gpt_oss.SHAPE)}


def logp_eager64(model):
    """``model``'s log-probabilities on IDS from a float64 copy running the eager experts (the reference)."""
    ref = copy.deepcopy(model).double()
    ref.config._experts_implementation = "eager"
    with torch.no_grad():
        return ref(IDS).logits.log_softmax(-1)


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_default_experts_float32(family):
    cls, config, shape = FAMILIES[family]
    model = random_model(cls, config, shape).float()
    assert model.config._experts_implementation == "grouped_mm"  # what Hugging Face picks, not set here
    new, t = wb.random_intertwiner(model, seed=1)
    assert new.config._experts_implementation == "grouped_mm"
    assert next(new.parameters()).dtype == torch.float32
    reference = logp_eager64(model)
    with torch.no_grad():
        own, moved = model(IDS).logits.log_softmax(-1), new(IDS).logits.log_softmax(-1)
    floor = rel(own, reference)  # the original's own float32 rounding (~3e-7)
    assert 0 < floor < 1e-5
    assert rel(moved, reference) <= 10 * floor
    assert wb.verify(model, new, IDS, t).verdict == "PASS"
    assert wb.verify(model, new, IDS, t, dtype=torch.float64).verdict == "PASS"
    bad = copy.deepcopy(new)
    experts = next(m for n, m in bad.named_modules() if n.endswith("mlp.experts"))
    with torch.no_grad():
        experts.down_proj[0] += 0.05 * torch.randn(experts.down_proj[0].shape, generator=torch.Generator().manual_seed(0))
    assert wb.verify(model, bad, IDS, t).verdict == "FAIL"
    assert model.config._experts_implementation == "grouped_mm"  # the user's model keeps its own
