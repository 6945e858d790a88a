"""Your own backbone as a HydraNet: a small VGG described as a StagePlan, registered by name, split by the template.

Run ``python examples/custom_backbone.py`` (CPU, a few seconds, no downloads). With ``model.modules=[mynets]`` the
command line imports such a module before it builds ``model.name``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

import hydranets
from hydranets.cost import model_macs


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


@dataclass
class VGGPlan:
    """Stage 0: one 3x3 conv; stages 1 and 2: two 3x3 convs, then a 2x2 max-pool."""

    widths: tuple[int, ...] = (16, 32, 64)
    in_chans: int = 3

    @property
    def num_stages(self) -> int:
        return len(self.widths)

    def build(self, index: int, in_channels: int, width: float) -> tuple[nn.Module, int]:
        cout = hydranets.scaled(self.widths[index], width)  # the branches and the gate are narrower copies
        if index == 0:
            return conv_bn_relu(in_channels, cout), cout
        return nn.Sequential(conv_bn_relu(in_channels, cout), conv_bn_relu(cout, cout), nn.MaxPool2d(2)), cout

    def build_final(self, channels: int) -> nn.Module:
        return nn.Identity()  # it must keep the channel count: a layer that changes it ends the last stage


@hydranets.register_model
def vgg_tiny(num_classes: int = 10, width: float = 1.0, in_chans: int = 3) -> hydranets.Backbone:
    """A 3-stage VGG for 32x32 input."""
    return hydranets.Backbone(VGGPlan(in_chans=in_chans), num_classes, width)


def main() -> None:
    torch.manual_seed(0)
    num_branches, x = 4, torch.randn(16, 3, 32, 32)
    print(f"vgg_tiny registered: {hydranets.list_models('vgg_*')}")
    hydra = hydranets.build_hydranet("vgg_tiny", num_classes=10, num_branches=num_branches, topk=1)
    print(f"HydraNet: stem of {len(hydra.stem)} stages, {hydra.num_branches} branches of the last stage, "
          f"top-{hydra.topk}")

    hydra.train()
    logits = hydra(x)  # soft routing: every branch, weighted by the gate
    logits.logsumexp(1).mean().backward()
    print(f"soft (train) logits {tuple(logits.shape)}")

    hydra.eval()
    with torch.no_grad():
        out = hydra(x, return_gate=True)  # top-k routing: each image runs only its chosen branch
    print(f"top-1 (eval) logits {tuple(out.logits.shape)}, images per branch "
          f"{torch.bincount(out.route[:, 0], minlength=num_branches).tolist()}")

    for k in (1, num_branches):
        print(f"MACs/image at k={k}: {model_macs(hydra, (3, 32, 32), topk=k) / 1e6:.2f}M")

    fast, pairs = hydranets.fold_batchnorms(hydra)
    with torch.no_grad():
        same = torch.allclose(fast(x), hydra(x), atol=1e-4)
    print(f"folded {pairs} batch norms; logits match: {same}")


if __name__ == "__main__":
    main()
