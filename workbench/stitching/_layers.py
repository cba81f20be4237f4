"""Stitching layers: learnable maps on a tensor's channel axis, one kind of map per ``group=`` name.

A stitch's ``group`` is a name from the one registry in ``workbench.groups`` (``"gl"``,
``"orthogonal"``, ``"relu"`` → P·D₊, ``"permutation"``, ``"trivial"`` → the identity map, no
layer, …) or a Group object, plus one name that is not a group and lives here alone:
``"low_rank:k"`` (a rank-k linear map). ``StitchSpec`` is what such a name means for the layer.

Old spelling kept: ``group="identity"`` in a stitch means the identity map (``"trivial"``), as it
always has here — in the registry ``"identity"`` names the identity *activation*'s group, GL, which
is not what a stitch meant by it (``STITCH_ALIASES``).

Every layer maps ``[N, C_in, *rest] -> [N, C_out, *rest]`` (a 1×1 convolution on conv maps) and
can report its current matrix ``weight() -> [C_out, C_in]``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from .._errors import InvalidOptionError
from ..groups import (GROUP_NAMES, Dense, GeneralLinear, Group, GroupElement, Orthogonal, Permutation,
                      PositiveDiagonal, ScaledPermutation, ScaledPermutationGroup, Trivial, get_group)

_LOW_RANK = re.compile(r"low_rank:(\d+)")
#: Stitching's own spellings that mean something else in the group registry (kept: public before).
STITCH_ALIASES = {"identity": "trivial"}
STITCH_NAMES = ["low_rank:<k>", *GROUP_NAMES]


@dataclass(frozen=True)
class StitchSpec:
    """What a stitch's ``group=`` means for its layer.

    ``name`` is the group's registry name as reported (``"gl"``, ``"scaled_permutation"``,
    ``"trivial"``) or ``"low_rank:k"``; ``kind`` the layer that learns it: identity (no layer) |
    linear | orthogonal | sinkhorn | diagonal.
    """

    name: str
    kind: str
    rank: Optional[int] = None
    diagonal: Optional[str] = None  # sinkhorn/diagonal: None (no scales), "positive", "sign", "nonzero"
    special: bool = False  # orthogonal with determinant +1


def parse_stitch_group(group: Union[str, Group]) -> StitchSpec:
    """The stitching layer for ``group``: a registry name, a Group, or ``"low_rank:k"``.

    Example:
        >>> from workbench.stitching import parse_stitch_group
        >>> parse_stitch_group("relu").name, parse_stitch_group("identity").name
        ('scaled_permutation', 'trivial')
    """
    if isinstance(group, str):
        key = group.strip().lower()
        key = STITCH_ALIASES.get(key, key)
        m = _LOW_RANK.fullmatch(key)
        if m:
            if int(m.group(1)) < 1:
                raise InvalidOptionError(f"group={group!r}: a low-rank stitch needs rank k ≥ 1 (\"low_rank:4\").")
            return StitchSpec(key, "linear", rank=int(m.group(1)))
        if key.startswith("low_rank"):
            raise InvalidOptionError(f"group={group!r}: write a low-rank stitch as \"low_rank:k\" with k ≥ 1, e.g. \"low_rank:4\".")
        try:
            group = get_group(key, 1)
        except InvalidOptionError as exc:
            raise InvalidOptionError(f"{exc} Stitching also accepts 'low_rank:k'.") from None
    elif not isinstance(group, Group):
        raise InvalidOptionError(f"group must be a name from {STITCH_NAMES} or a Group object; got {type(group).__name__}.")
    if isinstance(group, Trivial):
        return StitchSpec("trivial", "identity")
    if isinstance(group, GeneralLinear):
        return StitchSpec("gl", "linear")
    if isinstance(group, Orthogonal):
        return StitchSpec(group.name, "orthogonal", special=group.special)
    if isinstance(group, Permutation):
        return StitchSpec(group.name, "sinkhorn")
    if isinstance(group, ScaledPermutationGroup):
        return StitchSpec(group.name, "sinkhorn", diagonal=group.diagonal)
    if isinstance(group, PositiveDiagonal):
        return StitchSpec(group.name, "diagonal", diagonal="positive")
    raise InvalidOptionError(f"there is no stitching layer for the group {group!r}; use one of {STITCH_NAMES}.")


# Old spellings, public before (a stitching "family" was a StitchSpec).
Family = StitchSpec
parse_family = parse_stitch_group


def _on_channels(x: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    y = torch.movedim(torch.movedim(x, 1, -1) @ W.T.to(x.dtype), -1, 1)
    return y if b is None else y + b.to(x.dtype).reshape(1, -1, *([1] * (x.ndim - 2)))


class StitchLayer(nn.Module):
    """Base: ``forward`` applies ``weight()`` (and ``bias``) along axis 1."""

    def __init__(self):
        super().__init__()
        self.register_parameter("bias", None)

    def weight(self) -> torch.Tensor:
        raise NotImplementedError

    def element(self) -> Optional[GroupElement]:
        """The map as a group element (None for maps that are not group elements)."""
        return None

    def regulariser(self) -> torch.Tensor:
        return torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _on_channels(x, self.weight(), self.bias)


class IdentityMap(StitchLayer):
    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def weight(self):
        return torch.eye(self.n)

    def element(self):
        return ScaledPermutation(torch.arange(self.n), None, group="trivial")

    def forward(self, x):
        return x.clone()  # a tail may work in place (``out += identity``); never on the cache


class LinearMap(StitchLayer):
    """Full (``rank=None``) or rank-k linear map, optionally with a bias. Init: a fit (``init="match"``),
    else the identity where it is square and full rank, else Gaussian with variance 1/fan-in."""

    def __init__(self, n_in: int, n_out: int, rank: Optional[int], bias: bool, gen: torch.Generator, init=None):
        super().__init__()
        fitted = init if hasattr(init, "weight") else None
        if fitted is not None and rank is None:
            self.W = nn.Parameter(fitted.weight.float().clone())
        elif fitted is not None:
            self.U = nn.Parameter(fitted.factors[0].float().clone())
            self.V = nn.Parameter(fitted.factors[1].float().clone())
        elif rank is None:
            square = n_in == n_out and init != "random"
            W = torch.eye(n_out, n_in) if square else torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5
            self.W = nn.Parameter(W)
        else:
            self.U = nn.Parameter(torch.randn(n_out, rank, generator=gen) / rank ** 0.5)
            self.V = nn.Parameter(torch.randn(rank, n_in, generator=gen) / n_in ** 0.5)
        self.rank = rank
        self.l1 = 0.0  # LASSO weight: α·Σ|W| is added to the loss (``stitch(l1=α)``)
        if bias:
            self.bias = nn.Parameter(torch.zeros(n_out) if fitted is None or fitted.bias is None else fitted.bias.float().clone())

    def weight(self):
        return self.W if self.rank is None else self.U @ self.V

    def regulariser(self):
        return self.l1 * self.weight().abs().sum() if self.l1 else torch.zeros(())

    def element(self):
        """The map as a GL element; None when it is not one: low rank, not square, or singular (a fitted map sends
        a unit that is never active in A to 0, and no gradient moves it). Singular to float32's rank tolerance."""
        if self.rank is not None or self.W.shape[0] != self.W.shape[1]:
            return None
        W = self.W.detach()
        return Dense(W.double(), group="gl") if int(torch.linalg.matrix_rank(W.float())) == W.shape[0] else None


