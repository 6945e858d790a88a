"""Running a protocol: train what is missing (resuming), compute the subtasks, then evaluate every finished model on
one test set in one process (accuracy, routing diagnostics, MACs, measured speed side by side)."""
from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path

import torch

from ..checkpoint import kept_checkpoint, load_checkpoint, resolve_checkpoint
from ..config import Config, PartitionConfig, _merge, config_from_dict
from ..cost import compare_speed, count_params, first_images, model_macs
from ..errors import HydraError
from ..evaluate import AUTOCAST_DTYPES, evaluate, resolve_precision, subtask_recall
from ..machine import machine_info
from ..partition import Partition
from ..pipeline import _device, compute_partition
from ..train import load_data, load_trained, train
from .compare import compare_rows, trained_precisions
from .protocol import (all_entries, entry_partition_from, model_config, partition_path, partition_source, protocol_dir,
                       repeats_of, split_source, stops_early)
from .results import precision_list, read_results

def _finished(cfg: Config, role: str) -> str:
    if not (Path(cfg.out) / "summary.json").exists():
        raise HydraError(f"{role} {cfg.out} has not finished training; train it first "
                         f"(run without --only, or with --only {Path(cfg.out).name})")
    return cfg.out


def _kept(cfg: Config, name: str, epoch: int, role: str) -> str:
    """The checkpoint that entry ``name`` kept after ``epoch``; an error if it has not got there yet."""
    path = Path(cfg.out) / kept_checkpoint(epoch)
    if not path.exists():
        raise HydraError(f"{role} {cfg.out} has not reached epoch {epoch} yet; train it first "
                         f"(run without --only, or with --only {name})")
    return str(path)


def _say(proto: dict, message: str) -> None:
    print(f"[bench {proto['protocol']}] {message}", file=sys.stderr, flush=True)


def run_protocol(proto: dict, only_train: bool = False, only: list[str] | None = None) -> dict | None:
    """Train what is missing (resuming), then evaluate all models and write the results.

    ``only`` trains just the named entries (the runs they start from must have finished) and evaluates nothing, so that
    several processes can share one protocol's work without touching the same run folder.
    """
    protocol_dir(proto).mkdir(parents=True, exist_ok=True)
    say = functools.partial(_say, proto)
    entries = all_entries(proto)
    unknown = sorted(set(only or []) - {e["name"] for e in entries})
    if unknown:
        raise HydraError(f"--only {unknown[0]!r} is not an entry of protocol {proto['protocol']}")
    wanted = lambda e: only is None or e["name"] in only  # noqa: E731
    by_name = {e["name"]: e for e in entries}

    def with_teacher(cfg: Config) -> Config:
        """``distill.teacher`` may name a finished entry of the protocol, or be ``baseline``: the one the subtasks
        come from (``partition_from``)."""
        teacher = cfg.distill.teacher
        name = split_source(proto["partition_from"])[0] if teacher == "baseline" else teacher
        if name in by_name:
            cfg.distill.teacher = _finished(model_config(proto, by_name[name]), f"distill.teacher {teacher}")
        return cfg

    for entry in filter(wanted, proto["baselines"] + repeats_of(proto, "baseline")):
        say(f"baseline {entry['name']}")
        train(with_teacher(model_config(proto, entry)), resume=True)

    def partition_file(pcfg: PartitionConfig, b: int, ref: str) -> Path:
        path = partition_path(proto, pcfg, b, ref)
        if not path.exists():
            src_name, src_epoch = split_source(ref)
            src = partition_source(proto, ref)
            src_cfg = model_config(proto, src)
            src_role = "partition_from " + ("check" if src in proto.get("checks", []) else "baseline")
            source = _finished(src_cfg, src_role) if src_epoch is None else _kept(src_cfg, src_name, src_epoch, src_role)
            say(f"subtasks {path.stem.removeprefix('partition_')} from {ref}")
            cfg = copy.deepcopy(src_cfg)
            cfg.partition = copy.deepcopy(pcfg)
            compute_partition(cfg, source, path, b)
        return path

    hydras = proto["hydranets"] + proto.get("ablations", []) + repeats_of(proto, "hydranet")
    sources = {split_source(ref)[0] for e in filter(wanted, hydras)
               for ref in (e.get("hydra", {}).get("init_from"), entry_partition_from(proto, e)) if ref}
    for entry in proto.get("checks", []):  # checks that HydraNets start from, or take their subtasks from, train first
        if entry["name"] in sources and wanted(entry):
            say(f"check {entry['name']}")
            train(with_teacher(model_config(proto, entry)), resume=True)
    for entry in filter(wanted, hydras):
        cfg = model_config(proto, entry)
        cfg.hydra.enabled = True
        cfg.hydra.partition = str(partition_file(cfg.partition, cfg.hydra.num_branches,
                                                 entry_partition_from(proto, entry)))
        if cfg.hydra.init_from == "baseline":  # the trained baseline of the same backbone, if the protocol has one
            same = [model_config(proto, e) for e in proto["baselines"]]
            same = [c for c in same if c.model.name == cfg.model.name and c.model.kwargs == cfg.model.kwargs]
            cfg.hydra.init_from = _finished(same[0], "init_from baseline") if same and cfg.hydra.stem_width == 1.0 \
                else None
        elif cfg.hydra.init_from and split_source(cfg.hydra.init_from)[0] in by_name:  # finished, or at a kept epoch
            name, epoch = split_source(cfg.hydra.init_from)
            source = model_config(proto, by_name[name])
            cfg.hydra.init_from = _finished(source, "init_from") if epoch is None else \
                _kept(source, name, epoch, "init_from")
        say(f"hydranet {entry['name']}")
        train(with_teacher(cfg), resume=True)
    for entry in filter(wanted, proto.get("checks", [])):  # plain networks outside the families, e.g. a baseline trained twice as long
        say(f"check {entry['name']}")
        train(with_teacher(model_config(proto, entry)), resume=True)
    if only_train or only:
        return None
    return evaluate_protocol(proto)


