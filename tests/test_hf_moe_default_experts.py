"""Mixtures of experts as a checkpoint loads them: Hugging Face's default experts implementation, ``grouped_mm``.

The family tests build their float64 models with the ``eager`` experts, because ``grouped_mm`` computes in float32,
bfloat16 or float16 only. A float32 model with the default is what a user has; workbench measures on float64 copies
of it (the rotary pairs inside ``symmetry_map``, verify's floor, ``verify(dtype=torch.float64)``), which run the
``eager`` experts (``models._hf_build.eager_experts``): before they did, ``symmetry_map`` failed inside
transformers ("Expected mat_a to be Float32, BFloat16 or Float16 matrix, got Double"). Here, per family, a random
float32 model with the default: the transformed model keeps ``grouped_mm`` and its log-probabilities are the
original's to within the float32 floor, computed directly against a float64 ``eager`` copy of the original's
weights; verify passes in float32 and in float64 and fails on a moved expert weight; the model keeps its own
implementation. A model whose own forward cannot run on grouped_mm (float64 weights; a bfloat16 expert row that is not
a whole 16-byte unit) is refused by every verb that runs it, naming the fix, and only that model.
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


REFUSED = "UnsupportedModelError"


def forward_in(block, model):
    """Run ``model`` on IDS inside the context ``block`` (a capture, an intervention)."""
    with block, torch.no_grad():
        model(IDS)


def runs(model) -> str:
    """"ran", or the RuntimeError's text where the model's own forward fails (computed here)."""
    try:
        with torch.no_grad():
            assert model(IDS).logits.isfinite().all()
        return "ran"
    except RuntimeError as exc:
        return str(exc)


def refusal(verb) -> str:
    """What ``verb()`` did: "ran", REFUSED with its text, or another error's type."""
    try:
        verb()
        return "ran"
    except wb.UnsupportedModelError as exc:
        return f"{REFUSED}: {exc}"
    except Exception as exc:
        return type(exc).__name__


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_float64_model_on_grouped_mm_is_refused_naming_the_fix(family):
    """A model built (or loaded) with the default, then ``.double()``: its own forward fails inside transformers (checked
    here), and every verb that runs it (verify, run_with_cache, capture, intervene, hook_names' probe) raised torch's
    RuntimeError from there. Now each refuses it with UnsupportedModelError naming the experts module, the
    implementation and the fix (verify up front; the hooks where the forward fails, torch's error its cause: see
    test_a_hook_that_never_reaches_the_experts_runs); after the fix, verify PASSes; a new model on grouped_mm is
    refused as new_model."""
    cls, config, shape = FAMILIES[family]
    model = random_model(cls, config, shape)  # float64
    assert model.config._experts_implementation == "grouped_mm"
    assert "Double" in runs(model)
    new, t = wb.random_intertwiner(model, seed=1)  # (reads weights only, never runs the model: a float64 eager copy)
    with pytest.raises(wb.UnsupportedModelError,
                       match=r"'grouped_mm'.*float64.*model\.set_experts_implementation\(\"eager\"\)"):
        wb.verify(model, new, IDS, t)
    for verb in (lambda: wb.run_with_cache(model, IDS, names="*"), lambda: forward_in(wb.capture(model, names="*"), model),
                 lambda: forward_in(wb.intervene(model, {}), model), lambda: forward_in(wb.hooks.watch(model, {}), model),
                 lambda: wb.harvest(model, [IDS], names=["model.embed_tokens"]), lambda: wb.hook_names(model, IDS)):
        with pytest.raises(wb.UnsupportedModelError, match=r"experts 'model\.layers\.0\.mlp\.experts'") as info:
            verb()
        assert "Double" in str(info.value.__cause__)  # (torch's own error, kept as the cause)
    model.set_experts_implementation("eager")
    assert wb.verify(model, new, IDS, t).verdict == "PASS"
    bad = copy.deepcopy(new)
    bad.set_experts_implementation("grouped_mm")
    with pytest.raises(wb.UnsupportedModelError, match=r'new_model \(.*new_model\.set_experts_implementation'):
        wb.verify(model, bad, IDS, t)


def test_a_hook_that_never_reaches_the_experts_runs():
    """A float64 Mixtral on grouped_mm cannot run its whole forward, but a capture stopped before its first experts
    (stop_at), or a capture or an intervention around a call of its embedding alone, never runs them: each worked, and
    the up-front refusal made them raise UnsupportedModelError (and walked every module of every model on every
    capture). The values are checked against the embedding computed here."""
    model = random_model(*FAMILIES["mixtral"][:2], test_hf_mixtral.SHAPE)  # float64, grouped_mm
    assert "Double" in runs(model)
    with torch.no_grad():
        want = model.model.embed_tokens.weight[IDS]
    out, cache = wb.run_with_cache(model, IDS, names=["model.embed_tokens"], stop_at=True)
    assert out is None and torch.equal(cache["model.embed_tokens"], want)
    with wb.capture(model, names=["model.embed_tokens"]) as cache, torch.no_grad():
        model.model.embed_tokens(IDS)
    assert torch.equal(cache["model.embed_tokens"], want)
    with wb.intervene(model, {"model.embed_tokens": torch.zeros_like(want)}), torch.no_grad():
        assert torch.equal(model.model.embed_tokens(IDS), torch.zeros_like(want))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lower_precisions_on_grouped_mm_are_refused_exactly_where_they_fail(family):
    """float32, bfloat16 and float16 on grouped_mm: the kernel takes them, but only matrices whose rows are whole
    16-byte units ("strides should be multiple of 16 bytes"), which every checkpoint's sizes are and this file's tiny
    Qwen MoEs' experts (12 and 20 hidden units) in 2-byte dtypes are not. Each verb runs the model exactly where its own
    forward runs (computed here) and refuses it, naming the fix, exactly where it fails."""
    cls, config, shape = FAMILIES[family]
    failing = set()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = random_model(cls, config, shape).to(dtype)
        own = runs(model)
        got = refusal(lambda: wb.run_with_cache(model, IDS, names=["model.layers.0.mlp.experts"]))
        if own == "ran":
            assert got == "ran", got
        else:
            assert "16 bytes" in own and got.startswith(REFUSED) and "16-byte units" in got, (own, got)
            assert 'set_experts_implementation("eager")' in got
            failing.add(dtype)
            model.set_experts_implementation("eager")
            assert runs(model) == "ran"
    assert failing == ({torch.bfloat16, torch.float16} if family.startswith("qwen") else set())


def test_a_bridge_around_a_float64_model_on_grouped_mm_is_refused(tmp_path):
    """A TransformerLens bridge booted around it: the fix names the bridge's original_model."""
    from test_hf_families import bridge

    model = bridge(random_model(*FAMILIES["mixtral"][:2], test_hf_mixtral.SHAPE), tmp_path)
    assert model.original_model.config._experts_implementation == "grouped_mm"
    with pytest.raises(wb.UnsupportedModelError, match=r'model\.original_model\.set_experts_implementation\("eager"\)'):
        wb.run_with_cache(model, IDS, names=["blocks.0.hook_resid_post"])
    model.original_model.set_experts_implementation("eager")
    _, cache = wb.run_with_cache(model, IDS, names=["blocks.0.hook_resid_post"])
    assert cache["blocks.0.hook_resid_post"].dtype == torch.float64
