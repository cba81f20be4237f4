"""Intersecting groups by the generators they contain (the families form a small lattice)."""
from __future__ import annotations

from ..groups import Group, get_group

# Which kinds of generator each family contains.
_GENERATORS = {
    "gl": {"perm", "pos_scale", "neg", "rotation", "rotation_ones", "rotary", "rotary_orthogonal", "general"},
    "orthogonal": {"perm", "neg", "rotation", "rotation_ones"},
    "special_orthogonal": {"perm", "neg", "rotation", "rotation_ones"},
    "orthogonal_ones": {"perm", "rotation_ones"},
    "rotary": {"rotary", "rotary_orthogonal"},
    "rotary_orthogonal": {"rotary_orthogonal"},  # its pairs and rigid pairs are compared too (_transform._is_subgroup)
    "diagonal_permutation": {"perm", "pos_scale", "neg"},
    "scaled_permutation": {"perm", "pos_scale"},
    "signed_permutation": {"perm", "neg"},
    "permutation": {"perm"},
    "positive_diagonal": {"pos_scale"},
    "trivial": set(),
}
# Largest family with exactly a given generator set (order matters: first match wins).
_BY_GENERATORS = [
    ({"perm", "pos_scale", "neg", "rotation", "rotation_ones", "rotary", "rotary_orthogonal", "general"}, "gl"),
    ({"perm", "neg", "rotation", "rotation_ones"}, "orthogonal"),
    ({"perm", "rotation_ones"}, "orthogonal_ones"),
    ({"perm", "pos_scale", "neg"}, "diagonal_permutation"),
    ({"perm", "pos_scale"}, "scaled_permutation"),
    ({"perm", "neg"}, "signed_permutation"),
    ({"perm"}, "permutation"),
    ({"pos_scale"}, "positive_diagonal"),
]

# What each structural constraint of a space allows, and why (each reason is a statement about the
# model that the tests check). A BatchNorm right after its writer is no constraint: scalings go on
# its γ and β, any other map folds it into the writer (exact in eval mode, see _transform).
CONSTRAINTS = {
    "max_pool": ({"perm", "pos_scale"}, "max pooling commutes only with permutations and positive scalings"),
    "batchnorm_input": ({"perm", "pos_scale", "neg"},
                        "a BatchNorm reads this space: it acts per channel, so only permutations and diagonal "
                        "scalings pass it (μ and β take the scaling; exact in eval mode)"),
    "constant_add": ({"perm", "rotation_ones"},
                     "a constant c is added to every unit: only maps with M·1 = 1 keep c·1 in place (the rules "
                     "grant permutations, and rotations fixing 1 where the site is linear)"),
    "mixed_levels": ({"perm", "pos_scale", "neg", "rotation", "rotation_ones", "rotary", "rotary_orthogonal", "general"}, "pre- and post-activation values are added"),
}


def generators(group: Group) -> set[str]:
    # An affine extension ("affine_signed_permutation") has the generators of its linear family; a family
    # defined elsewhere may name its own (symmetry/_channel_families.GroupedPermutations: "perm_groups", not "perm").
    if getattr(group, "generator_kinds", None) is not None:
        return set(group.generator_kinds)
    return set(_GENERATORS.get(group.name.removeprefix("affine_"), {"perm"}))


def restrict(group: Group, allowed: set[str]) -> Group:
    """The largest family inside ``group`` whose generators are all in ``allowed``."""
    have = generators(group) & allowed
    if have == generators(group):
        return group
    for gens, name in _BY_GENERATORS:
        if gens <= have:
            try:
                new = get_group(name, group.n)
            except Exception:  # a family the registry does not have yet
                continue
            new.phi = group.phi if name != "gl" else "identity"
            new.source = getattr(group, "source", "family")
            return new
    return get_group("trivial", group.n)  # nothing is left (a family without permutations meets one that needs them)
