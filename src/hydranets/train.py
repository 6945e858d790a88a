"""One training loop for baselines and HydraNets, readable top to bottom.

    hydranets train --config configs/x.yaml train.epochs=5
    torchrun --nproc_per_node=2 -m hydranets train --config configs/x.yaml

A run folder (``run_folder``) holds ``config.yaml`` (resolved), ``metrics.jsonl``/``metrics.csv`` (one row per
epoch), ``checkpoints/last.pt`` (written atomically every epoch; ``--resume`` continues from it),
``model.safetensors`` and ``summary.json`` (written when the run has finished). A HydraNet may start from a trained
network (``upcycle``).
"""
from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from .checkpoint import (CHECKPOINT, atomic_save, atomic_write_text, check_compatible, kept_checkpoint,
                         load_checkpoint, load_safetensors, load_state, resolve_checkpoint, save_safetensors)
from .config import Config, DataConfig, OptimConfig, config_from_dict, save_config
from .data.inputs import InputSpec
from .errors import HydraError, is_positive_real, is_whole, reason
from .evaluate import autocast_for, evaluate
from .hydranet import HydraNet, build_hydranet, ghost_branch_norms
from .machine import machine_info
from .partition import Partition
from .registry import KeywordError, create_model, is_model, takes_keyword
from .routing import balance_loss, topk_route
from .run_folder import (append_metrics, check_run_dir, prepare_run_dir, read_metrics, run_precision, settle_replaced,
                         truncate_metrics)
from .upcycle import init_stem_from

if TYPE_CHECKING:
    from .data import ImageDataset


# ---------------------------------------------------------------- building blocks
def load_data(cfg: Config) -> tuple[ImageDataset, ImageDataset]:
    """Train and test splits as in-memory :class:`~hydranets.data.ImageDataset`."""
    d = cfg.data
    for key in ("train_subset", "test_subset"):
        n = getattr(d, key)
        if n is not None and not is_whole(n):
            raise HydraError(f"data.{key} must be an integer >= 1 (or null for every image), got {n!r}")
    if d.name == "imagefolder":
        raise HydraError("data.name=imagefolder is read lazily from disk, by `hydranets train` and `predict` only; "
                         "this command needs a data set held in memory (cifar10, cifar100, tiny-imagenet, "
                         "fashion-mnist, synthetic)")
    if d.name == "synthetic":
        from .data.synthetic import synthetic_splits
        train_set, test_set = synthetic_splits(d.classes or 10)
    else:
        from .data import load_splits
        train_set, test_set = load_splits(d.name, root=d.root, download=d.download, classes=d.classes,
                                          cache_dir=d.cache_dir)
    if d.train_subset:
        train_set = _subset(train_set, d.train_subset, cfg.train.seed)
    if d.test_subset:  # the same test images for every seed: their top-1 are compared
        test_set = _subset(test_set, d.test_subset, 0)
    return train_set, test_set


def make_loaders(cfg: Config, rt: distributed.Runtime) -> tuple[Iterable, Iterable, InputSpec]:
    """Training and test batches on the run's device, and what the model will expect of an image."""
    from .data import BatchLoader
    t, d = cfg.train, cfg.data
    per_rank = t.batch_size // rt.world_size
    if d.name == "imagefolder":
        from .data.imagefolder import IMAGENET_MEAN, IMAGENET_STD, RESIZE_RATIO, FolderBatches
        if d.root is None:
            raise HydraError("data.name=imagefolder needs data.root, the folder holding train/ and val/")
        if d.train_subset or d.test_subset:
            raise HydraError("data.train_subset and data.test_subset are not supported with data.name=imagefolder; "
                             "point data.root at a smaller folder instead")
        if d.augment != "crop_flip" or d.cutout:
            raise HydraError("data.augment and data.cutout do not apply to data.name=imagefolder, whose training images "
                             "get random-resized crops and flips; leave them at crop_flip and 0")
        from .data.decode import usable_cpus
        workers = min(4, usable_cpus()) if d.workers is None else d.workers
        common = dict(image_size=d.image_size, workers=workers, device=rt.device, channels_last=t.channels_last)
        train_b = FolderBatches(d.root, "train", per_rank, True, seed=t.seed, rank=rt.rank, world_size=rt.world_size,
                                **common)
        spec = InputSpec(train_b.classes, list(IMAGENET_MEAN), list(IMAGENET_STD), round(d.image_size * RESIZE_RATIO),
                         d.image_size)
        return train_b, FolderBatches(d.root, "val", t.eval_batch_size, False, **common), spec
    if d.image_size != DataConfig.image_size or d.workers != DataConfig.workers:
        raise HydraError(f"data.image_size and data.workers apply to data.name=imagefolder only; {d.name} images are "
                         f"used at their own size, decoded once: leave them at {DataConfig.image_size} and null")
    train_set, test_set = load_data(cfg)
    train_b = BatchLoader(train_set, per_rank, train=True, seed=t.seed, device=rt.device, augment=d.augment,
                          cutout=d.cutout, rank=rt.rank, world_size=rt.world_size, channels_last=t.channels_last)
    test_b = BatchLoader(test_set, t.eval_batch_size, train=False, device=rt.device, channels_last=t.channels_last)
    return train_b, test_b, InputSpec.of_dataset(test_set)


