"""A trained model as a ``torch.export`` program (``.pt2``): deployable without this package's Python code.

The file holds the graph of ATen operators, the weights and, as JSON, what a deployment needs to feed it
(class names, input normalisation and size, k, B). A HydraNet keeps its conditional execution: each branch
runs only on the images routed to it (:func:`hydranets.routing.dispatch_traceable`), and the batch size is
dynamic, so one file serves batch 1 and every larger batch. Loading it needs torch only, of the version
that wrote it (saved programs are not promised to load in other torch versions). It runs as the program
``torch.export.load(path).module()``; torch 2.13's AOTInductor does not compile its data-dependent routing
correctly (tried on the CPU: wrong logits, and batches above 15 refused), so it is not meant for that.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from .errors import HydraError

# torch.export.load logs a traceback for a file it cannot read, and a warning for a name not ending in .pt2, before
# raising; the raise becomes the one HydraError line.
_LOAD_LOGGERS = ("torch.export", "torch.export.pt2_archive._package")
METADATA_FILE = "hydranets.json"  # the metadata's name among the .pt2's extra files
FORMAT = 1


class _FrozenNorm(nn.Module):
    """An eval-mode batch norm as a per-channel scale and shift: the same outputs, without ``batch_norm``'s check for
    an empty batch, which ``torch.export`` cannot decide on a branch's data-dependent number of images (batch norms
    that no convolution precedes, as in DenseNet, stay after folding)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale + (bn.bias if bn.bias is not None else 0)
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.view(shape).to(x.dtype) + self.shift.view(shape).to(x.dtype)


def _frozen_norms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every batch norm that keeps running statistics as a :class:`_FrozenNorm`."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and child.running_var is not None:
                setattr(parent, name, _FrozenNorm(child))
    return model


class _AtTopk(nn.Module):
    """A HydraNet with its k fixed, so that the exported program takes an image batch only."""

    def __init__(self, model: nn.Module, topk: int) -> None:
        super().__init__()
        self.model = model
        self.topk = topk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, topk=self.topk)


def export_model(model: nn.Module, path: str | Path, example: torch.Tensor | None = None,
                 topk: int | None = None) -> Path:
    """Export ``model`` (eval mode: a HydraNet routes top-k) to a ``.pt2`` file at ``path``; returns the path.

    The program takes normalised (N, C, H, W) images, any N >= 1, and returns (N, classes) logits. ``example``
    gives that shape and dtype (its values are not baked in; any batch size); it may be left out for a model from
    :func:`hydranets.load_model`, whose ``input_spec`` says it. ``topk``: the k a HydraNet is exported at (default
    its own ``topk``). Fold batch norms first (:func:`hydranets.fold_batchnorms`) for the faster program.
    """
    from . import __version__
    from .checkpoint import _replace_synced, check_writable
    from .hydranet import HydraNet, _check_topk
    path = Path(path)
    if path.is_dir():
        raise HydraError(f"{path} is a folder; give a file name, e.g. {path / 'model.pt2'}")
    check_writable(path)
    hydra = isinstance(model, HydraNet)
    if topk is not None and not hydra:
        raise HydraError(f"topk is for HydraNets; this model is a dense {type(model).__name__}")
    k = (model.topk if topk is None else _check_topk(topk, model.num_branches)) if hydra else None
    spec = getattr(model, "input_spec", None)
    param = next(iter(model.parameters()), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    if example is None:
        if spec is None:
            raise HydraError("export_model needs an example input (N, C, H, W) for a model without input_spec "
                             "(a model from hydranets.load_model carries one)")
        example = torch.zeros(2, spec.in_chans, *spec.shape, device=device, dtype=dtype)
    if not isinstance(example, torch.Tensor) or example.dim() != 4 or not example.is_floating_point() \
            or example.shape[0] < 1:
        raise HydraError(f"example must be a floating-point (N, C, H, W) tensor with N >= 1, got "
                         f"{tuple(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__}")
    # Batch 2 for the trace: export specialises a dimension of size 1, which would make the batch size fixed.
    example = example[:1].expand(2, *example.shape[1:]).contiguous()
    frozen = _frozen_norms(model).eval()
    module = _AtTopk(frozen, k) if hydra else frozen
    with torch.no_grad():
        num_classes = module(example).shape[1]
        program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                                      strict=False)
    meta = {"format": FORMAT, "kind": "hydranet" if hydra else "dense", "model": type(model).__name__,
            "topk": k, "num_branches": model.num_branches if hydra else None, "num_classes": num_classes,
            "input_shape": list(example.shape[1:]), "dtype": str(dtype).removeprefix("torch."),
            "inputs": spec.to_dict() if spec is not None else None,
            "torch": torch.__version__, "hydranets": __version__}
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={METADATA_FILE: json.dumps(meta)})
    _replace_synced(path, lambda tmp: tmp.write_bytes(buf.getvalue()))
    return path


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    """The loggers ``names`` report errors only, for the block."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.ERROR))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def load_exported(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The callable program of a file from :func:`export_model` and its metadata (``inputs``: class names,
    normalisation, size; ``topk``, ``num_branches``, ``num_classes``, ``input_shape``, ``dtype``, ``torch``)."""
    path = Path(path)
    if not path.is_file():
        raise HydraError(f"exported model {path} does not exist" if not path.exists() else f"{path} is not a file")
    extra = {METADATA_FILE: ""}
    try:
        with _quiet(_LOAD_LOGGERS):
            program = torch.export.load(path, extra_files=extra)
    except Exception as e:  # noqa: BLE001  (torch raises many kinds for a damaged or foreign file)
        raise HydraError(f"{path} is not a readable torch.export program ({type(e).__name__}); export it again with "
                         f"`hydranets export` (and the torch version that will load it)") from None
    if not extra[METADATA_FILE]:
        raise HydraError(f"{path} is a torch.export program without hydranets metadata; `hydranets export` writes both")
    return program.module(), json.loads(extra[METADATA_FILE])
