"""Group families and the one registry of group names every verb uses."""
from __future__ import annotations

import functools
from typing import Optional, Union

import torch

from .._errors import InvalidOptionError, check_option
from ._elements import Dense, GroupElement, Phi, ScaledPermutation, identity, phi_positive
from ._haar import haar_reflections

Generator = Optional[torch.Generator]


def _gen(generator: Generator = None, seed: Optional[int] = None) -> torch.Generator:
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(0 if seed is None else int(seed))


class Group:
    """A group of invertible n×n maps with a sampler: one registry family (``FAMILIES``) at one n.

    A *family* is a registry name that gives a group for every n (``"gl"`` → GL(n)); ``phi`` is the
    homomorphism its elements carry.
    """

    name: str = ""
    label: str = ""  # the mathematics, for tables: "P·D₊ (G_ReLU)"
    continuous: bool = False  # a continuous group: coordinates carry no architectural meaning
    phi: Phi = "identity"
    activation: Optional[str] = None  # display name of the activation whose intertwiner group this is
    centre: Optional[float] = None  # σ(0), set only on an affine extension (see offset)

    def __init__(self, n: int, *, phi: Phi = "identity", source: str = "family"):
        if not isinstance(n, int) or n < 1:
            raise InvalidOptionError(f"a group acts on n ≥ 1 dimensions; got n={n!r}.")
        self.n = n
        self.phi = phi
        #: where this group came from: "family", "catalogue", "empirical" or "affine extension"
        self.source = source

    def sample(self, generator: Generator = None, *, seed: Optional[int] = None) -> GroupElement:
        """A random element (same ``seed`` or generator state, same element)."""
        return self.sample_many(1, generator, seed=seed)[0]

    def sample_many(self, k: int, generator: Generator = None, *, seed: Optional[int] = None) -> list[GroupElement]:
        """``k`` independent random elements. Dense families draw them in one batched computation
        (one batched Haar call for all of them), so these are not the elements ``k`` calls of ``sample`` give."""
        if not isinstance(k, int) or k < 0:
            raise InvalidOptionError(f"sample_many draws k ≥ 0 elements; got k={k!r}.")
        return self._sample_many(k, _gen(generator, seed))

    def _sample_many(self, k: int, g: torch.Generator) -> list[GroupElement]:
        """Families override ``sample`` (one at a time) or this (batched); the other follows."""
        if type(self).sample is Group.sample:
            raise NotImplementedError(f"{type(self).__name__} defines neither sample nor _sample_many.")
        return [self.sample(g) for _ in range(k)]

    def identity(self) -> GroupElement:
        e = identity(self.n)
        e.phi_kind, e.group = self.phi, self.name
        return e

    def contains(self, element: GroupElement, atol: float = 1e-9) -> bool:
        """Whether ``element``'s matrix lies in this group (to ``atol``). A scaled permutation is judged from its
        permutation and scalings (no n×n matrix) where the family can. An element that is no invertible finite
        matrix (a perm with a repeated index, a zero or NaN scale, a matrix with NaN entries) is in no group: the
        monomial rules read a perm as a permutation and a scale as a number, and would admit it."""
        if element.n != self.n:
            return False
        if isinstance(element, ScaledPermutation):
            try:
                element.validate()  # O(n): a permutation, finite nonzero scales
            except InvalidOptionError:
                return False
        elif not bool(torch.isfinite(element.matrix()).all()):  # (a singular matrix fails each family's own test)
            return False
        if isinstance(element, ScaledPermutation):
            scale = element.scale.detach().double().cpu() if element.scale is not None else torch.ones(self.n, dtype=torch.float64)
            found = self._contains_monomial(element.perm.cpu(), scale, atol)
            if found is not None:
                return bool(found)
        return self._contains(element.matrix(), atol)

    def _contains(self, M: torch.Tensor, atol: float) -> bool:
        raise NotImplementedError

    def _contains_monomial(self, perm: torch.Tensor, scale: torch.Tensor, atol: float) -> Optional[bool]:
        """Whether ``diag(scale)·P`` (perm a permutation, scale nonzero) lies in this group; None: ask ``_contains``."""
        return None

    def flips_signs(self, level: str = "pre") -> bool:
        """Whether an element can make a unit's value the negative of what it was — a ↦ −a, a ↦ c − a (an affine
        extension), or a mix with a negative weight — in a space this group moves, read at ``level`` (an
        ``Observation``'s): "pre" and "heads" move by M, "dual" by M⁻ᵀ (M's signs, for a scaled permutation), "post"
        by φ(M) (never negative for abs or an even power), "perm", "prebn" and "pregn" by M's permutation part alone
        (a family that draws a GroupNorm's input signs says so itself). Matching units after a transform must allow
        flips exactly where this holds (``workbench.symmetry.match_site_units``). A continuous group's element is no
        scaled permutation: a BatchNorm folds into its writer, whose output ("prebn") then moves by M·diag(γ/σ) (with
        a negative entry where M has one or a gain γ is negative), so a flip is allowed there."""
        if level in ("perm", "prebn", "pregn") and self.continuous:
            return True
        if level in ("perm", "prebn", "pregn") or (level == "post" and phi_positive(self.phi)):
            return False
        return self._negates()

    def _negates(self) -> bool:
        """Whether some element (the matrix M) has a negative entry. True unless a family shows otherwise: a wrong
        True only weakens a matching's score, a wrong False scores a flipped unit as unrelated."""
        return True

    def describe(self) -> str:
        """The group as reports and widgets show it: its name, then its label (the mathematics; a host's blocks, whose
        name ``{family}_per_block`` says only the family they lie in)."""
        return f"{self.name} ({self.label})" if self.label else self.name

    def offset(self, element: GroupElement) -> Optional[torch.Tensor]:
        """c(M), float64 ``[n]``, with σ(Mx) = φ(M)σ(x) + c(M); None for a purely linear intertwiner.

        Only affine extensions (``source="affine extension"``, made by ``intertwiner_group(...,
        affine=True)``) return a tensor. Setting x = 0 forces c(M) = σ(0)(1 − φ(M)·1), so the group
        stores σ(0) as ``centre``. A weight transform folds c into the next layer's bias.
        """
        if self.centre is None:
            return None
        ones = torch.ones(self.n, dtype=torch.float64)
        return self.centre * (ones - element.phi().act(ones, dim=0).to(torch.float64))

    def with_n(self, n: int) -> "Group":
        """The same family on n dimensions."""
        g = object.__new__(type(self))
        g.__dict__.update(self.__dict__)
        g.n = n
        return g

    def __repr__(self) -> str:
        extra = "" if self.phi == "identity" else f", phi={self.phi!r}"
        return f"{type(self).__name__}({self.name!r}, n={self.n}{extra})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def __hash__(self):
        return hash((type(self).__name__, self.n))