def _subset(ds, n: int, seed: int):
    from .data import ImageDataset
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return ImageDataset(ds.images[idx], ds.labels[idx], ds.classes, ds.mean, ds.std)


def import_modules(modules: list[str]) -> None:
    """Import ``model.modules``, where a user's own models register themselves, from the usual import path or the
    current folder (which then stays importable, as under ``python -m``, for what their factories import later); a
    run records them, so loading it later imports them again."""
    if not (isinstance(modules, list) and all(isinstance(m, str) and m for m in modules)):
        raise HydraError(f"model.modules must be a list of module names, e.g. [mynets], got {modules!r}")
    for name in modules:
        if name.endswith(".py") or "/" in name or "\\" in name or name.startswith("."):
            raise HydraError(f"model.modules takes module names, not files: give "
                             f"{Path(name).stem if name.endswith('.py') else 'its name'} (run from its folder)")
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):
                raise HydraError(f"model.modules: no module {name!r} here or on the import path; run from the folder "
                                 "that holds it, or add its folder to PYTHONPATH") from None
            raise HydraError(f"model.modules: importing {name!r} failed: {reason(e)}") from None
        except Exception as e:  # noqa: BLE001 - the user's module: its own error, on one line
            raise HydraError(f"model.modules: importing {name!r} failed: {type(e).__name__}: {reason(e)}") from None


def model_info(cfg: Config, num_classes: int, in_chans: int) -> dict:
    """What identifies a model's shape: checked before any checkpoint is loaded into it."""
    hydra = None
    if cfg.hydra.enabled:
        h = cfg.hydra
        hydra = {k: getattr(h, k) for k in ("num_branches", "split", "stem_width", "branch_width", "gate_width",
                                             "feature_dim", "gate_weighting")}
        # only when set: checkpoints made before these settings existed keep their identity
        for key in ("shared_path", "share_branch_weights", "share_branch_norms"):
            if getattr(h, key):
                hydra[key] = True
    return {"name": cfg.model.name, "kwargs": dict(cfg.model.kwargs), "num_classes": num_classes,
            "in_chans": in_chans, "hydra": hydra}


