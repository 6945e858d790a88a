"""The in-memory image set that every reader returns: :class:`ImageDataset` (one uint8 (N, C, H, W) tensor, so that
:class:`~hydranets.data.BatchLoader` can index, move and augment whole batches without a per-image Python step, with
its int64 labels, class names and per-channel normalisation), :func:`channel_stats`, which computes that
normalisation from the images, and ``_check_classes``, the check of a ``classes=N`` count.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import HydraError


@dataclass
class ImageDataset:
    """A whole image set in memory: uint8 images, int64 labels and what is needed to normalise them."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    coarse_labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise HydraError("ImageDataset.images must be a uint8 tensor of shape (N, C, H, W)")
        n, c = self.images.shape[:2]
        if not isinstance(self.labels, torch.Tensor) or self.labels.shape != (n,):
            raise HydraError(f"ImageDataset.labels must be a tensor of shape ({n},) to match the images")
        self.images = self.images.contiguous()
        self.labels = self.labels.to(torch.int64).contiguous()
        self.classes = [str(x) for x in self.classes]
        self.mean = tuple(float(x) for x in self.mean)
        self.std = tuple(float(x) for x in self.std)
        if len(self.mean) != c or len(self.std) != c or min(self.std, default=1.0) <= 0:
            raise HydraError(f"ImageDataset needs {c} mean and {c} positive std values, one per channel")
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise HydraError(f"ImageDataset labels must lie in 0..{len(self.classes) - 1}, one per class name")
        if self.coarse_labels is not None:
            if self.coarse_labels.shape != (n,):
                raise HydraError(f"ImageDataset.coarse_labels must have shape ({n},) to match the images")
            self.coarse_labels = self.coarse_labels.to(torch.int64).contiguous()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def first_classes(self, n: int) -> "ImageDataset":
        """The images of classes 0..n-1 only, in their original order (labels keep their values)."""
        _check_classes(n, self.num_classes, "classes")
        if n == self.num_classes:
            return self
        keep = self.labels < n
        coarse = self.coarse_labels[keep] if self.coarse_labels is not None else None
        return ImageDataset(self.images[keep], self.labels[keep], self.classes[:n], self.mean, self.std, coarse)


def _check_classes(classes: object, total: int, what: str) -> int:
    if isinstance(classes, bool) or not isinstance(classes, (int, np.integer)) or not 1 <= int(classes) <= total:
        raise HydraError(f"{what}={classes!r} is invalid: pass a whole number from 1 to {total}")
    return int(classes)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images in [0, 1] units, summed in float64."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64)
        total += x.sum((0, 2, 3))
        squares += x.square().sum((0, 2, 3))
    count = max(images.shape[0] * images.shape[2] * images.shape[3], 1)
    mean = total / count / 255.0
    std = (squares / count / 255.0**2 - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())
