"""Streaming random bases: the activations seen in many random bases, a bounded chunk at a time.

A basis is a group element M; activations in that basis are ``X Mᵀ`` (each example x ↦ M x, what
``M.act(x, dim=-1)`` does). Several bases are stacked side by side into one matrix product
``X @ [M₁ᵀ | M₂ᵀ | …]`` so small layers still use the BLAS well, and a chunk holds at most
``budget`` bytes of projected activations, so peak memory does not grow with the number of bases.
"""
from __future__ import annotations

import zlib
from typing import Callable, Iterator, Optional

import torch

from .._threads import threads
from ..groups import Group

#: bytes of projected activations (and their ranks) one chunk of bases may hold
CHUNK_BYTES = 48 * 2 ** 20


def family_generator(seed: int, group: Group) -> torch.Generator:
    """A generator per (seed, family): adding a family to a test leaves the others' bases unchanged."""
    # modulo 2**63: an effective seed may be any 63-bit int (workbench._random); small seeds are unchanged
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(group.name.encode()) % 1_000_003) % 2**63)


def chunk_size(n_rows: int, d: int, n_bases: int, budget: int = CHUNK_BYTES) -> int:
    # ~4 float64 copies live at once per projected column: the product, its sort, the order, the ranks
    return max(1, min(n_bases, budget // max(1, 4 * 8 * n_rows * d)))


def projected(X: torch.Tensor, group: Group, n_bases: int, generator: torch.Generator, *,
              budget: int = CHUNK_BYTES, bar=None) -> Iterator[tuple[torch.Tensor, int]]:
    """Yield ``(X_rot [N, c·d], c)``: X in c fresh random bases of ``group``, ``n_bases`` in all.

    Column block b of ``X_rot`` holds X in the b-th basis of the chunk. ``X_rot`` is a view of a
    buffer that the next chunk overwrites: compute what you need from it before asking for more.
    Elements are turned into float64 matrices; for a scaled permutation each output is one exact
    product plus exact zeros, so statistics invariant under the group come out bit-identical. Which
    bases come out does not depend on the chunk size (which depends on the data's shape): the groups'
    ``sample_many`` draws the same elements, to rounding, however a batch is split.
    ``bar``: a progress bar (``workbench._progress.progress_bar``) advanced by each chunk's bases.
    """
    N, d = X.shape
    c = chunk_size(N, d, n_bases, budget)
    Xt = X.T.contiguous()  # [d, N]: products come out as [c·d, N], the layout rank sorting wants
    # One buffer each for the stacked matrices and the product, refilled chunk after chunk. A fresh
    # product per chunk was allocated while the consumer still held the last one, and the heap's
    # holes then fell differently every chunk: peak RSS crept up with the number of bases.
    Wt, prod = torch.empty(c * d, d, dtype=X.dtype), torch.empty(c * d, N, dtype=X.dtype)
    done = 0
    while done < n_bases:
        m = min(c, n_bases - done)
        with threads(1):
            for b, e in enumerate(group.sample_many(m, generator)):
                Wt[b * d:(b + 1) * d] = e.matrix(X.dtype)
        torch.matmul(Wt[:m * d], Xt, out=prod[:m * d])
        yield prod[:m * d].T, m  # = X @ [M₁ᵀ | … | M_mᵀ], a transposed view
        done += m
        if bar is not None:
            bar.update(m)


def null_distribution(X: torch.Tensor, Y: Optional[torch.Tensor], group: Group, n_bases: int, seed: int,
                      stat: Callable[[torch.Tensor, Optional[torch.Tensor], int], torch.Tensor], *,
                      bar=None, check: Optional[Callable[[Optional[str]], None]] = None) -> torch.Tensor:
    """``[n_bases, K]``: ``stat`` (per-chunk: ``(X_rot, Y, c) -> [c, K]``) over random bases of ``group``.
    ``check(None)`` is called before each chunk, as ``unit_activations`` does before each batch (the
    widgets' cancel point); ``bar`` advances by the bases done, as in :func:`projected`."""
    gen = family_generator(seed, group)
    # filled in place: a list of per-chunk results left one small long-lived block per basis in the
    # heap, often inside a freed 20 MB buffer, which the next chunk then could not reuse
    out, done = None, 0
    for XB, m in projected(X, group, n_bases, gen, bar=bar):
        if check is not None:
            check(None)
        part = stat(XB, Y, m)
        if out is None:
            out = part.new_empty((n_bases, *part.shape[1:]))
        out[done:done + m] = part
        done += m
    return out
