"""The end-to-end pipeline: baseline -> subtasks -> HydraNet -> evaluation at every k -> report.

Each step is resumable: a finished step is skipped, a killed training continues from its checkpoint.
"""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .checkpoint import atomic_write_text, check_writable, kept_checkpoint
from .config import Config, save_config
from .cost import active_params, compare_speed, count_params, first_images, model_macs, unsteady_note
from .errors import HydraError
from .evaluate import AUTOCAST_DTYPES, evaluate
from .hydranet import HydraNet
from .partition import Partition, check_partition_seed, class_mean_outputs, format_partition, make_partition
from .run_folder import PIPELINE_FILES, RUN_FILES, holds, saved_config
from .train import load_data, load_trained, run_config, train

# Settings that may change between a pipeline run and its resumption.
_FREE = {("train", "progress"), ("train", "threads"), ("train", "device"), ("pipeline", "speed_repeats"),
         ("pipeline", "fold_batchnorms")}


def stage_configs(cfg: Config) -> tuple[Config, Config]:
    """The baseline's and the HydraNet's training configs, inside the pipeline folder."""
    out = Path(cfg.out)
    base = copy.deepcopy(cfg)
    base.out, base.hydra.enabled = str(out / "baseline"), False
    hyd = copy.deepcopy(cfg)
    hyd.out, hyd.hydra.enabled, hyd.hydra.partition = str(out / "hydranet"), True, str(out / "partition.json")
    hyd.train.epochs = cfg.pipeline.hydra_epochs or cfg.train.epochs
    if cfg.pipeline.init_stem:
        hyd.hydra.init_from = str(out / "baseline")
    fork = cfg.pipeline.fork_epoch
    if fork is not None:  # the HydraNet takes over the baseline's schedule mid-way: both train train.epochs in all
        base.train.keep_epochs = sorted({*base.train.keep_epochs, fork})
        hyd.hydra.init_from = str(out / "baseline" / kept_checkpoint(fork))
        hyd.train.epochs = cfg.train.epochs - fork
        hyd.optim.schedule_epochs, hyd.optim.schedule_start = cfg.optim.schedule_epochs or cfg.train.epochs, fork
    if cfg.pipeline.distill > 0:
        hyd.distill.teacher, hyd.distill.weight = str(out / "baseline"), cfg.pipeline.distill
    return base, hyd


