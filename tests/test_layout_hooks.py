"""Forward hooks on a transformer read through the layout (from its weights and configuration, no trace). A hook may
change what its module computes, which the layout does not see, and a transformed copy does not carry it in the new
basis: a per-unit factor on the MLP's hidden units made random_intertwiner change a Hugging Face GPT-2's logits by 7%
and a TransformerLens model's by 39% while the map promised a symmetry. Refused now, naming the hook; workbench's own
capture hooks only observe and change nothing. Function preservation is computed here directly."""
import pytest
import torch

import workbench as wb
from conftest import make_transformer

F64 = torch.float64


def _gpt2():
    from workbench.models._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_a_hooked_hugging_face_module_is_refused_naming_it():
    model, x = _gpt2(), torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    w = torch.linspace(0.5, 2.0, 128, dtype=F64)
    handle = model.transformer.h[0].mlp.act.register_forward_hook(lambda mod, i, o: o * w)
    with pytest.raises(wb.UnsupportedModelError, match=r"forward hooks \('transformer\.h\.0\.mlp\.act'\)"):
        wb.symmetry_map(model)
    with pytest.raises(wb.UnsupportedModelError, match="forward hooks"):
        wb.random_intertwiner(model, seed=0)
    handle.remove()
    with torch.no_grad():
        ref = model(x).logits
        new, _ = wb.random_intertwiner(model, seed=0)
        assert _rel(new(x).logits, ref) < 1e-10
    with wb.intervene(model, {"transformer.h.0.mlp.act": lambda out: out * w}):
        with pytest.raises(wb.UnsupportedModelError, match="wb.intervene"):
            wb.random_intertwiner(model, seed=0)


def test_a_capture_open_on_a_hugging_face_model_leaves_its_transform_exact():
    """Neither workbench's capture hooks nor Hugging Face's own recording hooks (installed at a first forward asking for
    hidden states or attentions: they collect what the output returns) change what a module computes."""
    model, x = _gpt2(), torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x, output_hidden_states=True, output_attentions=True).logits
        with wb.capture(model, names="transformer.h.*") as cache:
            model(x)
            new, _ = wb.random_intertwiner(model, seed=1)
        assert cache.names and _rel(new(x).logits, ref) < 1e-10


@pytest.mark.transformer
@pytest.mark.filterwarnings("ignore")
def test_a_permanent_transformer_lens_hook_is_refused():
    model = make_transformer()
    x = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    w = torch.linspace(0.5, 2.0, 128)
    model.hook_dict["blocks.0.mlp.hook_post"].add_hook(lambda a, hook: a * w, is_permanent=True)
    with pytest.raises(wb.UnsupportedModelError, match="blocks.0.mlp.hook_post"):
        wb.random_intertwiner(model, seed=0)
    model.reset_hooks(including_permanent=True)
    with torch.no_grad():
        ref = model(x)
        new, _ = wb.random_intertwiner(model, seed=0)
        assert _rel(new(x), ref) < 1e-4  # float32 model: its own rounding
