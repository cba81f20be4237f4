"""ViT (Hugging Face ``ViTForImageClassification`` and ``ViTModel``): a pre-LN encoder over patches — a Conv2d patch
projection, a class token and learned position embeddings write the stream; bidirectional attention with q/k/v/o
biases and no rotary; a GELU MLP; the classifier (or ViTModel's pooler, dense then tanh) reads the class token after
the final LayerNorm. docs/DERIVATIONS.md §10, ViT.

The forward is written out here from the modules' parameters (which axis of each writer and reader is the stream's),
then the map, float64 draws compared directly (never through verify), verify, a negative control, the fold, a
TransformerLens 4 bridge, and the variants refused by name.
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import workbench as wb
from test_hf_families import TOL, exact_everywhere, folded_exactly, kinds, random_model, refused_and_wrong, rel

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
             patch_size=8, num_labels=10)
PIXELS = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
# The derived groups (docs/DERIVATIONS.md §10, ViT), LayerNorm gains kept as built (random).
GROUPS = {"resid": {"permutation"}, "blocks.attn.qk": {"gl"}, "blocks.attn.ov": {"gl"},
          "blocks.attn.heads": {"permutation"}, "blocks.mlp": {"permutation"}}


def build(cls="ViTForImageClassification", seed=0, **kw):
    """A tiny float64 ViT, every parameter random (LayerNorm gains 1 + N(0, 0.4²), biases, the class token and the
    position embeddings too)."""
    return random_model(cls, "ViTConfig", {**SHAPE, **kw}, seed, embedding=lambda name: "embeddings." in name)


def logp(model):
    with torch.no_grad():
        return model(PIXELS).logits.double().log_softmax(-1) if wb.models.model_kind(model).value == "hf_bridge" \
            else model(pixel_values=PIXELS).logits.double().log_softmax(-1)


def written_out(vit, x):
    """A ViTModel's last hidden state computed from its parameters: each writer's stream axis as the derivation reads
    it (the Conv2d's output channel, the class token's and positions' last axis), pre-LN blocks, GELU."""
    e, d = vit.embeddings, vit.config.hidden_size
    patches = F.conv2d(x, e.patch_embeddings.projection.weight, e.patch_embeddings.projection.bias, stride=8)
    h = torch.cat([e.cls_token.expand(len(x), 1, d), patches.flatten(2).transpose(1, 2)], 1) + e.position_embeddings
    H = vit.config.num_attention_heads
    for layer in vit.layers:
        a, n = layer.attention, F.layer_norm(h, (d,), layer.layernorm_before.weight, layer.layernorm_before.bias, 1e-12)
        q, k, v = (p(n).unflatten(-1, (H, -1)).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        z = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v  # bidirectional: no mask
        h = h + a.o_proj(z.transpose(1, 2).flatten(2))
        n = F.layer_norm(h, (d,), layer.layernorm_after.weight, layer.layernorm_after.bias, 1e-12)
        h = h + layer.mlp.fc2(F.gelu(layer.mlp.fc1(n)))
    return F.layer_norm(h, (d,), vit.layernorm.weight, vit.layernorm.bias, 1e-12)


def test_the_forward_is_the_one_the_derivation_reads():
    model = build()
    with torch.no_grad():
        stream = written_out(model.vit, PIXELS)
        assert torch.allclose(model(pixel_values=PIXELS).logits, model.classifier(stream[:, 0]), rtol=0, atol=1e-12)
        base = build("ViTModel")
        out = base(pixel_values=PIXELS)
        assert torch.allclose(out.last_hidden_state, written_out(base, PIXELS), rtol=0, atol=1e-12)
        assert torch.allclose(out.pooler_output, torch.tanh(base.pooler.dense(out.last_hidden_state[:, 0])), atol=1e-12)


def test_classifier_map_groups_exact_draw_and_negative_control():
    model = build()
    smap, *_ = exact_everywhere(model, GROUPS, logp=logp, inputs=PIXELS)
    assert len(smap) == 1 + 2 * (2 * 4 + 2)  # the stream; per layer 4 QK, 4 OV, the heads, the MLP
    resid = smap["resid"]
    assert {"patch_embed.W", "patch_embed.b", "cls_token.W", "pos_embed.W_pos"} <= {p.name for p in resid.writers}
    assert "unembed.W_U" in {p.name for p in resid.readers}
    for seed in (2, 3):  # every draw, not one: checked here directly
        new, _ = wb.random_intertwiner(model, seed=seed, example=PIXELS)
        assert rel(logp(new), logp(model)) <= TOL
    refused_and_wrong(model, "blocks.0.mlp", "orthogonal", logp=logp, inputs=PIXELS)  # a rotation of GELU units


def test_base_model_moves_its_stream_and_keeps_its_pooler_output():
    """ViTModel's last hidden state moves by the stream's element (compared through it); its pooler reads the stream,
    so its tanh output is unchanged."""
    model = build("ViTModel")
    assert kinds(wb.symmetry_map(model, PIXELS)) == GROUPS
    new, t = wb.random_intertwiner(model, seed=1, example=PIXELS)
    with torch.no_grad():
        old, got = model(pixel_values=PIXELS), new(pixel_values=PIXELS)
    assert rel(got.last_hidden_state, t.elements["resid"].act(old.last_hidden_state, -1)) <= TOL
    assert rel(got.pooler_output, old.pooler_output) <= TOL
    assert float((got.last_hidden_state - old.last_hidden_state).abs().max()) > 0.1  # the basis did move
    report = wb.verify(model, new, PIXELS, transform=t)
    assert report.passed and report.representations_moved, report.summary()


def test_fold_gives_the_orthogonal_stream_group():
    model = build()
    folded_exactly(model, "orthogonal_ones", logp)


def test_relu_mlp_takes_scaled_permutations():
    """The MLP's group follows the model's activation (TransformerLens's adapter reads hidden_act from the config)."""
    model = build(hidden_act="relu", qkv_bias=False)
    assert kinds(wb.symmetry_map(model))["blocks.mlp"] == {"scaled_permutation"}
    new, _ = wb.random_intertwiner(model, seed=4)
    assert rel(logp(new), logp(model)) <= TOL


@pytest.mark.parametrize("cls", ["ViTForImageClassification", "ViTModel"])
def test_bridge_around_vit_is_exact(cls):
    """A TransformerLens 4 bridge boots offline around an in-memory ViT (no tokenizer): the raw model's map, a draw
    exact (the bridge's own output, computed here) and verified."""
    from transformer_lens.model_bridge import TransformerBridge

    raw = build(cls)
    raw.config.architectures = [cls]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TransformerBridge.boot_transformers("local/vit", hf_model=copy.deepcopy(raw), dtype=torch.float64).eval()
    smap = wb.symmetry_map(model, PIXELS)
    assert kinds(smap) == GROUPS and not smap.skipped
    new, t = wb.random_intertwiner(model, seed=2, example=PIXELS)
    assert wb.models.model_kind(new) == wb.models.ModelKind.HF_BRIDGE
    with torch.no_grad():
        old, got = model(PIXELS), new(PIXELS)
    if cls == "ViTModel":  # the bridge returns the last hidden state: compared through the stream's element
        old = t.elements["resid"].act(old, -1)
    assert rel(got, old) <= TOL
    report = wb.verify(model, new, PIXELS, transform=t)
    assert report.passed and len(report.checked) == len(smap), report.to_frame()


@pytest.mark.parametrize("make,named", [
    (lambda c: transformers.ViTModel(c, use_mask_token=True), "mask_token"),
    (lambda c: transformers.ViTModel(c, add_pooling_layer=False), "pooler.dense.weight"),
    (lambda c: transformers.ViTForImageClassification(transformers.ViTConfig(**{**SHAPE, "num_labels": 0})), "num_labels=0"),
])
def test_unsupported_variants_are_refused_by_name(make, named):
    """A mask token (ViTModel's use_mask_token: not in the configuration, so a transformed model would lack it), a
    pooler removed, an Identity classifier: refused, naming it; nothing is transformed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make(transformers.ViTConfig(**SHAPE)).double().eval()
    smap = wb.symmetry_map(model, PIXELS)
    assert len(smap) == 0 and named in smap.skipped[0][1], smap.skipped
    with pytest.raises(wb.UnsupportedModelError, match=named.replace(".", r"\.")):
        wb.random_intertwiner(model, example=PIXELS)


# ---------------------------------------------------------------------- DeiT: ViT's modules and a distillation token
def deit(cls="DeiTForImageClassification", seed=0, **kw):
    return random_model(cls, "DeiTConfig", {**SHAPE, **kw}, seed, embedding=lambda name: "embeddings." in name)


def test_deit_distillation_token_writes_the_stream_and_the_classifier_reads_the_class_token():
    """DeiT's embeddings put a distillation token after the class token (positions for both): a second writer of the
    stream along its last axis. DeiTForImageClassification reads only the class token after the final LayerNorm."""
    model = deit()
    e, d = model.deit.embeddings, SHAPE["hidden_size"]
    seen = {}
    hooks = [model.deit.layers[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0])),
             model.classifier.register_forward_hook(lambda m, a, o: seen.__setitem__("c", a[0]))]
    try:
        with torch.no_grad():
            model(pixel_values=PIXELS)
            stream = model.deit(pixel_values=PIXELS).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    patches = F.conv2d(PIXELS, e.patch_embeddings.projection.weight, e.patch_embeddings.projection.bias, stride=8)
    want = torch.cat([e.cls_token.expand(3, 1, d), e.distillation_token.expand(3, 1, d),
                      patches.flatten(2).transpose(1, 2)], 1) + e.position_embeddings
    assert torch.allclose(seen["h"], want, rtol=0, atol=1e-13)
    assert torch.equal(seen["c"], stream[:, 0])


@pytest.mark.parametrize("cls", ["DeiTForImageClassification", "DeiTModel"])
def test_deit_map_groups_and_exact_draws(cls):
    model = deit(cls)
    out = (lambda m: logp(m)) if cls != "DeiTModel" else None
    smap = wb.symmetry_map(model, PIXELS)
    assert kinds(smap) == GROUPS and not smap.skipped, smap.skipped
    assert {"dist_token.W", "cls_token.W", "patch_embed.W"} <= {p.name for p in smap["resid"].writers}
    for seed in (1, 2):
        new, t = wb.random_intertwiner(model, seed=seed, example=PIXELS)
        with torch.no_grad():
            old, got = model(pixel_values=PIXELS), new(pixel_values=PIXELS)
        if out is not None:
            assert rel(out(new), out(model)) <= TOL
        else:  # the last hidden state moves with the stream; the pooler reads it
            assert rel(got.last_hidden_state, t.elements["resid"].act(old.last_hidden_state, -1)) <= TOL
            assert rel(got.pooler_output, old.pooler_output) <= TOL
        assert wb.verify(model, new, PIXELS, transform=t).passed
    bad, bt = wb.random_intertwiner(model, seed=3, sites=["resid"], group="orthogonal", allow_non_symmetry=True,
                                    example=PIXELS)
    assert not wb.verify(model, bad, PIXELS, transform=bt).passed


def test_deit_distillation_token_left_unmoved_changes_the_function():
    """The negative of the writer: a transform whose distillation token is put back unmoved changes the logits."""
    model = deit()
    new, t = wb.random_intertwiner(model, seed=1, example=PIXELS)
    with torch.no_grad():
        new.deit.embeddings.distillation_token.copy_(model.deit.embeddings.distillation_token)
    assert rel(logp(new), logp(model)) > 1e-6


def test_deit_with_teacher_is_refused_by_name():
    """DeiTForImageClassificationWithTeacher averages two heads (the class token's and the distillation token's);
    TransformerLens's ViT adapter refuses it, and so does the map, naming the class."""
    model = deit("DeiTForImageClassificationWithTeacher")
    smap = wb.symmetry_map(model, PIXELS)
    assert len(smap) == 0 and "WithTeacher" in smap.skipped[0][1], smap.skipped
    with pytest.raises(wb.UnsupportedModelError, match="WithTeacher"):
        wb.random_intertwiner(model, example=PIXELS)


@settings(max_examples=8, deadline=None)
@given(cls=st.sampled_from(["ViTForImageClassification", "ViTModel", "DeiTForImageClassification"]),
       heads=st.sampled_from([2, 4]), d_head=st.sampled_from([4, 8]), layers=st.integers(1, 2),
       patch=st.sampled_from([8, 16]), act=st.sampled_from(["gelu", "relu", "gelu_new"]), seed=st.integers(0, 2 ** 16))
def test_property_random_shapes_are_exact(cls, heads, d_head, layers, patch, act, seed):
    """Random widths, heads, depths, patch sizes and activations of ViT and DeiT: a random element of every site is
    exact in float64 (the last hidden state compared through the stream's element where the class has no head)."""
    kw = dict(hidden_size=heads * d_head, num_attention_heads=heads, num_hidden_layers=layers, patch_size=patch,
              intermediate_size=3 * heads * d_head, hidden_act=act)
    model = deit(cls, seed % 5, **kw) if cls.startswith("DeiT") else build(cls, seed % 5, **kw)
    new, t = wb.random_intertwiner(model, seed=seed, example=PIXELS)
    if cls == "ViTModel":
        with torch.no_grad():
            old, got = model(pixel_values=PIXELS).last_hidden_state, new(pixel_values=PIXELS).last_hidden_state
        assert rel(got, t.elements["resid"].act(old, -1)) <= TOL, kw
    else:
        assert rel(logp(new), logp(model)) <= TOL, kw
