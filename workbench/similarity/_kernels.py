"""Kernel measures: CKA with linear, RBF and the paper's G_ReLU-invariant kernels (per example).

CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L)) for Gram matrices K, L ``[N, N]`` over the
same N examples. A transformation of the units leaves CKA unchanged exactly when it leaves the
Gram matrix unchanged (up to a positive factor, and for the centred estimators up to adding
f(x) + f(y)), so the kernel decides the invariances.
"""
from __future__ import annotations

import math
import numbers
import sys

import numpy as np
import torch

from .._errors import InvalidOptionError
from ._prep import DegenerateRepresentationError, _in_safe_range, as_acts, as_pair, centred, per_example, standardised_channels  # noqa: F401 (re-exported)


def hsic(K: torch.Tensor, L: torch.Tensor, *, unbiased: bool = False) -> torch.Tensor:
    """Hilbert–Schmidt independence criterion of two Gram matrices ``[N, N]`` (a 0-d tensor).

    ``unbiased=False``: tr(K H L H) / (N − 1)² with H the centring matrix (Gretton et al. 2005).
    ``unbiased=True``: the U-statistic of Song et al. (2012), which ignores the diagonals and needs
    N ≥ 4: [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1 / ((N−1)(N−2)) − 2/(N−2)·1ᵀK̃L̃1] / (N(N−3)), K̃ = K with zero diagonal.
    """
    return _hsic(*_grams(K, L, unbiased), unbiased)


def _hsic(K: torch.Tensor, L: torch.Tensor, unbiased: bool) -> torch.Tensor:
    n = K.shape[0]
    if not unbiased:
        # tr(KHLH) = <HKH, HLH>. Centring both sides (not just one) keeps a large constant part of L,
        # e.g. an RBF kernel near 1 everywhere, from swamping the signal with rounding.
        return (_centre(K) * _centre(L)).sum() / (n - 1) ** 2
    K, L = K.clone(), L.clone()
    K.fill_diagonal_(0)
    L.fill_diagonal_(0)
    k1, l1 = K.sum(0), L.sum(0)  # K̃1 and L̃1 (symmetric, so rows and columns agree)
    total = (K * L).sum() + k1.sum() * l1.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k1 @ l1)
    return total / (n * (n - 3))


def _grams(K, L, unbiased: bool):
    """Two Gram matrices as float64 tensors ``[N, N]`` over the same N examples, or a clear error.

    The estimators read only the upper triangle's sums through column sums, so a non-symmetric matrix
    would silently give a number for some other kernel; and the unbiased one divides by N − 3.
    """
    out = []
    for name, G in (("K", K), ("L", L)):
        if isinstance(G, np.ndarray):
            G = torch.from_numpy(G.astype(np.float64))
        if not isinstance(G, torch.Tensor) or G.ndim != 2 or G.shape[0] != G.shape[1]:
            raise InvalidOptionError(f"{name} must be a square Gram matrix [N, N] (torch or numpy); got "
                                     f"{tuple(G.shape) if hasattr(G, 'shape') else type(G).__name__}.")
        G = G.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(G).all()):
            raise InvalidOptionError(f"{name} contains NaN or infinite values.")
        if not bool(((G - G.T).abs() <= 1e-9 * G.abs().amax()).all()):
            raise InvalidOptionError(f"{name} is not symmetric, so it is not a Gram matrix; HSIC reads kernels "
                                     f"k(x_i, x_j) = k(x_j, x_i).")
        out.append(G)
    K, L = out
    n, need = K.shape[0], 4 if unbiased else 2
    if L.shape != K.shape:
        raise InvalidOptionError(f"K and L must be Gram matrices of the same examples; got shapes {tuple(K.shape)} "
                                 f"and {tuple(L.shape)}.")
    if n < need:
        raise InvalidOptionError(f"{'unbiased' if unbiased else 'biased'} HSIC needs at least {need} examples; "
                                 f"got {n}.")
    return K, L


def _centre(K: torch.Tensor) -> torch.Tensor:
    """HKH: rows and columns of ``K [N, N]`` centred."""
    return K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()


def cka_from_kernels(K: torch.Tensor, L: torch.Tensor, *, unbiased: bool = False) -> float:
    """CKA of two Gram matrices ``[N, N]``; a clear error where a self-HSIC is not positive."""
    K, L = _grams(K, L, unbiased)  # checked once: the three HSICs below read the same two matrices
    kk, ll = _hsic(K, K, unbiased), _hsic(L, L, unbiased)
    for name, v, G in (("acts_a", kk, K), ("acts_b", ll, L)):
        if not v > (_rounding_floor(G) if unbiased else 0):
            raise DegenerateRepresentationError(
                f"HSIC({name}, {name}) = {float(v):.3g} is not positive: {name} is (nearly) constant over the "
                f"examples under this kernel, so CKA is undefined.")
    return float(_hsic(K, L, unbiased) / (kk * ll).sqrt())


