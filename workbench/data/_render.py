"""Notebook HTML for a ``ConceptDataset``: a sample grid as an inline PNG, or highlighted tokens.

Everything is inline (a base64 PNG, styled spans); nothing is loaded from the web.
"""
from __future__ import annotations

import base64
import html
import io

import numpy as np
import torch

from .._repr import html_table, tensor_summary

# One pastel per concept, cycled; readable behind black text.
_PALETTE = ["#fbb4ae", "#b3cde3", "#ccebc5", "#decbe4", "#fed9a6", "#ffffcc", "#e5d8bd", "#fddaec",
            "#c6dbef", "#d9f0a3", "#fcc5c0", "#dadaeb"]


def image_grid(images: torch.Tensor, ncol: int = 8, scale: int = 2, pad: int = 1) -> np.ndarray:
    """``uint8 [rows·(H+pad), ncol·(W+pad), 3]`` tiling of ``images`` ``[B, C, H, W]`` in [0, 1]."""
    x = images.detach().float().clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = x[:, :3].repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    b, _, h, w = x.shape
    rows = -(-b // ncol)
    grid = torch.ones(3, rows * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(b):
        r, c = divmod(i, ncol)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = x[i]
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def png_base64(array: np.ndarray) -> str:
    """Base64 PNG of an ``uint8 [H, W, 3]`` array (matplotlib, imported only here)."""
    from matplotlib import image as mpimg

    buf = io.BytesIO()
    mpimg.imsave(buf, array, format="png", metadata={"Software": None})  # no URL inside the file
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _concept_table(ds, limit: int = 40) -> str:
    frame = ds.to_frame()
    rows = [(r.concept, r.count, f"{r.prevalence:.3f}") for r in frame.itertuples()][:limit]
    more = f" (first {limit} of {len(frame)})" if len(frame) > limit else ""
    return html_table(["concept", "count", "prevalence"], rows, caption=f"concepts{more}")


def _header(ds) -> str:
    kind = html.escape(str(ds.meta.get("generator", "ConceptDataset")))
    return (f"<p><b>ConceptDataset</b> <code>{kind}</code> — n={len(ds)}, inputs "
            f"<code>{html.escape(tensor_summary(ds.inputs))}</code>, {len(ds.concept_names)} concepts</p>")


def images_html(ds, n: int = 16) -> str:
    shown = min(n, len(ds))
    png = png_base64(image_grid(ds.inputs[:shown], ncol=min(8, max(shown, 1))))
    labels = ""
    if ds.labels is not None and ds.labels.dim() == 1 and shown:
        names = [ds.label_names[int(y)] if int(y) < len(ds.label_names) else str(int(y)) for y in ds.labels[:shown]]
        labels = f"<p style='font-size:smaller'>labels (row by row): {html.escape(', '.join(names))}</p>"
    img = f"<img alt='first {shown} images' src='data:image/png;base64,{png}'/>"
    return f"<div>{_header(ds)}{img}{labels}{_concept_table(ds)}</div>"


def text_html(ds, n: int = 6, max_tokens: int = 40) -> str:
    colour = {name: _PALETTE[k % len(_PALETTE)] for k, name in enumerate(ds.concept_names)}
    pad = ds.meta.get("pad_id")
    lines = []
    for i in range(min(n, len(ds))):
        spans = []
        for t, tok in enumerate(ds.inputs[i, :max_tokens].tolist()):
            if tok == pad:
                break
            on = [ds.concept_names[k] for k in ds.concepts[i, t].nonzero().flatten().tolist()]
            word = html.escape(ds.vocab[tok] if ds.vocab and tok < len(ds.vocab) else str(tok))
            style = f"background:{colour[on[0]]};" if on else ""
            tip = html.escape(", ".join(on) or "no concept")
            spans.append(f"<span title='{tip}' style='{style}padding:0 2px;border-radius:3px'>{word}</span>")
        lines.append("<div style='font-family:monospace;line-height:1.8'>" + " ".join(spans) + "</div>")
    legend = " ".join(f"<span style='background:{colour[c]};padding:0 3px'>{html.escape(c)}</span>"
                      for c in ds.concept_names)
    note = "<p style='font-size:smaller'>colour = first concept of the token; hover for all. Legend: "
    return f"<div>{_header(ds)}{''.join(lines)}{note}{legend}</p>{_concept_table(ds)}</div>"


def dataset_html(ds) -> str:
    if ds.inputs.is_floating_point() and ds.inputs.dim() == 4:
        return images_html(ds)
    return text_html(ds)
