"""Context managers for building a model whose every parameter is overwritten at once: work such a build
does that nothing keeps is skipped (shared by the layout backend's rebuilds, ``_layout.py``, and the
Hugging Face bridges' boots, ``_hf.py``)."""
from __future__ import annotations

import torch


class _no_random_init:
    """Skip ``torch.nn.init``'s random fills while a model is built whose every parameter is then
    overwritten (``write_weights`` checks that): they were 40% of rebuilding a GPT-2-sized bridge."""

    NAMES = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
             "xavier_normal_", "orthogonal_", "zeros_", "ones_", "constant_")

    def __enter__(self):
        self.saved = {n: getattr(torch.nn.init, n) for n in self.NAMES}
        for n in self.NAMES:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)

    def __exit__(self, *exc):
        for n, fn in self.saved.items():
            setattr(torch.nn.init, n, fn)


class _hidden:
    """Hide a class's property while a model is built. A bridge's hook scan reads every public
    attribute and keeps only the hook points; ``W_E_pos`` is a concatenated copy of the embeddings
    (157 MB for GPT-2 small), made twice per boot and thrown away: 10-20% of the boot, and the peak
    memory of a transform."""

    def __init__(self, cls: type, name: str):
        self.cls, self.name = cls, name

    def __enter__(self):
        self.saved = self.cls.__dict__.get(self.name)
        if isinstance(self.saved, property):
            setattr(self.cls, self.name, property(self._missing))

    def _missing(self, obj):
        raise AttributeError(f"{self.name} is hidden while the model is built")

    def __exit__(self, *exc):
        if isinstance(self.saved, property):
            setattr(self.cls, self.name, self.saved)