def total_epochs(ckpt: dict) -> int:
    """Epochs of training behind a checkpoint: its own plus those of the run it started from (``hydra.init_from``)."""
    source = ckpt["config"].get("hydra", {}).get("init_from")
    return ckpt["epoch"] + (total_epochs(load_checkpoint(resolve_checkpoint(source))) if source else 0)


def _main_partition(proto: dict) -> Path | None:
    """The k-means partition the HydraNet family uses (its first member's B), if it has been computed."""
    if not proto["hydranets"]:
        return None
    cfg = model_config(proto, proto["hydranets"][0])
    path = partition_path(proto, cfg.partition, cfg.hydra.num_branches)
    return path if path.exists() else None


def _test_setup(proto: dict) -> dict:
    """What every evaluation of a protocol shares: the device, the precision and the test set as batches."""
    base_cfg = config_from_dict(_merge(copy.deepcopy(proto["base"]), {}))
    device = _device(base_cfg)
    from ..data import BatchLoader
    _, test_set = load_data(base_cfg)
    partition = _main_partition(proto)
    return {"cfg": base_cfg, "device": device, "precision": resolve_precision(base_cfg.train.precision, device),
            "test_set": test_set, "size": tuple(test_set.images.shape[1:]),
            "batches": list(BatchLoader(test_set, 256, train=False, device=device, prefetch=False)),
            "membership": Partition.load(partition).membership() if partition else None}


def _evaluate_entry(proto: dict, family: str, entry: dict, setup: dict) -> tuple[dict, torch.nn.Module, dict]:
    """One finished model on the test set: its row (accuracy, routing diagnostics, MACs, parameters; no speed), the
    model and the keyword arguments its cost and speed are measured with."""
    model, ckpt = load_trained(Path(model_config(proto, entry).out), setup["device"])
    model = model.to(memory_format=torch.channels_last)
    k = ckpt.get("topk") if ckpt["model_info"]["hydra"] else None
    kw = {"topk": k} if k else {}
    membership = setup["membership"]
    ev = evaluate(model, setup["batches"], topk=k, precision=setup["precision"], collect_probs=k is None,
                  true_route=k is not None and membership is not None, shuffled_branches=k is not None)
    if k is None and membership is not None:
        ev["subtask_recall"] = subtask_recall(ev["probs"], ev["labels"], membership)
    row = {"name": entry["name"], "family": family, "curve": entry.get("family"), "repeat_of": entry.get("repeat_of"),
           "model": ckpt["model_info"]["name"], "k": k,
           "top1": ev["top1"], "top5": ev["top5"], "gate_recall": ev.get("gate_recall"),
           "true_route_top1": ev.get("true_route_top1"), "shuffled_top1": ev.get("shuffled_top1"),
           "busiest_branch": 100 * max(ev["branch_load"]) if ev.get("branch_load") else None,
           "subtask_recall": ev.get("subtask_recall"),
           "macs": model_macs(model, setup["size"], **kw), "params": count_params(model),
           "epochs": ckpt["epoch"], "total_epochs": total_epochs(ckpt),
           "partial_schedule": stops_early(ckpt["config"]),
           "train_precision": ckpt.get("config", {}).get("train", {}).get("precision")}
    return row, model, kw


