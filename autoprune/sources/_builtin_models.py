"""Small built-in models sized for the built-in data (8x8 digits, 28x28 MNIST).

They exercise the couplings that make structured pruning hard: residual adds (``resnet_tiny``)
and depthwise convolutions with inverted residuals (``mobilenet_tiny``).
"""

from __future__ import annotations

from torch import Tensor, nn

from autoprune.sources._models import register_model


def _cbr(cin: int, cout: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


@register_model
def tiny_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 32) -> nn.Module:
    """Three conv-BN-ReLU blocks and a linear head: the simplest chain to prune."""
    return nn.Sequential(
        _cbr(in_channels, width), _cbr(width, 2 * width, stride=2),
        _cbr(2 * width, 4 * width, stride=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes),
    )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetTiny(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...],
                 blocks: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            layers = [BasicBlock(cin if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1)
                      for j in range(blocks)]
            stages.append(nn.Sequential(*layers))
            cin = w
        self.layer1, self.layer2, self.layer3 = (stages + [nn.Identity()] * 3)[:3]
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


@register_model
def resnet_tiny(in_channels: int = 1, num_classes: int = 10, width: int = 32,
                blocks: int = 1) -> nn.Module:
    """A 3-stage ResNet (widths w, 2w, 4w): residual adds couple the convs of each stage."""
    return ResNetTiny(in_channels, num_classes, (width, 2 * width, 4 * width), blocks)


@register_model
def resnet8(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> nn.Module:
    """ResNet-8 for 28x28 inputs (the classic CIFAR-style small ResNet, 3 stages of 1 block)."""
    return ResNetTiny(in_channels, num_classes, (width, 2 * width, 4 * width), blocks=1)


@register_model
def resnet14(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> nn.Module:
    """ResNet-14: 3 stages of 2 basic blocks."""
    return ResNetTiny(in_channels, num_classes, (width, 2 * width, 4 * width), blocks=2)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return x + out if self.use_res else out


@register_model
def mobilenet_tiny(in_channels: int = 1, num_classes: int = 10, width: int = 16,
                   expand: int = 4) -> nn.Module:
    """MobileNetV2-style: depthwise convs and inverted residuals, the hardest couplings."""
    cfg = [(width, 1), (width, 1), (2 * width, 2), (2 * width, 1), (4 * width, 2)]
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                               nn.BatchNorm2d(width), nn.ReLU6(inplace=True)]
    cin = width
    for cout, stride in cfg:
        layers.append(InvertedResidual(cin, cout, stride, expand))
        cin = cout
    layers += [nn.Conv2d(cin, 8 * width, 1, bias=False), nn.BatchNorm2d(8 * width),
               nn.ReLU6(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(nn.Sequential(*layers), nn.Linear(8 * width, num_classes))
