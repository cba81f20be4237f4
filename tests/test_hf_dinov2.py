"""DINOv2 (Hugging Face ``Dinov2Model``, ``Dinov2ForImageClassification`` and their ``WithRegisters`` forms): a pre-LN
ViT encoder under other module names, read through workbench's own adapter (TransformerLens 4.3 has none), with a
layer scale λ ⊙ block(norm(h)) on each block's attention and MLP output, an optional SwiGLU MLP, a mask token and
register tokens among the stream's writers, and a classifier reading [class token ; mean of the patch tokens].
docs/DERIVATIONS.md §10, DINOv2.

The forward is written out here from the modules' parameters, then the map, float64 draws compared directly (never
through verify), where the layer scale goes (λ ↦ P·λ, the writer's rows by the whole element), negative controls
(λ, the registers, the mask token, the patch-mean columns left in place; a rotation where only permutations hold),
position interpolation, the fold, refusals, verify in float32, and property tests over random shapes.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import workbench as wb
from test_hf_families import (FAIL, TOL, exact_everywhere, folded_exactly, kinds, random_model, refused_and_wrong,
                              refused_by_name, rel)
# ViT's pixels, and ViT's groups, which are DINOv2's too (docs/DERIVATIONS.md §10, DINOv2) with its LayerNorm gains and
# layer scales kept as built (random)
from test_hf_vit import GROUPS, PIXELS

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=32, patch_size=8,
             num_labels=10)
SWIGLU = {**GROUPS, "blocks.mlp": {"diagonal_permutation"}}
CLASSES = {"Dinov2Model": "Dinov2Config", "Dinov2ForImageClassification": "Dinov2Config",
           "Dinov2WithRegistersModel": "Dinov2WithRegistersConfig",
           "Dinov2WithRegistersForImageClassification": "Dinov2WithRegistersConfig"}


def build(cls="Dinov2ForImageClassification", seed=0, **kw):
    """A tiny float64 DINOv2, every parameter random (LayerNorm gains 1 + N(0, 0.4²); layer scales, biases, the class,
    mask and register tokens N(0, 0.3²) or N(0, 1), the position embeddings too)."""
    if "Registers" in cls:
        kw = {"num_register_tokens": 3, **kw}
    return random_model(cls, CLASSES[cls], {**SHAPE, **kw}, seed, embedding=lambda name: "embeddings." in name)


def base(model):
    return getattr(model, "dinov2", None) or getattr(model, "dinov2_with_registers", None) or model


def logp(model, pixels=PIXELS):
    with torch.no_grad():
        return model(pixel_values=pixels).logits.double().log_softmax(-1)


def moved_stream(model, new, t, pixels=PIXELS, **kw):
    """The base model's last hidden state of ``new`` against ``model``'s moved by the stream's element (its pooler
    output is the class token's row of it, so it moves too)."""
    with torch.no_grad():
        old, got = base(model)(pixel_values=pixels, **kw), base(new)(pixel_values=pixels, **kw)
    assert torch.equal(got.pooler_output, got.last_hidden_state[:, 0])
    return rel(got.last_hidden_state, t.elements["resid"].act(old.last_hidden_state, -1))


