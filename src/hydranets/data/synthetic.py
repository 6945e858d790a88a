"""A small learnable image set made from a seed: for smoke tests and trying the tools without data."""
from __future__ import annotations

import torch

from .image_dataset import ImageDataset


def synthetic_splits(num_classes: int = 10, train_per_class: int = 40, test_per_class: int = 10, size: int = 16,
                     channels: int = 3, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Each class is a fixed random template plus noise; classes 2j and 2j+1 share half their template,
    so there is a structure of similar classes for the partition to find."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(num_classes // 2 + 1, channels, size, size, generator=g)
    own = torch.rand(num_classes, channels, size, size, generator=g)
    templates = 0.5 * base[torch.arange(num_classes) // 2] + 0.5 * own

    def split(per_class: int) -> ImageDataset:
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        noise = 0.25 * torch.randn(len(labels), channels, size, size, generator=g)
        images = ((templates[labels] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
        return ImageDataset(images, labels, [f"class{c}" for c in range(num_classes)], (0.5,) * channels,
                            (0.25,) * channels)

    return split(train_per_class), split(test_per_class)