def check_pipeline_dir(cfg: Config) -> None:
    """A pipeline folder made with another config is refused once it holds results, so nothing computed is mixed or
    lost; before that (e.g. after a config that failed before training) it takes the new config."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise HydraError(f"out={out} is a file; the pipeline needs a folder: give another out=")
    check_writable(out / "config.yaml")
    if found := holds(out, RUN_FILES):
        raise HydraError(f"out={out} holds a training run ({', '.join(found)}), not a pipeline, and is never mixed "
                         "with one: give the pipeline another out=")
    saved = out / "config.yaml"
    if saved.exists() and holds(out, PIPELINE_FILES):
        old, new = saved_config(out).to_dict(), cfg.to_dict()
        for section, values in new.items():
            if not isinstance(values, dict):
                continue
            for key, value in values.items():
                if (section, key) not in _FREE and old[section].get(key) != value:
                    raise HydraError(f"pipeline folder {out} was made with {section}.{key}={old[section].get(key)!r}, "
                                     f"not {value!r}; use the same config or another out=")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, saved)


def check_pipeline_args(cfg: Config) -> None:
    """Settings that cannot work, alone or with this data set, caught before the baseline is trained."""
    p = cfg.pipeline
    check_partition_seed(cfg.partition.seed)
    for key, value in (("hydra_epochs", p.hydra_epochs), ("speed_batch", p.speed_batch),
                       ("speed_repeats", p.speed_repeats)):
        if value is not None and value < 1:
            raise HydraError(f"pipeline.{key}={value} must be at least 1")
    fork = p.fork_epoch
    if fork is not None and not 1 <= fork < cfg.train.epochs:
        raise HydraError(f"pipeline.fork_epoch={fork} must be from 1 to train.epochs-1={cfg.train.epochs - 1}; "
                         "or null to start the HydraNet from the finished baseline")
    if fork is not None and (p.hydra_epochs is not None or not p.init_stem or cfg.optim.schedule_start):
        raise HydraError("pipeline.fork_epoch sets the HydraNet's epochs, start and schedule itself; "
                         "leave pipeline.hydra_epochs and optim.schedule_start unset and pipeline.init_stem true")
    train_set, _ = load_data(cfg)
    n, h = len(train_set.classes), cfg.hydra
    empty = (torch.bincount(train_set.labels, minlength=n) == 0).nonzero().flatten().tolist()
    if empty:
        raise HydraError(f"class(es) {empty[:5]} have no training images (data.train_subset="
                         f"{cfg.data.train_subset}), and the subtasks need every class; take a larger train_subset")
    if not 1 <= h.num_branches <= n:
        raise HydraError(f"hydra.num_branches={h.num_branches} must be from 1 to the {n} classes of "
                         f"{cfg.data.name}; choose at most that many subtasks")
    if not 1 <= h.topk <= h.num_branches:
        raise HydraError(f"hydra.topk={h.topk} must be from 1 to hydra.num_branches={h.num_branches}")


def compute_partition(cfg: Config, baseline_run: str | Path, out_file: str | Path, num_subsets: int) -> Partition:
    """The paper's subtasks: mean softmax of the trained baseline per class on the training images, clustered."""
    from .data import BatchLoader
    model, ckpt = load_trained(baseline_run, _device(cfg))
    run_cfg = run_config(ckpt, baseline_run, "computing subtasks")
    train_set, _ = load_data(run_cfg)
    if num_subsets > len(train_set.classes):
        raise HydraError(f"{num_subsets} subtasks (hydra.num_branches, or partition -B) exceed the "
                         f"{len(train_set.classes)} classes of {run_cfg.data.name}; choose at most that many")
    batches = BatchLoader(train_set, cfg.train.eval_batch_size, train=False, device=_device(cfg),
                          channels_last=cfg.train.channels_last)
    ev = evaluate(model, batches, precision=cfg.train.precision, collect_probs=True)
    descriptors = class_mean_outputs(ev["probs"], ev["labels"], len(train_set.classes))
    confusion = descriptors if cfg.partition.method == "spectral" else None
    p = make_partition(cfg.partition.method, num_subsets=num_subsets, descriptors=descriptors, confusion=confusion,
                       num_classes=len(train_set.classes), seed=cfg.partition.seed, overlap=cfg.partition.overlap,
                       overlap_balanced=cfg.partition.overlap_balanced,
                       class_names=train_set.classes, seeds=cfg.partition.seeds)
    p.meta.update({"baseline": str(baseline_run), "dataset": run_cfg.data.name, "baseline_train_top1": ev["top1"],
                   "precision": ev["precision"]})
    p.save(out_file)
    return p


def _device(cfg: Config) -> torch.device:
    from .distributed import pick_device
    return pick_device(cfg.train.device)


def evaluate_models(cfg: Config, runs: dict[str, Path], say: Callable[[str], None] | None = None) -> dict:
    """Every model on the same test set in one process: accuracy, MACs/image, parameters, images/s (``say`` hears
    each model's top-1 as it is measured, and when the timing starts)."""
    say = say or (lambda msg: None)
    from .data import BatchLoader
    device = _device(cfg)
    _, test_set = load_data(cfg)
    batches = list(BatchLoader(test_set, cfg.train.eval_batch_size, train=False, device=device,
                               channels_last=cfg.train.channels_last, prefetch=False))
    size = tuple(test_set.images.shape[1:])
    rows, routing, candidates = [], None, {}
    for name, run in runs.items():
        model, ckpt = load_trained(run, device)
        model = model.to(memory_format=torch.channels_last) if cfg.train.channels_last else model
        ks = range(1, model.num_branches + 1) if isinstance(model, HydraNet) else [None]
        for k in ks:
            kw = {"topk": k} if k else {}
            ev = evaluate(model, batches, topk=k, precision=cfg.train.precision)
            label = f"{name} k={k}" if k else name
            rows.append({"name": name, "model": ckpt["model_info"]["name"], "k": k, "top1": ev["top1"],
                         "top5": ev["top5"], "macs": model_macs(model, size, **kw),
                         "params": count_params(model), "active_params": active_params(model, k),
                         "gate_recall": ev.get("gate_recall"), "label": label})
            candidates[label] = (model, kw)
            say(f"  {label}: top-1 {ev['top1']:.2f}%")
            if k == cfg.hydra.topk:
                routing = {"k": k, "matrix": ev.get("routing_matrix"), "load": ev["branch_load"]}
    say(f"  timing {len(candidates)} models at batch {cfg.pipeline.speed_batch} ({cfg.pipeline.speed_repeats} rounds)")
    speed = compare_speed(candidates, size, cfg.pipeline.speed_batch, repeats=cfg.pipeline.speed_repeats,
                          autocast=AUTOCAST_DTYPES.get(cfg.train.precision),
                          images=first_images(batches, cfg.pipeline.speed_batch), fold=cfg.pipeline.fold_batchnorms)
    for row in rows:
        row["images_per_s"] = speed[row.pop("label")]["images_per_s"]
    if note := unsteady_note(speed):
        print(note, file=sys.stderr, flush=True)
    return {"dataset": cfg.data.name, "num_classes": len(test_set.classes), "class_names": test_set.classes,
            "speed_batch": cfg.pipeline.speed_batch, "fold_batchnorms": cfg.pipeline.fold_batchnorms,
            "device": str(device), "rows": rows, "routing": routing}


