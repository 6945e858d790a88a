"""CIFAR-10 and CIFAR-100 from the official python-version files: where they are (the extracted folder, the
.tar.gz beside it, extracted on first use, or a download from the Toronto server or ``$HYDRANETS_CIFAR_URL``,
checked against its MD5), an unpickler that admits numpy arrays and plain containers only, so a doctored file
cannot run code, and the checks that turn the pickled batches into an :class:`~hydranets.data.ImageDataset`.
"""
from __future__ import annotations

import codecs
import os
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import HydraError, reason
from .cache import _cache_root
from .download import download_file, extract_archive
from .image_dataset import ImageDataset

CIFAR_URL_ENV = "HYDRANETS_CIFAR_URL"
CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
CIFAR_MD5 = {"cifar10": "c58f30108f718f92721af3b95e74349a", "cifar100": "eb9058c3a382ffc7106e4002c42a8d85"}

_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

_CIFAR_LAYOUT = {
    "cifar10": dict(folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"], meta="batches.meta",
                    labels="labels", names="label_names"),
    "cifar100": dict(folder="cifar-100-python", archive="cifar-100-python.tar.gz", train=["train"],
                     test=["test"], meta="meta", labels="fine_labels", names="fine_label_names"),
}


def cifar_url(key: str) -> str:
    """The download address of a CIFAR archive; ``$HYDRANETS_CIFAR_URL`` replaces the server part."""
    base = os.environ.get(CIFAR_URL_ENV)
    url = CIFAR_URLS[key]
    return base.rstrip("/") + "/" + url.rsplit("/", 1)[1] if base else url


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def _cifar_folder(key: str, root: str | Path | None, download: bool, cache_dir: str | Path | None) -> Path:
    layout = _CIFAR_LAYOUT[key]
    folder, archive_name, meta = layout["folder"], layout["archive"], layout["meta"]
    base = Path(root).expanduser() if root is not None else _cache_root(cache_dir)
    if base.is_file():
        archive = base
    elif base.name == folder and (base / meta).is_file():
        return base
    else:
        archive = base / archive_name
    if (archive.parent / folder / meta).is_file():
        return archive.parent / folder
    url = cifar_url(key)
    if download:
        download_file(url, archive, md5=CIFAR_MD5[key])
    if archive.is_file():
        dest = archive.parent if os.access(archive.parent, os.W_OK) else _cache_root(cache_dir)
        if not (dest / folder / meta).is_file():
            if not _is_tar(archive):
                raise HydraError(f"{archive} is not a readable tar archive; give root= (data.root=) the CIFAR "
                                 f"python-version .tar.gz or its extracted folder, or download=True "
                                 f"(data.download=true) to fetch {url}")
            extract_archive(archive, dest, done=f"{folder}/{meta}")
        if not (dest / folder / meta).is_file():
            raise HydraError(f"{archive} does not hold {folder}/{meta}; use the official CIFAR python "
                             f"version from {url}")
        return dest / folder
    raise HydraError(f"{key}: {archive.parent / folder} not found (nor {archive.name} beside it); pass "
                     f"download=True (data.download=true) to fetch {url}, or root= (data.root=) the folder that holds {folder}/")


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only, so a doctored file cannot run code."""

    _ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
        ("multiarray", "_reconstruct"): np.zeros(1).__reduce__()[0],
        ("multiarray", "scalar"): np.float64(0).__reduce__()[0],
        ("numeric", "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0],
    }

    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                      "numpy._core.numeric"):
            module = module.rsplit(".", 1)[1]
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR file never holds")


def _read_pickle(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise HydraError(f"{path} not found; the CIFAR folder is incomplete: delete it and extract or download "
                         "the archive again (download=True, data.download=true)")
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, OSError) as e:
        raise HydraError(f"cannot read {path}: {reason(e)}; it is not a CIFAR python-version pickle or it is "
                         "damaged: get the archive again") from None
    if not isinstance(obj, dict):
        raise HydraError(f"{path} holds a {type(obj).__name__}, not the dict of a CIFAR pickle; is it the "
                         "right file?")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _key(d: dict[str, Any], key: str, path: Path) -> Any:
    if key not in d:
        raise HydraError(f"{path} has no key {key!r} (it has {sorted(d)}); is it the right CIFAR version "
                         "(python pickles) and data set?")
    return d[key]


def _int_labels(values: Any, n: int, total: int, key: str, path: Path) -> np.ndarray:
    try:
        arr = np.asarray(values)
        if arr.dtype.kind not in "iu":
            raise TypeError
    except (TypeError, ValueError):
        raise HydraError(f"{path}: key {key!r} must be a list of integer labels") from None
    if arr.shape != (n,):
        raise HydraError(f"{path}: key {key!r} holds {arr.size} labels for {n} images; the file is damaged")
    if n and (arr.min() < 0 or arr.max() >= total):
        raise HydraError(f"{path}: key {key!r} has labels from {arr.min()} to {arr.max()}, outside 0..{total - 1}; "
                         "the file is damaged or from another data set")
    return arr.astype(np.int64)


def _load_cifar(key: str, split: str, folder: Path) -> ImageDataset:
    layout = _CIFAR_LAYOUT[key]
    meta_path = folder / layout["meta"]
    meta = _read_pickle(meta_path)
    names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in _key(meta, layout["names"], meta_path)]
    coarse_total = len(meta.get("coarse_label_names", ())) or 20
    images, labels, coarse = [], [], []
    for file in layout[split]:
        path = folder / file
        d = _read_pickle(path)
        data = np.asarray(_key(d, "data", path))
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
            raise HydraError(f"{path}: key 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072) rows "
                             "(CHW order); the file is damaged or not the CIFAR python version")
        n = data.shape[0]
        images.append(data.reshape(n, 3, 32, 32))
        labels.append(_int_labels(_key(d, layout["labels"], path), n, len(names), layout["labels"], path))
        if key == "cifar100":
            coarse.append(_int_labels(_key(d, "coarse_labels", path), n, coarse_total, "coarse_labels", path))
    mean, std = _STATS[key]
    return ImageDataset(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), names,
                        mean, std, torch.from_numpy(np.concatenate(coarse)) if coarse else None)
