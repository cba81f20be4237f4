"""Group elements: structured invertible maps, dense only when they must be.

Every element is an invertible n×n matrix M stored in its cheapest exact form, acting on one axis
of a tensor: ``g.act(x, dim)`` computes ``x'[..., i, ...] = Σ_j M[i, j] x[..., j, ...]``. Elements
compose (``g @ h`` is M_g M_h), invert, transpose, and carry φ(M) — the homomorphism of the
intertwiner group they came from (M itself, abs(M), or the entrywise d-th power), so that a
hidden activation moves as h ↦ φ(M) h while the writer's rows move by M.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .._errors import InvalidOptionError

Phi = Union[str, tuple]  # "identity" | "abs" | ("power", d)


def phi_positive(phi: Phi) -> bool:
    """Whether φ(M) has only non-negative entries for every M (abs, or an even power)."""
    return phi == "abs" or (isinstance(phi, tuple) and phi[0] == "power" and float(phi[1]) % 2 == 0)


def _phi_name(phi: Phi) -> str:
    return phi if isinstance(phi, str) else f"power{phi[1]}"


class GroupElement:
    """An invertible n×n map. Subclasses store it structurally."""

    n: int
    phi_kind: Phi = "identity"
    group: str = ""  # name of the family it was sampled from (for reports)

    # -- the algebra every subclass provides -------------------------------------------------
    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        raise NotImplementedError

    def act(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """``M`` applied along axis ``dim`` of ``x`` (that axis must have length n)."""
        raise NotImplementedError

    def inverse(self) -> "GroupElement":
        raise NotImplementedError

    def transpose(self) -> "GroupElement":
        raise NotImplementedError

    def _phi(self) -> "GroupElement":
        raise NotImplementedError

    def inverse_transpose(self) -> "GroupElement":
        """``M⁻ᵀ``, what a reader's weight takes on its input axis (``W ↦ W M⁻¹``): ``inverse().transpose()``,
        which the subclasses build in one step where they can (same values, same tensor layouts)."""
        return self.inverse().transpose()

    # -- shared behaviour ----------------------------------------------------------------------
    def phi(self) -> "GroupElement":
        """φ(M): how the activation after the nonlinearity moves (M, abs(M) or M^{⊙d})."""
        return self if self.phi_kind == "identity" else self._phi()

    def compose(self, other: "GroupElement") -> "GroupElement":
        """The element ``M_self @ M_other`` (apply ``other`` first)."""
        return _compose(self, other)

    def __matmul__(self, other: "GroupElement") -> "GroupElement":
        return self.compose(other)

    def perm_part(self) -> Optional["ScaledPermutation"]:
        """The permutation P of a scaled permutation D·P (what passes a BatchNorm's statistics, a gated
        MLP's gate or a norm's gains), or None for an element that is not one (a dense map)."""
        return None

    def _check_axis(self, x: torch.Tensor, dim: int) -> int:
        d = dim % x.ndim
        if x.shape[d] != self.n:
            raise InvalidOptionError(
                f"this {type(self).__name__} acts on axes of length {self.n}, but axis {dim} of the "
                f"tensor has length {x.shape[d]} (shape {tuple(x.shape)})."
            )
        return d

    def is_identity(self, atol: float = 0.0) -> bool:
        eye = torch.eye(self.n, dtype=torch.float64)
        return bool(torch.allclose(self.matrix(), eye, rtol=0, atol=atol))

    def to_dict(self) -> dict:
        """A JSON-serialisable record (tensors as nested lists) that :func:`element_from_dict` reads."""
        raise NotImplementedError

    def validate(self, what: str = "the element") -> "GroupElement":
        """This element, if it is the invertible map its fields say it is; otherwise an
        :class:`~workbench._errors.InvalidOptionError` naming what is wrong (``what`` names the element). A record
        edited by hand, or an element built by hand, can be no map at all (a permutation with a repeated index)
        or another map than it claims (an "orthogonal" matrix whose transpose is not its inverse): pushed, either
        would change a model's function while its transform says it is a symmetry."""
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, group={self.group!r}, phi={_phi_name(self.phi_kind)})"


