"""Coverage gaps of the graph backend on widely used models, closed with their derivations (docs/DERIVATIONS.md).

- timm's ConvNeXt (§4, timm): the layer scale ``x.mul(self.gamma.reshape(1, -1, 1, 1))`` is a per-channel scale read
  through a view of the parameter, which moves with the stream's permutation; the channels-last block permutes its
  input and output; convnext_zepto_rms's SimpleNorm (``x·rsqrt(var(x) + ε)·w``) reads a stream like a LayerNorm
  (§4, SimpleNorm). Every stage's stream is then a site, s·P.
- torchvision's DenseNet with ``memory_efficient=True`` (§6): ``if self.any_requires_grad(prev_features)`` (then
  ``torch.utils.checkpoint``) is control flow on ``tensor.requires_grad``; the trace runs under ``torch.no_grad()``
  as verify runs the models, and records the branch taken there (the plain bottleneck: the same function).

Every verdict is checked directly: a float64 copy is transformed and both models run here, each output unit against
its own scale (``changed``), never by asking ``wb.verify``; negative controls one size larger (a signed permutation
of a stream where s·P is claimed, a positive scaling) or a weight moved without its partner must change the outputs.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import workbench as wb
from workbench.groups import ScaledPermutation
from workbench.symmetry import Transform

from test_vision_options import F64, _import, changed, one_thread, randomised  # noqa: F401  (one_thread: a fixture)


def image(size=64, n=2, seed=7):
    return torch.randn(n, 3, size, size, dtype=F64, generator=torch.Generator().manual_seed(seed))


def streams(smap):
    return [s for s in smap if any("residual stream" in n for n in s.notes)]


def force(model, site, element, x):
    return wb.apply_transform(model, Transform({site: element}, {site: "forced"}, [site]), example=x[:1])


# ---------------------------------------------------------------------- timm ConvNeXt (DERIVATIONS §4, timm)
def timm_convnext(name):
    timm = _import("timm")
    torch.manual_seed(0)
    return randomised(timm.create_model(name, pretrained=False, num_classes=10))


# name -> (sites, skipped, stream widths, GELU sites); convnextv2's MLP hidden spaces pass its GRN (tests/test_graph_grn.py)
TIMM_CONVNEXTS = {
    "test_convnext": (13, 1, [24, 32, 48, 64], 9),
    "convnext_atto": (16, 1, [40, 80, 160, 320], 12),
    "convnext_zepto_rms": (14, 1, [32, 64, 128, 256], 10),
    "convnextv2_atto": (16, 1, [40, 80, 160, 320], 12),
}


@pytest.mark.parametrize("name", list(TIMM_CONVNEXTS))
def test_timm_convnext_stages_are_signed_permutation_streams(name):
    sites, skipped, widths, gelu = TIMM_CONVNEXTS[name]
    model, x = timm_convnext(name), image()
    smap = wb.symmetry_map(model, x[:1])
    assert (len(smap), len(smap.skipped)) == (sites, skipped), smap.skipped[:3]
    found = streams(smap)
    assert [(s.n, s.group.name) for s in found] == [(n, "permutation_with_sign") for n in widths]
    assert sum(s.group.name == "permutation" for s in smap) == gelu
    blocks = [(i, j) for i, stage in enumerate(model.stages) for j, b in enumerate(stage.blocks) if b.gamma is not None]
    for i, j in blocks:  # each layer scale moves, by the permutation part, with its stage's stream
        (site,) = [s for s in found if f"stages.{i}.blocks.{j}.gamma" in {p.name for p in s.writers}]
        assert {p.level for p in site.writers if p.name.endswith(".gamma")} == {"perm"} and site.n == widths[i]
    if name == "convnext_zepto_rms":
        assert not any("SimpleNorms" in n for s in found for n in s.notes)  # depthwise convs read it: ConvNeXt's note
        assert any("s·P per stage" in n for n in found[0].notes)
    new, _ = wb.random_intertwiner(model, seed=1, example=x[:1])
    assert changed(model, new, x) < 1e-10
    assert changed(model, new, image(48, seed=3)) < 1e-10  # a convolutional model: another input size too
    first = found[0]
    n = first.n
    # one size larger: per-channel signs (s·P is claimed), a positive scaling, a permutation without a layer scale
    signs = torch.ones(n, dtype=F64)
    signs[::2] = -1
    assert changed(model, force(model, first.name, ScaledPermutation(torch.arange(n), signs), x), x) > 1e-3
    scale = torch.linspace(0.5, 2.0, n, dtype=F64)
    assert changed(model, force(model, first.name, ScaledPermutation(torch.arange(n), scale), x), x) > 1e-3
    if blocks:
        i, j = blocks[0]
        new, t = wb.random_intertwiner(model, seed=2, sites=[s.name for s in found], example=x[:1])
        with torch.no_grad():
            new.stages[i].blocks[j].gamma.copy_(model.stages[i].blocks[j].gamma)
        assert changed(model, new, x) > 1e-3


@settings(max_examples=8, deadline=None)
@given(dims=st.sampled_from([(8, 8, 16, 16), (16, 8, 8, 4), (4, 8, 8, 12)]), depth=st.integers(1, 2), conv_mlp=st.booleans(),
       norm=st.sampled_from(["layernorm", "simplenorm"]), scale=st.booleans(), seed=st.integers(0, 50))
def test_random_timm_convnexts_keep_their_function(dims, depth, conv_mlp, norm, scale, seed):
    """Small timm ConvNeXts over widths, depths, both MLP layouts (channels-last Linear and 1×1 conv), LayerNorm or
    SimpleNorm (``SimpleNorm2d`` on the stream, ``SimpleNorm`` inside a channels-last block), with and without layer
    scale: every stage a signed-permutation site, a random element exact in float64."""
    _import("timm")
    from timm.models.convnext import ConvNeXt

    model = randomised(ConvNeXt(num_classes=5, depths=(depth,) * len(dims), dims=dims, conv_mlp=conv_mlp,
                                norm_layer=norm, ls_init_value=1.0 if scale else None), seed)
    x = image(32, seed=seed)
    smap = wb.symmetry_map(model, x[:1])
    assert [(s.n, s.group.name) for s in streams(smap)] == [(d, "permutation_with_sign") for d in dims]
    assert len(smap) == len(dims) * (1 + depth) and [r for _, r in smap.skipped] == ["the model's output"]
    new, _ = wb.random_intertwiner(model, seed=seed, example=x[:1])
    assert changed(model, new, x) < 1e-10


# ---------------------------------------------------------------------- layer scales through views (§4, timm)
class Scaled(nn.Module):
    """conv → γ (viewed as ``shape``, multiplied as ``how``) → ReLU → conv: the hidden space is a site exactly when γ
    scales its channels one by one."""

    def __init__(self, shape=(1, -1, 1, 1), how="method", width=6):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, width, 1), nn.Conv2d(width, 4, 1)
        self.gamma = nn.Parameter(torch.randn(width))
        self.shape, self.how = shape, how

    def forward(self, x):
        h, g = self.a(x), self.gamma.reshape(self.shape) if self.how != "view" else self.gamma.view(self.shape)
        if self.how == "inplace":
            h = h.mul_(g)
        elif self.how == "reversed":
            h = g.mul(h)
        else:
            h = h.mul(g) if self.how in ("method", "view") else h * g
        return self.b(torch.relu(h))


@pytest.mark.parametrize("how", ["method", "view", "inplace", "reversed", "operator"])
def test_a_viewed_layer_scale_moves_with_the_permutation(how):
    model = randomised(Scaled(how=how))
    x = image(5, n=3)
    smap = wb.symmetry_map(model, x[:1])
    (site,) = list(smap)
    assert site.group.name == "scaled_permutation" and "gamma" in {p.name for p in site.writers}
    new, _ = wb.random_intertwiner(model, seed=0, example=x[:1])
    assert changed(model, new, x) < 1e-10 and not torch.equal(new.gamma, model.gamma)
    with torch.no_grad():  # the layer scale left where it was: the function changes
        new.gamma.copy_(model.gamma)
    assert changed(model, new, x) > 1e-3


@pytest.mark.parametrize("shape, size", [((1, 1, 1, -1), (6, 6)), ((1, 1, -1, 1), (6, 6)), ((1, 1, 2, 3), (2, 3))])
def test_a_view_that_does_not_scale_the_channels_one_by_one_freezes(shape, size):
    """γ viewed along the width or height axis (here as long as the channels) or split over two axes multiplies no
    channel by its own number: the hidden space stays frozen, with the reason."""
    model = randomised(Scaled(shape=shape, width=6))
    x = torch.randn(3, 3, *size, dtype=F64, generator=torch.Generator().manual_seed(7))
    smap = wb.symmetry_map(model, x[:1])
    assert len(smap) == 0
    assert any("gamma" in r or "reshape" in r for _, r in smap.skipped), smap.skipped


def test_a_layer_scale_shared_by_two_spaces_makes_them_one_site():
    """One γ multiplying two spaces is rewritten once: they take one element (before, both were dropped as a clash)."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1)
            self.gamma = nn.Parameter(torch.randn(6, 1, 1))
            self.ra, self.rb = nn.Conv2d(6, 4, 1), nn.Conv2d(6, 4, 1)

        def forward(self, x):
            return self.ra(self.gamma * self.a(x)) + self.rb(self.gamma.view(1, 6, 1, 1).mul(self.b(x)))

    model = randomised(Two())
    x = image(5, n=3)
    (site,) = list(wb.symmetry_map(model, x[:1]))
    assert {p.name for p in site.writers} == {"a", "b", "gamma"}
    new, _ = wb.random_intertwiner(model, seed=0, example=x[:1])
    assert changed(model, new, x) < 1e-10


