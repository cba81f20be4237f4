"""The activation → intertwiner group catalogue (paper §3, Table 1, plus derived rows).

Each entry names the registry family of G_σ, its homomorphism φ, and which of the generators that
:func:`workbench.groups.discover_group` tests are members — so the table, the numerical check and the
empirical search can be held against each other in tests.

Affine extension (beyond the paper's linear definition, ``affine=True``): when the next layer has a
bias, σ(Mx) = φ(M)σ(x) + c(M) suffices. Setting x = 0 forces c(M) = σ(0)(1 − φ(M)·1), so the affine
intertwiners of σ are exactly the linear intertwiners of σ̃ = σ − σ(0). That matters for sigmoid and
hardsigmoid, whose σ̃ is odd: sign flips pass with c_i = (1 − s_i)/2.
"""
from __future__ import annotations

import copy
import functools
import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import InvalidOptionError, nearest
from .._offload import served
from ._elements import Phi
from ._families import FAMILIES, Group

#: the generators :func:`discover_group` tests; every catalogue row says which are members.
GENERATORS = ("permutation", "positive_scaling", "nonzero_scaling", "negation", "even_sign_flip",
              "affine_negation", "rotation", "gl")
_P = ("permutation",)
_ODD = ("permutation", "negation", "affine_negation")
_HOMOG = ("permutation", "positive_scaling")
_SCALED = ("scaled_permutation", "signed_permutation", "diagonal_permutation", "positive_diagonal")


@dataclass(frozen=True)
class _Entry:
    key: str
    family: str  # a registry name in FAMILIES
    fn: Callable[[torch.Tensor], torch.Tensor]
    members: tuple  # which GENERATORS hold
    phi: Phi = "identity"
    affine_family: Optional[str] = None  # the group of σ − σ(0), where it is larger


def _entries() -> list[_Entry]:
    E = _Entry
    return [
        E("identity", "gl", lambda x: x, tuple(g for g in GENERATORS if g != "even_sign_flip")),
        E("relu", "scaled_permutation", torch.relu, _HOMOG),
        E("leaky_relu", "scaled_permutation", F.leaky_relu, _HOMOG),
        E("squared_relu", "scaled_permutation", lambda x: torch.relu(x) ** 2, _HOMOG, ("power", 2)),
        E("abs", "diagonal_permutation", torch.abs, (*_HOMOG, "even_sign_flip"), "abs"),
        *(E(k, "permutation", f, _P) for k, f in [
            ("gelu", F.gelu), ("silu", F.silu), ("mish", F.mish), ("softplus", F.softplus), ("elu", F.elu),
            ("selu", F.selu), ("celu", F.celu), ("relu6", F.relu6), ("hardswish", F.hardswish),
            ("logsigmoid", F.logsigmoid), ("quick_gelu", lambda x: x * torch.sigmoid(1.702 * x))]),
        *(E(k, "permutation", f, ("permutation", "affine_negation"), affine_family="signed_permutation")
          for k, f in [("sigmoid", torch.sigmoid), ("hardsigmoid", F.hardsigmoid)]),
        *(E(k, "signed_permutation", f, _ODD) for k, f in [
            ("tanh", torch.tanh), ("softsign", F.softsign), ("hardtanh", F.hardtanh), ("tanhshrink", F.tanhshrink),
            ("softshrink", F.softshrink), ("hardshrink", F.hardshrink), ("sin", torch.sin), ("erf", torch.erf)]),
        *(E(k, "signed_permutation", f, ("permutation", "even_sign_flip"), "abs")
          for k, f in [("gaussian", lambda x: torch.exp(-x * x)), ("cos", torch.cos)]),
    ]


_ENTRIES = {e.key: e for e in _entries()}
_ALIASES = {
    "linear": "identity", "none": "identity", "id": "identity", "leakyrelu": "leaky_relu", "lrelu": "leaky_relu",
    "relu2": "squared_relu", "relu_squared": "squared_relu", "relu^2": "squared_relu", "swish": "silu",
    "gelu_new": "gelu", "gelu_fast": "gelu", "gelu_tanh": "gelu", "gelu_pytorch_tanh": "gelu",
    "logistic": "sigmoid", "expit": "sigmoid", "hard_sigmoid": "hardsigmoid", "hard_swish": "hardswish",
    "hard_tanh": "hardtanh", "exp(-x^2)": "gaussian", "exp(-x**2)": "gaussian", "rbf": "gaussian",
    "gauss": "gaussian", "square": "power:2", "cube": "power:3",
}
_POWER = re.compile(r"(?:power:?|pow:?|x\^|x\*\*)([+-]?[0-9.]+)")
_HINT = "for an activation not in the catalogue use wb.discover_group(fn)"


