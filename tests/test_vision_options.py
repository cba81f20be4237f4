"""Real vision architectures built with the constructor options researchers pass (the sweeps build every model with
its defaults only): timm's ViT pooling, register tokens, layer scale, parallel and post-norm blocks, gated MLPs and
other activations; timm's ResNet activations, attention modules, stems and poolings; ConvNeXt without layer scale;
torchvision's dilated ResNet, GroupNorm ResNet, ViT with a representation layer. And concatenation sites (SqueezeNet's
Fire outputs) chosen alone, whose element is their pieces'.

Every verdict is checked directly in float64 (both models run here, each output against its own scale), never by
asking ``wb.verify``: a random intertwiner keeps the function at the traced input size and at another one, and at
every site a random element of the next larger group (forced, ``allow_non_symmetry=True``) moves the outputs or is
refused with our own error."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

import workbench as wb
from workbench._errors import InvalidOptionError, WorkbenchError
from workbench.groups import ScaledPermutation
from workbench.symmetry import Transform

F64 = torch.float64
# the next larger candidates of each group the map claims at these models' sites ("gl" has none)
LARGER = {
    "permutation": ["signed_permutation", "scaled_permutation"],
    "permutation_with_sign": ["signed_permutation", "scaled_permutation"],
    "scaled_permutation": ["diagonal_permutation", "orthogonal"],
    "signed_permutation": ["diagonal_permutation", "orthogonal"],
    "orthogonal_ones_with_sign": ["orthogonal"],
}


@pytest.fixture(autouse=True)
def one_thread():
    """Small float64 convolutions on two threads of a busy 2-core machine wait at barriers (see
    tests/test_vision_constructs.py)."""
    from workbench._threads import threads

    with threads(1):
        yield


def _import(name: str):
    pytest.importorskip("torchvision")
    from workbench.models import ensure_torchvision_importable, require

    ensure_torchvision_importable()  # the CPU torch lacks torchvision's C++ ops (see tests/conftest.py)
    return require(name)


def timm_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=5, mlp_ratio=2,
                             **kw)


def timm_resnet(**kw):
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(block=BasicBlock, layers=[1, 1, 1, 1], num_classes=10, **kw)


def _vit_block(name):
    from timm.models import vision_transformer

    return getattr(vision_transformer, name)


def _swiglu():
    from timm.layers import SwiGLUPacked

    return SwiGLUPacked


CONFIGS = {  # name -> (library, constructor, an input size other than the traced 32, or None for a fixed size)
    "vit_no_class_token_avg": ("timm", lambda: timm_vit(class_token=False, global_pool="avg"), None),
    "vit_map_pool": ("timm", lambda: timm_vit(global_pool="map"), None),
    "vit_registers_no_embed_class": ("timm", lambda: timm_vit(reg_tokens=4, no_embed_class=True), None),
    "vit_fc_norm_prefix_pool": ("timm", lambda: timm_vit(global_pool="avg", fc_norm=True, reg_tokens=2,
                                                         pool_include_prefix=True), None),
    "vit_max_pool_layer_scale": ("timm", lambda: timm_vit(global_pool="max", init_values=1e-5), None),
    "vit_post_norm_blocks": ("timm", lambda: timm_vit(block_fn=_vit_block("ResPostBlock"), init_values=0.1), None),
    "vit_parallel_things": ("timm", lambda: timm_vit(block_fn=_vit_block("ParallelThingsBlock")), None),
    "vit_swiglu_packed": ("timm", lambda: timm_vit(mlp_layer=_swiglu(), act_layer="silu"), None),
    "vit_leaky_relu": ("timm", lambda: timm_vit(act_layer="leaky_relu", qkv_bias=False, proj_bias=False), None),
    "resnet_silu": ("timm", lambda: timm_resnet(act_layer="silu"), 40),
    "resnet_leaky_relu_se_catavgmax": ("timm", lambda: timm_resnet(act_layer="leaky_relu", global_pool="catavgmax",
                                                                   block_args=dict(attn_layer="se")), 40),
    "resnet_tanh_cbam_deep_stem": ("timm", lambda: timm_resnet(act_layer="tanh", stem_type="deep", stem_width=16,
                                                               avg_down=True, block_args=dict(attn_layer="cbam")), 40),
    "convnext_no_layer_scale": ("timm", lambda: __import__("timm").models.convnext.ConvNeXt(
        num_classes=10, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), ls_init_value=None, act_layer="relu"), 48),
    "tv_bottleneck_resnet_dilated": ("torchvision", lambda: __import__("torchvision").models.ResNet(
        __import__("torchvision").models.resnet.Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=16,
        replace_stride_with_dilation=[False, True, True]), 40),
    "tv_resnet18_groupnorm": ("torchvision", lambda: __import__("torchvision").models.resnet18(
        weights=None, num_classes=10, norm_layer=partial(nn.GroupNorm, 8)), 40),
    "tv_vit_representation": ("torchvision", lambda: __import__("torchvision").models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, representation_size=16,
        num_classes=10), None),
}


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random in float64 (gains around 1; kernels scaled by their fan-in), BatchNorm statistics
    too: a fresh model's zeros and ones hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = name.endswith("weight") and p.ndim == 1
            fan = max(1.0, p[0].numel() / 9) ** 0.5 if p.ndim > 2 else 1.0
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 0.5) / fan + (1.0 if gain else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model.eval().double()


def image(size=32, n=3, seed=7):
    return torch.randn(n, 3, size, size, dtype=F64, generator=torch.Generator().manual_seed(seed))


def changed(model, new, x) -> float:
    with torch.no_grad():
        a, b = model.eval()(x), new.eval()(x)
    return ((a - b).abs() / a.abs().amax(0).clamp_min(1e-300)).max().item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_options_keep_the_function_and_no_site_claims_a_larger_group(name):
    library, build, other = CONFIGS[name]
    _import(library)
    model = randomised(build())
    x = image()
    smap = wb.symmetry_map(model, x[:1])
    assert smap.trace_error is None and len(smap) >= 4, (len(smap), smap.skipped[:3])
    new, _ = wb.random_intertwiner(model, seed=1, example=x[:1])
    assert changed(model, new, x) < 1e-10
    if other is not None:  # a convolutional model runs at any size; the transform holds there too
        assert changed(model, new, image(other)) < 1e-10
    for site in smap:
        for larger in LARGER.get(site.group.name, []):
            try:
                bad, _ = wb.random_intertwiner(model, seed=5, sites=[site.name], group=larger, allow_non_symmetry=True,
                                               example=x[:1])
            except WorkbenchError:
                continue  # refused by name (a head permutation's signs, a BatchNorm a rotation crosses)
            assert changed(model, bad, x) > 1e-6, (site, larger)


@pytest.mark.parametrize("act, group, outside", [("silu", "permutation", "scaled_permutation"),
                                                  ("leaky_relu", "scaled_permutation", "signed_permutation")])
def test_a_resnet_activation_option_sets_its_sites_group(act, group, outside):
    """SiLU is not homogeneous (only P); LeakyReLU is positively homogeneous (P·D₊) but not odd."""
    _import("timm")
    model = randomised(timm_resnet(act_layer=act))
    x = image()
    smap = wb.symmetry_map(model, x[:1])
    assert {s.group.name for s in smap} == {group}
    site = smap[0].name
    bad, _ = wb.random_intertwiner(model, seed=2, sites=[site], group=outside, allow_non_symmetry=True, example=x[:1])
    assert changed(model, bad, x) > 1e-3


def test_a_max_pool_keeps_the_stream_from_its_global_sign():
    """timm's ViT pools the tokens by their maximum with global_pool='max': max(−z) ≠ −max(z), so the stream takes
    permutations alone, where the class token's readout also passes the global sign."""
    _import("timm")
    token, maximum = randomised(timm_vit()), randomised(timm_vit(global_pool="max"))
    x = image()

    def stream(model):
        return next(s for s in wb.symmetry_map(model, x[:1]) if any("residual stream" in n for n in s.notes))

    assert stream(token).group.name == "permutation_with_sign"
    assert stream(maximum).group.name == "permutation"
    name = stream(maximum).name
    flip = Transform({name: ScaledPermutation(torch.arange(16), -torch.ones(16, dtype=F64))}, {name: "forced"}, [name])
    assert changed(maximum, wb.apply_transform(maximum, flip, example=x[:1]), x) > 1e-3


