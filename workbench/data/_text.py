"""Templated English sentences with token-level concepts."""
from __future__ import annotations

from typing import Optional

import torch

from .._errors import InvalidOptionError
from .._random import SeedLike, as_seed
from ._dataset import IGNORE_INDEX, ConceptDataset
from ._vocab import decode, encode, tokenize  # noqa: F401 (re-exported)

PAD, BOS = "<pad>", "<bos>"
WORDS = {
    "colour": ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "brown", "pink"],
    "number": ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"],
    "country": ["france", "japan", "brazil", "kenya", "canada", "india", "norway", "egypt", "peru", "chile"],
    "animal": ["cat", "dog", "horse", "bird", "fox", "wolf", "mouse", "goose"],
    "animals": ["cats", "dogs", "horses", "birds", "foxes", "wolves", "mice", "geese"],
    "object": ["box", "hat", "ball", "cup", "kite", "book"],
    "objects": ["boxes", "hats", "balls", "cups", "kites", "books"],
    "verb": ["lives", "live", "likes", "like", "sees", "see", "chase", "chases", "finds", "find", "sleeps",
             "saw", "has", "have"],
    "function": ["the", "a", "my", "in", "to", "from", "and", "is", "are", "i", "do", "near", "there"],
    "punctuation": [".", ",", "!", "?"],
}
VOCAB = [PAD, BOS] + [w for ws in WORDS.values() for w in ws]
TEMPLATES = [
    "the {colour} {animal} lives in {country} .",
    "{number} {colour} {animals} live near {country} !",
    "i saw {number} {animals} and a {colour} {object} in {country} .",
    "my {animal} likes the {colour} {object} .",
    "do {number} {animals} like {colour} {objects} ?",
    "in {country} , the {animal} sees {number} {objects} .",
    "{country} has one {colour} {animal} and {number} {objects} .",
    "are the {animals} from {country} {colour} ?",
    "the {animals} chase a {colour} {object} , and the {animal} sleeps .",
    "one {animal} finds {number} {colour} {objects} in {country} !",
]
# Token-level concepts: word classes, then the position concept (set from the layout, not the word).
SENTENCE_CONCEPTS = ["colour", "number", "country", "animal", "plural_noun", "verb", "punctuation", "first_word"]
_CLASS_OF = {"colour": ["colour"], "number": ["number"], "country": ["country"], "animal": ["animal", "animals"],
             "plural_noun": ["animals", "objects"], "verb": ["verb"], "punctuation": ["punctuation"]}
_SEQ_LEN = 1 + max(len(t.split()) for t in TEMPLATES)  # BOS + the longest template


def next_token_targets(inputs: torch.Tensor, pad_id: Optional[int]) -> torch.Tensor:
    """``labels[:, t] = inputs[:, t + 1]``; ``IGNORE_INDEX`` at the end and wherever the next is padding."""
    labels = torch.full_like(inputs, IGNORE_INDEX)
    labels[:, :-1] = inputs[:, 1:]
    if pad_id is not None:
        labels[labels == pad_id] = IGNORE_INDEX
    return labels