def _unit(scale: torch.Tensor, atol: float) -> bool:
    return bool(torch.allclose(scale, torch.ones_like(scale), atol=atol, rtol=0))


def _is_monomial(M: torch.Tensor, atol: float) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(perm, scale)`` if M has exactly one nonzero per row and column, else None."""
    nz = M.abs() > atol
    if not (bool((nz.sum(0) == 1).all()) and bool((nz.sum(1) == 1).all())):
        return None
    perm = nz.float().argmax(dim=1)
    return perm, M[torch.arange(M.shape[0]), perm]


class GeneralLinear(Group):
    name, label, continuous = "gl", "GL(n): every invertible map", True

    def __init__(self, n: int, *, sigma: float = 0.5, **kw):
        super().__init__(n, **kw)
        self.sigma = sigma  # log-normal singular values: a well-conditioned random map

    def _sample_many(self, k, g) -> list[Dense]:
        M, inv, cond = self._factored(k, g)
        return _dense(self, M, inv=inv, cond=cond)

    def _matrices(self, k: int, g: torch.Generator) -> torch.Tensor:
        """[k, n, n]: U·diag(s)·Vᵀ with U, V Haar and log-normal singular values s."""
        return self._factored(k, g, inverse=False)[0]

    def _factored(self, k: int, g: torch.Generator, inverse: bool = True, values: bool = False):
        """``(M, M⁻¹, cond)``: M = U·diag(s)·Vᵀ ``[k, n, n]``, its inverse V·diag(1/s)·Uᵀ from the same factors
        (one batched product: an LU inverse per element cost 50 ms of a ViT-B/16 transform's 288 maps, and
        is no more exact), and ``[k]`` condition numbers max s / min s; with ``values``, ``s`` ``[k, n]`` too."""
        # Each element's normals are one row (``_element_normals``): U's reflections, V's, its log singular values.
        # U = Qu·Du and V = Qv·Dv (Haar: products of reflections times their signs, ``_haar``); the signs are applied
        # to s, not to the two [k, n, n] factors: Qu·(Du·s·Dv)·Qvᵀ has the same bits as (U·s)·Vᵀ (sign flips are exact).
        n, tri = self.n, self.n * (self.n + 1) // 2
        x = _element_normals(k, 2 * tri + n, g)
        q, signs = _haar_of(torch.cat([x[:, :tri], x[:, tri:2 * tri]]), n, signs=True)  # one call for both factors
        qu, qv, du, dv = q[:k], q[k:], signs[:k], signs[k:]
        s = torch.exp(self.sigma * x[:, 2 * tri:].unsqueeze(1))
        d = du * dv
        M = (qu * (d * s)) @ qv.mT
        if not inverse:
            return M, None, None
        cond = (s.amax(-1) / s.amin(-1)).reshape(k)
        if values:
            return M, (qv / (d * s)) @ qu.mT, cond, s.reshape(k, self.n)
        return M, (qv / (d * s)) @ qu.mT, cond

    def _contains(self, M, atol):
        return bool(torch.linalg.matrix_rank(M) == self.n)

    def _contains_monomial(self, perm, scale, atol):
        return bool((scale != 0).all())


class Orthogonal(Group):
    name, label, continuous = "orthogonal", "O(n): rotations and reflections", True

    def __init__(self, n: int, *, special: bool = False, **kw):
        super().__init__(n, **kw)
        self.special = special  # SO(n): determinant +1, so a geodesic from the identity exists
        if special:
            self.name, self.label = "special_orthogonal", "SO(n): rotations"

    def _sample_many(self, k, g) -> list[Dense]:
        Q = _haar(k, self.n, g)
        if self.special and k:
            Q[..., 0] *= torch.linalg.det(Q).sign().unsqueeze(-1)
        return _dense(self, Q, orthogonal=True)

    def _negates(self) -> bool:
        return self.n > 1 or not self.special  # SO(1) = {1}; O(1) = {±1}; SO(n ≥ 2) holds diag(−1, −1, 1, …)

    def _contains(self, M, atol):
        ok = torch.allclose(M @ M.T, torch.eye(self.n, dtype=M.dtype), atol=atol, rtol=0)
        return bool(ok and (not self.special or torch.linalg.det(M) > 0))

    def _contains_monomial(self, perm, scale, atol):
        return None if self.special else _unit(scale.abs(), atol)


class OrthogonalOnes(Group):
    """Rotations that fix the all-ones direction: the group of a LayerNorm without gain and bias.

    Centring and normalising commute with R exactly when R is orthogonal and R·1 = 1, so this is the
    residual stream's group once LayerNorm gains and biases are folded into the readers.
    """

    name, label, continuous = "orthogonal_ones", "O(n) fixing 1: rotations of the centred subspace", True

    def _sample_many(self, k, g) -> list[Dense]:
        """R = H·diag(1, Q)·H with Q Haar on O(n−1) and H the Householder reflection that swaps e₁ and
        u = 1/√n: H's columns are an orthonormal basis whose first vector is u, so R fixes u and is
        Haar on the rotations that do. H is applied as rank-one updates, O(n²) per element."""
        n = self.n
        D = torch.eye(n, dtype=torch.float64).repeat(k, 1, 1)
        if n > 1:
            D[:, 1:, 1:] = _haar(k, n - 1, g)
            w = -torch.full((n,), n ** -0.5, dtype=torch.float64)
            w[0] += 1
            w /= torch.linalg.vector_norm(w)  # H = I − 2wwᵀ
            D = D - 2 * (D @ w).unsqueeze(-1) * w  # D·H
            D = D - 2 * w.unsqueeze(-1) * (w @ D).unsqueeze(-2)  # H·(D·H)
        return _dense(self, D, orthogonal=True)

    def _negates(self) -> bool:
        # n ≤ 2: the identity and (n = 2) the swap alone fix 1; n ≥ 3: the half turn about 1, 2uuᵀ − I, has −1 + 2/n
        # on its diagonal
        return self.n >= 3

    def _contains(self, M, atol):
        ones = torch.ones(self.n, dtype=M.dtype)
        return bool(Orthogonal(self.n)._contains(M, atol) and torch.allclose(M @ ones, ones, atol=atol, rtol=0))

    def _contains_monomial(self, perm, scale, atol):
        return _unit(scale, atol)  # M·1 = scale: a monomial fixing 1 is a permutation


class RotaryCommutant(Group):
    """Maps of a query/key head space that commute with rotary embeddings at every position.

    ``pairs`` are the dimension pairs the model rotates together (read from the model: adjacent
    (2i, 2i+1) or halves (i, i + d/2)); on each pair the map is a positive scalar times a 2-D rotation
    (distinct frequencies cannot mix), and on the dimensions no pair covers (beyond the rotary
    dimension) it is any invertible map.
    """

    name, label, continuous = "rotary", "per rotary pair s·R(θ), GL on unrotated dimensions", True

    def __init__(self, n: int, *, pairs=(), sigma: float = 0.5, **kw):
        super().__init__(n, **kw)
        self.pairs = tuple((int(a), int(b)) for a, b in pairs)
        self.sigma = sigma
        covered = [i for p in self.pairs for i in p]
        if len(set(covered)) != len(covered) or any(not 0 <= i < n for i in covered):
            raise InvalidOptionError(f"rotary pairs must be disjoint dimensions in [0, {n}); got {self.pairs}.")
        paired = set(covered)  # built once: a set per dimension made the check O(n²) (0.9 ms a map at d_head 64)
        self.free = tuple(i for i in range(n) if i not in paired)

    def _sample_many(self, k, g) -> list[Dense]:
        M = torch.zeros(k, self.n, self.n, dtype=torch.float64)
        if self.pairs:
            a, b = torch.tensor(self.pairs).T
            s = torch.exp(self.sigma * _normal((k, len(a)), g))
            t = 2 * torch.pi * torch.rand(k, len(a), generator=g, dtype=torch.float64)
            c, si = s * t.cos(), s * t.sin()
            M[:, a, a], M[:, a, b], M[:, b, a], M[:, b, b] = c, -si, si, c
        free_inverse = free_values = None
        if self.free and k:
            idx = torch.tensor(self.free)
            # the same draws as GeneralLinear's matrices alone (its inverse consumes no random numbers)
            B, free_inverse, _, free_values = GeneralLinear(len(self.free), sigma=self.sigma)._factored(k, g, values=True)
            M[:, idx.unsqueeze(1), idx.unsqueeze(0)] = B
        if not self.pairs or not k:
            return _dense(self, M)
        # the exact inverse and cond from the blocks: a push would otherwise find the free block's by an LU and an
        # SVD (9.7 ms of a GPT-NeoX-sized transform), the same map with its inverse rounded differently
        inv, cond, _ = rotary_inverse(M, self.pairs, self.free, free_inverse, free_values)
        return _dense(self, M, inv=inv, cond=cond)

    def _contains(self, M, atol):
        for a, b in self.pairs:
            rest = [i for i in range(self.n) if i not in (a, b)]
            block = M[[a, b]][:, [a, b]]
            if not (torch.allclose(block[0, 0], block[1, 1], atol=atol) and torch.allclose(block[0, 1], -block[1, 0], atol=atol)):
                return False
            if rest and (M[[a, b]][:, rest].abs().max() > atol or M[rest][:, [a, b]].abs().max() > atol):
                return False
        return bool(torch.linalg.matrix_rank(M) == self.n)


class NormedRotary(RotaryCommutant):
    """The maps of a query/key head space that pass a per-head RMSNorm on q and on k (Qwen3's ``q_norm``/``k_norm``,
    gains γ_q and γ_k kept) and then commute with the rotary embedding: docs/DERIVATIONS.md §10, Qwen3.

    The norm passes M exactly when M is orthogonal (its ε included), and γ·M·γ⁻¹ must then commute with the rotation:
    on a pair whose gains are equal (γ_a = γ_b, in both norms) a rotation R(θ), on a pair whose gains differ (``rigid``)
    only ±I, and ±1 on each dimension no pair covers. Elements are orthogonal, so keys move by the same M.
    """

    name, label = "rotary_orthogonal", "per rotary pair R(θ) (±I on a pair whose q/k norm gains differ), ±1 unrotated"

    def __init__(self, n: int, *, pairs=(), rigid=(), **kw):
        super().__init__(n, pairs=pairs, **kw)
        self.rigid = tuple(sorted((int(a), int(b)) for a, b in rigid))
        if not set(self.rigid) <= set(self.pairs):
            raise InvalidOptionError(f"rigid pairs {self.rigid} must be among the rotary pairs {self.pairs}.")
        self.continuous = len(self.rigid) < len(self.pairs)  # a rotation left: coordinates carry no meaning

    def _sample_many(self, k, g) -> list[Dense]:
        M = torch.zeros(k, self.n, self.n, dtype=torch.float64)
        if self.pairs and k:
            a, b = torch.tensor(self.pairs).T
            t = 2 * torch.pi * torch.rand(k, len(a), generator=g, dtype=torch.float64)
            rigid = torch.tensor([p in self.rigid for p in self.pairs])
            t[:, rigid] = torch.pi * (t[:, rigid] > torch.pi).double()  # 0 or π: ±I
            c, si = t.cos(), t.sin()
            si[:, rigid] = 0.0  # sin π is 1e-16, not 0: ±I exactly
            M[:, a, a], M[:, a, b], M[:, b, a], M[:, b, b] = c, -si, si, c
        if self.free and k:
            idx = torch.tensor(self.free)
            M[:, idx, idx] = torch.where(torch.rand(k, len(idx), generator=g) < 0.5, -1.0, 1.0).double()
        return _dense(self, M, orthogonal=True)

    def _contains(self, M, atol):
        if not (super()._contains(M, atol) and Orthogonal(self.n)._contains(M, atol)):
            return False
        rigid_off = [M[a, b] for a, b in self.rigid]
        free_off = M[list(self.free)][:, list(self.free)] - torch.diag(torch.diagonal(M)[list(self.free)]) if self.free else M[:0, :0]
        return all(abs(float(x)) <= atol for x in rigid_off) and bool((free_off.abs() <= atol).all())

    def _contains_monomial(self, perm, scale, atol):
        return None  # judged on the matrix


def rotary_inverse(M: torch.Tensor, pairs: tuple, free: tuple = (), free_inverse: Optional[torch.Tensor] = None,
                   free_values: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(M⁻¹, cond, s²)`` of a rotary commutant batch ``M`` ``[k, n, n]``, from its blocks: on each pair
    (sR)⁻¹ = (sR)ᵀ/s², with s² ``[k, pairs]`` read from M's own entries; on the ``free`` dimensions
    ``free_inverse`` ``[k, f, f]``, whose block has the singular values ``free_values`` ``[k, f]``. cond = max / min
    over every block's singular values (s twice for a pair). A draw passes its GL factors' V·diag(1/s)·Uᵀ and s
    (``RotaryCommutant``); the layout push, for a matrix drawn elsewhere, an LU inverse and an SVD
    (``_layout_push._with_inverses``, which also checks the structure with the returned s²)."""
    a, b = torch.tensor(pairs).T
    s2 = M[:, a, a] ** 2 + M[:, b, a] ** 2  # [k, pairs]: s² of each pair
    w = torch.zeros(M.shape[:2], dtype=torch.float64)
    w[:, a], w[:, b] = 1 / s2, 1 / s2
    inv = M.mT * w[:, :, None]  # row i of Mᵀ over s² of its pair; the free block's rows are zero here
    cond = (s2.amax(1) / s2.amin(1)).sqrt()
    if len(free):
        f = torch.tensor(free, dtype=torch.long)
        inv[:, f[:, None], f[None, :]] = free_inverse
        cond = (torch.maximum(s2.amax(1).sqrt(), free_values.amax(1))
                / torch.minimum(s2.amin(1).sqrt(), free_values.amin(1)))
    return inv, cond, s2