# ---------------------------------------------------------------------- a concatenation chosen alone
def _squeezenet():
    tv = _import("torchvision")
    model = randomised(tv.models.squeezenet1_1(weights=None, num_classes=10))
    x = image()
    smap = wb.symmetry_map(model, x[:1])
    host = smap["features.5"]  # the max-pooled concatenation of a Fire module's two expand branches
    assert [p for p, *_ in host.embeds] == ["features.4.expand1x1_activation", "features.4.expand3x3_activation"]
    return model, x, host


def test_a_group_forced_on_a_concatenation_alone_is_refused_not_the_identity():
    """The element of a concatenation is its pieces' on every channel: an orthogonal map forced there alone was the
    identity, recorded as forced 'orthogonal', the model unchanged, and verify called the negative control a PASS."""
    model, x, host = _squeezenet()
    with pytest.raises(InvalidOptionError, match=r"'features\.5' carries its pieces' elements on every channel"):
        wb.random_intertwiner(model, seed=3, sites=[host.name], group="orthogonal", allow_non_symmetry=True,
                              example=x[:1])
    with pytest.raises(InvalidOptionError, match="Choose the pieces"):  # a group named inside its own: the same
        wb.random_intertwiner(model, seed=3, sites=[host.name], group="permutation", example=x[:1])
    # with its pieces, the forced group reaches the weights (and is wrong); their own groups keep the function
    pieces = [p for p, *_ in host.embeds]
    bad, t = wb.random_intertwiner(model, seed=3, sites=pieces + [host.name], group="orthogonal",
                                   allow_non_symmetry=True, example=x[:1])
    assert set(t.forced) == {*pieces, host.name}
    assert changed(model, bad, x) > 1e-3
    new, _ = wb.random_intertwiner(model, seed=3, sites=pieces + [host.name], example=x[:1])
    assert changed(model, new, x) < 1e-10