def save_samples(cfg: Config, path: Path, per_class: int = 6) -> None:
    """A few test images of each class, for the report's subtask strips."""
    _, test_set = load_data(cfg)
    picks = []
    for c in range(len(test_set.classes)):
        idx = (test_set.labels == c).nonzero().flatten()[:per_class]
        imgs = test_set.images[idx]
        if len(idx) < per_class:
            imgs = torch.cat([imgs, imgs.new_zeros(per_class - len(idx), *imgs.shape[1:])])
        picks.append(imgs)
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        np.savez_compressed(f, images=torch.stack(picks).numpy())
    os.replace(part, path)


def format_table(result: dict) -> str:
    lines = [f"{'model':<22}{'k':>3}{'top-1':>8}{'top-5':>8}{'MMACs':>9}{'params(M)':>11}{'images/s':>10}"]
    for r in result["rows"]:
        lines.append(f"{r['name']:<22}{r['k'] or '-':>3}{r['top1']:>8.2f}{r['top5']:>8.2f}{r['macs'] / 1e6:>9.2f}"
                     f"{r['params'] / 1e6:>11.3f}{r['images_per_s']:>10.0f}")
    return "\n".join(lines)


def run_pipeline(cfg: Config) -> dict:
    """Run (or resume) every step into ``cfg.out`` and return the evaluation."""
    out = Path(cfg.out)
    check_pipeline_args(cfg)  # bad input fails before anything is trained or written
    check_pipeline_dir(cfg)
    base_cfg, hydra_cfg = stage_configs(cfg)  # train() resolves precision=auto; a resumed run keeps its own
    say = lambda msg: print(f"[pipeline] {msg}", file=sys.stderr)  # noqa: E731

    say(f"1/5 baseline {cfg.model.name} -> {base_cfg.out}")
    train(base_cfg, resume=True)
    cfg.train.precision = saved_config(Path(base_cfg.out)).train.precision  # subtasks and timings as it trained

    part_file = out / "partition.json"
    if part_file.exists():
        partition = Partition.load(part_file)
        say(f"2/5 subtasks: {part_file} (done)")
    else:
        say(f"2/5 subtasks: {cfg.partition.method} into {cfg.hydra.num_branches}")
        partition = compute_partition(cfg, base_cfg.out, part_file, cfg.hydra.num_branches)

    say(f"3/5 HydraNet B={cfg.hydra.num_branches} k={cfg.hydra.topk} -> {hydra_cfg.out}")
    train(hydra_cfg, resume=True)

    eval_file = out / "eval.json"
    if eval_file.exists():
        result = json.loads(eval_file.read_text())
        say("4/5 evaluation (done)")
    else:
        say(f"4/5 evaluation at k = 1..{cfg.hydra.num_branches}, speed at batch {cfg.pipeline.speed_batch}")
        result = evaluate_models(cfg, {"baseline": Path(base_cfg.out), "hydranet": Path(hydra_cfg.out)}, say)
        save_samples(cfg, out / "samples.npz")
        atomic_write_text(json.dumps(result, indent=1), eval_file)

    say("5/5 report")
    from .report import write_report
    html = write_report(out)
    print(format_partition(partition))
    print(format_table(result))
    print(f"report: {html}")
    return result
