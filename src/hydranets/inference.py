"""A trained model used for inference: loaded from its run, batch norms folded, classifying images.

In evaluation a batch norm is a fixed per-channel affine map, so a convolution followed by one equals a
single convolution with scaled weights and a bias. Folding removes a pass over every feature map: 1.2-1.4x
the images/s of the narrow ResNet-8s and their HydraNets measured here (benchmarks/RESULTS.md, "Batch
norms folded").
"""
from __future__ import annotations

import copy
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .checkpoint import CHECKPOINT, check_writable, save_safetensors
from .data.inputs import InputSpec
from .errors import HydraError, is_whole


def _in_order(m: nn.Module) -> bool:
    """Whether ``m`` runs its children one after the other: a Sequential, or a subclass (such as torchvision's
    ``Conv2dNormActivation``) that keeps Sequential's forward."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _layers(seq: nn.Sequential) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, layer) for each layer a Sequential runs, in order, looking inside nested Sequentials."""
    out = []
    for name, m in seq.named_children():
        out += _layers(m) if _in_order(m) else [(seq, name, m)]
    return out


def _hooked(m: nn.Module) -> bool:
    """Whether ``m`` has forward hooks (e.g. an old-style spectral norm recomputing its weight): folding would drop
    or misapply them."""
    return bool(m._forward_pre_hooks or m._forward_hooks)