def build_model(info: dict, partition: Partition | None = None, topk: int = 1) -> nn.Module:
    """A backbone or HydraNet from :func:`model_info` (a HydraNet preset keeps its own k and takes ``partition``)."""
    kwargs = dict(info["kwargs"])
    if not is_model(info["name"]):
        create_model(info["name"])  # the unknown-model error, with its hint at model.modules
    if kwargs.get("in_chans", info["in_chans"]) != info["in_chans"]:
        raise HydraError(f"model.kwargs has in_chans={kwargs['in_chans']}, but these images have {info['in_chans']} "
                         "channel(s); leave in_chans out (it follows the data)")
    if takes_keyword(info["name"], "in_chans"):
        kwargs["in_chans"] = info["in_chans"]
    elif info["in_chans"] != 3:
        raise HydraError(f"model {info['name']!r} takes no in_chans, and these images have {info['in_chans']} "
                         "channel(s); give its factory an in_chans argument")
    try:
        if info["hydra"] is None:
            model = create_model(info["name"], num_classes=info["num_classes"], **kwargs)
            if isinstance(model, HydraNet) and partition is not None:
                model.set_partition(partition)
            return model
        return build_hydranet(info["name"], info["num_classes"], topk=topk, partition=partition, **info["hydra"],
                              **kwargs)
    except KeywordError as e:  # a model.kwargs key the model's factory does not take
        raise HydraError(f"model.kwargs: {e}") from None
    except TypeError as e:  # a model.kwargs key that a factory passes on to what it builds
        raise HydraError(f"model {info['name']!r} cannot be built with model.kwargs={info['kwargs']}: {e}") from None


def load_partition(cfg: Config, class_names: list[str], hydra: bool | None = None) -> Partition | None:
    """The subtasks ``hydra.partition`` names, for a HydraNet (``hydra.enabled``, or ``hydra=True``: a preset model)."""
    enabled = cfg.hydra.enabled if hydra is None else hydra
    if not enabled or cfg.hydra.partition is None:
        if enabled and (cfg.hydra.gate_loss > 0 or cfg.hydra.routing == "oracle" or cfg.hydra.oracle_epochs):
            raise HydraError("hydra.partition is not set, but the gate loss / oracle routing needs the subtasks; "
                             "make one with `hydranets partition BASELINE_RUN` or set hydra.partition=PATH")
        return None
    return Partition.load(cfg.hydra.partition, expected_num_classes=len(class_names),
                          expected_class_names=class_names)


