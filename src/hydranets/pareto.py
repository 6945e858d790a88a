"""The paper's claim as a benchmark: a baseline family against a HydraNet family, trained alike.

A protocol (YAML) names shared settings, the baseline family, the baseline (or check) the subtasks come from,
the HydraNet family, ablations, checks and repeats (members trained again, e.g. with another seed).
Every model is its own resumable run folder; evaluation runs all models on one test set in one
process, and the comparison is reported as the iso-accuracy saving (baseline MACs / HydraNet MACs at
the same top-1) and the equal-cost accuracy gain, in counted multiply-adds and in measured time;
with repeats, also on each member's mean over its runs.
"""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write_text, load_checkpoint
from .config import Config, PartitionConfig, _merge, config_from_dict
from .cost import compare_speed, count_params, first_images, model_macs
from .errors import HydraError, is_whole
from .evaluate import AUTOCAST_DTYPES, evaluate, resolve_precision, subtask_recall
from .machine import describe, machine_info
from .partition import Partition, partition_filename
from .pipeline import _device, compute_partition
from .train import kept_checkpoint, load_data, load_trained, resolve_checkpoint, train

PROTOCOL_KEYS = {"protocol", "out", "base", "baselines", "partition_from", "hydranets", "ablations",
                 "checks", "repeats", "speed_batches", "speed_repeats", "fold_batchnorms"}
ENTRY_LISTS = ("baselines", "hydranets", "ablations", "checks", "repeats")


