"""The graph backend's transforms give the same bits for the same seed as the code they were first recorded on.

A transform's repeated call replays work that depends only on the model's structure (what reads and writes each
site, which tensors move along which axes); the drawn elements, the checks and the arithmetic are redone every
call. These hashes pin every weight and buffer of the result (its raw bytes, SHA-256), so a change that caches
something it should recompute, reorders a draw or rounds differently fails here. Each model is transformed
three ways at fixed seeds: a first call, a repeated call on the same object, and a call on a fresh copy of
it (a new object of a seen structure), into a copy and in place.

The hashes were recorded on commit eceeeac (before the repeated call replayed a per-structure plan), by
``_record()`` below; they depend on torch's RNG and float arithmetic, so a different torch version may need
them rerecorded on the old code (say which commit did it).

Re-recorded once, on purpose: vit and swin (the cases that draw O(n) or GL(n) elements) after Haar draws changed
from a QR of Gaussians to Stewart's reflections of fresh Gaussians (workbench/groups/_haar.py: the same law, other
draws for a seed). Their new hashes were recorded on eceeeac's code with only the draw replaced (torch's path, as
here) and are the hashes this code gives: the replay still matches the code before it, bit for bit. mlp and cnn
draw no dense element and are unchanged."""
from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from torch import nn