def _power_entry(text: str, d_text: str) -> _Entry:
    d = float(d_text)
    if d != int(d) or d < 1:
        raise InvalidOptionError(f"activation {text!r}: x^d is catalogued for an integer d ≥ 1 only (x^{d_text} is "
                                 f"not a symmetric elementwise map of every real x); {_HINT}.")
    d = int(d)
    if d == 1:
        return _ENTRIES["identity"]
    parity = ("negation", "affine_negation") if d % 2 else ("even_sign_flip",)
    return _Entry(f"power:{d}", "diagonal_permutation", lambda x: x ** d,
                  (*_HOMOG, "nonzero_scaling", *parity), ("power", d))


def _edits(a: str, b: str) -> int:
    """Levenshtein distance."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def _from_string(text: str) -> _Entry:
    s = text.strip().lower().replace(" ", "")
    for cand in (s, s.replace("-", "_")):
        cand = _ALIASES.get(cand, cand)
        if cand in _ENTRIES:
            return _ENTRIES[cand]
        m = _POWER.fullmatch(cand)
        if m:
            return _power_entry(text, m.group(1))
    # fewest edits first, then the same length: 'relu7' suggests 'relu6' before 'relu'
    close = sorted(nearest(s, [*_ENTRIES, *_ALIASES], n=5),
                   key=lambda c: (_edits(s, c), not c.startswith(s), abs(len(c) - len(s))))[:3]
    also = f" (or {', '.join(map(repr, close[1:]))})" if len(close) > 1 else ""
    tip = f" did you mean {close[0]!r}{also}?" if close else ""
    raise InvalidOptionError(f"unknown activation {text!r};{tip} known: {[*_ENTRIES, 'power:<d>']}; {_HINT}.")


def _slope(a: float) -> _Entry:
    # LeakyReLU(1) is the identity and LeakyReLU(−1) is abs: both have larger groups than P·D₊.
    return _ENTRIES[{0.0: "relu", 1.0: "identity", -1.0: "abs"}.get(float(a), "leaky_relu")]


def _permutation_only(key: str) -> _Entry:
    return _Entry(key, "permutation", None, _P)


def _clamp(lo: Optional[float], hi: Optional[float]) -> _Entry:
    """clamp(x, lo, hi) (hardtanh): which bounds make it linear, homogeneous or odd."""
    lo = -math.inf if lo is None else float(lo)
    hi = math.inf if hi is None else float(hi)
    if (lo, hi) == (-math.inf, math.inf) or lo == hi == 0.0:  # the identity; the zero map (every A: 0 = A·0)
        return _ENTRIES["identity"]
    if (lo, hi) in ((0.0, math.inf), (-math.inf, 0.0)):  # max(x, 0) and min(x, 0): positively homogeneous
        return _ENTRIES["relu"] if lo == 0.0 else _Entry("clamp_max_0", "scaled_permutation", None, _HOMOG)
    if lo == -hi and 0.0 < hi < math.inf:  # odd
        return _ENTRIES["hardtanh"]
    return _ENTRIES["relu6"] if (lo, hi) == (0.0, 6.0) else _permutation_only(f"clamp({lo:g}, {hi:g})")


# The arguments of a parameterised activation, in call order after the input, with their defaults
# (the names of torch.nn.functional's parameters, which the modules' attributes share), and the rule
# that picks the catalogue entry from their values: a value can enlarge the group (ELU with α = 0 is
# ReLU; LeakyReLU with slope 1 is the identity; a shrink with λ = 0 is the identity).
_PARAMS: dict = {
    "relu": {"inplace": False}, "silu": {"inplace": False}, "mish": {"inplace": False}, "selu": {"inplace": False},
    "relu6": {"inplace": False}, "hardswish": {"inplace": False}, "hardsigmoid": {"inplace": False},
    "gelu": {"approximate": "none"},
    "leaky_relu": {"negative_slope": 0.01, "inplace": False},
    "elu": {"alpha": 1.0, "inplace": False}, "celu": {"alpha": 1.0, "inplace": False},
    "softplus": {"beta": 1.0, "threshold": 20.0},
    "hardtanh": {"min_val": -1.0, "max_val": 1.0, "inplace": False},
    "clamp": {"min": None, "max": None}, "clamp_min": {"min": None}, "clamp_max": {"max": None},
    "softshrink": {"lambd": 0.5}, "hardshrink": {"lambd": 0.5},
    "threshold": {"threshold": 0.0, "value": 0.0, "inplace": False},
}
_RULES: dict = {
    "leaky_relu": lambda p: _slope(p["negative_slope"]),
    "elu": lambda p: _ENTRIES["relu" if p["alpha"] == 0 else "elu"],  # α(eˣ − 1) with α = 0 is 0: ReLU
    "hardtanh": lambda p: _clamp(p["min_val"], p["max_val"]),
    "clamp": lambda p: _clamp(p["min"], p["max"]),
    "clamp_min": lambda p: _clamp(p["min"], None),
    "clamp_max": lambda p: _clamp(None, p["max"]),
    "softshrink": lambda p: _ENTRIES["identity" if p["lambd"] == 0 else "softshrink"],
    "hardshrink": lambda p: _ENTRIES["identity" if p["lambd"] <= 0 else "hardshrink"],  # |x| > λ ≤ 0 always
    "threshold": lambda p: (_ENTRIES["identity"] if p["threshold"] == -math.inf else
                            _ENTRIES["relu"] if (p["threshold"], p["value"]) == (0, 0) else
                            _permutation_only(f"threshold({p['threshold']:g}, {p['value']:g})")),
}


def _entry(key: str, params: dict) -> _Entry:
    """The catalogue entry of activation ``key`` called with ``params`` (all of its arguments, bound)."""
    rule = _RULES.get(key)
    return rule(params) if rule is not None else _from_string(key)


def _module_params(key: str, m: nn.Module) -> dict:
    return {name: getattr(m, name, default) for name, default in _PARAMS.get(key, {}).items()}


def _bind(key: str, fn, args: tuple, kwargs: dict) -> dict:
    """The arguments of a call ``fn(input, *args, **kwargs)`` by name, defaults filled in; a clear error
    for arguments the catalogue does not know or that are not plain values."""
    defaults = _PARAMS.get(key, {})
    names = list(defaults)
    where = f"{_function_name(fn)} with arguments {args!r} {kwargs!r}"
    if len(args) > len(names):
        raise InvalidOptionError(f"{where}: more positional arguments than the catalogue knows ({names}); {_HINT}.")
    params = dict(defaults)
    params.update(zip(names, args))
    if "input" in kwargs:
        raise InvalidOptionError(f"{where}: the input is bound; an activation leaves it free.")
    for k, v in kwargs.items():
        if k not in defaults:
            raise InvalidOptionError(f"{where}: the catalogue knows no argument {k!r} (known: {names}); {_HINT}.")
        params[k] = v
    for k, v in params.items():
        if not (v is None or isinstance(v, (bool, int, float, str))):
            raise InvalidOptionError(f"{where}: argument {k}={v!r} is not a plain number, so the group cannot be "
                                     f"read from it; {_HINT}.")
        if isinstance(v, float) and math.isnan(v):  # σ is NaN wherever the argument is used: no group
            raise InvalidOptionError(f"{where}: argument {k} is NaN; an activation's arguments are numbers.")
    return params


def activation_call(fn: Callable, args: tuple = (), kwargs: Optional[dict] = None) -> functools.partial:
    """The activation that the call ``fn(x, *args, **kwargs)`` applies to ``x``: a ``functools.partial``
    of the catalogued function ``fn`` with every argument bound by keyword, which
    :func:`intertwiner_group` reads (its group depends on the values: ``F.leaky_relu(x, 1.0)`` is the
    identity). A clear error for a function the catalogue does not know or arguments it cannot read.

    >>> import torch.nn.functional as F
    >>> intertwiner_group(activation_call(F.hardtanh, (0.0, 1.0)), 4).name   # not odd
    'permutation'
    >>> intertwiner_group(activation_call(F.elu, (), {"alpha": 0.0}), 4).name   # ELU with α = 0 is ReLU
    'scaled_permutation'
    """
    key = _key_of(fn)
    if key is None:
        raise InvalidOptionError(f"no catalogue entry for the function {_function_name(fn)!r}; {_HINT}.")
    return functools.partial(fn, **_bind(key, fn, tuple(args), dict(kwargs or {})))


def _prelu(m: nn.PReLU) -> _Entry:
    if m.weight.numel() == 1:
        return _slope(float(served(m, "weight").detach()))
    # one slope per channel: scaling a channel is still exact, swapping two channels is not
    return _Entry("prelu_per_channel", "positive_diagonal", None, ("positive_scaling",))


def _rule(key: str):
    """A module rule: the entry from the module's own arguments (its attributes)."""
    return lambda m: _entry(key, _module_params(key, m))


