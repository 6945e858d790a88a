"""What a trained model expects of an image, kept in its checkpoint so that it can classify image files.

A model trained here sees images of one size, normalised with its data set's mean and std, and answers
with indices into that data set's class names. :class:`InputSpec` records those, and
:func:`read_images` prepares image files the way the run's test images were: the shorter side resized to
``resize``, the centre ``size`` x ``size`` cropped, in the run's channels (for a data set of non-square
images, ``height`` x ``size``: each file scaled to just cover that, then its centre cropped).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import HydraError, reason
from .image_dataset import ImageDataset
from .imagefolder import IMAGE_SUFFIXES, _pil, resize_center_crop, resize_crop_centre


@dataclass
class InputSpec:
    """Class names, per-channel mean and std (of pixel values in 0..1), and the test-time resize and crop:
    ``size`` is the crop's width, and its height too unless ``height`` is given (non-square images)."""

    classes: list[str]
    mean: list[float]
    std: list[float]
    resize: int
    size: int
    height: int | None = None

    @property
    def in_chans(self) -> int:
        return len(self.mean)

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the images the model takes."""
        return (self.size if self.height is None else self.height), self.size

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict; ``height`` only for non-square images (square ones keep the older format)."""
        d = asdict(self)
        if d["height"] is None:
            del d["height"]
        return d

    @classmethod
    def of_dataset(cls, ds: "ImageDataset") -> "InputSpec":
        """The spec of an in-memory data set, whose images are all of the size a model then sees."""
        height, width = ds.images.shape[-2:]
        return cls(list(ds.classes), list(ds.mean), list(ds.std), width, width, None if height == width else height)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InputSpec":
        """The spec saved by :meth:`to_dict`; one saved before ``height`` existed is square."""
        height = d.get("height")
        return cls([str(c) for c in d["classes"]], [float(x) for x in d["mean"]], [float(x) for x in d["std"]],
                   int(d["resize"]), int(d["size"]), None if height is None else int(height))


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
    height, width = spec.shape
    out = []
    for f in files:
        try:
            with image.open(f) as im:
                factor = _scale(im.size, spec)  # a JPEG decodes at a reduced scale if that still covers it
                im.draft(mode, (max(1, round(im.size[0] * factor)), max(1, round(im.size[1] * factor))))
                im = im.convert(mode)
        except Exception as e:  # noqa: BLE001 - any decoder failure becomes one message naming the file
            raise HydraError(f"cannot decode image {f}: {type(e).__name__}: {reason(e)}") from None
        if spec.height is None:
            im = resize_center_crop(im, spec.resize, spec.size)
        else:  # scaled just to cover height x width
            factor = _scale(im.size, spec)
            resized = (max(width, round(im.size[0] * factor)), max(height, round(im.size[1] * factor)))
            im = resize_crop_centre(im, resized, (width, height))
        arr = np.asarray(im, dtype=np.uint8)
        out.append(torch.from_numpy(arr.reshape(height, width, -1).transpose(2, 0, 1).copy()))
    return torch.stack(out)


def _scale(image_size: tuple[int, int], spec: InputSpec) -> float:
    """The factor that scales an image of (width, height) ``image_size`` as the spec's test images were."""
    if spec.height is None:
        return spec.resize / min(image_size)
    return max(spec.size / image_size[0], spec.height / image_size[1])
