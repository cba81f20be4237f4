"""Whether a transform can flip a unit's sign (``Group.flips_signs``, ``workbench.symmetry.may_flip``): what matching
units after a transform must allow. Every answer is held against the elements themselves: many draws of the group, read
at the level the space is observed (M, M⁻ᵀ, φ(M), the permutation part), and a negative entry looked for directly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import workbench as wb
from test_host_groups import Shapes
from test_vision_constructs import weights
from workbench.groups import CATALOGUE, FAMILIES, Group, ScaledPermutation, get_group, intertwiner_group
from workbench.symmetry import match_site_units, may_flip

F64 = torch.float64
DRAWS = 300


def moved(element, level: str) -> torch.Tensor:
    """The matrix that moves a space read at ``level`` (``Observation.level``) under ``element``."""
    if level in ("perm", "prebn"):
        return element.perm_part().matrix().double()
    if level == "pregn":  # S·P: a GroupNorm's input signs where drawn (workbench.symmetry._graph_groupnorm.before_norm)
        signs = getattr(element, "signs", None)
        return ScaledPermutation(element.perm, signs).matrix().double()
    if level == "post":
        return element.phi().matrix().double()
    M = element.matrix().double()
    return torch.linalg.inv(M).T if level == "dual" else M


def negative_somewhere(G: Group, level: str) -> bool:
    """Whether one of ``DRAWS`` elements of G, at ``level``, has a negative entry (beyond rounding)."""
    return any(bool((moved(e, level) < -1e-12).any()) for e in G.sample_many(DRAWS, seed=7))


def _registered() -> list:
    groups = []
    for name in FAMILIES:
        for n in (1, 2, 3, 4):
            kw = {}
            if name in ("rotary", "rotary_orthogonal"):
                if n == 1:
                    continue
                kw = {"pairs": [(0, 1)]} if name == "rotary" else {"pairs": [(0, 1)], "rigid": [(0, 1)] if n == 2 else []}
            groups.append(get_group(name, n, **kw))
    for row in CATALOGUE:
        for affine in (False, True):
            groups.append(intertwiner_group(row["activation"], 3, affine=affine))
    return groups


@pytest.mark.parametrize("G", _registered(), ids=repr)
def test_every_registered_group_says_what_its_elements_do(G):
    levels = ("pre", "dual", "post", "heads") + (("perm", "prebn") if isinstance(G.sample(seed=0), ScaledPermutation) else ())
    for level in levels:
        assert G.flips_signs(level) == negative_somewhere(G, level), (G, level)


def test_the_groups_the_old_name_prefix_misjudged():
    """The prefix test (not name.startswith("scaled")) said True for each of these: no element flips a sign."""
    for name in ("permutation", "positive_diagonal", "trivial"):
        assert not get_group(name, 4).flips_signs()
    assert not get_group("special_orthogonal", 1).flips_signs() and not get_group("orthogonal_ones", 2).flips_signs()
    abs_group = intertwiner_group("abs", 4)  # P·D: the pre-activation flips, |·| after it does not
    assert abs_group.flips_signs("pre") and not abs_group.flips_signs("post")


class Normed(nn.Module):
    """conv → F.group_norm with a gain (one channel per group) → ReLU → conv: the conv's output is the site's only
    observation, and it moves by S·P (the gain takes the signs S, docs/DERIVATIONS.md §9)."""

    def __init__(self, c=8):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, c, 1), nn.Conv2d(c, 2, 1)
        self.w, self.b, self.groups = nn.Parameter(torch.randn(c)), nn.Parameter(torch.randn(c)), c

    def forward(self, x):
        return self.c2(F.relu(F.group_norm(self.c1(x), self.groups, self.w, self.b)))


def test_a_groupnorm_s_input_signs_are_flips_and_matching_recovers_them():
    """The old answer was False here (the group is named scaled_permutation_with_group_signs), so a unit the
    transform negated was matched on its cosine and scored as unrelated."""
    torch.manual_seed(0)
    model = Normed().double().eval()
    x = torch.randn(64, 3, 5, 5, dtype=F64)
    site = wb.symmetry_map(model, x)["c1"]
    assert site.group.name == "scaled_permutation_with_group_signs"
    assert [(o.name, o.level) for o in site.observed] == [("c1", "pregn")]
    assert may_flip(site) and negative_somewhere(site.group, "pregn")
    new, t = wb.random_intertwiner(model, 5, example=x)
    e = t.elements["c1"]
    assert bool((e.signs < 0).any())  # some unit really is negated
    with torch.no_grad():
        (a, a_low), (b, b_low) = ((m.c1(x).amax(dim=(2, 3)), m.c1(x).amin(dim=(2, 3))) for m in (model, new))
        assert torch.allclose(new.c1(x), e.signs.view(1, -1, 1, 1) * model.c1(x)[:, e.perm], rtol=1e-10, atol=1e-12)
    matching = match_site_units(a, b, site, before_min=a_low, after_min=b_low)
    assert torch.equal(matching.perm, e.perm)
    assert torch.allclose(matching.quality, torch.ones(8, dtype=F64), atol=1e-9)
    assert torch.equal(matching.scale, e.signs)


class Mixed(nn.Module):
    """cat(tanh(a(x)), relu(b(x))) read by a conv: a host mixing a sign-flipping block and a positive one."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 5, 1), nn.Conv2d(9, 2, 1)

    def forward(self, x):
        return self.c(torch.cat([torch.tanh(self.a(x)), torch.relu(self.b(x))], 1)).mean((2, 3))


