"""A host site's element and group (docs/DERIVATIONS.md §6, §8): a concatenation, a zero-padding shortcut or a shuffled
layout (a *host*) embeds the sites it carries, so its element is theirs block by block (:func:`implied_host`, and on
the channels nothing carries an element of its own family, :func:`host_element`), and its group is the product of
theirs (:class:`PerBlock`, given to every host last, :func:`per_block`)."""
from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Optional

import torch

from .._errors import InvalidOptionError
from ..groups import Dense, Group, GroupElement, ScaledPermutation, phi_positive
from ._lattice import generators


def implied_host(site, elements: dict):
    """The element a host site carries when only sites it embeds moved: each embedded site's element (φ of it
    where the host reads that site after its activation) on its channels, the identity elsewhere."""
    if any(not isinstance(start, int) for _, start, *_ in site.embeds):
        return _implied_layout_host(site, elements)
    blocks = []
    for parent, start, count, level in site.embeds:
        e = elements.get(parent) if parent is not None else None
        if e is not None:
            blocks.append((start, count, e.phi() if level == "post" else e))
    if all(isinstance(e, ScaledPermutation) for *_, e in blocks):
        perm, scale = torch.arange(site.n), torch.ones(site.n, dtype=torch.float64)
        for start, count, e in blocks:
            perm[start:start + count] = start + e.perm
            scale[start:start + count] = e.scale if e.scale is not None else 1.0
        return ScaledPermutation(perm, scale, site.group.phi, site.group.name)
    M = torch.eye(site.n, dtype=torch.float64)
    for start, count, e in blocks:
        M[start:start + count, start:start + count] = e.matrix()
    return Dense(M, site.group.phi, site.group.name)


def host_element(G, site, elements: dict, gen: torch.Generator):
    """A host site's element: on the channels it carries, the carried sites' ``elements`` (``implied_host``); on the
    channels nothing carries (a zero-padding shortcut's new channels), a random element of ``G``'s family there
    (a :class:`PerBlock`'s own family, or a group named for the site)."""
    implied = implied_host(site, elements)
    if any(not isinstance(start, int) for _, start, *_ in site.embeds):  # channel by channel: no free channel (§8)
        return implied
    free = torch.nonzero(~carried_mask(site)).flatten()
    f = None
    if len(free):
        f = (G.free_family() if hasattr(G, "free_family") else G.with_n(len(free))).sample(gen)
    if isinstance(implied, ScaledPermutation) and isinstance(f, (ScaledPermutation, type(None))):
        perm, scale = implied.perm.clone(), implied.scale.clone()
        if f is not None:
            perm[free] = free[f.perm]
            scale[free] = f.scale if f.scale is not None else 1.0
        return ScaledPermutation(perm, scale, G.phi, G.name)
    M = implied.matrix().clone()
    if f is not None:
        M[free.unsqueeze(1), free.unsqueeze(0)] = f.matrix()
    return Dense(M, G.phi, G.name)


def carries(site, element, implied) -> bool:
    """Whether a host site's ``element`` is ``implied`` (its carried sites' elements, :func:`implied_host`) on the
    rows and columns of every channel it carries (all of them for a layout carried channel by channel, §8)."""
    carried = carried_mask(site)
    if isinstance(implied, ScaledPermutation) and isinstance(element, ScaledPermutation):
        # Without matrices (a DenseNet host has ~1000 channels): the implied element maps the carried channels
        # onto themselves, so a permutation equal to it on those rows has them as its columns too.
        ones = torch.ones(site.n, dtype=torch.float64)
        a = implied.scale.double() if implied.scale is not None else ones
        b = element.scale.double() if element.scale is not None else ones
        return (torch.equal(element.perm[carried], implied.perm[carried])
                and torch.allclose(b[carried], a[carried], rtol=1e-12, atol=0))
    want, got = implied.matrix(), element.matrix().to(torch.float64)
    tol = 1e-9 * max(1.0, want.abs().max().item())
    return (torch.allclose(got[carried], want[carried], rtol=0, atol=tol)
            and torch.allclose(got[:, carried], want[:, carried], rtol=0, atol=tol))


