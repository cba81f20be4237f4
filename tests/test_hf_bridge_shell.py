"""A transform of a Hugging Face bridge returns a deep copy of a never-run template (``models/_hf_shell``)
where that is safe, instead of a fresh boot. The adversary: an original bridge that has run, with a
cache and a live hook of the user's, transformed twice; the new bridges must see only their own weights
and hooks, equal a plain boot around the same weights bit for bit (outputs and every cached activation),
preserve the function (float64, computed directly), and leave the original as it was.
"""
import copy
import warnings
import weakref

import pytest
import torch

import workbench as wb

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

from test_hf_bridge_boot import _differences, _plain  # noqa: E402
from test_hf_families import IDS, build, logp, rel  # noqa: E402

from workbench.models import _hf_shell  # noqa: E402

SHELLED = ["mistral", "qwen2", "gemma", "phi", "llama"]  # no boot-time hooks, no split q/k/v copies
# OPT: placeholder MLP mirrors wired at boot; GPT-NeoX, GPT-2: split q/k/v (tests/test_hf_bridge_shell_families.py)
WIRED_OR_SPLIT = ["opt", "gpt_neox", "gpt2"]


def _reference(new):
    """A plain boot around a plain Hugging Face model carrying ``new``'s weights."""
    hf = new.original_model
    own = {k.replace("._original_component", ""): v for k, v in hf.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = type(hf)(copy.deepcopy(hf.config)).double().eval()
    fresh.load_state_dict({k: own[k] for k in fresh.state_dict()})
    return _plain(fresh)


def _hooked(bridge) -> list[str]:
    return [f"{n}.{d}" for n, m in bridge.named_modules() for d in _hf_shell._HOOK_DICTS if getattr(m, d, None)]


@pytest.mark.parametrize("family", SHELLED)
def test_a_copied_bridge_of_a_used_bridge_shares_nothing_and_is_a_boots_equal(family):
    B = _plain(build(family))
    B.run_with_cache(IDS)  # it has run, with a cache
    wb.run_with_cache(B, IDS, names=["blocks.0.hook_resid_pre"])
    calls = []
    B.blocks[0].hook_in.add_hook(lambda x, hook: calls.append(hook.name))  # the user's live hook
    with pytest.raises(wb.UnsupportedModelError, match=r"forward hooks \('blocks\.0\.hook_resid_pre'\)"):
        wb.random_intertwiner(B, seed=3)  # a hook may change what its module computes: refused, naming it
    B.reset_hooks()
    before = {k: v.clone() for k, v in B.state_dict().items()}
    assert _hf_shell.shell(B, torch.float64) is not None  # this family takes the copy, not a boot
    new, _ = wb.random_intertwiner(B, seed=3)
    other, _ = wb.random_intertwiner(B, seed=4)  # a second copy of the same template
    B.blocks[0].hook_in.add_hook(lambda x, hook: calls.append(hook.name))  # on again: the copies never run it
    with torch.no_grad():
        logits = B(IDS)
    n = len(calls)
    assert _hooked(new) == [] and _hooked(other) == []
    assert new.cfg._bridge_ref() is new and other.cfg._bridge_ref() is other and B.cfg._bridge_ref() is B
    assert new.tokenizer is not B.tokenizer and new.to_tokens("t1 t2").tolist() == B.to_tokens("t1 t2").tolist()

    # the function is preserved, computed directly in float64
    assert rel(logp(new), logp(B)) <= 1e-10 and rel(logp(other), logp(B)) <= 1e-10
    # and the copy is a plain boot around its weights: outputs and every cached activation, bit for bit
    ref = _reference(new)
    assert _differences(new, ref) == []
    _, got = new.run_with_cache(IDS)
    _, want = ref.run_with_cache(IDS)
    assert set(got.keys()) == set(want.keys()) and all(torch.equal(got[k], want[k]) for k in want.keys())
    assert len(calls) == n  # running the copy never called the original's hook

    # hooks and weights of one copy reach neither the other copy nor the original
    seen = []
    new.blocks[0].hook_in.add_hook(lambda x, hook: seen.append(1))
    with torch.no_grad():
        out_other = other(IDS)
        next(new.original_model.parameters()).add_(1.0)
        assert torch.equal(other(IDS), out_other) and seen == []
        assert torch.equal(B(IDS), logits) and len(calls) == n + 1  # its own hook still fires, once
    assert all(torch.equal(before[k], v) for k, v in B.state_dict().items())


def test_the_sharing_check_sees_closures_and_weak_references():
    """Negative controls for ``_reaches``: a deep copy of a never-hooked bridge reaches nothing of it; one
    with a hook (a closure over the original's hook point) or a weak reference to one of its modules does."""
    B = _plain(build("llama"))
    assert not _hf_shell._reaches(copy.deepcopy(B), B)
    B.blocks[0].__dict__["_ref"] = weakref.ref(B.blocks[1])
    assert _hf_shell._reaches(copy.deepcopy(B), B)
    del B.blocks[0].__dict__["_ref"]
    B.blocks[0].hook_in.add_hook(lambda x, hook: None, is_permanent=True)  # full_hook closes over B's hook point
    assert _hf_shell._reaches(copy.deepcopy(B), B)


def test_a_parameter_derived_at_boot_is_seen():
    """Negative control for ``derived``: GPT-2's split q/k/v are views of ``c_attn`` (its own storage, so
    a storage check would pass them); a template holding such a view is not copied."""
    from workbench.models import _hf

    assert len(_hf_shell.derived(_plain(build("gpt2")))) == 2 * 6  # q, k, v weight and bias, 2 layers
    B = _plain(build("llama"))
    assert _hf_shell.derived(B) == []
    view = torch.nn.Parameter(B.blocks[0].attn.q.original_component.weight[:4])
    B.blocks[0].attn.register_parameter("extra", view)
    assert _hf_shell.derived(B) == [f"{type(B.blocks[0].attn).__name__}.extra"]
    assert _hf.views(B)  # the layout itself still reads the model


@pytest.mark.parametrize("family", WIRED_OR_SPLIT)
def test_bridges_with_boot_time_mirrors_or_split_qkv_are_a_boots_equal_bit_for_bit(family):
    B = _plain(build(family))
    assert _hf_shell.shell(B, torch.float64) is not None
    new, _ = wb.random_intertwiner(B, seed=1)
    assert rel(logp(new), logp(B)) <= 1e-10 and _differences(new, _reference(new)) == []


def test_the_copy_takes_the_models_tokenizer_and_training_mode():
    """Two bridges of one config with different tokenizers share a template; each copy carries its own
    model's tokenizer. The training mode is part of the template's key."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from workbench.models import _hf_build

    raw = build("llama")
    A = _plain(raw)
    tok = Tokenizer(models.WordLevel({f"u{i}": 48 - i for i in range(49)} | {"[UNK]": 49}, unk_token="[UNK]"))
    C = _hf_build.boot("local/x", copy.deepcopy(raw), PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                                                          pad_token="[UNK]")).eval()
    a, _ = wb.random_intertwiner(A, seed=0)
    c, _ = wb.random_intertwiner(C, seed=0)
    words = lambda b: [b.to_tokens(w, prepend_bos=False).tolist() for w in ("t3", "u3")]  # noqa: E731
    assert words(a) == words(A) == [[[3]], [[49]]] and words(c) == words(C) == [[[49]], [[45]]]
    A.train()
    t, _ = wb.random_intertwiner(A, seed=0)
    assert all(m.training for m in t.modules()) and all(m.training for m in t.original_model.modules())
    assert not any(m.training for m in a.modules())
