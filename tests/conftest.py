import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from hypothesis import settings
from torch import nn

# CI explores the same examples every run (a red CI must be reproducible); locally they vary.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


from workbench.models import ensure_torchvision_importable, has_hooked_transformer  # noqa: E402,F401

# Tests that import transformers directly (it imports torchvision when installed) need torchvision
# importable first; see workbench/models/_compat.py.
ensure_torchvision_importable()
from models import BasicBlock as Block, randomise as randomise_bn  # noqa: E402  (shared test models)


@pytest.fixture
def resnet_block_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                        Block(8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    return randomise_bn(net).eval()


@pytest.fixture
def images():
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def make_transformer(act_fn: str = "gelu", seed: int = 0, **cfg):
    """A tiny TransformerLens model: a HookedTransformer on 3.x, a TransformerBridge on 4.x."""
    base = dict(d_model=32, d_head=8, n_heads=4, n_layers=2, n_ctx=16, d_vocab=40, act_fn=act_fn,
                seed=seed, normalization_type="LN")
    base.update(cfg)
    if has_hooked_transformer():
        import warnings

        from transformer_lens import HookedTransformer, HookedTransformerConfig

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return HookedTransformer(HookedTransformerConfig(**base))
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_native(TransformerBridgeConfig(**base))