def written_out(dino, x, bool_masked_pos=None):
    """A Dinov2(WithRegisters)Model's last hidden state computed from its parameters, at the configured image size:
    each writer's stream axis as the derivation reads it (the Conv2d's output channel; the class, mask and register
    tokens' and positions' last axis), pre-LN blocks whose outputs are scaled per channel (λ₁, λ₂) before the add,
    a GELU or SwiGLU MLP."""
    e, c = dino.embeddings, dino.config
    d, H = c.hidden_size, c.num_attention_heads
    patches = F.conv2d(x, e.patch_embeddings.projection.weight, e.patch_embeddings.projection.bias,
                       stride=c.patch_size).flatten(2).transpose(1, 2)
    if bool_masked_pos is not None:
        patches = torch.where(bool_masked_pos[..., None], e.mask_token.reshape(1, 1, d), patches)
    h = torch.cat([e.cls_token.expand(len(x), 1, d), patches], 1) + e.position_embeddings
    if hasattr(e, "register_tokens"):  # after the class token, with no position
        h = torch.cat([h[:, :1], e.register_tokens.expand(len(x), -1, -1), h[:, 1:]], 1)
    for layer in dino.encoder.layer:
        a, m = layer.attention, layer.mlp
        n = F.layer_norm(h, (d,), layer.norm1.weight, layer.norm1.bias, c.layer_norm_eps)
        q, k, v = (p(n).unflatten(-1, (H, -1)).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        z = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v  # bidirectional: no mask
        h = h + layer.layer_scale1.lambda1 * a.o_proj(z.transpose(1, 2).flatten(2))
        n = F.layer_norm(h, (d,), layer.norm2.weight, layer.norm2.bias, c.layer_norm_eps)
        mlp = m.down_proj(F.silu(m.gate_proj(n)) * m.up_proj(n)) if c.use_swiglu_ffn else m.fc2(F.gelu(m.fc1(n)))
        h = h + layer.layer_scale2.lambda1 * mlp
    return F.layer_norm(h, (d,), dino.layernorm.weight, dino.layernorm.bias, c.layer_norm_eps)


@pytest.mark.parametrize("cls,kw", [("Dinov2ForImageClassification", {}), ("Dinov2ForImageClassification",
                                    {"use_swiglu_ffn": True}), ("Dinov2WithRegistersForImageClassification", {})])
def test_the_forward_is_the_one_the_derivation_reads(cls, kw):
    """The written-out forward is the model's, with and without a mask; the classifier reads the class token's and the
    patch tokens' mean (registers excluded) final stream, its two column halves one reader each."""
    model = build(cls, **kw)
    dino, r = base(model), getattr(model.config, "num_register_tokens", 0)
    mask = torch.rand(3, 16, generator=torch.Generator().manual_seed(1)) < 0.4
    with torch.no_grad():
        stream = written_out(dino, PIXELS)
        assert torch.allclose(dino(pixel_values=PIXELS).last_hidden_state, stream, rtol=0, atol=1e-12)
        masked = dino(pixel_values=PIXELS, bool_masked_pos=mask).last_hidden_state
        assert torch.allclose(masked, written_out(dino, PIXELS, mask), rtol=0, atol=1e-12)
        assert float((masked - stream).abs().max()) > 0.1  # the mask token is read
        W, d = model.classifier.weight, SHAPE["hidden_size"]
        want = stream[:, 0] @ W[:, :d].T + stream[:, 1 + r:].mean(1) @ W[:, d:].T + model.classifier.bias
        assert torch.allclose(model(pixel_values=PIXELS).logits, want, rtol=0, atol=1e-12)
        assert float(torch.stack([lay.layer_scale1.lambda1 for lay in dino.encoder.layer]).std()) > 0.1  # λ not constant


@pytest.mark.parametrize("cls,kw,groups", [
    ("Dinov2ForImageClassification", {}, GROUPS),
    ("Dinov2ForImageClassification", {"use_swiglu_ffn": True}, SWIGLU),
    ("Dinov2WithRegistersForImageClassification", {}, GROUPS),
    ("Dinov2WithRegistersForImageClassification", {"use_swiglu_ffn": True, "num_register_tokens": 1}, SWIGLU),
])
def test_classifier_map_groups_exact_draws_and_a_rotation_refused(cls, kw, groups):
    """21 sites (the stream; per layer 4 QK, 4 OV, the heads, the MLP), every writer and reader placed; random elements
    exact in float64 against the logits computed here; a rotation of the MLP's units refused and, forced, wrong."""
    model = build(cls, **kw)
    smap, *_ = exact_everywhere(model, groups, logp=logp, inputs=PIXELS)
    assert len(smap) == 1 + 2 * (2 * 4 + 2)
    resid = smap["resid"]
    writers = {"patch_embed.W", "patch_embed.b", "cls_token.W", "mask_token.W", "pos_embed.W_pos"}
    writers |= {"reg_tokens.W"} if "Registers" in cls else set()
    assert writers | {f"blocks.{i}.{w}" for i in (0, 1) for w in ("attn.W_O", "attn.b_O", "mlp.W_out", "mlp.b_out")} \
        == {p.name for p in resid.writers}
    assert {"unembed.W_U", "unembed_patches.W_U"} <= {p.name for p in resid.readers}
    assert {(f"blocks.{i}.ls{j}.w", "perm") for i in (0, 1) for j in (1, 2)} <= set(resid.norms)
    if kw.get("use_swiglu_ffn"):
        assert smap["blocks.0.mlp"].activation == "gated silu" and smap["blocks.0.mlp"].n == 88  # (int(128·2/3)+7)//8·8
    for seed in (2, 3):
        new, _ = wb.random_intertwiner(model, seed=seed, example=PIXELS)
        assert rel(logp(new), logp(model)) <= TOL
    refused_and_wrong(model, "blocks.0.mlp", "orthogonal", logp=logp, inputs=PIXELS)


@pytest.mark.parametrize("cls", ["Dinov2Model", "Dinov2WithRegistersModel"])
def test_base_model_moves_its_stream(cls):
    """The base model's last hidden state (and its pooler output, the class token's row) moves by the stream's element;
    verify passes with the representations moved."""
    model = build(cls)
    assert kinds(wb.symmetry_map(model, PIXELS)) == GROUPS
    new, t = wb.random_intertwiner(model, seed=1, example=PIXELS)
    assert moved_stream(model, new, t) <= TOL
    report = wb.verify(model, new, PIXELS, transform=t)
    assert report.passed and report.representations_moved, report.summary()


def test_layer_scale_moves_by_the_permutation_and_its_writer_by_the_element():
    """λ ↦ P·λ (the element's permutation, nothing else), the writers' stream rows by the whole element: checked on
    the weights (the biases: the weights' columns move by the OV and MLP sites too), and the negative: λ put back unmoved changes the logits."""
    model = build()
    new, t = wb.random_intertwiner(model, seed=1, example=PIXELS)
    e = t.elements["resid"]
    perm = e.perm_part()
    for old, got in zip(model.dinov2.encoder.layer, new.dinov2.encoder.layer):
        for ls in ("layer_scale1", "layer_scale2"):
            lam, lam_new = getattr(old, ls).lambda1, getattr(got, ls).lambda1
            assert torch.equal(lam_new, perm.act(lam, 0)) and not torch.equal(lam_new, lam)
        for w in ("attention.o_proj.bias", "mlp.fc2.bias"):  # (their weights' columns move by the OV and MLP sites too)
            assert torch.allclose(got.get_parameter(w), e.act(old.get_parameter(w), 0), rtol=0, atol=1e-14)
    with torch.no_grad():
        new.dinov2.encoder.layer[1].layer_scale2.lambda1.copy_(model.dinov2.encoder.layer[1].layer_scale2.lambda1)
    assert rel(logp(new), logp(model)) > FAIL


def test_a_global_sign_goes_to_the_writers_rows_not_to_the_layer_scale():
    """The stream's sign s (in its exact group, not sampled), applied by hand: every writer's rows and the LayerNorm biases
    by -1, the readers' columns (q, k, v, fc1, both classifier halves) by -1, gains and λ kept (λ ↦ P·λ with P = I):
    the same logits. The negative: the sign put on λ as well (s·P·λ with the writer's rows already signed) flips
    every block's output back, and the logits move."""
    model = build()
    flipped = copy.deepcopy(model)
    writers = ("cls_token", "mask_token", "position_embeddings", "projection.weight", "projection.bias", "o_proj.weight",
               "o_proj.bias", "fc2.weight", "fc2.bias", "norm1.bias", "norm2.bias", "layernorm.bias")
    readers = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "fc1.weight", "classifier.weight")
    with torch.no_grad():
        for name, p in flipped.named_parameters():
            if name.endswith(writers + readers):
                p.neg_()
    assert rel(logp(flipped), logp(model)) <= TOL
    with torch.no_grad():
        for name, p in flipped.named_parameters():
            if name.endswith("lambda1"):
                p.neg_()
    assert rel(logp(flipped), logp(model)) > FAIL


