"""Representation similarity with declared invariances, including the paper's G_ReLU-invariant measures.

``wb.similarity.measures()`` lists every measure with the transformations of the units it is
invariant to (permutation, orthogonal, isotropic scaling, per-unit positive scaling, invertible
linear, translation) and how it reads conv maps; ``wb.similarity.compare(acts_a, acts_b)`` runs
them all on one pair and returns a report; each measure is also a function
(``wb.similarity.grelu_procrustes(acts_a, acts_b) -> float``). Activations are ``[N, C]`` or
``[N, C, *spatial]`` for the same N examples; computation is in float64.

``workbench reproduce similarity`` (``workbench.experiments``) reproduces the paper's §5 comparison on the zoo.
"""
from ._alignment import (correlation_matching, grelu_procrustes, mean_cca, orthogonal_procrustes,
                         permutation_procrustes, svcca)
from ._kernels import (DegenerateRepresentationError, cka_from_kernels, grelu_cka, grelu_kernel, hsic, linear_cka,
                       rbf_cka, standardized_cka)
from ._registry import (MEASURE_ALIASES, INVARIANCE_GROUPS, INVARIANCES, MEASURES, Measure, SimilarityReport, compare,
                        get_measure, measures, random_transform)

__all__ = ["MEASURE_ALIASES", "DegenerateRepresentationError", "INVARIANCES", "INVARIANCE_GROUPS", "MEASURES", "Measure",
           "SimilarityReport", "cka_from_kernels", "compare", "correlation_matching", "get_measure", "grelu_cka",
           "grelu_kernel", "grelu_procrustes", "hsic", "linear_cka", "mean_cca", "measures",
           "orthogonal_procrustes", "permutation_procrustes", "random_transform", "rbf_cka", "standardized_cka",
           "svcca"]
