"""Checkpoints that survive a crash: atomic writes, plain tensors (``weights_only=True``), safetensors export."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .errors import HydraError, is_whole

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


def save_model(model: nn.Module, path: str | Path, *, image_size: int | tuple[int, int],
               class_names: list[str] | None = None, mean: float | list[float] | None = None,
               std: float | list[float] | None = None) -> Path:
    """Save a model made by :func:`~hydranets.create_model` or :func:`~hydranets.build_hydranet` (by a registered
    name) and trained in a loop of your own as a ``model.safetensors`` that :func:`~hydranets.load_model` and
    ``hydranets predict`` / ``export`` load back: its weights, how it was built (a HydraNet's ``topk`` and subtasks
    included) and what it expects of an image.

    ``path``: a file ending in ``.safetensors``, or a folder (``model.safetensors`` inside, made if missing).
    ``image_size``: the side (or ``(height, width)``) of the images it was trained on; image files are resized and
    centre-cropped to that. ``class_names``: one per class (default: a HydraNet's subtasks' names, else ``"0"``,
    ``"1"``, ...). ``mean``/``std``: per channel (or one for all), of pixel values in 0..1, as the training images
    were normalised (default 0 and 1: pixels scaled to 0..1 only). Written atomically; returns the file's path.
    Bad input is one :class:`HydraError`, before anything is written.
    """
    from .data.inputs import InputSpec
    from .hydranet import HydraNet
    from .partition import Partition
    from .registry import model_module, takes_keyword
    from .train import build_model
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) or \
            isinstance(getattr(model, "_orig_mod", None), nn.Module):  # DDP, torch.compile: the model they wrap
        model = model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) \
            else model._orig_mod
    info = getattr(model, "hydranets_info", None) if isinstance(model, nn.Module) else None
    if not isinstance(info, dict):
        raise HydraError(f"save_model saves models made by hydranets.create_model or hydranets.build_hydranet from a "
                         f"registered model name; this {type(model).__name__} was not (built from a Backbone object, "
                         "by hand, or wrapped): build it by name, or save its state_dict yourself")
    info = {**info, "kwargs": dict(info["kwargs"])}
    hydra = model if isinstance(model, HydraNet) else None
    partition = hydra.partition if hydra is not None else None
    if hydra is not None and info["hydra"] is None:  # a preset: its k and subtasks as they are now, not as built
        info["kwargs"].pop("partition", None)
        if takes_keyword(info["name"], "topk"):
            info["kwargs"]["topk"] = hydra.topk
    num_classes, in_chans = info["num_classes"], info["in_chans"]

    if class_names is None:
        class_names = (partition.class_names if partition is not None and partition.class_names
                       else [str(i) for i in range(num_classes)])
    if isinstance(class_names, str) or not hasattr(class_names, "__len__") or len(class_names) != num_classes:
        got = f"{len(class_names)} names" if hasattr(class_names, "__len__") and not isinstance(class_names, str) \
            else repr(class_names)
        raise HydraError(f"class_names must list one name per class: this model has {num_classes} classes, got {got}")
    stats = {}
    for what, value, default in (("mean", mean, 0.0), ("std", std, 1.0)):
        given = default if value is None else value
        try:
            value = [float(given)] * in_chans if isinstance(given, (int, float)) else [float(v) for v in given]
        except (TypeError, ValueError):
            value = None
        if value is None or len(value) != in_chans or not all(math.isfinite(v) for v in value) or (
                what == "std" and min(value) <= 0):
            raise HydraError(f"{what} must be {in_chans} finite number(s){' above 0' if what == 'std' else ''}, one "
                             f"per input channel of this model (or one for all), got {given!r}")
        stats[what] = value
    size = (image_size, image_size) if is_whole(image_size) else (
        tuple(image_size) if isinstance(image_size, (tuple, list)) else ())
    if len(size) != 2 or not all(is_whole(s) for s in size):
        raise HydraError(f"image_size must be the side of the images this model takes, or (height, width), as "
                         f"positive integers, got {image_size!r}")
    height, width = size
    spec = InputSpec([str(c) for c in class_names], stats["mean"], stats["std"], width, width,
                     None if height == width else height)

    path = Path(path)
    if path.suffix != ".safetensors":
        if path.suffix and not path.is_dir():
            raise HydraError(f"save_model writes safetensors: give a file name ending in .safetensors or a folder, "
                             f"got {path}")
        path = path / "model.safetensors"
    if (path.parent / CHECKPOINT).exists():
        raise HydraError(f"{path.parent} is a run folder of hydranets train (it holds {CHECKPOINT}), whose model "
                         "this would replace; save elsewhere")
    from .run_folder import PIPELINE_FILES, holds
    if holds(path.parent, PIPELINE_FILES):
        raise HydraError(f"{path.parent} is a pipeline folder (it holds {', '.join(holds(path.parent, PIPELINE_FILES))}"
                         "); save elsewhere")
    module = model_module(info["name"])
    if module == "__main__":
        raise HydraError(f"cannot save this {info['name']} model: its factory is defined in __main__ (a script or "
                         "notebook), which no later process can import; move it into a module (e.g. mynets.py) and "
                         "import it from there")
    check_writable(path)

    meta = {"model_info": info, "topk": hydra.topk if hydra is not None else None,
            "modules": [] if module.split(".")[0] == "hydranets" else [module],
            "partition": partition.to_dict() if partition is not None else None, "inputs": spec.to_dict()}
    for key, value in info["kwargs"].items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise HydraError(f"cannot save this {info['name']} model: its setting {key}={value!r} cannot be stored "
                             "(only numbers, strings, lists and dicts can); build it with plain values") from None
    meta = json.loads(json.dumps(meta))  # as load_model will read it (tuples become lists)

    # Rebuild it from what is recorded (on the meta device: shapes only, no memory) and compare: a model folded or
    # changed after it was built would be saved but not load.
    part = Partition.from_dict(meta["partition"]) if meta["partition"] else None
    with torch.random.fork_rng(devices=[]):  # the caller's random state, untouched
        try:
            try:
                with torch.device("meta"):
                    rebuilt = build_model(meta["model_info"], part, topk=meta["topk"])
            except Exception:  # noqa: BLE001 - a factory that cannot build on the meta device: build it for real
                rebuilt = build_model(meta["model_info"], part, topk=meta["topk"])
        except Exception as e:  # noqa: BLE001
            raise HydraError(f"cannot save this model: {info['name']!r} with its recorded settings cannot be built "
                             f"again ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if mine != theirs or (hydra is not None and getattr(rebuilt, "topk", None) != hydra.topk):
        key = next((k for k in sorted(mine.keys() | theirs.keys()) if mine.get(k) != theirs.get(k)), "topk")
        detail = (f"topk {hydra.topk}, built again {getattr(rebuilt, 'topk', None)}" if key == "topk" else
                  f"{key}: {mine.get(key, 'absent')} here, {theirs.get(key, 'absent')} built again")
        raise HydraError(f"cannot save this model: it no longer matches {info['name']!r} as built ({detail}); save "
                         "it as built, not folded or with layers replaced")
    save_safetensors(model, path, meta)
    return path
