"""What a trained model expects of an image, kept in its checkpoint so that it can classify image files.

A model trained here sees images of one size, normalised with its data set's mean and std, and answers
with indices into that data set's class names. :class:`InputSpec` records those, and
:func:`read_images` prepares image files the way the run's test images were: the shorter side resized to
``resize``, the centre ``size`` x ``size`` cropped, in the run's channels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import HydraError
from .datasets import ImageDataset
from .imagefolder import IMAGE_SUFFIXES, _pil, resize_center_crop


@dataclass
class InputSpec:
    """Class names, per-channel mean and std (of pixel values in 0..1), and the test-time resize and crop."""

    classes: list[str]
    mean: list[float]
    std: list[float]
    resize: int
    size: int

    @property
    def in_chans(self) -> int:
        return len(self.mean)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of_dataset(cls, ds: "ImageDataset") -> "InputSpec":
        """The spec of an in-memory data set, whose images are all of the size a model then sees."""
        size = ds.images.shape[-1]
        return cls(list(ds.classes), list(ds.mean), list(ds.std), size, size)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InputSpec":
        return cls([str(c) for c in d["classes"]], [float(x) for x in d["mean"]], [float(x) for x in d["std"]],
                   int(d["resize"]), int(d["size"]))


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """The image files named, a folder standing for every .jpg/.jpeg/.png under it (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise HydraError(f"folder {p} holds no .jpg/.jpeg/.png images")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise HydraError(f"image {p} does not exist")
    if not files:
        raise HydraError("no images given; name image files or folders of them")
    return files


def read_images(files: Sequence[Path], spec: InputSpec) -> torch.Tensor:
    """(N, C, size, size) uint8 images, decoded, converted to the spec's channels, resized and centre-cropped."""
    image = _pil()
    mode = {1: "L", 3: "RGB"}.get(spec.in_chans)
    if mode is None:
        raise HydraError(f"reading image files needs a model of 1 or 3 input channels, this one has {spec.in_chans}")
    out = []
    for f in files:
        try:
            with image.open(f) as im:
                factor = spec.resize / min(im.size)  # a JPEG decodes at a reduced scale if that still covers it
                im.draft(mode, (max(1, round(im.size[0] * factor)), max(1, round(im.size[1] * factor))))
                im = im.convert(mode)
        except Exception as e:  # noqa: BLE001 - any decoder failure becomes one message naming the file
            raise HydraError(f"cannot decode image {f}: {type(e).__name__}: {e}") from None
        arr = np.asarray(resize_center_crop(im, spec.resize, spec.size), dtype=np.uint8)
        out.append(torch.from_numpy(arr.reshape(spec.size, spec.size, -1).transpose(2, 0, 1).copy()))
    return torch.stack(out)
