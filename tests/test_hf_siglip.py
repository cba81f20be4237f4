"""SigLIP's vision tower (Hugging Face ``SiglipVisionModel``, model_type ``siglip_vision_model``): a pre-LN ViT under
CLIP's block names without a class token, read through workbench's own adapter (TransformerLens 4.3 has none): a patch
Conv2d with bias and a position table write the stream, pre-LN blocks (q/k/v/out biases, gelu_pytorch_tanh MLPs),
``post_layernorm`` on every token (the last hidden state), and with ``vision_use_head`` an attention-pooling head: a
learned probe attending over post_layernorm's output through an ``nn.MultiheadAttention`` (fused in-projection), then
a LayerNorm and an MLP added residually; its first (only) row is the pooler output. docs/DERIVATIONS.md §10, SigLIP.

The forward is written out here from the modules' parameters, then the map, float64 draws compared directly (never
through verify: the last hidden state in the stream's new basis, the pooler output in the head residual's), verify,
negative controls (a stream rotation, a rotation of the head's residual or of its MLP units, each of the head's weights
put back without its partner), every gain 1, no head, position interpolation, float32, refusals, and property tests.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import workbench as wb
from test_hf_families import FAIL, TOL, kinds, random_model, refused_by_name, rel
# ViT's pixels and groups, which are SigLIP's tower's too (docs/DERIVATIONS.md §10, SigLIP), LayerNorm gains as built
from test_hf_vit import GROUPS, PIXELS

pytestmark = pytest.mark.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
# The head's groups (docs/DERIVATIONS.md §10, SigLIP), its LayerNorm gain as built
POOL = {"pool.probe": {"gl"}, "pool.attn.qk": {"gl"}, "pool.attn.ov": {"gl"}, "pool.attn.heads": {"permutation"},
        "pool.mlp": {"permutation"}, "pool.resid": {"permutation"}}


def build(seed=0, **kw):
    """A tiny float64 SiglipVisionModel, every parameter random (LayerNorm gains, the head's included, 1 + N(0, 0.4²);
    biases N(0, 0.3²); the patch projection, the positions and the probe N(0, 1))."""
    return random_model("SiglipVisionModel", "SiglipVisionConfig", {**SHAPE, **kw}, seed,
                        embedding=lambda name: "embeddings." in name or name.endswith("probe"))


def outputs(model, pixels=PIXELS, **kw):
    with torch.no_grad():
        return model(pixel_values=pixels, **kw)


def moved(model, new, t, pixels=PIXELS, **kw):
    """``new``'s last hidden state against ``model``'s moved by the stream's element, and its pooler output against
    ``model``'s moved by the head residual's (each identity where the transform leaves that site): the larger relative
    difference."""
    old, got = outputs(model, pixels, **kw), outputs(new, pixels, **kw)
    act = lambda site, h: t.elements[site].act(h, -1) if site in t.elements else h  # noqa: E731
    worst = rel(got.last_hidden_state, act("resid", old.last_hidden_state))
    if old.pooler_output is not None:
        worst = max(worst, rel(got.pooler_output, act("pool.resid", old.pooler_output)))
    return worst


def written_out(model, x):
    """A SiglipVisionModel's (last hidden state, pooler output) computed from its parameters: the patch Conv2d with its
    bias, the position table added (no class token), pre-LN blocks (scaled dot-product attention with biases, fc1 →
    tanh-approximated GELU → fc2), post_layernorm on every token; the head: one query p·W_q + b_q from the probe, keys
    and values from post_layernorm's output through the fused in-projection's k and v rows, per head softmax, out_proj,
    then a + fc2(gelu(fc1(LN(a)))), its one row."""
    e, c = model.embeddings, model.config
    d, H, eps = c.hidden_size, c.num_attention_heads, c.layer_norm_eps
    gelu = lambda u: F.gelu(u, approximate="tanh")  # noqa: E731  (gelu_pytorch_tanh)
    h = F.conv2d(x, e.patch_embedding.weight, e.patch_embedding.bias, stride=c.patch_size).flatten(2).transpose(1, 2)
    h = h + e.position_embedding.weight

    def attend(q, k, v):  # [batch, tokens, d] each -> [batch, queries, d]
        q, k, v = (t.unflatten(-1, (H, -1)).transpose(1, 2) for t in (q, k, v))
        z = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v  # bidirectional: no mask
        return z.transpose(1, 2).flatten(2)

    for layer in model.encoder.layers:
        a, m = layer.self_attn, layer.mlp
        n = F.layer_norm(h, (d,), layer.layer_norm1.weight, layer.layer_norm1.bias, eps)
        h = h + a.out_proj(attend(a.q_proj(n), a.k_proj(n), a.v_proj(n)))
        n = F.layer_norm(h, (d,), layer.layer_norm2.weight, layer.layer_norm2.bias, eps)
        h = h + m.fc2(gelu(m.fc1(n)))
    y = F.layer_norm(h, (d,), model.post_layernorm.weight, model.post_layernorm.bias, eps)
    if not model.config.vision_use_head:
        return y, None
    p = model.head
    (Wq, Wk, Wv), (bq, bk, bv) = p.attention.in_proj_weight.chunk(3), p.attention.in_proj_bias.chunk(3)
    a = p.attention.out_proj(attend(p.probe.expand(len(x), 1, d) @ Wq.T + bq, y @ Wk.T + bk, y @ Wv.T + bv))
    r = a + p.mlp.fc2(gelu(p.mlp.fc1(F.layer_norm(a, (d,), p.layernorm.weight, p.layernorm.bias, eps))))
    return y, r[:, 0]


@pytest.mark.parametrize("head", [True, False])
def test_the_forward_is_the_one_the_derivation_reads(head):
    """The written-out forward is the model's: the last hidden state is post_layernorm's output on every token (no
    class token: one row per patch), the pooler output the head's one row (None without the head)."""
    model = build(vision_use_head=head)
    assert model.config.hidden_act == "gelu_pytorch_tanh" and model.embeddings.patch_embedding.bias is not None
    out = outputs(model)
    with torch.no_grad():
        stream, pooled = written_out(model, PIXELS)
    assert out.last_hidden_state.shape == (3, 16, 64)
    assert torch.allclose(out.last_hidden_state, stream, rtol=0, atol=1e-12)
    if head:
        assert torch.allclose(out.pooler_output, pooled, rtol=0, atol=1e-12)
        assert float(model.head.layernorm.weight.std()) > 0.1  # the head's LayerNorm gain is not constant
    else:
        assert out.pooler_output is None and not hasattr(model, "head")