class OrthogonalMap(StitchLayer):
    """Q₀ · exp(S − Sᵀ): always orthogonal; Q₀ = I (init="identity"), a Haar sample ("random") or
    the Procrustes fit (``init="match"``)."""

    def __init__(self, n: int, special: bool, init, gen: torch.Generator):
        super().__init__()
        if hasattr(init, "weight"):
            Q0 = init.weight
        else:
            Q0 = torch.eye(n, dtype=torch.float64) if init == "identity" else Orthogonal(n, special=special).sample(gen).matrix()
        self.register_buffer("Q0", Q0.float())
        self.S = nn.Parameter(torch.zeros(n, n))
        self.special = special

    def weight(self):
        return self.Q0 @ torch.linalg.matrix_exp(self.S - self.S.T)

    def element(self):
        name = "special_orthogonal" if self.special else "orthogonal"
        return Dense(self.weight().detach().double(), group=name, orthogonal=True)


def sinkhorn(logits: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """A doubly-stochastic matrix from ``logits [n, n]`` (alternating row/column normalisation, in log space)."""
    for _ in range(iters):
        logits = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        logits = logits - torch.logsumexp(logits, dim=0, keepdim=True)
    return logits.exp()


class SinkhornMap(StitchLayer):
    """diag(s) · P with P doubly stochastic (Sinkhorn of learned logits), relaxing P·D.

    ``diagonal``: None (permutations only), "positive" (s = exp(log s), G_ReLU), "sign" or
    "nonzero" (s free; "sign" rounds to ±1). ``alpha`` weighs the paper's −α‖P‖_F term that pushes
    P towards a vertex. After ``round()``, P is the exact permutation the Hungarian algorithm finds.
    ``init``: "random" (logits = 0.01·Gaussian, P ≈ the uniform barycentre), "identity" (P ≈ I),
    or a ScaledPermutation (P ≈ its permutation, scales = its scales; e.g. ``wb.match_neurons(...).element``).
    """

    def __init__(self, n: int, diagonal: Optional[str], init, gen: torch.Generator, alpha: float = 0.1):
        super().__init__()
        logits = 0.01 * torch.randn(n, n, generator=gen)
        start = init if isinstance(init, ScaledPermutation) else None
        if start is not None:
            logits[torch.arange(n), start.perm] += 10.0  # P ≈ that vertex (P_ii ≈ 1 − n·e⁻¹⁰)
        elif init == "identity":
            logits += 5.0 * torch.eye(n)
        self.logits = nn.Parameter(logits)
        self.diagonal, self.alpha = diagonal, alpha
        s0 = torch.ones(n) if start is None or start.scale is None else start.scale.float()
        # A fitted scale of 0 (a unit that is never active in A) is in no group here, and a unit whose input is
        # always 0 gets no gradient, so it would stay 0: start it at 1.
        s0 = torch.where(s0 == 0, torch.ones_like(s0), s0)
        self.log_scale = nn.Parameter(s0.abs().clamp_min(1e-6).log()) if diagonal == "positive" else None
        self.scale = nn.Parameter(s0.clone()) if diagonal in ("sign", "nonzero") else None
        self.perm: Optional[torch.Tensor] = None  # set by round()
        self.temperature = 1.0  # annealed by the training schedule: P moves towards a vertex

    def anneal(self, progress: float, final: float = 0.05) -> None:
        """Temperature τ = final^progress (1 → ``final`` over training): Sinkhorn(logits / τ)."""
        self.temperature = final ** progress

    def scales(self) -> Optional[torch.Tensor]:
        if self.log_scale is not None:
            return self.log_scale.exp()
        if self.scale is not None:
            if self.perm is not None and self.diagonal == "sign":  # ±1: sign(0) = 0 would leave a zero row
                return torch.where(self.scale < 0, -torch.ones_like(self.scale), torch.ones_like(self.scale))
            return self.scale
        return None

    def soft(self) -> torch.Tensor:
        return sinkhorn(self.logits / self.temperature)

    def weight(self):
        P = self.soft() if self.perm is None else torch.eye(len(self.perm))[self.perm]
        s = self.scales()
        return P if s is None else s[:, None] * P

    def regulariser(self):
        return -self.alpha * torch.linalg.matrix_norm(self.soft()) if self.perm is None else torch.zeros(())

    def round(self) -> None:
        """Freeze P at the exact permutation maximising Σ P[i, π(i)] (Hungarian algorithm)."""
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(self.soft().detach().double().numpy(), maximize=True)
        perm = np.empty(len(rows), dtype=np.int64)
        perm[rows] = cols
        self.perm = torch.from_numpy(perm)

    def unround(self) -> None:
        """Back to the relaxed P (training continues from it)."""
        self.perm = None

    def element(self):
        if self.perm is None:
            self.round()
        s = self.scales()
        group = {None: "permutation", "positive": "scaled_permutation", "sign": "signed_permutation",
                 "nonzero": "diagonal_permutation"}[self.diagonal]
        return ScaledPermutation(self.perm.clone(), None if s is None else s.detach().double(), group=group)


def birkhoff_projection(A: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """Project a matrix (approximately) onto the Birkhoff polytope: clip at 0, then alternate row and
    column normalisation (Sinkhorn's algorithm on the entries themselves, not on logits)."""
    A = A.clamp_min(0) + 1e-12  # an all-zero row would have no normalisation
    for _ in range(iters):
        A = A / A.sum(dim=1, keepdim=True)
        A = A / A.sum(dim=0, keepdim=True)
    return A


class BirkhoffMap(SinkhornMap):
    """The paper's G_ReLU stitching layer: diag(s) · P with P a point of the Birkhoff polytope itself
    (not a function of logits), trained by projected gradient: after every optimiser step P is
    projected back (``project()``: clip at 0, Sinkhorn-normalise) and the scales are clipped to
    s ≥ 1e-6 (D > 0). P starts near the barycentre, at the normalisation of a uniform random matrix,
    so every permutation is equally close at the start; the −α‖P‖_F term pushes it towards a vertex,
    and ``round()`` takes the Hungarian permutation for evaluation."""

    def __init__(self, n: int, diagonal: Optional[str], gen: torch.Generator, alpha: float = 0.1):
        nn.Module.__init__(self)
        self.register_parameter("bias", None)
        self.P = nn.Parameter(birkhoff_projection(torch.rand(n, n, generator=gen), iters=100))
        self.diagonal, self.alpha = diagonal, alpha
        self.log_scale = None
        self.scale = nn.Parameter(torch.ones(n)) if diagonal is not None else None
        self.perm: Optional[torch.Tensor] = None
        self.temperature = 1.0

    def anneal(self, progress: float, final: float = 0.05) -> None:  # the projection sharpens P, not a temperature
        pass

    def soft(self) -> torch.Tensor:
        return self.P

    @torch.no_grad()
    def project(self) -> None:
        self.P.copy_(birkhoff_projection(self.P))
        if self.scale is not None and self.diagonal == "positive":
            self.scale.clamp_(min=1e-6)


class DiagonalMap(StitchLayer):
    """Positive scalings only: diag(exp(log s))."""

    def __init__(self, n: int, init=None):
        super().__init__()
        start = torch.zeros(n) if not hasattr(init, "weight") else torch.diagonal(init.weight).float().log()
        self.log_scale = nn.Parameter(start)

    def weight(self):
        return torch.diag(self.log_scale.exp())

    def element(self):
        return ScaledPermutation(torch.arange(len(self.log_scale)), self.log_scale.detach().exp().double(),
                                 group="positive_diagonal")


def make_layer(spec: StitchSpec, n_in: int, n_out: int, *, bias: bool, init, gen: torch.Generator,
               sharpening: float = 0.1) -> StitchLayer:
    """A fresh stitching layer for ``spec`` from ``n_in`` to ``n_out`` channels (``sharpening``: the −α‖P‖_F weight
    of a doubly-stochastic P)."""
    if spec.kind != "linear" and n_in != n_out:
        raise InvalidOptionError(
            f"a {spec.name!r} stitch maps a space to one of the same dimension, but the models have {n_in} and "
            f"{n_out} channels here; use group='gl' or 'low_rank:k' between different widths.")
    if spec.rank is not None and spec.rank > min(n_in, n_out):
        raise InvalidOptionError(f"{spec.name!r}: rank {spec.rank} exceeds the smaller width, {min(n_in, n_out)}.")
    if spec.kind == "identity":
        return IdentityMap(n_in)
    if spec.kind == "linear":
        return LinearMap(n_in, n_out, spec.rank, bias, gen, init)
    if spec.kind == "orthogonal":
        return OrthogonalMap(n_in, spec.special, "identity" if init is None else init, gen)
    if spec.kind == "sinkhorn":
        if init == "uniform":
            return BirkhoffMap(n_in, spec.diagonal, gen, alpha=sharpening)
        return SinkhornMap(n_in, spec.diagonal, "random" if init is None else init, gen, alpha=sharpening)
    return DiagonalMap(n_in, init)
