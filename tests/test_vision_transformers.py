"""Vision transformers in the graph backend (docs/DERIVATIONS.md §2): the pre-LN residual stream (writers: patch
embedding, class token, position table, attention out-projections, MLP outputs; readers through LayerNorms)
and the attention heads (per-head GL on queries/keys and on values/out-projection, head permutations), on
torchvision's ``VisionTransformer`` (``nn.MultiheadAttention``) and timm's (fused ``qkv``); ConvNeXt's stages (§4:
depthwise convolutions and LayerNorm2d read the stream, layer scales take its permutation); MLP-Mixer's channel
stream and token-hidden spaces (§2, Mixer: the token MLP maps positions per channel); Swin's stages (§2, Swin:
window attention with a relative position bias per head, shifted windows, patch merging).

Every verdict is checked directly: a float64 copy is transformed and its outputs compared here, each output
unit against its own scale (``changed``), never by asking ``wb.verify``; negative controls just outside the
group (pushed as forced elements, or undone by hand) must move the outputs."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import workbench as wb
from workbench.groups import Dense, ScaledPermutation, get_group
from workbench.symmetry import Transform

F64 = torch.float64
SETTINGS = settings(max_examples=20, deadline=None)


def _import(name: str):
    pytest.importorskip("torchvision")
    from workbench.models import ensure_torchvision_importable, require

    ensure_torchvision_importable()  # the CPU torch lacks torchvision's C++ ops (see tests/conftest.py)
    return require(name)


def tv_vit(layers=2, heads=2, hidden=16, mlp=32):
    return _import("torchvision").models.VisionTransformer(image_size=32, patch_size=8, num_layers=layers,
                                                            num_heads=heads, hidden_dim=hidden, mlp_dim=mlp, num_classes=5)


def timm_vit(layers=2, heads=2, hidden=16, pool="token", **kw):
    _import("timm")
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=hidden, depth=layers, num_heads=heads, num_classes=5,
                             global_pool=pool, **kw)


@pytest.fixture(autouse=True)
def one_thread():
    """Small float64 convolutions on two threads of a busy 2-core machine wait at barriers (see
    tests/test_vision_constructs.py)."""
    from workbench._threads import threads

    with threads(1):
        yield


MODELS = {"torchvision": tv_vit, "timm": timm_vit, "timm_avg": lambda: timm_vit(pool="avg")}


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random in float64 (norm gains around 1, class token, position table and head too): a
    fresh model's zeros and ones hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = name.endswith("weight") and p.ndim == 1
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 0.5) + (1.0 if gain else 0.0))
    return model.eval().double()


def folded(model: nn.Module) -> nn.Module:
    """The same architecture with every LayerNorm's gain 1 (what folding the gains into the readers leaves)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
    return model


def image(n=3, seed=1):
    return torch.randn(n, 3, 32, 32, dtype=F64, generator=torch.Generator().manual_seed(seed))


def changed(model, new, x) -> float:
    with torch.no_grad():
        a, b = model.eval()(x), new.eval()(x)
    return ((a - b).abs() / a.abs().amax(0).clamp_min(1e-300)).max().item()


def stream(smap):
    (site,) = [s for s in smap if any("residual stream" in n for n in s.notes)]
    return site


def force(model, site, element, x):
    return wb.apply_transform(model, Transform({site: element}, {site: "forced"}, [site]), example=x[:1])


def check_exact(model, x, seed=0):
    """A random intertwiner preserves the float64 function to 1e-10 (checked here); verify passes in float64
    and in float32."""
    new, t = wb.random_intertwiner(model, seed=seed, example=x)
    assert changed(model, new, x) < 1e-10
    assert wb.verify(model, new, x, transform=t).verdict == "PASS"
    m32 = model.float()
    try:
        new32, t32 = wb.random_intertwiner(m32, seed=seed, example=x.float())
        report = wb.verify(m32, new32, x.float(), transform=t32)
        assert report.verdict == "PASS", report.summary()
    finally:
        model.double()
    return new, t


