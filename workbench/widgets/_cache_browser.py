"""``CacheBrowser``: the names, shapes and sizes of an ActivationCache, and one activation as a heatmap or histogram."""
from __future__ import annotations

import html
from collections.abc import Mapping

import ipywidgets as widgets
import numpy as np
import torch

from .._errors import InvalidOptionError, UnknownNameError, check_option, nearest
from .._repr import html_table, human_bytes, tensor_summary
from ._base import html_bundle, int_control, render, show
from ._pixels import colour_bar_html, heatmap_html

VIEWS = ("heatmap", "histogram")
#: At most this many values go into a histogram (an even subsample beyond): drawing stays well under a second.
HISTOGRAM_VALUES = 1_000_000


def slice_2d(t: torch.Tensor, example: int, channel: int) -> tuple[torch.Tensor, str]:
    """The 2-D view a heatmap shows, with a caption.

    ``[D]`` -> ``[1, D]``; ``[N, D]`` -> all of it (examples × units); ``[N, T, D]`` -> example's
    ``[T, D]`` (positions × units); ``[N, C, H, W]`` -> example's channel ``[H, W]``; more axes are
    flattened after the example's first two.
    """
    if t.ndim == 0:
        return t.reshape(1, 1), "a scalar"
    if t.ndim == 1:
        return t.reshape(1, -1), f"all {t.shape[0]} values"
    if t.ndim == 2:
        return t, f"examples × units {tuple(t.shape)}"
    if t.ndim == 3:
        return t[example], f"example {example}: {tuple(t.shape[1:])}"
    if t.ndim == 4:
        return t[example, channel], f"example {example}, channel {channel}: {tuple(t.shape[2:])}"
    return t[example].reshape(t.shape[1], t.shape[2], -1)[:, :, 0], f"example {example}, first slice of the trailing axes"