def per_block(sites: list, drop: dict) -> None:
    """Give every host site its own group, last (after every restriction of the families): the product of the groups
    of the sites it carries, block by block, and of its family on the channels nothing carries (``PerBlock``). Before,
    a host read as its family over its whole width: SqueezeNet's Fire output as scaled_permutation(n), whose
    ``sample`` mixed the two branches' channels, which no transform can do."""
    by_name = {s.name: s for s in sites}
    for host in sites:  # pieces before their hosts (_graph_sites._parents_first): a host of a host sees theirs
        if host.embeds and host.name not in drop:
            pieces = {p: by_name[p].group for p, *_ in host.embeds if p in by_name and p not in drop}
            host.group = PerBlock(host.group, host.name, host.embeds, pieces)


def _implied_layout_host(site, elements: dict):
    """The element of a host whose embeds name channels one by one (host channels ← a space's channels, §8): on host
    channel h carrying channel i of a space moved by D·P, ``(M·x)_h = d_i · x_(where π(i) is carried)``; a dense
    element (only where a space is carried whole) gives ``M[H, H] = E[I, I]``. Channels of no site stay put."""
    blocks = []
    for parent, hosts, chans, level in site.embeds:
        if isinstance(hosts, int):  # a whole site on a range of channels (a zero-padding shortcut added to it)
            hosts, chans = range(hosts, hosts + chans), range(chans)
        e = elements.get(parent) if parent is not None else None
        if e is not None:
            e = e.phi() if level == "post" else e
            blocks.append((torch.tensor(list(hosts)), torch.tensor(list(chans)), e, parent))
    if all(isinstance(e, ScaledPermutation) for _, _, e, _ in blocks):
        perm, scale = torch.arange(site.n), torch.ones(site.n, dtype=torch.float64)
        for hosts, chans, e, parent in blocks:
            where = torch.full((e.n,), -1, dtype=torch.long)
            where[chans] = hosts
            src = where[e.perm[chans]]
            if bool((src < 0).any()):
                raise InvalidOptionError(f"site {site.name!r}: the element of {parent!r} maps channels it carries into "
                                         f"channels it does not (a chunk or channel shuffle keeps them apart); only "
                                         f"permutations within the classes of its group are symmetries.")
            perm[hosts] = src
            if e.scale is not None:
                scale[hosts] = e.scale[chans].double()
        return ScaledPermutation(perm, scale, site.group.phi, site.group.name)
    M = torch.eye(site.n, dtype=torch.float64)
    for hosts, chans, e, _ in blocks:
        M[hosts.unsqueeze(1), hosts.unsqueeze(0)] = e.matrix()[chans.unsqueeze(1), chans.unsqueeze(0)]
    return Dense(M, site.group.phi, site.group.name)


def carried_mask(site) -> torch.Tensor:
    """``[n]`` bool: the host channels its embeds cover (every channel of a layout carried channel by channel, §8)."""
    if any(not isinstance(start, int) for _, start, *_ in site.embeds):
        return torch.ones(site.n, dtype=torch.bool)
    mask = torch.zeros(site.n, dtype=torch.bool)
    for _, start, count, _ in site.embeds:
        mask[start:start + count] = True
    return mask


def carried_width(host) -> int:
    """How many of a host site's channels carry a piece's (a concatenation's, a shuffle's, a zero-padding shortcut's)."""
    return sum(count if isinstance(start, int) else len(start) for _, start, count, _ in host.embeds)


