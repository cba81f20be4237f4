"""timm's Swin Transformer (v1, ``timm.models.swin_transformer``) in the graph backend (docs/DERIVATIONS.md §2, Swin):
the same groups as torchvision's ``swin_t`` — per stage a residual stream (s·P; s·R, R·1 = 1, with gains 1; read by
the next stage's patch merging, so no shear), per block the attention heads (GL(d_head) on queries/keys and on
values/out-projection, permutations of whole heads with their relative position bias table) and the MLP's GELU units
(permutations) — through timm's own forms: channels-last ``[B, H, W, C]`` blocks whose window partition and reverse
are views and permutes of positions, ``torch.roll`` for the shifted windows, ``F.pad`` of the positions when the grid
is not a multiple of the window, the shifted windows' mask passed to ``WindowAttention`` as a buffer, and a
``PatchMerging`` that reshapes and permutes the 2×2 neighbours (``permute(0, 1, 3, 4, 2, 5).flatten(3)``, still four
blocks of C channels). Swin V2 (post-norm blocks) keeps its sites; V2 CR's last stage, now reached, is a post-norm
stream whose note does not claim V1's group.

Every verdict is checked directly: float64 models transformed and their outputs compared here (``changed``, each output
unit against its own scale), never by asking ``wb.verify`` alone; negative controls just outside the groups (forced
elements, or a moved weight put back by hand) must move the outputs."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import workbench as wb
from workbench.groups import Dense, ScaledPermutation
from workbench.symmetry import Transform

F64 = torch.float64


def _timm():
    pytest.importorskip("timm")
    from workbench.models import ensure_torchvision_importable, require

    ensure_torchvision_importable()  # timm imports torchvision, whose C++ ops the CPU torch lacks
    return require("timm")


@pytest.fixture(autouse=True)
def one_thread():
    from workbench._threads import threads

    with threads(1):
        yield


def randomised(model: nn.Module, seed: int = 0, fold: bool = False) -> nn.Module:
    """Every parameter random in float64 (norm gains around 1, or exactly 1 with ``fold``; the bias tables too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = name.endswith("weight") and p.ndim == 1
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 0.5) + (1.0 if gain else 0.0))
            if fold and gain and "norm" in name:
                p.fill_(1.0)
    return model.eval().double()


def swin(name="swin_tiny_patch4_window7_224", dim=16, depths=(2, 2), heads=(2, 4), size=32, seed=0, fold=False):
    model = _timm().create_model(name, pretrained=False, embed_dim=dim, depths=depths, num_heads=heads, window_size=4,
                                 img_size=size, num_classes=5)
    return randomised(model, seed, fold)


def image(size=32, n=3, seed=1):
    return torch.randn(n, 3, size, size, dtype=F64, generator=torch.Generator().manual_seed(seed))


def changed(model, new, x) -> float:
    with torch.no_grad():
        a, b = model(x), new(x)
    return ((a - b).abs() / a.abs().amax(0).clamp_min(1e-300)).max().item()


def force(model, site, element, x):
    return wb.apply_transform(model, Transform({site: element}, {site: "forced"}, [site]), example=x[:1])


def streams(smap):
    return [s for s in smap if any("residual stream" in n for n in s.notes)]


def haar(n, seed):
    return torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(seed)))[0]