_MODULES: dict = {
    nn.Identity: "identity", nn.ReLU: "relu", nn.GELU: "gelu", nn.SiLU: "silu", nn.Mish: "mish",
    nn.Softplus: "softplus", nn.ELU: _rule("elu"), nn.CELU: "celu", nn.SELU: "selu", nn.ReLU6: "relu6",
    nn.Hardswish: "hardswish", nn.LogSigmoid: "logsigmoid", nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid",
    nn.Tanh: "tanh", nn.Softsign: "softsign", nn.Tanhshrink: "tanhshrink", nn.Softshrink: _rule("softshrink"),
    nn.Hardshrink: _rule("hardshrink"),
    # RReLU: a slope drawn per element (training) or their mean (eval); positively homogeneous either way
    nn.LeakyReLU: _rule("leaky_relu"), nn.RReLU: lambda m: _ENTRIES["leaky_relu"],
    nn.PReLU: _prelu, nn.Hardtanh: _rule("hardtanh"), nn.Threshold: _rule("threshold"),
}
class Activation(nn.Module):
    """A catalogue activation as a module, for those torch has no module for.

    >>> Activation("gaussian")(torch.zeros(2))
    tensor([1., 1.])
    >>> intertwiner_group(Activation("x^3"), 4).name
    'diagonal_permutation'
    """

    def __init__(self, name: str):
        super().__init__()
        self.key = _from_string(name).key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _from_string(self.key).fn(x)

    def extra_repr(self) -> str:
        return repr(self.key)


