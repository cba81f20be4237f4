"""Concept data sets with known labels and masks: procedural images, digits, templated and synthetic text.

Every generator returns a ``ConceptDataset``; the same seed gives identical tensors.
"""
from ._dataset import IGNORE_INDEX, ConceptDataset
from ._digits import digits
from ._language import synthetic_language, unigram_entropy
from ._shapes import shapes
from ._text import decode, encode, retokenize, sentences

__all__ = ["IGNORE_INDEX", "ConceptDataset", "decode", "digits", "encode", "retokenize", "sentences", "shapes",
           "synthetic_language", "unigram_entropy"]