def test_streams_heads_and_mlps_are_sites_with_swins_groups():
    model = swin()
    x = image()  # 8×8 tokens in windows of 4×4: each stage's second block shifts its windows (torch.roll, a mask)
    smap = wb.symmetry_map(model, x[:1])
    assert [r for _, r in smap.skipped] == ["the model's output"]
    got = {(s.name, s.n, s.group.name) for s in smap}
    expected = {("patch_embed.proj", 16, "permutation_with_sign"), ("layers.1.downsample", 32, "permutation_with_sign")}
    for stage, (d, h) in enumerate(((16, 2), (32, 4))):
        for b in range(2):
            block = f"layers.{stage}.blocks.{b}"
            expected |= {(f"{block}.mlp.act", 4 * d, "permutation"), (f"{block}.attn.heads", h, "permutation")}
            expected |= {(f"{block}.attn.{k}.{i}", 8, "gl") for k in ("qk", "ov") for i in range(h)}
    assert got == expected
    first, last = streams(smap)
    assert any("read by Swin's patch merging" in n and "without the shear" in n for n in first.notes)
    ports = {p.name: (p.level, p.block, p.axis) for p in first.writers + first.readers}
    # timm's merge flattens [.., 2, 2, C] on its last axis: four blocks of C, like torchvision's concatenation
    assert ports["layers.1.downsample.norm.weight"] == ("perm", 4, 0)
    assert ports["layers.1.downsample.reduction.weight"] == ("pre", 4, 1)
    assert {"layers.0.blocks.1.attn.qkv.weight", "patch_embed.norm.bias"} <= set(ports)
    assert {p.name for p in last.writers} >= {"layers.1.downsample.reduction.weight", "layers.1.blocks.1.mlp.fc2"}
    heads = smap["layers.1.blocks.1.attn.heads"]
    assert "layers.1.blocks.1.attn.relative_position_bias_table" in {p.name for p in heads.writers}
    flat = swin(fold=True)
    assert [s.group.name for s in streams(wb.symmetry_map(flat, x[:1]))] == ["orthogonal_ones_with_sign"] * 2


@pytest.mark.parametrize("size", [32, 36])  # 36: 9×9 tokens, padded to windows of 4 and, merging, to an even grid
@pytest.mark.parametrize("fold", [False, True])
def test_a_random_element_of_every_site_keeps_the_function(size, fold):
    model, x = swin(size=size, fold=fold), image(size)
    smap = wb.symmetry_map(model, x[:1])
    for seed in range(3):  # every site at once
        new, t = wb.random_intertwiner(model, seed=seed, example=x)
        assert changed(model, new, x) < 1e-10
        assert wb.verify(model, new, x, transform=t).verdict == "PASS"
    g = torch.Generator().manual_seed(size + fold)
    for site in smap:  # each site alone
        new = wb.apply_transform(model, Transform({site.name: site.group.sample(g)}, {site.name: site.group.name}),
                                 example=x[:1])
        assert changed(model, new, x) < 1e-10, site.name


def test_negative_controls_outside_the_groups_change_the_function():
    model, x = swin(), image()
    smap = wb.symmetry_map(model, x[:1])
    g = torch.Generator().manual_seed(3)
    params = dict(model.named_parameters())
    # a rotation of GELU units
    mlp = smap["layers.0.blocks.1.mlp.act"]
    assert changed(model, force(model, mlp.name, Dense(haar(mlp.n, 4)), x), x) > 1e-3
    # a dense map (a Haar rotation; one fixing 1) on a stream with gains kept, where only s·P passes
    s = streams(smap)[0]
    assert changed(model, force(model, s.name, Dense(haar(s.n, 5)), x), x) > 1e-3
    ones = torch.ones(s.n, 1, dtype=F64) / s.n ** 0.5
    basis = torch.linalg.qr(torch.cat([ones, torch.randn(s.n, s.n - 1, dtype=F64, generator=g)], 1))[0]
    fixing = basis @ torch.block_diag(torch.eye(1, dtype=F64), haar(s.n - 1, 6)) @ basis.T
    assert torch.allclose(fixing @ ones, ones)
    assert changed(model, force(model, s.name, Dense(fixing), x), x) > 1e-3
    # a head's GL on its queries, the keys put back (q·k changes)
    block, D, dh = "layers.1.blocks.1.attn", 32, 8
    qk = smap[f"{block}.qk.1"]
    moved = wb.apply_transform(model, Transform({qk.name: qk.group.sample(g)}, {qk.name: "gl"}), example=x[:1])
    assert changed(model, moved, x) < 1e-10
    mine = dict(moved.named_parameters())
    with torch.no_grad():
        for t in ("weight", "bias"):
            k = slice(D + 1 * dh, D + 2 * dh)
            mine[f"{block}.qkv.{t}"][k] = params[f"{block}.qkv.{t}"][k]
    assert changed(model, moved, x) > 1e-3
    # a head permutation without its relative position bias table
    table = f"{block}.relative_position_bias_table"
    moved = force(model, f"{block}.heads", ScaledPermutation(torch.tensor([1, 0, 3, 2])), x)
    assert changed(model, moved, x) < 1e-10
    with torch.no_grad():
        dict(moved.named_parameters())[table].copy_(params[table])
    assert changed(model, moved, x) > 1e-3


