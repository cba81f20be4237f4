"""Entries of a Hugging Face model's canonical layout (``_hf.py``) that walking TransformerLens's component mapping does
not give: heads the mapping leaves out (BERT's pooler, classifiers, a decoder's score).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn


@dataclass(frozen=True)
class Entry:
    key: str  # bridge-layout key, e.g. "blocks.0.attn.q.weight"
    param: str  # the Hugging Face parameter's name
    transpose: bool = False  # Conv1D stores [in, out]
    strided: Optional[tuple] = None  # part of a fused tensor: (size, stride, offset) of its view


def heads(hf: nn.Module, ref: nn.Module, base: str) -> list[Entry]:
    """Heads TransformerLens's mapping leaves out, where this class's forward is known: BERT's pooler (a dense layer
    reading the first token's stream, then tanh), whose output a ``BertForSequenceClassification``'s classifier
    reads (in no site's space: an entry only so that it is copied); a token classifier and a decoder's
    sequence-classification ``score``, which read the stream (the latter after the final norm, at the last token)."""
    def present(path: str) -> bool:
        try:
            ref.get_submodule(path)
            return True
        except AttributeError:
            return False

    entries = []
    family, cls = getattr(hf.config, "model_type", None), type(hf).__name__
    pooler = "pooler.dense" if base or not getattr(hf, "base_model_prefix", "") else f"{hf.base_model_prefix}.pooler.dense"
    if family == "bert" and present(pooler):
        entries += [Entry(f"pooler.{leaf}", f"{pooler}.{leaf}") for leaf in ("weight", "bias")]
        if cls == "BertForSequenceClassification":  # reads the pooled (tanh) output, no site's space: copied as it is
            entries += [Entry(f"classifier.{leaf}", f"classifier.{leaf}") for leaf in ("weight", "bias")]
    names = dict(ref.named_parameters(remove_duplicate=False))
    own, decoder = "cls.predictions.bias", "cls.predictions.decoder.bias"
    if family == "bert" and own in names and decoder in names and names[own] is not names[decoder]:
        # an untied MLM head (tie_word_embeddings=False, as wb.untie_embeddings leaves it): the decoder adds its own
        # bias, and cls.predictions.bias (tied to it otherwise) is read by nothing; a vector over the vocabulary, which
        # no site moves: copied as it is
        entries.append(Entry("mlm_vocab.bias", own))
    if family == "bert" and cls == "BertForTokenClassification":  # a label per token, read from its stream
        entries += [Entry(f"score.{leaf}", f"classifier.{leaf}") for leaf in ("weight", "bias")]
    if family != "bert" and cls.endswith("ForSequenceClassification") and present("score"):
        entries += [Entry(f"score.{leaf}", f"score.{leaf}") for leaf, _ in ref.score.named_parameters(recurse=False)]
    if family != "bert" and cls.endswith("ForTokenClassification"):  # a label per token, read from the final stream
        head = next((h for h in ("score", "classifier") if present(h)), None)  # (GPT-2, GPT-NeoX, GPT-Neo: classifier)
        if head is not None and isinstance(ref.get_submodule(head), nn.Linear):
            entries += [Entry(f"score.{leaf}", f"{head}.{leaf}") for leaf, _ in ref.get_submodule(head).named_parameters(recurse=False)]
    return entries