def evaluate_protocol(proto: dict) -> dict:
    """Every finished model of the protocol on one test set in one process, and the two families compared."""
    setup = _test_setup(proto)
    rows, candidates, not_run, missing = [], {}, [], []
    for family, entries in (("baseline", proto["baselines"]), ("hydranet", proto["hydranets"]),
                            ("ablation", proto.get("ablations", [])), ("check", proto.get("checks", [])),
                            ("repeat", proto.get("repeats", []))):
        for entry in entries:
            if not (Path(model_config(proto, entry).out) / "summary.json").exists():  # listed as not run; a family
                not_run.append(entry["name"])                                           # member named as missing
                if family in ("baseline", "hydranet"):
                    missing.append(entry["name"])
                    print(f"warning: {family} {entry['name']} has not finished training; the {family} curve is "
                          "compared without it", file=sys.stderr, flush=True)
                continue
            _say(proto, f"evaluating {entry['name']} on {len(setup['test_set'])} test images")
            row, model, kw = _evaluate_entry(proto, family, entry, setup)
            rows.append(row)
            candidates[entry["name"]] = (model, kw)
    mixed = trained_precisions(rows)
    if len(mixed) > 1:
        print(f"warning: the models were trained in different precisions ({precision_list(mixed)}); compare "
              "within one, or retrain the others with train.precision set", file=sys.stderr, flush=True)
    for family in ("baseline", "hydranet"):
        if not any(r["family"] == family for r in rows):
            raise HydraError(f"no {family} of protocol {proto['protocol']} has finished training; train them first "
                             "(run without --eval-only)")
    speed_batches = proto.get("speed_batches", [256, 1])
    fold = proto.get("fold_batchnorms", True)
    precision = setup["precision"]
    images = first_images(setup["batches"], max(speed_batches))
    for bs in speed_batches:
        _say(proto, f"timing {len(candidates)} models at batch {bs} (median of {proto.get('speed_repeats', 5)} "
                    "interleaved runs)")
        speed = compare_speed(candidates, setup["size"], bs, repeats=proto.get("speed_repeats", 5),
                              autocast=AUTOCAST_DTYPES.get(precision), images=images, fold=fold)
        for r in rows:
            r[f"images_per_s_b{bs}"] = speed[r["name"]]["images_per_s"]
    test_set = setup["test_set"]
    return compare_rows({"protocol": proto["protocol"], "dataset": setup["cfg"].data.name,
                         "classes": len(test_set.classes), "device": str(setup["device"]), "precision": precision,
                         "torch": torch.__version__, "threads": torch.get_num_threads(), "fold_batchnorms": fold,
                         "machine": machine_info(setup["device"]),
                         "test_images": len(test_set), "rows": rows, "not_run": not_run,
                         "trained_precisions": mixed, "missing_members": missing})


def add_repeats(proto: dict, results_dir: str | Path) -> dict:
    """The saved results with the protocol's newly finished repeats and ablations added, without evaluating the rest
    again.

    A repeat adds its accuracy (the same on any run of the same test set, weights and precision), so the means over
    repeats and their comparisons are recomputed; its speed is not timed, as speeds compare only when measured side
    by side, and the means keep the speeds of the evaluation that timed every model (a repeat is its member's
    network). An ablation joins the same way, untimed, so its family is compared in MACs only. This lets seeds and
    ablations be added in a checkout that lacks the other models' run folders."""
    path = Path(results_dir) / f"{proto['protocol']}.json"
    if not path.exists():
        raise HydraError(f"{path} does not exist; evaluate every model first (--eval-only), then add repeats to it")
    saved = read_results(path)
    have = {r["name"] for r in saved["rows"]}
    new = [(family, e) for family, entries in (("ablation", proto.get("ablations", [])),
                                               ("repeat", proto.get("repeats", [])))
           for e in entries if e["name"] not in have and (Path(model_config(proto, e).out) / "summary.json").exists()]
    if not new:
        raise HydraError(f"no repeat or ablation of protocol {proto['protocol']} has finished training that {path} "
                         "lacks; add one to the protocol's repeats or ablations and train it with --only NAME first")
    have |= {e["name"] for _, e in new}
    orphan = next((e for family, e in new if family == "repeat" and e["repeat_of"] not in have), None)
    if orphan:
        raise HydraError(f"repeat {orphan['name']!r} repeats {orphan['repeat_of']!r}, which {path} does not hold; "
                         "evaluate every model with --eval-only instead")
    setup = _test_setup(proto)
    if setup["precision"] != saved["precision"] or len(setup["test_set"]) != saved.get("test_images"):
        raise HydraError(f"{path} was evaluated in {saved['precision']} on {saved.get('test_images')} test images, "
                         f"this evaluation would be in {setup['precision']} on {len(setup['test_set'])}; set "
                         "train.precision (or the data) to match, or evaluate every model with --eval-only")
    speeds = [k for k in saved["rows"][0] if k.startswith("images_per_s_b")]
    rows = saved["rows"] + [{**_evaluate_entry(proto, family, e, setup)[0], **{k: None for k in speeds}}
                            for family, e in new]
    names = [e["name"] for _, e in new]
    added = saved.get("added_untimed", []) + [{"names": names, "torch": torch.__version__,
                                               "device": str(setup["device"]), "machine": machine_info(setup["device"])}]
    return compare_rows({**saved, "rows": rows, "not_run": [n for n in saved.get("not_run", []) if n not in names],
                         "trained_precisions": trained_precisions(rows), "added_untimed": added})


def finished_entries(proto: dict) -> set[str]:
    """Names of the protocol's entries whose runs have finished training (an evaluation would include them)."""
    return {e["name"] for e in all_entries(proto) if (Path(model_config(proto, e).out) / "summary.json").exists()}