def _rounding_floor(K: torch.Tensor) -> torch.Tensor:
    """What rounding alone can make of the unbiased HSIC(K, K): n·16·eps times its terms taken in absolute value.

    The U-statistic is a difference of terms, and it is exactly 0 for some live-looking inputs — e.g.
    a linear kernel where only one example differs from the others — so ``> 0`` alone let a rounding
    residue of ±1e-17 through, which the ratio then turned into any number (6.9e-08 measured). A real
    self-HSIC is far above this floor (≥ 7e-3 of its terms on 3,000 random draws with 4 ≤ N < 200).
    """
    n = K.shape[0]
    A = K.abs()
    A.fill_diagonal_(0)
    a1 = A.sum(0)
    terms = ((A * A).sum() + a1.sum() ** 2 / ((n - 1) * (n - 2)) + 2.0 / (n - 2) * (a1 @ a1)) / (n * (n - 3))
    return 16 * n * torch.finfo(K.dtype).eps * terms


def _linear_gram(acts: torch.Tensor) -> torch.Tensor:
    X = centred(per_example(acts))  # adding a constant to every example does nothing
    return X @ X.T


def linear_cka(acts_a, acts_b, *, unbiased: bool = False) -> float:
    """Linear CKA (Kornblith et al. 2019) between two activation sets of the same N examples.

    Each example's map is flattened (``[N, C, *spatial]`` → ``[N, C·P]``) and centred over examples;
    the kernel is the inner product, i.e. the sum over channels of per-channel inner products over
    positions. Invariant to orthogonal maps of the channels (the same map at every position is
    orthogonal on the flattened vector), isotropic scaling and translation; not to per-unit scaling
    or general invertible maps. Needs N ≥ 3 (N ≥ 4 for ``unbiased=True``, the unbiased HSIC).

    Args:
        acts_a: ``[N, C_a]`` or ``[N, C_a, *spatial]``.
        acts_b: ``[N, C_b]`` or ``[N, C_b, *spatial_b]`` (spatial shapes may differ).

    Returns:
        A float, 1 for representations equal up to rotation and scale.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(40, 6, generator=g, dtype=torch.float64)
        >>> q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
        >>> round(linear_cka(x, 3 * x @ q), 12)
        1.0
    """
    # Two centred examples span one direction, so any two maps read 1.0: at least 3.
    a, b = as_pair(acts_a, acts_b, min_examples=4 if unbiased else 3)
    if unbiased or a.shape[0] <= max(a[0].numel(), b[0].numel()):
        return cka_from_kernels(_linear_gram(a), _linear_gram(b), unbiased=unbiased)
    # More examples than features: ||YᵀX||² / (||XᵀX|| ||YᵀY||) is the same number from C×C matrices.
    X, Y = centred(per_example(a)), centred(per_example(b))
    xx, yy = (X.T @ X).norm(), (Y.T @ Y).norm()
    if not (xx > 0 and yy > 0):
        return cka_from_kernels(X @ X.T, Y @ Y.T)  # raises the degenerate-input error
    return float((Y.T @ X).norm() ** 2 / (xx * yy))


def _rbf_gram(acts: torch.Tensor, bandwidth: float, name: str) -> torch.Tensor:
    X = centred(per_example(acts))  # distances do not change; the Gram below loses less precision
    G = X @ X.T
    sq = G.diagonal()
    D2 = (sq[:, None] + sq[None, :] - 2 * G).clamp_min(0)
    D2.fill_diagonal_(0)
    i, j = torch.triu_indices(len(X), len(X), 1)
    median = D2[i, j].median()
    if not median > 0:
        raise DegenerateRepresentationError(f"{name}: the median distance between examples is 0, so the RBF bandwidth "
                                            f"(a multiple of it) is undefined: most examples coincide.")
    # exp(−t·D²) − 1, divided by t: the biased HSIC centres the kernel (a constant added to every entry goes) and
    # CKA is a ratio (a positive factor goes), so CKA is that of exp(−t·D²) exactly. With exp itself a wide
    # kernel was 1 − (something below rounding): bandwidth 1e8 read 0.225 where its limit, linear CKA, is 0.344.
    t = 0.5 / bandwidth / bandwidth  # 1/(2σ²) in median units; below the normal floats only past σ ≈ 1e154,
    D2 = D2 / median                 # where the limit −D² is exact to float64 (a subnormal t has few bits)
    return torch.expm1(-t * D2) / t if t >= sys.float_info.min else -D2


