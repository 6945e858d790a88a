"""Tiny-ImageNet from its extracted folder or its .tar.gz (it cannot be downloaded): the archive is read in one
streaming pass, with nothing written to disk, by a fast tar-header reader that falls back to :mod:`tarfile` on
formats it does not handle; class names come from words.txt, the labelled test split from val/val_annotations.txt;
the images are decoded once and their arrays cached under a key that digests the source (the archive, or every
image and text file of the folder), so any change to it decodes again; mean and std are those of the train split.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import re
import sys
import tarfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..errors import HydraError, reason
from .cache import _CACHE_VERSION, _cache_root, _from_cache, _save_npz, _to_cache_arrays
from .decode import _decode_all
from .image_dataset import ImageDataset, _check_classes, channel_stats

_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


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
    """``<where>-<what>``: a short hash of the source's path, then one that changes whenever the archive, or any
    text or image file of the folder, changes (so a cache file whose ``where`` matches and ``what`` does not is
    stale)."""
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
    where = hashlib.sha1(str(source).encode()).hexdigest()[:8]
    return f"{where}-{hashlib.sha1('|'.join(parts).encode()).hexdigest()[:12]}"


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


# Cache files of this reader: <split>-<classes>-<where>-<what>.npz, and the one-hash names of earlier versions.
_CACHE_NAME = re.compile(r"(train|test)-(all|\d+)-(?:([0-9a-f]{8})-[0-9a-f]{12}|[0-9a-f]{16})\.npz")


def _prune_stale_cache(cache: Path, key: str) -> None:
    """Delete the cache files of an earlier state of the same source (and those named as earlier versions named
    them, which nothing reads any more): each is 15-300 MB, and a source that changes (or is copied again, with a
    new time stamp) would otherwise leave one behind every time. Says what it freed."""
    where, freed, names = key.split("-")[0], 0, []
    for path in (cache / "tiny-imagenet").glob("*.npz"):
        m = _CACHE_NAME.fullmatch(path.name)
        if m is None or path.name.endswith(f"-{key}.npz") or m.group(3) not in (where, None):
            continue
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:
            continue
        freed, names = freed + size, names + [path.name]
    if names:
        print(f"tiny-imagenet: removed {len(names)} stale cache file(s) of an earlier state of the data or an earlier "
              f"hydranets ({freed / 1e6:.0f} MB) from {cache / 'tiny-imagenet'}", file=sys.stderr, flush=True)


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
    _prune_stale_cache(cache, key)
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
        raise HydraError(f"cannot read {archive}: {reason(e)}; the archive is damaged, get it again") from None


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
