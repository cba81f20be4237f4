"""Running models in eval mode without leaving a trace on them."""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(*models: nn.Module):
    """Put models in eval mode (dropout off, BatchNorm on running statistics); restore every
    module's own mode afterwards."""
    saved = [{m: m.training for m in model.modules()} for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for modes in saved:
            for m, t in modes.items():
                m.train(t)
