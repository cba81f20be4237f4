"""GELU is only approximately scale-equivariant (paper appendix): ξ(λ) = RMS_{x~N(0,1)}[GELU(λx) − λ·GELU(x)].

ξ is 0 at λ = 0 and λ = 1 and nowhere else; that is why a positive scaling is not in GELU's
intertwiner group (only permutations are). Each run is one λ, computed by adaptive quadrature of
the Gaussian expectation (``scipy.integrate.quad``, exact GELU with the error function), not by
sampling, so there is no sampling noise to put an interval on.
"""
from __future__ import annotations

import math

import numpy as np

NAME = "gelu"
TITLE = "GELU's scale (non-)equivariance ξ(λ) (paper appendix)"
PAPER = {"local_max": (0.39, 0.072), "slope": 0.127}


def protocol(budget: str) -> dict:
    n = {"paper": 201, "quick": 41, "smoke": 9}[budget] if budget in ("paper", "quick", "smoke") else None
    if n is None:
        from .._errors import InvalidOptionError
        from . import BUDGETS
        raise InvalidOptionError(f"budget={budget!r} is not a valid option; expected one of {BUDGETS!r}.")
    return {"lambdas": [round(float(v), 4) for v in np.linspace(0.0, 4.0, n)], "tail": [8.0, 12.0, 16.0],
            "method": "scipy.integrate.quad over the standard normal density, GELU(x) = x·Φ(x) (erf form)"}


def jobs(p: dict) -> list[dict]:
    return [{"lambda": lam} for lam in p["lambdas"] + p["tail"]]


def xi(lam: float) -> float:
    from scipy.integrate import quad

    gelu = lambda x: x * 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))  # noqa: E731
    f = lambda x: (gelu(lam * x) - lam * gelu(x)) ** 2 * math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    val = sum(quad(f, a, b, limit=200, epsabs=1e-14, epsrel=1e-12)[0] for a, b in ((-np.inf, 0.0), (0.0, np.inf)))
    return math.sqrt(max(val, 0.0))


def run(job: dict, p: dict, ctx: dict) -> list[dict]:
    return [{"lambda": job["lambda"], "metric": "xi", "value": xi(job["lambda"])}]


def summary(doc) -> dict:
    pts = sorted((r["lambda"], r["value"]) for r in doc["runs"] if r["metric"] == "xi")
    grid = [(lam, v) for lam, v in pts if lam <= max(doc["protocol"]["lambdas"])]
    inner = [(lam, v) for lam, v in grid if lam < 1.0]
    lm = max(inner, key=lambda t: t[1]) if inner else (None, None)
    tail = [(lam, v) for lam, v in pts if lam in doc["protocol"]["tail"]]
    slope = (tail[-1][1] - tail[0][1]) / (tail[-1][0] - tail[0][0]) if len(tail) > 1 else None
    at1 = dict(pts).get(1.0)
    return {"local_max_lambda": lm[0], "local_max_xi": lm[1], "tail_slope": slope, "xi_at_1": at1}


def headlines(doc) -> list[dict]:
    s = summary(doc)
    return [{"experiment": NAME, "what": "GELU ξ(λ): local maximum on (0, 1)",
             "ours": f"{s['local_max_xi']:.3f} at λ = {s['local_max_lambda']:.2f}", "paper": "0.072 at λ ≈ 0.39"},
            {"experiment": NAME, "what": "GELU ξ(λ): slope for large λ",
             "ours": f"{s['tail_slope']:.3f}", "paper": "≈ 0.127"}]


def page(doc) -> str:
    from ._page import header, table

    s = summary(doc)
    pts = sorted((r["lambda"], r["value"]) for r in doc["runs"] if r["metric"] == "xi")
    show = [(lam, v) for lam, v in pts if round(lam * 20) == lam * 20 and lam <= 4 or lam in doc["protocol"]["tail"]]
    lines = header(doc, TITLE)
    lines += [f"Method: {doc['protocol']['method']}; λ on a grid of {len(doc['protocol']['lambdas'])} points in [0, 4] "
              f"and at {doc['protocol']['tail']}.", "",
              f"- ξ(1) = {s['xi_at_1']:.1e} (a scaling by 1 is the identity).",
              f"- On (0, 1), ξ peaks at λ = {s['local_max_lambda']:.2f} (on the grid, step "
              f"{doc['protocol']['lambdas'][1] - doc['protocol']['lambdas'][0]:g}) with ξ = {s['local_max_xi']:.4f} "
              f"(paper: about {PAPER['local_max'][1]} at λ ≈ {PAPER['local_max'][0]}).",
              f"- For large λ, ξ grows linearly with slope {s['tail_slope']:.4f} (between λ = {doc['protocol']['tail'][0]:g} "
              f"and {doc['protocol']['tail'][-1]:g}; paper ≈ {PAPER['slope']}). (GELU(λx) → λ·ReLU(x), so the slope is "
              "RMS[ReLU(x) − GELU(x)].)", "",
              table(["λ", "ξ(λ)"], [[f"{lam:g}", f"{v:.5f}"] for lam, v in show]), ""]
    return "\n".join(lines)
