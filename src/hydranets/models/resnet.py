"""ResNets for 32x32 input: the CIFAR family (depth 6n+2) and the ResNet-18/34/50 layouts."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import HydraError
from ..registry import register_model
from .backbone import Backbone, scaled


def conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.body = nn.Sequential(conv_bn(cin, planes, 3, stride), nn.ReLU(inplace=True), conv_bn(planes, cout, 3))
        self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class Bottleneck(BasicBlock):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        nn.Module.__init__(self)
        cout = planes * self.expansion
        self.body = nn.Sequential(
            conv_bn(cin, planes, 1), nn.ReLU(inplace=True),
            conv_bn(planes, planes, 3, stride), nn.ReLU(inplace=True),
            conv_bn(planes, cout, 1))
        self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        self.act = nn.ReLU(inplace=True)


@dataclass
class ResNetPlan:
    """Init block (3x3 conv) then residual stages; stage i>1 halves the resolution."""

    blocks: tuple[int, ...]
    widths: tuple[int, ...]
    init_width: int
    block: type[BasicBlock] = BasicBlock
    in_chans: int = 3

    @property
    def num_stages(self) -> int:
        return 1 + len(self.blocks)

    def build(self, index: int, in_channels: int, width: float) -> tuple[nn.Module, int]:
        if index == 0:
            cout = scaled(self.init_width, width)
            return nn.Sequential(conv_bn(in_channels, cout, 3), nn.ReLU(inplace=True)), cout
        planes = scaled(self.widths[index - 1], width)
        stride = 1 if index == 1 else 2
        layers, ch = [], in_channels
        for j in range(self.blocks[index - 1]):
            layers.append(self.block(ch, planes, stride if j == 0 else 1))
            ch = planes * self.block.expansion
        return nn.Sequential(*layers), ch

    def build_final(self, channels: int) -> nn.Module:
        return nn.Identity()


def cifar_resnet(depth: int, num_classes: int, width: float = 1.0, in_chans: int = 3, base: int = 16) -> Backbone:
    """He et al.'s CIFAR ResNet: 3 stages of n basic blocks (depth = 6n + 2), widths base x (1, 2, 4)."""
    if depth < 8 or (depth - 2) % 6:
        raise HydraError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
    n = (depth - 2) // 6
    plan = ResNetPlan((n, n, n), (base, 2 * base, 4 * base), base, BasicBlock, in_chans)
    return Backbone(plan, num_classes, width)


def _imagenet_layout(blocks: tuple[int, ...], block: type[BasicBlock], num_classes: int, width: float,
                     in_chans: int) -> Backbone:
    plan = ResNetPlan(blocks, (64, 128, 256, 512), 64, block, in_chans)
    return Backbone(plan, num_classes, width)


@register_model
def resnet20(num_classes: int = 100, width: float = 1.0, in_chans: int = 3) -> Backbone:
    return cifar_resnet(20, num_classes, width, in_chans)


@register_model
def resnet32(num_classes: int = 100, width: float = 1.0, in_chans: int = 3) -> Backbone:
    return cifar_resnet(32, num_classes, width, in_chans)


@register_model
def resnet44(num_classes: int = 100, width: float = 1.0, in_chans: int = 3) -> Backbone:
    return cifar_resnet(44, num_classes, width, in_chans)


@register_model
def resnet56(num_classes: int = 100, width: float = 1.0, in_chans: int = 3) -> Backbone:
    return cifar_resnet(56, num_classes, width, in_chans)


@register_model
def resnet110(num_classes: int = 100, width: float = 1.0, in_chans: int = 3) -> Backbone:
    return cifar_resnet(110, num_classes, width, in_chans)


@register_model
def resnet_cifar(num_classes: int = 100, depth: int = 20, width: float = 1.0, in_chans: int = 3) -> Backbone:
    """A CIFAR ResNet of any depth 6n+2 and width multiplier."""
    return cifar_resnet(depth, num_classes, width, in_chans)


@register_model
def resnet18(num_classes: int = 100, width: float = 1.0, in_chans: int = 3) -> Backbone:
    """ResNet-18 layout for 32x32 input: 3x3 stem, no max-pool."""
    return _imagenet_layout((2, 2, 2, 2), BasicBlock, num_classes, width, in_chans)


@register_model
def resnet34(num_classes: int = 100, width: float = 1.0, in_chans: int = 3) -> Backbone:
    return _imagenet_layout((3, 4, 6, 3), BasicBlock, num_classes, width, in_chans)


@register_model
def resnet50(num_classes: int = 100, width: float = 1.0, in_chans: int = 3) -> Backbone:
    return _imagenet_layout((3, 4, 6, 3), Bottleneck, num_classes, width, in_chans)
