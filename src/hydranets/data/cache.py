"""The cache folder where downloads and decoded arrays go (``$HYDRANETS_CACHE`` or ``~/.cache/hydranets``) and the
uint8 .npz files that keep a decoded :class:`~hydranets.data.ImageDataset` there: written atomically, read back with
pickles refused, a damaged file ignored with a warning; ``_CACHE_VERSION`` is the format's version, which a reader
folds into the key it names its cache files by.
"""
from __future__ import annotations

import os
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import HydraError
from .image_dataset import ImageDataset

_CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """Where downloads and decoded caches go: ``$HYDRANETS_CACHE`` or ``~/.cache/hydranets``."""
    env = os.environ.get("HYDRANETS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hydranets"


def _cache_root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


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
