"""Concept probing: is a layer's activation basis privileged?

Per-unit concept scores (rank AUROC, mean difference, F statistic), k-sparse and dense probes, the
privileged-basis test against random bases drawn from the ``workbench.groups`` registry, basis
alignment statistics, and Network-Dissection IoU with its rotation sweep. Every result is a report
object (``to_frame()``, ``plot()``, notebook HTML).
"""
from ._inputs import concept_matrix, resolve_group
from ._alignment import STAT_NAMES, BasisAlignment, basis_alignment
from ._dissect import Dissection, DissectionSweep, dissect, dissection_sweep, unit_thresholds
from ._privileged import STATISTICS, PrivilegedBasisTest, bh_qvalues, privileged_basis_test
from ._probes import SELECTIONS, DenseProbe, ProbeCurve, SparseProbe, probe_curve
from ._scores import UnitScores, auroc, average_ranks, concept_scores

__all__ = ["BasisAlignment", "DenseProbe", "Dissection", "DissectionSweep", "PrivilegedBasisTest", "ProbeCurve",
           "SELECTIONS", "STATISTICS", "STAT_NAMES", "SparseProbe", "UnitScores", "auroc", "average_ranks",
           "basis_alignment", "bh_qvalues", "concept_matrix", "concept_scores", "dissect", "dissection_sweep", "privileged_basis_test",
           "probe_curve", "resolve_group", "unit_thresholds"]
