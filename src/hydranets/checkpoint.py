"""Checkpoints that survive a crash: atomic writes, plain tensors (``weights_only=True``), safetensors export."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .errors import HydraError

CHECKPOINT = "checkpoints/last.pt"


def _replace_synced(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file beside ``path`` (its folders made), sync it, rename it over ``path`` and sync the
    folder: a crash, a power cut or a full disk leaves the old file or the new, never half of one. The file gets the
    permissions a plain ``open`` gives (some writers, e.g. safetensors, create theirs readable by the owner only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        if os.name == "posix":
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if os.name == "posix":  # the rename itself lives in the folder's entry
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save, atomically (see :func:`_replace_synced`)."""
    _replace_synced(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write ``text`` as UTF-8, atomically (see :func:`_replace_synced`)."""
    _replace_synced(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def check_writable(path: str | Path) -> None:
    """Refuse, as one line naming ``path``, a file that cannot be written there (as :func:`atomic_save` writes it):
    ``path`` is a folder or another non-regular file, a folder on its way is a file, or the nearest existing folder
    takes no new files. Tried with a temporary file there, removed again; no folder is made, so processes that check
    one path at once (the ranks of a torchrun) do not remove each other's folders."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise HydraError(f"cannot write {path}: it is {'a folder' if path.is_dir() else 'not a regular file'}; "
                         "give the path of a file")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise HydraError(f"cannot write {path}: {folder} is a file, not a folder; choose a writable path")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".hydranets-probe-"):
            pass
    except OSError as e:
        raise HydraError(f"cannot write {path}: cannot create files in {folder} ({e.strerror or type(e).__name__}); "
                         "choose a writable path") from None


def _check_file(path: Path, what: str) -> None:
    """Refuse a ``path`` that does not exist, or is not a regular file (a folder, a device)."""
    if not path.exists():
        raise HydraError(f"{what} {path} does not exist")
    if not path.is_file():
        raise HydraError(f"{what} {path} is {'a folder' if path.is_dir() else 'not a regular file'}; give a run "
                         "folder, its checkpoints/*.pt or its model.safetensors")


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint with ``weights_only=True``; a missing or damaged file is one clear error."""
    path = Path(path)
    _check_file(path, "checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises many kinds for a damaged file)
        raise HydraError(f"{path} is not a readable PyTorch checkpoint: give a run folder, its checkpoints/*.pt or its "
                         f"model.safetensors (this file is another kind or damaged: {type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_info" not in ckpt:
        raise HydraError(f"{path} is not a hydranets checkpoint (no 'model'/'model_info')")
    return ckpt


def check_compatible(info: dict, expected: dict, path: str | Path) -> None:
    """Refuse a checkpoint made for another model or number of classes."""
    for key in ("name", "num_classes", "in_chans", "hydra"):
        if info.get(key) != expected.get(key):
            raise HydraError(f"checkpoint {path} is for {key} {info.get(key)!r}, this run has {expected.get(key)!r}; "
                             "point to a checkpoint of the same model, or start a new run")


def load_state(model: nn.Module, state: dict, path: str | Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)
        raise HydraError(f"checkpoint {path} does not fit this model: {first[:160]}") from None


def save_safetensors(model: nn.Module, path: str | Path, metadata: dict | None = None) -> None:
    """Final weights as safetensors (metadata values stored as JSON strings)."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise HydraError("saving safetensors needs the safetensors package: pip install 'hydranets[train]'") from None
    # copies: safetensors refuses tensors that share memory (branches with shared weights)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    _replace_synced(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_safetensors(path: str | Path) -> dict:
    """A ``model.safetensors`` written by :func:`save_safetensors` as a checkpoint-like dict: ``model`` (the
    weights) and its metadata (``model_info``, ``config``, ``inputs``), decoded."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise HydraError("reading safetensors needs the safetensors package: pip install 'hydranets[train]'") from None
    path = Path(path)
    _check_file(path, "weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except Exception as e:  # noqa: BLE001  (a damaged file raises several kinds)
        raise HydraError(f"{path} is not a readable safetensors file: give a run folder or its model.safetensors "
                         f"(this file is another kind or damaged: {type(e).__name__})") from None
    if "model_info" not in meta:
        raise HydraError(f"{path} has no hydranets metadata (model_info); it was not written by hydranets")
    return {"model": state, **meta}


def kept_checkpoint(epoch: int) -> str:
    """Where a run keeps its checkpoint after ``epoch`` (``train.keep_epochs``), relative to its folder."""
    return f"checkpoints/epoch{epoch}.pt"


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder or a checkpoint file -> the checkpoint file (a folder holding only its ``model.safetensors``
    -> that file)."""
    path = Path(path)
    if path.is_dir() and not (path / CHECKPOINT).exists():
        if (path / "model.safetensors").exists():
            return path / "model.safetensors"
        runs = sorted(p for p in path.iterdir() if not p.name.startswith(".")
                      and ((p / CHECKPOINT).exists() or (p / "model.safetensors").exists()))
        if runs:  # e.g. a pipeline's folder, which holds its baseline and HydraNet runs
            raise HydraError(f"{path} holds no run itself but runs in its folders: give one of "
                             f"{', '.join(str(p) for p in runs[:4])}{', ...' if len(runs) > 4 else ''}")
    return path / CHECKPOINT if path.is_dir() else path