def load_protocol(path: str | Path, overrides: list[str] | None = None) -> dict:
    """A protocol file read and checked (with ``key=value`` overrides of its shared base config), repeats expanded."""
    import yaml

    from .config import parse_overrides
    path = Path(path)
    if not path.is_file():
        raise HydraError(f"protocol file {path} " + ("is a folder; give a .yaml file" if path.is_dir()
                                                     else "does not exist"))
    try:
        proto = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise HydraError(f"protocol file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(proto, dict):
        raise HydraError(f"protocol file {path} must hold a mapping (protocol, base, baselines, ...), "
                         f"got {type(proto).__name__}")
    unknown = set(proto) - PROTOCOL_KEYS
    if unknown:
        raise HydraError(f"protocol {path}: unknown key {sorted(unknown)[0]!r}; known: {', '.join(sorted(PROTOCOL_KEYS))}")
    for key in ("protocol", "base", "baselines", "hydranets", "partition_from"):
        if key not in proto:
            raise HydraError(f"protocol {path} lacks {key!r}")
    if not isinstance(proto["base"], dict):
        raise HydraError(f"protocol {path}: base must be a mapping of config sections, got {proto['base']!r}")
    for key in ENTRY_LISTS:
        entries = proto.setdefault(key, [])
        if entries is None:
            entries = proto[key] = []
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise HydraError(f"protocol {path}: {key} must be a list of entries, each a mapping with a name "
                             f"(e.g. - {{name: resnet20, model: {{name: resnet20}}}}), got {entries!r}")
    if not isinstance(proto.get("fold_batchnorms", True), bool):
        raise HydraError(f"protocol {path}: fold_batchnorms must be true or false, got {proto['fold_batchnorms']!r}")
    batches = proto.get("speed_batches", [256, 1])
    if not isinstance(batches, list) or not batches or not all(is_whole(b) for b in batches):
        raise HydraError(f"protocol {path}: speed_batches must be a list of batch sizes >= 1, e.g. [256, 1], "
                         f"got {batches!r}")
    if not is_whole(proto.get("speed_repeats", 5)):
        raise HydraError(f"protocol {path}: speed_repeats must be a whole number >= 1, got {proto['speed_repeats']!r}")
    proto["base"] = _merge(proto["base"], parse_overrides(overrides or []))
    if "out" in proto["base"]:
        raise HydraError(f"protocol {path}: out is not a setting of the shared base config (each entry trains in "
                         "<the protocol's out>/<its name>); set the protocol's own out: instead")
    expand_repeats(proto, path)
    check_entries(proto, path)
    return proto


def expand_repeats(proto: dict, path: str | Path) -> None:
    """Each ``repeats`` entry becomes a whole entry: the family member it names in ``repeat_of`` (a baseline, a
    HydraNet or a member of an ablation family), with the repeat's own settings (typically ``train.seed``) over
    it, so a repeat cannot drift from its member."""
    members = {e.get("name"): e for e in proto["baselines"] + proto["hydranets"]
               + [a for a in proto.get("ablations", []) if "family" in a]}
    expanded = []
    for rep in proto.get("repeats", []):
        target = members.get(rep.get("repeat_of"))
        if target is None:
            raise HydraError(f"protocol {path}: repeat {rep.get('name')!r} has repeat_of {rep.get('repeat_of')!r}, "
                             "which is not a baseline, HydraNet or ablation-family member of the protocol; name one "
                             "of those")
        entry = _merge(copy.deepcopy({k: v for k, v in target.items() if k not in ("name", "family")}),
                       copy.deepcopy({k: v for k, v in rep.items() if k != "repeat_of"}))
        entry["repeat_of"] = target["name"]
        expanded.append(entry)
    proto["repeats"] = expanded


def repeats_of(proto: dict, family: str) -> list[dict]:
    """The (expanded) repeats of the ``"baseline"`` family's members, or of every HydraNet (``"hydranet"``: the
    HydraNet family's members and the ablations')."""
    entries = proto["baselines"] if family == "baseline" else proto["hydranets"] + proto.get("ablations", [])
    names = {e["name"] for e in entries}
    return [e for e in proto.get("repeats", []) if e["repeat_of"] in names]


def check_entries(proto: dict, path: str | Path) -> None:
    """Every entry's config is valid, and every run it starts from is an entry (keeping that epoch) or exists."""
    entries = all_entries(proto)
    by_name = {e.get("name"): e for e in entries}
    names = [e["name"] for e in entries if "name" in e]
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise HydraError(f"protocol {path}: two entries are named {twice!r}; each entry trains in its own run folder "
                         "<out>/<name>, so give each its own name")

    def check_kept(ref: str, who: str) -> None:
        name, epoch = split_source(ref)
        if epoch is not None and name in by_name and epoch not in model_config(proto, by_name[name]).train.keep_epochs:
            raise HydraError(f"protocol {path}: {who} {ref!r}, but {name!r} does not keep that epoch; add {epoch} to "
                             "its train.keep_epochs")

    partition_source(proto)
    check_kept(str(proto["partition_from"]), "partition_from")
    hydras = proto["hydranets"] + proto.get("ablations", []) + repeats_of(proto, "hydranet")
    for entry in entries:
        cfg = model_config(proto, entry)  # check every entry before training anything
        if "partition_from" in entry:
            if entry not in hydras:
                raise HydraError(f"protocol {path}: entry {entry['name']!r} has a partition_from but is not a "
                                 "HydraNet (only HydraNets use subtasks); move it under hydranets or ablations")
            partition_source(proto, entry["partition_from"])
            check_kept(str(entry["partition_from"]), f"entry {entry['name']!r} partition_from")
        ref = cfg.hydra.init_from if "hydra" in entry else None
        if ref not in (None, "baseline"):
            name, epoch = split_source(ref)
            if name not in by_name and not Path(ref).exists():
                raise HydraError(f"protocol {path}: entry {entry['name']!r} starts from {ref!r}, which is neither an "
                                 "entry of the protocol nor an existing run folder or checkpoint")
            check_kept(ref, f"entry {entry['name']!r} starts from")
        teacher = cfg.distill.teacher
        if teacher not in (None, "baseline") and teacher not in by_name and not Path(teacher).exists():
            raise HydraError(f"protocol {path}: entry {entry['name']!r} distils from {teacher!r}, which is neither an "
                             "entry of the protocol nor an existing run folder or checkpoint")
        if "hydra" in entry and entry not in hydras:
            raise HydraError(f"protocol {path}: entry {entry['name']!r} has hydra settings but is not a HydraNet "
                             "(baselines and checks train dense networks); move it under hydranets or ablations")
        if "family" in entry and entry not in proto.get("checks", []) + proto.get("ablations", []):
            raise HydraError(f"protocol {path}: entry {entry['name']!r} has a 'family'; only checks and ablations "
                             "take one (checks of one family are compared with the HydraNets as a curve, "
                             "ablations of one family with the baselines)")


def partition_source(proto: dict, ref: str | None = None) -> dict:
    """The entry a ``partition_from`` names (the protocol's, or ``ref``: an entry's own): a baseline, a baseline's
    repeat (subtasks of another seed), or a check (e.g. a network of another schedule whose subtasks a protocol
    shares with an earlier one)."""
    ref = str(proto["partition_from"] if ref is None else ref)
    name = split_source(ref)[0]
    src = next((e for e in proto["baselines"] + repeats_of(proto, "baseline") + proto.get("checks", [])
                if e["name"] == name), None)
    if src is None:
        raise HydraError(f"partition_from {ref!r} is neither a baseline, a baseline's repeat nor a check of the "
                         "protocol; name the entry whose outputs give the subtasks")
    return src


def entry_partition_from(proto: dict, entry: dict) -> str:
    """Where a HydraNet entry's subtasks come from: its own ``partition_from``, else the protocol's."""
    return str(entry.get("partition_from", proto["partition_from"]))


def all_entries(proto: dict) -> list[dict]:
    """Every entry of a protocol: baselines, HydraNets, ablations, checks, repeats."""
    return (proto["baselines"] + proto["hydranets"] + proto.get("ablations", []) + proto.get("checks", [])
            + proto.get("repeats", []))


def split_source(ref: str) -> tuple[str, int | None]:
    """A HydraNet's ``init_from`` in a protocol: ``"resnet20"`` (the finished run) or ``"resnet20@7"`` (its
    checkpoint after epoch 7, kept by ``train.keep_epochs``: a mid-schedule start at no extra training)."""
    name, _, epoch = ref.partition("@")
    if epoch and not epoch.isdigit():
        raise HydraError(f"init_from {ref!r}: the part after '@' must be an epoch number, e.g. {name}@7")
    return name, int(epoch) if epoch else None


def smoke_protocol(proto: dict, train_images: int = 1024, test_images: int = 512) -> dict:
    """The protocol in miniature, to try a config end to end in minutes before its real run.

    Every epoch number (epochs, schedule windows, kept epochs, ``NAME@N`` starts) is scaled so that the
    longest schedule has 2 epochs, keeping where each run starts and ends within it; the data are cut to
    ``train_images`` / ``test_images``; runs go to ``<out>-smoke``, so the real run folders stay untouched.
    """
    p = copy.deepcopy(proto)
    entries = all_entries(p)
    cfgs = [model_config(p, e) for e in entries]
    longest = max(c.optim.schedule_epochs or c.train.epochs for c in cfgs)
    at = lambda x: math.ceil(x * 2 / longest - 1e-9)  # noqa: E731

    def scaled(ref: str) -> str:
        """A ``NAME@N`` start at the scaled epoch; a plain name as it is."""
        name, epoch = split_source(str(ref))
        return str(ref) if epoch is None else f"{name}@{at(epoch)}"
    for entry, cfg in zip(entries, cfgs):
        o, t = cfg.optim, cfg.train
        start, end = at(o.schedule_start), at(o.schedule_start + t.epochs)
        end = max(end, start + 1)
        entry["train"] = {**entry.get("train", {}), "epochs": end - start,
                          "keep_epochs": [at(k) for k in t.keep_epochs]}
        entry["optim"] = {**entry.get("optim", {}), "schedule_start": start,
                          "schedule_epochs": max(end, at(o.schedule_epochs or t.epochs)),
                          "warmup_epochs": o.warmup_epochs * 2 / longest}
        if entry.get("hydra", {}).get("init_from"):
            entry["hydra"] = {**entry["hydra"], "init_from": scaled(entry["hydra"]["init_from"])}
        if "hydra" in entry and cfg.hydra.oracle_epochs:
            entry["hydra"]["oracle_epochs"] = cfg.hydra.oracle_epochs * 2 / longest
        if "partition_from" in entry:
            entry["partition_from"] = scaled(entry["partition_from"])
    p["partition_from"] = scaled(p["partition_from"])
    p["base"] = _merge(p["base"], {"data": {"train_subset": train_images, "test_subset": test_images}})
    p["protocol"], p["out"] = f"{p['protocol']}-smoke", f"{protocol_dir(p)}-smoke"
    p["speed_repeats"] = 1
    check_entries(p, f"{p['protocol']} (--smoke)")
    return p


def protocol_dir(proto: dict) -> Path:
    """The folder that holds the protocol's run folders and partitions."""
    return Path(proto.get("out", f"runs/bench/{proto['protocol']}"))


def partition_path(proto: dict, pcfg: PartitionConfig, num_subsets: int, source: str | None = None) -> Path:
    """The subtasks file of the protocol's ``partition_from``, or of another ``source`` (named in the file);
    overlapping subtasks (each class in two) have their own file."""
    tail = "" if source in (None, str(proto["partition_from"])) else "_from-" + str(source).replace("@", "-epoch")
    name = partition_filename(pcfg.method, num_subsets, pcfg.overlap, pcfg.overlap_balanced, pcfg.seed)
    return protocol_dir(proto) / name.replace(".json", f"{tail}.json")


def model_config(proto: dict, entry: dict) -> Config:
    """The training config of one family member: the shared base, then the entry's own settings."""
    if "name" not in entry:
        raise HydraError(f"protocol entry {entry} lacks a 'name'")
    if "out" in entry:
        raise HydraError(f"protocol entry {entry['name']!r} sets out, but each entry trains in <the protocol's "
                         "out>/<its name>; leave out to the protocol")
    own = {k: v for k, v in entry.items() if k not in ("name", "family", "repeat_of", "partition_from")}
    data = _merge(copy.deepcopy(proto["base"]), own)
    data["out"] = str(protocol_dir(proto) / entry["name"])
    return config_from_dict(data)


def _interp(x: float, xs: list[float], ys: list[float]) -> float | None:
    """Linear interpolation on a curve sorted by xs; None outside its range."""
    if not xs or x < xs[0] - 1e-9 or x > xs[-1] + 1e-9:
        return None
    return float(np.interp(x, xs, ys))


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The best top-1 reachable at each cost: sorted by cost, accuracy made non-decreasing."""
    out, best = [], -1.0
    for cost, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            out.append((cost, acc))
            best = acc
    return out


def compare_families(baseline: list[tuple[float, float]], hydra: list[tuple[float, float]]) -> dict:
    """Iso-accuracy saving at the baseline's best top-1 and the mean equal-cost gain over the shared range.

    Points are (cost, top1); cost is MACs/image or seconds/image. Curves are the Pareto frontiers.
    """
    b, h = frontier(baseline), frontier(hydra)
    best_cost, best_acc = b[-1]
    h_acc = [a for _, a in h]
    h_cost_at = _cost_to_reach(best_acc, h)
    along = [{"top1": a, "cost": c, "hydra_cost": hc, "saving": c / hc if hc else None,
              "at_least": hc is not None and a < h_acc[0]} for c, a in b for hc in [_cost_to_reach(a, h)]]
    lo, hi = max(b[0][0], h[0][0]), min(b[-1][0], h[-1][0])
    gains = []
    if lo <= hi:
        for c in np.linspace(lo, hi, 25):
            gains.append(_interp(c, [x for x, _ in h], h_acc) - _interp(c, [x for x, _ in b], [a for _, a in b]))
    return {"baseline_best_top1": best_acc, "baseline_best_cost": best_cost,
            "hydra_cost_at_that_top1": h_cost_at,
            "iso_accuracy_saving": best_cost / h_cost_at if h_cost_at else None,
            "iso_accuracy_at_least": h_cost_at is not None and best_acc < h_acc[0],  # cheapest HydraNet above it
            "equal_cost_gain_mean": float(np.mean(gains)) if gains else None,
            "equal_cost_gain_max": float(np.max(gains)) if gains else None,
            "shared_cost_range": [lo, hi] if lo <= hi else None,
            "saving_along_baseline": along}


def _cost_to_reach(acc: float, h: list[tuple[float, float]]) -> float | None:
    """The cost at which frontier ``h`` first reaches top-1 ``acc`` (its cheapest point if that is already above)."""
    h_acc = [a for _, a in h]
    if not h_acc or h_acc[-1] < acc:
        return None
    return _interp(acc, h_acc, [c for c, _ in h]) if h_acc[0] <= acc else h[0][0]


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


def run_protocol(proto: dict, only_train: bool = False, only: list[str] | None = None) -> dict | None:
    """Train what is missing (resuming), then evaluate all models and write the results.

    ``only`` trains just the named entries (the runs they start from must have finished) and evaluates nothing, so that
    several processes can share one protocol's work without touching the same run folder.
    """
    protocol_dir(proto).mkdir(parents=True, exist_ok=True)
    say = lambda m: print(f"[bench {proto['protocol']}] {m}", file=sys.stderr, flush=True)  # noqa: E731
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


def stops_early(config: dict) -> bool:
    """Whether a run trained only the first part of its learning-rate schedule (a checkpoint to fork from)."""
    optim, epochs = config.get("optim", {}), config.get("train", {}).get("epochs", 0)
    return (optim.get("schedule_start") or 0) + epochs < (optim.get("schedule_epochs") or epochs)


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
    from .data import BatchLoader
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
            row, model, kw = _evaluate_entry(proto, family, entry, setup)
            rows.append(row)
            candidates[entry["name"]] = (model, kw)
    mixed = trained_precisions(rows)
    if len(mixed) > 1:
        print(f"warning: the models were trained in different precisions ({_precision_list(mixed)}); compare "
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


def compare_rows(result: dict) -> dict:
    """``result`` (its evaluated ``rows`` and what they were measured on) with the families compared: the HydraNets
    against the baselines, the check and ablation families, and on the means over repeats."""
    result = {k: v for k, v in result.items() if k not in ("macs", "seed_means") and not k.startswith("time_b")}
    rows = result["rows"]
    hydra = [r for r in rows if r["family"] == "hydranet"]
    baseline = [r for r in rows if r["family"] == "baseline"]
    result.update(_compare(baseline, hydra))
    result["vs_check_families"] = {name: _compare(members, hydra) for name, members in _curves(rows, "check").items()}
    ablations = _curves(rows, "ablation")
    result["ablation_families"] = {name: _compare(baseline, members) for name, members in ablations.items()}
    result["vs_ablation_families"] = {name: _compare(members, hydra) for name, members in ablations.items()}
    if any(r["family"] == "repeat" for r in rows):
        means = seed_means(rows)
        keep = ("name", "family", "curve", "macs", "top1", "top1_runs", "top1_sd")
        mean_base = [m for m in means if m["family"] == "baseline"]
        mean_hydra = [m for m in means if m["family"] == "hydranet"]
        mean_ablations = _curves(means, "ablation")
        result["seed_means"] = {"members": [{k: m[k] for k in m if k in keep or k.startswith("images_per_s_b")}
                                            for m in means],
                                **_compare(mean_base, mean_hydra),
                                "ablation_families": {n: _compare(mean_base, g) for n, g in mean_ablations.items()},
                                "vs_ablation_families": {n: _compare(g, mean_hydra) for n, g in mean_ablations.items()}}
        if result.get("test_images"):
            result["seed_means"]["seed_noise"] = seed_noise(means, result["test_images"])
    return result


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
    saved = json.loads(path.read_text())
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


def trained_precisions(rows: list[dict]) -> dict[str, list[str]]:
    """The names of the models trained in each precision (``auto`` resolves per machine, so a protocol trained on
    two machines can hold both)."""
    out: dict[str, list[str]] = {}
    for r in rows:
        if r.get("train_precision"):
            out.setdefault(r["train_precision"], []).append(r["name"])
    return out


def _precision_list(by_precision: dict[str, list[str]]) -> str:
    return "; ".join(f"{p}: {', '.join(names)}" for p, names in by_precision.items())


def seed_means(rows: list[dict]) -> list[dict]:
    """Each baseline, HydraNet and ablation-family row with its evaluated repeats folded in: top-1 the mean over
    the runs (``top1_runs``, member first; ``top1_sd`` their sample standard deviation), images/s the median of the
    timed ones."""
    out = []
    for r in rows:
        if r["family"] not in ("baseline", "hydranet") and not (r["family"] == "ablation" and r.get("curve")):
            continue
        group = [r] + [x for x in rows if x.get("repeat_of") == r["name"]]
        runs = [g["top1"] for g in group]
        mean = dict(r, top1=float(np.mean(runs)), top1_runs=runs,
                    top1_sd=float(np.std(runs, ddof=1)) if len(runs) > 1 else None)
        for key in (k for k in r if k.startswith("images_per_s_b")):  # runs added untimed hold None
            timed = [g[key] for g in group if g[key] is not None]
            mean[key] = float(np.median(timed)) if timed else None
        out.append(mean)
    return out


def _curves(rows: list[dict], family: str) -> dict[str, list[dict]]:
    """Rows of one family grouped by their entry's ``family`` name, where a group has at least two members."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["family"] == family and r.get("curve"):
            groups.setdefault(r["curve"], []).append(r)
    return {name: members for name, members in sorted(groups.items()) if len(members) >= 2}


def _compare(baseline: list[dict], hydra: list[dict]) -> dict:
    """compare_families in counted MACs and in the measured time of every batch size the rows carry."""
    out = {"macs": compare_families([(r["macs"], r["top1"]) for r in baseline], [(r["macs"], r["top1"]) for r in hydra])}
    for key in (k for k in hydra[0] if k.startswith("images_per_s_b")
                and all(r.get(k) is not None for r in baseline + hydra)):  # runs added untimed hold None
        out[f"time_b{key[len('images_per_s_b'):]}"] = compare_families([(1.0 / r[key], r["top1"]) for r in baseline],
                                                                       [(1.0 / r[key], r["top1"]) for r in hydra])
    return out


def finished_entries(proto: dict) -> set[str]:
    """Names of the protocol's entries whose runs have finished training (an evaluation would include them)."""
    return {e["name"] for e in all_entries(proto) if (Path(model_config(proto, e).out) / "summary.json").exists()}


def check_results_kept(proto: dict, results_dir: str | Path, names: set[str]) -> None:
    """Refuse to replace ``<protocol>.json`` with results that lack some of its models (e.g. an evaluation in a
    checkout without their run folders): those measurements would be lost."""
    path = Path(results_dir) / f"{proto['protocol']}.json"
    if not path.exists():
        return
    lost = [r["name"] for r in json.loads(path.read_text()).get("rows", []) if r["name"] not in names]
    if lost:
        raise HydraError(f"{path} holds results of {len(lost)} model(s) this evaluation would not have "
                         f"({', '.join(lost[:5])}{', ...' if len(lost) > 5 else ''}: their runs are not here); "
                         "write elsewhere with --results DIR, or pass --replace-results to replace it")


def write_results(result: dict, results_dir: str | Path) -> tuple[Path, Path, Path]:
    """``<protocol>.json``, ``<protocol>.png`` (top-1 vs MACs, with the paper's curves beside) and ``<protocol>.md``;
    with repeats also ``<protocol>-means.png`` (the families on their means, with error bars)."""
    from .report import plot_means, plot_pareto
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    name = result["protocol"]
    js, png, md = results_dir / f"{name}.json", results_dir / f"{name}.png", results_dir / f"{name}.md"
    atomic_write_text(json.dumps(result, indent=1), js)
    atomic_write_text(markdown_table(result), md)
    families = {}
    for f in ("baseline", "hydranet"):
        families[f] = [(r["macs"], r["top1"], r["name"]) for r in sorted(result["rows"], key=lambda r: r["macs"])
                       if r["family"] == f]
    for r in sorted(result["rows"], key=lambda r: r["macs"]):
        fam = r.get("curve")
        if r["family"] == "check" and r.get("partial_schedule"):  # a fork's source: its accuracy is no point of a curve
            continue
        if r["family"] == "check":  # a check family as a curve, a lone check as a point
            label = f"{fam} (check family)" if fam else f"{r['name']} (check, {r['epochs']} epochs)"
            families.setdefault(label, []).append((r["macs"], r["top1"], r["name"] if fam else ""))
        elif r["family"] == "ablation" and fam:
            families.setdefault(f"{fam} (ablation family)", []).append((r["macs"], r["top1"], r["name"]))
    means = result.get("seed_means", {}).get("members", [])
    for m in means:  # a mean curve only for a family with repeats; elsewhere it would hide the family's own
        if any(len(o["top1_runs"]) > 1 for o in means if (o["family"], o.get("curve")) == (m["family"], m.get("curve"))):
            families.setdefault(f"{m.get('curve') or m['family']}, mean over repeats", []).append((m["macs"], m["top1"], ""))
    plot_pareto(families, png, paper=True, title=f"{name}: top-1 vs multiply-adds")
    if any(len(m["top1_runs"]) > 1 for m in means):
        label = {"baseline": "baselines (dense)", "hydranet": "HydraNets"}
        plot_means({label.get(k, f"{k} (ablation)"): pts for k, pts in mean_curves(means).items()},
                   results_dir / f"{name}-means.png",
                   title=f"{name}: families on their means over seeds")
    return js, png, md


def _fmt(v, spec: str, none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def _at_least(comparison: dict) -> str:
    return ">=" if comparison.get("iso_accuracy_at_least") else ""


def _times(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def level_off_point(along: list[dict], tolerance: float) -> dict | None:
    """The cheapest point of a baseline frontier (``saving_along_baseline``) within ``tolerance`` points of its best
    top-1: where a flat curve stops rising, so a saving there does not hang on which costly model's noise came out on
    top."""
    if not along:
        return None
    best = along[-1]["top1"]
    return next(p for p in along if p["top1"] >= best - tolerance)


def level_off_savings(comp: dict, test_images: int) -> dict | None:
    """Where the baseline curve of a comparison levels off (``level_off_point`` within one binomial standard error of
    its best top-1): that point's top-1 and MACs, and the saving there in MACs and in each measured time (None where
    the HydraNets do not reach it, or the time curve has no such point)."""
    along = comp["macs"].get("saving_along_baseline", [])
    tolerance = top1_standard_error(comp["macs"]["baseline_best_top1"], test_images)
    point = level_off_point(along, tolerance)
    if point is None:
        return None
    out = {"top1": point["top1"], "cost": point["cost"], "tolerance": tolerance, "is_best": point is along[-1],
           "macs": point["saving"], "at_least": {"macs": point["at_least"]}}
    for key in (k for k in comp if k.startswith("time_b")):
        same = [p for p in comp[key].get("saving_along_baseline", []) if p["top1"] == point["top1"]]
        out[key] = same[0]["saving"] if same else None
        out["at_least"][key] = bool(same) and same[0]["at_least"]
    return out


def pooled_seed_sd(members: list[dict]) -> float | None:
    """The pooled sample standard deviation of top-1 over seeds of the members with repeats (each weighted by its
    runs - 1); None if none has repeats."""
    groups = [m["top1_runs"] for m in members if len(m["top1_runs"]) > 1]
    if not groups:
        return None
    dof = sum(len(g) - 1 for g in groups)
    return math.sqrt(sum((len(g) - 1) * float(np.var(g, ddof=1)) for g in groups) / dof)


def mean_curves(members: list[dict], min_members: int = 3) -> dict[str, list[tuple[float, float, float | None, int]]]:
    """The families on their means, for the means plot: the baselines, the HydraNets and each ablation family with at
    least ``min_members`` members, as points ``(macs, mean top-1, standard error, runs)`` in MACs order. The standard
    error is the family's pooled seed sd / sqrt(runs), the error the seed-noise draws give each mean (None where the
    family has no repeats)."""
    groups: dict[str, list[dict]] = {}
    for m in members:
        name = m["curve"] if m["family"] == "ablation" else m["family"]
        if name:
            groups.setdefault(name, []).append(m)
    out = {}
    for name, ms in groups.items():
        if name not in ("baseline", "hydranet") and len(ms) < min_members:
            continue
        sd = pooled_seed_sd(ms)
        out[name] = [(m["macs"], m["top1"], None if sd is None else sd / math.sqrt(len(m["top1_runs"])),
                      len(m["top1_runs"])) for m in sorted(ms, key=lambda m: m["macs"])]
    return out


def seed_noise(means: list[dict], test_images: int, draws: int = 2000, seed: int = 0, target: float = 2.0,
               time_share: float = 0.8) -> dict | None:
    """How far the saving where the dense curve levels off, on the means over repeats, hangs on the seeds.

    Each draw moves every baseline and HydraNet member's mean by a normal error of its family's pooled seed standard
    deviation / sqrt(its runs), then compares the families again (the level-off point included). Returns the pooled
    sds, each saving's median and 10th / 90th percentiles (a draw whose HydraNets do not reach the level counts as no
    saving, 0), the share of draws in which each is only a lower bound (the cheapest HydraNet already more accurate),
    and the share of draws with at least ``target`` x in MACs, and with that and at least ``time_share``
    of the MACs saving in each measured time. None unless both families have repeats."""
    fams = {f: [m for m in means if m["family"] == f] for f in ("baseline", "hydranet")}
    sds = {f: pooled_seed_sd(ms) for f, ms in fams.items()}
    if None in sds.values():
        return None
    rng = np.random.default_rng(seed)
    got: dict[str, list[float]] = {}
    bound: dict[str, list[bool]] = {}
    for _ in range(draws):
        moved = {f: [dict(m, top1=m["top1"] + rng.normal() * sds[f] / math.sqrt(len(m["top1_runs"]))) for m in ms]
                 for f, ms in fams.items()}
        point = level_off_savings(_compare(moved["baseline"], moved["hydranet"]), test_images)
        for key, value in point.items():
            if key == "macs" or key.startswith("time_b"):
                got.setdefault(key, []).append(value or 0.0)
                bound.setdefault(key, []).append(bool(point.get("at_least", {}).get(key)))
    savings = {k: {"median": float(np.median(v)), "p10": float(np.percentile(v, 10)),
                   "p90": float(np.percentile(v, 90)), "at_least": float(np.mean(bound[k]))} for k, v in got.items()}
    macs = np.array(got["macs"])
    share = {"macs": float(np.mean(macs >= target))}
    for key in (k for k in got if k != "macs"):
        share[key] = float(np.mean((macs >= target) & (np.array(got[key]) >= time_share * macs)))
    return {"draws": draws, "pooled_sd": sds, "savings": savings, "target": target, "time_share": time_share,
            "share_at_target": share}


def _level_off_line(comp: dict, bss: list[str], test_images: int) -> list[str]:
    """The saving where the baseline curve levels off, in MACs and measured time, if that is not its best point."""
    point = level_off_savings(comp, test_images)
    if point is None or point["is_best"]:
        return []
    least = point.get("at_least", {})
    mark = lambda key: ">=" if least.get(key) else ""  # noqa: E731 - a lower bound, as in the other lines
    times = [f"{mark(f'time_b{b}')}{_times(point[f'time_b{b}'])} in batch-{b} time"
             for b in bss if f"time_b{b}" in point]
    return [f"- Where the dense curve levels off (its cheapest point within one standard error, {point['tolerance']:.2f} "
            f"points, of its best top-1: {point['top1']:.2f}% at {point['cost'] / 1e6:.1f}M MACs): iso-accuracy "
            f"saving " + ", ".join([f"{mark('macs')}{_times(point['macs'])} in MACs"] + times)
            + (" (>=: the cheapest HydraNet is already more accurate)" if any(least.values()) else "")]


def _seed_noise_line(noise: dict, bss: list[str]) -> str:
    s, sd = noise["savings"], noise["pooled_sd"]
    def spread(k: str) -> str:
        least = s[k].get("at_least", 0.0)
        return (f"median {_times(s[k]['median'])} (10-90%: {_times(s[k]['p10'])} to {_times(s[k]['p90'])}"
                + (f"; a lower bound in {100 * least:.0f}% of draws, where the cheapest HydraNet is already more "
                   f"accurate" if least else "") + ")")

    share = noise["share_at_target"]
    return (f"- Seed noise ({noise['draws']} draws, each member's mean moved by a normal error of its family's pooled "
            f"seed sd / sqrt(runs): dense {sd['baseline']:.2f}, HydraNets {sd['hydranet']:.2f} points): the saving "
            f"where the dense curve levels off in MACs {spread('macs')}, "
            + ", ".join(f"in batch-{b} time {spread(f'time_b{b}')}" for b in bss if f"time_b{b}" in s)
            + f"; at least {noise['target']:g}x in MACs in {100 * share['macs']:.0f}% of draws"
            + "".join(f", and with batch-{b} time at least {noise['time_share']:g} of it in "
                      f"{100 * share[f'time_b{b}']:.0f}%" for b in bss if f"time_b{b}" in share))


def _comparison_lines(comp: dict, bss: list[str], against: str, hydra: str = "the HydraNet family",
                      test_images: int | None = None) -> list[str]:
    """The report lines of one comparison; with ``test_images``, also the saving where the reference curve levels off."""
    m = comp["macs"]
    lines = [f"- Iso-accuracy saving in MACs at {against}'s best top-1 ({m['baseline_best_top1']:.2f}%): "
             f"{_at_least(m)}{_times(m['iso_accuracy_saving'])}" + (
                 f" ({hydra} does not reach it)" if not m["iso_accuracy_saving"] else
                 " (>=: its cheapest member is already more accurate)" if _at_least(m) else ""),
             f"- Equal-cost top-1 gain over the shared MACs range: mean {_fmt(m['equal_cost_gain_mean'], '+.2f')}, "
             f"max {_fmt(m['equal_cost_gain_max'], '+.2f')} points"]
    along = m.get("saving_along_baseline", [])
    if len(along) > 1:
        lines.append("- Iso-accuracy saving in MACs along the dense curve, at each of its points' top-1: " + ", ".join(
            f"{p['top1']:.2f}% {'>=' if p['at_least'] else ''}{_times(p['saving'])}" for p in along)
            + (" (>=: the cheapest HydraNet is already more accurate)" if any(p["at_least"] for p in along) else ""))
    for b in (b for b in bss if f"time_b{b}" in comp):
        t = comp[f"time_b{b}"]
        lines.append(f"- Measured time at batch {b}: iso-accuracy saving {_at_least(t)}{_times(t['iso_accuracy_saving'])}, "
                     f"equal-time gain mean {_fmt(t['equal_cost_gain_mean'], '+.2f')} points")
    if test_images:
        lines += _level_off_line(comp, bss, test_images)
    return lines


def _recall(row: dict) -> str:
    """A HydraNet's gate recall@k; in parentheses, a dense network's own subtask recall@1 (see subtask_recall)."""
    if row.get("gate_recall") is not None:
        return f"{row['gate_recall']:.1f}"
    return f"({row['subtask_recall']:.1f})" if row.get("subtask_recall") is not None else "-"


def top1_standard_error(top1: float, n: int) -> float:
    """One binomial standard error, in points, of a top-1 of ``top1`` % measured on ``n`` test images."""
    p = top1 / 100
    return 100 * math.sqrt(p * (1 - p) / n)


def _noise_line(result: dict) -> str:
    """Test-set sampling noise near the two curves' top-1 (their members; checks and ablations aside)."""
    n, rows = result["test_images"], result["rows"]
    rows = [r for r in rows if r["family"] in ("baseline", "hydranet")] or rows
    mean = sum(r["top1"] for r in rows) / len(rows)
    se = top1_standard_error(mean, n)
    return (f"- Noise: on {n} test images one standard error of a top-1 near {mean:.0f}% is {se:.2f} points, "
            f"so two models' errors, were they independent, differ by more than chance only beyond about "
            f"{2 * math.sqrt(2) * se:.1f} points (on one shared test set their errors overlap, so a paired "
            "difference is less noisy than that; training seeds add their own spread, see the repeats)")


def _seed_lines(means: dict, bss: list[str], test_images: int | None = None) -> list[str]:
    runs = [f"{m['name']} {' / '.join(f'{t:.2f}' for t in m['top1_runs'])} (mean {m['top1']:.2f}, sd {m['top1_sd']:.2f})"
            for m in means["members"] if len(m["top1_runs"]) > 1]
    lines = [f"- Repeats: top-1 of each run, first the member's own: {'; '.join(runs)}",
             "- On the means over repeats (a member without repeats counts with its one run):"] + \
        ["  " + line for line in _comparison_lines(means, bss, "the baseline family", test_images=test_images)]
    if means.get("seed_noise"):
        lines.append("  " + _seed_noise_line(means["seed_noise"], bss))
    for group in means.get("ablation_families", {}):
        lines += ["  " + line for line in _ablation_family_lines(means, group, group, bss, test_images)]
    return lines


def means_table(members: list[dict], bss: list[str]) -> str:
    """The families on their means: one row per member with its repeats folded in (runs, mean top-1, sample sd,
    median speed of its timed runs), the view the comparisons on the means read."""
    lines = ["| member | family | runs | top-1 mean | sd | MMACs/img | " + " | ".join(f"img/s @{b}" for b in bss) + " |",
             "|" + "---|" * (6 + len(bss))]
    for m in members:
        family = f"{m['family']} ({m['curve']})" if m.get("curve") else m["family"]
        lines.append(f"| {m['name']} | {family} | {len(m['top1_runs'])} | {m['top1']:.2f} | "
                     f"{_fmt(m['top1_sd'], '.2f', '-')} | {m['macs'] / 1e6:.1f} | "
                     + " | ".join(_fmt(m.get('images_per_s_b' + b), ".0f", "-") for b in bss) + " |")
    return "\n".join(lines) + "\n"


def _ablation_family_lines(comps: dict, group: str, label: str, bss: list[str],
                           test_images: int | None = None) -> list[str]:
    """An ablation family against the baselines, then the HydraNets against it, from ``comps``' comparisons."""
    lines = [f"- The ablation family {label} instead of the HydraNets, against the baselines:"]
    lines += ["  " + line for line in
              _comparison_lines(comps["ablation_families"][group], bss, "the baseline family", f"the {group} family",
                                test_images)]
    lines.append(f"  - The HydraNet family against the {group} family as the reference curve:")
    lines += ["    " + line for line in _comparison_lines(comps["vs_ablation_families"][group], bss, f"the {group} family")]
    return lines


def markdown_table(result: dict) -> str:
    bss = [k[len("images_per_s_b"):] for k in result["rows"][0] if k.startswith("images_per_s_b")]
    head = "| model | family | k | epochs (total) | top-1 | top-5 | gate recall | top-1 true route | " \
        "top-1 shuffled branches | busiest branch | " \
        "MMACs/img | params (M) | " + " | ".join(f"img/s @{b}" for b in bss) + " |"
    lines = [head, "|" + "---|" * (12 + len(bss))]
    for r in result["rows"]:
        total = r.get("total_epochs", r["epochs"])
        epochs = f"{r['epochs']} ({total})" if total != r["epochs"] else str(r["epochs"])
        family = f"{r['family']} ({r['curve']})" if r.get("curve") else \
            f"repeat of {r['repeat_of']}" if r.get("repeat_of") else r["family"]
        lines.append(f"| {r['name']} | {family} | {r['k'] or '-'} | {epochs} | {r['top1']:.2f} | "
                     f"{r['top5']:.2f} | {_recall(r)} | {_fmt(r.get('true_route_top1'), '.2f', '-')} | "
                     f"{_fmt(r.get('shuffled_top1'), '.2f', '-')} | "
                     f"{_fmt(r.get('busiest_branch'), '.0f', '-')} | {r['macs'] / 1e6:.1f} | "
                     f"{r['params'] / 1e6:.2f} | "
                     + " | ".join(_fmt(r['images_per_s_b' + b], ".0f", "-") for b in bss) + " |")
    lines.append("")
    members = result.get("seed_means", {}).get("members", [])
    if any(len(m["top1_runs"]) > 1 for m in members):
        lines += ["On the means over repeats (each member with its repeats folded in; speeds the median of the "
                  "timed runs):", "", means_table(members, bss)]
    if any(r.get("subtask_recall") is not None for r in result["rows"]):
        lines.append("- Gate recall: a HydraNet gate's recall@k of the true subtask; in parentheses, for a dense network, "
                     "recall@1 of the subtask its summed class probabilities pick (a gate as good as the whole network)")
    if any(r.get("true_route_top1") is not None for r in result["rows"]):
        lines.append("- Top-1 true route: a HydraNet's top-1 when each image's true subtask is among its k branches "
                     "(a perfect gate); far above top-1 means routing errors cost most, near it that the branches do")
        lines.append("- Busiest branch: the share of test images (%) that run the most used branch; with B branches and "
                     "top-k, balanced routing gives 100 k/B, 100 means every image runs that branch (collapsed routing)")
    if any(r.get("shuffled_top1") is not None for r in result["rows"]):
        lines.append("- Top-1 shuffled branches: a HydraNet's top-1 when each chosen branch is replaced by the next "
                     "one (b -> b+1 mod B), gate weights unchanged; near top-1 means the branches are interchangeable "
                     "and routing adds nothing")
    n = result.get("test_images")
    if n:
        lines.append(_noise_line(result))
    lines += _comparison_lines(result, bss, "the baseline family", test_images=n)
    for group, comp in result.get("vs_check_families", {}).items():
        members = ", ".join(r["name"] for r in result["rows"] if r["family"] == "check" and r.get("curve") == group)
        lines.append(f"- Against the check family {group} ({members}) instead of the baselines:")
        lines += ["  " + line for line in _comparison_lines(comp, bss, group)]
    for group in result.get("ablation_families", {}):  # e.g. a dense control of the HydraNets' own shape
        members = ", ".join(r["name"] for r in result["rows"] if r["family"] == "ablation" and r.get("curve") == group)
        lines += _ablation_family_lines(result, group, f"{group} ({members})", bss, n)
    if result.get("seed_means"):
        lines += _seed_lines(result["seed_means"], bss, n)
    for added in result.get("added_untimed", []):
        on = f", {describe(added['machine'])}" if "machine" in added else ""
        lines.append(f"- Added later without timing (--add-repeats; torch {added['torch']}, {added['device']}{on}): "
                     f"{', '.join(added['names'])}: their top-1 counts in the means over repeats, whose speeds are "
                     "those of the timed runs")
    if result.get("not_run"):
        lines.append(f"- Not trained, so not in the table: {', '.join(result['not_run'])}")
    if result.get("missing_members"):
        lines.append(f"- **Family members not trained** (the families are compared without them): "
                     f"{', '.join(result['missing_members'])}")
    if len(result.get("trained_precisions", {})) > 1:
        lines.append(f"- **Trained in different precisions** ({_precision_list(result['trained_precisions'])}): "
                     "the families' training differs by more than the recipe")
    timed = {True: ", timed with batch norms folded", False: ", timed as trained (batch norms not folded)"}
    trained = list(result.get("trained_precisions", {}))
    precision = result["precision"] if trained in ([], [result["precision"]]) else \
        f"evaluated in {result['precision']} (trained in {', '.join(trained)})"
    on = f" ({describe(result['machine'])})" if "machine" in result else ""
    lines.append(f"- {result['dataset']} ({result['classes']} classes), {result['device']}{on}, {precision}, "
                 f"torch {result['torch']}, {result['threads']} threads{timed.get(result.get('fold_batchnorms'), '')}")
    return "\n".join(lines) + "\n"
