"""Showing examples: image thumbnails for CNNs, highlighted token contexts for transformers, strips for vectors."""
from __future__ import annotations

import html
from typing import Optional, Sequence

import numpy as np
import torch

from ._pixels import coloured, png_uri


def kind_of(inputs: torch.Tensor) -> str:
    """``"tokens"`` (integer ``[N, T]``), ``"images"`` (``[N, C, H, W]``) or ``"vectors"`` (anything else)."""
    if not inputs.is_floating_point() and inputs.ndim == 2:
        return "tokens"
    if inputs.ndim == 4 and inputs.shape[1] in (1, 3):
        return "images"
    return "vectors"


def _displayable(images: torch.Tensor) -> np.ndarray:
    """``[k, C, H, W]`` -> ``uint8 [k, H, W, 3]``; images outside [0, 1] are min-max scaled each."""
    x = images.detach().float()
    lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    outside = (lo < 0) | (hi > 1)
    x = torch.where(outside, (x - lo) / (hi - lo).clamp_min(1e-12), x)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _strips(vectors: torch.Tensor) -> np.ndarray:
    """``[k, ...]`` -> ``uint8 [k, 1, D, 3]``: each example a one-pixel-high strip in viridis, scaled jointly."""
    x = vectors.reshape(len(vectors), -1).double().numpy()
    return coloured(x, "viridis", float(x.min()), float(x.max()))[:, None]


def example_rows_html(rows: Sequence[tuple[str, torch.Tensor, Sequence[str]]], kind: str, size: int = 72) -> str:
    """Rows of thumbnails with captions, for ``(title, examples [k, ...], captions)`` each.

    Images are shown as they are; vectors (``kind="vectors"``) as colour strips. Encoding small PNGs
    and letting the browser lay them out (``image-rendering: pixelated`` keeps pixels sharp) takes a
    few milliseconds, where a matplotlib grid of the same took most of a second.
    """
    parts = []
    for title, examples, captions in rows:
        pixels = _displayable(examples) if kind == "images" else _strips(examples)
        height = size if kind == "images" else 16
        cells = "".join(
            f"<figure style='display:inline-block;margin:0 6px 0 0;text-align:center'>"
            f"<img src='{png_uri(p)}' style='width:{size}px;height:{height}px;image-rendering:pixelated'>"
            f"<figcaption style='font-size:11px;color:#555'>{html.escape(str(c))}</figcaption></figure>"
            for p, c in zip(pixels, captions))
        parts.append(f"<div style='margin-bottom:6px'><div style='font-size:12px'><b>{html.escape(title)}</b></div>{cells}</div>")
    return "".join(parts)


def token_contexts_html(rows: Sequence[tuple[str, torch.Tensor, torch.Tensor, Sequence[str]]],
                        vocab: Optional[Sequence[str]], width: int = 12) -> str:
    """Highlighted token contexts: for each ``(title, tokens [k, T], activations [k, T], captions)``.

    Each example is shown around its most active position (``width`` tokens either side); a token's
    background is as orange as its activation is high relative to the row's largest, and the peak
    token is bold. Token ids without a vocabulary are shown as numbers.
    """
    parts = []
    for title, tokens, acts, captions in rows:
        acts = acts.double()
        top = max(acts.max().item(), 1e-12)
        lines = []
        for seq, act, caption in zip(tokens.tolist(), acts, captions):
            peak = int(act.argmax())
            lo, hi = max(0, peak - width), min(len(seq), peak + width + 1)
            spans = []
            for p in range(lo, hi):
                word = vocab[seq[p]] if vocab is not None and 0 <= seq[p] < len(vocab) else str(seq[p])
                alpha = float(min(max(act[p].item() / top, 0.0), 1.0))
                weight = "bold" if p == peak else "normal"
                spans.append(f"<span title='{act[p].item():.3g}' style='background:rgba(255,140,0,{alpha:.2f});"
                             f"font-weight:{weight};padding:0 2px'>{html.escape(word)}</span>")
            lines.append(f"<div style='font-family:monospace;white-space:nowrap'><span style='color:#888'>"
                         f"{html.escape(str(caption))}</span> {' '.join(spans)}</div>")
        parts.append(f"<div><b>{html.escape(title)}</b>{''.join(lines)}</div>")
    return "".join(parts)