def lr_at(cfg: Config, step: int, total: int) -> float:
    """Learning rate at optimiser step ``step`` of ``total``: linear warm-up, then the schedule.

    With ``optim.schedule_epochs``/``schedule_start`` the run covers a window of a longer schedule, so a
    HydraNet can finish the schedule its baseline started instead of restarting one.
    """
    o = cfg.optim
    steps_per_epoch = total / cfg.train.epochs
    step += round(o.schedule_start * steps_per_epoch)
    total = round((o.schedule_epochs or cfg.train.epochs) * steps_per_epoch)
    warmup = min(int(o.warmup_epochs * steps_per_epoch), total // 2)  # a schedule shorter than the warm-up still decays
    if step < warmup:
        return o.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    if o.schedule == "cosine":
        return o.lr * 0.5 * (1 + math.cos(math.pi * t))
    if o.schedule == "onecycle":
        return o.lr * max(0.0, 1 - t)
    return o.lr


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """SGD or AdamW, without weight decay on biases and norms.

    A HydraNet's branches may take their own multipliers of the learning rate and weight decay
    (``hydra.branch_lr_scale``, ``hydra.branch_decay_scale``): a branch sees only about k/B of each batch,
    so its share of the batch-mean gradient is that much smaller while its weight decay is not.
    """
    h = cfg.hydra
    scaled = isinstance(model, HydraNet) and (h.branch_lr_scale != 1.0 or h.branch_decay_scale != 1.0)
    branch = {id(p) for p in model.branches.parameters()} if scaled else set()
    decay, no_decay, branch_decay, branch_no_decay = [], [], [], []
    for p in model.parameters():
        if id(p) in branch:
            (branch_decay if p.dim() > 1 else branch_no_decay).append(p)
        else:
            (decay if p.dim() > 1 else no_decay).append(p)
    wd = cfg.optim.weight_decay
    groups = [{"params": decay, "weight_decay": wd, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    if scaled:
        groups += [{"params": branch_decay, "weight_decay": wd * h.branch_decay_scale, "lr_scale": h.branch_lr_scale},
                   {"params": branch_no_decay, "weight_decay": 0.0, "lr_scale": h.branch_lr_scale}]
    if cfg.optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.optim.lr)
    return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov)


def channels_last_hazard(model: nn.Module) -> str | None:
    """The name of a convolution whose channels_last backward pass crashes PyTorch on the CPU, or None.

    Seen with torch 2.13 on AVX2 CPUs: a 1x1 convolution with stride 2 and fewer than 8 input channels
    (e.g. the downsampling shortcut of a CIFAR ResNet below half width) segfaults on one thread and hangs on
    three; the contiguous layout runs it fine.
    """
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1 and m.in_channels < 8:
            return name
    return None


def load_trained(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """A trained model in eval mode from a run folder, a checkpoint or a ``model.safetensors``, with its
    checkpoint dict (for safetensors: the weights and the metadata written with them)."""
    file = resolve_checkpoint(path)
    ckpt = load_safetensors(file) if file.suffix == ".safetensors" else load_checkpoint(file)
    import_modules(ckpt.get("config", {}).get("model", {}).get("modules", []) or ckpt.get("modules", []))
    info = ckpt["model_info"]
    part = Partition.from_dict(ckpt["partition"]) if ckpt.get("partition") else None
    topk = ckpt.get("topk", ckpt.get("config", {}).get("hydra", {}).get("topk", 1))
    model = build_model(info, part, topk=topk)
    load_state(model, ckpt["model"], file)
    return model.to(distributed.pick_device(device) if isinstance(device, str) else device).eval(), ckpt


def run_config(ckpt: dict, path: str | Path, needs: str) -> Config:
    """The training config a checkpoint of ``hydranets train`` holds (its data set, for ``needs``); a model saved
    with :func:`hydranets.save_model` has none, which is one clear error."""
    if "config" not in ckpt:
        raise HydraError(f"{path} holds a model saved with hydranets.save_model, without the data set it was trained "
                         f"on, which {needs} needs: give a run folder of hydranets train")
    return config_from_dict(ckpt["config"])


# ---------------------------------------------------------------- the loop
def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict:
    """Train ``cfg`` into its run folder ``cfg.out`` and return the summary."""
    rt = distributed.setup(cfg.train.device)
    try:
        return _train(cfg, rt, resume, overwrite)
    except BaseException:
        if overwrite and rt.is_main:
            settle_replaced(Path(cfg.out), succeeded=False)
        raise
    finally:
        distributed.teardown(rt)


def check_optim(o: OptimConfig) -> None:
    """Optimiser settings that would fail inside torch, or train nonsense, refused before anything is written."""
    for key, ok, need in (("lr", o.lr > 0, "> 0"), ("momentum", 0 <= o.momentum < 1, "in [0, 1)"),
                          ("weight_decay", o.weight_decay >= 0, ">= 0"),
                          ("label_smoothing", 0 <= o.label_smoothing < 1, "in [0, 1)"),
                          ("warmup_epochs", o.warmup_epochs >= 0, ">= 0"), ("grad_clip", o.grad_clip >= 0, ">= 0"),
                          ("schedule_epochs", o.schedule_epochs is None or is_positive_real(o.schedule_epochs),
                           "> 0, or null for train.epochs")):
        if not ok:
            raise HydraError(f"optim.{key} must be {need}, got {getattr(o, key)!r}")
    sgd_only = [k for k in ("momentum", "nesterov") if getattr(o, k) != getattr(OptimConfig, k)]
    if o.name == "adamw" and sgd_only:
        raise HydraError(f"optim.{sgd_only[0]} is an SGD setting that AdamW does not use (it keeps its default betas); "
                         f"leave optim.momentum and optim.nesterov at their defaults, or use optim.name=sgd")


def _train(cfg: Config, rt: distributed.Runtime, resume: bool, overwrite: bool) -> dict:
    out, t = Path(cfg.out), cfg.train
    # cheap checks first: bad input must not create, or (with --overwrite) delete, a run folder
    check_run_dir(out, cfg, resume, overwrite)
    if resume and (out / "summary.json").exists():
        if rt.is_main:
            print(f"{out}: already finished; nothing to do", file=sys.stderr)
        return json.loads((out / "summary.json").read_text())
    for key, least in (("epochs", 1), ("batch_size", 1), ("eval_batch_size", 1), ("accum_steps", 1), ("threads", 0)):
        value = getattr(t, key)
        if not is_whole(value, least):
            raise HydraError(f"train.{key} must be an integer >= {least}, got {value!r}")
    check_optim(cfg.optim)
    if not (cfg.data.mixup == 0 or is_positive_real(cfg.data.mixup)):
        raise HydraError(f"data.mixup must be a finite number >= 0 (alpha of its Beta(alpha, alpha); 0 turns it off), "
                         f"got {cfg.data.mixup!r}")
    t.precision = run_precision(out, t.precision, rt.device, resume, say=rt.is_main)
    if t.precision == "fp16" and rt.device.type != "cuda":
        raise HydraError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    if t.batch_size % (rt.world_size * t.accum_steps):
        raise HydraError(f"train.batch_size={t.batch_size} must divide evenly over {rt.world_size} process(es) "
                         f"x {t.accum_steps} accumulation step(s)")
    o = cfg.optim
    if o.schedule_start < 0 or o.schedule_start + t.epochs > (o.schedule_epochs or t.epochs) + 1e-9:
        raise HydraError(f"optim.schedule_start={o.schedule_start} + train.epochs={t.epochs} must lie within "
                         f"optim.schedule_epochs={o.schedule_epochs or t.epochs}; lengthen the schedule or train fewer epochs")
    h = cfg.hydra
    if h.enabled and h.train_topk is not None and not (isinstance(h.train_topk, int) and 1 <= h.train_topk <= h.num_branches):
        raise HydraError(f"hydra.train_topk must be an integer from 1 to hydra.num_branches ({h.num_branches}), "
                         f"got {h.train_topk!r}; or null to train with hydra.topk")
    if h.enabled and h.routing == "soft" and (h.oracle_epochs or h.train_topk is not None):
        raise HydraError("hydra.routing=soft runs every branch in training, so hydra.oracle_epochs and "
                         "hydra.train_topk (top-k settings) would do nothing; set them to 0 / null or use routing=topk")
    if (h.enabled and h.gate_weighting == "softmax" and h.routing != "soft" and (h.train_topk or h.topk) == 1
            and rt.is_main):
        print("note: hydra.gate_weighting=softmax over top-1 routing weights each image's one branch by 1, so the gate "
              "learns from its own losses only (as with none); sigmoid lets the task loss reach it", file=sys.stderr)
    if h.enabled and h.balance_loss < 0:
        raise HydraError(f"hydra.balance_loss={h.balance_loss} must be >= 0 (0 turns it off)")
    if h.enabled and not (h.branch_lr_scale > 0 and h.branch_decay_scale >= 0):
        raise HydraError(f"hydra.branch_lr_scale={h.branch_lr_scale} must be > 0 and hydra.branch_decay_scale="
                         f"{h.branch_decay_scale} >= 0 (1 and 1: the branches train like every other layer)")
    if h.enabled and h.branch_norm_group and not (isinstance(h.branch_norm_group, int) and h.branch_norm_group >= 2):
        raise HydraError(f"hydra.branch_norm_group must be an integer >= 2 (images per normalisation group in the "
                         f"branches while training), got {h.branch_norm_group!r}; or 0 for whole batches")
    if h.enabled and h.share_branch_norms and not h.share_branch_weights:
        raise HydraError("hydra.share_branch_norms=true ties the branches' normalisation layers on top of their "
                         "weights; set hydra.share_branch_weights=true too")
    d = cfg.distill
    if bool(d.teacher) != (d.weight > 0) or not (0 <= d.weight <= 1 and d.temperature > 0):
        raise HydraError(f"distill needs both a teacher and a weight in (0, 1] (the share of the loss), and a temperature "
                         f"> 0; got teacher={d.teacher!r}, weight={d.weight}, temperature={d.temperature}"
                         + (" (e.g. distill.weight=0.5)" if d.teacher and d.weight == 0 else ""))
    if not all(isinstance(e, int) and not isinstance(e, bool) and 1 <= e <= t.epochs for e in t.keep_epochs):
        raise HydraError(f"train.keep_epochs must list epochs from 1 to train.epochs ({t.epochs}), got {t.keep_epochs!r}")
    if cfg.hydra.enabled and cfg.hydra.upcycle is True and not cfg.hydra.init_from:
        raise HydraError("hydra.upcycle=true needs hydra.init_from=BASELINE_RUN (the trained network to copy)")
    import_modules(cfg.model.modules)
    if not is_model(cfg.model.name):
        create_model(cfg.model.name)  # raises the unknown-model error (with close matches) before any data is read
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)

    loader, test_loader, spec = distributed.main_first(rt, lambda: make_loaders(cfg, rt))
    num_classes = len(spec.classes)
    partition = load_partition(cfg, spec.classes)
    info = model_info(cfg, num_classes, spec.in_chans)
    model = build_model(info, partition, cfg.hydra.topk)
    hydra = model if isinstance(model, HydraNet) else None
    if hydra is not None and not cfg.hydra.enabled:  # a HydraNet preset as model.name: the hydra section's losses apply
        if (partition := load_partition(cfg, spec.classes, hydra=True)) is not None:
            hydra.set_partition(partition)
    fresh = not (resume and (out / CHECKPOINT).exists())
    if hydra is not None and cfg.hydra.init_from and fresh:
        upcycled = init_stem_from(hydra, cfg.hydra.init_from, cfg.hydra.upcycle)
        if rt.is_main:
            print(f"every part from {cfg.hydra.init_from}, its branches copied into this one's {hydra.num_branches}"
                  if "classifier" in upcycled else
                  f"stem from {cfg.hydra.init_from}; " + (f"{' and '.join(upcycled)} upcycled from its last stages"
                  if upcycled else "branches and gate start fresh" + (
                      " (upcycling needs hydra.branch_width=1.0 or hydra.gate_width=1.0)"
                      if cfg.hydra.upcycle is None else "")), file=sys.stderr)
    if hydra is not None and cfg.hydra.branch_norm_group:
        ghost_branch_norms(hydra.branches, cfg.hydra.branch_norm_group)
    if t.channels_last and rt.device.type == "cpu" and (conv := channels_last_hazard(model)):
        t.channels_last = loader.channels_last = test_loader.channels_last = False
        if rt.is_main:
            print(f"note: train.channels_last=false for this model on the CPU: the backward pass of its 1x1 strided "
                  f"convolution {conv!r} with fewer than 8 input channels crashes PyTorch's channels_last CPU "
                  f"kernels (torch {torch.__version__})", file=sys.stderr)
    teacher = None
    if cfg.distill.teacher and cfg.distill.weight > 0:
        teacher, _ = load_trained(cfg.distill.teacher, rt.device)
    if rt.is_main:  # only now, with data and model built: bad input never creates or clears a run folder
        prepare_run_dir(out, overwrite)
    distributed.barrier(rt)
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    model = model.to(rt.device, memory_format=memory_format)
    optimizer = make_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda", enabled=t.precision == "fp16")

    total_steps = t.epochs * len(loader)

    start_epoch = 0
    if resume and (out / CHECKPOINT).exists():
        ckpt = load_checkpoint(out / CHECKPOINT)
        check_compatible(ckpt["model_info"], info, out / CHECKPOINT)
        load_state(model, ckpt["model"], out / CHECKPOINT)
        settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, setting in zip(optimizer.param_groups, settings):  # this config's settings, the saved state
            group.update(setting)
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        start_epoch = ckpt["epoch"]
        if rt.is_main:
            print(f"resuming {out} after epoch {start_epoch}", file=sys.stderr)
    if rt.is_main:
        truncate_metrics(out, start_epoch)  # also for a fresh start where a run was killed before its first checkpoint
        save_config(cfg, out / "config.yaml")

    net = model
    if rt.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
            find_unused_parameters=hydra is not None and cfg.hydra.routing != "soft")
    if t.compile:
        net = torch.compile(net)
    writer = _tensorboard(out) if t.tensorboard and rt.is_main else None

    about = {"config": cfg.to_dict(), "model_info": info, "topk": hydra.topk if hydra else cfg.hydra.topk,
             "inputs": spec.to_dict(),
             "partition": partition.to_dict() if partition is not None else None}  # what loading the weights needs
    for epoch in range(start_epoch, t.epochs):
        loader.set_epoch(epoch)
        stats = train_one_epoch(cfg, net, model, hydra, teacher, loader, optimizer, scaler, epoch, total_steps, rt)
        row = {"epoch": epoch + 1, **stats}
        if rt.is_main:
            ev = evaluate(model, test_loader, precision=t.precision)
            row.update({"test_top1": ev["top1"], "test_top5": ev["top5"]})
            if hydra is not None:
                row.update({"gate_recall": ev.get("gate_recall"), "branch_load": ev["branch_load"]})
            append_metrics(out, row)  # before the checkpoint: a resumed run drops rows the checkpoint lacks
            ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "epoch": epoch + 1, "rng": {"cpu": torch.get_rng_state()}, **about}
            if epoch + 1 in t.keep_epochs:
                atomic_save(ckpt, out / kept_checkpoint(epoch + 1))
            atomic_save(ckpt, out / CHECKPOINT)
            if overwrite:
                settle_replaced(out, succeeded=True)
            if writer is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)):
                        writer.add_scalar(k, v, epoch + 1)
            print(_epoch_line(row, t.epochs), file=sys.stderr)
        distributed.barrier(rt)

    summary = {}
    if rt.is_main:
        save_safetensors(model, out / "model.safetensors", about)
        last = read_metrics(out)[-1] if t.epochs else {}
        summary = {"finished": True, "epochs": t.epochs, "model": cfg.model.name, "hydra": cfg.hydra.enabled,
                   "num_classes": num_classes, "world_size": rt.world_size, **{k: v for k, v in last.items()
                                                                               if not isinstance(v, list)},
                   "machine": machine_info(rt.device)}
        atomic_write_text(json.dumps(summary, indent=1), out / "summary.json")
    if writer is not None:
        writer.close()
    return summary


