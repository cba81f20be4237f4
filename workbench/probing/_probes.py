"""k-sparse probes: pick k units, fit a logistic probe on them; a dense probe is the basis-free ceiling.

The probes are scikit-learn estimators (``__init__`` only stores parameters, ``fit`` returns self,
learned attributes end in ``_``, ``clone``/``cross_val_score`` work), so unit selection happens
inside ``fit`` and cross-validation never selects units on held-out rows.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin

from .._errors import InvalidOptionError, check_option
from .._progress import ProgressLike, progress_bar
from .._random import SeedLike, as_seed
from .._report import Report, new_axes
from ._inputs import prepare
from ._scores import f_statistic_matrix, mean_difference_matrix

SELECTIONS = ["mean_difference", "f_statistic"]


class _Probe(ClassifierMixin, BaseEstimator):
    """Shared fit/predict of a logistic probe on a subset of units (``units_``)."""

    def _units(self, X: torch.Tensor, Y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def fit(self, X, y):
        """Select units on (X [N, d], y [N] binary), then fit the logistic probe. Returns self."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.utils.validation import check_X_y

        X, y = check_X_y(X, y, dtype=np.float64)
        self.classes_ = np.unique(y)
        if len(self.classes_) != 2:
            raise InvalidOptionError(f"{type(self).__name__} is a binary concept probe; y has classes "
                                     f"{self.classes_.tolist()}. Fit one probe per concept.")
        self.n_features_in_ = X.shape[1]
        Xt = torch.from_numpy(X)
        self.scores_, self.units_ = self._units(Xt, torch.from_numpy(y == self.classes_[1])[:, None])
        Z = X[:, self.units_]
        self.mean_, self.scale_ = Z.mean(0), Z.std(0)
        self.scale_[self.scale_ == 0] = 1.0  # a constant unit stays 0 after centring
        self.model_ = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.random_state)
        self.model_.fit((Z - self.mean_) / self.scale_, y)
        self.coef_, self.intercept_ = self.model_.coef_, self.model_.intercept_
        return self

    def _z(self, X) -> np.ndarray:
        from sklearn.utils.validation import check_array, check_is_fitted

        check_is_fitted(self, "model_")
        X = check_array(X, dtype=np.float64)
        if X.shape[1] != self.n_features_in_:
            raise InvalidOptionError(f"X has {X.shape[1]} units but this probe was fitted on {self.n_features_in_}.")
        return (X[:, self.units_] - self.mean_) / self.scale_

    def decision_function(self, X) -> np.ndarray:
        """Logit of the positive class, ``[N]``."""
        Z = self._z(X)  # checks fitted-ness before touching model_
        return self.model_.decision_function(Z)

    def predict_proba(self, X) -> np.ndarray:
        """``[N, 2]`` class probabilities."""
        Z = self._z(X)  # checks fitted-ness before touching model_
        return self.model_.predict_proba(Z)

    def predict(self, X) -> np.ndarray:
        """``[N]`` predicted labels."""
        Z = self._z(X)  # checks fitted-ness before touching model_
        return self.model_.predict(Z)


class SparseProbe(_Probe):
    """A logistic probe on the k units that score highest for the concept.

    Args:
        k: how many units (>= 1, at most the layer's width).
        selection: ``"mean_difference"`` (|standardised mean difference|) or ``"f_statistic"``.
        C, max_iter, random_state: passed to scikit-learn's ``LogisticRegression``.

    Learned: ``units_`` (the k units, best first), ``scores_`` (selection score of every unit),
    ``coef_``, ``intercept_``, ``classes_``, ``n_features_in_``.

    >>> X = np.random.default_rng(0).normal(size=(200, 10)); y = X[:, 3] > 0
    >>> SparseProbe(k=1).fit(X, y).units_.tolist()
    [3]
    """

    def __init__(self, k: int = 1, selection: str = "mean_difference", C: float = 1.0, max_iter: int = 1000,
                 random_state: Optional[int] = None):
        self.k = k
        self.selection = selection
        self.C = C
        self.max_iter = max_iter
        self.random_state = random_state

    def _units(self, X, Y):
        check_option("selection", self.selection, SELECTIONS)
        if not isinstance(self.k, (int, np.integer)) or not 1 <= self.k <= X.shape[1]:
            raise InvalidOptionError(f"k must be an int in [1, {X.shape[1]}] (the layer's units); got k={self.k!r}.")
        fn = mean_difference_matrix if self.selection == "mean_difference" else f_statistic_matrix
        scores = fn(X, Y)[:, 0].abs().numpy()
        return scores, np.argsort(-scores, kind="stable")[: self.k]


class DenseProbe(_Probe):
    """A logistic probe on every unit: what a linear read-out can do in any basis (the ceiling).

    >>> X = np.random.default_rng(0).normal(size=(200, 4)); y = X.sum(1) > 0
    >>> DenseProbe().fit(X, y).score(X, y) > 0.95
    True
    """

    def __init__(self, C: float = 1.0, max_iter: int = 1000, random_state: Optional[int] = None):
        self.C = C
        self.max_iter = max_iter
        self.random_state = random_state

    def _units(self, X, Y):
        return np.ones(X.shape[1]), np.arange(X.shape[1])


