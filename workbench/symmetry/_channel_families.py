"""Families of scaled permutations that keep a structure on the channels, for the graph backend's rules:
whole groups of a grouped convolution mapped onto each other (``GroupedPermutations``, DERIVATIONS §3) and the
classes of channels a chunk or channel shuffle keeps together (``ClassPermutations``, §8). Each draws the base
family's scalings, then its own permutation; its own generator kinds keep a full permutation out
(see ``_lattice.generators``)."""
from __future__ import annotations

import copy
from typing import Optional

import torch

from ..groups import Group, ScaledPermutation


class OnBase(Group):
    """A family built on a base family (``base``): its size, φ and source, and its σ, which a caller sets on this
    family (``random_intertwiner``'s ``scale_sigma``) and the base's draw then uses."""

    def __init__(self, base: Group):
        super().__init__(base.n, phi=base.phi, source=getattr(base, "source", "family"))
        self.base = base
        if hasattr(base, "sigma"):
            self.sigma = base.sigma

    def _draw_base(self, generator, seed) -> tuple[torch.Generator, ScaledPermutation]:
        """``(g, element)``: the generator to go on drawing from, and the base family's element drawn first."""
        g = generator if generator is not None else torch.Generator().manual_seed(0 if seed is None else int(seed))
        base = copy.copy(self.base)
        if hasattr(self, "sigma"):
            base.sigma = self.sigma
        return g, base.sample(g)

    def _negates(self) -> bool:
        return self.base._negates()  # the base family's scalings (GroupSigns adds its input signs at "pregn")


class _ChannelPermutations(OnBase):
    """A base family's scaled permutations whose permutation keeps a structure on the channels: the scalings
    are the base family's (drawn first), the permutation the subclass's (``_perm``, ``_keeps``)."""

    continuous = False

    def __init__(self, base: Group, name: str, label: str, kind: str):
        super().__init__(base)
        self.name, self.label = name, label
        self.generator_kinds = {kind} | (_kinds(base) - {"perm"})

    def sample(self, generator=None, *, seed=None) -> ScaledPermutation:
        g, drawn = self._draw_base(generator, seed)  # the base family's scalings (None for permutations)
        return ScaledPermutation(self._perm(g), drawn.scale, self.phi, self.name)

    def _contains(self, M, atol):
        if not self.base._contains(M, atol):
            return False
        return self._keeps((M.abs() > atol).float().argmax(dim=1))

    def _contains_monomial(self, perm, scale, atol):
        base = self.base._contains_monomial(perm, scale, atol)
        return None if base is None else bool(base and self._keeps(perm))

    def _perm(self, g: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def _keeps(self, perm: torch.Tensor) -> bool:
        raise NotImplementedError


class GroupedPermutations(_ChannelPermutations):
    """Scaled permutations that map the g contiguous groups of a grouped convolution onto each other:
    ``(F·x)_c = d_c·x_π(c)`` with π(group j) = group σ(j) (the wreath product S_k ≀ S_g, times the scalings
    the base family allows). Its own generator kinds keep a full permutation out (see _lattice.generators)."""

    def __init__(self, base: Group, groups: int):
        super().__init__(base, f"grouped_{base.name}",
                         f"{base.label}, mapping the {groups} groups of {base.n // groups} channels onto each other",
                         "perm_groups")
        self.groups = groups

    def _perm(self, g):
        k = self.n // self.groups
        sigma = torch.randperm(self.groups, generator=g)
        within = torch.stack([torch.randperm(k, generator=g) for _ in range(self.groups)])
        return (sigma.unsqueeze(1) * k + within).reshape(-1)  # channel i of block j reads channel within[j, i] of σ(j)

    def _keeps(self, perm):
        return respects_groups(perm, self.groups)


def respects_groups(perm: torch.Tensor, groups: int) -> bool:
    """Whether the permutation maps every contiguous group of channels into one group."""
    k = len(perm) // groups
    src = (perm // k).reshape(groups, k)
    return bool((src == src[:, :1]).all())


def _kinds(group: Group) -> set:
    from ._lattice import generators

    return generators(group)


def grouped(group: Group, groups: set) -> Optional[Group]:
    """``group`` restricted to the couplers' groupings: itself when every coupler is depthwise (one channel
    per group) or has one group; the grouped family for one g; None (freeze) for several different g."""
    gs = {g for g in groups if 1 < g < group.n}
    if not gs or "perm" not in _kinds(group):  # depthwise, or scalings only: every grouping is kept
        return group
    if len(gs) > 1:
        return None
    return GroupedPermutations(group, gs.pop())


class ClassPermutations(_ChannelPermutations):
    """A family's scaled permutations that map each class of channels onto itself: the channels a chunk or channel
    shuffle keeps together (DERIVATIONS §8, route classes). ``labels[c]`` is channel c's class."""

    def __init__(self, base: Group, labels: tuple):
        labels = tuple(int(v) for v in labels)  # a tuple: Group.__eq__ compares __dict__
        sizes = sorted((labels.count(v) for v in set(labels)), reverse=True)
        super().__init__(base, f"classed_{base.name}",
                         f"{base.label}, within {len(sizes)} classes of channels kept together (sizes {sizes})",
                         "perm_classes")
        self.labels = labels
        self.centre = getattr(base, "centre", None)

    def _perm(self, g):
        labels = torch.tensor(self.labels)
        perm = torch.arange(self.n)
        for v in sorted(set(self.labels)):
            idx = torch.nonzero(labels == v).flatten()
            perm[idx] = idx[torch.randperm(len(idx), generator=g)]
        return perm

    def _keeps(self, perm):
        labels = torch.tensor(self.labels)
        return bool((labels[perm] == labels).all())