def sentences(n: int, seed: SeedLike = 0) -> ConceptDataset:
    """Templated English sentences with token-level concepts, for probing transformers.

    Each row is ``<bos>`` followed by one sentence (10 templates; slots filled at random) and padding.
    Concepts per token: ``colour``, ``number`` (number words), ``country``, ``animal`` (singular or
    plural), ``plural_noun``, ``verb``, ``punctuation``, ``first_word`` (the token after ``<bos>``).
    Padding and ``<bos>`` carry no concept.

    Args:
        n: number of sentences (> 0).
        seed: same seed, same sentences.

    Returns:
        ``inputs`` int64 ``[n, T]`` (T = 14), padded with ``meta["pad_id"]`` (0); ``labels`` int64
        ``[n, T]`` next-token targets, -100 (``IGNORE_INDEX``) where there is none; ``concepts`` bool
        ``[n, T, 8]``; ``vocab`` the word list (``ds.encode``/``ds.decode`` convert).

    Example:
        >>> ds = sentences(3, seed=0)
        >>> ds.inputs.shape[0], ds.decode(ds.inputs[0]).startswith("<bos>")
        (3, True)
        >>> words = [ds.vocab[int(t)] for t in ds.inputs[ds.concept("colour")]]
        >>> all(w in WORDS["colour"] for w in words)
        True
    """
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise InvalidOptionError(f"n must be a positive int (number of sentences); got n={n!r}.")
    seed = as_seed(seed)
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(len(TEMPLATES), (n,), generator=g).tolist()
    fills = torch.randint(10**6, (n, _SEQ_LEN), generator=g).tolist()  # one draw per slot
    index = {w: i for i, w in enumerate(VOCAB)}
    inputs = torch.zeros(n, _SEQ_LEN, dtype=torch.long)  # PAD is 0
    for row, (t, draw) in enumerate(zip(which, fills)):
        words = [BOS] + [WORDS[w[1:-1]][draw[j] % len(WORDS[w[1:-1]])] if w.startswith("{") else w
                         for j, w in enumerate(TEMPLATES[t].split())]
        inputs[row, : len(words)] = torch.tensor([index[w] for w in words])

    table = torch.zeros(len(VOCAB), len(SENTENCE_CONCEPTS), dtype=torch.bool)  # [V, K] word -> classes
    for k, concept in enumerate(SENTENCE_CONCEPTS[:-1]):
        for cls in _CLASS_OF[concept]:
            table[[index[w] for w in WORDS[cls]], k] = True
    concepts = table[inputs]                                                  # [n, T, K]
    concepts[:, 1, -1] = True                                                 # first_word
    meta = dict(generator="sentences", seed=seed, pad_id=0, bos_id=1, templates=TEMPLATES,
                task="next-token prediction (labels are next-token targets, -100 = ignore)")
    return ConceptDataset(inputs, next_token_targets(inputs, 0), label_names=VOCAB,
                          concept_names=SENTENCE_CONCEPTS, concepts=concepts, vocab=VOCAB, meta=meta)


def retokenize(ds: ConceptDataset, tokenizer, length: Optional[int] = None) -> ConceptDataset:
    """The sentences of ``ds`` (from :func:`sentences`) in a Hugging Face tokenizer's word pieces.

    Each row becomes ``[CLS] pieces… [SEP]`` padded with the tokenizer's pad id to ``length`` (default:
    the longest row; the model attends to the padding, the same way in every model compared); every
    piece inherits its word's concepts, special tokens and padding carry none. This is how the shipped
    sentences reach MiniLM (``wb.zoo.load("minilm").tokenizer``). ``labels`` is None: an encoder has
    no next-token task here.

    Returns:
        ``inputs`` int64 ``[n, length]``, ``concepts`` bool ``[n, length, K]`` (K as in ``ds``),
        ``meta["pad_id"]`` the tokenizer's pad id, ``meta["pieces"]`` the real (non-pad) length per row.
    """
    if ds.vocab is None or ds.concepts.ndim != 3:
        raise InvalidOptionError("retokenize needs a token-level text data set such as wb.data.sentences(n).")
    cls_id, sep_id, pad_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    if None in (cls_id, sep_id, pad_id):
        raise InvalidOptionError(f"retokenize needs a tokenizer with [CLS], [SEP] and [PAD] tokens (a BERT-style "
                                 f"encoder's); {type(tokenizer).__name__} lacks one.")
    n, T, K = ds.concepts.shape
    pieces_of = {}  # word -> its pieces, tokenised once
    rows = []
    for i in range(n):
        ids, labels = [cls_id], [torch.zeros(K, dtype=torch.bool)]
        for t in range(T):
            word = ds.vocab[int(ds.inputs[i, t])]
            if word in (PAD, BOS):
                continue
            if word not in pieces_of:
                pieces_of[word] = tokenizer(word, add_special_tokens=False)["input_ids"]
            ids += pieces_of[word]
            labels += [ds.concepts[i, t]] * len(pieces_of[word])
        rows.append((ids + [sep_id], labels[1:]))
    longest = max(len(ids) for ids, _ in rows)
    length = longest if length is None else length
    if length < longest:
        raise InvalidOptionError(f"length={length} is too short: the longest sentence needs {longest} tokens with "
                                 f"[CLS] and [SEP]; pass length>={longest} (or None).")
    inputs = torch.full((n, length), pad_id, dtype=torch.long)
    concepts = torch.zeros(n, length, K, dtype=torch.bool)
    for i, (ids, labels) in enumerate(rows):
        inputs[i, :len(ids)] = torch.tensor(ids)
        if labels:
            concepts[i, 1:len(ids) - 1] = torch.stack(labels)
    lengths = [len(ids) for ids, _ in rows]
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    meta = dict(ds.meta, retokenized_by=type(tokenizer).__name__, pad_id=pad_id, pieces=lengths)
    return ConceptDataset(inputs, None, label_names=vocab, concept_names=ds.concept_names, concepts=concepts,
                          vocab=vocab, meta=meta)