@pytest.mark.parametrize("model", [Mixed(), Shapes("abs"), Shapes("nested"), Normed(4)], ids=lambda m: getattr(m, "kind", type(m).__name__))
def test_every_site_of_models_with_hosts_says_what_its_elements_do(model):
    """Hosts mixing blocks (a tanh block flips, a ReLU block does not; |·| blocks read after the activation never do),
    nested hosts and a GroupNorm's signs: each site's answer at its hook against its group's own draws."""
    model = weights(model).double().eval()
    x = torch.randn(3, 3, 4, 4, dtype=F64)
    smap = wb.symmetry_map(model, x)
    hosts = [s for s in smap if s.embeds]
    for site in smap:
        level = next((o.level for o in site.observed if o.name == site.hook_name), "pre")  # none: read as M
        assert may_flip(site) == negative_somewhere(site.group, level), (site, level)
    if isinstance(model, Mixed):
        assert [h.group.name for h in hosts] == ["diagonal_permutation_per_block"] and may_flip(hosts[0])
    if getattr(model, "kind", None) == "abs":  # φ(P·D) = P·|D| on both blocks: the old prefix test said True
        assert not may_flip(hosts[0]) and not hosts[0].group.name.startswith("scaled")


def test_a_transform_s_own_group_decides_where_it_is_not_the_site_s():
    """The explorer's negative controls draw from another group than the site's, and a transform may use the
    affine extension (a sigmoid unit's a ↦ 1 − a; interpretation_shift asks the extended map: see
    test_groups_adversary's flipped conv units): may_flip answers for the group drawn from."""
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.Sigmoid(), nn.Linear(2, 3)).double()
    smap, extended = wb.symmetry_map(mlp), wb.symmetry_map(mlp, affine=True)
    relu, sig = smap["1"], smap["3"]
    assert not may_flip(relu) and may_flip(relu, "signed_permutation") and may_flip(relu, "orthogonal")
    assert not may_flip(relu, "permutation")
    assert sig.group.name == "permutation" and not may_flip(sig)
    assert extended["3"].group.name == "affine_signed_permutation" and may_flip(sig, extended["3"].group)


def test_a_continuous_group_s_writer_before_a_batchnorm_moves_by_more_than_a_permutation():
    """conv → BatchNorm → conv with no activation: a GL site, whose BatchNorm folds into its writer, so the writer's
    output (observed at "prebn") moves by M·diag(γ/σ), not by M's permutation part: flips_signs("prebn") said False for
    every group. Here the new writer's outputs are fitted on the old ones (computed directly): a negative weight."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.Conv2d(6, 2, 1)).double().eval()
    model[1].running_mean.normal_(), model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(40, 3, 3, 3, dtype=F64)
    site = wb.symmetry_map(model, x)["1"]
    assert site.group.name == "gl" and ("0", "prebn") in [(o.name, o.level) for o in site.observed]
    new, _ = wb.random_intertwiner(model, 0, example=x)
    with torch.no_grad():
        a, b = (m[0](x).movedim(1, -1).reshape(-1, 6) for m in (model, new))
    old = torch.cat([a, torch.ones(len(a), 1, dtype=F64)], 1)
    fit = torch.linalg.lstsq(old, b).solution
    assert torch.allclose(old @ fit, b, atol=1e-10) and bool((fit[:-1] < -1e-6).any())
    assert site.group.flips_signs("prebn") and get_group("orthogonal", 6).flips_signs("prebn")
    assert not get_group("signed_permutation", 6).flips_signs("prebn")  # (the BatchNorm takes its signs)