def test_gains_one_with_layer_scales_keep_the_permutations_until_folded():
    """LayerNorm gains 1 (biases 0) but λ random: the stream is not folded (a rotation R does not commute with diag(λ),
    and the push leaves λ in place for a dense map), so the map keeps the permutations, and a forced rotation fixing 1
    changes the logits. wb.fold_layernorm folds λ into the writers too (λ = 1): the folded stream takes rotations fixing
    1, exact against the original."""
    model = build()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
    assert wb.symmetry_map(model)["resid"].group.name == "permutation"
    refused_and_wrong(model, "resid", "orthogonal_ones", logp=logp, inputs=PIXELS)
    folded = folded_exactly(model, "orthogonal_ones", logp)
    assert all(bool((p == 1).all()) for n, p in folded.named_parameters() if n.endswith("lambda1"))


@pytest.mark.parametrize("cls", ["Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification"])
def test_fold_gives_the_orthogonal_stream_group(cls):
    """Random gains and λ: folded, the same function (the classifier's two halves take the final norm's gain, the one
    bias its bias twice), the stream takes rotations fixing 1, a draw exact against the original."""
    folded = folded_exactly(build(cls, use_swiglu_ffn=True), "orthogonal_ones", logp)
    assert all(bool((p == 1).all()) for n, p in folded.named_parameters() if n.endswith(("lambda1", "norm.weight")))