def rbf_cka(acts_a, acts_b, *, bandwidth: float = 1.0) -> float:
    """CKA with a Gaussian kernel exp(−‖x − y‖² / (2σ²)), σ = ``bandwidth`` × sqrt(median ‖x − y‖²).

    Maps are flattened per example as in :func:`linear_cka`; distances do not see rotations or
    translations, and the median rule makes σ follow isotropic scaling, so those leave it unchanged;
    per-unit scaling and general invertible maps do not. Biased HSIC (Kornblith et al. 2019). For a
    large ``bandwidth`` it tends to linear CKA. For a small one (well below 1) both kernels tend to the
    identity (every example far from every other), so the value tends to 1 for any two representations:
    a high score there says nothing about their similarity.

    Args:
        acts_a: ``[N, C_a, *spatial]`` (or ``[N, C_a]``); acts_b likewise, same N.
        bandwidth: positive multiple of the median distance.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(30, 5, generator=g, dtype=torch.float64)
        >>> round(rbf_cka(x, 2 * x + 1), 12)
        1.0
    """
    if isinstance(bandwidth, bool) or not (isinstance(bandwidth, numbers.Real) and 0 < bandwidth < math.inf):
        raise InvalidOptionError(f"bandwidth must be a positive number, finite (a multiple of the median distance); "
                                 f"got {bandwidth!r}.")
    bandwidth = float(bandwidth)
    a, b = as_pair(acts_a, acts_b, min_examples=3)
    return cka_from_kernels(_rbf_gram(a, bandwidth, "acts_a"), _rbf_gram(b, bandwidth, "acts_b"))


def grelu_kernel(acts, *, block_bytes: int = 1 << 26) -> torch.Tensor:
    """The paper's G_ReLU-invariant kernel ``[N, N]``: K_ij = max over channels c of ⟨H_i[c], H_j[c]⟩.

    H is ``acts`` with each channel centred and scaled to norm 1 over (examples, positions), so a
    positive scaling of a channel does nothing; the inner product runs over positions, and the max
    over channels does not see their order. Vectorised: for a block of rows, one batched matrix
    product gives every channel's ``[rows, N]`` inner products at once and the max reduces them;
    only the upper triangle is computed (the kernel is symmetric). ``block_bytes`` bounds the
    temporary ``[C, rows, N]`` product. Cost C·N²·P multiply-adds, memory N² + block.

    Args:
        acts: ``[N, C]`` (P = 1) or ``[N, C, *spatial]``.

    Returns:
        float64 ``[N, N]``, symmetric.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(6, 3, 2, 2, generator=g, dtype=torch.float64)
        >>> K = grelu_kernel(x)
        >>> K.shape, bool(torch.equal(K, K.T))
        (torch.Size([6, 6]), True)
    """
    Hc = standardised_channels(_in_safe_range(as_acts(acts)))  # [C, N, P]; variances of 1e±160 over/underflowed
    c, n = Hc.shape[:2]
    K = Hc.new_empty(n, n)
    rows = max(1, block_bytes // (8 * c * n))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        block = torch.bmm(Hc[:, start:stop], Hc[:, start:].transpose(1, 2)).amax(0)  # [rows, N − start]
        K[start:stop, start:] = block
        K[start:, start:stop] = block.T
    return K


def grelu_cka(acts_a, acts_b) -> float:
    """The paper's G_ReLU-CKA: unbiased CKA with the kernel of :func:`grelu_kernel`.

    Invariant to permutations and per-channel positive scalings (the ReLU intertwiner group P·D₊,
    applied to channels at every position), to isotropic scaling and translation; not to rotations.
    Also to flipping a channel's sign — ⟨−a, −b⟩ = ⟨a, b⟩ inside each channel's inner product — so to
    every nonzero per-channel scaling P·D, a larger group than G_ReLU (a ReLU net's sign-flipped
    representation is not an equivalent one, yet reads 1 here; G_ReLU-Procrustes tells them apart).
    Conv maps are read per example: the inner product runs over positions within one channel, the
    max over channels. Needs N ≥ 4.

    Args:
        acts_a: ``[N, C_a]`` or ``[N, C_a, *spatial]``; acts_b likewise, same N (C and spatial may differ).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(20, 4, 3, 3, generator=g, dtype=torch.float64).relu()
        >>> scaled = x[:, [2, 0, 3, 1]] * torch.tensor([0.5, 2.0, 3.0, 1.5]).reshape(1, 4, 1, 1)
        >>> round(grelu_cka(x, scaled), 12)
        1.0
    """
    a, b = as_pair(acts_a, acts_b, min_examples=4)
    return cka_from_kernels(grelu_kernel(a), grelu_kernel(b), unbiased=True)


def standardized_cka(acts_a, acts_b) -> float:
    """Unbiased linear CKA of channel-standardised maps: the paper's "orthogonal" CKA comparator.

    The same per-channel centring and normalisation as :func:`grelu_cka`, with the sum over channels
    where G_ReLU-CKA takes the max. The normalisation makes it invariant to per-channel scaling —
    and therefore *not* to rotations of the channels, although the paper uses it as the
    orthogonal-invariant counterpart. Like G_ReLU-CKA it is also invariant to sign flips of channels
    (signed permutations are orthogonal). Needs N ≥ 4.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(20, 4, generator=g, dtype=torch.float64)
        >>> round(standardized_cka(x, x * torch.tensor([1.0, 5.0, 0.1, 2.0])), 12)
        1.0
    """
    a, b = as_pair(acts_a, acts_b, min_examples=4)
    Ka, Kb = (standardised_channels(x).transpose(0, 1).reshape(len(x), -1) for x in (a, b))  # [N, C·P]
    return cka_from_kernels(Ka @ Ka.T, Kb @ Kb.T, unbiased=True)
