"""The shared shape of every analysis result: numbers in a dataclass, ``to_frame()``, ``plot()``, HTML."""
from __future__ import annotations

import html


class Report:
    """Mixin for report dataclasses.

    Subclasses implement ``to_frame()`` (a pandas DataFrame) and ``plot(ax=None)`` (a seaborn figure,
    returning the matplotlib Axes), and may override ``summary()`` — a one-line verdict shown first
    in the notebook repr and in ``repr()``.
    """

    def summary(self) -> str:
        return type(self).__name__

    def to_frame(self):  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def plot(self, ax=None):  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.summary()})"

    def _repr_html_(self) -> str:
        frame = self.to_frame()
        table = frame.to_html(index=False, float_format=lambda v: f"{v:.3g}", border=0)
        return f"<div><p><b>{html.escape(type(self).__name__)}</b> — {html.escape(self.summary())}</p>{table}</div>"


def new_axes(ax=None, figsize=(6, 3.5)):
    """An Axes to draw on: the given one, or a fresh figure with the workbench seaborn theme."""
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    _, ax = plt.subplots(figsize=figsize)
    return ax
