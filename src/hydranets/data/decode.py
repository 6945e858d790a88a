"""Image decoding for the in-memory sets: image files (their bytes or their paths) decoded with Pillow to one uint8
(N, C, H, W) RGB array, in forked worker processes for sets of ``POOL_MIN_IMAGES`` images or more, each failure
naming its file; and :func:`usable_cpus`, the CPU count that sizes those workers and the image-folder loader's.
"""
from __future__ import annotations

import io
import multiprocessing
import os
from typing import Iterable

import numpy as np

from ..errors import HydraError
from .download import progress_bar

POOL_MIN_IMAGES = 2000


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
