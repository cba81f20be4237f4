"""``wb.fold_layernorm`` on plain modules (the graph backend): torchvision's and timm's vision transformers,
ConvNeXt, and small models built to fool it. Folding moves each LayerNorm's gain into its linear readers'
columns and its bias into their biases (docs/DERIVATIONS.md §2), only where every reader can absorb it.

Every verdict is checked directly: outputs of the original and the folded model compared here in float64,
each output unit against its own scale (``changed``); the input's ``state_dict`` compared bitwise; negative
controls (a wrong fold done by hand) must move the outputs."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import workbench as wb
from test_vision_transformers import (F64, MODELS, changed, check_exact, convnext, image, one_thread,  # noqa: F401
                                      random_vit, randomised, stream, timm_vit, tv_vit)
from workbench.symmetry._fold_graph import fold_plan

VITS = ["torchvision", "timm", "timm_avg"]


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, before) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(before[k], now[k]) for k in before)


def layernorms(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}


def is_folded(m: nn.LayerNorm) -> bool:
    return bool((m.weight == 1).all()) and (m.bias is None or bool((m.bias == 0).all()))


# ------------------------------------------------------------------ vision transformers
@pytest.mark.parametrize("name", VITS)
def test_folding_a_vit_preserves_the_function_and_folds_every_norm(name):
    model = randomised(MODELS[name]())
    x = image()
    before = state(model)
    assert not any(is_folded(m) for m in layernorms(model).values())  # gains around 1 but not 1, biases nonzero
    folded = wb.fold_layernorm(model)
    assert same_state(model, before)  # the input is never mutated
    assert changed(model, folded, x) <= 1e-10
    norms = layernorms(folded)
    assert norms and all(is_folded(m) for m in norms.values())
    # the readers took the affine parts: the weights moved (not a copy with the norms reset)
    moved = [k for k, v in folded.state_dict().items() if not torch.equal(v, before[k])]
    assert any("qkv" in k or "in_proj" in k for k in moved) and any("head" in k for k in moved)
    # the head reads the final norm after a token selection (torchvision, timm) or a token mean (timm avg)
    assert any(k.startswith(("heads.head", "head.")) for k in moved)


@pytest.mark.parametrize("name", VITS)
def test_the_folded_vit_stream_takes_rotations_fixing_the_ones_vector(name):
    model = randomised(MODELS[name]())
    x = image()
    folded = wb.fold_layernorm(model, x)
    assert stream(wb.symmetry_map(model, x[:1])).group.name == "permutation_with_sign"
    assert stream(wb.symmetry_map(folded, x[:1])).group.name == "orthogonal_ones_with_sign"
    for seed in (0, 1, 2):
        new, _ = wb.random_intertwiner(folded, seed=seed, example=x)
        assert changed(folded, new, x) <= 1e-10  # direct float64 check
        assert changed(model, new, x) <= 1e-10  # ... and against the unfolded original
    check_exact(folded, x, seed=4)  # verify PASSes at float64 and float32 (and the direct check again)


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(VITS), heads=st.sampled_from([1, 2, 4]), width=st.sampled_from([1, 2]),
       layers=st.integers(1, 2), seed=st.integers(0, 100))
def test_random_vision_transformers_fold_exactly(kind, heads, width, layers, seed):
    model = random_vit(kind, heads, width, layers, seed)
    x = image(2, seed)
    folded = wb.fold_layernorm(model, x)
    assert changed(model, folded, x) <= 1e-10
    assert all(is_folded(m) for m in layernorms(folded).values())
    assert stream(wb.symmetry_map(folded, x[:1])).group.name == "orthogonal_ones_with_sign"
    new, _ = wb.random_intertwiner(folded, seed=seed, example=x)
    assert changed(model, new, x) <= 1e-10


def test_a_wrong_fold_changes_the_function():
    """Negative controls, by hand on a ViT whose MLP is square (so γ can go into the rows too): the same
    numbers put in the wrong place must move the outputs."""
    model = randomised(tv_vit(mlp=16))
    x = image()
    assert changed(model, wb.fold_layernorm(model), x) <= 1e-10
    ln, fc = "encoder.layers.encoder_layer_0.ln_2", "encoder.layers.encoder_layer_0.mlp.0"

    def by_hand(rows: bool, bias: bool, inverse: bool = False):
        new = copy.deepcopy(model)
        n, f = new.get_submodule(ln), new.get_submodule(fc)
        g, b = n.weight.detach().clone(), n.bias.detach().clone()
        with torch.no_grad():
            if bias:
                f.bias += f.weight @ b
            gain = 1 / g if inverse else g
            f.weight.copy_(gain[:, None] * f.weight if rows else f.weight * gain)
            n.weight.fill_(1.0)
            n.bias.zero_()
        return new

    assert changed(model, by_hand(rows=False, bias=True), x) <= 1e-10  # the right fold, done by hand
    assert changed(model, by_hand(rows=True, bias=True), x) > 1e-3  # γ into the rows
    assert changed(model, by_hand(rows=False, bias=False), x) > 1e-3  # β dropped
    assert changed(model, by_hand(rows=False, bias=True, inverse=True), x) > 1e-3  # 1/γ


def test_a_timm_attention_with_qk_norm_is_not_folded_into():
    """timm's Attention with q/k norms is no reader we derived: its norm1 stays, the rest folds."""
    model = randomised(timm_vit(qk_norm=True))
    x = image()
    folded = wb.fold_layernorm(model)
    assert changed(model, folded, x) <= 1e-10
    plan = fold_plan(model)
    assert {n for n in plan.left if ".attn." not in n} == {"blocks.0.norm1", "blocks.1.norm1"}
    assert "q_norm" in plan.left["blocks.0.norm1"]
    for name, m in layernorms(folded).items():
        original = model.get_submodule(name)
        if name in plan.left or ".attn." in name:  # left, and the attention's own q/k norms read no Linear
            assert torch.equal(m.weight, original.weight) and torch.equal(m.bias, original.bias)
        else:
            assert is_folded(m), name