def train_one_epoch(cfg: Config, net: nn.Module, model: nn.Module, hydra: HydraNet | None, teacher: nn.Module | None,
                    loader: Iterable, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, epoch: int,
                    total_steps: int, rt: distributed.Runtime) -> dict:
    """One pass over the training batches; the epoch's mean loss, last learning rate and speed."""
    t, h = cfg.train, cfg.hydra
    model.train()
    g = torch.Generator().manual_seed(t.seed * 100003 + epoch)  # loop randomness (mixup, annealed routing)
    steps = len(loader)
    bar = _progress(steps, f"epoch {epoch + 1}/{t.epochs}", t.progress and rt.is_main)
    loss_sum = torch.zeros((), device=rt.device)
    seen, wait, start = 0, 0.0, time.perf_counter()
    batches = iter(loader)
    for i in range(steps):
        tw = time.perf_counter()
        x, y = next(batches)
        wait += time.perf_counter() - tw
        step = epoch * steps + i
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step, total_steps) * group.get("lr_scale", 1.0)
        force = None
        if hydra is not None:
            p_oracle = 1.0 if h.routing == "oracle" else (max(0.0, 1 - (epoch + i / steps) / h.oracle_epochs)
                                                           if h.oracle_epochs else 0.0)
            if p_oracle > 0:
                keep = (torch.rand(y.shape[0], generator=g) < p_oracle).to(rt.device)
                force = hydra.gate_targets(y) * keep[:, None]
        mix = None
        if cfg.data.mixup > 0:
            lam = float(torch.distributions.Beta(cfg.data.mixup, cfg.data.mixup).sample())
            perm = torch.randperm(y.shape[0], generator=g).to(rt.device)
            x = lam * x + (1 - lam) * x[perm]
            mix = (lam, perm)
        micro = [slice(j, None, t.accum_steps) for j in range(t.accum_steps)]
        for j, sl in enumerate(micro):
            sync = j == t.accum_steps - 1 or not rt.distributed
            with (nullcontext() if sync else net.no_sync()):
                with autocast_for(rt.device, t.precision):
                    loss = compute_loss(cfg, net, hydra, teacher, x[sl], y[sl], force[sl] if force is not None
                                        else None, mix and (mix[0], mix[1][sl]), y) / t.accum_steps
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if cfg.optim.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        seen += y.shape[0]
        if i % 20 == 0 or i == steps - 1:  # every process checks the same steps, so all stop together
            try:
                _check_finite(distributed.mean_over_ranks(loss_sum, rt), epoch, i, cfg)
            except HydraError:
                if bar is not None:
                    bar.close()  # the error line then starts a line of its own
                raise
            if bar is not None:
                bar.set_postfix(loss=f"{loss_sum.item() / (i + 1):.3f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}",
                                refresh=False)  # drawn with the next update, at the bar's own interval
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - start
    loss_sum = distributed.mean_over_ranks(loss_sum, rt)  # each process saw its own shard of the batches
    mean_loss = loss_sum.item() / max(steps, 1)
    _check_finite(loss_sum, epoch, steps, cfg)
    return {"train_loss": mean_loss, "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": seen * rt.world_size / elapsed, "data_wait": wait / elapsed, "epoch_s": elapsed}


