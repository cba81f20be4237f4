"""Numerical checks of docs/DERIVATIONS.md, independent of workbench's own symmetry code.

Every check builds a construct with random float64 weights, applies an element of the derived group by
editing the weights by hand (writers' rows by M, readers' columns by φ(M)⁻¹, norms and kernels as the
derivation says), and compares the outputs directly: max |y' − y| / max |y| ≤ 1e-10 per output. Each
construct also has a negative control, an element just outside the derived group, which must fail.
Nothing here imports workbench: elements are sampled with plain torch so the check cannot share a bug
with the code it will later check.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings, strategies as st
from torch import nn

F64 = torch.float64
TOL, FAIL = 1e-10, 1e-5  # an exact symmetry is at rounding; a broken one is far above it
SETTINGS = settings(max_examples=30, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Every op here is tiny: on a loaded 2-core machine a second torch thread made a 3×3 QR take ~15 ms."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel_err(new: torch.Tensor, ref: torch.Tensor) -> float:
    return ((new - ref).abs().max() / ref.abs().max()).item()


def same(new, ref):
    assert rel_err(new, ref) <= TOL, rel_err(new, ref)


def differs(new, ref):
    assert rel_err(new, ref) > FAIL, rel_err(new, ref)


# ---- group elements as dense float64 matrices, sampled with plain torch --------------------------------
def perm(n, g):
    """A random permutation matrix P, (P x)_i = x_{p_i}."""
    return torch.eye(n, dtype=F64)[torch.randperm(n, generator=g)]


def pos_diag(n, g, spread=0.5):
    return torch.diag(torch.exp(spread * torch.randn(n, generator=g, dtype=F64)))


def signs(n, g):
    return torch.diag(torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(F64))


def haar(n, g):
    """A Haar-random orthogonal matrix (QR of a Gaussian, columns signed by R's diagonal)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def gl(n, g):
    """A random, well-conditioned invertible matrix."""
    return haar(n, g) @ pos_diag(n, g) @ haar(n, g)


def rotation_fixing_ones(n, g):
    """R ∈ O(n) with R·1 = 1: Haar on the complement of the all-ones vector."""
    start = torch.cat([torch.ones(n, 1, dtype=F64), torch.randn(n, n - 1, generator=g, dtype=F64)], 1)
    basis, _ = torch.linalg.qr(start)  # first column ±1/√n, the rest an orthonormal basis of 1⊥
    inner = torch.eye(n, dtype=F64)
    inner[1:, 1:] = haar(n - 1, g)
    return basis @ inner @ basis.T


def shear(n, g):
    """I + 1·aᵀ: adds the same number aᵀx to every coordinate (invisible to a mean-subtracting norm)."""
    a = 0.5 * torch.randn(n, generator=g, dtype=F64) / math.sqrt(n)
    return torch.eye(n, dtype=F64) + torch.ones(n, 1, dtype=F64) @ a[None]


def sign(g):
    return -1.0 if torch.rand(1, generator=g).item() < 0.5 else 1.0


blockdiag = torch.block_diag


def randomise(model, g):
    """Every parameter random (norm gains around 1 and distinct, biases nonzero): no accidental symmetry."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # a norm's gain
                p.copy_(1 + 0.4 * torch.randn(p.shape, generator=g, dtype=F64))
            elif p.ndim == 1:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=F64))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64) / math.sqrt(max(fan_in, 1)))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g, dtype=F64))
                m.running_var.copy_(torch.exp(0.5 * torch.randn(m.running_var.shape, generator=g, dtype=F64)))
    return model.eval()


def edited(model, sd):
    """A copy of ``model`` carrying the state dict ``sd`` (the original is untouched)."""
    new = copy.deepcopy(model)
    new.load_state_dict(sd)
    return new.eval()


def rows(w, m):  # writer: the output axis (0) moves by m
    return torch.einsum("ij,j...->i...", m, w)


def cols(w, m):  # reader: the input axis (1) moves by m⁻¹
    return torch.einsum("oj...,ji->oi...", w, torch.linalg.inv(m))


def write(sd, name, m):
    """A writer (Linear or conv) of a site: rows and bias by m."""
    sd[name + ".weight"] = rows(sd[name + ".weight"], m)
    if name + ".bias" in sd:
        sd[name + ".bias"] = m @ sd[name + ".bias"]


def read(sd, name, m):
    """A reader of a site: columns by m⁻¹."""
    sd[name + ".weight"] = cols(sd[name + ".weight"], m)


def hidden_site(sd, writer, reader, m):
    write(sd, writer, m)
    read(sd, reader, m)


def fold_ln(sd, ln, readers):
    """Fold LayerNorm ``ln``'s gain into its readers' columns and its bias into their biases."""
    gamma, beta = sd[f"{ln}.weight"].clone(), sd[f"{ln}.bias"].clone()
    for r in readers:
        w = sd[f"{r}.weight"]
        sd[f"{r}.bias"] = sd[f"{r}.bias"] + torch.einsum("oi...,i->o", w, beta)
        sd[f"{r}.weight"] = w * gamma.view(1, -1, *[1] * (w.ndim - 2))
    sd[f"{ln}.weight"], sd[f"{ln}.bias"] = torch.ones_like(gamma), torch.zeros_like(beta)
    return sd


# ---- 1. token-wise linear maps: an MLP on the last axis of (B, T, C) or channels-last (B, H, W, C) -----
@SETTINGS
@given(c=st.integers(2, 6), hidden=st.integers(2, 8), act=st.sampled_from(["gelu", "relu"]),
       channels_last=st.booleans(), seed=st.integers(0, 2**16))
def test_tokenwise_mlp_hidden_site(c, hidden, act, channels_last, seed):
    """GELU hidden units: P; ReLU: P·D₊. A positive scaling under GELU and a rotation under ReLU fail."""
    g = torch.Generator().manual_seed(seed)
    act_module = nn.GELU() if act == "gelu" else nn.ReLU()
    mlp = randomise(nn.Sequential(nn.Linear(c, hidden), act_module, nn.Linear(hidden, c)).double(), g)
    x = torch.randn((2, 3, 4, c) if channels_last else (2, 5, c), generator=g, dtype=F64)
    pre = mlp[0](x).flatten(0, -2)
    # a ReLU unit that never switches on this data acts linearly (or as zero), and then more maps pass; and where
    # every example's units share one sign (all on, or all off), a small rotation keeps each example in its orthant
    # and passes too (seed 19978, c = hidden = 2: both rows of W1 nearly parallel): the control needs an example
    # with one unit on and another off
    assume(act == "gelu" or (bool(((pre > 0).any(0) & (pre < 0).any(0)).all())
                             and bool(((pre > 0).any(1) & (pre < 0).any(1)).any())))
    m = perm(hidden, g) @ (pos_diag(hidden, g) if act == "relu" else torch.eye(hidden, dtype=F64))
    bad = pos_diag(hidden, g, 1.0) if act == "gelu" else haar(hidden, g)

    def moved(m):
        sd = mlp.state_dict()
        hidden_site(sd, "0", "2", m)
        return edited(mlp, sd)(x)

    same(moved(m), mlp(x))
    differs(moved(bad), mlp(x))


# ---- 2. pre-LN residual streams: a small ViT (patch conv, class token, positions, MHA, GELU MLP) ------
class ViT(nn.Module):
    def __init__(self, c, heads, layers, hidden, patch=2, image=4, classes=3):
        super().__init__()
        self.patch = nn.Conv2d(3, c, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, c))
        self.pos = nn.Parameter(torch.zeros(1, 1 + (image // patch) ** 2, c))
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(c), attn=nn.MultiheadAttention(c, heads, batch_first=True), ln2=nn.LayerNorm(c),
            fc1=nn.Linear(c, hidden), fc2=nn.Linear(hidden, c))) for _ in range(layers))
        self.ln = nn.LayerNorm(c)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(x), -1, -1), t], 1) + self.pos
        for b in self.blocks:
            h = b.ln1(t)
            t = t + b.attn(h, h, h, need_weights=False)[0]
            t = t + b.fc2(F.gelu(b.fc1(b.ln2(t))))
        return self.head(self.ln(t)[:, 0])


def vit_transform(model, g, m, n, s, mode):
    """The ViT's weights moved by the stream element ``m`` (and random head, QK, OV and MLP elements).

    ``n`` is how the norms' outputs move. mode "gain": the norms keep their own gains, which follow the
    element (m = s·P·(I + 1aᵀ), n = P: γ ↦ s·Pγ, β ↦ Pβ); "folded": every gain and bias folded into the
    readers first (m = s·R·(I + 1aᵀ), n = s·R); "conjugate": gains kept, readers absorb Γ·n·Γ⁻¹.
    """
    c, n_heads = model.ln.normalized_shape[0], model.blocks[0].attn.num_heads
    d = c // n_heads
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    lns = {"ln": ["head"]}
    for i in range(len(model.blocks)):
        lns |= {f"blocks.{i}.ln1": [f"blocks.{i}.attn.in_proj"], f"blocks.{i}.ln2": [f"blocks.{i}.fc1"]}
    for i in range(len(model.blocks)):  # nn.MultiheadAttention's packed [q; k; v], renamed to look like a Linear
        for k in ("weight", "bias"):
            sd[f"blocks.{i}.attn.in_proj.{k}"] = sd.pop(f"blocks.{i}.attn.in_proj_{k}")
    if mode == "folded":
        for ln, readers in lns.items():
            fold_ln(sd, ln, readers)
    write(sd, "patch", m)
    sd["cls"], sd["pos"] = sd["cls"] @ m.T, sd["pos"] @ m.T
    for ln, readers in lns.items():
        gam, bet = sd[f"{ln}.weight"], sd[f"{ln}.bias"]
        for r in readers:
            w, b = sd[f"{r}.weight"], sd[f"{r}.bias"]
            if mode == "conjugate":
                new = w @ torch.diag(gam) @ n.T @ torch.diag(1 / gam)
                sd[f"{r}.bias"], sd[f"{r}.weight"] = b + w @ bet - new @ bet, new
            else:
                sd[f"{r}.weight"] = w @ n.T
        if mode == "gain":
            sd[f"{ln}.weight"], sd[f"{ln}.bias"] = s * (n @ gam), n @ bet
    for i in range(len(model.blocks)):
        p = f"blocks.{i}."
        write(sd, p + "attn.out_proj", m), write(sd, p + "fc2", m)
        hidden_site(sd, p + "fc1", p + "fc2", perm(sd[p + "fc1.bias"].numel(), g))  # GELU hidden units: P
        # per head: QK by A (queries) and A⁻ᵀ (keys), OV by B (values) and B⁻¹ (out columns); then a head permutation
        w, b = sd.pop(p + "attn.in_proj.weight").view(3, n_heads, d, c), sd.pop(p + "attn.in_proj.bias").view(3, n_heads, d)
        o = sd[p + "attn.out_proj.weight"].view(c, n_heads, d)
        tau = torch.randperm(n_heads, generator=g)
        for h in range(n_heads):
            a, v = gl(d, g), gl(d, g)
            for k, mat in enumerate((a, torch.linalg.inv(a).T, v)):
                w[k, h], b[k, h] = mat @ w[k, h], mat @ b[k, h]
            o[:, h] = o[:, h] @ torch.linalg.inv(v)
        sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = w[:, tau].reshape(3 * c, c), b[:, tau].reshape(3 * c)
        sd[p + "attn.out_proj.weight"] = o[:, tau].reshape(c, c)
    return edited(model, sd)


@SETTINGS
@given(d=st.integers(1, 3), n_heads=st.integers(1, 3), layers=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_vit_pre_ln_stream(d, n_heads, layers, seed):
    """All stream readers are LayerNorms, so the stream takes s·R·(I + 1aᵀ) (R·1 = 1, s = ±1) with the
    gains folded, s·P·(I + 1aᵀ) with the gains following P, and the full set again when unfolded readers
    absorb Γ·R·Γ⁻¹. A Haar rotation (R·1 ≠ ±1) fails; so does a rotation fixing 1 with gains kept."""
    g = torch.Generator().manual_seed(seed)
    d = max(d, 3 - n_heads)  # at least 2 channels: a 1-channel LayerNorm outputs a constant
    c = d * n_heads
    model = randomise(ViT(c, n_heads, layers, hidden=2 * c).double(), g)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=F64)
    y = model(x)
    s = sign(g)
    p, r, sh = perm(c, g), rotation_fixing_ones(c, g), shear(c, g)
    same(vit_transform(model, g, s * p @ sh, p, s, "gain")(x), y)
    same(vit_transform(model, g, s * r @ sh, s * r, s, "folded")(x), y)
    same(vit_transform(model, g, s * r @ sh, s * r, s, "conjugate")(x), y)
    if c > 2:  # a Haar rotation moves 1 off ±1; n = 2 has only R·1 = ±1 or a reflection mapping 1 elsewhere
        q = haar(c, g)
        differs(vit_transform(model, g, q, q, 1.0, "folded")(x), y)
        differs(vit_transform(model, g, r, r, 1.0, "gain")(x), y)


class SwinStage(nn.Module):
    """A stream on a (B, H, W, C) grid: token-wise embedding, a pre-LN MLP block behind a shifted window
    (torch.roll: a token-axis op), then Swin's patch merging: 2×2 neighbours concatenated, LN(4C), Linear."""

    def __init__(self, c):
        super().__init__()
        self.embed, self.ln1, self.fc1, self.fc2 = nn.Linear(3, c), nn.LayerNorm(c), nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.merge_ln, self.reduce = nn.LayerNorm(4 * c), nn.Linear(4 * c, 2 * c, bias=False)

    def forward(self, x):
        t = self.embed(x)
        t = t + torch.roll(self.fc2(F.gelu(self.fc1(self.ln1(torch.roll(t, (1, 1), (1, 2)))))), (-1, -1), (1, 2))
        t = torch.cat([t[:, 0::2, 0::2], t[:, 1::2, 0::2], t[:, 0::2, 1::2], t[:, 1::2, 1::2]], -1)
        return self.reduce(self.merge_ln(t))


@SETTINGS
@given(c=st.integers(3, 6), seed=st.integers(0, 2**16))
def test_swin_patch_merging_removes_the_shear(c, seed):
    """Patch merging normalises 4C coordinates of four tokens at once: block-diag(M, M, M, M) must itself
    pass a LayerNorm, which leaves M ∈ O(C) with M·1 = ±1 (gains folded) and removes I + 1aᵀ."""
    g = torch.Generator().manual_seed(seed)
    model = randomise(SwinStage(c).double(), g)
    x = torch.randn(2, 4, 4, 3, generator=g, dtype=F64)

    def moved(m, n):
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        fold_ln(sd, "ln1", ["fc1"])
        gam, bet = sd["merge_ln.weight"], sd["merge_ln.bias"]  # fold by hand: the reader has no bias,
        sd["reduce.weight"] = sd["reduce.weight"] * gam  # so the merge LN keeps β, which moves with the element
        write(sd, "embed", m), write(sd, "fc2", m), read(sd, "fc1", n)
        big = blockdiag(n, n, n, n)
        sd["merge_ln.weight"], sd["merge_ln.bias"] = torch.ones_like(gam), big @ (bet / gam)
        sd["reduce.weight"] = sd["reduce.weight"] @ big.T
        return edited(model, sd)(x)

    s, r = sign(g), rotation_fixing_ones(c, g)
    same(moved(s * r, s * r), model(x))
    differs(moved(r @ shear(c, g), r), model(x))  # passes ln1 (a per-token LN) but not the merge LN


class Mixer(nn.Module):
    def __init__(self, c, tokens, token_hidden, channel_hidden):
        super().__init__()
        self.embed, self.ln1, self.ln2, self.ln = nn.Linear(3, c), nn.LayerNorm(c), nn.LayerNorm(c), nn.LayerNorm(c)
        self.tok1, self.tok2 = nn.Linear(tokens, token_hidden), nn.Linear(token_hidden, tokens)
        self.ch1, self.ch2, self.head = nn.Linear(c, channel_hidden), nn.Linear(channel_hidden, c), nn.Linear(c, 2)

    def forward(self, x):  # x: (B, T, 3)
        t = self.embed(x)
        t = t + self.tok2(F.gelu(self.tok1(self.ln1(t).transpose(1, 2)))).transpose(1, 2)  # mixes tokens, per channel
        t = t + self.ch2(F.gelu(self.ch1(self.ln2(t))))
        return self.head(self.ln(t).mean(1))


@SETTINGS
@given(c=st.integers(3, 6), tokens=st.integers(2, 5), th=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_mixer_token_mixing(c, tokens, th, seed):
    """The token MLP's GELU acts on (token-hidden × channel) entries, so what reaches it moves by P only:
    the channel stream takes s·P·(I + 1aᵀ) (the sign absorbed by ln1's gain and the token MLP's output
    weights, the shear invisible to every norm), never a rotation; the token-hidden space is its own site, P."""
    g = torch.Generator().manual_seed(seed)
    model = randomise(Mixer(c, tokens, th, 2 * c).double(), g)
    x = torch.randn(2, tokens, 3, generator=g, dtype=F64)

    def moved(m, n, s, tok, folded=False):
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        if folded:  # ln2 and ln fold into their linear readers; ln1 cannot (its reader is the token MLP)
            fold_ln(sd, "ln2", ["ch1"]), fold_ln(sd, "ln", ["head"])
        for ln in ("ln1", "ln2", "ln"):
            sd[f"{ln}.weight"], sd[f"{ln}.bias"] = s * (n @ sd[f"{ln}.weight"]), n @ sd[f"{ln}.bias"]
        write(sd, "embed", m), write(sd, "ch2", m), read(sd, "ch1", n), read(sd, "head", n)
        hidden_site(sd, "tok1", "tok2", tok)
        # W₂, b₂ act on tokens: a scalar on the channel axis passes through them
        sd["tok2.weight"], sd["tok2.bias"] = s * sd["tok2.weight"], s * sd["tok2.bias"]
        hidden_site(sd, "ch1", "ch2", perm(2 * c, g))
        return edited(model, sd)(x)

    p, y, s = perm(c, g), model(x), sign(g)
    same(moved(s * p @ shear(c, g), p, s, perm(th, g)), y)
    differs(moved(p, p, 1.0, perm(th, g) @ pos_diag(th, g, 1.0)), y)  # a token-hidden scaling under GELU
    d = pos_diag(c, g, 1.0)
    differs(moved(d, d, 1.0, perm(th, g)), y)  # a channel scaling: no LayerNorm passes it
    r = rotation_fixing_ones(c, g)
    differs(moved(r, r, 1.0, perm(th, g), folded=True), y)  # a rotation reaching the token MLP's GELU


# ---- 3. grouped and depthwise convolutions ----------------------------------------------------------
def group_dense(w, groups):
    """A grouped conv kernel (C_out, C_in/g, k, k) as its dense (C_out, C_in, k, k) kernel, zero off the blocks."""
    c_out, a = w.shape[:2]
    dense = torch.zeros(c_out, a * groups, *w.shape[2:], dtype=w.dtype)
    b = c_out // groups
    for j in range(groups):
        dense[j * b:(j + 1) * b, j * a:(j + 1) * a] = w[j * b:(j + 1) * b]
    return dense


def block_monomial(sigma, blocks):
    """σ ⊗ blocks: output block j is blocks[j] applied to input block σ(j)."""
    size = blocks[0].shape[0]
    m = torch.zeros(size * len(blocks), size * len(blocks), dtype=F64)
    for j, (src, blk) in enumerate(zip(sigma.tolist(), blocks)):
        m[j * size:(j + 1) * size, src * size:(src + 1) * size] = blk
    return m


@SETTINGS
@given(groups=st.integers(1, 4), a=st.integers(1, 3), b=st.integers(1, 3), k=st.sampled_from([1, 3]),
       seed=st.integers(0, 2**16))
def test_grouped_conv(groups, a, b, k, seed):
    """A g-group conv takes M_in = σ⊗diag(A_j), M_out = σ⊗diag(B_j) (one permutation σ of whole groups,
    any A_j ∈ GL(C_in/g), B_j ∈ GL(C_out/g)); a permutation that moves one input channel to another group
    needs a kernel with entries off the blocks, which a grouped conv cannot hold."""
    g = torch.Generator().manual_seed(seed)
    conv = randomise(nn.Conv2d(groups * a, groups * b, k, padding=k // 2, groups=groups).double(), g)
    x = torch.randn(2, groups * a, 5, 5, generator=g, dtype=F64)
    sigma = torch.randperm(groups, generator=g)
    m_in = block_monomial(sigma, [gl(a, g) for _ in range(groups)])
    m_out = block_monomial(sigma, [gl(b, g) for _ in range(groups)])
    dense = cols(rows(group_dense(conv.weight.detach(), groups), m_out), m_in)
    grouped = torch.cat([dense[j * b:(j + 1) * b, j * a:(j + 1) * a] for j in range(groups)])
    assert rel_err(group_dense(grouped, groups), dense) <= TOL  # nothing off the blocks
    y = F.conv2d(torch.einsum("ij,bjhw->bihw", m_in, x), grouped, m_out @ conv.bias.detach(), padding=k // 2, groups=groups)
    same(y, torch.einsum("ij,bjhw->bihw", m_out, conv(x)))
    if groups > 1:  # swap the first channels of groups 0 and 1
        swap = torch.arange(groups * a)
        swap[0], swap[a] = a, 0
        crossing = torch.eye(groups * a, dtype=F64)[swap]
        needed = cols(group_dense(conv.weight.detach(), groups), crossing)
        on_blocks = torch.cat([needed[j * b:(j + 1) * b, j * a:(j + 1) * a] for j in range(groups)])
        assert rel_err(group_dense(on_blocks, groups), needed) > FAIL


ACTS = {"relu": F.relu, "relu6": F.relu6, "hardswish": F.hardswish, "identity": lambda t: t}


@SETTINGS
@given(e=st.integers(2, 6), act=st.sampled_from(list(ACTS)), seed=st.integers(0, 2**16))
def test_depthwise_conv_couples_permutations_not_scalings(e, act, seed):
    """1×1 expand → act → depthwise 3×3 (bias) → act → 1×1 project. One permutation on both sides of the
    depthwise conv; independent scalings D_in, D_out (kernel k_c ↦ d_out,c/d_in,c · k_π(c), bias ↦ D_out·P·b),
    of any sign as far as the conv goes; the activations decide: ReLU D₊, ReLU6/hardswish none, none: any."""
    g = torch.Generator().manual_seed(seed)
    net = randomise(nn.ModuleDict(dict(expand=nn.Conv2d(3, e, 1), dw=nn.Conv2d(e, e, 3, padding=1, groups=e),
                                       project=nn.Conv2d(e, 2, 1))).double(), g)
    sigma = ACTS[act]

    def run(sd, x, hidden=False):
        h1 = sigma(F.conv2d(x, sd["expand.weight"], sd["expand.bias"]))
        h2 = sigma(F.conv2d(h1, sd["dw.weight"], sd["dw.bias"], padding=1, groups=e))
        return (h1, h2) if hidden else F.conv2d(h2, sd["project.weight"], sd["project.bias"])

    def moved(p_in, d_in, p_out, d_out):
        sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
        m_in = d_in @ p_in  # (D·P·x)_c = d_c·x_π(c): the scaling is indexed after the permutation
        write(sd, "expand", m_in)
        ratio = torch.diag(d_out) / torch.diag(d_in)
        sd["dw.weight"] = ratio[:, None, None, None] * rows(sd["dw.weight"], p_out)
        sd["dw.bias"] = d_out @ p_out @ sd["dw.bias"]
        sd["project.weight"] = cols(sd["project.weight"], d_out @ p_out)
        return sd

    x = torch.randn(2, 3, 5, 5, generator=g, dtype=F64)
    # a unit that is zero on every input has a larger group (anything acts on it): keep generic examples
    assume(all(bool((h.amax((0, 2, 3)) > 0).all()) for h in run(net.state_dict(), x, hidden=True)))
    ref, p, one = run(net.state_dict(), x), perm(e, g), torch.eye(e, dtype=F64)
    allowed = {"relu": lambda: pos_diag(e, g), "identity": lambda: signs(e, g) @ pos_diag(e, g)}.get(act, lambda: one)
    same(run(moved(p, allowed(), p, allowed()), x), ref)
    q = perm(e, g)
    if not torch.equal(q, p):
        differs(run(moved(p, one, q, one), x), ref)  # different permutations before and after
    if act != "identity":  # a scaling the activation does not allow (ReLU: a sign; the others: any)
        # ReLU: negate every channel (one flipped channel may be dead); ReLU6 is homogeneous below 6, so scale
        # each channel's largest pre-activation to 12, past the clip
        top = F.conv2d(x, net.expand.weight, net.expand.bias).amax((0, 2, 3)).detach()
        bad = {"relu": -pos_diag(e, g), "relu6": torch.diag(12 / top)}.get(act, 8 * pos_diag(e, g))
        differs(run(moved(p, bad, p, one), x), ref)


# ---- 4. ConvNeXt: the depthwise conv reads the stream channel-wise, LayerNorms end every stage --------
def ln2d(ln, x):  # a LayerNorm over channels of (B, C, H, W), as torchvision's LayerNorm2d
    return ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.stem, self.stem_ln = nn.Conv2d(3, c, 2, 2), nn.LayerNorm(c)
        block = lambda c: nn.ModuleDict(dict(dw=nn.Conv2d(c, c, 7, padding=3, groups=c), ln=nn.LayerNorm(c),
                                             fc1=nn.Linear(c, 4 * c), fc2=nn.Linear(4 * c, c)))
        self.stage1, self.stage2 = nn.ModuleList([block(c), block(c)]), nn.ModuleList([block(2 * c)])
        self.ls1, self.ls2 = nn.Parameter(torch.ones(2, c)), nn.Parameter(torch.ones(1, 2 * c))  # layer scale γ
        self.down_ln, self.down = nn.LayerNorm(c), nn.Conv2d(c, 2 * c, 2, 2)
        self.head_ln, self.head = nn.LayerNorm(2 * c), nn.Linear(2 * c, 3)

    def forward(self, x):
        x = ln2d(self.stem_ln, self.stem(x))
        for blocks, ls, last in ((self.stage1, self.ls1, False), (self.stage2, self.ls2, True)):
            for b, gamma in zip(blocks, ls):
                h = b.ln(b.dw(x).permute(0, 2, 3, 1))
                x = x + (gamma * b.fc2(F.gelu(b.fc1(h)))).permute(0, 3, 1, 2)
            if not last:
                x = self.down(ln2d(self.down_ln, x))
        return self.head(self.head_ln(x.mean((2, 3))))


def convnext_transform(model, g, stage_elements, block_signs):
    """Stage k's stream moves by stage_elements[k] = D·P (the derivation: s·P); each depthwise output by
    t·P with its own sign t; the MLP hidden units by their own permutation."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    (m1, p1), (m2, p2) = stage_elements
    s1, s2 = torch.diag(m1 @ p1.T), torch.diag(m2 @ p2.T)  # the scalings D of D·P
    sd["stem.weight"], sd["stem.bias"] = rows(sd["stem.weight"], p1), p1 @ sd["stem.bias"]  # conv output: P
    sd["stem_ln.weight"], sd["stem_ln.bias"] = m1 @ sd["stem_ln.weight"], m1 @ sd["stem_ln.bias"]  # LN output: D·P
    for name, (m, p, s), n in (("stage1", (m1, p1, s1), 2), ("stage2", (m2, p2, s2), 1)):
        for i in range(n):
            b, t = f"{name}.{i}.", block_signs.pop()
            dw_out = t * p  # the depthwise output moves by t·P: kernel rows ↦ (t / d_in)·k_π(c)
            sd[b + "dw.weight"] = (t / s)[:, None, None, None] * rows(sd[b + "dw.weight"], p)
            sd[b + "dw.bias"] = dw_out @ sd[b + "dw.bias"]
            sd[b + "ln.weight"], sd[b + "ln.bias"] = t * (p @ sd[b + "ln.weight"]), p @ sd[b + "ln.bias"]  # LN output: P
            hid = perm(sd[b + "fc1.bias"].numel(), g)
            sd[b + "fc1.weight"], sd[b + "fc1.bias"] = hid @ cols(sd[b + "fc1.weight"], p), hid @ sd[b + "fc1.bias"]
            sd[b + "fc2.weight"], sd[b + "fc2.bias"] = cols(rows(sd[b + "fc2.weight"], p), hid), p @ sd[b + "fc2.bias"]
            ls = "ls1" if name == "stage1" else "ls2"
            sd[ls][i] = s * (p @ sd[ls][i])  # the layer scale takes the stream's scaling
    # the stage-end LayerNorms: input D·P, output P — only possible when D = s·I, s = ±1
    for ln, (m, p), reader in (("down_ln", (m1, p1), "down"), ("head_ln", (m2, p2), "head")):
        s = torch.diag(m @ p.T)[0]
        sd[ln + ".weight"], sd[ln + ".bias"] = s * (p @ sd[ln + ".weight"]), p @ sd[ln + ".bias"]
        sd[reader + ".weight"] = cols(sd[reader + ".weight"], p)
    sd["down.weight"], sd["down.bias"] = rows(sd["down.weight"], m2), m2 @ sd["down.bias"]
    return edited(model, sd)


@SETTINGS
@given(c=st.integers(3, 4), seed=st.integers(0, 2**16))  # with 2 channels an LN output is nearly a sign: too weak a control
def test_convnext_stream_is_signed_permutation_of_whole_stage(c, seed):
    """Within a stage the stream takes s·P (one sign, one permutation); each depthwise output has its own
    sign. A non-uniform positive scaling passes the depthwise convs, the stem LN and the layer scales and
    fails only at the stage-end LayerNorm."""
    g = torch.Generator().manual_seed(seed)
    model = randomise(ConvNeXt(c).double(), g)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=F64)
    p1, p2 = perm(c, g), perm(2 * c, g)
    same(convnext_transform(model, g, [(sign(g) * p1, p1), (sign(g) * p2, p2)], [sign(g) for _ in range(3)])(x), model(x))
    d = pos_diag(c, g, 1.0)
    d[0, 0] = 1.0  # the stage-end LN treats the element as if it were d₁₁·P
    differs(convnext_transform(model, g, [(d @ p1, p1), (p2, p2)], [1.0, 1.0, 1.0])(x), model(x))


# ---- 5. squeeze-excite: x * gate(x) --------------------------------------------------------------------
GATES = {"sigmoid": torch.sigmoid, "hardsigmoid": F.hardsigmoid}


@SETTINGS
@given(c=st.integers(2, 6), r=st.integers(1, 4), gate=st.sampled_from(list(GATES)), seed=st.integers(0, 2**16))
def test_squeeze_excite(c, r, gate, seed):
    """x (written by a linear conv: its own group is GL) through SE: x takes D·P with D nonzero of any sign
    (the product passes scalings through), the gate's rows take the same P and nothing else; the SE hidden
    layer (ReLU) is its own site, P·D₊. A gate permuted differently, or a scaled gate input, fails."""
    g = torch.Generator().manual_seed(seed)
    net = randomise(nn.ModuleDict(dict(a=nn.Conv2d(3, c, 1), fc1=nn.Conv2d(c, r, 1), fc2=nn.Conv2d(r, c, 1),
                                       b=nn.Conv2d(c, 2, 1))).double(), g)

    def run(sd, x):
        h = F.conv2d(x, sd["a.weight"], sd["a.bias"])
        z = F.relu(F.conv2d(h.mean((2, 3), keepdim=True), sd["fc1.weight"], sd["fc1.bias"]))
        s = GATES[gate](F.conv2d(z, sd["fc2.weight"], sd["fc2.bias"]))
        return F.conv2d(h * s, sd["b.weight"], sd["b.bias"])

    def moved(m, gate_rows, hidden):
        sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
        sd["a.weight"], sd["a.bias"] = rows(sd["a.weight"], m), m @ sd["a.bias"]
        sd["fc1.weight"], sd["fc1.bias"] = rows(cols(sd["fc1.weight"], m), hidden), hidden @ sd["fc1.bias"]
        sd["fc2.weight"], sd["fc2.bias"] = rows(cols(sd["fc2.weight"], hidden), gate_rows), gate_rows @ sd["fc2.bias"]
        sd["b.weight"] = cols(sd["b.weight"], m)
        return run(sd, x)

    x = 3 * torch.randn(2, 3, 4, 4, generator=g, dtype=F64)  # gate inputs beyond ±3, where hardsigmoid saturates
    ref, p = run(net.state_dict(), x), perm(c, g)
    same(moved(signs(c, g) @ pos_diag(c, g) @ p, p, pos_diag(r, g) @ perm(r, g)), ref)
    q = torch.eye(c, dtype=F64)[[1, 0, *range(2, c)]] @ p  # differs from p in two rows
    differs(moved(p, q, torch.eye(r, dtype=F64)), ref)
    differs(moved(p, 3 * pos_diag(c, g) @ p, torch.eye(r, dtype=F64)), ref)


# ---- 6. torch.cat (DenseNet): a direct sum read by BatchNorms, which absorb any scaling on their input --
class Dense(nn.Module):
    def __init__(self, c0, k):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, c0, 3, padding=1), nn.BatchNorm2d(c0)
        layer = lambda cin: nn.ModuleDict(dict(bn_a=nn.BatchNorm2d(cin), conv_a=nn.Conv2d(cin, 4, 1, bias=False),
                                               bn_b=nn.BatchNorm2d(4), conv_b=nn.Conv2d(4, k, 3, padding=1, bias=False)))
        self.layers = nn.ModuleList([layer(c0), layer(c0 + k)])
        self.bn_f, self.fc = nn.BatchNorm2d(c0 + 2 * k), nn.Linear(c0 + 2 * k, 2)

    def forward(self, x):
        feats = [F.max_pool2d(F.relu(self.bn0(self.stem(x))), 2)]
        for lay in self.layers:
            h = torch.cat(feats, 1)
            feats.append(lay.conv_b(F.relu(lay.bn_b(lay.conv_a(F.relu(lay.bn_a(h)))))))
        return self.fc(F.relu(self.bn_f(torch.cat(feats, 1))).mean((2, 3)))


def bn_reads(sd, bn, m, p, d=None):
    """A BatchNorm (eval) whose input moves by m = D·P and whose output moves by P: μ ↦ m·μ, γ ↦ P·γ / d,
    β ↦ P·β, running variance ↦ P·var (exact: (γ/d)·(d·x − d·μ)/√(var + ε) = γ·(x − μ)/√(var + ε))."""
    d = torch.diag(m @ p.T) if d is None else d
    sd[bn + ".running_mean"] = m @ sd[bn + ".running_mean"]
    sd[bn + ".running_var"] = p @ sd[bn + ".running_var"]
    sd[bn + ".weight"], sd[bn + ".bias"] = (p @ sd[bn + ".weight"]) / d, p @ sd[bn + ".bias"]


@SETTINGS
@given(c0=st.integers(2, 4), k=st.integers(2, 3), seed=st.integers(0, 2**16))
def test_densenet_concatenation(c0, k, seed):
    """cat(piece₀, piece₁, piece₂) takes block-diag(M₀, M₁, M₂): the stem piece (after ReLU and max pool)
    D₊·P, the conv pieces D·P with any signs (every reader is a BatchNorm). A rotation inside a piece fails."""
    g = torch.Generator().manual_seed(seed)
    model = randomise(Dense(c0, k).double(), g)
    with torch.no_grad():  # readers' BN biases up by 0.5: no piece dead after its readers' ReLUs (a dead
        for bn in (model.layers[1].bn_a, model.bn_f):  # channel takes any map, which would blunt the control)
            bn.bias += 0.5
    x = torch.randn(2, 3, 6, 6, generator=g, dtype=F64)

    def moved(pieces, perms, as_if_commuting=False):
        sd = {kk: v.clone() for kk, v in model.state_dict().items()}
        m0, p0 = pieces[0], perms[0]
        sd["stem.weight"], sd["stem.bias"] = rows(sd["stem.weight"], p0), p0 @ sd["stem.bias"]
        for key in ("running_mean", "running_var"):
            sd["bn0." + key] = p0 @ sd["bn0." + key]
        sd["bn0.weight"], sd["bn0.bias"] = m0 @ sd["bn0.weight"], m0 @ sd["bn0.bias"]  # BN output scaled: D₊ only
        for i in range(2):
            sd[f"layers.{i}.conv_b.weight"] = rows(sd[f"layers.{i}.conv_b.weight"], pieces[i + 1])
            m, p = blockdiag(*pieces[:i + 1]), blockdiag(*perms[:i + 1])
            if as_if_commuting:  # the control: BN statistics kept on the rotated piece, its reader rotated
                kept = blockdiag(perms[0], *[torch.eye(k, dtype=F64)] * i)
                bn_reads(sd, f"layers.{i}.bn_a", m, kept, torch.ones(len(m), dtype=F64))
            else:
                bn_reads(sd, f"layers.{i}.bn_a", m, p)
            sd[f"layers.{i}.conv_a.weight"] = cols(sd[f"layers.{i}.conv_a.weight"], p)
        if as_if_commuting:
            kept = blockdiag(perms[0], torch.eye(k, dtype=F64), perms[2])
            bn_reads(sd, "bn_f", blockdiag(*pieces), kept, torch.ones(c0 + 2 * k, dtype=F64))
        else:
            bn_reads(sd, "bn_f", blockdiag(*pieces), blockdiag(*perms))
        sd["fc.weight"] = cols(sd["fc.weight"], blockdiag(*perms))
        return edited(model, sd)(x)

    perms = [perm(c0, g), perm(k, g), perm(k, g)]
    pieces = [pos_diag(c0, g) @ perms[0], signs(k, g) @ pos_diag(k, g) @ perms[1], signs(k, g) @ pos_diag(k, g) @ perms[2]]
    same(moved(pieces, perms), model(x))
    rot = haar(k, g)
    differs(moved([perms[0], rot, perms[2]], [perms[0], rot, perms[2]], as_if_commuting=True), model(x))


# ---- 7. dropout and drop path -------------------------------------------------------------------------
def test_drop_path_train_mode_commutes_with_any_map_and_dropout_only_with_scalings():
    """Eval: both are the identity. Train: drop path multiplies a whole residual branch by one random scalar
    per example, so the same random draws give the same output under any stream map (GL here: no norm);
    dropout masks each unit, so with the same draws a scaling D₊ passes and a permutation does not
    (it passes only in distribution)."""
    g = torch.Generator().manual_seed(0)
    c, hidden = 5, 7
    net = randomise(nn.ModuleDict(dict(embed=nn.Linear(3, c), fc1=nn.Linear(c, hidden), fc2=nn.Linear(hidden, c),
                                       head=nn.Linear(c, 2))).double(), g)
    x = torch.randn(6, 4, 3, generator=g, dtype=F64)

    def run(sd, train):
        torch.manual_seed(1)
        t = F.linear(x, sd["embed.weight"], sd["embed.bias"])
        for _ in range(2):
            h = F.dropout(F.relu(F.linear(t, sd["fc1.weight"], sd["fc1.bias"])), 0.3, train)
            branch = F.linear(h, sd["fc2.weight"], sd["fc2.bias"])
            keep = torch.empty(len(t), 1, 1, dtype=F64).bernoulli_(0.7) / 0.7 if train else 1.0  # drop path
            t = t + keep * branch
        return F.linear(t, sd["head.weight"], sd["head.bias"])

    def moved(m, hid):
        sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
        sd["embed.weight"], sd["embed.bias"] = m @ sd["embed.weight"], m @ sd["embed.bias"]
        sd["fc1.weight"], sd["fc1.bias"] = hid @ cols(sd["fc1.weight"], m), hid @ sd["fc1.bias"]
        sd["fc2.weight"], sd["fc2.bias"] = m @ cols(sd["fc2.weight"], hid), m @ sd["fc2.bias"]
        sd["head.weight"] = cols(sd["head.weight"], m)
        return sd

    base = net.state_dict()
    for train in (False, True):
        same(run(moved(gl(c, g), pos_diag(hidden, g)), train), run(base, train))
    same(run(moved(gl(c, g), perm(hidden, g)), False), run(base, False))
    swap = torch.eye(hidden, dtype=F64)[[1, 0, *range(2, hidden)]]
    differs(run(moved(torch.eye(c, dtype=F64), swap), True), run(base, True))


# ---- 8. channel shuffle and chunk (ShuffleNetV2) ---------------------------------------------------------
def channel_shuffle(x, groups=2):  # torchvision's: reshape to (g, C/g), transpose, flatten
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def shuffle_stage(x, branch, units):
    """A ShuffleNetV2 stage: unit 0 feeds its whole input to two branches (stride-2 unit, stride 1 here);
    units 1.. split the input with chunk(2), pass the first half through and feed the second to a branch."""
    out = channel_shuffle(torch.cat([branch(0, "b1", x), branch(0, "b2", x)], 1))
    for u in range(1, units):
        x1, x2 = out.chunk(2, 1)
        out = channel_shuffle(torch.cat([x1, branch(u, "b2", x2)], 1))
    return branch(units, "final", out)


def route_class(branch_name, i, half, remaining):
    """The derivation's closed form: a branch's channel i sits at p₀ = 2i (branch b1) or 2i + 1 (b2) after its
    unit's shuffle; each later unit passes it through (p ↦ 2p) while p < C/2. Its class is how many units
    pass it through before a conv reads it, at most the units left."""
    p, count = 2 * i + (branch_name == "b2"), 0
    while count < remaining and p < half:
        p, count = 2 * p, count + 1
    return count


@SETTINGS
@given(half=st.sampled_from([2, 4, 6, 8]), units=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_channel_shuffle_and_chunk(half, units, seed):
    """Channel shuffle relabels channels (element S·M·Sᵀ) and chunk needs an element block-diagonal over the
    chunks, so each branch output (ReLU: D₊·P) may only permute channels of one route class. A permutation
    that swaps two channels of one branch from different classes fails."""
    g = torch.Generator().manual_seed(seed)
    branches = [(0, "b1")] + [(u, "b2") for u in range(units)]
    convs = {(u, b): nn.Conv2d(2 * half if u == 0 else half, half, 1).double() for u, b in branches}
    convs[(units, "final")] = nn.Conv2d(2 * half, 3, 1).double()
    for conv in convs.values():
        randomise(conv, g)
    x = torch.randn(2, 2 * half, 3, 3, generator=g, dtype=F64)
    real = lambda weights: (lambda u, b, inp: (lambda y: y if b == "final" else F.relu(y))(F.conv2d(inp, *weights[(u, b)])))
    outputs = {}  # each branch's output in the reference run: a control must swap channels that differ there

    branch = real({k: (c.weight.detach(), c.bias.detach()) for k, c in convs.items()})

    def recorded(u, b, inp):
        y = branch(u, b, inp)
        outputs[(u, b)] = y
        return y

    ref = shuffle_stage(x, recorded, units)
    # Which label sits at each input position of each reader (a label = (unit, branch, channel)): run the
    # stage's data movement on labels instead of numbers.
    seen, site_id = {}, lambda u, b: 1000 * (2 * u + (b == "b2"))

    def label(u, b, inp):
        seen[(u, b)] = inp[0, :, 0, 0].round().long().tolist()
        return None if b == "final" else torch.tensor([[[[site_id(u, b) + i + 1]] for i in range(half)]], dtype=F64)

    shuffle_stage(torch.zeros(1, 2 * half, 1, 1, dtype=F64), label, units)

    def moved(elements, strict=True):  # elements[(u, b)] = (permutation, scales) of that branch output
        new_label = {}
        for (u, b), (pi, d) in elements.items():
            for i in range(half):
                new_label[site_id(u, b) + i + 1] = (site_id(u, b) + pi[i].item() + 1, d[i].item())
        weights = {}
        for key, conv in convs.items():
            w, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
            inputs = seen[key]
            if key[0] > 0 or key[1] == "final":  # readers of branch outputs: column q now sees d·(old label at π)
                old = w.clone()
                for q, lab in enumerate(inputs):
                    src, d = new_label[lab]
                    if src not in inputs and strict:
                        return None  # the element would need a reader to see a channel it does not read
                    w[:, q] = old[:, inputs.index(src)] / d if src in inputs else old[:, q]
            if key in elements:  # the writer: rows by D·P
                pi, d = elements[key]
                w, bias = d[:, None, None, None] * w[pi], d * bias[pi]
            weights[key] = (w, bias)
        return shuffle_stage(x, real(weights), units)

    def sample(classes_only=True):
        elements = {}
        for (u, b) in convs:
            if b == "final":
                continue
            cls = [route_class(b, i, half, units - 1 - u) for i in range(half)]
            pi = torch.arange(half)
            for c in set(cls):
                idx = torch.tensor([i for i in range(half) if cls[i] == c])
                pi[idx] = idx[torch.randperm(len(idx), generator=g)]
            elements[(u, b)] = (pi, torch.exp(0.5 * torch.randn(half, generator=g, dtype=F64)))
        return elements

    same(moved(sample()), ref)
    # swap two channels of one branch that lie in different route classes, and whose values differ on x: a
    # branch whose ReLU is dead on this small input (seed 134: both channels of unit 0's b1 are 0 everywhere)
    # would make any swap of them invisible, and the control vacuous
    controls = 0
    for (u, b) in [k for k in convs if k[1] != "final"]:
        cls = [route_class(b, i, half, units - 1 - u) for i in range(half)]
        y = outputs[(u, b)]
        pair = next(((i, j) for i in range(half) for j in range(half)
                     if cls[i] != cls[j] and not torch.equal(y[:, i], y[:, j])), None)
        if pair:
            controls += 1
            elements = {k: (torch.arange(half), torch.ones(half, dtype=F64)) for k in convs if k[1] != "final"}
            elements[(u, b)][0][[pair[0], pair[1]]] = torch.tensor([pair[1], pair[0]])
            assert moved(elements) is None  # no reader can take it: structurally outside the group
            differs(moved(elements, strict=False), ref)  # and with the readers that can, the output moves
            break
    assume(controls)  # every class-crossing pair dead or equal on x: no control can show anything here


# ---- 9. group_norm --------------------------------------------------------------------------------------
@SETTINGS
@given(groups=st.integers(1, 3), c=st.integers(3, 4), seed=st.integers(0, 2**16))
def test_group_norm(groups, c, seed):
    """conv → GroupNorm(g) → conv. Gains kept: permutations within groups, permutations of whole groups and
    one sign per group (into γ). Gains folded into the reader: per group any R ∈ O(C/g) with R·1 = ±1.
    A permutation across groups, a per-channel scaling and a rotation moving 1 fail."""
    g = torch.Generator().manual_seed(seed)
    n = groups * c
    net = randomise(nn.ModuleDict(dict(a=nn.Conv2d(3, n, 1), gn=nn.GroupNorm(groups, n), b=nn.Conv2d(n, 2, 1))).double(), g)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=F64)

    def run(sd):
        h = F.group_norm(F.conv2d(x, sd["a.weight"], sd["a.bias"]), groups, sd["gn.weight"], sd["gn.bias"])
        return F.conv2d(h, sd["b.weight"], sd["b.bias"])

    ref = run(net.state_dict())

    def moved(m, n_out, s_gamma, fold=False):
        sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if fold:
            sd["b.bias"] = sd["b.bias"] + sd["b.weight"][:, :, 0, 0] @ sd["gn.bias"]
            sd["b.weight"] = sd["b.weight"] * sd["gn.weight"][None, :, None, None]
            sd["gn.weight"], sd["gn.bias"] = torch.ones(n, dtype=F64), torch.zeros(n, dtype=F64)
        sd["a.weight"], sd["a.bias"] = rows(sd["a.weight"], m), m @ sd["a.bias"]
        if not fold:  # folded: γ = 1, β = 0 stay, the output moves by the element itself
            sd["gn.weight"], sd["gn.bias"] = s_gamma * (n_out @ sd["gn.weight"]), n_out @ sd["gn.bias"]
        sd["b.weight"] = cols(sd["b.weight"], n_out)
        return run(sd)

    sigma = torch.randperm(groups, generator=g)
    within = [perm(c, g) for _ in range(groups)]
    p = block_monomial(sigma, within)
    group_signs = torch.tensor([sign(g) for _ in range(groups)], dtype=F64).repeat_interleave(c)
    same(moved(torch.diag(group_signs) @ p, p, group_signs), ref)  # the sign goes into γ, the output moves by P
    rots = [sign(g) * rotation_fixing_ones(c, g) for _ in range(groups)]
    r = block_monomial(sigma, rots)
    same(moved(r, r, torch.ones(n, dtype=F64), fold=True), ref)
    differs(moved(pos_diag(n, g, 1.0), torch.eye(n, dtype=F64), 1.0), ref)  # per-channel scaling
    q = blockdiag(*[haar(c, g) for _ in range(groups)])
    differs(moved(q, q, 1.0, fold=True), ref)
    if groups > 1:
        cross = torch.eye(n, dtype=F64)[[c, *range(1, c), 0, *range(c + 1, n)]]  # swap channel 0 with channel c
        differs(moved(cross, cross, torch.ones(n, dtype=F64)), ref)


# ---- 10. gated MLPs (SwiGLU, GeGLU) ---------------------------------------------------------------------
@SETTINGS
@given(d=st.integers(2, 5), hidden=st.integers(2, 6), act=st.sampled_from(["silu", "gelu_tanh"]), seed=st.integers(0, 2**16))
def test_gated_mlp(d, hidden, act, seed):
    """down(σ(gate·x) ⊙ (up·x)): gate rows by P, up rows by D·P with D any nonzero diagonal, down columns by
    (D·P)⁻¹. A positive diagonal or a sign on the gate branch fails (σ is neither homogeneous nor odd)."""
    g = torch.Generator().manual_seed(seed)
    sigma = F.silu if act == "silu" else (lambda t: F.gelu(t, approximate="tanh"))
    gate, up, down = (torch.randn(hidden, d, generator=g, dtype=F64), torch.randn(hidden, d, generator=g, dtype=F64),
                      torch.randn(d, hidden, generator=g, dtype=F64))
    x = torch.randn(7, d, generator=g, dtype=F64)
    run = lambda gw, uw, dw: (sigma(x @ gw.T) * (x @ uw.T)) @ dw.T
    p, dd = perm(hidden, g), signs(hidden, g) @ pos_diag(hidden, g)
    same(run(p @ gate, dd @ p @ up, cols(down, dd @ p)), run(gate, up, down))
    e = pos_diag(hidden, g, 1.0)
    differs(run(e @ p @ gate, p @ up, cols(down, e @ p)), run(gate, up, down))
    flip = torch.diag(torch.tensor([-1.0] + [1.0] * (hidden - 1), dtype=F64))
    differs(run(flip @ gate, up, cols(down, flip)), run(gate, up, down))


# ---- 11. text decoders from small Hugging Face configs (random weights, offline) -------------------------
def hf(cls_name, seed=0, **cfg):
    """A small random float64 Hugging Face causal LM in eval mode, every parameter random."""
    import transformers

    config = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))(vocab_size=50, num_hidden_layers=2, **cfg)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gemma_gain = "Gemma" in cls_name and "norm" in name  # Gemma stores w in a (1 + w) gain
            if p.ndim == 1 and name.endswith("weight") and "norm" in name:
                p.copy_((0 if gemma_gain else 1) + 0.4 * torch.randn(p.shape, generator=g, dtype=F64))
            elif p.ndim == 1:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=F64))
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64) / math.sqrt(p.shape[1] if "embed" not in name else 1))
    return exact_norms(model)


def exact_norms(model):
    """Hugging Face RMSNorms compute in float32 (a rounding of ~1e-7, not part of the mathematics): give
    them the same formula in the input's dtype so that a float64 check can be held to 1e-10."""
    for mod in model.modules():
        kind = type(mod).__name__
        if kind.endswith("RMSNorm"):
            eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", None))
            gain = (lambda w: 1 + w) if kind.startswith("Gemma") else (lambda w: w)
            mod.forward = (lambda x, mod=mod, eps=eps, gain=gain:
                           x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain(mod.weight))
    return model


def hf_edited(model, sd):
    new = type(model)(model.config).double().eval()
    new.load_state_dict(sd)
    return exact_norms(new)


IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))


def logp(model):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=IDS).logits, -1)


def conformal_rotary(head_dim, rotary_dim, g, pair_block=None):
    """A QK element commuting with rotary embeddings: on each rotate_half pair (i, i + rotary_dim/2) a scalar
    times a 2-D rotation (pair_block overrides pair 0 for the negative control), any GL beyond rotary_dim."""
    a, half = torch.zeros(head_dim, head_dim, dtype=F64), rotary_dim // 2
    for i in range(half):
        s, th = math.exp(0.3 * torch.randn(1, generator=g).item()), 2 * math.pi * torch.rand(1, generator=g).item()
        blk = s * torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=F64)
        blk = pair_block if (pair_block is not None and i == 0) else blk
        a[[i, i, i + half, i + half], [i, i + half, i, i + half]] = blk.flatten()
    if rotary_dim < head_dim:
        a[rotary_dim:, rotary_dim:] = gl(head_dim - rotary_dim, g)
    return a


