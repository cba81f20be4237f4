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
    net = nn.Sequential(
        *block(in_ch, w), *block(w, 2 * w), nn.MaxPool2d(2), *block(2 * w, 4 * w), nn.MaxPool2d(2),
        *block(4 * w, 8 * w), nn.MaxPool2d(2), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8 * w, classes),
    )
    if not batchnorm:  # He initialisation: without BatchNorm, torch's default init shrinks activations per layer
        for m in net:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
    return net


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


def _projection(cin: int, cout: int, stride: int):
    """torchvision's shortcut projection (1×1 conv + BatchNorm) where the shape changes, else None."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: in-place ``out += identity``, 1×1-conv + BN downsample, and one
    ``ReLU(inplace=True)`` module called twice (``separate_relus=True`` gives the second call its own
    module, ``relu2``, so every hook name fires once)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, separate_relus: bool = False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True) if separate_relus else None
        self.downsample = _projection(cin, cout, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return (self.relu2 or self.relu)(out)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (expansion 4) with a projection shortcut where shapes change."""

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _projection(cin, cout, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """A torchvision-style ResNet: ``stages`` is a list of ``(block, count, width, stride)``.

    ``stem="imagenet"`` is conv7×7/2 + max pool (ResNet-18: 11,689,512 parameters with 1000
    classes); ``stem="cifar"`` a conv3×3. ``[batch, 3, H, W] -> [batch, classes]``.
    """

    def __init__(self, stages, stem_width: int = 64, classes: int = 1000, stem: str = "imagenet", **block_kw):
        super().__init__()
        big = stem == "imagenet"
        self.conv1 = nn.Conv2d(3, stem_width, 7 if big else 3, 2 if big else 1, 3 if big else 1, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if big else nn.Identity()
        cin = stem_width
        for i, (block, count, width, stride) in enumerate(stages):
            blocks = []
            for j in range(count):
                blocks.append(block(cin, width, stride if j == 0 else 1, **block_kw))
                cin = width * (4 if block is Bottleneck else 1)
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.n_stages = len(stages)
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(cin, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(classes: int = 1000) -> ResNet:
    """torchvision's ResNet-18 layout (random weights)."""
    return ResNet([(BasicBlock, 2, w, 1 if i == 0 else 2) for i, w in enumerate((64, 128, 256, 512))], 64, classes)


def mlp(d_in: int, widths=(128, 128), classes: int = 10, act: str = "relu") -> nn.Sequential:
    """Flatten → (Linear → act)* → Linear. ``[batch, *input] -> [batch, classes]``."""
    layers, d = [nn.Flatten()], d_in
    for w in widths:
        layers += [nn.Linear(d, w), _act(act)]
        d = w
    return nn.Sequential(*layers, nn.Linear(d, classes))