# ------------------------------------------------------------------ models built to fool it
class AddsItsNorm(nn.Module):
    """``ln_a``'s output is read by ``fc_a`` *and* added to the stream (not foldable); ``ln_b`` only by the head."""

    def __init__(self, d=8):
        super().__init__()
        self.embed, self.ln_a, self.fc_a = nn.Linear(4, d), nn.LayerNorm(d), nn.Linear(d, d)
        self.ln_b, self.head = nn.LayerNorm(d), nn.Linear(d, 3)

    def forward(self, x):  # [B, T, 4]
        h = self.embed(x)
        a = self.ln_a(h)
        h = h + a + self.fc_a(a)
        return self.head(self.ln_b(h)[:, 1:].mean(1))


def tokens(n=5, seed=2):
    return torch.randn(n, 6, 4, dtype=F64, generator=torch.Generator().manual_seed(seed))


def test_a_norm_added_to_the_stream_stays_and_the_function_is_kept():
    model = randomised(AddsItsNorm())
    x = tokens()
    before = state(model)
    folded = wb.fold_layernorm(model, x)
    assert same_state(model, before)
    assert changed(model, folded, x) <= 1e-10
    assert torch.equal(folded.ln_a.weight, model.ln_a.weight) and torch.equal(folded.ln_a.bias, model.ln_a.bias)
    assert torch.equal(folded.fc_a.weight, model.fc_a.weight)  # its reader untouched too
    assert is_folded(folded.ln_b) and not torch.equal(folded.head.weight, model.head.weight)
    assert "add" in fold_plan(model, x).left["ln_a"]
    # negative control: folding ln_a anyway (into fc_a, its one Linear reader) changes the function
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.fc_a.bias += wrong.fc_a.weight @ wrong.ln_a.bias
        wrong.fc_a.weight.mul_(wrong.ln_a.weight)
        wrong.ln_a.weight.fill_(1.0)
        wrong.ln_a.bias.zero_()
    assert changed(model, wrong, x) > 1e-3