@pytest.mark.parametrize("what", ["register_tokens", "mask_token", "patch_mean"])
def test_writers_and_the_patch_mean_reader_left_unmoved_change_the_function(what):
    """The negative of each new writer or reader: put back unmoved after an exact transform, the function changes (the
    mask token is read only with a mask)."""
    model = build("Dinov2WithRegistersForImageClassification")
    new, t = wb.random_intertwiner(model, seed=1, example=PIXELS)
    mask = torch.rand(3, 16, generator=torch.Generator().manual_seed(1)) < 0.4
    kw = {"bool_masked_pos": mask} if what == "mask_token" else {}
    assert moved_stream(model, new, t, **kw) <= TOL and rel(logp(new), logp(model)) <= TOL
    e, e_new = model.dinov2_with_registers.embeddings, new.dinov2_with_registers.embeddings
    with torch.no_grad():
        if what == "patch_mean":
            new.classifier.weight[:, 64:] = model.classifier.weight[:, 64:]
            assert rel(logp(new), logp(model)) > FAIL
            return
        getattr(e_new, what).copy_(getattr(e, what))
    assert moved_stream(model, new, t, **kw) > FAIL


@pytest.mark.parametrize("cls", ["Dinov2Model", "Dinov2WithRegistersModel"])
def test_position_interpolation_acts_on_positions_only(cls):
    """48-pixel images where the table holds 32-pixel positions: the table is resampled (bicubic, in float32) per channel
    over the positions, which a permutation of the channels passes bit for bit; exact in float64."""
    model = build(cls)
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    new, t = wb.random_intertwiner(model, seed=2, example=PIXELS)
    assert moved_stream(model, new, t, pixels) <= TOL
    with torch.no_grad():
        assert model(pixel_values=pixels).last_hidden_state.shape[1] == 1 + 36 + getattr(model.config, "num_register_tokens", 0)


def test_position_interpolation_of_a_folded_model_rounds_in_float32():
    """Folded, the stream takes rotations fixing 1, which commute with the per-channel resampling in exact arithmetic;
    but the table is resampled in float32 (in a float64 model), so the rotated table rounds otherwise: at 48 pixels the
    log-probabilities agree to float32's rounding of the table (5e-10 measured, not 1e-10), a rotation that did not
    commute would be O(1) off; at the configured 32 pixels nothing is resampled: exact. verify in float64 FAILed it
    (6.5e-10 against 1e-10); it now rounds the embeddings' output to float32 to measure that floor, and still FAILs a
    rotation of the GELU units at that size."""
    model = build()
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    folded = wb.fold_layernorm(model)
    new, t = wb.random_intertwiner(folded, seed=1)
    assert rel(logp(new), logp(model)) <= TOL and rel(logp(new, pixels), logp(model, pixels)) <= 1e-8
    report = wb.verify(folded, new, pixels, transform=t)
    assert report.passed and "float32 floor" in report.rule, report.summary()
    bad, bt = wb.random_intertwiner(folded, seed=1, sites=["blocks.0.mlp"], group="orthogonal", allow_non_symmetry=True)
    assert rel(logp(bad, pixels), logp(model, pixels)) > FAIL and not wb.verify(folded, bad, pixels, transform=bt).passed


def test_drop_path_is_the_identity_in_eval():
    """drop_path_rate > 0 builds Dinov2DropPath modules, the identity in eval: the same sites, a draw exact."""
    model = build(drop_path_rate=0.3)
    assert type(model.dinov2.encoder.layer[0].drop_path).__name__ == "Dinov2DropPath"
    exact_everywhere(model, GROUPS, logp=logp, inputs=PIXELS)


