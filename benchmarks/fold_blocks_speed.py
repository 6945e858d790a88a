"""Images/s of a MobileNet-style net with hand-written inverted-residual blocks, as trained and with its batch norms
folded (the blocks' conv -> batch norm pairs are found by tracing with torch.fx), side by side.

    python benchmarks/fold_blocks_speed.py [--batch-size 64] [--repeats 7] [--threads N]

The net (48 batch norms: 6 after a Sequential's conv, 42 in 14 blocks whose forward calls them by hand) gets
random batch-norm statistics, as training leaves them; both models are timed in fp32 on the same random 32x32
batch in interleaved rounds (medians), after checking that they compute the same logits.
"""
from __future__ import annotations

import argparse
import torch
import torch.nn as nn
import torch.nn.functional as F

import hydranets
from hydranets.cost import compare_speed


class Block(nn.Module):
    """An inverted residual block as users write it: pointwise, depthwise, projection, each with its batch norm."""

    def __init__(self, c: int, affine: bool = True) -> None:
        super().__init__()
        self.pw = nn.Conv2d(c, 4 * c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4 * c, affine=affine)
        self.dw = nn.Conv2d(4 * c, 4 * c, 3, padding=1, groups=4 * c, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * c)
        self.pj = nn.Conv2d(4 * c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn3(self.pj(F.relu6(self.bn2(self.dw(F.relu6(self.bn1(self.pw(x))))))))


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())


class MobilePlan:
    """A MobileNet-like net for 32x32 input: per stage a (strided) conv-bn, then inverted residual blocks."""

    widths = (16, 24, 32, 64, 96, 160)
    blocks = (1, 2, 3, 3, 3, 2)
    strides = (1, 1, 2, 2, 2, 1)
    in_chans = 3

    @property
    def num_stages(self) -> int:
        return len(self.widths)

    def build(self, index: int, in_channels: int, width: float) -> tuple[nn.Module, int]:
        c = hydranets.scaled(self.widths[index], width)
        stage = [conv_bn(in_channels, c, self.strides[index])] + [Block(c) for _ in range(self.blocks[index])]
        return nn.Sequential(*stage), c

    def build_final(self, channels: int) -> nn.Module:
        return nn.Identity()


def mobile_net(num_classes: int = 10) -> hydranets.Backbone:
    """48 batch norms: 6 after a Sequential's conv, 42 in the 14 blocks."""
    return hydranets.Backbone(MobilePlan(), num_classes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = mobile_net()
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.1)
    net.eval()
    folded, pairs = hydranets.fold_batchnorms(net)
    x = torch.randn(args.batch_size, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(folded(x), net(x), atol=1e-4, rtol=1e-4)
    speed = compare_speed({"as trained": (net, {}), "folded": (folded, {})}, (3, 32, 32), args.batch_size,
                          repeats=args.repeats, images=x, channels_last=False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, fp32, contiguous, "
          f"medians of {args.repeats} interleaved repeats; {pairs} of 48 batch norms folded")
    for name, s in speed.items():
        print(f"{name:>11}: {s['images_per_s']:8.0f} images/s  {s['latency_ms']:7.1f} ms/batch  (spread {s['spread']:.2f}x)")
    print(f"folded / as trained: {speed['folded']['images_per_s'] / speed['as trained']['images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