def _fuse(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """``conv`` then ``bn`` as one convolution, computed in float32 for a bf16/fp16 model, then cast back."""
    dtype = conv.weight.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        return fuse_conv_bn_eval(conv, bn)
    return fuse_conv_bn_eval(copy.deepcopy(conv).float(), copy.deepcopy(bn).float()).to(dtype)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether ``conv`` then ``bn`` may become one convolution: a plain Conv2d, a BatchNorm2d with running
    statistics, neither with forward hooks."""
    return (type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None
            and not _hooked(conv) and not _hooked(bn))


def _fold_traced(module: nn.Module, shared: set[int]) -> int:
    """Fold the pairs that ``module``'s forward, traced by torch.fx, shows to be a conv whose output only a batch
    norm reads, each called once, neither in ``shared`` (ids of modules registered under several names) nor
    read as tensors. Where the forward does not trace, its children's are tried. Returns how many."""
    try:
        nodes = list(torch.fx.symbolic_trace(module).graph.nodes)
    except Exception:  # noqa: BLE001  (any forward torch.fx cannot follow: look inside instead)
        return sum(_fold_traced(child, shared) for child in module.children())
    calls = Counter(n.target for n in nodes if n.op == "call_module")
    read = [n.target for n in nodes if n.op == "get_attr"]
    count = 0
    for node in nodes:
        bn_node = next(iter(node.users), None)
        if (node.op != "call_module" or len(node.users) != 1 or bn_node.op != "call_module"
                or len(bn_node.args) != 1 or bn_node.args[0] is not node or bn_node.kwargs):
            continue
        names = (node.target, bn_node.target)
        conv, bn = (module.get_submodule(name) for name in names)
        if (_foldable(conv, bn) and all(calls[name] == 1 for name in names) and id(conv) not in shared
                and id(bn) not in shared and not any(r.startswith(n + ".") for r in read for n in names)):
            for name, new in zip(names, (_fuse(conv, bn), nn.Identity())):
                parent, _, attr = name.rpartition(".")
                setattr(module.get_submodule(parent), attr, new)
            count += 1
    return count


def fold_batchnorms(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``model`` in eval mode in which every ``Conv2d`` that a ``BatchNorm2d`` directly follows
    is replaced by one convolution computing both; the batch norm becomes an identity under the same name.
    Returns the copy and how many pairs were folded.

    Pairs are found in Sequentials (or subclasses keeping their forward, nested ones included) and, with
    torch.fx, in the forward of each outermost module that traces (HydraNet's routing does not: its parts are
    traced instead). There a conv folds when the batch norm alone reads its output, each is called once and
    registered under one name, and nothing reads their tensors directly; modules are assumed to be called
    only by their parents' forwards.

    The copy computes the same function as ``model.eval()`` (to float rounding) and is for inference
    only: training it would train the folded weights, not the batch norms. Batch norms after a
    nonlinearity, or without running statistics, and pairs with forward hooks stay as they are; the model
    itself is not changed.
    """
    from .hydranet import HydraNet
    folded = copy.deepcopy(model).eval()
    count = 0
    for seq in [m for m in folded.modules() if _in_order(m)]:
        layers = _layers(seq)
        for (conv_parent, conv_name, conv), (bn_parent, bn_name, bn) in zip(layers, layers[1:]):
            if _foldable(conv, bn):
                setattr(conv_parent, conv_name, _fuse(conv, bn))
                setattr(bn_parent, bn_name, nn.Identity())
                count += 1
    names = Counter(id(m) for _, m in folded.named_modules(remove_duplicate=False))
    count += _fold_traced(folded, {i for i, n in names.items() if n > 1})
    for m in folded.modules():
        if isinstance(m, HydraNet) and count:  # each branch's convolutions now hold its own batch norms: untied
            m.tied_norms = None
    return folded, count


def load_model(path: str | Path, device: str | torch.device = "auto", fold: bool = False) -> nn.Module:
    """A trained model in eval mode from a run folder, its ``checkpoints/last.pt`` or its ``model.safetensors``.

    ``device``: ``auto`` (CUDA when there is one, else the CPU) or a torch device; ``fold=True`` returns it
    with its batch norms folded (:func:`fold_batchnorms`: the same outputs, faster). ``model.input_spec``
    (:class:`~hydranets.data.inputs.InputSpec`) says what it expects of an image: class names,
    normalisation, size. Runs written before the spec was saved get it from their data set, read again.
    """
    from .config import config_from_dict
    from .distributed import pick_device
    from .train import load_data, load_trained
    model, ckpt = load_trained(path, pick_device(str(device)))
    if ckpt.get("inputs"):
        spec = InputSpec.from_dict(ckpt["inputs"])
    else:
        cfg = config_from_dict(ckpt["config"])
        print(f"note: {path} predates saved class names; reading them from its data set (data.name={cfg.data.name})",
              file=sys.stderr)
        spec = InputSpec.of_dataset(load_data(cfg)[1])
    if fold:
        model, _ = fold_batchnorms(model)
    model.input_spec = spec
    return model


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, top: int | None = None,
            batch_size: int = 256) -> list[dict[str, Any]]:
    """Classify (N, C, H, W) uint8 images (e.g. from :func:`~hydranets.data.inputs.read_images`) with a
    model from :func:`load_model`, normalised as in its training.

    One dict per image: ``classes`` and ``probs`` (its ``top`` most likely classes, most likely first;
    default 5, or every class of a model with fewer),
    ``indices`` (their class indices) and, for a HydraNet, ``branches`` (those that ran for the image) and
    ``gate_scores`` (the gate's sigmoid score of each).
    """
    from .data import BatchLoader, ImageDataset
    spec: InputSpec | None = getattr(model, "input_spec", None)
    if spec is None:
        raise HydraError("predict needs a model from hydranets.load_model (it carries the class names and "
                         "normalisation as model.input_spec)")
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != spec.in_chans:
        raise HydraError(f"predict takes (N, {spec.in_chans}, H, W) uint8 images, got {tuple(images.shape)} "
                         f"{images.dtype}")
    if tuple(images.shape[2:]) != spec.shape:
        raise HydraError(f"this model takes {spec.shape[0]}x{spec.shape[1]} images, got {images.shape[2]}x{images.shape[3]}; "
                         "hydranets.data.inputs.read_images resizes and crops image files as its test images were")
    top = min(5, len(spec.classes)) if top is None else top
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= len(spec.classes):
        raise HydraError(f"top must be a whole number from 1 to the {len(spec.classes)} classes, got {top!r}")
    if not len(images):
        return []
    device = next(model.parameters()).device
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    dataset = ImageDataset(images, torch.zeros(len(images), dtype=torch.long), spec.classes, spec.mean, spec.std)
    was_training = model.training
    model.eval()
    try:
        return _predict_batches(model, BatchLoader(dataset, batch_size, train=False, device=device,
                                                   channels_last=False, prefetch=False), spec, top, dtype)
    finally:
        model.train(was_training)


def _predict_batches(model: nn.Module, batches: Any, spec: InputSpec, top: int,
                     dtype: torch.dtype = torch.float32) -> list[dict[str, Any]]:
    from .hydranet import HydraNet
    out = []
    for x, _ in batches:
        x = x.to(dtype)
        if isinstance(model, HydraNet):
            res = model(x, return_gate=True)
            logits, route = res.logits, res.route
            scores = res.gate_logits.float().gather(1, route).sigmoid()
        else:
            logits, route = model(x), None
        probs, idx = logits.float().softmax(1).topk(top, dim=1)
        for i in range(len(x)):
            row = {"classes": [spec.classes[j] for j in idx[i].tolist()], "probs": probs[i].tolist(),
                   "indices": idx[i].tolist()}
            if route is not None:
                row.update(branches=route[i].tolist(), gate_scores=scores[i].tolist())
            out.append(row)
    return out


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
