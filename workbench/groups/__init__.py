"""Pure mathematics: group families, structured elements, sampling, the activation → group catalogue
and the numerical intertwiner test (imports torch only)."""
from ._catalogue import CATALOGUE, GENERATORS, Activation, activation_call, catalogue_frame, intertwiner_group
from ._check import IntertwinerCheck, check_intertwiner
from ._discover import GroupDiscovery, discover_group
from ._elements import Dense, GroupElement, ScaledPermutation, element_from_dict, identity, phi_positive
from ._families import (GROUP_ALIASES, FAMILIES, GROUP_NAMES, GeneralLinear, Group, Orthogonal, Permutation,
                        PositiveDiagonal, ScaledPermutationGroup, Trivial, get_group, rotary_inverse)
from ._geodesic import geodesic

__all__ = ["GROUP_ALIASES", "Activation", "CATALOGUE", "Dense", "FAMILIES", "GENERATORS", "GROUP_NAMES", "GeneralLinear", "Group",
           "GroupDiscovery", "GroupElement", "IntertwinerCheck", "Orthogonal", "Permutation", "PositiveDiagonal",
           "ScaledPermutation", "ScaledPermutationGroup", "Trivial", "activation_call", "catalogue_frame", "check_intertwiner",
           "discover_group", "element_from_dict", "geodesic", "get_group", "identity", "intertwiner_group",
           "phi_positive", "rotary_inverse"]
