"""A benchmark protocol: its YAML read and checked, its entries (families, ablations, checks, repeats) and each
entry's training config and run folder."""
from __future__ import annotations

import copy
import math
from pathlib import Path

from ..config import Config, PartitionConfig, _merge, config_from_dict
from ..errors import HydraError, is_whole
from ..partition import partition_filename

PROTOCOL_KEYS = {"protocol", "out", "base", "baselines", "partition_from", "hydranets", "ablations",
                 "checks", "repeats", "speed_batches", "speed_repeats", "fold_batchnorms"}


ENTRY_LISTS = ("baselines", "hydranets", "ablations", "checks", "repeats")


def load_protocol(path: str | Path, overrides: list[str] | None = None) -> dict:
    """A protocol file read and checked (with ``key=value`` overrides of its shared base config), repeats expanded."""
    import yaml

    from ..config import load_yaml, parse_overrides
    path = Path(path)
    if not path.is_file():
        raise HydraError(f"protocol file {path} " + ("is a folder; give a .yaml file" if path.is_dir()
                                                     else "does not exist"))
    try:
        proto = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise HydraError(f"protocol file {path} is not UTF-8 text; give a YAML protocol file") from None
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


def stops_early(config: dict) -> bool:
    """Whether a run trained only the first part of its learning-rate schedule (a checkpoint to fork from)."""
    optim, epochs = config.get("optim", {}), config.get("train", {}).get("epochs", 0)
    return (optim.get("schedule_start") or 0) + epochs < (optim.get("schedule_epochs") or epochs)