def test_a_concatenation_of_relu_outputs_is_labelled_by_its_pieces_generators_and_privileged():
    """SqueezeNet's Fire output cat([relu(expand1x1), relu(expand3x3)]) (site 'cat', read by the next Fire's squeeze
    convolution alone) was labelled GL, 'not privileged'. Its element is its pieces', block by block; and no GL
    element could be written there: the value is a ReLU output (>= 0 everywhere), a rotation of it is not."""
    model, x, _ = _squeezenet()
    cat = wb.symmetry_map(model, x[:1])["cat"]
    assert [p for p, *_ in cat.embeds] == ["features.3.expand1x1_activation", "features.3.expand3x3_activation"]
    assert cat.group.name == "scaled_permutation_per_block" and cat.privileged
    assert cat.group.label == "scaled_permutation on each of 2 blocks (64 + 64)"
    assert any("block-diagonal" in note for note in cat.notes)
    seen = {}
    handle = model.features[3].register_forward_hook(lambda m, a, out: seen.setdefault("cat", out.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    value = seen["cat"].transpose(0, 1).reshape(cat.n, -1)  # [channels, everything else], computed by the model
    q, _ = torch.linalg.qr(torch.randn(cat.n, cat.n, dtype=value.dtype, generator=torch.Generator().manual_seed(1)))
    assert value.min() >= 0 and (q @ value).min() < -1e-3 * value.max()
    new, _ = wb.random_intertwiner(model, seed=5, example=x[:1])  # every site, the concatenations' included: exact
    assert changed(model, new, x) < 1e-10