_MODULES[Activation] = lambda m: _from_string(m.key)


_FUNCTIONS = {
    torch.relu: "relu", F.relu: "relu", F.leaky_relu: "leaky_relu", F.gelu: "gelu", F.silu: "silu",
    F.mish: "mish", F.softplus: "softplus", F.elu: "elu", F.selu: "selu", torch.selu: "selu", F.celu: "celu",
    F.relu6: "relu6", F.hardswish: "hardswish", F.logsigmoid: "logsigmoid", torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid", torch.special.expit: "sigmoid", F.hardsigmoid: "hardsigmoid", torch.tanh: "tanh",
    F.tanh: "tanh", F.softsign: "softsign", F.hardtanh: "hardtanh", F.tanhshrink: "tanhshrink",
    F.softshrink: "softshrink", F.hardshrink: "hardshrink", torch.sin: "sin", torch.erf: "erf",
    torch.special.erf: "erf", torch.cos: "cos", torch.abs: "abs", torch.square: "power:2",
    F.threshold: "threshold", torch.clamp: "clamp", torch.clip: "clamp", torch.clamp_min: "clamp_min",
    torch.clamp_max: "clamp_max",
}


def _key_of(fn) -> Optional[str]:
    try:
        return _FUNCTIONS.get(fn)
    except TypeError:  # an unhashable callable
        return None


def _function_name(fn) -> str:
    name = getattr(fn, "__name__", type(fn).__name__)
    for where, module in (("torch", torch), ("F", F), ("torch.special", torch.special)):
        for attr in (name.lstrip("_"), name, name.removeprefix("special_")):  # F.threshold is "_threshold"
            if getattr(module, attr, None) is fn:
                return f"{where}.{attr}"
    return name