def test_map_groups_and_ports():
    """33 sites: the stream, per layer 4 QK, 4 OV, the heads and the MLP (ViT's), and the head's probe, 4 QK, 4 OV,
    heads, MLP and residual. The stream's writers are the patch projection and its bias, the positions and each
    block's out_proj and fc2; its readers q/k/v, fc1 and the head's key and value rows; post_layernorm's gain moves by
    the element's permutation, its bias by the whole element. The head residual's writers are out_proj and fc2, its
    reader fc1 (after its LayerNorm, whose gain and bias move with it)."""
    model = build()
    smap = wb.symmetry_map(model, PIXELS)
    assert kinds(smap) == {**GROUPS, **POOL} and len(smap) == 1 + 2 * (2 * 4 + 2) + 12 and not smap.skipped
    resid = smap["resid"]
    writers = {"patch_embed.W", "patch_embed.b", "pos_embed.W_pos"}
    assert writers | {f"blocks.{i}.{w}" for i in (0, 1) for w in ("attn.W_O", "attn.b_O", "mlp.W_out", "mlp.b_out")} \
        == {p.name for p in resid.writers}
    readers = {f"blocks.{i}.{m}" for i in (0, 1) for m in ("attn.W_Q", "attn.W_K", "attn.W_V", "mlp.W_in")}
    assert readers | {"pool.attn.W_K", "pool.attn.W_V"} == {p.name for p in resid.readers}
    assert set(resid.norms) == {("ln_final.w", "perm"), ("ln_final.b", "pre")} | {
        (f"blocks.{i}.ln{j}.{p}", "perm" if p == "w" else "pre") for i in (0, 1) for j in (1, 2) for p in "wb"}
    head = smap["pool.resid"]
    assert {p.name for p in head.writers} == {"pool.attn.W_O", "pool.attn.b_O", "pool.mlp.W_out", "pool.mlp.b_out"}
    assert {p.name for p in head.readers} == {"pool.mlp.W_in"} and head.norms == [("pool.ln.w", "perm"), ("pool.ln.b", "pre")]
    assert [p.name for p in smap["pool.probe"].writers] == ["pool.probe.w"]
    assert [p.name for p in smap["pool.probe"].readers] == ["pool.attn.W_Q"]
    assert smap["blocks.0.mlp"].activation == smap["pool.mlp"].activation == "gelu_pytorch_tanh"
    assert smap["pool.mlp"].n == smap["blocks.1.mlp"].n == 96


