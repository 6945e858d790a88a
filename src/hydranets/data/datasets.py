"""In-memory uint8 image data sets read from their official files: CIFAR-10/100, Tiny-ImageNet, Fashion-MNIST.

Everything is held as one uint8 (N, C, H, W) tensor so that :class:`~hydranets.data.BatchLoader` can
index, move and augment whole batches without a per-image Python step.
"""
from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import multiprocessing
import os
import pickle
import re
import struct
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..errors import HydraError
from .download import download_file, extract_archive, progress_bar

DATASET_NAMES = ("cifar10", "cifar100", "tiny-imagenet", "fashion-mnist")
SPLITS = ("train", "test")

CIFAR_URL_ENV = "HYDRANETS_CIFAR_URL"
FASHION_MNIST_URL_ENV = "HYDRANETS_FASHION_MNIST_URL"
CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
CIFAR_MD5 = {"cifar10": "c58f30108f718f92721af3b95e74349a", "cifar100": "eb9058c3a382ffc7106e4002c42a8d85"}
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
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
_CACHE_VERSION = 1
POOL_MIN_IMAGES = 2000


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


def default_cache_dir() -> Path:
    """Where downloads and decoded caches go: ``$HYDRANETS_CACHE`` or ``~/.cache/hydranets``."""
    env = os.environ.get("HYDRANETS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hydranets"


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


def _check_classes(classes: object, total: int, what: str) -> int:
    if isinstance(classes, bool) or not isinstance(classes, (int, np.integer)) or not 1 <= int(classes) <= total:
        raise HydraError(f"{what}={classes!r} is invalid: pass a whole number from 1 to {total}")
    return int(classes)


def _cache_root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


# --------------------------------------------------------------------------------------------- CIFAR

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
        raise HydraError(f"cannot read {path}: {e}; it is not a CIFAR python-version pickle or it is "
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


# ------------------------------------------------------------------------------------- Fashion-MNIST

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
        raise HydraError(f"cannot read {path}: {e}; the file is damaged or truncated, get it again") from None
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


# ------------------------------------------------------------------------------------- Tiny-ImageNet

def _tiny_source(root: str | Path | None, cache_dir: str | Path | None) -> Path:
    """The archive file or the folder that holds ``wnids.txt``."""
    base = Path(root).expanduser() if root is not None else _cache_root(cache_dir)
    if base.is_file():
        return base
    for folder in (base, base / "tiny-imagenet-200"):
        if (folder / "wnids.txt").is_file():
            return folder
    if base.is_dir():
        archives = sorted(p for p in base.iterdir() if p.name.startswith("tiny-imagenet")
                          and p.name.endswith((".tar.gz", ".tgz", ".tar")))
        if archives:
            return archives[0]
    raise HydraError(f"tiny-imagenet: no tiny-imagenet-200/ folder or tiny-imagenet*.tar.gz at {base}; pass "
                     "root= (data.root=) the extracted folder, its parent or the archive (it cannot be downloaded)")


def _source_key(source: Path) -> str:
    """A short hash that changes whenever the archive, or any text or image file of the folder, changes."""
    source = source.resolve()
    stamps = [source]
    if source.is_dir():
        stamps += [source / "wnids.txt", source / "val" / "val_annotations.txt", source / "train"]
    parts = [str(source), str(_CACHE_VERSION)]
    for p in stamps:
        if p.exists():
            st = p.stat()
            parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    if source.is_dir():
        parts.append(_folder_images_digest(source))
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def _folder_images_digest(folder: Path) -> str:
    """Name, size and mtime of every image and of words.txt, so an edit inside the tree invalidates the cache.

    Only directory entries are listed and stat-ed (no file is read): about half a second for the 110k images.
    """
    digest = hashlib.sha1()
    dirs = [f"train/{d.name}/images" for d in _scandir(folder / "train") if d.is_dir()] + ["val/images"]
    for rel in sorted(dirs):
        rows = []
        for entry in _scandir(folder / rel):
            if _is_image(entry.name):
                try:
                    st = entry.stat()
                except OSError:
                    continue
                rows.append(f"{rel}/{entry.name}:{st.st_size}:{st.st_mtime_ns}\n")
        digest.update("".join(sorted(rows)).encode())
    words = folder / "words.txt"
    if words.is_file():
        st = words.stat()
        digest.update(f"words.txt:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def _scandir(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _cache_file(cache: Path, key: str, split: str, classes: int | None) -> Path:
    return cache / "tiny-imagenet" / f"{split}-{'all' if classes is None else classes}-{key}.npz"


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        warnings.warn(f"cannot write the decoded-image cache {path} ({e}); the next load decodes again",
                      stacklevel=3)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _from_cache(path: Path) -> ImageDataset | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return ImageDataset(torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]),
                                [str(c) for c in z["classes"]], tuple(z["mean"].tolist()), tuple(z["std"].tolist()))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, HydraError) as e:
        warnings.warn(f"ignoring the damaged cache file {path} ({e}); decoding again", stacklevel=3)
        return None


