"""Small shared helpers for notebook reprs: byte sizes, tensor summaries, HTML tables."""
from __future__ import annotations

import html
from typing import Iterable, Sequence

import torch

from ._errors import InvalidOptionError

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float) -> str:
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def parse_bytes(value) -> int:
    """Bytes from an int or a string such as ``"512MB"``, ``"4 GiB"`` or ``"2g"``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise InvalidOptionError(f"a memory size must be positive; got {value!r}.")
        return int(value)
    if isinstance(value, str):
        import re

        m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?b?)\s*", value.lower())
        if m:
            scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2)]
            return int(float(m.group(1)) * scale)
    raise InvalidOptionError(f"a memory size must be a number of bytes or a string like '4GB' or '512MiB'; got {value!r}.")


_SHORT_DTYPE = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
                torch.int64: "i64", torch.int32: "i32", torch.bool: "bool", torch.uint8: "u8"}


def tensor_summary(t: torch.Tensor) -> str:
    """``f32[64,128] ≈0.12 ±0.98 [-3.1, 4.2]`` — the way treescope summarises an array."""
    dt = _SHORT_DTYPE.get(t.dtype, str(t.dtype).replace("torch.", ""))
    shape = ",".join(map(str, t.shape))
    if t.numel() == 0 or not (t.is_floating_point()):
        return f"{dt}[{shape}]"
    x = t.detach().float()
    return f"{dt}[{shape}] ≈{x.mean():.3g} ±{x.std(unbiased=False):.3g} [{x.min():.3g}, {x.max():.3g}]"


def html_table(header: Sequence[str], rows: Iterable[Sequence], caption: str = "") -> str:
    head = "".join(f"<th style='text-align:left'>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td style='text-align:left'>{html.escape(str(c))}</td>" for c in row) + "</tr>"
        for row in rows
    )
    cap = f"<caption style='text-align:left'><b>{html.escape(caption)}</b></caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
