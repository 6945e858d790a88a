"""The staged backbone that every model family builds on, and that the HydraNet template splits."""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn

from ..errors import HydraError, is_positive_real


class StagePlan(Protocol):
    """How a family builds its stages. Stage 0 is the init block; the last stage feeds the head.

    ``build(i, in_channels, width)`` returns stage ``i`` as a module and its output channels, with the
    family's widths scaled by ``width``: the template calls it to make narrower copies of stages.
    """

    num_stages: int
    in_chans: int

    def build(self, index: int, in_channels: int, width: float) -> tuple[nn.Module, int]: ...

    def build_final(self, channels: int) -> nn.Module: ...


def scaled(channels: int, width: float) -> int:
    """Channels scaled by a width multiplier, at least 1."""
    return max(1, int(round(channels * width)))


def build_stages(plan: StagePlan, start: int, end: int, in_channels: int, width: float) -> tuple[list[nn.Module], int]:
    """Stages ``start..end-1`` of ``plan`` at ``width``, chained from ``in_channels``."""
    mods, ch = [], in_channels
    for i in range(start, end):
        m, ch = plan.build(i, ch, width)
        mods.append(m)
    return mods, ch


def check_input(x: torch.Tensor, in_chans: int) -> None:
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise HydraError(f"expected input of shape (N, {in_chans}, H, W), got {tuple(x.shape)}")


def init_weights(module: nn.Module) -> None:
    """He init for convolutions, unit BN, small linear layers."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)


class Backbone(nn.Module):
    """A plain classifier: stages, final norm, global average pool, linear classifier."""

    def __init__(self, plan: StagePlan, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        if not is_positive_real(width):
            raise HydraError(f"width must be a positive number (a multiplier of the family's widths), got {width!r}")
        self.plan = plan
        self.width = width
        self.in_chans = plan.in_chans
        stages, ch = [], plan.in_chans
        self.stage_channels: list[int] = []
        for i in range(plan.num_stages):
            m, ch = plan.build(i, ch, width)
            stages.append(m)
            self.stage_channels.append(ch)
        self.stages = nn.ModuleList(stages)
        self.final = plan.build_final(ch)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = ch
        self.fc = nn.Linear(ch, num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_chans)
        for s in self.stages:
            x = s(x)
        return self.pool(self.final(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))