def _resolve(activation) -> tuple[_Entry, str, Callable]:
    """``(entry, display name, callable)`` for a catalogued activation, or a clear error."""
    if activation is None:
        return _ENTRIES["identity"], "identity", _ENTRIES["identity"].fn
    if isinstance(activation, str):
        e = _from_string(activation)
        return e, e.key, e.fn
    if isinstance(activation, nn.Module):
        mro = type(activation).__mro__
        for i, cls in enumerate(mro):
            if cls in _MODULES:
                if any("forward" in vars(sub) for sub in mro[:i]):
                    # A subclass with its own forward computes something else under the catalogued name
                    # (torch.ao's quantized ReLU6 subclasses nn.ReLU): its parent's group would be a guess.
                    raise InvalidOptionError(
                        f"{type(activation).__name__} ({activation!r}) extends {cls.__name__} but defines its own "
                        f"forward, so the catalogue cannot read its group from {cls.__name__}'s; {_HINT}, which "
                        f"tests the generators numerically.")
                rule = _MODULES[cls]
                e = _ENTRIES[rule] if isinstance(rule, str) else rule(activation)
                return e, repr(activation), activation
        raise InvalidOptionError(
            f"no catalogue entry for the module {type(activation).__name__} ({activation!r}); known modules: "
            f"{sorted(c.__name__ for c in _MODULES)}; {_HINT}, which tests the generators numerically.")
    if isinstance(activation, functools.partial) and not isinstance(activation.func, nn.Module):
        # A catalogued function with its arguments bound by keyword (how a traced call
        # F.leaky_relu(x, 0.2) is read, see activation_call): the entry comes from their values.
        key = _key_of(activation.func)
        if key is not None:
            if activation.args:
                raise InvalidOptionError(
                    f"functools.partial({_function_name(activation.func)}, {', '.join(map(repr, activation.args))}) "
                    f"binds the input position; bind an activation's arguments by keyword "
                    f"(or use workbench.groups.activation_call).")
            params = _bind(key, activation.func, (), activation.keywords)
            shown = {k: v for k, v in params.items() if k != "inplace" and v != _PARAMS[key].get(k)}
            display = _function_name(activation.func) + (
                "(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")" if shown else "")
            return _entry(key, params), display, activation
    if callable(activation):
        key = _key_of(activation)
        if key is not None:
            return _entry(key, dict(_PARAMS.get(key, {}))), _function_name(activation), activation
        name = getattr(activation, "__name__", type(activation).__name__)
        raise InvalidOptionError(f"no catalogue entry for the function {name!r}; {_HINT}, which tests the "
                                 f"generators numerically.")
    raise InvalidOptionError(f"an activation is a name such as 'relu', an nn.Module, a function or None; got "
                             f"{type(activation).__name__} {activation!r}.")


def activation_callable(activation, dtype: torch.dtype = torch.float64) -> tuple[Callable, str]:
    """``(fn, display name)`` for any activation: catalogued, or any elementwise callable.

    A module whose parameters have another dtype is copied and converted (the caller's is untouched).
    """
    if activation is None or isinstance(activation, str):
        e, display, fn = _resolve(activation)
        return fn, display
    if isinstance(activation, nn.Module):
        tensors = [*activation.parameters(), *activation.buffers()]
        if any(t.is_floating_point() and t.dtype != dtype for t in tensors):
            activation = copy.deepcopy(activation).to(dtype)
        return activation, repr(activation)
    if not callable(activation):
        _resolve(activation)  # raises the clear error
    try:
        return activation, _resolve(activation)[1]
    except InvalidOptionError:
        return activation, _function_name(activation)


def _phi_text(phi: Phi) -> str:
    return {"identity": "A", "abs": "abs(A)"}.get(phi, f"A^⊙{phi[1]}" if isinstance(phi, tuple) else str(phi))


def _build(family: str, n: int, phi: Phi, sigma: float, source: str, display: str) -> Group:
    kw = {"sigma": sigma} if family in _SCALED else {}
    G = FAMILIES[family](n, phi=phi, source=source, **kw)
    G.activation = display
    if phi != "identity":
        G.label = f"{G.label}; φ(A) = {_phi_text(phi)}"
    return G


