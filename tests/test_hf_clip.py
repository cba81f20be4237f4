"""CLIP's vision tower (Hugging Face ``CLIPVisionModel`` and ``CLIPVisionModelWithProjection``, model_type
``clip_vision_model``): a pre-LN ViT under other module names, read through workbench's own adapter (TransformerLens 4.3
has none), with a LayerNorm on the embeddings before the first block (``pre_layrnorm``: the stream's first state is its
output), a bias-free patch projection, a class embedding [d], positions in an ``nn.Embedding``, quick_gelu MLPs, and a
final LayerNorm (``post_layernorm``) on the class token's row only, which ``visual_projection`` reads (``image_embeds``).
docs/DERIVATIONS.md §10, CLIP.

The forward is written out here from the modules' parameters, then the map, float64 draws compared directly (never
through verify), where pre_layrnorm's gain goes (it moves by the element's permutation; it cannot be folded), negative
controls (pre_layrnorm's gain or bias, the class embedding, the positions, the projection left in place; a rotation of
the quick_gelu units; a rotation of the stream where pre_layrnorm's gain is not 1), a global sign and a shear applied by
hand, position interpolation, the fold, refusals, verify in float32, and property tests over random shapes.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import workbench as wb
from test_hf_families import (FAIL, TOL, exact_everywhere, folded_exactly, kinds, random_model, refused_and_wrong,
                              refused_by_name, rel, sheared)
# ViT's pixels, and ViT's groups, which are CLIP's too (docs/DERIVATIONS.md §10, CLIP) with its LayerNorm gains kept as
# built (random); quick_gelu, like GELU: permutations
from test_hf_vit import GROUPS, PIXELS

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
             patch_size=8, projection_dim=24)
PROJECTED = "CLIPVisionModelWithProjection"


def build(cls=PROJECTED, seed=0, **kw):
    """A tiny float64 CLIP vision model, every parameter random (LayerNorm gains, pre_layrnorm's and post_layernorm's
    included, 1 + N(0, 0.4²); biases N(0, 0.3²); the class embedding, patch projection and positions N(0, 1))."""
    return random_model(cls, "CLIPVisionConfig", {**SHAPE, **kw}, seed, embedding=lambda name: "embeddings." in name)


def tower(model):
    return getattr(model, "vision_model", model)


def embeds(model, pixels=PIXELS):
    """The projection model's image embeddings (invariant: compared as they are)."""
    with torch.no_grad():
        return model(pixel_values=pixels).image_embeds


def moved_stream(model, new, t, pixels=PIXELS, **kw):
    """The tower's last hidden state (the stream itself) and its pooler output (post_layernorm of the class token's
    row) of ``new`` against ``model``'s moved by the stream's element: the larger relative difference."""
    with torch.no_grad():
        old, got = tower(model)(pixel_values=pixels, **kw), tower(new)(pixel_values=pixels, **kw)
    e = t.elements["resid"]
    return max(rel(got.last_hidden_state, e.act(old.last_hidden_state, -1)), rel(got.pooler_output, e.act(old.pooler_output, -1)))