def attention_heads(sd, prefix, names, n_heads, n_kv, head_dim, g, qk, fused=None):
    """Per KV head j: queries of its group by A_j, its key by A_j⁻ᵀ, its value by N_j, the out columns of
    its query heads by N_j⁻¹ (biases alike); then a head permutation that keeps groups (within and among).
    ``fused``: GPT-NeoX's interleaved query_key_value (rows per head: q, k, v)."""
    q_name, k_name, v_name, o_name = names
    r = n_heads // n_kv
    if fused:
        w, b = sd[fused + ".weight"].view(n_heads, 3, head_dim, -1), sd[fused + ".bias"].view(n_heads, 3, head_dim)
        q, k, v, bq, bk, bv = w[:, 0], w[:, 1], w[:, 2], b[:, 0], b[:, 1], b[:, 2]
    else:
        q, k, v = (sd[f"{prefix}.{n}.weight"].unflatten(0, (-1, head_dim)) for n in (q_name, k_name, v_name))  # views
        bq, bk, bv = (sd.get(f"{prefix}.{n}.bias", torch.zeros(len(t), head_dim, dtype=F64)).view(-1, head_dim)
                      for n, t in ((q_name, q), (k_name, k), (v_name, v)))
    o = sd[f"{prefix}.{o_name}.weight"].view(sd[f"{prefix}.{o_name}.weight"].shape[0], n_heads, head_dim)
    for j in range(n_kv):
        a, nv = qk(g), gl(head_dim, g)
        k[j], bk[j], v[j], bv[j] = torch.linalg.inv(a).T @ k[j], torch.linalg.inv(a).T @ bk[j], nv @ v[j], nv @ bv[j]
        for h in range(j * r, (j + 1) * r):
            q[h], bq[h], o[:, h] = a @ q[h], a @ bq[h], o[:, h] @ torch.linalg.inv(nv)
    kv_perm = torch.randperm(n_kv, generator=g)
    tau = torch.cat([kv_perm[j] * r + torch.randperm(r, generator=g) for j in range(n_kv)])
    q[:], bq[:], o[:] = q[tau].clone(), bq[tau].clone(), o[:, tau].clone()
    k[:], bk[:], v[:], bv[:] = k[kv_perm].clone(), bk[kv_perm].clone(), v[kv_perm].clone(), bv[kv_perm].clone()
    return tau, kv_perm


