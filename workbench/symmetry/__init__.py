"""Symmetry maps of models (sites), function-preserving transforms, verification, neuron matching."""
from ._fold import fold_layernorm, untie_embeddings
from ._map import symmetry_map
from ._sites import Observation, Port, Site, SymmetryMap
from ._graph_sites import is_activation
from ._match import (InterpretationShift, NeuronMatching, interpretation_shift, match_neurons, match_site_units,
                     may_flip, site_observation, site_units, unit_activations, unit_extremes)
from ._transform import Transform, apply_transform, random_intertwiner
from ._verify import InvarianceReport, SiteCheck, verify


def space_graph(model, example):
    """The traced ``model`` with the space and level of every tensor (what sites are made of): stitching
    cuts a forward pass through it. ``example``: one input batch."""
    from ._graph import Graph

    return Graph(model, example, is_activation)


__all__ = ["InterpretationShift", "InvarianceReport", "NeuronMatching", "Observation", "Port", "Site", "SiteCheck",
           "SymmetryMap", "Transform", "apply_transform", "fold_layernorm", "interpretation_shift", "match_neurons",
           "is_activation", "random_intertwiner", "match_site_units", "may_flip", "site_observation", "site_units", "space_graph", "symmetry_map", "unit_activations", "unit_extremes",
           "untie_embeddings", "verify"]
