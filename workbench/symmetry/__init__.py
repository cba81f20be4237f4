"""Symmetry maps of models (sites), function-preserving transforms, verification, neuron matching."""
from ._fold import fold_layernorm, untie_embeddings
from ._map import Observation, Port, Site, SymmetryMap, symmetry_map
from ._match import InterpretationShift, NeuronMatching, interpretation_shift, match_neurons
from ._transform import Transform, apply_transform, random_intertwiner
from ._verify import InvarianceReport, SiteCheck, verify

__all__ = ["InterpretationShift", "InvarianceReport", "NeuronMatching", "Observation", "Port", "Site", "SiteCheck",
           "SymmetryMap", "Transform", "apply_transform", "fold_layernorm", "interpretation_shift", "match_neurons",
           "random_intertwiner", "symmetry_map", "untie_embeddings", "verify"]
