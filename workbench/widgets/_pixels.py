"""Matrices and images as small PNGs in HTML: the fast path for figures that must redraw on every click.

The explorer's two heatmaps as a matplotlib figure with axes, ticks and a colour bar took 0.65 s
on this 2-core machine under load (~9), mostly laying out text. Here a heatmap is its matrix
coloured by a matplotlib colormap, one pixel per cell, scaled up by the browser
(``image-rendering: pixelated``), with the labels as HTML: 13 ms for the same two. The same
matrices are available as seaborn figures through the result objects' ``plot()``.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Optional

import numpy as np


def png_bytes(pixels: np.ndarray) -> bytes:
    """``uint8 [H, W, 3]`` pixels as a PNG file's bytes (a few hundred for a 32×32 thumbnail)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_uri(pixels: np.ndarray) -> str:
    """A ``data:`` URI of ``uint8 [H, W, 3]`` pixels as PNG."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(pixels)).decode()


def coloured(values: np.ndarray, cmap: str, vmin: float, vmax: float) -> np.ndarray:
    """``[H, W]`` values -> ``uint8 [H, W, 3]`` through a matplotlib colormap (NaN shown as the lowest colour)."""
    from matplotlib import colormaps

    x = (np.nan_to_num(np.asarray(values, dtype=np.float64), nan=vmin) - vmin) / max(vmax - vmin, 1e-300)
    return (colormaps[cmap](np.clip(x, 0, 1))[..., :3] * 255).round().astype(np.uint8)


def colour_bar_html(cmap: str, vmin: float, vmax: float, label: str = "", height: int = 220) -> str:
    bar = coloured(np.linspace(vmax, vmin, 64)[:, None], cmap, vmin, vmax)
    return (f"<div style='display:inline-flex;align-items:stretch;gap:4px;font-size:11px;vertical-align:top;"
            f"margin-top:22px'><img src='{png_uri(bar)}' style='width:12px;height:{height}px'>"
            f"<div style='display:flex;flex-direction:column;justify-content:space-between'><span>{vmax:+.3g}</span>"
            f"<span>{html.escape(label)}</span><span>{vmin:+.3g}</span></div></div>")


def heatmap_html(values: np.ndarray, title: str, xlabel: str, ylabel: str, *, cmap: str = "RdBu_r",
                 vmin: float = -1.0, vmax: float = 1.0, size: int = 220, height: Optional[int] = None) -> str:
    """One labelled heatmap of ``[rows, columns]`` values, ``size`` pixels across (``height``: square cells)."""
    rows, cols = values.shape
    height = height or max(8, round(size * rows / max(cols, 1)))
    return (f"<div style='display:inline-block;vertical-align:top;margin-right:14px;font-size:11px'>"
            f"<div style='font-size:12px;margin-bottom:2px'><b>{html.escape(title)}</b></div>"
            f"<div style='display:flex;align-items:center'>"
            f"<div style='writing-mode:vertical-rl;transform:rotate(180deg);margin-right:2px'>{html.escape(ylabel)} "
            f"(0–{rows - 1})</div><img src='{png_uri(coloured(values, cmap, vmin, vmax))}' "
            f"style='width:{size}px;height:{height}px;image-rendering:pixelated;border:1px solid #ccc'></div>"
            f"<div style='text-align:center'>{html.escape(xlabel)} (0–{cols - 1})</div></div>")
