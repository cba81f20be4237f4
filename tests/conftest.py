import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from torch import nn


class Block(nn.Module):
    """A post-activation residual block the way torchvision writes it: one ReLU module, in place,
    called twice, and ``out += identity`` overwriting the BatchNorm output."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


@pytest.fixture
def resnet_block_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                        Block(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    return randomise_bn(net).eval()


@pytest.fixture
def images():
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def has_hooked_transformer() -> bool:
    """True on TransformerLens 3.x, where ``HookedTransformer`` still exists."""
    try:  # 4.x raises ImportError (not AttributeError) for the removed name
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


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