def written_out(vision, x):
    """A CLIPVisionModel's (last hidden state, pooler output) computed from its parameters, at the configured image
    size: the patch Conv2d without bias, the class embedding [d] before the patches, the position table added, then
    pre_layrnorm on the whole sequence, pre-LN blocks (scaled dot-product attention with biases, fc1 → x·σ(1.702x) →
    fc2), and post_layernorm on the class token's row only."""
    e, c = vision.embeddings, vision.config
    d, H, eps = c.hidden_size, c.num_attention_heads, c.layer_norm_eps
    patches = F.conv2d(x, e.patch_embedding.weight, stride=c.patch_size).flatten(2).transpose(1, 2)
    h = torch.cat([e.class_embedding.expand(len(x), 1, d), patches], 1) + e.position_embedding.weight
    h = F.layer_norm(h, (d,), vision.pre_layrnorm.weight, vision.pre_layrnorm.bias, eps)
    for layer in vision.encoder.layers:
        a, m = layer.self_attn, layer.mlp
        n = F.layer_norm(h, (d,), layer.layer_norm1.weight, layer.layer_norm1.bias, eps)
        q, k, v = (p(n).unflatten(-1, (H, -1)).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        z = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v  # bidirectional: no mask
        h = h + a.out_proj(z.transpose(1, 2).flatten(2))
        n = F.layer_norm(h, (d,), layer.layer_norm2.weight, layer.layer_norm2.bias, eps)
        u = m.fc1(n)
        h = h + m.fc2(u * torch.sigmoid(1.702 * u))
    return h, F.layer_norm(h[:, 0], (d,), vision.post_layernorm.weight, vision.post_layernorm.bias, eps)


def test_the_forward_is_the_one_the_derivation_reads():
    """The written-out forward is the model's: the last hidden state is the stream itself (post_layernorm is not
    applied to it), the pooler output is post_layernorm of the class token's row, image_embeds its projection."""
    model = build()
    assert model.config.hidden_act == "quick_gelu" and model.visual_projection.bias is None
    assert tower(model).embeddings.patch_embedding.bias is None and tower(model).embeddings.class_embedding.shape == (64,)
    with torch.no_grad():
        out = model.vision_model(pixel_values=PIXELS)
        stream, pooled = written_out(model.vision_model, PIXELS)
        assert torch.allclose(out.last_hidden_state, stream, rtol=0, atol=1e-12)
        assert torch.allclose(out.pooler_output, pooled, rtol=0, atol=1e-12)
        assert torch.allclose(embeds(model), pooled @ model.visual_projection.weight.T, rtol=0, atol=1e-12)
        assert float((out.last_hidden_state[:, 0] - out.pooler_output).abs().max()) > 0.1  # not normalised
        assert float(tower(model).pre_layrnorm.weight.std()) > 0.1  # pre_layrnorm's gain is not constant


@pytest.mark.parametrize("cls", [PROJECTED, "CLIPVisionModel"])
def test_map_groups_and_ports(cls):
    """21 sites (the stream; per layer 4 QK, 4 OV, the heads, the MLP); the stream's writers are the patch projection
    (no bias), the class embedding, the positions and each block's out_proj and fc2; its readers q/k/v, fc1 and the
    projection; pre_layrnorm's gain moves by the element's permutation (a norm gain), its bias by the whole element."""
    model = build(cls)
    smap = wb.symmetry_map(model, PIXELS)
    assert kinds(smap) == GROUPS and len(smap) == 1 + 2 * (2 * 4 + 2) and not smap.skipped
    resid = smap["resid"]
    writers = {"patch_embed.W", "cls_token.W", "pos_embed.W_pos"}
    assert writers | {f"blocks.{i}.{w}" for i in (0, 1) for w in ("attn.W_O", "attn.b_O", "mlp.W_out", "mlp.b_out")} \
        == {p.name for p in resid.writers}
    readers = {f"blocks.{i}.{m}" for i in (0, 1) for m in ("attn.W_Q", "attn.W_K", "attn.W_V", "mlp.W_in")}
    assert readers | ({"unembed.W_U"} if cls == PROJECTED else set()) == {p.name for p in resid.readers}
    assert {("embed_ln.w", "perm"), ("embed_ln.b", "pre"), ("ln_final.w", "perm"), ("ln_final.b", "pre")} <= set(resid.norms)
    assert smap["blocks.0.mlp"].activation == "quick_gelu" and smap["blocks.0.mlp"].n == 96
    assert any("pre_layrnorm" in note for note in resid.notes)


def test_projection_model_exact_draws_and_a_rotation_of_the_units_refused():
    """Random elements of every site exact in float64 against the image embeddings computed here; verify passes; a
    rotation of the quick_gelu units (x·σ(1.702x) is GELU-like: permutations only) refused and, forced, wrong."""
    model = build()
    smap, new, t, report = exact_everywhere(model, GROUPS, logp=embeds, inputs=PIXELS)
    assert moved_stream(model, new, t) <= TOL
    for seed in (2, 3):
        new, _ = wb.random_intertwiner(model, seed=seed, example=PIXELS)
        assert rel(embeds(new), embeds(model)) <= TOL
    refused_and_wrong(model, "blocks.0.mlp", "orthogonal", logp=embeds, inputs=PIXELS)
    refused_and_wrong(model, "blocks.1.mlp", "scaled_permutation", logp=embeds, inputs=PIXELS)


def test_base_model_moves_its_stream_and_its_pooler_output():
    """CLIPVisionModel: its last hidden state (the stream) and its pooler output (post_layernorm's, the class token's)
    move by the stream's element; verify compares the final norm's output (the pooler output, "pooled outputs") in the new
    basis and passes."""
    model = build("CLIPVisionModel")
    assert kinds(wb.symmetry_map(model, PIXELS)) == GROUPS
    new, t = wb.random_intertwiner(model, seed=1, example=PIXELS)
    assert moved_stream(model, new, t) <= TOL
    report = wb.verify(model, new, PIXELS, transform=t)
    assert report.passed and report.representations_moved and report.compared == "pooled outputs", report.summary()
    assert "pooled output difference in the new basis" in report.summary()
    bad = copy.deepcopy(new)
    with torch.no_grad():
        bad.post_layernorm.weight.copy_(model.post_layernorm.weight)  # the final norm's gain left in place
    assert moved_stream(model, bad, t) > FAIL and not wb.verify(model, bad, PIXELS, transform=t).passed


def test_pre_layrnorm_gain_moves_by_the_permutation():
    """pre_layrnorm's gain ↦ P·γ (the element's permutation), its bias by the whole element; the negatives: either put
    back unmoved after an exact transform changes the image embeddings."""
    model = build()
    new, t = wb.random_intertwiner(model, seed=1, example=PIXELS)
    e = t.elements["resid"]
    old_ln, new_ln = model.vision_model.pre_layrnorm, new.vision_model.pre_layrnorm
    assert torch.equal(new_ln.weight, e.perm_part().act(old_ln.weight, 0)) and not torch.equal(new_ln.weight, old_ln.weight)
    assert torch.allclose(new_ln.bias, e.act(old_ln.bias, 0), rtol=0, atol=1e-14)
    for leaf in ("weight", "bias"):
        bad = copy.deepcopy(new)
        with torch.no_grad():
            getattr(bad.vision_model.pre_layrnorm, leaf).copy_(getattr(old_ln, leaf))
        assert rel(embeds(bad), embeds(model)) > FAIL, leaf
        assert not wb.verify(model, bad, PIXELS, transform=t).passed


@pytest.mark.parametrize("what", ["embeddings.class_embedding", "embeddings.position_embedding.weight",
                                  "embeddings.patch_embedding.weight", "visual_projection.weight"])
def test_writers_and_the_projection_left_unmoved_change_the_function(what):
    """The negative of each writer of the stream before pre_layrnorm, and of the projection that reads post_layernorm's
    output: put back unmoved after an exact transform, the image embeddings change."""
    model = build()
    new, t = wb.random_intertwiner(model, seed=1, example=PIXELS)
    assert rel(embeds(new), embeds(model)) <= TOL
    name = what if what.startswith("visual") else f"vision_model.{what}"
    with torch.no_grad():
        new.get_parameter(name).copy_(model.get_parameter(name))
    assert rel(embeds(new), embeds(model)) > FAIL


def unit_gains(model, keep_pre=False):
    """Every LayerNorm gain 1 (biases kept random); pre_layrnorm's kept as built where ``keep_pre``."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "post_layernorm.weight")) or (
                    name.endswith("pre_layrnorm.weight") and not keep_pre):
                p.fill_(1.0)
    return model


def test_the_stream_takes_rotations_only_where_pre_layrnorm_gain_is_one():
    """Every gain 1: the stream takes rotations fixing 1 (n(e·R) = n(e)·R for R orthogonal with R·1 = 1, and the bias
    moves by R), exact. Every gain 1 but pre_layrnorm's: permutations only, a forced rotation fixing 1 is wrong."""
    model = unit_gains(build())
    assert wb.symmetry_map(model)["resid"].group.name == "orthogonal_ones"
    new, t = wb.random_intertwiner(model, seed=1, example=PIXELS)
    assert rel(embeds(new), embeds(model)) <= TOL and moved_stream(model, new, t) <= TOL
    kept = unit_gains(build(), keep_pre=True)
    assert wb.symmetry_map(kept)["resid"].group.name == "permutation"
    refused_and_wrong(kept, "resid", "orthogonal_ones", logp=embeds, inputs=PIXELS)


def test_fold_leaves_pre_layrnorm_and_keeps_its_group():
    """wb.fold_layernorm folds the block norms' gains into q/k/v and fc1, post_layernorm's into the projection, and
    cannot fold pre_layrnorm's (its output is the stream itself): the folded model computes the same, its stream keeps
    the permutations. With pre_layrnorm's gain 1, folding gives rotations fixing 1, exact against the original. The
    base model has no reader of post_layernorm's output and is refused by name."""
    model = build()
    folded = folded_exactly(model, "permutation", embeds)
    assert torch.equal(folded.vision_model.pre_layrnorm.weight, model.vision_model.pre_layrnorm.weight)
    assert all(bool((p == 1).all()) for n, p in folded.named_parameters() if n.endswith(("norm1.weight", "norm2.weight",
                                                                                          "post_layernorm.weight")))
    with torch.no_grad():
        model.vision_model.pre_layrnorm.weight.fill_(1.0)
    folded_exactly(model, "orthogonal_ones", embeds)
    with pytest.raises(wb.InvalidOptionError, match="base model"):
        wb.fold_layernorm(build("CLIPVisionModel"))


def test_a_global_sign_and_a_shear_along_one_over_gamma_pass_by_hand():
    """The exact group's parts not sampled (the map's note), applied by hand. A global sign s: the embeddings' writers
    and pre_layrnorm's bias by -1 (n(-e) = -n(e)), every block writer and LayerNorm bias by -1, the readers' columns by
    -1: the same image embeddings; the negative, pre_layrnorm's gain negated as well, flips the stream back and fails.
    A shear h ↦ h + (h·a)·1 with a = c/γ (γ: pre_layrnorm's gain): pre_layrnorm's bias β takes (β·a)·1, every block
    writer's output too; the readers are norms (blind to 1): the same embeddings, the stream moved by the shear. The
    negative: along a random a the same edits leave the embeddings alone (every reader is blind to 1) but the stream is
    not the sheared one: pre_layrnorm's parameters cannot add (n(e)·(γ⊙a))·1, so that shear is not an element of the
    stream's group (the base model's last hidden state would not be moved by it)."""
    model = build()
    flipped = copy.deepcopy(model)
    signed = ("class_embedding", "position_embedding.weight", "patch_embedding.weight", "pre_layrnorm.bias",
              "out_proj.weight", "out_proj.bias", "fc2.weight", "fc2.bias", "norm1.bias", "norm2.bias",
              "post_layernorm.bias", "q_proj.weight", "k_proj.weight", "v_proj.weight", "fc1.weight", "visual_projection.weight")
    with torch.no_grad():
        for name, p in flipped.named_parameters():
            if name.endswith(signed):
                p.neg_()
    assert rel(embeds(flipped), embeds(model)) <= TOL
    with torch.no_grad():
        flipped.vision_model.pre_layrnorm.weight.neg_()
    assert rel(embeds(flipped), embeds(model)) > FAIL

    writers = ("pre_layrnorm.bias", "out_proj.weight", "out_proj.bias", "fc2.weight", "fc2.bias")

    def stream(m):
        with torch.no_grad():
            return tower(m)(pixel_values=PIXELS).last_hidden_state

    old = stream(model)
    a = 0.7 / model.vision_model.pre_layrnorm.weight
    good = sheared(model, a, writers)
    assert rel(embeds(good), embeds(model)) <= TOL and rel(stream(good), old + (old @ a)[..., None]) <= TOL
    assert rel(stream(good), old) > FAIL  # the stream itself moved, by the shear
    a = torch.randn(64, generator=torch.Generator().manual_seed(5), dtype=torch.float64) / 8
    assert rel(stream(sheared(model, a, writers)), old + (old @ a)[..., None]) > FAIL  # pre_layrnorm's output is not sheared along a


@pytest.mark.parametrize("gains", ["random", "one"])
def test_position_interpolation_acts_on_positions_only(gains):
    """48-pixel images where the table holds 32-pixel positions (interpolate_pos_encoding=True): the patch positions are
    resampled bicubically per channel, in the model's dtype (float64 here, unlike DINOv2's float32), so a permutation
    and, with every gain 1, a rotation fixing 1 pass exactly."""
    model = build("CLIPVisionModel")
    if gains == "one":
        unit_gains(model)
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    new, t = wb.random_intertwiner(model, seed=2, example=PIXELS)
    assert t.groups["resid"] == ("permutation" if gains == "random" else "orthogonal_ones")
    assert moved_stream(model, new, t, pixels, interpolate_pos_encoding=True) <= TOL
    with torch.no_grad():
        assert model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state.shape[1] == 1 + 36


@pytest.mark.parametrize("cls", [PROJECTED, "CLIPVisionModel"])
def test_verify_passes_in_float32(cls):
    model = build(cls).float()
    new, t = wb.random_intertwiner(model, seed=1, example=PIXELS.float())
    report = wb.verify(model, new, PIXELS.float(), transform=t)
    assert report.passed and report.representations_moved, report.summary()


def tiny(name):
    small = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(small, image_size=16, patch_size=8)
    if name == "CLIPTextModel":
        return transformers.CLIPTextModel(transformers.CLIPTextConfig(**small))
    return getattr(transformers, name)(transformers.CLIPConfig(text_config=small, vision_config=vision))


@pytest.mark.parametrize("name,named", [("CLIPModel", "shared space"), ("CLIPForImageClassification", "patch tokens' mean"),
                                        ("CLIPTextModel", "text tower")])
def test_the_rest_of_clip_is_refused_by_name(name, named):
    """The full CLIPModel (two towers meeting in one shared space), CLIP's image classifier and its text tower: refused
    with the reason, nothing transformed."""
    refused_by_name(tiny(name), named)


@settings(max_examples=8, deadline=None)
@given(cls=st.sampled_from([PROJECTED, "CLIPVisionModel"]), heads=st.sampled_from([2, 4]), d_head=st.sampled_from([4, 8]),
       layers=st.integers(1, 2), patch=st.sampled_from([8, 16]), mlp=st.sampled_from([8, 24]),
       act=st.sampled_from(["quick_gelu", "gelu", "relu"]), proj=st.sampled_from([4, 16]), seed=st.integers(0, 2 ** 16))
def test_property_random_shapes_are_exact(cls, heads, d_head, layers, patch, mlp, act, proj, seed):
    """Random widths, heads, depths, patch sizes, MLP widths and activations, projection widths: a random element of
    every site is exact in float64 (the stream and pooler output compared through the stream's element where the class
    has no projection)."""
    kw = dict(hidden_size=heads * d_head, num_attention_heads=heads, num_hidden_layers=layers, patch_size=patch,
              intermediate_size=mlp, hidden_act=act, projection_dim=proj)
    model = build(cls, seed % 5, **kw)
    units = {"scaled_permutation"} if act == "relu" else {"permutation"}
    assert kinds(wb.symmetry_map(model))["blocks.mlp"] == units
    new, t = wb.random_intertwiner(model, seed=seed, example=PIXELS)
    assert moved_stream(model, new, t) <= TOL, kw
    if cls == PROJECTED:
        assert rel(embeds(new), embeds(model)) <= TOL, kw


def test_a_projection_left_unmoved_is_reported_by_its_embeddings():
    """The projection model is compared by its pooled output in the new basis and by its image embeddings as they are:
    with the projection's columns left unmoved the pooled outputs still agree, the embeddings do not (computed here),
    and the report names the embeddings (it called them log-probabilities before)."""
    model = build()
    new, t = wb.random_intertwiner(model, seed=1, example=PIXELS)
    assert wb.verify(model, new, PIXELS, transform=t).compared == "pooled outputs"
    bad = copy.deepcopy(new)
    with torch.no_grad():
        bad.visual_projection.weight.copy_(model.visual_projection.weight)
    assert rel(embeds(bad), embeds(model)) > FAIL and moved_stream(model, bad, t) <= TOL
    report = wb.verify(model, bad, PIXELS, transform=t)
    assert not report.passed and report.compared == "embeddings" and "embedding difference" in report.summary()
