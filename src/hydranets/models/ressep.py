"""ResSep: the paper's efficient ImageNet base network, residual blocks of separable 3x3 convolutions."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import HydraError, is_whole
from ..registry import register_model
from .backbone import Backbone, scaled


def sep_conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """Depthwise 3x3 then pointwise 1x1, with BN."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))


class SepBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(sep_conv(cin, cout, stride), nn.ReLU(inplace=True), sep_conv(cout, cout))
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


@dataclass
class ResSepPlan:
    """Init block (224 -> 56), then 4 stages of d separable residual blocks (56, 28, 14, 7)."""

    widths: tuple[int, ...] = (128, 256, 512, 1024)
    depth: int = 2
    init_width: int = 64
    in_chans: int = 3

    @property
    def num_stages(self) -> int:
        return 1 + len(self.widths)

    def build(self, index: int, in_channels: int, width: float) -> tuple[nn.Module, int]:
        if index == 0:
            mid, cout = scaled(self.init_width // 2, width), scaled(self.init_width, width)
            return nn.Sequential(
                nn.Conv2d(in_channels, mid, 3, 2, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                sep_conv(mid, cout, 2), nn.ReLU(inplace=True)), cout
        cout = scaled(self.widths[index - 1], width)
        stride = 1 if index == 1 else 2
        blocks = [SepBlock(in_channels if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(self.depth)]
        return nn.Sequential(*blocks), cout

    def build_final(self, channels: int) -> nn.Module:
        return nn.Identity()


@register_model
def ressep(num_classes: int = 1000, widths: tuple[int, ...] = (128, 256, 512, 1024), depth: int = 2,
           width: float = 1.0, in_chans: int = 3) -> Backbone:
    """ResSep for 224x224 input; ``widths`` per stage and ``depth`` (d) blocks per stage are settings."""
    if not widths or not is_whole(depth):
        raise HydraError(f"ResSep needs at least one stage width and depth >= 1 blocks per stage, "
                         f"got widths={tuple(widths)}, depth={depth!r}")
    return Backbone(ResSepPlan(tuple(widths), depth, in_chans=in_chans), num_classes, width)