class PerBlock(Group):
    """A host site's group (a concatenation, a zero-padding shortcut, a shuffled layout: DERIVATIONS §6, §8): the direct
    product of the groups of the sites it carries, each on the host channels that carry it (φ of it where the host
    reads a site after its activation; the identity for a space that is no site or cannot move; one element for a site
    carried twice), times the host's own ``family`` on the channels nothing carries (a zero-padding shortcut's new
    channels). ``family`` is the registry family the whole lies in: it names the group (``{family}_per_block``) and
    gives its generator kinds, which ``_lattice`` and a group named for the site are judged by. ``embeds`` are the
    host site's, ``pieces`` each carried site's group (None: it does not move)."""

    def __init__(self, family: Group, host: str, embeds, pieces: dict):
        super().__init__(family.n, phi=family.phi, source=getattr(family, "source", "family"))
        self.family, self.host = family, host
        self.embeds = tuple(tuple(e) for e in embeds)
        self.pieces = {p: pieces.get(p) for p, *_ in self.embeds if p is not None}
        carried = {c for _, start, count, _ in self.embeds for c in _channels(start, count)}
        self.free = tuple(c for c in range(self.n) if c not in carried)
        self.name = f"{family.name}_per_block"
        self.generator_kinds = generators(family)
        self.centre = getattr(family, "centre", None)
        if hasattr(family, "sigma"):
            self.sigma = family.sigma
        blocks = [(len(_channels(start, count)), _block_name(self.pieces.get(p), level))
                  for p, start, count, level in self.embeds]
        free = [(f"{len(self.free)} free", family.name)] if self.free else []
        self.continuous = any(G is not None and G.continuous for G in self.pieces.values()) or bool(
            self.free and family.continuous)
        if len({name for _, name in blocks + free}) == 1:  # "scaled_permutation on each of 3 blocks (8 + 2 × 4)"
            sizes = " + ".join([_runs([k for k, _ in blocks])] + [k for k, _ in free])
            k = len(blocks + free)
            self.label = f"{(blocks + free)[0][1]} on each of {k} block{'s' if k > 1 else ''} ({sizes})"
        else:
            self.label = f"block-diagonal over {len(blocks + free)} blocks: " + " ⊕ ".join(
                f"{n}({k})" for k, n in blocks + free)
        if any(not isinstance(start, int) for _, start, *_ in self.embeds):
            self.label += ", channels interleaved"
        if len(self.pieces) < sum(p is not None for p, *_ in self.embeds):
            self.label += "; a site carried twice takes one element on its blocks"

    def _negates(self) -> bool:
        """Whether some block can negate a unit: a carried site's group as the host reads it (φ of it where read after
        its activation), or the host's family on the free channels."""
        return (any(G is not None and G.flips_signs("post" if level == "post" else "pre")
                    for p, _, _, level in self.embeds for G in [self.pieces.get(p)])
                or bool(self.free and self.family._negates()))

    def carrier(self):
        """The host as ``implied_host`` reads a site: its name, width, embeds and this group."""
        return SimpleNamespace(name=self.host, n=self.n, embeds=self.embeds, group=self)

    def free_family(self) -> Group:
        """The host's own family on the channels nothing carries, with this group's σ."""
        family = copy.copy(self.family)
        if hasattr(self, "sigma"):
            family.sigma = self.sigma
        return family.with_n(len(self.free))

    def sample(self, generator=None, *, seed=None) -> GroupElement:
        """Each carried site's element drawn from its group (in the order the host carries them), placed as
        ``random_intertwiner`` places it (:func:`host_element`), then the free channels' element."""
        g = generator if generator is not None else torch.Generator().manual_seed(0 if seed is None else int(seed))
        drawn = {}
        for p, G in self.pieces.items():
            if G is not None and p not in drawn:
                if hasattr(self, "sigma") and hasattr(G, "sigma") and G.sigma != self.sigma:
                    G = copy.copy(G)
                    G.sigma = self.sigma
                drawn[p] = G.sample(g)
        return host_element(self, self.carrier(), drawn, g)

    def contains(self, element: GroupElement, atol: float = 1e-9) -> bool:
        """Whether ``element`` is block-diagonal over what the host carries, each carried site's block in its group
        (in φ of it where read after the activation; one element where a site is carried twice), the identity on a
        space that does not move, and the free channels' block in the host's own family."""
        if element.n != self.n:
            return False
        parts = {}
        for p, start, count, level in self.embeds:
            G = self.pieces.get(p)
            if G is None or p in parts:
                continue
            part = on_channels(element, _channels(start, count))
            if part is None:
                return False
            part = _widened(part, _piece_channels(start, count), G.n)
            if not _in_phi_image(G, part, level, atol):
                return False
            parts[p] = part
        flat = self.carrier()
        flat.embeds = tuple((p, start, count, "pre") for p, start, count, _ in self.embeds)  # parts are φ(M) already
        if not carries(flat, element, implied_host(flat, parts)):
            return False
        if not self.free:
            return True
        part = on_channels(element, self.free)
        return part is not None and self.free_family().contains(part, atol)


