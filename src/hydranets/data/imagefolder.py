"""Image-folder data sets of any image size (e.g. ImageNet), decoded lazily in DataLoader workers.

Crops are done with Pillow and the result is a uint8 CHW tensor, so no torchvision is needed;
normalisation belongs on the device, after the batch has been moved there.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from ..errors import HydraError, reason

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
RESIZE_RATIO = 256 / 224


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise HydraError("image folders need Pillow: pip install pillow") from None
    return Image


class ImageFolderDataset(Dataset):
    """``root/<split>/<class>/*.{jpg,jpeg,png}``: classes are the sorted sub-folder names.

    Training items get a random-resized crop (scale 0.08-1, aspect 3/4-4/3) to ``image_size`` and a
    random horizontal flip; test items are resized so the shorter side is ``image_size * 256/224`` and
    centre-cropped. Items are ``(uint8 (3, image_size, image_size) tensor, label)``. An item's crop and
    flip are a function of ``(seed, epoch, index)`` alone, so a resumed run, or one with another number
    of workers, augments every image as the continuous run did.
    """

    def __init__(self, root: str | Path, split: str = "train", image_size: int = 224, train: bool | None = None,
                 scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 seed: int = 0) -> None:
        self.root = Path(root).expanduser()
        self.seed = int(seed)
        self.epoch = 0
        self.split = split
        folder = self.root / split
        if not folder.is_dir():
            raise HydraError(f"image folder {folder} not found; root= must hold {split}/<class>/<images>")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise HydraError(f"image_size must be a positive whole number, got {image_size!r}")
        self.image_size = image_size
        self.train = split == "train" if train is None else bool(train)
        self.scale = scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
        if not self.classes:
            raise HydraError(f"image folder {folder} has no class sub-folders; put images in {folder}/<class>/")
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            files = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            self.samples += [(p, label) for p in files]
        if not self.samples:
            raise HydraError(f"image folder {folder} holds no .jpg/.jpeg/.png images")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        image = _pil()
        try:
            with image.open(path) as im:
                if not self.train:
                    shorter = round(self.image_size * RESIZE_RATIO)
                    factor = shorter / min(im.size)
                    im.draft("RGB", (max(1, round(im.size[0] * factor)), max(1, round(im.size[1] * factor))))
                im = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - any decoder failure becomes one message naming the file
            raise HydraError(f"cannot decode image {path}: {type(e).__name__}: {reason(e)}; "
                             "replace or delete the file") from None
        out = self._train_crop(im, self._item_generator(i)) if self.train else self._test_crop(im)
        return torch.from_numpy(np.asarray(out, dtype=np.uint8).transpose(2, 0, 1).copy()), label

    def _item_generator(self, i: int) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, self.epoch, int(i)]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(state) & (2**63 - 1))

    def _train_crop(self, im: Any, g: torch.Generator) -> Any:
        w, h = im.size
        area = w * h
        box = None
        for _ in range(10):
            target = area * float(torch.empty(1).uniform_(*self.scale, generator=g))
            aspect = math.exp(float(torch.empty(1).uniform_(*self.log_ratio, generator=g)))
            cw = round(math.sqrt(target * aspect))
            ch = round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
                left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
                box = (left, top, left + cw, top + ch)
                break
        if box is None:
            lo, hi = math.exp(self.log_ratio[0]), math.exp(self.log_ratio[1])
            if w / h < lo:
                cw, ch = w, round(w / lo)
            elif w / h > hi:
                cw, ch = round(h * hi), h
            else:
                cw, ch = w, h
            left, top = (w - cw) // 2, (h - ch) // 2
            box = (left, top, left + cw, top + ch)
        image = _pil()
        out = im.resize((self.image_size, self.image_size), image.Resampling.BILINEAR, box=box)
        if bool(torch.randint(0, 2, (1,), generator=g)):
            out = out.transpose(image.Transpose.FLIP_LEFT_RIGHT)
        return out

    def _test_crop(self, im: Any) -> Any:
        return resize_center_crop(im, round(self.image_size * RESIZE_RATIO), self.image_size)


def resize_center_crop(im: Any, shorter: int, size: int) -> Any:
    """A Pillow image with its shorter side resized to ``shorter`` (bilinear), then its centre ``size`` x ``size``."""
    w, h = im.size
    if w <= h:
        nw, nh = shorter, max(shorter, round(h * shorter / w))
    else:
        nw, nh = max(shorter, round(w * shorter / h)), shorter
    return resize_crop_centre(im, (nw, nh), (size, size))


def resize_crop_centre(im: Any, resized: tuple[int, int], crop: tuple[int, int]) -> Any:
    """A Pillow image resized (bilinear) to ``resized`` (width, height), then its centre ``crop`` (width, height)."""
    im = im.resize(resized, _pil().Resampling.BILINEAR)
    left, top = (resized[0] - crop[0]) // 2, (resized[1] - crop[1]) // 2
    return im.crop((left, top, left + crop[0], top + crop[1]))


def _worker_message(message: str) -> str:
    """A HydraError's own line out of torch's re-raise of it from a worker: "Caught HydraError in DataLoader worker
    process N.", then the worker's traceback, whose last line is ``hydranets.errors.HydraError: <message>``."""
    last = message.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


class _FolderLoader(DataLoader):
    """A DataLoader that reports a worker's HydraError as its one line, without torch's copy of the worker's
    traceback."""

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from super().__iter__()
        except HydraError as e:
            if "\n" not in str(e):
                raise
            raise HydraError(_worker_message(str(e))) from None


class EpochSampler(RandomSampler):
    """A shuffle whose order in epoch ``e`` depends only on ``seed`` and ``e`` once ``set_epoch(e)`` is called.

    It owns its generator, apart from the DataLoader's (which seeds the workers once, when the first
    iterator is made), so a run resumed in a fresh process shuffles exactly as the continuous run did.
    """

    def __init__(self, data_source: Dataset, seed: int = 0) -> None:
        self.seed = int(seed)
        super().__init__(data_source, generator=torch.Generator().manual_seed(self.seed))

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + int(epoch))


def make_imagefolder_loader(root: str | Path, split: str, batch_size: int, image_size: int = 224, workers: int = 4,
                            train: bool | None = None, seed: int = 0, drop_last: bool | None = None,
                            pin_memory: bool = False, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A DataLoader over an image folder yielding (uint8 (B, 3, S, S) images, int64 labels).

    Decoding runs in ``workers`` processes, started for each epoch so that they see the data set's epoch.
    Training shuffles with an :class:`EpochSampler`, or with a DistributedSampler that shards the data
    when ``world_size > 1``; call ``loader.sampler.set_epoch(epoch)`` and set ``loader.dataset.epoch`` each
    epoch (:meth:`FolderBatches.set_epoch` does both) for an order and crops that a resumed run repeats.
    """
    dataset = ImageFolderDataset(root, split, image_size, train, seed=seed)
    shuffle = dataset.train
    drop = dataset.train if drop_last is None else drop_last
    generator = torch.Generator().manual_seed(int(seed))
    sampler: DistributedSampler | EpochSampler | None = None
    if world_size > 1:
        if not 0 <= rank < world_size:
            raise HydraError(f"rank={rank} is invalid for world_size={world_size}; need 0 <= rank < world_size")
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                     drop_last=drop)
    elif shuffle:
        sampler = EpochSampler(dataset, seed)
    return _FolderLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                         drop_last=drop, generator=generator)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FolderBatches:
    """An image folder as normalised float batches on ``device``: the interface of :class:`BatchLoader`.

    Decoding and random-resized-crop run in worker processes; normalisation runs on the device.
    ``set_epoch`` reseeds the shuffle and the crops, so a resumed run sees the same batches.
    """

    def __init__(self, root: str | Path, split: str, batch_size: int, train: bool, image_size: int = 224,
                 workers: int = 4, seed: int = 0, device: str | torch.device = "cpu", rank: int = 0,
                 world_size: int = 1, channels_last: bool = True) -> None:
        self.device = torch.device(device)
        self.seed = seed
        self.loader = make_imagefolder_loader(root, split, batch_size, image_size, workers, train, seed,
                                              pin_memory=self.device.type == "cuda", rank=rank,
                                              world_size=world_size)
        self.classes: list[str] = self.loader.dataset.classes
        self.channels_last = channels_last
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255

    def set_epoch(self, epoch: int) -> None:
        """Make this epoch's order and crops a function of (seed, epoch) alone, whatever epochs came before."""
        self.loader.dataset.epoch = int(epoch)
        if isinstance(self.loader.sampler, (DistributedSampler, EpochSampler)):
            self.loader.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
            yield x.contiguous(memory_format=fmt), y.to(self.device, non_blocking=True)
