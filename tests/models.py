"""Small, non-degenerate test models: randomised biases, BatchNorm statistics and affine parameters."""
import torch
from torch import nn

from workbench.zoo import BasicBlock, BasicBlockA, Bottleneck  # the shared blocks under test


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Randomise every BatchNorm (a fresh one has γ=1, β=0, μ=0, σ²=1, which hides mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
            elif isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
    return model.eval()


def same_function(model, new, x) -> float:
    """Max relative output change, each output column against its own scale: computed here, not by the tool
    under test. Both models are put in eval mode first."""
    with torch.no_grad():
        a, b = model.eval()(x), new.eval()(x)
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    scale = a.abs().amax(0).clamp_min(1e-12 * a.abs().max())
    return ((a - b).abs() / scale).max().item()


def OptionABlock(cin, cout, stride=1):
    """A CIFAR ResNet block whose shortcut subsamples and zero-pads channels ("option A")."""
    return BasicBlockA(cin, cout, stride, "relu")


class TinyResNet(nn.Module):
    def __init__(self, block="basic", width=4, classes=3):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        if block == "basic":
            self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
            self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width))
            out = 2 * width
        elif block == "bottleneck":
            self.layer1 = nn.Sequential(Bottleneck(width, width), Bottleneck(4 * width, width))
            self.layer2 = nn.Sequential(Bottleneck(4 * width, 2 * width, 2))
            out = 8 * width
        else:
            self.layer1 = nn.Sequential(OptionABlock(width, width), OptionABlock(width, width))
            self.layer2 = nn.Sequential(OptionABlock(width, 2 * width, 2), OptionABlock(2 * width, 2 * width))
            out = 2 * width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(out, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def mlp(widths, act, bias=True, batchnorm=False, d_in=5, d_out=3, seed=0):
    torch.manual_seed(seed)
    layers, d = [], d_in
    for w in widths:
        layers.append(nn.Linear(d, w, bias=bias))
        if batchnorm:
            layers.append(nn.BatchNorm1d(w))
        layers.append(act if isinstance(act, nn.Module) else act())
        d = w
    layers.append(nn.Linear(d, d_out))
    return randomise(nn.Sequential(*layers), seed)


def cnn(channels, act, pool="max", batchnorm=True, bias=True, d_out=4, seed=0, size=8):
    """Conv → [BN] → act → [pool] stacks, then flatten (blocks of features per channel) → Linear."""
    torch.manual_seed(seed)
    layers, c, s = [], 3, size
    for i, ch in enumerate(channels):
        layers.append(nn.Conv2d(c, ch, 3, padding=1, bias=bias))
        if batchnorm:
            layers.append(nn.BatchNorm2d(ch))
        layers.append(act if isinstance(act, nn.Module) else act())
        if pool and i % 2 == 0 and s >= 4:
            layers.append(nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2))
            s //= 2
        c = ch
    layers += [nn.Flatten(), nn.Linear(c * s * s, d_out)]
    return randomise(nn.Sequential(*layers), seed)