class CacheBrowser(widgets.VBox):
    """Browse an :class:`~workbench.ActivationCache` (or any mapping of name -> tensor).

    A table lists every name with its shape, dtype and size; pick a name to see its values as a
    heatmap (one example's slice) or a histogram (all values). From code: ``browser.name = "3"``,
    ``browser.view = "histogram"``, ``browser.example = 2``, ``browser.channel = 5``; ``browser.table``
    is the table as a DataFrame.

    Example:
        >>> import torch, workbench as wb
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> _, cache = wb.run_with_cache(mlp, torch.randn(3, 4))
        >>> browser = wb.widgets.CacheBrowser(cache)
        >>> browser.name, browser.view = "1", "histogram"
        >>> browser.table[["name", "shape", "bytes"]].values.tolist()
        [['0', (3, 8), 96], ['1', (3, 8), 96], ['2', (3, 2), 24]]
    """

    def __init__(self, cache: Mapping):
        if not isinstance(cache, Mapping) or not len(cache):
            raise InvalidOptionError(f"CacheBrowser needs a non-empty ActivationCache or mapping of name -> tensor; "
                                     f"got {type(cache).__name__}{' (empty)' if isinstance(cache, Mapping) else ''}.")
        self.cache = cache
        # A name that fired several times shows its first call (the table says how many).
        self._tensors = {n: (cache.calls(n)[0] if hasattr(cache, "calls") else cache[n]) for n in cache}
        bad = [n for n, t in self._tensors.items() if not isinstance(t, torch.Tensor)]
        if bad:
            raise InvalidOptionError(f"CacheBrowser shows tensors; {bad[:3]} hold something else.")
        names = list(self._tensors)
        self._name = widgets.Select(options=names, value=names[0], rows=min(10, len(names)), description="name",
                                    layout=widgets.Layout(width="380px"))
        self._view = widgets.ToggleButtons(options=VIEWS, value="heatmap")
        self._example = widgets.BoundedIntText(value=0, min=0, max=0, description="example", layout=widgets.Layout(width="170px"))
        self._channel = widgets.BoundedIntText(value=0, min=0, max=0, description="channel", layout=widgets.Layout(width="170px"))
        self.info = widgets.HTML()
        self.figure = widgets.Output()
        self._name.observe(lambda _: self._on_name(), "value")
        for w in (self._view, self._example, self._channel):
            w.observe(lambda _: self._draw(), "value")
        total = human_bytes(getattr(cache, "nbytes", sum(t.nbytes for t in self._tensors.values())))
        table = html_table(["name", "shape", "dtype", "calls", "size"], self._rows(human=True),
                           f"{type(cache).__name__} — {len(names)} names, {total}")
        super().__init__([widgets.HTML(f"<div style='max-height:220px;overflow:auto'>{table}</div>"),
                          widgets.HBox([self._name, widgets.VBox([self._view, self._example, self._channel])]),
                          self.info, self.figure])
        self._on_name()

    def _rows(self, human: bool):
        for n, t in self._tensors.items():
            calls = len(self.cache.calls(n)) if hasattr(self.cache, "calls") else 1
            size = t.nbytes * calls
            shape = ("×".join(map(str, t.shape)) or "scalar") if human else tuple(t.shape)
            yield n, shape, str(t.dtype).replace("torch.", ""), calls, human_bytes(size) if human else size

    def __repr__(self) -> str:
        # The text a front end without the widget's JavaScript shows (ipywidgets' own repr is its children's HTML).
        return f"CacheBrowser({len(self._tensors)} names; showing {self.name!r} as a {self.view})"

    @property
    def table(self):
        """One row per name: shape, dtype, calls and bytes (a pandas DataFrame)."""
        import pandas as pd

        return pd.DataFrame(self._rows(human=False), columns=["name", "shape", "dtype", "calls", "bytes"])

    # ------------------------------------------------------------------ state
    @property
    def name(self) -> str:
        return self._name.value

    @name.setter
    def name(self, value: str) -> None:
        if value not in self._tensors:
            close = nearest(str(value), list(self._tensors))
            raise UnknownNameError(f"{value!r} is not in this cache ({len(self._tensors)} names)."
                                   + (f" Nearest names: {close}." if close else ""))
        self._name.value = value

    @property
    def view(self) -> str:
        return self._view.value

    @view.setter
    def view(self, value: str) -> None:
        self._view.value = check_option("view", value, VIEWS)

    example = int_control("_example", "Which example a heatmap of a [N, ...] activation shows.")
    channel = int_control("_channel", "Which channel a heatmap of a [N, C, H, W] activation shows.")

    @property
    def tensor(self) -> torch.Tensor:
        """The selected activation."""
        return self._tensors[self.name]

    # ------------------------------------------------------------------ drawing
    def _on_name(self) -> None:
        t = self.tensor
        # Bounds first, then values: a new max below the old value would clamp it anyway.
        self._example.max = max(t.shape[0] - 1, 0) if t.ndim >= 3 else 0
        self._channel.max = t.shape[1] - 1 if t.ndim == 4 else 0
        self._example.disabled, self._channel.disabled = t.ndim < 3, t.ndim != 4
        self.info.value = f"<code>{html.escape(self.name)}</code>: {html.escape(tensor_summary(t))}"
        self._draw()

    def _draw(self) -> None:
        t = self.tensor.detach()
        t = t if t.is_floating_point() else t.double()
        show(self.figure, [self._heatmap(t) if self.view == "heatmap" else self._histogram(t)])

    def _heatmap(self, t: torch.Tensor) -> dict:
        values, caption = slice_2d(t, self.example, self.channel)
        values = values.double().numpy()
        # Diverging colours around 0 for signed values (pre-activations), sequential otherwise.
        if values.min() < 0:
            top = float(np.abs(values).max())
            lo, hi, cmap = -top, top, "RdBu_r"
        else:
            lo, hi, cmap = float(values.min()), float(values.max()), "viridis"
        hi = max(hi, lo + 1e-12)
        rows, cols = values.shape
        width, height = min(640, max(160, 6 * cols)), min(420, max(24, 6 * rows))
        panel = heatmap_html(values, f"{self.name} — {caption}", "column", "row", cmap=cmap, vmin=lo, vmax=hi,
                             size=width, height=height)
        return html_bundle(f"<div style='white-space:nowrap'>{panel}{colour_bar_html(cmap, lo, hi, '', height)}</div>")

    def _histogram(self, t: torch.Tensor) -> dict:
        flat = t.reshape(-1)
        if flat.numel() > HISTOGRAM_VALUES:
            flat = flat[:: flat.numel() // HISTOGRAM_VALUES + 1]
        flat = flat.float().numpy()
        counts, edges = np.histogram(flat[np.isfinite(flat)], bins=60)
        shown = f" ({len(flat):,} shown)" if len(flat) < t.numel() else ""

        def draw(fig):
            ax = fig.add_axes((0.12, 0.15, 0.84, 0.75))
            ax.stairs(counts, edges, fill=True, alpha=0.8)
            ax.set_yscale("symlog")
            ax.set_xlabel("value")
            ax.set_ylabel("count")
            ax.set_title(f"{self.name} — {t.numel():,} values{shown}")

        return render(draw, (6.5, 3.2))