class Readers(nn.Module):
    """One LayerNorm and a reader chosen by ``kind``; a second, plain one folds so the model is foldable."""

    def __init__(self, kind: str, d=8):
        super().__init__()
        self.kind = kind
        self.embed, self.ln, self.fc, self.fc2 = nn.Linear(4, d), nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, d)
        self.fc_half = nn.Linear(d // 2, d)
        self.nobias = nn.Linear(d, d, bias=False)
        self.ln_end, self.head = nn.LayerNorm(d), nn.Linear(d, 3)

    def forward(self, x):  # [B, T, 4]
        a = self.ln(self.embed(x))
        if self.kind == "channel_slice":
            h = self.fc_half(a[..., : a.shape[-1] // 2])
        elif self.kind == "channel_mean":
            h = self.fc(a) + a.mean(-1, keepdim=True)
        elif self.kind == "shared_reader":  # fc reads the norm and, a second time, another tensor
            h = self.fc(a) + self.fc(x.new_ones(a.shape))
        elif self.kind == "two_readers":  # both absorb it: folds into both
            h = self.fc(a) * self.fc2(a[:, :1].mean(1, keepdim=True))
        elif self.kind == "no_bias":  # folds the gain; β/γ stays on the norm
            h = self.nobias(a)
        elif self.kind == "gelu":
            h = self.fc(torch.nn.functional.gelu(a))
        return self.head(self.ln_end(h)[:, 0])


@pytest.mark.parametrize("kind,folds,why", [("channel_slice", False, "indexes the channel axis"),
                                            ("channel_mean", False, "mean over the channels"),
                                            ("shared_reader", False, "called more than once"),
                                            ("gelu", False, "gelu"),
                                            ("two_readers", True, None), ("no_bias", True, None)])
def test_which_readers_absorb_a_norm(kind, folds, why):
    model = randomised(Readers(kind))
    x = tokens()
    before = state(model)
    folded = wb.fold_layernorm(model, x)
    assert same_state(model, before)
    assert changed(model, folded, x) <= 1e-10
    assert is_folded(folded.ln_end)
    plan = fold_plan(model, x)
    if folds:
        assert "ln" in plan.folds and bool((folded.ln.weight == 1).all())
        assert not torch.equal(folded.ln.weight, model.ln.weight)
        if kind == "no_bias":  # the bias stays, divided by the gain: the only place left for it
            assert torch.allclose(folded.ln.bias, model.ln.bias / model.ln.weight, rtol=1e-15, atol=0)
        else:
            assert bool((folded.ln.bias == 0).all())
    else:
        assert why in plan.left["ln"]
        assert torch.equal(folded.ln.weight, model.ln.weight) and torch.equal(folded.ln.bias, model.ln.bias)


def test_nothing_foldable_is_refused_and_no_norm_is_a_copy():
    model = randomised(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 2)))
    with pytest.raises(wb.InvalidOptionError, match=r"no LayerNorm of Sequential can be folded.*1: .*GELU"):
        wb.fold_layernorm(model)
    plain = randomised(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    copied = wb.fold_layernorm(plain)
    assert copied is not plain and same_state(copied, plain.state_dict())
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(copied.parameters(), plain.parameters()))


def test_a_model_that_cannot_be_run_is_refused_naming_example():
    model = randomised(AddsItsNorm())  # its first layer is a Linear on 4 features: a [1, 4] guess fails
    with pytest.raises(wb.InvalidOptionError, match="pass example="):
        wb.fold_layernorm(model)


# ------------------------------------------------------------------ ConvNeXt
def test_convnext_folds_the_norms_read_by_linears_only():
    model = randomised(convnext())
    x = image()
    before = state(model)
    folded = wb.fold_layernorm(model)
    assert same_state(model, before)
    assert changed(model, folded, x) <= 1e-10
    plan = fold_plan(model)
    # the stem's LayerNorm2d is the stream (a block's depthwise conv and its residual read it), the downsampling
    # one is read by a strided conv: both stay, bitwise
    assert set(plan.left) == {"features.0.1", "features.2.0"}
    assert "Conv2d" in plan.left["features.0.1"] and "Conv2d" in plan.left["features.2.0"]
    for name, m in layernorms(folded).items():
        original = model.get_submodule(name)
        if name in plan.left:
            assert torch.equal(m.weight, original.weight) and torch.equal(m.bias, original.bias)
        else:  # each block's norm (read by pwconv1) and the classifier's (flatten of [B, C, 1, 1], then Linear)
            assert is_folded(m), name
    assert "classifier.0" in plan.folds
    new, _ = wb.random_intertwiner(folded, seed=0, example=x)
    assert changed(folded, new, x) <= 1e-10


def test_tied_and_parametrised_readers_are_left():
    """A reader whose weight is also another module's (tied), or is computed by a parametrization, cannot take a
    fold of its own: the norm stays and the function is kept."""
    model = randomised(Readers("no_bias"))
    model.fc.weight = model.nobias.weight  # tied with the reader
    x = tokens()
    folded = wb.fold_layernorm(model, x)
    assert changed(model, folded, x) <= 1e-10
    assert "shares a parameter" in fold_plan(model, x).left["ln"]
    assert torch.equal(folded.ln.weight, model.ln.weight)
    para = randomised(Readers("no_bias"))
    torch.nn.utils.parametrizations.weight_norm(para.nobias)
    folded = wb.fold_layernorm(para, x)
    assert changed(para, folded, x) <= 1e-10
    assert "ln" in fold_plan(para, x).left and torch.equal(folded.ln.weight, para.ln.weight)


def test_a_bad_example_is_refused():
    with pytest.raises(wb.InvalidOptionError, match="example must be an input batch"):
        wb.fold_layernorm(randomised(AddsItsNorm()), example=[1, 2])
