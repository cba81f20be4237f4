"""The zoo's architectures: the paper's CNNs at CPU scale, MLPs, and tiny TransformerLens decoders.

Activations are modules (never functional calls) and every block is traceable by ``torch.fx``, so
``wb.symmetry_map`` finds each site, including ResNet-20's zero-padding ("option A") shortcuts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def _act(name: str) -> nn.Module:
    return ACTIVATIONS[name]()


def myrtle(width: int = 16, act: str = "relu", batchnorm: bool = True, classes: int = 10, in_ch: int = 3) -> nn.Sequential:
    """Myrtle-5 (Page 2018; the paper's §3.3/§4 CNN): conv widths w, 2w, 4w, 8w with max pools.

    ``[batch, in_ch, 32, 32] -> [batch, classes]``. The paper uses width 64; 16 trains on a CPU.
    ReLU layers (for stitching): indices of the activation modules in the Sequential.
    """
    def block(cin, cout):
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batchnorm)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(cout))
        return layers + [_act(act)]

    w = width
    return nn.Sequential(
        *block(in_ch, w), *block(w, 2 * w), nn.MaxPool2d(2), *block(2 * w, 4 * w), nn.MaxPool2d(2),
        *block(4 * w, 8 * w), nn.MaxPool2d(2), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8 * w, classes),
    )


class BasicBlockA(nn.Module):
    """CIFAR ResNet block (He et al. 2016): a stride-2 block's shortcut subsamples and zero-pads channels."""

    def __init__(self, cin: int, cout: int, stride: int, act: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = _act(act)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = _act(act)
        self.pad = (cout - cin) // 2
        self.stride = stride

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride != 1 or self.pad:
            shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return self.act2(out + shortcut)


class ResNet20(nn.Module):
    """ResNet-20 for 32×32 images (3 stages × 3 blocks, widths w, 2w, 4w; w = 16 as in the paper)."""

    def __init__(self, width: int = 16, act: str = "relu", classes: int = 10, in_ch: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.act = _act(act)
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            blocks = [BasicBlockA(cin, cout, 2 if i else 1, act)] + [BasicBlockA(cout, cout, 1, act) for _ in range(2)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x):  # [batch, in_ch, H, W] -> [batch, classes]
        x = self.act(self.bn(self.conv(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def mlp(d_in: int, widths=(128, 128), classes: int = 10, act: str = "relu") -> nn.Sequential:
    """Flatten → (Linear → act)* → Linear. ``[batch, *input] -> [batch, classes]``."""
    layers, d = [nn.Flatten()], d_in
    for w in widths:
        layers += [nn.Linear(d, w), _act(act)]
        d = w
    return nn.Sequential(*layers, nn.Linear(d, classes))
