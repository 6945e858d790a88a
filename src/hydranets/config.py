"""Run configuration: typed sections, read from YAML, overridden with ``key=value`` on the command line."""
from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import HydraError


@dataclass
class DataConfig:
    name: str = "fashion-mnist"          # cifar10 | cifar100 | tiny-imagenet | fashion-mnist | imagefolder | synthetic
    root: str | None = None              # local copy (folder or archive); default: the data set's usual place
    classes: int | None = None           # first N classes only (canonical order)
    download: bool = False
    cache_dir: str | None = None
    augment: str = "crop_flip"           # crop_flip | none
    cutout: int = 0                      # side of the square cut out of each training image (0: off)
    mixup: float = 0.0                   # Beta(alpha, alpha) mixup of training batches (0: off)
    train_subset: int | None = None      # use only this many training images (quick runs)
    test_subset: int | None = None
    image_size: int = 224                # imagefolder: random-resized-crop size (train) / centre crop (test)
    workers: int | None = None           # imagefolder: decoding processes (None: 4, or the CPUs if fewer)


@dataclass
class ModelConfig:
    name: str = "resnet20"               # any name from hydranets.list_models()
    kwargs: dict = field(default_factory=dict)
    modules: list = field(default_factory=list)  # Python modules imported first: they register your own models


@dataclass
class HydraConfig:
    """Set ``enabled`` to turn ``model.name`` (a backbone) into a HydraNet."""

    enabled: bool = False
    num_branches: int = 8
    topk: int = 2
    split: int | None = None
    stem_width: float = 1.0
    branch_width: float = 0.5
    gate_width: float = 1.0              # full width: with init_from, the baseline's last stage (upcycled) is the shared path
    feature_dim: int | None = None
    gate_weighting: str = "sigmoid"      # sigmoid | softmax | none (branch outputs unscaled)
    partition: str | None = None         # partition JSON (hydranets partition); needed when gate_loss > 0
    gate_loss: float = 0.3               # lambda: weight of the gate's BCE against subtask membership (paper: 1)
    routing: str = "topk"                # soft | topk | oracle: routing while training (evaluation is top-k)
    train_topk: int | None = None        # branches per image while training with top-k routing (None: topk)
    shared_path: bool = True             # the gate's features also feed the combiner, for every image (paper: off)
    balance_loss: float = 0.1            # weight of a load-balancing loss on the gate's top-k choice (0: off; paper: off)
    oracle_epochs: float = 0.0           # route by the true subtask at first, annealed to the gate over these epochs
    init_from: str | None = None         # baseline checkpoint: copy its stem stages (same widths needed); a HydraNet with fewer branches: copied whole
    branch_lr_scale: float = 1.0         # learning-rate multiplier for the branches (B/k: a branch's gradient as a dense layer's)
    branch_decay_scale: float = 1.0      # weight-decay multiplier for the branches (k/B: decay in proportion to the data seen)
    share_branch_weights: bool = False   # branches share all weights but their normalisation layers (each conv sees every image)
    share_branch_norms: bool = False     # with share_branch_weights: the normalisation layers too (one network; a control)
    branch_norm_group: int = 0           # training only: branches normalise their images in groups of at most this many (0: off; with B=1, the groups top-1 of B hands a branch)
    upcycle: bool | None = None          # with init_from, branches/gate at full width start as the baseline's tail (None: where widths fit)


@dataclass
class DistillConfig:
    teacher: str | None = None           # baseline run folder or checkpoint to distil from
    weight: float = 0.0                  # share of the loss given to matching the teacher
    temperature: float = 4.0


@dataclass
class OptimConfig:
    name: str = "sgd"                    # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    schedule: str = "onecycle"           # onecycle | cosine | constant
    warmup_epochs: float = 1.0
    schedule_epochs: float | None = None  # length of the learning-rate schedule (None: train.epochs)
    schedule_start: float = 0.0           # epoch of that schedule this run starts at (continue another run's)
    grad_clip: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128                # global batch, split over processes
    accum_steps: int = 1                 # micro-batches per step (same global batch, less memory)
    seed: int = 0
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    precision: str = "auto"              # auto (bf16 where fast, else fp32) | bf16 | fp32 | fp16 (CUDA, grad scaler)
    channels_last: bool = True
    compile: bool = False
    threads: int = 0                     # CPU threads (0: PyTorch's default)
    eval_batch_size: int = 256
    progress: bool = True
    tensorboard: bool = False
    keep_epochs: list = field(default_factory=list)  # also keep checkpoints/epochN.pt after these (mid-schedule starts)


@dataclass
class PartitionConfig:
    method: str = "kmeans"               # kmeans (the paper's) | spectral | random
    seeds: int = 10                      # k-means restarts
    overlap: bool = False                # each class also joins its second-nearest subtask
    overlap_balanced: bool = False       # with overlap: the nearest other one with room (every subtask ~2C/B classes)
    seed: int = 0