# ------------------------------------------------------------------ the map
@pytest.mark.parametrize("name", list(MODELS))
def test_the_stream_and_the_heads_are_sites_with_the_derived_groups(name):
    model = randomised(MODELS[name]())
    smap = wb.symmetry_map(model, image(1))
    s = stream(smap)
    # gains kept: s·P (γ ↦ P·γ, β ↦ s·P·β); the larger exact group (the shear) is stated in the notes
    assert s.group.name == "permutation_with_sign" and s.n == 16
    assert any("s·R·(I + 1·aᵀ)" in n and "shear" in n for n in s.notes)
    writers, readers = {p.name for p in s.writers}, {p.name for p in s.readers}
    if name == "torchvision":
        tables, embed = {"class_token", "encoder.pos_embedding"}, "conv_proj"
        attn = [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
        out, qkv, fc = "out_proj", "in_proj_weight", ("mlp.0", "mlp.3")
        blocks = [f"encoder.layers.encoder_layer_{i}" for i in range(2)]
        norms = [f"{b}.{ln}" for b in blocks for ln in ("ln_1", "ln_2")] + ["encoder.ln"]
        head = "heads.head"
    else:
        tables, embed = {"cls_token", "pos_embed"}, "patch_embed.proj"
        attn = [f"blocks.{i}.attn" for i in range(2)]
        out, qkv, fc = "proj", "qkv.weight", ("mlp.fc1", "mlp.fc2")
        blocks = [f"blocks.{i}" for i in range(2)]
        norms = [f"{b}.{ln}" for b in blocks for ln in ("norm1", "norm2")] + ["fc_norm" if name == "timm_avg" else "norm"]
        head = "head"
    assert tables | {embed} <= writers
    assert {f"{a}.{out}.weight" for a in attn} | {f"{a}.{out}.bias" for a in attn} <= writers
    assert {f"{b}.{fc[1]}" for b in blocks} <= writers
    assert {f"{a}.{qkv}" for a in attn} | {f"{b}.{fc[0]}" for b in blocks} | {head} <= readers
    gains = {p.name: p.level for p in s.writers if p.name.endswith((".weight", ".bias")) and p.name.rpartition(".")[0] in norms}
    assert gains == {**{f"{n}.weight": "perm" for n in norms}, **{f"{n}.bias": "pre" for n in norms}}
    # the patch embedding's output is channels-first ([B, C, h, w]); the blocks' norms see [B, T, C]
    assert {o.axis for o in s.observed if o.name == embed} == {1}
    assert {o.axis for o in s.observed if o.name in norms[:-1]} == {-1} and len(s.observed) > len(norms)
    for a in attn:
        for h in range(2):
            assert smap[f"{a}.qk.{h}"].group.name == "gl" and smap[f"{a}.qk.{h}"].n == 8
            assert smap[f"{a}.ov.{h}"].group.name == "gl" and smap[f"{a}.ov.{h}"].n == 8
        heads = smap[f"{a}.heads"]
        assert heads.group.name == "permutation" and heads.n == 2
        # queries of head 1 are rows 8..15 of the packed [q; k; v] projection, its keys 24..31, its values 40..47
        assert {p.name for p in smap[f"{a}.qk.1"].writers} >= {f"{a}.{qkv}[8:16]"}
        assert {p.name for p in smap[f"{a}.qk.1"].readers} >= {f"{a}.{qkv}[24:32]"}
        assert {p.name for p in smap[f"{a}.ov.1"].readers} == {f"{a}.{out}.weight[8:16]"}
    assert [r for _, r in smap.skipped] == ["the model's output"]


@pytest.mark.parametrize("name", list(MODELS))
def test_random_intertwiners_preserve_the_function(name):
    model = randomised(MODELS[name]())
    x = image()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new, t = check_exact(model, x)  # (float64, then a float32 copy of the same model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is never moved
    s = stream(wb.symmetry_map(model, x[:1]))
    assert not t.elements[s.name].is_identity()
    # everything the stream names moved, the attention weights too
    assert not torch.equal(dict(new.named_parameters())[s.writers[0].name + ".weight"],
                           dict(model.named_parameters())[s.writers[0].name + ".weight"])


@pytest.mark.parametrize("name", list(MODELS))
def test_folded_gains_take_rotations_fixing_the_ones_vector_and_nothing_more(name):
    model = folded(randomised(MODELS[name]()))
    x = image()
    s = stream(wb.symmetry_map(model, x[:1]))
    assert s.group.name == "orthogonal_ones_with_sign"
    check_exact(model, x, seed=3)
    # negative control: a Haar rotation (it moves 1) changes the outputs; with gains kept, even a rotation fixing 1 does
    q = torch.linalg.qr(torch.randn(16, 16, dtype=F64, generator=torch.Generator().manual_seed(5)))[0]
    assert changed(model, force(model, s.name, Dense(q), x), x) > 1e-3
    gained = randomised(MODELS[name]())
    fixing = s.group.sample(seed=1)
    assert torch.allclose(fixing.matrix() @ torch.ones(16, dtype=F64), torch.ones(16, dtype=F64))
    assert changed(gained, force(gained, stream(wb.symmetry_map(gained, x[:1])).name, fixing, x), x) > 1e-3


@pytest.mark.parametrize("name", ["torchvision", "timm"])
def test_negative_controls_outside_the_groups_change_the_function(name):
    model = randomised(MODELS[name]())
    x = image()
    smap = wb.symmetry_map(model, x[:1])
    s = stream(smap)
    # a positive scaling of the stream: LayerNorm takes it out (to its ε) but the readers divide by it
    scale = torch.linspace(0.5, 2.0, 16, dtype=F64)
    assert changed(model, force(model, s.name, ScaledPermutation(torch.arange(16), scale), x), x) > 1e-3
    # a rotation at an MLP's GELU site
    mlp = next(site for site in smap if site.activation == "GELU")
    q = torch.linalg.qr(torch.randn(mlp.n, mlp.n, dtype=F64, generator=torch.Generator().manual_seed(2)))[0]
    assert changed(model, force(model, mlp.name, Dense(q), x), x) > 1e-3
    # a query/key map whose keys are not moved by A⁻ᵀ: undo the keys' move by hand
    a = next(site.name for site in smap if ".qk." in site.name)
    new, t = wb.random_intertwiner(model, seed=4, sites=[a], example=x)
    assert changed(model, new, x) < 1e-10
    key = next(p for p in smap[a].readers if "bias" not in p.name)
    param, rows = key.name.split("[")
    start, stop = map(int, rows.rstrip("]").split(":"))
    with torch.no_grad():
        dict(new.named_parameters())[param][start:stop] = dict(model.named_parameters())[param][start:stop]
    assert changed(model, new, x) > 1e-3
    # a head permutation applied to the queries only: undo it on the keys
    heads = next(site.name for site in smap if site.name.endswith(".heads"))
    perm = ScaledPermutation(torch.tensor([1, 0]))
    new = force(model, heads, perm, x)
    assert changed(model, new, x) < 1e-10  # (a permutation is in the group: forced only in name)
    param = next(p.name for p in smap[heads].writers).split("[")[0]
    with torch.no_grad():
        dict(new.named_parameters())[param][16:32] = dict(model.named_parameters())[param][16:32]
    assert changed(model, new, x) > 1e-3


def test_attention_the_rules_do_not_know_freezes_with_the_reason():
    model = randomised(timm_vit(qk_norm=True))
    smap = wb.symmetry_map(model, image(1))
    reasons = " ".join(r for _, r in smap.skipped)
    assert "q_norm (LayerNorm) is not derived here" in reasons
    assert not any(".qk." in s.name for s in smap) and all("LayerNorm" not in " ".join(s.notes) for s in smap)
    new, t = wb.random_intertwiner(model, seed=0, example=image())
    assert changed(model, new, image()) < 1e-10

    class CrossAttention(nn.Module):  # keys and values from another tensor than the queries: not self-attention
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(4, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            q, kv = self.a(x), self.b(x)
            return self.out(self.attn(q, kv, kv, need_weights=False)[0])

    model = CrossAttention().double().eval()
    x = torch.randn(2, 5, 4, dtype=F64)
    smap = wb.symmetry_map(model, x)
    assert "not self-attention" in " ".join(r for _, r in smap.skipped) and len(smap) == 0


# ------------------------------------------------------------------ over sizes
def random_vit(kind: str, heads: int, width: int, layers: int, seed: int) -> nn.Module:
    """A randomised ViT of ``kind`` ("torchvision", "timm", "timm_avg"), ``heads`` heads of 4·``width`` channels."""
    hidden = 4 * heads * width
    if kind == "torchvision":
        model = tv_vit(layers=layers, heads=heads, hidden=hidden, mlp=2 * hidden)
    else:
        model = timm_vit(layers=layers, heads=heads, hidden=hidden, pool="avg" if kind == "timm_avg" else "token")
    return randomised(model, seed)


@SETTINGS
@given(kind=st.sampled_from(["torchvision", "timm", "timm_avg"]), heads=st.sampled_from([1, 2, 4]),
       width=st.sampled_from([1, 2]), layers=st.integers(1, 2), fold=st.booleans(), seed=st.integers(0, 100))
def test_random_vision_transformers_keep_their_function(kind, heads, width, layers, fold, seed):
    model = random_vit(kind, heads, width, layers, seed)
    if fold:
        model = folded(model)
    x = image(2, seed)
    smap = wb.symmetry_map(model, x[:1])
    assert stream(smap).group.name == ("orthogonal_ones_with_sign" if fold else "permutation_with_sign")
    assert len(smap) == 1 + layers * (1 + 2 * heads + 1)  # stream; per layer: MLP, qk and ov per head, heads
    new, t = wb.random_intertwiner(model, seed=seed, example=x)
    assert changed(model, new, x) < 1e-10
    assert wb.verify(model, new, x, transform=t).verdict == "PASS"


# ------------------------------------------------------------------ ConvNeXt (docs/DERIVATIONS.md §4)
def convnext(dims=(16, 32), layers=(2, 1)):
    cn = _import("torchvision").models.convnext
    stages = [cn.CNBlockConfig(d, dims[i + 1] if i + 1 < len(dims) else None, n) for i, (d, n) in enumerate(zip(dims, layers))]
    return cn.ConvNeXt(stages, num_classes=5)


def test_convnext_stages_are_streams_of_permutations():
    model = randomised(convnext())
    x = image()
    smap = wb.symmetry_map(model, x[:1])
    streams = [s for s in smap if any("residual stream" in n for n in s.notes)]
    assert [(s.name, s.n, s.group.name) for s in streams] == [("features.0.0", 16, "permutation_with_sign"),
                                                               ("features.2.1", 32, "permutation_with_sign")]
    first = streams[0]
    assert any("s·P per stage" in n for n in first.notes)
    writers = {p.name: p.level for p in first.writers}
    # the stem conv and its LayerNorm2d (gain by P, bias by the element), each block's fc2 and its layer scale
    assert writers["features.0.0"] == "pre" and writers["features.0.1.weight"] == "perm"
    assert writers["features.0.1.bias"] == "pre" and writers["features.2.0.weight"] == "perm"  # the downsampling norm
    assert {f"features.1.{i}.block.5" for i in range(2)} <= set(writers)
    assert {writers[f"features.1.{i}.layer_scale"] for i in range(2)} == {"perm"}
    # the depthwise convolutions read and write the stream channel by channel (couplers), the downsampling conv reads it
    assert {n for n, mode in first.norms if mode == "coupler"} == {"features.1.0.block.0", "features.1.1.block.0"}
    assert "features.2.1" in {p.name for p in first.readers}
    assert {s.name for s in smap if s.activation == "GELU"} == {"features.1.0.block.4", "features.1.1.block.4",
                                                                "features.3.0.block.4"}
    check_exact(model, x)
    # negative control: a non-uniform positive scaling of a stage's stream
    scale = torch.linspace(0.5, 2.0, 16, dtype=F64)
    assert changed(model, force(model, first.name, ScaledPermutation(torch.arange(16), scale), x), x) > 1e-3


@SETTINGS
@given(dims=st.sampled_from([(8,), (8, 16), (16, 8)]), layers=st.integers(1, 2), seed=st.integers(0, 100))
def test_random_convnexts_keep_their_function(dims, layers, seed):
    if len(dims) * layers < 2:  # torchvision's stochastic-depth schedule divides by (blocks − 1)
        layers = 2
    model = randomised(convnext(dims, (layers,) * len(dims)), seed)
    x = image(2, seed)
    smap = wb.symmetry_map(model, x[:1])
    assert [s.group.name for s in smap if s.activation == "none"] == ["permutation_with_sign"] * len(dims)
    assert len(smap) == len(dims) * (1 + layers) and [r for _, r in smap.skipped] == ["the model's output"]
    new, t = wb.random_intertwiner(model, seed=seed, example=x)
    assert changed(model, new, x) < 1e-10
    assert wb.verify(model, new, x, transform=t).verdict == "PASS"


# ------------------------------------------------------------------ MLP-Mixer (docs/DERIVATIONS.md §2, Mixer)
def mixer(blocks=2, dim=16, patch=8, ratio=(0.5, 2.0)):
    _import("timm")
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(num_classes=5, img_size=32, patch_size=patch, num_blocks=blocks, embed_dim=dim, mlp_ratio=ratio)


def test_mixer_channel_stream_takes_permutations_and_the_token_mlp_its_own_site():
    model = randomised(mixer())
    x = image()
    smap = wb.symmetry_map(model, x[:1])
    s = stream(smap)
    assert (s.name, s.n, s.group.name) == ("stem.proj", 16, "permutation")
    assert any("s·P·(I + 1·aᵀ)" in n and "no rotation" in n for n in s.notes)
    # the token MLP maps positions: its Linears neither write nor read the stream, its LayerNorm does
    names = {p.name for p in s.writers} | {p.name for p in s.readers}
    assert {"blocks.0.norm1.weight", "blocks.0.mlp_channels.fc1", "blocks.0.mlp_channels.fc2", "head"} <= names
    assert not any("mlp_tokens" in n for n in names)
    token = smap["blocks.0.mlp_tokens.fc1"]  # the token-hidden space: 16 tokens → 8, GELU → P
    assert (token.n, token.group.name, [p.name for p in token.readers]) == (8, "permutation", ["blocks.0.mlp_tokens.fc2"])
    assert [r for _, r in smap.skipped][-1] == "the model's output"
    check_exact(model, x)
    # negative controls: even with gains 1 no rotation fixing 1 passes (the token MLP's GELU sees the channels)
    flat = folded(randomised(mixer()))
    s = stream(wb.symmetry_map(flat, x[:1]))
    assert s.group.name == "permutation"
    rotation = get_group("orthogonal_ones", 16).sample(seed=3)
    assert changed(flat, force(flat, s.name, rotation, x), x) > 1e-3
    # a positive scaling of the token-hidden space
    scale = ScaledPermutation(torch.arange(8), torch.linspace(0.5, 2.0, 8, dtype=F64))
    assert changed(model, force(model, "blocks.0.mlp_tokens.fc1", scale, x), x) > 1e-3


@SETTINGS
@given(blocks=st.integers(1, 2), dim=st.sampled_from([4, 8, 12]), patch=st.sampled_from([8, 16]),
       ratio=st.sampled_from([(0.5, 2.0), (1.0, 1.0)]), seed=st.integers(0, 100))
def test_random_mixers_keep_their_function(blocks, dim, patch, ratio, seed):
    model = randomised(mixer(blocks, dim, patch, ratio), seed)
    x = image(2, seed)
    smap = wb.symmetry_map(model, x[:1])
    assert stream(smap).group.name == "permutation" and len(smap) == 1 + 2 * blocks
    new, t = wb.random_intertwiner(model, seed=seed, example=x)
    assert changed(model, new, x) < 1e-10
    assert wb.verify(model, new, x, transform=t).verdict == "PASS"


# ------------------------------------------------------------------ Swin (docs/DERIVATIONS.md §2, Swin)
def swin(depths=(2, 2), heads=(2, 2), dim=16):
    return _import("torchvision").models.SwinTransformer(patch_size=[4, 4], embed_dim=dim, depths=list(depths),
                                                         num_heads=list(heads), window_size=[4, 4], num_classes=5)


def test_swin_stages_patch_merging_and_window_attention():
    model = randomised(swin())
    x = image()  # 8×8 tokens in windows of 4×4: the second block of the first stage shifts its windows
    smap = wb.symmetry_map(model, x[:1])
    streams = [s for s in smap if any("residual stream" in n for n in s.notes)]
    assert [(s.name, s.n, s.group.name) for s in streams] == [("features.0.0", 16, "permutation_with_sign"),
                                                               ("features.2", 32, "permutation_with_sign")]
    assert any("without the shear" in n for n in streams[0].notes)  # read by the patch merging
    first = {p.name: (p.level, p.block, p.axis) for p in streams[0].writers + streams[0].readers}
    # the merge norm's gain and the reduction's columns see the stage's element on each quarter of the 4C vector
    assert first["features.2.norm.weight"] == ("perm", 4, 0) and first["features.2.reduction.weight"] == ("pre", 4, 1)
    assert {p.name for p in streams[1].writers} >= {"features.2.reduction.weight", "features.3.0.attn.proj.weight"}
    heads = smap["features.1.1.attn.heads"]  # the relative position bias moves with its head
    assert "features.1.1.attn.relative_position_bias_table" in {p.name for p in heads.writers}
    assert smap["features.1.1.attn.qk.0"].group.name == "gl" and smap["features.1.1.attn.ov.1"].n == 8
    assert [r for _, r in smap.skipped] == ["the model's output"]
    new, t = check_exact(model, x)
    table = "features.1.1.attn.relative_position_bias_table"
    # negative controls: the head permutation without its bias table; a Haar rotation of a folded stage
    perm = ScaledPermutation(torch.tensor([1, 0]))
    moved = force(model, "features.1.1.attn.heads", perm, x)
    assert changed(model, moved, x) < 1e-10
    with torch.no_grad():
        dict(moved.named_parameters())[table].copy_(dict(model.named_parameters())[table])
    assert changed(model, moved, x) > 1e-3
    flat = folded(randomised(swin()))
    s = [s for s in wb.symmetry_map(flat, x[:1]) if any("residual stream" in n for n in s.notes)][0]
    assert s.group.name == "orthogonal_ones_with_sign"
    check_exact(flat, x, seed=5)
    q = torch.linalg.qr(torch.randn(16, 16, dtype=F64, generator=torch.Generator().manual_seed(6)))[0]
    assert changed(flat, force(flat, s.name, Dense(q), x), x) > 1e-3


@SETTINGS
@given(heads=st.sampled_from([1, 2]), depth=st.integers(1, 2), fold=st.booleans(), seed=st.integers(0, 100))
def test_random_swins_keep_their_function(heads, depth, fold, seed):
    model = randomised(swin((depth, depth), (heads, 2 * heads), 8 * heads), seed)
    if fold:
        model = folded(model)
    x = image(2, seed)
    smap = wb.symmetry_map(model, x[:1])
    groups = [s.group.name for s in smap if any("residual stream" in n for n in s.notes)]
    assert groups == ["orthogonal_ones_with_sign" if fold else "permutation_with_sign"] * 2
    new, t = wb.random_intertwiner(model, seed=seed, example=x)
    assert changed(model, new, x) < 1e-10
    assert wb.verify(model, new, x, transform=t).verdict == "PASS"


def test_a_layernorm_over_more_than_the_channels_freezes():
    class Flat(nn.Module):  # the LayerNorm sees channels × positions after the flatten: not a channel-wise reader
        def __init__(self):
            super().__init__()
            self.c, self.ln, self.o = nn.Conv2d(2, 3, 1), nn.LayerNorm(12), nn.Linear(12, 2)

        def forward(self, x):
            return self.o(self.ln(torch.flatten(self.c(x), 1)))

    model = randomised(Flat())
    x = torch.randn(3, 2, 2, 2, dtype=F64)
    smap = wb.symmetry_map(model, x)
    assert len(smap) == 0 and "does not normalise exactly the channel axis" in dict(smap.skipped)["c"]
    new, _ = wb.random_intertwiner(model, example=x)
    assert changed(model, new, x) == 0


def test_a_map_is_not_reused_after_the_gains_change():
    model = folded(randomised(tv_vit()))
    x = image()
    assert stream(wb.symmetry_map(model, x[:1])).group.name == "orthogonal_ones_with_sign"
    with torch.no_grad():  # the same tensors, new values: the memoised map must not be served
        model.encoder.ln.weight.mul_(1.5)
    assert stream(wb.symmetry_map(model, x[:1])).group.name == "permutation_with_sign"
    new, _ = wb.random_intertwiner(model, seed=1, example=x)
    assert changed(model, new, x) < 1e-10


@pytest.mark.parametrize("name", ["torchvision", "timm", "convnext", "swin", "mixer"])
def test_the_global_sign_passes_layernorm_streams_but_not_mixers(name):
    """−I on a stream: LayerNorm's bias takes the sign (its gain the permutation part), a depthwise conv's kernel
    cancels it; Mixer's token MLP applies GELU across the channels, which no sign passes (DERIVATIONS §2)."""
    build = {"convnext": lambda: convnext(), "swin": lambda: swin(), "mixer": lambda: mixer(), **MODELS}[name]
    model = randomised(build())
    x = image()
    smap = wb.symmetry_map(model, x[:1])
    for s in [s for s in smap if any("residual stream" in n for n in s.notes)]:
        minus = ScaledPermutation(torch.arange(s.n), torch.full((s.n,), -1.0, dtype=F64))
        moved = changed(model, force(model, s.name, minus, x), x)
        if name == "mixer":
            assert s.group.name == "permutation" and moved > 1e-3
        else:
            assert s.group.name == "permutation_with_sign" and moved < 1e-10
            signs = {bool((s.group.sample(seed=k).scale is not None)) for k in range(16)}
            assert signs == {True, False}  # both signs are drawn
