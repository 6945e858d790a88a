"""Fashion-MNIST from its idx files, gzipped or not: looked for under ``root``, Debian's copy
(``/usr/share/datasets/fashion-mnist``, package dataset-fashion-mnist) and the cache folder, or downloaded from
the Zalando server or ``$HYDRANETS_FASHION_MNIST_URL`` and checked against its MD5; :func:`read_idx` reads one
idx file, checking its header against its size.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import HydraError, reason
from .cache import _cache_root
from .download import download_file
from .image_dataset import ImageDataset

FASHION_MNIST_URL_ENV = "HYDRANETS_FASHION_MNIST_URL"
FASHION_MNIST_URL = "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")

_STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
}

_FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _fashion_file(name: str, dirs: Sequence[Path], download: bool, download_dir: Path) -> Path:
    for d in dirs:
        for candidate in (d / name, d / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    base = os.environ.get(FASHION_MNIST_URL_ENV) or FASHION_MNIST_URL
    url = base.rstrip("/") + f"/{name}.gz"
    if download:
        return download_file(url, download_dir / f"{name}.gz", md5=FASHION_MNIST_MD5.get(f"{name}.gz"))
    where = " or ".join(str(d) for d in dirs)
    raise HydraError(f"fashion-mnist: {name}.gz not found in {where}; pass download=True (data.download=true), "
                     "install the Debian package (apt-get install dataset-fashion-mnist), or pass root= (data.root=) "
                     "the folder with the idx files")


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read an idx file of unsigned bytes (MNIST format, optionally gzipped), checking header and size."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise HydraError(f"cannot read {path}: {reason(e)}; the file is damaged or truncated, get it again") from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise HydraError(f"{path} is truncated: {len(raw)} bytes, shorter than the idx header; get it again")
    if raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] != ndim:
        raise HydraError(f"{path} is not an idx file of bytes with {ndim} dimension(s) (magic {raw[:4].hex()}, "
                         f"expected 0000080{ndim}); is it the right file?")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected, got = int(np.prod(dims)), len(raw) - header
    if got != expected:
        what = "truncated" if got < expected else "too long"
        raise HydraError(f"{path} is {what}: {got} data bytes where its header {'x'.join(map(str, dims))} "
                         f"promises {expected}; get the file again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _load_fashion_mnist(split: str, root: str | Path | None, download: bool,
                        cache_dir: str | Path | None) -> ImageDataset:
    own = _cache_root(cache_dir) / "fashion-mnist"
    dirs = [Path(root).expanduser()] if root is not None else [FASHION_MNIST_ROOT, own]
    image_file, label_file = (_fashion_file(n, dirs, download, dirs[0] if root is not None else own)
                              for n in _FASHION_FILES[split])
    images = read_idx(image_file, 3)
    labels = read_idx(label_file, 1)
    if labels.shape[0] != images.shape[0]:
        raise HydraError(f"{label_file} has {labels.shape[0]} labels for the {images.shape[0]} images of "
                         f"{image_file}; the two files do not belong together")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise HydraError(f"{label_file} has label {labels.max()}, outside 0..{len(FASHION_MNIST_CLASSES) - 1}; "
                         "the file is damaged or from another data set")
    mean, std = _STATS["fashion-mnist"]
    return ImageDataset(torch.from_numpy(images[:, None]), torch.from_numpy(labels.astype(np.int64)),
                        list(FASHION_MNIST_CLASSES), mean, std)