def test_random_elements_are_exact_and_verify_passes():
    """A random element of every site: the last hidden state in the stream's new basis and the pooler output in the
    head residual's, computed here, to 1e-10; the model untouched; verify passes with the representations moved. The
    head's spaces really moved (the probe by a dense map, the residual by a permutation that is not the stream's)."""
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for seed in (1, 2, 3):
        new, t = wb.random_intertwiner(model, seed=seed, example=PIXELS)
        assert moved(model, new, t) <= TOL, seed
        assert rel(outputs(new).pooler_output, outputs(model).pooler_output) > FAIL  # the pooled output moved
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    probe = t.elements["pool.probe"].matrix()
    assert not torch.allclose(probe @ probe.T, torch.eye(64, dtype=probe.dtype), atol=1e-3)  # GL, not a rotation
    assert not torch.equal(t.elements["pool.resid"].matrix(), t.elements["resid"].matrix())
    report = wb.verify(model, new, PIXELS, transform=t)
    assert report.passed and report.representations_moved and report.compared == "last hidden states", report.summary()


@pytest.mark.parametrize("what", ["probe", "attention.in_proj_weight", "attention.in_proj_bias", "attention.out_proj.weight",
                                  "attention.out_proj.bias", "layernorm.weight", "layernorm.bias", "mlp.fc1.weight",
                                  "mlp.fc2.weight"])
def test_a_head_weight_put_back_without_its_partner_changes_the_pooled_output(what):
    """Each of the head's weights put back unmoved after an exact transform (its partners moved): the pooled output in
    the new basis changes (computed here) while the last hidden state stays exact, and verify FAILs on the pooled
    outputs (the head's only comparison: no module output inside nn.MultiheadAttention is observed)."""
    model = build()
    new, t = wb.random_intertwiner(model, seed=1, example=PIXELS)
    name = f"head.{what}"
    with torch.no_grad():
        new.get_parameter(name).copy_(model.get_parameter(name))
    old, got = outputs(model), outputs(new)
    assert rel(got.last_hidden_state, t.elements["resid"].act(old.last_hidden_state, -1)) <= TOL
    assert rel(got.pooler_output, t.elements["pool.resid"].act(old.pooler_output, -1)) > FAIL
    report = wb.verify(model, new, PIXELS, transform=t)
    assert not report.passed and report.compared == "pooled outputs", report.summary()


@pytest.mark.parametrize("what", ["embeddings.patch_embedding.bias", "embeddings.position_embedding.weight",
                                  "post_layernorm.weight", "encoder.layers.1.self_attn.k_proj.weight"])
def test_a_tower_weight_put_back_changes_the_function(what):
    """The patch bias, the positions, post_layernorm's gain (moved by the permutation), a key projection (its query
    partner moved): put back unmoved, the outputs in the new basis change and verify FAILs."""
    model = build()
    new, t = wb.random_intertwiner(model, seed=1, example=PIXELS)
    with torch.no_grad():
        new.get_parameter(what).copy_(model.get_parameter(what))
    assert moved(model, new, t) > FAIL and not wb.verify(model, new, PIXELS, transform=t).passed


def refused_and_moved_wrong(model, site: str, group: str) -> None:
    """``group`` at ``site`` is refused as no symmetry; forced, the outputs in the new basis change (computed here) and
    verify fails."""
    with pytest.raises(ValueError, match="not a symmetry"):
        wb.random_intertwiner(model, sites=[site], group=group, example=PIXELS)
    bad, bt = wb.random_intertwiner(model, seed=3, sites=[site], group=group, allow_non_symmetry=True, example=PIXELS)
    assert bt.forced == [site] and moved(model, bad, bt) > FAIL, (site, group)
    assert not wb.verify(model, bad, PIXELS, transform=bt).passed


@pytest.mark.parametrize("site,group", [("resid", "orthogonal_ones"), ("pool.resid", "orthogonal_ones"),
                                        ("pool.resid", "signed_permutation"), ("pool.mlp", "orthogonal"),
                                        ("pool.mlp", "scaled_permutation"), ("blocks.0.mlp", "scaled_permutation")])
def test_one_step_outside_each_group_is_refused_and_wrong(site, group):
    """The next larger candidates fail: a rotation fixing 1 of the stream or of the head's residual where their
    LayerNorm gains are random; a sign on the head's residual (its LayerNorm subtracts the mean); a rotation or
    positive scalings of GELU units, the head's or a block's."""
    refused_and_moved_wrong(build(), site, group)


