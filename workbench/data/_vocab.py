"""Word-level text: tokenising, and ids to and from a vocabulary (no data set needed)."""
from __future__ import annotations

import re
from typing import Optional, Sequence, Union

import torch

from .._errors import UnknownNameError, nearest

#: the label of a position with no next-token target (PyTorch's cross-entropy ignores it)
IGNORE_INDEX = -100


def tokenize(text: str) -> list[str]:
    """Lower-cased words and punctuation marks: ``"The cat."`` -> ``["the", "cat", "."]``."""
    return re.findall(r"<\w+>|\w+|[^\w\s]", text.lower())


def encode(text: Union[str, Sequence[str]], vocab: Sequence[str]) -> torch.Tensor:
    """Token ids ``int64 [T]`` of a string (tokenised with ``tokenize``) or a list of tokens."""
    tokens = tokenize(text) if isinstance(text, str) else list(text)
    index = {w: i for i, w in enumerate(vocab)}
    for t in tokens:
        if t not in index:
            near = nearest(t, vocab, n=3)
            tip = f" Did you mean {' or '.join(map(repr, near))}?" if near else ""
            raise UnknownNameError(f"token {t!r} is not in the vocabulary ({len(vocab)} tokens).{tip}")
    return torch.tensor([index[t] for t in tokens], dtype=torch.long)


def decode(ids, vocab: Sequence[str], pad_id: Optional[int] = None) -> Union[str, list[str]]:
    """Tokens of ``ids`` ``[T]`` joined by spaces (a list of strings for ``[N, T]``); padding and
    ``IGNORE_INDEX`` dropped."""
    ids = torch.as_tensor(ids)
    if ids.dim() == 2:
        return [decode(row, vocab, pad_id) for row in ids]
    return " ".join(vocab[i] for i in ids.tolist() if i != pad_id and i != IGNORE_INDEX)