@dataclass(repr=False)
class ProbeCurve(Report):
    """Cross-validated ROC AUC of k-sparse probes per concept, with the dense ceiling (``k = d``)."""

    scores: "object"  # pandas DataFrame: concept, k, probe, auc_mean, auc_std
    selection: str
    cv: int
    seed: int

    def to_frame(self):
        return self.scores.copy()

    def summary(self) -> str:
        f = self.scores
        sparse, dense = f[f.probe == "sparse"], f[f.probe == "dense"]
        parts = []
        if len(sparse):  # every k above the layer's width leaves only the dense probe
            parts.append(f"k={int(sparse.k.min())} {sparse[sparse.k == sparse.k.min()].auc_mean.mean():.3f}")
        if len(dense):
            parts.append(f"dense {dense.auc_mean.mean():.3f}")
        return f"mean CV AUC: {', '.join(parts)} ({self.selection}, {self.cv}-fold)"

    def plot(self, ax=None):
        """AUC against k per concept; the dense probe as a dashed line per concept."""
        import seaborn as sns

        ax = new_axes(ax)
        f = self.scores
        sns.lineplot(f[f.probe == "sparse"], x="k", y="auc_mean", hue="concept", marker="o", ax=ax)
        for (_, row), color in zip(f[f.probe == "dense"].iterrows(), sns.color_palette()):
            ax.axhline(row.auc_mean, ls="--", lw=0.8, color=color)
        ax.set(xscale="log", ylabel="cross-validated ROC AUC")
        return ax


def probe_curve(acts, concepts, ks: Sequence[int] = (1, 2, 4, 8, 16), *, selection: str = "mean_difference",
                cv: int = 5, seed: SeedLike = 0, dense: bool = True, where=None, names=None, C: float = 1.0,
                progress: ProgressLike = None) -> ProbeCurve:
    """Cross-validated ROC AUC of :class:`SparseProbe` for each k and concept, and of :class:`DenseProbe`.

    Args:
        acts: ``[N, d]`` (or ``[N, T, d]``) activations; concepts: as in :func:`concept_scores`.
        ks: probe sizes; those above the layer's width are dropped.
        selection: unit selection of the sparse probes.
        cv: stratified folds (shuffled with ``seed``). Token-level rows (``[N, T, d]``) are split by
            example (scikit-learn's ``StratifiedGroupKFold``): no example has tokens on both sides of a
            split. Split by token, a probe could recognise the example instead of reading the concept —
            a label shared by each sentence's tokens, independent of activations that carry only a
            per-sentence offset, read a cross-validated dense AUC of 0.73 (40 sentences of 12 tokens).
        dense: also fit the dense ceiling.
        progress: a bar of the concepts done: True, False, or None (the default) for a bar in a Jupyter
            notebook only.

    >>> X = np.random.default_rng(0).normal(size=(120, 6)); y = X[:, 0] + X[:, 1] > 0
    >>> probe_curve(torch.tensor(X), torch.tensor(y), ks=[1, 2], cv=3).to_frame().probe.tolist()
    ['sparse', 'sparse', 'dense']
    """
    import pandas as pd
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_score
    check_option("selection", selection, SELECTIONS)
    if isinstance(cv, (bool, np.bool_)) or not isinstance(cv, numbers.Integral) or cv < 2:
        raise InvalidOptionError(f"cv is the number of cross-validation folds, an int ≥ 2 (e.g. 5); got {cv!r}.")
    bad = [k for k in ks if isinstance(k, (bool, np.bool_)) or not isinstance(k, numbers.Integral) or k < 1]
    if bad:
        raise InvalidOptionError(f"ks are probe sizes, ints ≥ 1 (units per sparse probe); got {bad}.")
    X, Y, names, example = prepare(acts, concepts, where, names, examples=True)
    X, example = X.numpy(), example.numpy()
    grouped = len(np.unique(example)) < len(example)  # several rows (tokens) of one example: split by example

    def holding(y):  # examples with a row of each class (rows themselves when every row is an example)
        return min(len(np.unique(example[y])), len(np.unique(example[~y])))
    small = [n for n, y in zip(names, Y.T.numpy()) if holding(y) < cv]
    if small:
        raise InvalidOptionError(f"concepts {small} have fewer than cv={cv} examples in one class"
                                 f"{' (examples with a token of that class)' if grouped else ''}; use fewer folds "
                                 f"or more examples.")
    ks = sorted({int(k) for k in ks if k <= X.shape[1]})
    if not ks and not dense:
        raise InvalidOptionError(f"no probe to fit: every k in ks is above the layer's {X.shape[1]} units (or ks is "
                                 f"empty) and dense=False; pass some k ≤ {X.shape[1]} or dense=True.")
    seed = as_seed(seed)
    state = seed % 2**32  # scikit-learn takes seeds in [0, 2**32)
    folds = (StratifiedGroupKFold if grouped else StratifiedKFold)(cv, shuffle=True, random_state=state)
    rows = []
    for k_idx, name in enumerate(progress_bar(names, desc="concepts", unit="concept", progress=progress)):
        y = Y[:, k_idx].numpy()
        splits = list(folds.split(X, y, example if grouped else None))
        if any(len(np.unique(y[test])) < 2 for _, test in splits):  # ROC AUC needs both classes held out
            raise InvalidOptionError(f"concept {name!r}: split by example, some of the cv={cv} held-out folds have "
                                     f"tokens of one class only; use fewer folds or more examples.")
        probes = [("sparse", k, SparseProbe(k, selection, C=C, random_state=state)) for k in ks]
        if dense:
            probes.append(("dense", X.shape[1], DenseProbe(C=C, random_state=state)))
        for kind, k, probe in probes:
            auc = cross_val_score(probe, X, y, cv=splits, scoring="roc_auc")
            rows.append({"concept": name, "k": k, "probe": kind, "auc_mean": auc.mean(), "auc_std": auc.std()})
    return ProbeCurve(pd.DataFrame(rows), selection, cv, int(seed))
