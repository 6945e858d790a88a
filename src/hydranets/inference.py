"""Preparing a trained model for fast inference: batch norms folded into the convolutions before them.

In evaluation a batch norm is a fixed per-channel affine map, so a convolution followed by one equals a
single convolution with scaled weights and a bias. Folding removes a pass over every feature map: 1.2-1.4x
the images/s of the narrow ResNet-8s and their HydraNets measured here (benchmarks/RESULTS.md, "Batch
norms folded").
"""
from __future__ import annotations

import copy

import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def _layers(seq: nn.Sequential) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, layer) for each layer a Sequential runs, in order, looking inside nested Sequentials."""
    out = []
    for name, m in seq.named_children():
        out += _layers(m) if type(m) is nn.Sequential else [(seq, name, m)]
    return out


def fold_batchnorms(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``model`` in eval mode in which every ``Conv2d`` that a ``BatchNorm2d`` directly follows
    (in a Sequential, nested ones included) is replaced by one convolution computing both; the batch norm
    becomes an identity. Returns the copy and how many pairs were folded.

    The copy computes the same function as ``model.eval()`` (to float rounding) and is for inference
    only: training it would train the folded weights, not the batch norms. Batch norms after a
    nonlinearity, or without running statistics, stay as they are; the model itself is not changed.
    """
    folded = copy.deepcopy(model).eval()
    count = 0
    for seq in [m for m in folded.modules() if type(m) is nn.Sequential]:
        layers = _layers(seq)
        for (conv_parent, conv_name, conv), (bn_parent, bn_name, bn) in zip(layers, layers[1:]):
            if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None:
                setattr(conv_parent, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(bn_parent, bn_name, nn.Identity())
                count += 1
    return folded, count