def compute_loss(cfg: Config, net: nn.Module, hydra: HydraNet | None, teacher: nn.Module | None,
                 x: torch.Tensor, y: torch.Tensor, force: torch.Tensor | None,
                 mix: tuple[float, torch.Tensor] | None, all_y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (+ lambda x gate BCE and a load-balancing loss for a HydraNet, + distillation from a teacher)."""
    ls = cfg.optim.label_smoothing
    if hydra is None:
        logits, gate_logits, route = net(x), None, None
    else:
        routing = "soft" if cfg.hydra.routing == "soft" else "topk"
        out = net(x, routing=routing, topk=cfg.hydra.train_topk, force=force, return_gate=True)
        logits, gate_logits, route = out.logits, out.gate_logits, out.route

    def ce(target):
        return F.cross_entropy(logits.float(), target, label_smoothing=ls)

    if mix is None:
        loss = ce(y)
    else:
        lam, perm = mix
        loss = lam * ce(y) + (1 - lam) * ce(all_y[perm])
    if gate_logits is not None and cfg.hydra.gate_loss > 0:
        target = hydra.gate_targets(y)
        if mix is not None:
            target = lam * target + (1 - lam) * hydra.gate_targets(all_y[perm])
        loss = loss + cfg.hydra.gate_loss * F.binary_cross_entropy_with_logits(gate_logits.float(), target)
    if gate_logits is not None and cfg.hydra.balance_loss > 0:  # soft routing: balance the top-k that inference runs
        chosen = route if route is not None else topk_route(gate_logits.detach(), hydra.topk)
        loss = loss + cfg.hydra.balance_loss * balance_loss(gate_logits, chosen)
    if teacher is not None:
        T, w = cfg.distill.temperature, cfg.distill.weight
        with torch.no_grad():
            soft = F.softmax(teacher(x).float() / T, 1)
        kd = F.kl_div(F.log_softmax(logits.float() / T, 1), soft, reduction="batchmean") * T * T
        loss = (1 - w) * loss + w * kd
    return loss


def _check_finite(loss_sum: torch.Tensor, epoch: int, step: int, cfg: Config) -> None:
    if not torch.isfinite(loss_sum):
        ckpt = Path(cfg.out) / CHECKPOINT
        kept = (f"the last good checkpoint is kept in {ckpt}" if ckpt.exists() else
                f"no checkpoint was written yet ({ckpt})")
        raise HydraError(f"loss became {loss_sum.item()} in epoch {epoch + 1} (by step {step}); {kept}; "
                         "lower optim.lr or set optim.grad_clip")


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    interactive = sys.stderr.isatty()  # in a log file, a bar redrawn ten times a second is megabytes of noise
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True,
                mininterval=0.1 if interactive else 60.0)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise HydraError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(out / "tensorboard"))


def _epoch_line(row: dict, epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['train_loss']:.3f}", f"top1 {row['test_top1']:.2f}",
             f"top5 {row['test_top5']:.2f}"]
    if row.get("gate_recall") is not None:
        parts.append(f"gate recall {row['gate_recall']:.1f}")
    parts += [f"{row['images_per_s']:.0f} img/s", f"data wait {100 * row['data_wait']:.1f}%"]
    return " | ".join(parts)
