"""Checked downloads and safe archive extraction: the only ways hydranets writes fetched data to disk."""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from ..errors import HydraError, reason

_CHUNK = 1 << 20


def progress_bar(total: int | None, desc: str, unit: str = "B") -> Any:
    """A tqdm bar on stderr, or a silent stand-in when tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    scale = unit == "B"
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
                file=sys.stderr, mininterval=0.5, leave=False)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def file_digest(path: str | Path, algorithm: str = "md5") -> str:
    """Hex digest of a file, read in chunks so large archives need little memory."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _expected(md5: str | None, sha256: str | None) -> tuple[str, str] | None:
    if md5 and sha256:
        raise HydraError("download_file takes md5 or sha256, not both; pass only one checksum")
    if md5:
        return "md5", md5.lower()
    if sha256:
        return "sha256", sha256.lower()
    return None


def download_file(url: str, dest: str | Path, md5: str | None = None, sha256: str | None = None,
                  progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest`` and check its checksum; a finished ``dest`` is never half-written.

    The bytes go to a temporary file beside ``dest`` that is renamed into place only once the
    checksum matches, so an interrupted or corrupt download never looks like a good file. An
    existing ``dest`` with the right checksum is kept without touching the network.
    """
    dest = Path(dest)
    check = _expected(md5, sha256)
    if dest.is_file():
        if check is None or file_digest(dest, check[0]) == check[1]:
            return dest
    made = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.new(check[0]) if check else None
        received = 0
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=timeout)
            except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
                reason = " ".join(str(getattr(e, "reason", None) or f"{type(e).__name__}: {e}").split())
                raise HydraError(f"cannot download {url}: {reason}; check the address and network, "
                                 f"or put the file at {dest} by hand") from None
            with response:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                bar = progress_bar(total, dest.name) if progress else _NoBar()
                try:
                    while True:
                        try:
                            block = response.read(_CHUNK)
                        except (OSError, http.client.HTTPException) as e:
                            reason = " ".join(f"{type(e).__name__}: {e}".split())
                            raise HydraError(f"download of {url} broke off after {received} bytes: {reason}; "
                                             "run it again") from None
                        if not block:
                            break
                        out.write(block)
                        if h is not None:
                            h.update(block)
                        received += len(block)
                        bar.update(len(block))
                finally:
                    bar.close()
        if total is not None and received != total:
            raise HydraError(f"download of {url} stopped at {received} of {total} bytes; run it again")
        if check is not None and h is not None:
            got = h.hexdigest()
            if got != check[1]:
                raise HydraError(f"download of {url} has {check[0]} {got}, expected {check[1]}; the file is "
                                 "corrupt or changed on the server: retry, or fetch it by hand and check it")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        for d in made:  # the folders made for it, deepest first, where still empty: a failure leaves nothing
            try:
                d.rmdir()
            except OSError:
                break
        raise
    return dest


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    name = member.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (parts and (":" in parts[0])) or ".." in parts:
        raise HydraError(f"archive {archive} holds an unsafe path {name!r} (absolute or with '..'); "
                         "refusing to extract it: get the archive from its official source")
    if member.issym() or member.islnk():
        target = PurePosixPath(member.linkname.replace("\\", "/"))
        base = PurePosixPath(name).parent if member.issym() else PurePosixPath()
        depth = 0
        for part in () if target.is_absolute() else (base / target).parts:
            depth += -1 if part == ".." else 0 if part in (".", "") else 1
            if depth < 0:
                break
        if target.is_absolute() or depth < 0:
            raise HydraError(f"archive {archive} holds a link {name!r} -> {member.linkname!r} that points "
                             "outside it; refusing to extract it")
    elif not (member.isfile() or member.isdir()):
        raise HydraError(f"archive {archive} holds {name!r}, which is neither a file nor a folder; "
                         "refusing to extract it")


@contextlib.contextmanager
def _folder_lock(dest: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the folder ``dest`` itself (no lock file left behind; no lock where
    ``fcntl`` does not exist, as on Windows): processes that extract into one folder take turns."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(dest, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def extract_archive(path: str | Path, dest: str | Path, done: str | None = None) -> Path:
    """Unpack a tar / tar.gz archive into ``dest`` and return ``dest``.

    Members with absolute paths, ``..`` parts, links that leave the archive or device files are
    rejected before anything is written. The archive is unpacked into a temporary folder first and
    its top-level entries are then moved into ``dest``, so an interrupted run leaves no half tree.
    Processes extracting into one ``dest`` take turns (on POSIX systems); ``done``, a path under ``dest``,
    makes a process that waited skip the work when the one before it has left that file there.
    """
    path, dest = Path(path), Path(dest)
    if not path.is_file():
        raise HydraError(f"archive {path} not found; check the path")
    dest.mkdir(parents=True, exist_ok=True)
    with _folder_lock(dest):
        if done is None or not (dest / done).exists():
            _extract(path, dest)
    return dest


def _extract(path: Path, dest: Path) -> None:
    """:func:`extract_archive`'s work, its lock held."""
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        try:
            with tarfile.open(path, "r:*") as tar:
                members = tar.getmembers()
                for member in members:
                    _check_member(path, member)
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(staging, members=members, filter="data")
                else:
                    tar.extractall(staging, members=members)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise HydraError(f"cannot extract {path}: {reason(e)}; the archive is damaged, get it again") from None
        for entry in sorted(staging.iterdir()):
            target = dest / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(entry, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