def unit_gains(model):
    """Every LayerNorm gain 1 (biases kept random): the blocks', post_layernorm's, the head's."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "post_layernorm.weight", "head.layernorm.weight")):
                p.fill_(1.0)
    return model


def test_every_gain_one_gives_rotations_fixing_one():
    """Every gain 1: the stream and the head's residual take rotations fixing 1 (n(R·x) = R·n(x) for R orthogonal with
    R·1 = 1, each bias moved by R), exact; with only the head's gain random, its residual keeps the permutations and a
    forced rotation there is wrong while the stream's rotation still holds."""
    model = unit_gains(build())
    smap = wb.symmetry_map(model)
    assert smap["resid"].group.name == smap["pool.resid"].group.name == "orthogonal_ones"
    new, t = wb.random_intertwiner(model, seed=1, example=PIXELS)
    assert moved(model, new, t) <= TOL
    with torch.no_grad():
        model.head.layernorm.weight.copy_(build().head.layernorm.weight)
    smap = wb.symmetry_map(model)
    assert (smap["resid"].group.name, smap["pool.resid"].group.name) == ("orthogonal_ones", "permutation")
    new, t = wb.random_intertwiner(model, seed=2, example=PIXELS)
    assert moved(model, new, t) <= TOL
    refused_and_moved_wrong(model, "pool.resid", "orthogonal_ones")


def test_without_the_head():
    """vision_use_head=False: the tower's 21 sites only, exact, verify passes on the last hidden states."""
    model = build(vision_use_head=False)
    smap = wb.symmetry_map(model, PIXELS)
    assert kinds(smap) == GROUPS and len(smap) == 21 and not smap.skipped
    new, t = wb.random_intertwiner(model, seed=1, example=PIXELS)
    assert moved(model, new, t) <= TOL
    report = wb.verify(model, new, PIXELS, transform=t)
    assert report.passed and report.compared == "last hidden states", report.summary()


@pytest.mark.parametrize("gains", ["random", "one"])
def test_position_interpolation_acts_on_positions_only(gains):
    """48-pixel images where the table holds 32-pixel positions (interpolate_pos_encoding=True): the table is
    resampled bicubically per channel in the model's dtype, so a permutation and, with every gain 1, a rotation fixing
    1 pass exactly, the pooled output too."""
    model = build()
    if gains == "one":
        unit_gains(model)
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    new, t = wb.random_intertwiner(model, seed=2, example=PIXELS)
    assert t.groups["resid"] == ("permutation" if gains == "random" else "orthogonal_ones")
    assert moved(model, new, t, pixels, interpolate_pos_encoding=True) <= TOL
    assert outputs(model, pixels, interpolate_pos_encoding=True).last_hidden_state.shape[1] == 36


def test_verify_passes_in_float32_and_fold_is_refused():
    """float32: verify passes. wb.fold_layernorm refuses the model by name: it is a base model, its last hidden state is
    post_layernorm's output (that gain has no reader to move into)."""
    model = build().float()
    new, t = wb.random_intertwiner(model, seed=1, example=PIXELS.float())
    report = wb.verify(model, new, PIXELS.float(), transform=t)
    assert report.passed and report.representations_moved, report.summary()
    with pytest.raises(wb.InvalidOptionError, match="base model"):
        wb.fold_layernorm(build())


def tiny(name):
    small = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    if name == "SiglipTextModel":
        return transformers.SiglipTextModel(transformers.SiglipTextConfig(**small))
    return getattr(transformers, name)(transformers.SiglipConfig(text_config=small,
                                                                vision_config=dict(small, image_size=16, patch_size=8)))


@pytest.mark.parametrize("name,named", [("SiglipModel", "shared space"), ("SiglipForImageClassification", "mean"),
                                        ("SiglipTextModel", "text tower")])
def test_the_rest_of_siglip_is_refused_by_name(name, named):
    """The full SiglipModel (two towers meeting in one shared space), SigLIP's image classifier (model_type siglip) and
    its text tower: refused with the reason, nothing transformed."""
    refused_by_name(tiny(name), named)


@settings(max_examples=8, deadline=None)
@given(head=st.booleans(), heads=st.sampled_from([2, 4]), d_head=st.sampled_from([4, 8]), layers=st.integers(1, 2),
       patch=st.sampled_from([8, 16]), mlp=st.sampled_from([8, 24]),
       act=st.sampled_from(["gelu_pytorch_tanh", "gelu", "relu"]), seed=st.integers(0, 2 ** 16))
def test_property_random_shapes_are_exact(head, heads, d_head, layers, patch, mlp, act, seed):
    """Random widths, heads, depths, patch sizes, MLP widths and activations, with and without the head: a random
    element of every site is exact in float64 (the last hidden state and pooled output compared in their new bases)."""
    kw = dict(hidden_size=heads * d_head, num_attention_heads=heads, num_hidden_layers=layers, patch_size=patch,
              intermediate_size=mlp, hidden_act=act, vision_use_head=head)
    model = build(seed % 5, **kw)
    units = {"scaled_permutation"} if act == "relu" else {"permutation"}
    got = kinds(wb.symmetry_map(model))
    assert got["blocks.mlp"] == units and got.get("pool.mlp") == (units if head else None)
    new, t = wb.random_intertwiner(model, seed=seed, example=PIXELS)
    assert moved(model, new, t) <= TOL, kw