@settings(max_examples=6, deadline=None)
@given(heads=st.sampled_from([1, 2]), depth=st.integers(1, 2), size=st.sampled_from([32, 36, 40]),
       fold=st.booleans(), seed=st.integers(0, 100))
def test_random_timm_swins_keep_their_function(heads, depth, size, fold, seed):
    model = swin(dim=8 * heads, depths=(depth, depth), heads=(heads, 2 * heads), size=size, seed=seed, fold=fold)
    x = image(size, 2, seed)
    smap = wb.symmetry_map(model, x[:1])
    assert [s.group.name for s in streams(smap)] == ["orthogonal_ones_with_sign" if fold else "permutation_with_sign"] * 2
    assert sum(s.name.endswith(".heads") for s in smap) == 2 * depth
    new, t = wb.random_intertwiner(model, seed=seed, example=x)
    assert changed(model, new, x) < 1e-10
    assert wb.verify(model, new, x, transform=t).verdict == "PASS"


class _Masked(nn.Module):
    """timm's WindowAttention given a mask computed from its input's values (timm's own ``dynamic_mask`` computes one
    from shapes only, and fx keeps that block whole)."""

    def __init__(self):
        super().__init__()
        from timm.models.swin_transformer import WindowAttention

        self.a, self.attn, self.b = nn.Linear(3, 8), WindowAttention(8, num_heads=2, window_size=2), nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(self.attn(h, mask=h[:1, :, :1] - h[:1, :, :1].transpose(1, 2)))


def test_a_mask_computed_in_the_forward_is_refused():
    _timm()
    model, x = randomised(_Masked()), torch.randn(2, 4, 3, dtype=F64)
    smap = wb.symmetry_map(model, x)
    why = " ".join(r for _, r in smap.skipped)
    assert "attn (WindowAttention): called with a mask that is not None or a buffer of the model" in why
    assert not any(s.name.startswith("attn.") for s in smap)
    new, _ = wb.random_intertwiner(model, seed=0, example=x)
    assert changed(model, new, x) < 1e-10


class _Rolled(nn.Module):
    """Linear → roll → Linear on ``[B, T, C]``: a roll over the tokens keeps the hidden space, one over the channels
    (or the flattened tensor) mixes it."""

    def __init__(self, dims):
        super().__init__()
        self.a, self.b, self.dims = nn.Linear(3, 4), nn.Linear(4, 2), dims

    def forward(self, x):
        return self.b(torch.roll(self.a(x), 1, self.dims) if self.dims is not None else torch.roll(self.a(x), 1))


@pytest.mark.parametrize("dims,kept", [((1,), True), (1, True), ((2,), False), ((0,), False), (None, False)])
def test_roll_keeps_channels_only_along_positions(dims, kept):
    model = randomised(_Rolled(dims))
    x = torch.randn(2, 5, 3, dtype=F64)
    smap = wb.symmetry_map(model, x)
    assert ("a" in {s.name for s in smap}) == kept
    new, _ = wb.random_intertwiner(model, seed=1, example=x)
    assert changed(model, new, x) < 1e-10
    if not kept:
        assert "torch.roll" in dict(smap.skipped).get("a", "") or "roll" in " ".join(r for _, r in smap.skipped)


class _Padded(nn.Module):
    """Linear → F.pad → Linear on ``[B, H, W, C]``: zeros at new positions keep the hidden space; on the channels they
    embed it in a wider one (not understood channels-last: frozen)."""

    def __init__(self, pad):
        super().__init__()
        self.a, self.b, self.pad = nn.Linear(3, 4), nn.Linear(4 + sum(pad[:2]), 2), pad

    def forward(self, x):
        return self.b(nn.functional.pad(self.a(x), self.pad))


@pytest.mark.parametrize("pad,kept", [((0, 0, 0, 1, 0, 2), True), ((0, 0, 1, 1), True), ((0, 1, 0, 1), False),
                                      ((0, 0, 0, 0, 0, 0, 1, 0), False)])
def test_a_channels_last_padding_keeps_channels_only_at_positions(pad, kept):
    model = randomised(_Padded(pad))
    x = torch.randn(2, 3, 3, 3, dtype=F64)
    smap = wb.symmetry_map(model, x)
    assert ("a" in {s.name for s in smap}) == kept
    new, _ = wb.random_intertwiner(model, seed=1, example=x)
    assert changed(model, new, x) < 1e-10