def _to_cache_arrays(ds: ImageDataset) -> dict[str, np.ndarray]:
    return {"images": ds.images.numpy(), "labels": ds.labels.numpy(), "classes": np.array(ds.classes, dtype=str),
            "mean": np.array(ds.mean), "std": np.array(ds.std)}


def _load_tiny_imagenet(root: str | Path | None, cache_dir: str | Path | None, classes: int | None,
                        splits: Sequence[str]) -> dict[str, ImageDataset]:
    if classes is not None:
        _check_classes(classes, 1 << 30, "classes")
    source = _tiny_source(root, cache_dir)
    cache = _cache_root(cache_dir)
    key = _source_key(source)
    found = {s: _from_cache(_cache_file(cache, key, s, classes)) for s in splits}
    if all(ds is not None for ds in found.values()):
        return found  # type: ignore[return-value]
    built = _build_tiny_imagenet(source, classes)
    for split, ds in built.items():
        _save_npz(_cache_file(cache, key, split, classes), _to_cache_arrays(ds))
    missing = [s for s in splits if s not in built]
    if missing:
        raise HydraError(f"tiny-imagenet: {source} has no labelled val/ split (val/val_annotations.txt and "
                         "val/images/); use the complete data set")
    return {s: built[s] for s in splits}


class _TinyTree:
    """What a Tiny-ImageNet copy holds: text files and image payloads (bytes or file paths) by relative path."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.texts: dict[str, bytes] = {}
        self.images: dict[str, bytes | str] = {}

    def text(self, rel: str, required: bool = True) -> str | None:
        data = self.texts.get(rel)
        if data is None:
            if required:
                raise HydraError(f"tiny-imagenet: {self.where(rel)} not found; the copy is incomplete")
            return None
        return data.decode("utf-8", errors="replace")

    def where(self, rel: str) -> str:
        return str(self.source / rel) if self.source.is_dir() else f"{self.source}:{rel}"


_TRAIN_RE = re.compile(r"^train/([^/]+)/images/([^/]+)$")
_VAL_RE = re.compile(r"^val/images/([^/]+)$")
_TEXTS = ("wnids.txt", "words.txt", "val/val_annotations.txt")


def _is_image(name: str) -> bool:
    return name.lower().endswith(_IMAGE_SUFFIXES)


def _read_tiny_folder(folder: Path, wanted: set[str] | None) -> _TinyTree:
    tree = _TinyTree(folder)
    for rel in _TEXTS:
        if (folder / rel).is_file():
            tree.texts[rel] = (folder / rel).read_bytes()
    for wnid_dir in sorted((folder / "train").glob("*/images")):
        wnid = wnid_dir.parent.name
        if wanted is None or wnid in wanted:
            for p in wnid_dir.iterdir():
                if _is_image(p.name):
                    tree.images[f"train/{wnid}/images/{p.name}"] = str(p)
    if (folder / "val" / "images").is_dir():
        for p in (folder / "val" / "images").iterdir():
            if _is_image(p.name):
                tree.images[f"val/images/{p.name}"] = str(p)
    return tree


class _TarUnsupported(Exception):
    """The fast reader met a tar feature it does not handle; the caller falls back to :mod:`tarfile`."""


def _tar_number(field: bytes) -> int:
    text = field.split(b"\0", 1)[0].strip()
    if field[:1] and field[0] & 0x80:
        raise _TarUnsupported
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise _TarUnsupported from None


def _pax_records(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _fast_tar_files(archive: Path, want: Any) -> Iterable[tuple[str, bytes]]:
    """(name, bytes) of the regular files in a .tar.gz for which ``want(name)`` holds, in archive order.

    A plain header parser: several times faster than :mod:`tarfile` on archives of many small files.
    Anything beyond ustar/GNU/pax basics raises :class:`_TarUnsupported`.
    """
    with open(archive, "rb") as raw:
        if raw.read(2) != b"\x1f\x8b":
            raise _TarUnsupported
    with gzip.open(archive, "rb") as f:
        long_name: str | None = None
        pax: dict[str, str] = {}
        while True:
            header = f.read(512)
            if len(header) < 512 or header == bytes(512):
                if len(header) in (0, 512):
                    return
                raise _TarUnsupported
            if _tar_number(header[148:156]) != sum(header[:148]) + 256 + sum(header[156:]):
                raise _TarUnsupported
            kind = header[156:157]
            size = _tar_number(header[124:136])
            if kind in (b"L", b"x", b"g"):
                data = f.read((size + 511) & ~511)
                if len(data) < size:
                    raise _TarUnsupported
                if kind == b"L":
                    long_name = data[:size].rstrip(b"\0").decode("utf-8", "surrogateescape")
                elif kind == b"x":
                    pax = _pax_records(data[:size])
                continue
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if header[257:263] == b"ustar\0" and header[345] != 0:
                name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
            name = pax.get("path", long_name or name)
            size = int(pax.get("size", size))
            long_name, pax = None, {}
            padded = (size + 511) & ~511
            if kind in (b"0", b"\0", b"7") and want(name):
                data = f.read(padded)
                if len(data) < size:
                    raise _TarUnsupported
                yield name, data[:size]
            elif kind in (b"0", b"\0", b"7", b"1", b"2", b"3", b"4", b"5", b"6"):
                f.seek(padded, 1)
            else:
                raise _TarUnsupported


def _tarfile_files(archive: Path, want: Any) -> Iterable[tuple[str, bytes]]:
    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            if member.isfile() and want(member.name):
                yield member.name, tar.extractfile(member).read()  # type: ignore[union-attr]


def _read_tiny_archive(archive: Path, classes: int | None) -> _TinyTree:
    """One streaming pass over the archive; nothing is written to disk, so no member path can escape."""
    try:
        try:
            return _scan_tiny_archive(archive, classes, _fast_tar_files)
        except _TarUnsupported:
            return _scan_tiny_archive(archive, classes, _tarfile_files)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise HydraError(f"cannot read {archive}: {e}; the archive is damaged, get it again") from None


def _scan_tiny_archive(archive: Path, classes: int | None, files: Any) -> _TinyTree:
    state: dict[str, Any] = {"prefix": None, "wanted": None}

    def want(name: str) -> bool:
        name = _strip_dot(name)
        if name == "wnids.txt" or name.endswith("/wnids.txt"):
            return True
        if name.endswith(("/words.txt", "/val_annotations.txt")) or name in ("words.txt",):
            return True
        parts = name.split("/")
        if not _is_image(name) or len(parts) < 3 or parts[-2] != "images":
            return False
        if len(parts) >= 4 and parts[-4] == "train":
            return state["wanted"] is None or parts[-3] in state["wanted"]
        return parts[-3] == "val"

    pending: dict[str, bytes] = {}
    for name, data in files(archive, want):
        name = _strip_dot(name)
        pending[name] = data
        if name == "wnids.txt" or name.endswith("/wnids.txt"):
            prefix = name[: -len("wnids.txt")]
            if state["prefix"] is None or len(prefix) < len(state["prefix"]):
                state["prefix"] = prefix
                if classes is not None:
                    state["wanted"] = set(sorted(set(data.decode("utf-8", "replace").split()))[:classes])
    prefix = state["prefix"]
    if prefix is None:
        raise HydraError(f"tiny-imagenet: {archive} holds no wnids.txt; is it the Tiny-ImageNet archive?")
    tree = _TinyTree(archive)
    for name, data in pending.items():
        if not name.startswith(prefix):
            continue
        rel = name[len(prefix):]
        if rel in _TEXTS:
            tree.texts[rel] = data
        elif _TRAIN_RE.match(rel) or _VAL_RE.match(rel):
            tree.images[rel] = data
    return tree


def _strip_dot(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def _first_name(words: str | None) -> dict[str, str]:
    names: dict[str, str] = {}
    for line in (words or "").splitlines():
        wnid, _, text = line.partition("\t")
        if text.strip():
            names[wnid.strip()] = text.split(",")[0].strip()
    return names


def _build_tiny_imagenet(source: Path, classes: int | None) -> dict[str, ImageDataset]:
    if source.is_dir():
        ids = (source / "wnids.txt").read_text().split()
        wanted = set(sorted(set(ids))[:classes]) if classes is not None else None
        tree = _read_tiny_folder(source, wanted)
    else:
        tree = _read_tiny_archive(source, classes)
    wnids = sorted(set((tree.text("wnids.txt") or "").split()))
    if not wnids:
        raise HydraError(f"tiny-imagenet: {tree.where('wnids.txt')} lists no classes; the copy is damaged")
    if classes is not None:
        wnids = wnids[:_check_classes(classes, len(wnids), "classes")]
    index = {w: i for i, w in enumerate(wnids)}
    words = _first_name(tree.text("words.txt", required=False))
    names = [words.get(w, w) for w in wnids]

    train: list[tuple[str, int]] = []
    for rel in sorted(tree.images):
        m = _TRAIN_RE.match(rel)
        if m and m.group(1) in index:
            train.append((rel, index[m.group(1)]))
    train.sort(key=lambda t: (t[1], t[0]))
    counts = np.bincount([lab for _, lab in train], minlength=len(wnids))
    missing = [wnids[i] for i in np.flatnonzero(counts == 0)]
    if missing:
        raise HydraError(f"tiny-imagenet: no training images for class(es) {missing[:3]} under "
                         f"{tree.where('train/' + missing[0] + '/images')}; the copy is incomplete")

    val: list[tuple[str, int]] = []
    annotations = tree.text("val/val_annotations.txt", required=False)
    if annotations is not None:
        known = set((tree.text("wnids.txt") or "").split())
        for lineno, line in enumerate(annotations.splitlines(), 1):
            fields = line.split("\t")
            if not line.strip():
                continue
            if len(fields) < 2 or fields[1].strip() not in known:
                raise HydraError(f"tiny-imagenet: {tree.where('val/val_annotations.txt')} line {lineno} does not "
                                 "read 'file<TAB>wnid...' with a wnid from wnids.txt; the file is damaged")
            wnid = fields[1].strip()
            if wnid in index:
                rel = f"val/images/{fields[0].strip()}"
                if rel not in tree.images:
                    raise HydraError(f"tiny-imagenet: {tree.where(rel)} (listed in val_annotations.txt) not "
                                     "found; the copy is incomplete")
                val.append((rel, index[wnid]))

    jobs = [(tree.where(rel), tree.images[rel]) for rel, _ in train + val]
    pixels = _decode_all(jobs, "decoding tiny-imagenet")
    n_train = len(train)
    train_images = torch.from_numpy(pixels[:n_train])
    mean, std = channel_stats(train_images)
    out = {"train": ImageDataset(train_images, torch.tensor([lab for _, lab in train], dtype=torch.int64),
                                 names, mean, std)}
    if annotations is not None:
        out["test"] = ImageDataset(torch.from_numpy(pixels[n_train:]),
                                   torch.tensor([lab for _, lab in val], dtype=torch.int64), names, mean, std)
    return out


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


def _decode_image(payload: bytes | str) -> np.ndarray:
    """Decode one image file (its bytes or its path) to uint8 CHW RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(payload) if isinstance(payload, bytes) else payload) as im:
        rgb = im.convert("RGB")
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))


