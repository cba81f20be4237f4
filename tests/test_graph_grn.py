"""ConvNeXt V2's Global Response Normalization in the graph backend (docs/DERIVATIONS.md §4, GRN).

``GRN(x)_c = γ_c·x_c·N_c + β_c + x_c``, ``N_c = ‖x_c‖ / (mean_c' ‖x_c'‖ + ε)`` (norms over the positions): a signed
permutation F = S·P of x passes with γ ↦ P·γ, β ↦ F·β; nothing larger for γ ≠ 0. Hugging Face's ``ConvNextV2GRN``
(channels last) and timm's ``GlobalResponseNorm`` (both layouts, in ``GlobalResponseNormMlp``) are leaves that read
their space and stay in it; after GELU (every ConvNeXt V2) the MLP hidden space is a permutation site.

Every verdict is computed directly in float64 (``changed``: each output unit against its own scale), never by asking
``wb.verify``; γ and β are random (a fresh GRN's zeros make it the identity and would hide a missing carry). Negative
controls: γ or β left in place, a hand-built permutation of the linear maps only, a scaling at a GRN site.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import workbench as wb
from workbench.groups import ScaledPermutation
from workbench.symmetry import Transform

from test_vision_options import F64, _import, changed, one_thread, randomised  # noqa: F401  (one_thread: a fixture)


def image(size=32, n=3, seed=7):
    return torch.randn(n, 3, size, size, dtype=F64, generator=torch.Generator().manual_seed(seed))


def force(model, site, element, x):
    return wb.apply_transform(model, Transform({site: element}, {site: "forced"}, [site]), example=x[:1])


def grn_sites(smap):
    return [s for s in smap if any(p.name.endswith("grn.weight") for p in s.writers)]


# ---------------------------------------------------------------------- the derivation, by hand (no workbench)
def grn_by_hand(x, gamma, beta, eps=1e-6):
    """GRN on [B, H, W, C] as written in Hugging Face's ConvNextV2GRN."""
    g = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
    return gamma * (x * (g / (g.mean(dim=-1, keepdim=True) + eps))) + beta + x