@dataclass(repr=False)
class ScaledPermutation(GroupElement):
    """``M = diag(scale) · P``: ``(M x)_i = scale_i · x_{perm_i}``. With scale None, a pure permutation.

    Covers permutations, positive-scaled permutations (G_ReLU), signed permutations and permutations
    times any nonzero diagonal — everything the activation catalogue needs except dense maps.
    """

    perm: torch.Tensor  # [n] long, a permutation of range(n)
    scale: Optional[torch.Tensor] = None  # [n] nonzero, or None for all ones
    phi_kind: Phi = "identity"
    group: str = "permutation"
    n: int = field(init=False)

    def perm_part(self) -> "ScaledPermutation":
        return ScaledPermutation(self.perm, None, self.phi_kind, self.group)

    def __post_init__(self):
        self.perm = torch.as_tensor(self.perm, dtype=torch.long)
        self.n = int(self.perm.numel())
        if self.scale is not None:
            self.scale = torch.as_tensor(self.scale)
            if self.scale.shape != (self.n,):
                raise InvalidOptionError(f"scale must have shape ({self.n},); got {tuple(self.scale.shape)}.")
            if not self.scale.is_floating_point():
                self.scale = self.scale.double()

    def validate(self, what: str = "the element") -> "ScaledPermutation":
        perm = self.perm
        ok = perm.ndim == 1 and bool(((perm >= 0) & (perm < self.n)).all())
        if not ok or not bool((torch.bincount(perm, minlength=self.n) == 1).all()):
            raise InvalidOptionError(f"{what}: its perm is not a permutation of 0..{self.n - 1} (each index exactly "
                                     f"once); got {perm.tolist()[:12]}{' …' if self.n > 12 else ''}.")
        if self.scale is not None:
            s = self.scale.detach().to("cpu", torch.float64)
            if not bool(torch.isfinite(s).all()):
                raise InvalidOptionError(f"{what}: its scale has entries that are not finite (at "
                                         f"{torch.nonzero(~torch.isfinite(s)).flatten().tolist()[:8]}); a scale must "
                                         f"be finite and nonzero.")
            if bool((s == 0).any()) or not bool(torch.isfinite(1 / s).all()):
                raise InvalidOptionError(f"{what}: its scale has zero (or subnormal) entries (at "
                                         f"{torch.nonzero(~torch.isfinite(1 / s)).flatten().tolist()[:8]}): the map is "
                                         f"not invertible; a scale must be finite and nonzero.")
        return self

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        m = torch.zeros(self.n, self.n, dtype=dtype)
        m[torch.arange(self.n), self.perm] = 1 if self.scale is None else self.scale.to(dtype)
        return m

    def act(self, x: torch.Tensor, dim: int = -1, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``M·x`` along ``dim`` (a gather, then the scales); written into ``out`` (contiguous, ``x``'s shape) if given."""
        d = self._check_axis(x, dim)
        perm = self.perm.to(x.device)
        y = x.index_select(d, perm) if out is None else torch.index_select(x, d, perm, out=out)
        if self.scale is not None:
            shape = [1] * x.ndim
            shape[d] = self.n
            scale = self.scale.to(device=x.device, dtype=x.dtype).reshape(shape)
            y = y * scale if out is None else y.mul_(scale)
        return y

    def inverse(self) -> "ScaledPermutation":
        inv = torch.empty_like(self.perm)
        inv[self.perm] = torch.arange(self.n)
        # M = D P  =>  M^{-1} = P^{-1} D^{-1} = D' P^{-1} with D'_i = 1 / scale_{inv_i}
        scale = None if self.scale is None else 1.0 / self.scale[inv]
        return ScaledPermutation(inv, scale, self.phi_kind, self.group)

    def transpose(self) -> "ScaledPermutation":
        # (D P)^T = P^T D = P^{-1} D = D'' P^{-1} with D''_i = scale_{inv_i}
        inv = torch.empty_like(self.perm)
        inv[self.perm] = torch.arange(self.n)
        scale = None if self.scale is None else self.scale[inv]
        return ScaledPermutation(inv, scale, self.phi_kind, self.group)

    def inverse_transpose(self) -> "ScaledPermutation":
        # (D P)⁻ᵀ = D⁻¹ P⁻ᵀ = D⁻¹ P: the same permutation, each scale inverted. inverse().transpose() builds two
        # inverse permutations and two gathers to reach it (40 µs a site on an MLP's 2048 channels), and its
        # scales are 1/scale[inv][perm], which is 1/scale entry for entry: the same bits.
        return ScaledPermutation(self.perm, None if self.scale is None else 1.0 / self.scale, self.phi_kind, self.group)

    def _phi(self) -> "ScaledPermutation":
        if self.scale is None:
            return ScaledPermutation(self.perm, None, "identity", self.group)
        if self.phi_kind == "abs":
            scale = self.scale.abs()
        elif isinstance(self.phi_kind, tuple) and self.phi_kind[0] == "power":
            scale = self.scale ** self.phi_kind[1]
        else:
            raise InvalidOptionError(f"unknown homomorphism φ {self.phi_kind!r}; known: 'identity', 'abs', ('power', d).")
        return ScaledPermutation(self.perm, scale, "identity", self.group)

    def to_dict(self) -> dict:
        return {"type": "scaled_permutation", "perm": self.perm.tolist(),
                "scale": None if self.scale is None else self.scale.double().tolist(),
                "phi": self.phi_kind if isinstance(self.phi_kind, str) else list(self.phi_kind), "group": self.group}


@dataclass(repr=False)
class Dense(GroupElement):
    """A dense invertible matrix (general linear and orthogonal maps). Keeps float64 for exactness.

    ``inv`` is M⁻¹ when it is known exactly from how M was made (a GL draw U·diag(s)·Vᵀ has the inverse
    V·diag(1/s)·Uᵀ: one product, no LU, and as exact as M itself), and ``cond`` M's 2-norm condition number
    when it is known (max s / min s; 1 for an orthogonal map). Both are optional: an element without them
    inverts with ``torch.linalg.inv``, and a push treats an unknown ``cond`` as ill-conditioned (float64
    products, ``_port_moves.dense_ok``)."""

    M: torch.Tensor  # [n, n]
    phi_kind: Phi = "identity"
    group: str = "gl"
    orthogonal: bool = False  # inverse is the transpose, exactly
    inv: Optional[torch.Tensor] = None  # [n, n] M⁻¹, when known from the element's factors
    cond: Optional[float] = None  # ‖M‖₂‖M⁻¹‖₂, when known
    n: int = field(init=False)

    def __post_init__(self):
        self.M = torch.as_tensor(self.M)
        if self.M.ndim != 2 or self.M.shape[0] != self.M.shape[1]:
            raise InvalidOptionError(f"a dense group element needs a square matrix; got shape {tuple(self.M.shape)}.")
        if not self.M.is_floating_point():
            self.M = self.M.double()
        if self.inv is not None and tuple(self.inv.shape) != tuple(self.M.shape):
            raise InvalidOptionError(f"the inverse of a {tuple(self.M.shape)} element has shape {tuple(self.inv.shape)}.")
        if self.orthogonal and self.cond is None:
            self.cond = 1.0
        self.n = int(self.M.shape[0])

    def validate(self, what: str = "the element") -> "Dense":
        M = self.M.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(M).all()):
            raise InvalidOptionError(f"{what}: its matrix has entries that are not finite; a group element is a "
                                     f"finite invertible matrix.")
        eye = torch.eye(self.n, dtype=torch.float64)
        scale = max(1.0, M.abs().max().item())
        if self.orthogonal:
            err = (M @ M.T - eye).abs().max().item()
            if not err <= 1e-9:
                raise InvalidOptionError(f"{what} says it is orthogonal, but M·Mᵀ differs from the identity by {err:.2e}: "
                                         f"its transpose (what a push uses as its inverse) is not its inverse. Give "
                                         f"orthogonal=False for a general linear map.")
            return self
        if self.inv is not None:
            inv = self.inv.detach().to("cpu", torch.float64)
            if not bool(torch.isfinite(inv).all()):
                raise InvalidOptionError(f"{what}: its inverse has entries that are not finite.")
            err = (M @ inv - eye).abs().max().item()
            if not err <= 1e-8 * max(1.0, scale * inv.abs().max().item() * self.n):
                raise InvalidOptionError(f"{what}: the inverse it carries is not M's inverse (M·M⁻¹ differs from the "
                                         f"identity by {err:.2e}); leave the inverse out to have it computed.")
        else:
            s = torch.linalg.svdvals(M)
            if not s[-1].item() > self.n * torch.finfo(torch.float64).eps * s[0].item():
                raise InvalidOptionError(f"{what}: its matrix is singular (smallest singular value {s[-1].item():.2e}, "
                                         f"largest {s[0].item():.2e}), so it is no invertible map.")
        if self.cond is not None and not (math.isfinite(self.cond) and self.cond >= 1):
            raise InvalidOptionError(f"{what}: its condition number {self.cond!r} is not a number ≥ 1.")
        return self

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return self.M.to(dtype)

    def act(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        d = self._check_axis(x, dim)
        M = self.M.to(device=x.device, dtype=x.dtype)
        return torch.movedim(torch.tensordot(M, torch.movedim(x, d, 0), dims=([1], [0])), 0, d)

    def inverse(self) -> "Dense":
        # (views, not copies, of M and its inverse: no element changes its matrix in place)
        if self.orthogonal:
            return Dense(self.M.T, self.phi_kind, self.group, True, self.M, 1.0)
        if self.inv is not None:
            return Dense(self.inv, self.phi_kind, self.group, False, self.M, self.cond)
        return Dense(torch.linalg.inv(self.M), self.phi_kind, self.group, False, self.M, self.cond)

    def transpose(self) -> "Dense":
        inv = None if self.inv is None else self.inv.T
        return Dense(self.M.T, self.phi_kind, self.group, self.orthogonal, inv, self.cond)

    def inverse_transpose(self) -> "Dense":
        # inverse().transpose() in one element instead of two, with the same views of M and its inverse
        if self.orthogonal:
            return Dense(self.M, self.phi_kind, self.group, True, self.M.T, 1.0)  # (M.T).T: M's own view
        if self.inv is not None:
            return Dense(self.inv.T, self.phi_kind, self.group, False, self.M.T, self.cond)
        return self.inverse().transpose()

    def _phi(self) -> "Dense":
        if self.phi_kind == "abs":
            return Dense(self.M.abs(), "identity", self.group)
        if isinstance(self.phi_kind, tuple) and self.phi_kind[0] == "power":
            return Dense(self.M ** self.phi_kind[1], "identity", self.group)
        raise InvalidOptionError(f"unknown homomorphism φ {self.phi_kind!r}; known: 'identity', 'abs', ('power', d).")

    def to_dict(self) -> dict:
        # The exact inverse and the condition number travel with M, so a replayed transform pushes the same
        # products in the same precision (bit for bit) as the one drawn.
        d = {"type": "dense", "M": self.M.double().tolist(), "orthogonal": self.orthogonal,
             "phi": self.phi_kind if isinstance(self.phi_kind, str) else list(self.phi_kind), "group": self.group}
        if self.inv is not None and not self.orthogonal:
            d["inverse"] = self.inv.double().tolist()
        if self.cond is not None:
            d["cond"] = self.cond
        return d


def identity(n: int) -> ScaledPermutation:
    return ScaledPermutation(torch.arange(n), None, "identity", "identity")


def _is_permutation(e: GroupElement) -> bool:
    return isinstance(e, ScaledPermutation) and e.scale is None


def _common_phi(a: GroupElement, b: GroupElement) -> Phi:
    """φ of the product ``a @ b``: φ(AB) = φ(A)φ(B) needs one homomorphism for both. A pure permutation
    is its own image under every φ (entrywise maps fix 0 and 1), so it takes the other's."""
    if a.phi_kind == b.phi_kind or _is_permutation(b):
        return a.phi_kind
    if _is_permutation(a):
        return b.phi_kind
    raise InvalidOptionError(f"cannot compose elements with different homomorphisms φ ({_phi_name(a.phi_kind)} and "
                     f"{_phi_name(b.phi_kind)}): the product's φ would be neither; compose elements of one group.")


def _compose(a: GroupElement, b: GroupElement) -> GroupElement:
    if a.n != b.n:
        raise InvalidOptionError(f"cannot compose elements acting on {a.n} and {b.n} dimensions.")
    phi = _common_phi(a, b)
    group = a.group if a.group == b.group else f"{a.group}·{b.group}"
    if isinstance(a, ScaledPermutation) and isinstance(b, ScaledPermutation):
        # (D_a P_a)(D_b P_b) x: (D_b P_b x)_j = s_b[j] x[p_b[j]]; then row i picks j = p_a[i].
        perm = b.perm[a.perm]
        if a.scale is None and b.scale is None:
            scale = None
        else:
            sa = a.scale if a.scale is not None else torch.ones(a.n, dtype=torch.float64)
            sb = b.scale if b.scale is not None else torch.ones(b.n, dtype=torch.float64)
            scale = sa * sb[a.perm]
        return ScaledPermutation(perm, scale, phi, group)
    ortho = getattr(a, "orthogonal", False) and getattr(b, "orthogonal", False)
    if isinstance(a, ScaledPermutation) and a.scale is None:
        ortho = getattr(b, "orthogonal", False)
    if isinstance(b, ScaledPermutation) and b.scale is None:
        ortho = getattr(a, "orthogonal", False)
    return Dense(a.matrix() @ b.matrix(), phi, group, ortho)


def element_from_dict(d: dict, what: str = "the element") -> GroupElement:
    """Rebuild an element from :meth:`GroupElement.to_dict`, refusing a record that is no invertible map or not
    the map it says (``GroupElement.validate``; ``what`` names it in the message)."""
    if not isinstance(d, dict) or "type" not in d:
        raise InvalidOptionError(f"{what}: not a group element record (a dict with a 'type'); got {type(d).__name__}.")
    phi = d.get("phi", "identity")
    phi = tuple(phi) if isinstance(phi, list) else phi
    try:
        if d["type"] == "scaled_permutation":
            perm = d["perm"]
            if not isinstance(perm, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in perm):
                raise InvalidOptionError(f"{what}: its perm is not a permutation: a list of integer indices; got "
                                         f"{str(perm)[:80]}.")
            scale = None if d["scale"] is None else torch.tensor(d["scale"], dtype=torch.float64)
            return ScaledPermutation(torch.tensor(perm, dtype=torch.long), scale, phi, d.get("group", "")).validate(what)
        if d["type"] == "dense":
            inv = torch.tensor(d["inverse"], dtype=torch.float64) if d.get("inverse") is not None else None
            return Dense(torch.tensor(d["M"], dtype=torch.float64), phi, d.get("group", ""), d.get("orthogonal", False),
                         inv, d.get("cond")).validate(what)
    except KeyError as exc:
        raise InvalidOptionError(f"{what}: its {d['type']!r} record has no {exc.args[0]!r}.") from None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, InvalidOptionError):
            raise
        raise InvalidOptionError(f"{what}: its record does not hold numbers of the right shape: {exc}") from None
    raise InvalidOptionError(f"{what}: unknown group element type {d['type']!r}; known: 'scaled_permutation', 'dense'.")