def test_verify_passes_in_float32():
    model = build("Dinov2WithRegistersForImageClassification", use_swiglu_ffn=True).float()
    new, t = wb.random_intertwiner(model, seed=1, example=PIXELS.float())
    report = wb.verify(model, new, PIXELS.float(), transform=t)
    assert report.passed and report.representations_moved, report.summary()


@pytest.mark.parametrize("make,named", [
    (lambda: build("Dinov2ForImageClassification", num_labels=0), "num_labels=0"),
    (lambda: transformers.Dinov2Backbone(transformers.Dinov2Config(**SHAPE)).double().eval(), "Dinov2Backbone"),
])
def test_unsupported_variants_are_refused_by_name(make, named):
    """An Identity classifier (its logits are the stream itself, in the basis a transform moves) and the backbone class
    (chosen stages' hidden states, reshaped): refused, naming it; nothing is transformed."""
    refused_by_name(make(), named, PIXELS)


def test_transformer_lens_cannot_boot_a_dinov2_bridge():
    """The adapter is workbench's own: TransformerLens 4 finds no architecture for DINOv2, so there is no bridge to
    read (only the raw model is a target)."""
    from transformer_lens.model_bridge import TransformerBridge

    with pytest.raises(ValueError, match="Could not determine supported architecture"):
        TransformerBridge.boot_transformers("local/dinov2", hf_model=build("Dinov2Model"), dtype=torch.float64)


@settings(max_examples=8, deadline=None)
@given(cls=st.sampled_from(sorted(CLASSES)), heads=st.sampled_from([2, 4]), d_head=st.sampled_from([4, 8]),
       layers=st.integers(1, 2), patch=st.sampled_from([8, 16]), swiglu=st.booleans(), registers=st.integers(1, 4),
       act=st.sampled_from(["gelu", "relu", "gelu_new"]), mask=st.booleans(), qkv_bias=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_property_random_shapes_are_exact(cls, heads, d_head, layers, patch, swiglu, registers, act, mask, qkv_bias, seed):
    """Random widths, heads, depths, patch sizes, MLPs (GELU-like, ReLU or SwiGLU), register counts, with or without a
    mask token (Dinov2Config's use_mask_token; the registers' configuration always builds one) and q/k/v biases: a
    random element of every site is exact in float64 (the last hidden state compared through the stream's element
    where the class has no head)."""
    kw = dict(hidden_size=heads * d_head, num_attention_heads=heads, num_hidden_layers=layers, patch_size=patch,
              use_swiglu_ffn=swiglu, hidden_act=act, qkv_bias=qkv_bias)
    kw.update({"num_register_tokens": registers} if "Registers" in cls else {"use_mask_token": mask})
    model = build(cls, seed % 5, **kw)
    mlp = {"diagonal_permutation"} if swiglu else {"scaled_permutation"} if act == "relu" else {"permutation"}
    assert kinds(wb.symmetry_map(model))["blocks.mlp"] == mlp
    new, t = wb.random_intertwiner(model, seed=seed, example=PIXELS)
    if cls.endswith("Model"):
        assert moved_stream(model, new, t) <= TOL, kw
    else:
        assert rel(logp(new), logp(model)) <= TOL, kw


def test_no_register_tokens_is_exact():
    """Dinov2WithRegisters with num_register_tokens=0 (its register tokens an empty [1, 0, d], the model's own forward
    runs): a random element of every site is exact and verified, and a wrong stream element FAILs. The push's gather
    could not reshape the empty tensor: a torch RuntimeError out of random_intertwiner."""
    model = build("Dinov2WithRegistersForImageClassification", num_register_tokens=0)
    new, t = wb.random_intertwiner(model, seed=1, example=PIXELS)
    assert rel(logp(new), logp(model)) <= TOL
    assert wb.verify(model, new, PIXELS, transform=t).passed
    bad, bt = wb.random_intertwiner(model, seed=1, sites=["resid"], group="signed_permutation", allow_non_symmetry=True,
                                    example=PIXELS)
    assert rel(logp(bad), logp(model)) > FAIL and not wb.verify(model, bad, PIXELS, transform=bt).passed