@settings(max_examples=20, deadline=None)
@given(c=st.integers(2, 9), seed=st.integers(0, 1000))
def test_grn_passes_signed_permutations_and_nothing_larger(c, seed):
    """GRN(F·x) = F·GRN'(x) with γ' = P·γ, β' = F·β for F = S·P; a per-channel positive scaling (γ' absorbing its
    ratio as best it can), and at inputs whose norms are comparable to ε a common scalar, fail."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4, c, generator=g, dtype=F64)
    gamma, beta = torch.randn(c, generator=g, dtype=F64), torch.randn(c, generator=g, dtype=F64)
    perm = torch.randperm(c, generator=g)
    sign = torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0).to(F64)
    sign[0] = -1.0
    y = grn_by_hand(x, gamma, beta)
    moved = grn_by_hand(sign * x[..., perm], gamma[perm], sign * beta[perm])
    assert ((moved - sign * y[..., perm]).abs().max() / y.abs().max()) < 1e-12
    d = torch.linspace(0.5, 2.0, c, dtype=F64)  # positive, not constant
    scaled = grn_by_hand(d * x, gamma, d * beta)
    assert ((scaled - d * y).abs().max() / y.abs().max()) > 1e-3
    tiny = x * 1e-7  # ‖x_c‖ ~ ε: the ε in N_c shows
    y0 = grn_by_hand(tiny, gamma, torch.zeros(c, dtype=F64))
    s = 2.0
    assert ((grn_by_hand(s * tiny, gamma, torch.zeros(c, dtype=F64)) - s * y0).abs().max() / y0.abs().max()) > 1e-3


# ---------------------------------------------------------------------- timm
def timm_v2(name="convnextv2_atto", seed=0, **kw):
    timm = _import("timm")
    torch.manual_seed(seed)
    return randomised(timm.create_model(name, pretrained=False, num_classes=10, **kw), seed)


def test_timm_convnextv2_atto_maps_its_grn_mlp_hidden_spaces():
    """convnextv2_atto (1×1-conv MLP: channels-first GRN): 4 stream sites s·P as before, and now its 12 MLP hidden
    spaces (were skipped: 4 sites, 61 places) are permutation sites with γ, β moved."""
    model, x = timm_v2(), image(64, 2)
    smap = wb.symmetry_map(model, x[:1])
    assert (len(smap), [r for _, r in smap.skipped]) == (16, ["the model's output"])
    found = grn_sites(smap)
    assert len(found) == 12 and {s.group.name for s in found} == {"permutation"}
    for s in found:
        levels = {p.name.rpartition(".")[2]: p.level for p in s.writers if ".grn." in p.name}
        assert levels == {"weight": "perm", "bias": "post"}
    assert sorted({s.n for s in found}) == [160, 320, 640, 1280]  # 4× each stage's width
    for seed in range(2):
        new, t = wb.random_intertwiner(model, seed=seed, example=x[:1])
        assert changed(model, new, x) < 1e-10
        assert changed(model, new, image(48, 2, seed=3)) < 1e-10
    assert wb.verify(model, new, x, transform=t).passed
    grn = model.stages[0].blocks[0].mlp.grn
    site = next(s for s in found if "stages.0.blocks.0.mlp.grn.weight" in {p.name for p in s.writers})
    perm = t.elements[site.name].perm
    assert torch.equal(new.stages[0].blocks[0].mlp.grn.weight, grn.weight[perm])
    for attr in ("weight", "bias"):  # γ or β left in place
        kept = copy.deepcopy(new)
        with torch.no_grad():
            getattr(kept.stages[0].blocks[0].mlp.grn, attr).copy_(getattr(grn, attr))
        assert changed(model, kept, x) > 1e-3
    n = site.n
    scale = torch.linspace(0.5, 2.0, n, dtype=F64)  # a scaling at a GRN site (P is claimed)
    assert changed(model, force(model, site.name, ScaledPermutation(torch.arange(n), scale), x), x) > 1e-3


def test_a_hand_built_permutation_of_the_mlp_needs_gamma_and_beta():
    """fc1's rows and fc2's columns permuted by hand: with γ and β permuted too the function is kept (the control
    is well built); without either, it changes."""
    model, x = timm_v2(), image(64, 2)
    mlp = model.stages[1].blocks[0].mlp
    n = mlp.fc1.out_channels
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))

    def moved(carry):
        new = copy.deepcopy(model)
        m = new.stages[1].blocks[0].mlp
        with torch.no_grad():
            m.fc1.weight.copy_(mlp.fc1.weight[perm])
            m.fc1.bias.copy_(mlp.fc1.bias[perm])
            m.fc2.weight.copy_(mlp.fc2.weight[:, perm])
            for attr in carry:
                getattr(m.grn, attr).copy_(getattr(mlp.grn, attr)[perm])
        return new

    assert changed(model, moved(("weight", "bias")), x) < 1e-12
    assert changed(model, moved(("weight",)), x) > 1e-3
    assert changed(model, moved(("bias",)), x) > 1e-3


@settings(max_examples=8, deadline=None)
@given(dims=st.sampled_from([(8, 8, 16, 16), (16, 8, 8, 4), (4, 8, 8, 12)]), depth=st.integers(1, 2),
       conv_mlp=st.booleans(), seed=st.integers(0, 50))
def test_random_timm_convnext_v2s_keep_their_function(dims, depth, conv_mlp, seed):
    """Small timm ConvNeXt V2s (GRN in GlobalResponseNormMlp) over widths, depths and both MLP layouts (channels-last
    Linear with a channels-last GRN, 1×1 conv with a channels-first one): every MLP hidden space a permutation site."""
    _import("timm")
    from timm.models.convnext import ConvNeXt

    model = randomised(ConvNeXt(num_classes=5, depths=(depth,) * len(dims), dims=dims, conv_mlp=conv_mlp, use_grn=True,
                                ls_init_value=None), seed)
    x = image(32, seed=seed)
    smap = wb.symmetry_map(model, x[:1])
    assert len(smap) == len(dims) * (1 + depth) and [r for _, r in smap.skipped] == ["the model's output"]
    assert [s.group.name for s in grn_sites(smap)] == ["permutation"] * (len(dims) * depth)
    new, _ = wb.random_intertwiner(model, seed=seed, example=x[:1])
    assert changed(model, new, x) < 1e-10


# ---------------------------------------------------------------------- a GRN on a linear site, and one misread
class LinearGRN(nn.Module):
    """Linear → GRN (channels last) → Linear, no activation: GRN alone decides the group (signed permutations)."""

    def __init__(self, c=6, bias=True):
        super().__init__()
        _import("timm")
        from timm.layers.grn import GlobalResponseNorm

        self.fc1, self.fc2 = nn.Linear(4, c, bias=bias), nn.Linear(c, 3, bias=bias)
        self.grn = GlobalResponseNorm(c, channels_last=True)

    def forward(self, x):  # x: [B, 4, H, W]
        return self.fc2(self.grn(self.fc1(x.permute(0, 2, 3, 1)))).mean((1, 2))


def test_a_grn_on_a_linear_site_passes_signed_permutations_not_scalings():
    model, x = randomised(LinearGRN()), torch.randn(5, 4, 3, 3, dtype=F64)
    smap = wb.symmetry_map(model, x[:1])
    (site,) = smap.sites
    assert site.group.name == "signed_permutation" and any("Global Response Normalization" in n for n in site.notes)
    for seed in range(4):
        new, t = wb.random_intertwiner(model, seed=seed, example=x[:1])
        assert changed(model, new, x) < 1e-10
    e = t.elements[site.name]
    assert (e.scale < 0).any() and torch.equal(new.grn.bias, e.scale * model.grn.bias[e.perm])
    scale = torch.linspace(0.5, 2.0, 6, dtype=F64)
    assert changed(model, force(model, site.name, ScaledPermutation(torch.arange(6), scale), x), x) > 1e-3
    rotated, _ = wb.random_intertwiner(model, seed=0, group="orthogonal", allow_non_symmetry=True, example=x[:1])
    assert changed(model, rotated, x) > 1e-3


def test_a_common_scalar_fails_at_a_grn_through_its_epsilon():
    """A positive scalar at the linear GRN site (outside the claimed group) is exact only as ε → 0: at inputs whose
    channel norms are comparable to ε it changes the outputs (no biases, β = 0, so nothing hides the GRN's term)."""
    model = randomised(LinearGRN(bias=False))
    with torch.no_grad():
        model.grn.bias.zero_()
    (site,) = wb.symmetry_map(model, torch.zeros(1, 4, 3, 3, dtype=F64)).sites
    x = torch.randn(5, 4, 3, 3, dtype=F64) * 1e-7
    uniform = ScaledPermutation(torch.arange(6), torch.full((6,), 3.0, dtype=F64))
    assert changed(model, force(model, site.name, uniform, x), x) > 1e-2


def test_a_grn_over_the_wrong_axis_is_skipped():
    """timm's GRN made channels-last reading a channels-first tensor whose last axis happens to have as many entries
    as the GRN has channels: it normalises positions, not channels. The space is skipped, saying why; nothing moves."""
    _import("timm")
    from timm.layers.grn import GlobalResponseNorm

    class Wrong(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.grn, self.b = nn.Conv2d(3, 5, 1), GlobalResponseNorm(6, channels_last=True), \
                nn.Conv2d(5, 2, 1)

        def forward(self, x):
            return self.b(self.grn(self.a(x)))

    model, x = randomised(Wrong()), torch.randn(4, 3, 6, 6, dtype=F64)
    smap = wb.symmetry_map(model, x[:1])
    assert not smap.sites and "does not normalise exactly the channels" in dict(smap.skipped)["a"]
    new, _ = wb.random_intertwiner(model, seed=0, example=x[:1])
    assert changed(model, new, x) == 0