def affine_extension(group: Group, centre: float) -> Group:
    """``group`` as an affine extension: its :meth:`~Group.offset` is c(M) = centre·(1 − φ(M)·1)."""
    G = group.with_n(group.n)
    G.centre, G.source, G.name = float(centre), "affine extension", f"affine_{group.name}"
    G.label = (f"{group.label} + offset c(M) = σ(0)(1 − φ(M)·1), σ(0) = {centre:.4g} "
               f"(the next layer's bias absorbs c)")
    return G


def intertwiner_group(activation, n: int, *, affine: bool = False, sigma: float = 1.0) -> Group:
    """The intertwiner group G_σ of an elementwise activation, acting on ``n`` hidden units.

    Args:
        activation: a name (``"relu"``, ``"gelu"``, ``"gaussian"``, ``"power:3"`` or ``"x^3"``,
            ``"identity"``), ``None`` (no activation), an ``nn.Module`` (``nn.LeakyReLU(0.2)``,
            ``nn.PReLU()``, ``nn.Hardtanh(0, 1)``, …) or a torch function (``torch.relu``, ``F.gelu``).
        n: the number of hidden units (for a per-channel ``nn.PReLU``, its number of slopes).
        affine: the affine extension σ(Mx) = φ(M)σ(x) + c(M), valid where the next layer has a bias;
            see :meth:`Group.offset`. Where it adds nothing the linear group comes back, saying so.
        sigma: log-normal σ of the scalings that :meth:`Group.sample` draws (mean-one scales).

    Returns:
        a :class:`Group` with ``source="catalogue"`` (``"affine extension"`` with ``affine=True``) and
        ``activation`` set to the activation's display name.

    >>> G = intertwiner_group("relu", n=4)
    >>> G.name, G.source, G.activation
    ('scaled_permutation', 'catalogue', 'relu')
    >>> intertwiner_group(torch.nn.GELU(), 4).name
    'permutation'
    >>> G = intertwiner_group("sigmoid", 3, affine=True)
    >>> G.name, G.offset(G.sample(seed=0)).shape
    ('affine_signed_permutation', torch.Size([3]))
    """
    entry, display, fn = _resolve(activation)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidOptionError(f"intertwiner_group({display!r}, n={n!r}): n is the number of hidden units, "
                                 f"an integer ≥ 1.")
    if entry.key == "prelu_per_channel" and activation.weight.numel() != n:
        raise InvalidOptionError(f"{display} has one slope per channel, so it acts on {activation.weight.numel()} "
                                 f"units, but n={n}.")
    if not affine:
        return _build(entry.family, n, entry.phi, sigma, "catalogue", display)
    if entry.affine_family is None:
        G = _build(entry.family, n, entry.phi, sigma, "affine extension", display)
        G.label = f"{G.label} (the affine extension adds nothing beyond the linear group for {display})"
        return G
    fn = fn if activation is None or isinstance(activation, str) else activation_callable(activation)[0]
    centre = float(fn(torch.zeros(1, n, dtype=torch.float64))[0, 0])
    return affine_extension(_build(entry.affine_family, n, "identity", sigma, "catalogue", display), centre)


def _row(entry: _Entry) -> dict:
    G = _build(entry.family, 2, entry.phi, 1.0, "catalogue", entry.key)
    return {"activation": entry.key, "group": G.name, "label": G.label, "phi": _phi_text(entry.phi),
            "members": list(entry.members), "non_members": [g for g in GENERATORS if g not in entry.members],
            "affine_group": f"affine_{entry.affine_family}" if entry.affine_family else G.name}


#: one row per catalogued activation (plus ``power:2`` and ``power:3``): its group, label, φ, and which
#: generators are members and which are not. ``pandas.DataFrame(CATALOGUE)`` renders it.
CATALOGUE: list[dict] = [_row(e) for e in [*_ENTRIES.values(), _power_entry("x^2", "2"), _power_entry("x^3", "3")]]


def catalogue_frame():
    """:data:`CATALOGUE` as a pandas DataFrame (members joined by commas), for notebooks."""
    import pandas as pd

    rows = [{**r, "members": ", ".join(r["members"]), "non_members": ", ".join(r["non_members"])} for r in CATALOGUE]
    return pd.DataFrame(rows)


def degree_of(phi: Phi) -> int:
    """The homogeneity degree d encoded in φ (A^{⊙d}); 1 for A and abs(A)."""
    return phi[1] if isinstance(phi, tuple) else 1