# ------------------------------------------------------------------ Swin V2 (timm.models.swin_transformer_v2, _cr)
def test_swin_v2_keeps_its_sites():
    """V2's cosine window attention (q, k normalised per head, a logit scale, a continuous position bias MLP) stays
    traced and frozen, as before: its MLPs' GELU units and the bias MLPs' ReLU units are its sites."""
    model, x = swin("swinv2_tiny_window8_256"), image()
    smap = wb.symmetry_map(model, x[:1])
    expected = {(f"layers.{s}.blocks.{b}.{site}", n, g) for s, d in ((0, 16), (1, 32)) for b in range(2)
                for site, n, g in (("attn.cpb_mlp.1", 512, "scaled_permutation"), ("mlp.fc1", 4 * d, "permutation"))}
    assert {(s.name, s.n, s.group.name) for s in smap} == expected
    new, _ = wb.random_intertwiner(model, seed=0, example=x)
    assert changed(model, new, x) < 1e-10


def test_swin_v2_cr_post_norm_stream_says_its_group_is_not_derived():
    """V2 CR's blocks are post-norm, x + LN(f(x)): the LN writes the stream, its input moving by the same element.
    s·P passes it (γ ↦ P·γ, β ↦ s·P·β: LN(s·P·a) = s·P·LN(a)); the site says the exact group is not derived."""
    model, x = swin("swinv2_cr_tiny_224"), image()
    smap = wb.symmetry_map(model, x[:1])
    (s,) = streams(smap)  # the last stage's (the first is read by V2 CR's merge, which this backend does not read)
    assert (s.name, s.n, s.group.name) == ("stages.1.downsample.reduction", 32, "permutation_with_sign")
    assert any("post-norm" in n and "not derived" in n for n in s.notes)
    assert not any("the exact group is larger" in n or "without the shear" in n for n in s.notes)  # (V1's claims)
    assert {"stages.1.blocks.0.norm1.weight", "stages.1.blocks.1.attn.proj"} <= {p.name for p in s.writers}
    minus = ScaledPermutation(torch.randperm(s.n, generator=torch.Generator().manual_seed(2)),
                              torch.full((s.n,), -1.0, dtype=F64))
    assert changed(model, force(model, s.name, minus, x), x) < 1e-10
    for seed in range(2):
        new, t = wb.random_intertwiner(model, seed=seed, example=x)
        assert changed(model, new, x) < 1e-10
        assert wb.verify(model, new, x, transform=t).verdict == "PASS"
    assert changed(model, force(model, s.name, Dense(haar(s.n, 7)), x), x) > 1e-3


@pytest.mark.parametrize("rel_pos, rope", [(True, False), (False, True)])
def test_sam_s_attention_is_not_taken_for_the_plain_form(rel_pos, rope):
    """timm names SAM's attention ``Attention`` too (vision_transformer_sam), with qkv and proj like the plain one; but
    it adds to its scores a bias computed from the queries and its own tables (``rel_pos_h``, ``rel_pos_w``), or
    rotates q and k (``use_rope``). Once the channels-last window padding passed (this file's F.pad rule), the plain
    form's per-head GL reached it, and a random transform changed its float64 output by 9.8 (the timm sweep's
    ``samvit_base_patch16_224`` row said WRONG). Its heads are left alone, and the function is kept, computed here."""
    timm = _timm()
    model = timm.create_model("samvit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=16,
                              depth=2, num_heads=2, window_size=2, global_attn_indexes=(1,), neck_chans=8,
                              num_classes=5, use_rel_pos=rel_pos, use_rope=rope, ref_feat_shape=((4, 4), (2, 2)) if rope else None)
    model = randomised(model)
    x = image()
    smap = wb.symmetry_map(model, x[:1])
    assert not [s for s in smap if s.name.endswith((".qk.0", ".ov.0", ".heads"))]
    assert any("vision_transformer_sam.Attention is not the attention derived here" in why for _, why in smap.skipped)
    for seed in range(3):
        new, _ = wb.random_intertwiner(model, seed=seed, example=x[:1])
        assert changed(model, new, x) < 1e-10