def _channels(start, count) -> tuple:
    """The host channels an embed covers: a range (a concatenation, a zero-padding shortcut) or a list (§8)."""
    return tuple(range(start, start + count)) if isinstance(start, int) else tuple(start)


def _piece_channels(start, count) -> tuple:
    """The carried site's channels an embed holds, in the order of its host channels."""
    return tuple(range(count)) if isinstance(start, int) else tuple(count)


def _runs(sizes: list) -> str:
    """``8 + 4 + 4 + 4`` as ``8 + 3 × 4``."""
    out = []
    for k in sizes:
        if out and out[-1][0] == k:
            out[-1][1] += 1
        else:
            out.append([k, 1])
    return " + ".join(f"{r} × {k}" if r > 2 else " + ".join([str(k)] * r) for k, r in out)


def _block_name(G: Optional[Group], level: str) -> str:
    if G is None:
        return "trivial"
    return G.name if level != "post" or G.phi == "identity" else f"φ({G.name})"


def on_channels(element: GroupElement, idx) -> Optional[GroupElement]:
    """``element`` on the channels ``idx`` (in that order), or None where it maps one of them outside ``idx``."""
    H = torch.tensor(idx, dtype=torch.long)
    if isinstance(element, ScaledPermutation):
        where = torch.full((element.n,), -1, dtype=torch.long)
        where[H] = torch.arange(len(H))
        pos = where[element.perm[H]]
        if bool((pos < 0).any()):
            return None
        scale = element.scale[H].double() if element.scale is not None else None
        return ScaledPermutation(pos, scale)
    M = element.matrix().to(torch.float64)
    return Dense(M[H.unsqueeze(1), H.unsqueeze(0)].clone())


def _widened(part: GroupElement, chans, n: int) -> GroupElement:
    """``part`` (on ``chans`` of an n-channel site, in that order) as an element of the site, the identity elsewhere."""
    C = torch.tensor(chans, dtype=torch.long)
    if isinstance(part, ScaledPermutation):
        perm, scale = torch.arange(n), torch.ones(n, dtype=torch.float64)
        perm[C] = C[part.perm]
        if part.scale is not None:
            scale[C] = part.scale
        return ScaledPermutation(perm, scale)
    M = torch.eye(n, dtype=torch.float64)
    M[C.unsqueeze(1), C.unsqueeze(0)] = part.matrix()
    return Dense(M)


def _in_phi_image(G: Group, part: GroupElement, level: str, atol: float) -> bool:
    """Whether ``part`` is in G, or in φ(G) where the host reads the site after its activation. φ ≠ identity only for
    scaled permutations: φ(D·P) = φ(D)·P, so D is found from ``part``'s scalings (abs: positive; an even power: a
    positive root; an odd power: the real root) and G asked about D·P."""
    phi = G.phi
    if level != "post" or phi == "identity":
        return G.contains(part, atol)
    if not isinstance(part, ScaledPermutation):  # φ(G) holds scaled permutations alone: a dense part must be one
        M = part.matrix()
        nz = M.abs() > atol
        if not (bool((nz.sum(0) == 1).all()) and bool((nz.sum(1) == 1).all())):
            return False
        perm = nz.double().argmax(dim=1)
        part = ScaledPermutation(perm, M[torch.arange(part.n), perm])
    s = part.scale if part.scale is not None else torch.ones(part.n, dtype=torch.float64)
    if phi_positive(phi) and not bool((s > 0).all()):
        return False
    root = s if phi == "abs" else s.sign() * s.abs() ** (1.0 / float(phi[1]))
    return G.contains(ScaledPermutation(part.perm, root), atol)
