"""DenseNet-BC for 32x32 input (Huang et al.): bottleneck layers and compressing transitions."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import HydraError, is_whole
from ..registry import register_model
from .backbone import Backbone, scaled


def bn_relu_conv(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, k, 1, k // 2, bias=False))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(bn_relu_conv(cin, 4 * growth, 1), bn_relu_conv(4 * growth, growth, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


@dataclass
class DenseNetPlan:
    """Init conv, then dense blocks; every block but the last ends with a transition (1x1 conv, pool)."""

    layers_per_block: int
    growth: int
    num_blocks: int = 3
    compression: float = 0.5
    in_chans: int = 3

    @property
    def num_stages(self) -> int:
        return 1 + self.num_blocks

    def build(self, index: int, in_channels: int, width: float) -> tuple[nn.Module, int]:
        growth = scaled(self.growth, width)
        if index == 0:
            return nn.Conv2d(in_channels, 2 * growth, 3, 1, 1, bias=False), 2 * growth
        layers, ch = [], in_channels
        for _ in range(self.layers_per_block):
            layers.append(DenseLayer(ch, growth))
            ch += growth
        if index < self.num_blocks:
            out = int(ch * self.compression)
            layers += [bn_relu_conv(ch, out, 1), nn.AvgPool2d(2)]
            ch = out
        return nn.Sequential(*layers), ch

    def build_final(self, channels: int) -> nn.Module:
        return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


@register_model
def densenet_bc(num_classes: int = 100, depth: int = 100, growth: int = 12, width: float = 1.0,
                in_chans: int = 3) -> Backbone:
    """DenseNet-BC of depth 6n+4 and growth rate k."""
    if depth < 10 or (depth - 4) % 6:
        raise HydraError(f"DenseNet-BC depth must be 6n+4 (40, 100, 190, ...), got {depth}")
    if not is_whole(growth):
        raise HydraError(f"DenseNet-BC growth rate must be a positive integer, got {growth!r}")
    return Backbone(DenseNetPlan((depth - 4) // 6, growth, in_chans=in_chans), num_classes, width)


@register_model
def densenet_bc_100_k12(num_classes: int = 100, width: float = 1.0, in_chans: int = 3) -> Backbone:
    return densenet_bc(num_classes, 100, 12, width, in_chans)


@register_model
def densenet_bc_40_k12(num_classes: int = 100, width: float = 1.0, in_chans: int = 3) -> Backbone:
    return densenet_bc(num_classes, 40, 12, width, in_chans)
