"""Medians with bootstrap 95% intervals over pairs or seeds, and paired differences.

``scipy.stats.bootstrap`` (percentile method, 9,999 resamples, a fixed seed) on the median. The
percentile method rather than BCa: with 3–8 values BCa's acceleration estimate is unstable and it
fails on ties, which rounded accuracies produce. With n values the interval of a median can only
take values of the data, so it is coarse for small n — it is still the honest statement of what n
pairs show. One value has no interval (reported as such, never as a zero-width one).

A verdict (``excludes_zero``) needs more than that interval: for n ≤ 5 the percentile interval of a median
is [min, max], which covers the true median only 1 − 2·2⁻ⁿ of the time (75% at n = 3, 87.5% at n = 4), so
"the 95% interval excludes 0" came out for a quarter of null effects at n = 3. A verdict also needs a
one-sample t-test of the values against 0 (``scipy.stats.ttest_1samp``, two-sided) at p < 0.05: together
they say "differs" for about 5% of null effects at n = 3–6 (normal, heavy-tailed and skewed nulls).
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
    if np.all(v == v[0]):  # no spread: a t-test has nothing to weigh the median against (no verdict)
        return {"n": len(v), "median": med, "lo": med, "hi": med, "p": None}
    from scipy.stats import bootstrap, ttest_1samp

    p = float(ttest_1samp(v, 0.0).pvalue)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = bootstrap((v,), np.median, confidence_level=CONFIDENCE, n_resamples=N_RESAMPLES, method="percentile",
                        random_state=np.random.default_rng(SEED), vectorized=True, axis=-1)
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return {"n": len(v), "median": med, "lo": lo, "hi": hi, "p": p}


def paired(a: dict, b: dict) -> list[float]:
    """``a[k] − b[k]`` for the keys (pairs, seeds) both have, in sorted key order."""
    return [a[k] - b[k] for k in sorted(set(a) & set(b))]


MIN_N = 3  # fewer values than this: no verdict (a bootstrap over two values is just their range)
ALPHA = 0.05


def excludes_zero(s: dict) -> Optional[int]:
    """+1 if the interval lies above 0 and the t-test agrees (p < 0.05), −1 if below, 0 otherwise; None with
    fewer than 3 values or a summary without a t-test (see the module docstring)."""
    if s["lo"] is None or s["hi"] is None or s["n"] < MIN_N or "p" not in s:
        return None
    side = 1 if s["lo"] > 0 else -1 if s["hi"] < 0 else 0
    return side if side and s["p"] is not None and s["p"] < ALPHA else 0


def shown(s: dict) -> str:
    """Why a verdict was given: what the numbers carried."""
    return f"the interval excludes 0 and a t-test over the {s['n']} values gives p = {s['p']:.2g}"


def not_shown(s: dict) -> str:
    """Why no difference was shown: the interval, or the t-test that a verdict also needs."""
    if s["lo"] is not None and s["lo"] <= 0 <= s["hi"]:
        return "the interval contains 0"
    p = "no spread to test" if s.get("p") is None else f"p = {s['p']:.2g}"
    return f"the interval excludes 0, but a t-test over the {s['n']} values does not reach p < {ALPHA:g}: {p}"


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