LLAMA_LIKE = {
    "MistralForCausalLM": dict(hidden_size=16, intermediate_size=12, num_attention_heads=4, num_key_value_heads=2,
                               sliding_window=3),
    "Qwen2ForCausalLM": dict(hidden_size=16, intermediate_size=12, num_attention_heads=4, num_key_value_heads=2),
    "GemmaForCausalLM": dict(hidden_size=16, intermediate_size=12, num_attention_heads=4, num_key_value_heads=1, head_dim=4),
}


def llama_like_transform(model, g, stream, fold, qk=None, gate_scale=None, final_gain_folded=True):
    """Mistral / Qwen2 / Gemma: RMSNorm stream (folded: any orthogonal R; gains kept: signed permutations
    with w ↦ P·w), GQA heads with rotary (conformal per pair), gated MLP (gate P, up D·P)."""
    cfg = model.config
    d, hd = cfg.hidden_size, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    gemma = "Gemma" in type(model).__name__
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    m = stream
    norms = {"model.norm": ["lm_head"]}
    for i in range(cfg.num_hidden_layers):
        norms |= {f"model.layers.{i}.input_layernorm": [f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"],
                  f"model.layers.{i}.post_attention_layernorm": [f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up")]}
    for norm, readers in norms.items():
        gain = sd[norm + ".weight"] + (1 if gemma else 0)
        if fold and (final_gain_folded or norm != "model.norm"):
            for r in readers:
                sd[r + ".weight"] = sd[r + ".weight"] * gain
            sd[norm + ".weight"] = torch.zeros(d, dtype=F64) if gemma else torch.ones(d, dtype=F64)
        elif bool(((m != 0).sum(1) == 1).all()):  # signed permutation: the gain follows P, signs pass through
            sd[norm + ".weight"] = m.abs() @ gain - (1 if gemma else 0)
        # else a rotation with the gain kept: exact only when the gain commutes with it (the tie test)
        for r in readers:
            sd[r + ".weight"] = sd[r + ".weight"] @ m.T
    sd["model.embed_tokens.weight"] = model.state_dict()["model.embed_tokens.weight"] @ m.T
    if cfg.tie_word_embeddings:
        assert rel_err(sd["lm_head.weight"], sd["model.embed_tokens.weight"]) <= TOL  # the tie survives
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        write(sd, p + "self_attn.o_proj", m), write(sd, p + "mlp.down_proj", m)
        attention_heads(sd, p + "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"), cfg.num_attention_heads,
                        cfg.num_key_value_heads, hd, g, qk or (lambda g: conformal_rotary(hd, hd, g)))
        hid, up = perm(cfg.intermediate_size, g), signs(cfg.intermediate_size, g) @ pos_diag(cfg.intermediate_size, g)
        gate = hid if gate_scale is None else gate_scale @ hid
        write(sd, p + "mlp.gate_proj", gate), write(sd, p + "mlp.up_proj", up @ hid), read(sd, p + "mlp.down_proj", up @ hid)
    return hf_edited(model, sd)


@pytest.mark.parametrize("cls", list(LLAMA_LIKE))
def test_llama_like_decoders(cls):
    """Mistral (GQA, sliding window), Qwen2 (q/k/v biases), Gemma ((1 + w) RMSNorm, GeGLU, √d embedding
    scale, tied unembedding). Negatives: a non-conformal map on a rotary pair; a scaled gate branch."""
    g = torch.Generator().manual_seed(1)
    model = hf(cls, **LLAMA_LIKE[cls])
    ref, d = logp(model), model.config.hidden_size
    hd = getattr(model.config, "head_dim", None) or d // model.config.num_attention_heads
    signed = signs(d, g) @ perm(d, g)
    same(logp(llama_like_transform(model, g, signed, fold=False)), ref)
    if not model.config.tie_word_embeddings:
        same(logp(llama_like_transform(model, g, haar(d, g), fold=True)), ref)
    bad_pair = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=F64)
    non_conformal = lambda g: conformal_rotary(hd, hd, g, bad_pair)
    differs(logp(llama_like_transform(model, g, signed, fold=False, qk=non_conformal)), ref)
    scaled_gate = pos_diag(model.config.intermediate_size, g, 1.0)
    differs(logp(llama_like_transform(model, g, signed, fold=False, gate_scale=scaled_gate)), ref)


def test_gemma_tie_allows_rotations_only_when_the_final_gain_is_trivial():
    """Tied embeddings: the unembedding reads the final norm's output, so E·Rᵀ must equal W_U·Γ·Rᵀ·Γ'⁻¹:
    with the final gain 1 + w = 1 every orthogonal R works; with a generic final gain R fails."""
    g = torch.Generator().manual_seed(2)
    model = hf("GemmaForCausalLM", **LLAMA_LIKE["GemmaForCausalLM"])
    r = haar(model.config.hidden_size, g)
    differs(logp(llama_like_transform(model, g, r, fold=True, final_gain_folded=False)), logp(model))
    with torch.no_grad():
        model.model.norm.weight.zero_()
    same(logp(llama_like_transform(model, g, r, fold=True, final_gain_folded=False)), logp(model))


PHI, NEOX = "model.layers.{i}.", "gpt_neox.layers.{i}."  # parameter prefixes of layer i
LN_FAMILIES = {  # pre-LN streams read only by LayerNorms (Phi: one LN feeds attention and MLP in parallel)
    "PhiForCausalLM": dict(
        cfg=dict(hidden_size=16, intermediate_size=12, num_attention_heads=2),
        embed="model.embed_tokens",
        lns={PHI + "input_layernorm": [PHI + "self_attn.q_proj", PHI + "self_attn.k_proj", PHI + "self_attn.v_proj",
                                       PHI + "mlp.fc1"],
             "model.final_layernorm": ["lm_head"]},
        writers=[PHI + "self_attn.dense", PHI + "mlp.fc2"],
        attn=(PHI + "self_attn", ("q_proj", "k_proj", "v_proj", "dense"), None),
        mlp=(PHI + "mlp.fc1", PHI + "mlp.fc2")),
    "GPTNeoXForCausalLM": dict(
        cfg=dict(hidden_size=16, intermediate_size=12, num_attention_heads=2,
                 rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_type": "default"}),
        embed="gpt_neox.embed_in",
        lns={NEOX + "input_layernorm": [NEOX + "attention.query_key_value"],
             NEOX + "post_attention_layernorm": [NEOX + "mlp.dense_h_to_4h"],
             "gpt_neox.final_layer_norm": ["lm_head"]},
        writers=[NEOX + "attention.dense", NEOX + "mlp.dense_4h_to_h"],
        attn=(NEOX + "attention", (None, None, None, "dense"), NEOX + "attention.query_key_value"),
        mlp=(NEOX + "mlp.dense_h_to_4h", NEOX + "mlp.dense_4h_to_h")),
}


def ln_stream_transform(model, spec, g, m, n, qk):
    """Fold every LayerNorm into its readers (a reader without a bias keeps β/γ in the norm, where it moves
    with the element), then: writers' rows by m = s·R·(I + 1aᵀ), readers' columns by n = s·R."""
    cfg, layers = model.config, range(model.config.num_hidden_layers)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for ln_t, readers_t in spec["lns"].items():
        for i in (layers if "{i}" in ln_t else [0]):
            ln, readers = ln_t.format(i=i), [r.format(i=i) for r in readers_t]
            gam, bet = sd[ln + ".weight"], sd[ln + ".bias"]
            if all(r + ".bias" in sd for r in readers):
                fold_ln(sd, ln, readers)
            else:  # fold the gain only
                for r in readers:
                    sd[r + ".weight"] = sd[r + ".weight"] * gam
                sd[ln + ".weight"], sd[ln + ".bias"] = torch.ones_like(gam), n @ (bet / gam)
            for r in readers:
                sd[r + ".weight"] = sd[r + ".weight"] @ n.T
    sd[spec["embed"] + ".weight"] = sd[spec["embed"] + ".weight"] @ m.T
    hd = cfg.hidden_size // cfg.num_attention_heads
    for i in layers:
        for w in spec["writers"]:
            write(sd, w.format(i=i), m)
        prefix, names, fused = spec["attn"]
        attention_heads(sd, prefix.format(i=i), names, cfg.num_attention_heads, cfg.num_attention_heads, hd, g, qk,
                        fused=fused and fused.format(i=i))
        fc1, fc2 = (x.format(i=i) for x in spec["mlp"])
        hidden_site(sd, fc1, fc2, perm(sd[fc1 + ".bias"].numel(), g))  # GELU
    return hf_edited(model, sd)


@pytest.mark.parametrize("cls", list(LN_FAMILIES))
def test_layernorm_decoders_partial_rotary(cls):
    """Phi (parallel attention + MLP from one LN, biases everywhere, lm_head bias) and GPT-NeoX (parallel
    residual with two LNs, interleaved fused qkv): the stream takes s·R·(I + 1aᵀ); QK per head a conformal
    map on each rotary pair and any GL on the non-rotary dimensions. Negatives: a Haar rotation of the
    stream; a QK map mixing a rotary with a non-rotary dimension."""
    spec, g = LN_FAMILIES[cls], torch.Generator().manual_seed(3)
    model = hf(cls, **spec["cfg"])
    ref, d = logp(model), model.config.hidden_size
    hd = d // model.config.num_attention_heads
    rot = int(hd * model.config.rope_parameters["partial_rotary_factor"])
    qk = lambda g: conformal_rotary(hd, rot, g)
    s, r = sign(g), rotation_fixing_ones(d, g)
    same(logp(ln_stream_transform(model, spec, g, s * r @ shear(d, g), s * r, qk)), ref)
    q = haar(d, g)
    differs(logp(ln_stream_transform(model, spec, g, q, q, qk)), ref)

    def mixing(g):
        a = conformal_rotary(hd, rot, g)
        a[0, rot] = 1.0  # rotary dimension 0 takes a share of non-rotary dimension `rot`
        return a

    differs(logp(ln_stream_transform(model, spec, g, s * r, s * r, mixing)), ref)


OPT = dict(hidden_size=16, ffn_dim=12, num_attention_heads=2, max_position_embeddings=20)


def opt_layer_edits(sd, i, g, m_in, m_mid, attn_ln, mlp_ln):
    """One OPT layer: attention's out-projection writes the segment moving by m_in, fc2 the one moving by
    m_mid; attn_ln / mlp_ln: (γ map, β map, element their readers see); heads GL(d_head), fc1 P·D₊."""
    p = f"model.decoder.layers.{i}."
    hd = OPT["hidden_size"] // OPT["num_attention_heads"]
    for name in ("q", "k", "v"):
        sd[p + f"self_attn.{name}_proj.weight"] = cols(sd[p + f"self_attn.{name}_proj.weight"], attn_ln[2])
    attention_heads(sd, p + "self_attn", ("q_proj", "k_proj", "v_proj", "out_proj"), 2, 2, hd, g, lambda g: gl(hd, g))
    write(sd, p + "self_attn.out_proj", m_in), read(sd, p + "fc1", mlp_ln[2])
    hidden_site(sd, p + "fc1", p + "fc2", pos_diag(OPT["ffn_dim"], g) @ perm(OPT["ffn_dim"], g))  # ReLU: D₊·P
    write(sd, p + "fc2", m_mid)
    for ln, (gam_map, bet_map, _) in (("self_attn_layer_norm", attn_ln), ("final_layer_norm", mlp_ln)):
        sd[p + ln + ".weight"], sd[p + ln + ".bias"] = gam_map(sd[p + ln + ".weight"]), bet_map(sd[p + ln + ".bias"])


def test_opt_pre_ln_tied():
    """OPT-125m-like: pre-LN, tied embeddings, learned positions with offset 2 (every row of the table is a
    writer). The tie leaves s·P on the stream (the final LN passes the sign on so that E·(sP)ᵀ is also the
    unembedding); a shear, fine for an untied pre-LN stream, breaks the tie."""
    g = torch.Generator().manual_seed(4)
    model = hf("OPTForCausalLM", **OPT)
    assert model.model.decoder.embed_positions.weight.shape[0] == OPT["max_position_embeddings"] + 2

    def moved(m, p, s):
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        for key in ("model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight"):
            sd[key] = sd[key] @ m.T
        inner = (lambda gam: s * (p @ gam), lambda bet: p @ bet, p)  # LN output moves by P
        for i in range(2):
            opt_layer_edits(sd, i, g, m, m, inner, inner)
        ln = "model.decoder.final_layer_norm"
        sd[ln + ".weight"], sd[ln + ".bias"] = p @ sd[ln + ".weight"], s * (p @ sd[ln + ".bias"])  # output: s·P
        sd["lm_head.weight"] = sd["model.decoder.embed_tokens.weight"]  # tied: E·mᵀ must also read s·P
        return hf_edited(model, sd)

    p, s = perm(16, g), sign(g)
    same(logp(moved(s * p, p, s)), logp(model))
    differs(logp(moved(shear(16, g), torch.eye(16, dtype=F64), 1.0)), logp(model))


def test_opt_post_ln_project_in_out():
    """OPT-350m-like: post-LN (no final LN) with project_in / project_out around a 16-wide stream and an
    8-wide tied word-embedding space. Word space: any Q ∈ GL(8) on the input side and Q⁻ᵀ on the output
    side (the tie). Stream: one permutation P for the whole depth, a sign per segment, the embedding segment
    any shear I + 1aᵀ, each LN output segment the shear I + c·1·(1/γ)ᵀ of its own gain γ (its bias absorbs
    it). A generic shear on an LN output segment fails."""
    g = torch.Generator().manual_seed(5)
    model = hf("OPTForCausalLM", word_embed_proj_dim=8, do_layer_norm_before=False, **OPT)
    sd0 = model.state_dict()
    lns = [f"model.decoder.layers.{i}.{n}" for i in range(2) for n in ("self_attn_layer_norm", "final_layer_norm")]

    def moved(q, p, signs_, shears):
        sd = {k: v.clone() for k, v in sd0.items()}
        ones = torch.ones(16, 1, dtype=F64)
        seg = [signs_[0] * p @ (torch.eye(16, dtype=F64) + ones @ shears[0][None])]
        for k, ln in enumerate(lns):  # segment k + 1 is this LN's output
            seg.append(signs_[k + 1] * p @ (torch.eye(16, dtype=F64) + ones @ shears[k + 1][None]))
        sd["model.decoder.embed_tokens.weight"] = sd["model.decoder.embed_tokens.weight"] @ q.T
        sd["lm_head.weight"] = sd["model.decoder.embed_tokens.weight"]
        sd["model.decoder.project_in.weight"] = seg[0] @ cols(sd["model.decoder.project_in.weight"], q)
        sd["model.decoder.embed_positions.weight"] = sd["model.decoder.embed_positions.weight"] @ seg[0].T
        edits = []
        for k in range(4):  # LN k: input segment k (isometric part s_k·P), output segment k + 1
            ratio, out = signs_[k + 1] * signs_[k], seg[k + 1]
            edits.append((lambda gam, ratio=ratio: ratio * (p @ gam), lambda bet, out=out: out @ bet, seg[k + 1]))
        for i in range(2):
            # post-LN: q, k, v read segment 2i itself, fc1 segment 2i + 1
            attn_ln, mlp_ln = (*edits[2 * i][:2], seg[2 * i]), (*edits[2 * i + 1][:2], seg[2 * i + 1])
            opt_layer_edits(sd, i, g, seg[2 * i], seg[2 * i + 1], attn_ln, mlp_ln)
        sd["model.decoder.project_out.weight"] = torch.linalg.inv(q).T @ cols(sd["model.decoder.project_out.weight"], seg[4])
        return hf_edited(model, sd)

    q, p = gl(8, g), perm(16, g)
    sgn = [sign(g) for _ in range(5)]
    own = [0.5 * torch.randn(16, generator=g, dtype=F64) / 4] + \
          [0.3 * torch.randn(1, generator=g, dtype=F64) / sd0[ln + ".weight"] for ln in lns]
    same(logp(moved(q, p, sgn, own)), logp(model))
    generic = list(own)
    generic[2] = 0.5 * torch.randn(16, generator=g, dtype=F64) / 4
    differs(logp(moved(q, p, sgn, generic)), logp(model))