def test_simple_norm_passes_exactly_what_its_derivation_says():
    """docs/DERIVATIONS.md §4, SimpleNorm, in plain torch on timm's own ``simple_norm`` (gain 1): y(M·x) = M·y(x) for
    M = s·R·(I + 1·aᵀ), R orthogonal with R·1 = 1 (a global sign, a rotation fixing 1, a shear); not for a uniform
    scaling (ε), a rotation moving 1, or per-channel signs (each changes var(x))."""
    _import("timm")
    from timm.layers.fast_norm import simple_norm

    n, g = 8, torch.Generator().manual_seed(0)
    x = torch.randn(50, n, dtype=F64, generator=g)
    y = simple_norm(x, [n], None, 1e-6)
    ones = torch.ones(n, 1, dtype=F64) / n ** 0.5
    q, _ = torch.linalg.qr(torch.cat([ones, torch.randn(n, n - 1, dtype=F64, generator=g)], 1))
    q[:, 0] = ones[:, 0]  # an orthonormal basis starting with 1/√n
    turn, _ = torch.linalg.qr(torch.randn(n - 1, n - 1, dtype=F64, generator=g))
    fixing = q @ torch.block_diag(torch.eye(1, dtype=F64), turn) @ q.T  # R·1 = 1
    shear = torch.eye(n, dtype=F64) + torch.ones(n, 1, dtype=F64) @ torch.randn(1, n, dtype=F64, generator=g)
    haar, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))
    signs = torch.diag(torch.tensor([1.0, -1.0] * (n // 2), dtype=F64))

    def moved(M):  # max |y(Mx) − M·y(x)| over max |y|
        return float((simple_norm(x @ M.T, [n], None, 1e-6) - y @ M.T).abs().max() / y.abs().max())

    for M in (-torch.eye(n, dtype=F64), fixing, shear, -fixing @ shear):
        assert moved(M) < 1e-12
    for M in (2 * torch.eye(n, dtype=F64), haar, signs):
        assert moved(M) > 1e-3


# ---------------------------------------------------------------------- DenseNet, memory_efficient=True (§6)
def tv_densenet(memory_efficient):
    tv = _import("torchvision")
    torch.manual_seed(0)
    return randomised(tv.models.DenseNet(growth_rate=8, block_config=(2, 3), num_init_features=16, bn_size=2,
                                         num_classes=5, memory_efficient=memory_efficient))


def test_a_memory_efficient_densenet_has_the_plain_ones_sites():
    """Its checkpointed bottleneck computes the plain one's function: the same sites and groups (was: every dense layer
    kept whole, 0 sites), a random element exact both under no_grad and with grad on (the checkpoint branch)."""
    plain, efficient = tv_densenet(False), tv_densenet(True)
    x = image(32, n=3)
    a, b = wb.symmetry_map(plain, x[:1]), wb.symmetry_map(efficient, x[:1])
    assert len(b) == 19 and [(s.name, s.group.name) for s in a] == [(s.name, s.group.name) for s in b]
    assert [r for _, r in b.skipped] == ["the model's output"]
    new, _ = wb.random_intertwiner(efficient, seed=0, example=x[:1])
    assert changed(efficient, new, x) < 1e-10
    y, y_new = efficient(x), new(x).detach()  # grad on: the parameters require it, so the checkpointed branch runs
    assert y.requires_grad
    y = y.detach()
    assert float((y - y_new).abs().max() / y.abs().max()) < 1e-10
    site = b[0]  # one size larger than D₊·P: a sign flip (a ReLU reads it)
    flip = -torch.ones(site.n, dtype=F64)
    assert changed(efficient, force(efficient, site.name, ScaledPermutation(torch.arange(site.n), flip), x), x) > 1e-3


def test_a_branch_on_requires_grad_records_the_no_grad_branch():
    """``x.requires_grad`` in a forward is answered as under torch.no_grad() (the trace, the run and verify): a
    computed tensor requires none, a parameter answers for itself. Here that picks ReLU (D₊·P) over tanh (D±·P)."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = self.a(x)
            h = torch.tanh(h) if h.requires_grad else torch.relu(h)
            return self.b(h if self.b.weight.requires_grad else 2 * h)

    model = randomised(Branchy())
    x = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    (site,) = list(wb.symmetry_map(model, x[:1]))
    assert site.group.name == "scaled_permutation" and site.activation == "relu"
    new, _ = wb.random_intertwiner(model, seed=0, example=x[:1])
    with torch.no_grad():
        assert changed(model, new, x) < 1e-10


# ---------------------------------------------------------------------- BlurPool: reflect padding, a fixed filter (§3)
class Blurred(nn.Module):
    """conv → reflect padding → a fixed depthwise filter per channel (a buffer, as timm's BlurPool2d) → conv."""

    def __init__(self, width=6, mode="reflect", groups=None):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, width, 1), nn.Conv2d(width, 4, 1)
        per = 1 if groups is None else width // groups
        self.register_buffer("filt", torch.randn(width, per, 3, 3, generator=torch.Generator().manual_seed(3)))
        self.mode, self.groups = mode, groups or width

    def forward(self, x):
        h = torch.nn.functional.pad(self.a(x), [1, 1, 1, 1], mode=self.mode)
        return self.b(torch.nn.functional.conv2d(h, self.filt, stride=2, groups=self.groups))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular", "constant"])
def test_a_fixed_depthwise_filter_takes_the_permutation(mode):
    """Per channel y_c = k_c ⋆ pad(x_c): x by D·P passes with k ↦ P·k; filters that differ per channel pass no rotation
    (one size larger), and left unpermuted they change the function."""
    model = randomised(Blurred(mode=mode))
    x = image(8, n=3)
    (site,) = list(wb.symmetry_map(model, x[:1]))
    assert site.group.name == "diagonal_permutation" and "filt" in {p.name for p in site.writers}
    new, _ = wb.random_intertwiner(model, seed=0, example=x[:1])
    assert changed(model, new, x) < 1e-10 and not torch.equal(new.filt, model.filt)
    with torch.no_grad():
        new.filt.copy_(model.filt)
    assert changed(model, new, x) > 1e-3
    bad, _ = wb.random_intertwiner(model, seed=0, sites=[site.name], group="orthogonal", allow_non_symmetry=True,
                                   example=x[:1])
    assert changed(model, bad, x) > 1e-3


def test_a_grouped_functional_convolution_freezes():
    model = randomised(Blurred(groups=3))
    x = image(8, n=3)
    smap = wb.symmetry_map(model, x[:1])
    assert len(smap) == 0 and any("conv2d" in r for _, r in smap.skipped), smap.skipped


def test_timm_blur_pooled_densenet_maps_its_blur_pools():
    """timm's DenseNet with BlurPool2d (densenetblur121d's construct) at a small size: its blur pools keep their spaces
    (was: frozen, 'a padding that is not zeros'); with the blur filters made to differ per channel, a random element
    is exact only because they are permuted too."""
    _import("timm")
    from timm.layers import BlurPool2d
    from timm.models.densenet import DenseNet

    torch.manual_seed(0)
    model = randomised(DenseNet(growth_rate=8, block_config=(2, 2), stem_type="deep", aa_layer=BlurPool2d,
                                aa_stem_only=False, num_classes=5))
    pools = [m for m in model.modules() if isinstance(m, BlurPool2d)]
    assert len(pools) == 2
    with torch.no_grad():
        for m in pools:
            m.filt.mul_(torch.rand(m.filt.shape[0], 1, 1, 1, dtype=F64, generator=torch.Generator().manual_seed(1)) + 0.5)
    x = image(32, n=3)
    smap = wb.symmetry_map(model, x[:1])
    assert [r for _, r in smap.skipped] == ["the model's output"]
    # (the concatenations' hosts: their pieces' scaled permutations, block by block)
    assert {s.group.name for s in smap} == {"scaled_permutation", "scaled_permutation_per_block"}
    new, _ = wb.random_intertwiner(model, seed=0, example=x[:1])
    assert changed(model, new, x) < 1e-10
    with torch.no_grad():
        for m, old in zip([m for m in new.modules() if isinstance(m, BlurPool2d)], pools):
            m.filt.copy_(old.filt)
    assert changed(model, new, x) > 1e-3


@pytest.mark.slow
def test_a_space_of_unknown_width_with_an_activation_is_skipped_not_a_crash():
    """timm's MobileNetV5 (its squeeze-excite products broadcast over channels: spaces with no width, holding a GELU)
    raised InvalidOptionError from inside the map (intertwiner_group(..., n=None)) once the layer-scale rules gave
    such a space a writer: a symmetry map must answer, listing what it skipped and why (the timm sweep's row read
    'no sites' before and 'refused' after)."""
    timm = _import("timm")
    model = timm.create_model("mobilenetv5_300m", pretrained=False).eval()
    smap = wb.symmetry_map(model, example=torch.randn(1, 3, 64, 64))
    assert smap.trace_error is None
    assert any("broadcasts over the channel" in why for _, why in smap.skipped)