import workbench as wb


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: a float32 product summed in another order on more threads would be other bits."""
    from workbench._threads import threads

    with threads(1):
        yield


@pytest.fixture(autouse=True)
def lapack_haar(monkeypatch):
    """Haar draws through torch's QR, as when the hashes were recorded: the compiled QR that numba installs
    (workbench/groups/_haar.py) gives LAPACK's Q only to rounding (tests/test_haar.py bounds it by κ·ε), so with
    it the float64 hashes would depend on whether numba is installed. What this file pins (replay, draw order,
    the arithmetic of the transform) is the same on either path."""
    try:
        from workbench.groups import _haar
    except ImportError:  # a tree without the compiled QR: torch's is the only path
        return
    monkeypatch.setattr(_haar, "_state", {"kernel": None, "tried": True})


def _digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=True).items():
        t = t.detach().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.cpu().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _randomised(model: nn.Module, dtype, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = name.endswith("weight") and p.ndim == 1
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 0.5) + (1.0 if gain else 0.0))
        for name, b in model.named_buffers():
            if b.is_floating_point():
                b.copy_(torch.rand(b.shape, generator=g) + (0.5 if name.endswith("running_var") else 0.0))
    return model.eval().to(dtype)


def _tv():
    pytest.importorskip("torchvision")
    from workbench.models import ensure_torchvision_importable, require

    ensure_torchvision_importable()  # the CPU torch lacks torchvision's C++ ops (see tests/conftest.py)
    return require("torchvision")


def mlp():
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3))


def cnn():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


def vit():
    return _tv().models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                          mlp_dim=32, num_classes=5)


def swin():
    return _tv().models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                        window_size=[4, 4], num_classes=5)


BUILDERS = {"mlp": (mlp, (1, 6)), "cnn": (cnn, (1, 3, 8, 8)), "vit": (vit, (1, 3, 32, 32)), "swin": (swin, (1, 3, 32, 32))}


def _digests(name: str, dtype) -> list[str]:
    build, shape = BUILDERS[name]
    torch.manual_seed(0)
    model = _randomised(build(), dtype)
    example = torch.zeros(shape, dtype=dtype)
    out = []
    for seed in (0, 1):  # a first call, then a repeated one on the same object
        new, _ = wb.random_intertwiner(model, seed=seed, example=example)
        out.append(_digest(new))
    twin = copy.deepcopy(model)  # a new object of a seen structure
    new, _ = wb.random_intertwiner(twin, seed=2, example=example)
    out.append(_digest(new))
    wb.random_intertwiner(twin, seed=3, example=example, inplace=True)
    out.append(_digest(twin))
    return out


EXPECTED = {
    'mlp/float32': ['2d2b17571c048e9c', 'daf897d54c994de9', '72dbc8112f09fcca', '186083b83cbde027'],
    'mlp/float64': ['a491a6f885acab19', 'e443b7670c1fcc3e', '5f756a8f9441664d', '2851314643268666'],
    'cnn/float32': ['648fb86fe9045b1f', '8e29c0797e1faa10', 'd2dd357877812486', 'd2645911b7896bb0'],
    'cnn/float64': ['3a067dbeea5b62e4', 'f1449ffdb5c2e8bb', '3762450f4179f14d', '83c57054ef99caa6'],
    'vit/float32': ['94ac17d874d27ea2', 'cf70cbe208e295f8', '58d881e51fb08d96', 'c2402eb2d202b653'],
    'vit/float64': ['6691f786f263e817', 'cb91f9c022c82afb', 'e639797c0333760e', '08d6444e5832fbd9'],
    'swin/float32': ['f5cde1af6e7062e9', 'c6d037e3f5733d67', '1d9b154c0ab54ed4', '71a0fdb934112557'],
    'swin/float64': ['d970933ffb2de9be', '21bdbf9c4d6e40cd', '91ede6f29ed69adf', '7a75b37274a33c17'],
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_same_seed_same_bits_as_recorded(case):
    name, dtype = case.split("/")
    assert _digests(name, getattr(torch, dtype)) == EXPECTED[case]


def _record() -> dict:  # run on the recording commit: python -c "from tests.test_transform_bits import _record; _record()"
    got = {f"{n}/{d}": _digests(n, getattr(torch, d)) for n in BUILDERS for d in ("float32", "float64")}
    for k, v in got.items():
        print(f"    {k!r}: {v!r},")
    return got


def _same(a, b) -> bool:
    """Same class, φ, group, and every tensor the same values, dtype and layout (a transposed view stays one)."""
    def tensors(e):
        names = ("perm", "scale") if hasattr(e, "perm") else ("M", "inv")
        return [getattr(e, k) for k in names]
    if type(a) is not type(b) or (a.phi_kind, a.group, a.n) != (b.phi_kind, b.group, b.n):
        return False
    if getattr(a, "cond", None) != getattr(b, "cond", None) or getattr(a, "orthogonal", None) != getattr(b, "orthogonal", None):
        return False
    for x, y in zip(tensors(a), tensors(b)):
        if (x is None) != (y is None):
            return False
        if x is not None and not (x.dtype == y.dtype and x.stride() == y.stride() and torch.equal(x, y)
                                  and bool((x.view(-1) if x.is_contiguous() else x.reshape(-1)).isnan().eq(
                                      (y.view(-1) if y.is_contiguous() else y.reshape(-1)).isnan()).all())):
            return False
    return True


@pytest.mark.parametrize("kind", ["perm", "signed64", "scaled32", "orthogonal", "gl_known_inverse", "gl_unknown_inverse"])
def test_inverse_transpose_is_inverse_then_transpose_bit_for_bit(kind):
    """A reader's F⁻ᵀ is built in one step (ScaledPermutation: the same permutation, 1/scale; Dense: the known
    inverse's transposed view); it must be exactly what ``inverse().transpose()`` gives, which the push used
    before, and must act as M⁻ᵀ (checked against a float64 matrix inverse)."""
    from workbench.groups import Dense, ScaledPermutation, get_group

    g = torch.Generator().manual_seed(5)
    n = 7
    perm = torch.randperm(n, generator=g)
    if kind == "perm":
        e = ScaledPermutation(perm, None, "identity", "permutation")
    elif kind == "signed64":
        e = ScaledPermutation(perm, torch.randn(n, generator=g, dtype=torch.float64), ("power", 3), "x")
    elif kind == "scaled32":
        e = ScaledPermutation(perm, torch.rand(n, generator=g) + 0.5, "abs", "x")
    elif kind == "orthogonal":
        e = get_group("orthogonal", n).sample(g)
    elif kind == "gl_known_inverse":
        e = get_group("gl", n).sample(g)
        assert e.inv is not None
    else:
        e = Dense(torch.randn(n, n, generator=g, dtype=torch.float64) + 3 * torch.eye(n, dtype=torch.float64))
    got, old = e.inverse_transpose(), e.inverse().transpose()
    assert _same(got, old)
    tol = 1e-6 if kind == "scaled32" else 1e-12  # a float32 scale is inverted in float32
    assert torch.allclose(got.matrix(), torch.linalg.inv(e.matrix()).T, rtol=0, atol=tol)
    # the negative control: the inverse alone (not transposed) is not it, for every element that is not symmetric
    if kind != "perm" or not torch.equal(perm[perm], torch.arange(n)):
        assert not _same(got, e.inverse())


def _old_memo_key(model, example, affine):
    """_map._memo_key as it was (four walks of the tree): the one-walk key must be the same tuple."""
    import itertools

    from workbench.models import FORWARD_HOOKS as _FORWARD_HOOKS, global_hooks, hooked
    from workbench.symmetry._map import _BOOKKEEPING, _plain
    from workbench.symmetry._shared import _view

    mods = tuple((name, id(m), type(m), id(vars(m).get("forward")), hooked(m),
                  tuple(sorted((k, v) for k, v in vars(m).items() if k not in _BOOKKEEPING and k not in _FORWARD_HOOKS
                               and k != "training" and _plain(v))))
                 for name, m in model.named_modules(remove_duplicate=False))
    tensors = tuple((name, id(t), _view(t)) for name, t in itertools.chain(
        model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)) if t is not None)
    slopes, gains = [], []
    for m in model.modules():
        if isinstance(m, nn.PReLU):
            slopes.append(tuple(m.weight.detach().flatten().tolist()))
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            gains.append(bool((m.weight == 1).all()))
    ex = None if example is None else (tuple(example.shape), example.dtype, example.device)
    return mods, tensors, (tuple(slopes), tuple(gains)), ex, affine, global_hooks()  # (hooks on: baf02ce)


def test_the_one_walk_memo_key_is_the_four_walk_key():
    """Shared modules (one PReLU and one LayerNorm called at two places, with their parameters), a tied weight,
    a Linear without a bias (a None parameter), a buffer, non-default gains: every part of the key as before."""
    from workbench.symmetry._map import _memo_key

    shared_act, shared_norm = nn.PReLU(4, init=0.3), nn.LayerNorm(4)
    with torch.no_grad():
        shared_norm.weight[1] = 2.0
    lin = nn.Linear(4, 4, bias=False)
    inner = nn.Sequential(lin, shared_act, shared_norm)
    model = nn.Sequential(nn.Linear(4, 4), shared_act, inner, nn.LayerNorm(4), nn.BatchNorm1d(4), shared_norm,
                          nn.Linear(4, 4))
    model[6].weight = model[0].weight  # tied
    model.register_buffer("extra", torch.ones(2))
    model[4].register_buffer("nothing", None)
    x = torch.zeros(1, 4)
    for ex, affine in ((None, False), (x, True)):
        assert _memo_key(model, ex, affine) == _old_memo_key(model, ex, affine)
    for build in (mlp, cnn):
        m = build()
        assert _memo_key(m, None, False) == _old_memo_key(m, None, False)