def _haar(k: int, n: int, g: torch.Generator, signs: bool = False):
    """[k, n, n] Haar-distributed orthogonal matrices: Householder reflections of Gaussian vectors (Stewart's
    method, one batched call, ``_haar.haar_reflections``: a compiled loop where numba is installed, torch's
    otherwise; the same Q to rounding), columns multiplied by the reflections' signs; with ``signs``,
    ``(Q, signs as [k, 1, n])`` unmultiplied. Each matrix reads n(n+1)/2 normals (``_element_normals``)."""
    return _haar_of(_element_normals(k, n * (n + 1) // 2, g), n, signs)


def _haar_of(x: torch.Tensor, n: int, signs: bool = False):
    """``_haar`` of given normals ``x`` ``[k, n(n+1)/2]``: row b fills matrix b's lower triangle, row by row."""
    G = torch.zeros(x.shape[0], n * n, dtype=torch.float64)
    G.index_copy_(1, _lower(n), x)  # 0.8 ms for 192 GL(64) factors, where G[:, rows, cols] = x took 2.7
    Q, d = haar_reflections(G.view(-1, n, n))
    return (Q, d) if signs else Q * d


@functools.lru_cache(maxsize=64)
def _lower(n: int) -> torch.Tensor:
    """Flat indices (i·n + j) of an n×n lower triangle with its diagonal, row by row."""
    rows, cols = torch.tril_indices(n, n)
    return rows * n + cols


def _element_normals(k: int, width: int, g: torch.Generator) -> torch.Tensor:
    """``[k, width]`` standard normals (``_normal``), row b drawn exactly as a call for that one row would draw
    it, so a batch split anywhere (``sample_many(a)`` then ``sample_many(b)`` against ``sample_many(a + b)``)
    draws the same elements: probing streams its random bases in chunks whose size depends on the data's
    shape, and a chunk must not change which bases come out. torch's CPU sampler turns uniforms into
    normals 16 at a time and redraws the last block of a size that is not a multiple of 16, so each row is
    drawn padded to a multiple of 16 and the padding is dropped."""
    return _normal((k, -(-width // 16) * 16), g)[:, :width]


def _normal(shape: tuple, g: torch.Generator) -> torch.Tensor:
    """Standard normals as float64, drawn in float32: four times faster on CPU (a float64 draw took
    0.1 s of the 0.6 s that sampling a GPT-2-small-sized transform cost). The 2⁻²⁴ quantisation of
    a Gaussian entry is immaterial to what is built from them: a product of reflections is orthogonal to
    float64 precision whatever its input, and a scale exp(σz) is exact for the z it got."""
    return torch.randn(shape, generator=g, dtype=torch.float32).double()


def _dense(group: Group, M: torch.Tensor, orthogonal: bool = False, inv: Optional[torch.Tensor] = None,
           cond: Optional[torch.Tensor] = None) -> list[Dense]:
    """The ``[k, n, n]`` batch ``M`` as ``group``'s elements, each matrix with storage of its own (an
    element kept alone keeps only itself); ``inv`` and ``cond`` (``[k, n, n]``, ``[k]``) when known exactly."""
    if inv is None:
        return [Dense(m.clone(), group.phi, group.name, orthogonal=orthogonal) for m in M]
    return [Dense(m.clone(), group.phi, group.name, orthogonal, i.clone(), c)
            for m, i, c in zip(M, inv, cond.tolist())]


class Permutation(Group):
    name, label = "permutation", "P: permutations"

    def sample(self, generator=None, *, seed=None) -> ScaledPermutation:
        return ScaledPermutation(torch.randperm(self.n, generator=_gen(generator, seed)), None, self.phi, self.name)

    def _negates(self) -> bool:
        return False

    def _contains(self, M, atol):
        mono = _is_monomial(M, atol)
        return mono is not None and bool(torch.allclose(mono[1], torch.ones_like(mono[1]), atol=atol))

    def _contains_monomial(self, perm, scale, atol):
        return _unit(scale, atol)


class ScaledPermutationGroup(Group):
    """Permutations times a diagonal: positive (G_ReLU), ±1 (signed), or any nonzero."""

    def __init__(self, n: int, *, diagonal: str = "positive", sigma: float = 1.0, **kw):
        super().__init__(n, **kw)
        self.diagonal = check_option("diagonal", diagonal, ["positive", "sign", "nonzero"])
        self.sigma = sigma
        self.name, self.label = {
            "positive": ("scaled_permutation", "P·D₊ (G_ReLU): permutations × positive scalings"),
            "sign": ("signed_permutation", "P·D±: permutations × sign flips"),
            "nonzero": ("diagonal_permutation", "P·D: permutations × nonzero scalings"),
        }[self.diagonal]

    def sample(self, generator=None, *, seed=None) -> ScaledPermutation:
        g = _gen(generator, seed)
        perm = torch.randperm(self.n, generator=g)
        # Log-normal scales exp(σz − σ²/2) have mean 1 (the paper's exp(g)/exp(1/2) at σ = 1). In place: the
        # same roundings as ``torch.exp(σ·z − σ²/2)``, without two temporaries.
        mag = torch.randn(self.n, generator=g, dtype=torch.float64).mul_(self.sigma).sub_(self.sigma ** 2 / 2).exp_()
        # Every diagonal draws the signs, so that a seed gives each kind the same permutations and magnitudes
        # and the draws after this one do not depend on the kind; a positive diagonal only advances the generator.
        coins = torch.rand(self.n, generator=g)
        if self.diagonal == "positive":
            return ScaledPermutation(perm, mag, self.phi, self.name)
        sign = torch.where(coins < 0.5, -1.0, 1.0).double()
        scale = sign if self.diagonal == "sign" else sign * mag
        return ScaledPermutation(perm, scale, self.phi, self.name)

    def _negates(self) -> bool:
        return self.diagonal != "positive"

    def _contains(self, M, atol):
        mono = _is_monomial(M, atol)
        if mono is None:
            return False
        s = mono[1]
        if self.diagonal == "positive":
            return bool((s > 0).all())
        if self.diagonal == "sign":
            return bool(torch.allclose(s.abs(), torch.ones_like(s), atol=atol))
        return True

    def _contains_monomial(self, perm, scale, atol):
        if self.diagonal == "positive":
            return bool((scale > 0).all())
        if self.diagonal == "sign":
            return _unit(scale.abs(), atol)
        return bool((scale != 0).all())


class PositiveDiagonal(Group):
    """Positive scalings without permutations: the group of a per-channel PReLU (one slope per unit)."""

    name, label = "positive_diagonal", "D₊: positive scalings, no permutations"

    def __init__(self, n: int, *, sigma: float = 1.0, **kw):
        super().__init__(n, **kw)
        self.sigma = sigma

    def sample(self, generator=None, *, seed=None) -> ScaledPermutation:
        g = _gen(generator, seed)
        mag = torch.exp(self.sigma * torch.randn(self.n, generator=g, dtype=torch.float64) - self.sigma ** 2 / 2)
        return ScaledPermutation(torch.arange(self.n), mag, self.phi, self.name)

    def _negates(self) -> bool:
        return False

    def _contains(self, M, atol):
        mono = _is_monomial(M, atol)
        return mono is not None and self._contains_monomial(*mono, atol)

    def _contains_monomial(self, perm, scale, atol):
        return bool((perm == torch.arange(self.n)).all() and (scale > 0).all())


class Trivial(Group):
    """Only the identity: what an empirical search returns when not even permutations commute."""

    name, label = "trivial", "{I}: no symmetry"

    def sample(self, generator=None, *, seed=None) -> ScaledPermutation:
        return self.identity()

    def _negates(self) -> bool:
        return False

    def _contains(self, M, atol):
        return bool(torch.allclose(M, torch.eye(self.n, dtype=M.dtype), atol=atol, rtol=0))

    def _contains_monomial(self, perm, scale, atol):
        return bool((perm == torch.arange(self.n)).all()) and _unit(scale, atol)


# ---------------------------------------------------------------------- the registry
def _scaled(diagonal):
    return lambda n, **kw: ScaledPermutationGroup(n, diagonal=diagonal, **kw)


FAMILIES = {
    "gl": GeneralLinear,
    "orthogonal": Orthogonal,
    "special_orthogonal": lambda n, **kw: Orthogonal(n, special=True, **kw),
    "permutation": Permutation,
    "scaled_permutation": _scaled("positive"),
    "signed_permutation": _scaled("sign"),
    "diagonal_permutation": _scaled("nonzero"),
    "positive_diagonal": PositiveDiagonal,
    "trivial": Trivial,
    "orthogonal_ones": OrthogonalOnes,
    "rotary": RotaryCommutant,
    "rotary_orthogonal": NormedRotary,
}
# Aliases: other names of a family, and activation names for their intertwiner group ("relu" → P·D₊,
# "gelu" → P). So "identity" and "linear" name the identity activation's group, GL — not the trivial
# group {I} (that is "trivial", which a stitch spells "identity" for the identity map: STITCH_ALIASES).
GROUP_ALIASES = {
    "general_linear": "gl", "linear": "gl", "identity": "gl",
    "rotation": "orthogonal", "o": "orthogonal", "so": "special_orthogonal",
    "relu": "scaled_permutation", "g_relu": "scaled_permutation", "grelu": "scaled_permutation",
    "positive_scaled_permutation": "scaled_permutation",
    "gelu": "permutation", "tanh": "signed_permutation",
    "layernorm": "permutation", "folded_layernorm": "orthogonal_ones", "rmsnorm": "signed_permutation",
    "folded_rmsnorm": "orthogonal",
}
GROUP_NAMES = [*FAMILIES, *GROUP_ALIASES]


def get_group(spec: Union[str, Group], n: Optional[int] = None, **kwargs) -> Group:
    """A group from a registry name (``"relu"``, ``"orthogonal"``, …) or a :class:`Group` object."""
    if isinstance(spec, Group):
        if n is not None and spec.n != n:
            raise InvalidOptionError(f"the group {spec!r} acts on {spec.n} dimensions, but this place has {n}.")
        return spec
    if not isinstance(spec, str):
        raise InvalidOptionError(f"a group is a name from {GROUP_NAMES} or a Group object; got {type(spec).__name__}.")
    key = check_option("group", spec.lower(), GROUP_NAMES)
    if n is None:
        raise InvalidOptionError(f"group {spec!r}: say how many dimensions it acts on (n=...).")
    return FAMILIES[GROUP_ALIASES.get(key, key)](n, **kwargs)
