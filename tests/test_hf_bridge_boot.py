"""The bridge a transform of a Hugging Face bridge returns is booted without work whose results the bridge
does not keep (``models/_hf_build.boot``: the hook scan's ``W_E_pos`` concatenations, the random initialisation
of the ``nn.Linear`` layers a fused q/k/v is split into). Checked here against TransformerLens's own plain
``boot_transformers`` around the same weights, bit for bit: every parameter and buffer (the split q/k/v
copies included), the hook registry, the outputs; and that both shortcuts are undone afterwards.
"""
import copy
import warnings

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

from test_hf_families import CONFIGS, IDS, build  # noqa: E402


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(49)} | {"[UNK]": 49}, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")


def _plain(raw):
    from transformer_lens.model_bridge import TransformerBridge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers("local/x", hf_model=copy.deepcopy(raw), tokenizer=_tokenizer(),
                                                   dtype=torch.float64).eval()


def _light(raw):
    from workbench.models import _hf_build

    return _hf_build.boot("local/x", copy.deepcopy(raw), _tokenizer()).eval()


def _differences(a, b) -> list[str]:
    """Where two bridges differ: parameter and buffer names or bits (tied and split copies listed under
    every name), hook registry names, or the logits."""
    out = []
    for what in ("named_parameters", "named_buffers"):
        pa, pb = dict(getattr(a, what)(remove_duplicate=False)), dict(getattr(b, what)(remove_duplicate=False))
        if set(pa) != set(pb):
            out.append(f"{what}: names {sorted(set(pa) ^ set(pb))[:4]}")
        out += [f"{what}: {k}" for k in pa.keys() & pb.keys() if not torch.equal(pa[k], pb[k])]
    if set(a._hook_registry) != set(b._hook_registry):
        out.append(f"hooks {sorted(set(a._hook_registry) ^ set(b._hook_registry))[:4]}")
    with torch.no_grad():
        if not torch.equal(a(IDS), b(IDS)):
            out.append("logits")
    return out


@pytest.mark.parametrize("family", list(CONFIGS))
def test_light_boot_is_the_plain_boot_bit_for_bit(family):
    raw = build(family)
    assert _differences(_light(raw), _plain(raw)) == []


def test_the_comparison_sees_a_split_qkv_copy_and_the_shortcuts_are_undone():
    """Negative control: one entry of GPT-NeoX's split q — a copy of the interleaved fused projection made at
    boot, the tensor a skipped initialisation would have left unwritten — differing is found. Afterwards
    ``W_E_pos`` reads again and ``torch.nn.init`` fills again."""
    from workbench.models import _hf

    raw = build("gpt_neox")
    light, plain = _light(raw), _plain(raw)
    weights = {p.untyped_storage().data_ptr() for p in _hf.views(light).values()}
    copies = [k for k, p in light.named_parameters(remove_duplicate=False) if ".q." in k and k.endswith("weight")
              and p.untyped_storage().data_ptr() not in weights]
    assert copies  # the split q of every layer is a tensor of its own
    with torch.no_grad():
        dict(light.named_parameters(remove_duplicate=False))[copies[0]][0, 0] += 1.0
    assert any(copies[0] in d for d in _differences(light, plain)) and "logits" in _differences(light, plain)
    gpt2 = _light(build("gpt2"))
    assert torch.equal(gpt2.W_E_pos, torch.cat([gpt2.W_E, gpt2.W_pos], 0))
    t = torch.zeros(3)
    torch.nn.init.ones_(t)
    assert torch.equal(t, torch.ones(3))
