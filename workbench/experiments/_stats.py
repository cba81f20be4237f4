"""Medians with bootstrap 95% intervals over pairs or seeds, and paired differences.

``scipy.stats.bootstrap`` (percentile method, 9,999 resamples, a fixed seed) on the median. The
percentile method rather than BCa: with 3–8 values BCa's acceleration estimate is unstable and it
fails on ties, which rounded accuracies produce. With n values the interval of a median can only
take values of the data, so it is coarse for small n — it is still the honest statement of what n
pairs show. One value has no interval (reported as such, never as a zero-width one).
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import numpy as np

N_RESAMPLES = 9999
CONFIDENCE = 0.95
SEED = 0


def median_ci(values: Sequence[float]) -> dict:
    """``{"n", "median", "lo", "hi"}``: the median and its bootstrap 95% interval (None for n < 2)."""
    v = np.asarray([float(x) for x in values], dtype=float)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return {"n": 0, "median": None, "lo": None, "hi": None}
    med = float(np.median(v))
    if len(v) < 2:
        return {"n": 1, "median": med, "lo": None, "hi": None}
    if np.all(v == v[0]):
        return {"n": len(v), "median": med, "lo": med, "hi": med}
    from scipy.stats import bootstrap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = bootstrap((v,), np.median, confidence_level=CONFIDENCE, n_resamples=N_RESAMPLES, method="percentile",
                        random_state=np.random.default_rng(SEED), vectorized=True, axis=-1)
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return {"n": len(v), "median": med, "lo": lo, "hi": hi}


def paired(a: dict, b: dict) -> list[float]:
    """``a[k] − b[k]`` for the keys (pairs, seeds) both have, in sorted key order."""
    return [a[k] - b[k] for k in sorted(set(a) & set(b))]


MIN_N = 3  # fewer values than this: no verdict (a bootstrap over two values is just their range)


def excludes_zero(s: dict) -> Optional[int]:
    """+1 if the interval lies above 0, −1 if below, 0 if it contains 0; None with fewer than 3 values."""
    if s["lo"] is None or s["hi"] is None or s["n"] < MIN_N:
        return None
    if s["lo"] > 0:
        return 1
    if s["hi"] < 0:
        return -1
    return 0


def fmt(s: dict, digits: int = 1) -> str:
    """``"12.3 [10.1, 14.0]"``; ``"12.3 (n = 1)"`` without an interval; ``"—"`` without data."""
    if s["median"] is None:
        return "—"
    f = f"{{:.{digits}f}}"
    if s["lo"] is None:
        return f.format(s["median"]) + " (n = 1)"
    return f"{f.format(s['median'])} [{f.format(s['lo'])}, {f.format(s['hi'])}]"


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x))