def _decode_job(job: tuple[str, bytes | str]) -> tuple[np.ndarray | None, str]:
    try:
        return _decode_image(job[1]), ""
    except Exception as e:  # noqa: BLE001 - any decoder failure becomes one message naming the file
        return None, f"{type(e).__name__}: {e}"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the system tells it)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, n)


def _decode_workers() -> int:
    return min(usable_cpus(), 8)


def _decode_all(jobs: list[tuple[str, bytes | str]], desc: str) -> np.ndarray:
    """Decode images to one uint8 (N, C, H, W) array, in parallel processes for large sets."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise HydraError("decoding images needs Pillow: pip install pillow") from None
    workers = _decode_workers()
    out: np.ndarray | None = None
    bar = progress_bar(len(jobs), desc, unit="img")
    pool = None
    try:
        results: Iterable[tuple[np.ndarray | None, str]]
        if len(jobs) >= POOL_MIN_IMAGES and workers > 1:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
            pool = ctx.Pool(workers)
            results = pool.imap(_decode_job, jobs, chunksize=256)
        else:
            results = map(_decode_job, jobs)
        for i, (arr, err) in enumerate(results):
            if arr is None:
                raise HydraError(f"cannot decode image {jobs[i][0]}: {err}; the file is damaged, replace it or "
                                 "get the data set again")
            if out is None:
                out = np.empty((len(jobs), *arr.shape), dtype=np.uint8)
            elif arr.shape != out.shape[1:]:
                raise HydraError(f"image {jobs[i][0]} is {arr.shape[2]}x{arr.shape[1]} but {jobs[0][0]} is "
                                 f"{out.shape[3]}x{out.shape[2]}; all images of a set must have one size, "
                                 "resize them first")
            out[i] = arr
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    if out is None:
        raise HydraError("tiny-imagenet: no images found for the chosen classes; the copy is incomplete")
    return out
