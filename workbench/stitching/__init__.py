"""Group-constrained stitching between two models, and the paper's insertion ("sanity") test (§3.3–4).

``stitch(model_a, model_b, site, group, data)`` trains a map from A's activation at a site into B
(both frozen) and reports the stitching penalty; ``insertion_test(model, site, group, data)``
inserts a fixed random group element on a site's pre-activation, retrains what follows and reports
the accuracy it costs. ``workbench reproduce stitching`` / ``insertion`` (``workbench.experiments``)
reproduce the paper's tables on the zoo.
"""
from ._cut import Crossing, Cut
from ._insertion import InsertionResult, insertion_test
from ._layers import STITCH_ALIASES, STITCH_NAMES, Family, StitchSpec, parse_family, parse_stitch_group, sinkhorn
from ._stitch import BN_MODES, StitchResult, stitch

# Family and parse_family: old spellings of StitchSpec and parse_stitch_group, kept (public before).
__all__ = ["BN_MODES", "Crossing", "Cut", "Family", "InsertionResult", "STITCH_ALIASES", "STITCH_NAMES", "StitchResult",
           "StitchSpec", "insertion_test", "parse_family", "parse_stitch_group", "sinkhorn", "stitch"]