@dataclass
class PipelineConfig:
    hydra_epochs: int | None = None      # epochs for the HydraNet (default: train.epochs)
    init_stem: bool = True               # start the HydraNet's stem from the trained baseline
    fork_epoch: int | None = None        # start the HydraNet from the baseline after this epoch, for the rest of its schedule
    distill: float = 0.0                 # weight of distillation from the baseline (0: off)
    speed_batch: int = 256               # batch size for the measured images/s
    speed_repeats: int = 5
    fold_batchnorms: bool = True         # time the models with batch norms folded into convolutions, as deployed


@dataclass
class Config:
    out: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    hydra: HydraConfig = field(default_factory=HydraConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "data.augment": ("crop_flip", "none"),
    "hydra.gate_weighting": ("sigmoid", "softmax", "none"),
    "hydra.routing": ("soft", "topk", "oracle"),
    "optim.name": ("sgd", "adamw"),
    "partition.method": ("kmeans", "spectral", "random"),
    "optim.schedule": ("onecycle", "cosine", "constant"),
    "train.precision": ("auto", "bf16", "fp32", "fp16"),
}


def _yaml():
    try:
        import yaml
    except ImportError:
        raise HydraError("reading configs needs PyYAML: pip install 'hydranets[train]'") from None
    return yaml


@functools.cache
def _loader() -> type:
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""
    yaml = _yaml()

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            seen: set = set()
            for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice in one mapping (line {key_node.start_mark.line + 1}); "
                        "keep one of them", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def load_yaml(text: str) -> Any:
    """``text`` read as YAML like ``yaml.safe_load``, but refusing duplicate keys (raises ``yaml.YAMLError``)."""
    return _yaml().load(text, Loader=_loader())


_SCI_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        annotation = next(a for a in options if a is not type(None))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str) and _SCI_FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 (PyYAML) reads 1e-3 as a string
    if annotation is dict and isinstance(value, dict):
        return value
    if isinstance(annotation, type) and isinstance(value, annotation) and not (
            annotation is int and isinstance(value, bool)):
        return value
    name = getattr(annotation, "__name__", str(annotation))
    raise HydraError(f"config key {key!r} must be {name}, got {value!r} ({type(value).__name__})")


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            known = [f"{prefix}{n}" for n in fields]
            close = difflib.get_close_matches(full, known, n=1)
            raise HydraError(f"unknown config key {full!r}" + (f"; did you mean {close[0]!r}?" if close else
                                                               f"; known keys: {', '.join(known)}"))
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise HydraError(f"config key {full!r} is a section; give its keys, e.g. {full}.<key>=...")
            _apply(current, value, f"{full}.")
        else:
            value = _check_type(full, value, hints[key])
            if full in CHOICES and value not in CHOICES[full]:
                raise HydraError(f"config key {full!r} must be one of {', '.join(CHOICES[full])}, got {value!r}")
            setattr(obj, key, value)


def parse_overrides(items: list[str]) -> dict:
    """``["train.epochs=5", "model.name=resnet32"]`` -> nested dict; values are read as YAML scalars."""
    yaml = _yaml()
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise HydraError(f"override {item!r} is not of the form key=value (e.g. train.epochs=5)")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw) if raw != "" else None
        except yaml.YAMLError as e:
            why = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise HydraError(f"override {item!r}: {raw!r} is not a YAML value ({why}); quote it (key='\"...\"') "
                             "or fix its brackets") from None
        node = out
        parts = key.strip().split(".")
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise HydraError(f"override {item!r}: {'.'.join(parts[:i + 1])} was given a value by an earlier "
                                 "override and cannot also have keys")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """Defaults, then ``base``, then the YAML file, then ``key=value`` overrides; every key checked."""
    data: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise HydraError(f"config file {path} " + ("is a folder; give a .yaml file" if path.is_dir()
                                                       else "does not exist"))
        try:
            loaded = load_yaml(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise HydraError(f"config file {path} is not UTF-8 text; give a YAML config file") from None
        except _yaml().YAMLError as e:
            raise HydraError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise HydraError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
        config_from_dict(loaded, source=path)
        data = _merge(data, loaded)
    data = _merge(data, parse_overrides(overrides or []))
    cfg = Config()
    _apply(cfg, data)
    return cfg


def config_from_dict(data: dict, source: str | Path | None = None) -> Config:
    """A checked Config from nested ``data``; ``source``, the file ``data`` was read from, is named in its errors."""
    cfg = Config()
    try:
        _apply(cfg, data)
    except HydraError as e:
        if source is None:
            raise
        raise HydraError(f"config file {source}: {e}") from None
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    from .checkpoint import atomic_write_text
    atomic_write_text(_yaml().safe_dump(cfg.to_dict(), sort_keys=False), path)
