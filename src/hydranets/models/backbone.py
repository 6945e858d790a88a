"""The staged backbone that every model family builds on, and that the HydraNet template splits."""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn

from ..errors import HydraError, is_positive_real, is_whole, reason


class StagePlan(Protocol):
    """How a family builds its stages. Stage 0 is the init block; the last stage feeds the head.

    ``build(i, in_channels, width)`` returns stage ``i`` as a module and its output channels, with the
    family's widths scaled by ``width`` (use :func:`scaled`): the template calls it to make narrower copies
    of stages for the branches and the gate, and cannot check that a stage really narrows.
    ``build_final(channels)`` returns what runs on the last stage's features before the pool (a norm and
    activation, or ``nn.Identity()``); it must keep the channel count it is given (checked when a model is
    built), so a layer that changes channels belongs at the end of the last stage.
    Every Conv/BatchNorm/Linear is re-initialised after the plan builds it (He init, unit norms); a plan that
    keeps its own init (e.g. the last norm of each residual block at zero) defines ``init_weights(module)``,
    which then runs on the whole built network (a Backbone or a HydraNet) after that default init.
    A registered factory takes ``num_classes``, ``width`` and ``in_chans`` (training passes ``in_chans``).
    """

    num_stages: int
    in_chans: int

    def build(self, index: int, in_channels: int, width: float) -> tuple[nn.Module, int]: ...

    def build_final(self, channels: int) -> nn.Module: ...


def scaled(channels: int, width: float) -> int:
    """Channels scaled by a width multiplier, at least 1."""
    return max(1, int(round(channels * width)))


def check_plan(plan: object) -> None:
    """Refuse a plan that lacks what :class:`StagePlan` needs, before anything is built from it."""
    name = type(plan).__name__
    missing = [a for a in ("num_stages", "in_chans", "build", "build_final") if not hasattr(plan, a)]
    if missing:
        raise HydraError(f"{name} has no {', '.join(missing)}; a plan needs num_stages, in_chans, "
                         "build(index, in_channels, width) and build_final(channels) (see hydranets.StagePlan)")
    for a in ("num_stages", "in_chans"):
        if not is_whole(getattr(plan, a)):
            raise HydraError(f"{name}.{a} must be a positive integer, got {getattr(plan, a)!r} "
                             "(see hydranets.StagePlan)")
    for a in ("build", "build_final", "init_weights"):
        if hasattr(plan, a) and not callable(getattr(plan, a)):
            raise HydraError(f"{name}.{a} must be a method, got {type(getattr(plan, a)).__name__} "
                             "(see hydranets.StagePlan)")


def build_stage(plan: StagePlan, index: int, in_channels: int, width: float) -> tuple[nn.Module, int]:
    """Stage ``index`` of ``plan``, checked to be a module and its output channels."""
    out = plan.build(index, in_channels, width)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], nn.Module) and is_whole(out[1])):
        raise HydraError(f"{type(plan).__name__}.build({index}, {in_channels}, {width}) must return (module, output "
                         f"channels), got {type(out).__name__} (see hydranets.StagePlan)")
    return out


def build_stages(plan: StagePlan, start: int, end: int, in_channels: int, width: float) -> tuple[list[nn.Module], int]:
    """Stages ``start..end-1`` of ``plan`` at ``width``, chained from ``in_channels``."""
    mods, ch = [], in_channels
    for i in range(start, end):
        m, ch = build_stage(plan, i, ch, width)
        mods.append(m)
    return mods, ch


def build_final(plan: StagePlan, channels: int) -> nn.Module:
    """``plan.build_final(channels)``, checked on a small zero feature map to keep ``channels``: the pool and the
    classifier after it are sized by them, and a mismatch would otherwise surface only in the first forward."""
    final, name = plan.build_final(channels), f"{type(plan).__name__}.build_final({channels})"
    if not isinstance(final, nn.Module):
        raise HydraError(f"{name} must return an nn.Module (nn.Identity() for none), got {type(final).__name__}")
    p = next(final.parameters(), None)
    probe = torch.zeros(1, channels, 4, 4, **({} if p is None else {"device": p.device, "dtype": p.dtype}))
    modes = [(m, m.training) for m in final.modules()]
    final.eval()
    try:
        with torch.no_grad():
            out = final(probe)
    except Exception as e:  # noqa: BLE001  (the plan's own module: any failure is the plan's)
        raise HydraError(f"{name} fails on a (1, {channels}, 4, 4) feature map ({reason(e)}); it must take the last "
                         "stage's features and keep their channels") from None
    finally:
        for m, training in modes:
            m.training = training
    got = out.shape[1] if isinstance(out, torch.Tensor) and out.dim() == 4 else None
    if got != channels:
        what = f"{got} channels" if got is not None else "no (N, C, H, W) feature map"
        raise HydraError(f"{name} gives {what}; build_final must keep the channel count it is given (put a layer "
                         "that changes channels at the end of the last stage instead)")
    return final


def check_input(x: torch.Tensor, in_chans: int) -> None:
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise HydraError(f"expected input of shape (N, {in_chans}, H, W), got {tuple(x.shape)}")


def init_weights(module: nn.Module, plan: StagePlan | None = None) -> None:
    """He init for convolutions, unit BN, small linear layers; then the plan's own ``init_weights``, if it has one."""
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
    if hasattr(plan, "init_weights"):
        plan.init_weights(module)


class Backbone(nn.Module):
    """A plain classifier: stages, final norm, global average pool, linear classifier.

    The plan is checked as it builds (see :class:`StagePlan`); its Conv/BatchNorm/Linear layers are then
    re-initialised, followed by the plan's own ``init_weights(module)`` where it defines one.
    """

    def __init__(self, plan: StagePlan, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        if not is_positive_real(width):
            raise HydraError(f"width must be a positive number (a multiplier of the family's widths), got {width!r}")
        check_plan(plan)
        self.plan = plan
        self.width = width
        self.in_chans = plan.in_chans
        stages, ch = [], plan.in_chans
        self.stage_channels: list[int] = []
        for i in range(plan.num_stages):
            m, ch = build_stage(plan, i, ch, width)
            stages.append(m)
            self.stage_channels.append(ch)
        self.stages = nn.ModuleList(stages)
        self.final = build_final(plan, ch)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = ch
        self.fc = nn.Linear(ch, num_classes)
        init_weights(self, plan)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_chans)
        for s in self.stages:
            x = s(x)
        return self.pool(self.final(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))
