"""The named in-memory data sets: :data:`DATASET_NAMES` and :data:`SPLITS`, and :func:`load_dataset` and
:func:`load_splits`, which check the name and the split and hand the work to that family's reader
(:mod:`.cifar`, :mod:`.fashion_mnist`, :mod:`.tiny_imagenet`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import HydraError
from .cifar import CIFAR_URLS, _cifar_folder, _load_cifar
from .fashion_mnist import _load_fashion_mnist
from .image_dataset import ImageDataset
from .tiny_imagenet import _load_tiny_imagenet

DATASET_NAMES = ("cifar10", "cifar100", "tiny-imagenet", "fashion-mnist")
SPLITS = ("train", "test")


def load_dataset(name: str, split: str = "train", root: str | Path | None = None, download: bool = False,
                 classes: int | None = None, cache_dir: str | Path | None = None) -> ImageDataset:
    """Load one split of a named data set into memory.

    ``root`` is where the official files are (defaults: the cache folder; for Fashion-MNIST also
    ``/usr/share/datasets/fashion-mnist``); ``classes=N`` keeps only the first N classes;
    ``cache_dir`` holds downloads and decoded arrays.
    """
    key = _dataset_key(name)
    split = _split_key(split)
    if key == "tiny-imagenet":
        return _load_tiny_imagenet(root, cache_dir, classes, (split,))[split]
    if key in CIFAR_URLS:
        ds = _load_cifar(key, split, _cifar_folder(key, root, download, cache_dir))
    else:
        ds = _load_fashion_mnist(split, root, download, cache_dir)
    return ds if classes is None else ds.first_classes(classes)


def load_splits(name: str, root: str | Path | None = None, download: bool = False, classes: int | None = None,
                cache_dir: str | Path | None = None) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) of a data set; Tiny-ImageNet builds both in one pass over its files."""
    key = _dataset_key(name)
    if key == "tiny-imagenet":
        both = _load_tiny_imagenet(root, cache_dir, classes, SPLITS)
        return both["train"], both["test"]
    kwargs: dict[str, Any] = dict(root=root, download=download, classes=classes, cache_dir=cache_dir)
    return load_dataset(key, "train", **kwargs), load_dataset(key, "test", **kwargs)


def _dataset_key(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    key = {"tinyimagenet": "tiny-imagenet", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10",
           "cifar-100": "cifar100"}.get(key, key)
    if key not in DATASET_NAMES:
        raise HydraError(f"unknown data set {name!r}; choose one of {', '.join(DATASET_NAMES)} (data.name= also "
                         "takes synthetic and imagefolder)")
    return key


def _split_key(split: str) -> str:
    key = {"val": "test", "valid": "test", "validation": "test"}.get(str(split).lower(), str(split).lower())
    if key not in SPLITS:
        raise HydraError(f"unknown split {split!r}; use 'train' or 'test'")
    return key
