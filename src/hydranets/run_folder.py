"""A run folder: its resolved config, the checks before a run starts or resumes in it, and its metric files.

``config.yaml`` (the resolved config), ``metrics.jsonl`` and ``metrics.csv`` (one row per epoch), ``checkpoints/``,
``model.safetensors`` and ``summary.json`` (written when the run has finished).
"""
from __future__ import annotations

import csv
import io
import json
import shutil
import sys
from pathlib import Path

import torch

from .checkpoint import CHECKPOINT, atomic_write_text, check_writable
from .config import Config, config_from_dict, load_yaml
from .errors import HydraError
from .evaluate import resolve_precision


def saved_config(out: Path) -> Config | None:
    """The resolved config a run folder was made with, or None where it has none."""
    if not (out / "config.yaml").exists():
        return None
    import yaml
    path = out / "config.yaml"
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        why = getattr(e, "problem", None) or type(e).__name__
        raise HydraError(f"{path} is not a readable config ({why}); restore it, or start again with --overwrite") from None
    if not isinstance(data, dict):
        raise HydraError(f"{path} is empty or not a config; restore it, or start again with --overwrite")
    return config_from_dict(data, source=path)


# What a folder of each kind holds at its top: `hydranets train` and `hydranets pipeline` refuse each other's folders.
RUN_FILES = ("checkpoints", "summary.json", "metrics.jsonl", "model.safetensors", ".replaced-run")
PIPELINE_FILES = ("baseline", "hydranet", "partition.json", "eval.json")


def holds(out: Path, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` the folder ``out`` holds."""
    return [n for n in names if (out / n).exists()]


# Where a run's inputs lie: a finished run folder copied or moved elsewhere (with its inputs) is the same run.
_LOCATIONS = {"root", "partition", "init_from", "teacher"}


def check_run_dir(out: Path, cfg: Config, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a run unless asked; a resumed run must have the same model and data."""
    if out.exists() and not out.is_dir():
        raise HydraError(f"out={out} is a file; a run needs a folder: give another out=")
    check_writable(out / "config.yaml")
    if resume and overwrite:
        raise HydraError("--resume continues the run in the folder and --overwrite replaces it; give one of them")
    if found := holds(out, PIPELINE_FILES):
        raise HydraError(f"out={out} holds a pipeline ({', '.join(found)}), not a training run, and is never replaced "
                         f"by one (not even with --overwrite): give another out= (its runs are {out / 'baseline'} "
                         f"and {out / 'hydranet'})")
    finished, started = (out / "summary.json").exists(), (out / CHECKPOINT).exists()
    if overwrite:
        return
    if (out / REPLACED).exists() and not started:
        raise HydraError(f"{out} holds a run that an --overwrite set aside in {out / REPLACED} and was killed before "
                         f"its first checkpoint: to keep that run, move the files in {REPLACED} back into {out} "
                         "(replacing those there); to drop it, train with --overwrite again")
    if resume:
        old = saved_config(out)
        if old is not None:
            dense = not (old.hydra.enabled or cfg.hydra.enabled)  # a dense run ignores the hydra section
            for section in ("data", "model", "optim") if dense else ("data", "model", "optim", "hydra"):
                a, b = getattr(old, section).__dict__, getattr(cfg, section).__dict__
                # the optimiser's state holds for the same optimiser; its settings (lr, decay, ...) may change
                diff = [k for k in a if a[k] != b[k] and (section != "optim" or k == "name")
                        and not (finished and k in _LOCATIONS)]
                if diff:
                    raise HydraError(f"run folder {out} was made with {section}.{diff[0]}={a[diff[0]]!r}, "
                                     f"not {b[diff[0]]!r}; resume with the same config or choose another out=")
            was, now = old.train.epochs, cfg.train.epochs
            if was != now and finished:
                raise HydraError(f"run folder {out} holds a run that finished its train.epochs={was}; a finished run "
                                 f"is not extended: train {now} epochs in a new run (another out=) or with --overwrite")
            if was != now and cfg.optim.schedule != "constant" and cfg.optim.schedule_epochs is None:
                raise HydraError(f"run folder {out} was made with train.epochs={was}, not {now}; its "
                                 f"{cfg.optim.schedule} learning-rate schedule follows it, so resume with "
                                 f"train.epochs={was}, or start again with --overwrite")
    elif finished:
        raise HydraError(f"run folder {out} already holds a finished run; pass --resume (nothing to do) or "
                         "--overwrite, or choose another out=")
    elif started:
        raise HydraError(f"run folder {out} holds an unfinished run; pass --resume to continue it or --overwrite")


def run_precision(out: Path, precision: str, device: torch.device, resume: bool, say: bool = True) -> str:
    """The precision to train in: ``auto`` resolved for this device, except that a resumed run keeps the precision
    it started in where the device runs it (a run half in bf16 and half in fp32 is neither), with a note."""
    here = resolve_precision(precision, device)
    if not (resume and precision == "auto" and (out / CHECKPOINT).exists() and (out / "config.yaml").exists()):
        return here
    started = saved_config(out).train.precision
    if started == here or started not in ("fp32", "bf16", "fp16"):
        return here
    usable = started in ("fp32", "bf16") or (started == "fp16" and device.type == "cuda")
    if say:
        print(f"note: {out} was started in {started}; " + (
            f"it continues in {started} (train.precision=auto picks {here} here; set train.precision={here} to "
            "switch)" if usable else f"{started} does not run on {device.type}, so it continues in {here}"),
            file=sys.stderr, flush=True)
    return started if usable else here


_RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "metrics.csv", "summary.json", "model.safetensors", "config.yaml",
                "tensorboard")
REPLACED = ".replaced-run"


def _clear(out: Path) -> None:
    for name in _RUN_OUTPUTS:
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def prepare_run_dir(out: Path, overwrite: bool) -> None:
    """Create the run folder; with ``overwrite``, move what an earlier run left there into ``out/.replaced-run``,
    deleted by :func:`settle_replaced` once the new run has its first checkpoint, and put back if it fails before."""
    if overwrite and out.exists():
        aside = out / REPLACED
        if aside.exists():  # an earlier --overwrite was killed before its first checkpoint: that run stays aside
            _clear(out)
        else:
            aside.mkdir()
            for name in _RUN_OUTPUTS:
                if (out / name).exists():
                    (out / name).replace(aside / name)
    out.mkdir(parents=True, exist_ok=True)


def settle_replaced(out: Path, succeeded: bool) -> None:
    """After ``--overwrite``: delete the replaced run once the new one has a checkpoint, or, where the new run
    failed before that, delete what it wrote and put the replaced run back."""
    aside = out / REPLACED
    if not aside.is_dir():
        return
    if succeeded:
        shutil.rmtree(aside)
        return
    _clear(out)
    for p in aside.iterdir():
        p.replace(out / p.name)
    aside.rmdir()
    print(f"note: the run that --overwrite was replacing is back in {out}", file=sys.stderr)


def _csv_fields(row: dict) -> dict:
    return {k: (json.dumps(v) if isinstance(v, list) else v) for k, v in row.items() if k != "routing_matrix"}


def append_metrics(out: Path, row: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    flat = _csv_fields(row)
    new = not (out / "metrics.csv").exists()
    with open(out / "metrics.csv", "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(flat))
        if new:
            w.writeheader()
        w.writerow(flat)


def truncate_metrics(out: Path, epochs_done: int) -> None:
    """Keep only the metric rows of the epochs the checkpoint holds, in both files. An epoch's row is written before
    its checkpoint, so a run killed between the two (or in the middle of a row) left rows its resumption writes again."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the last line, torn by the kill
            continue
        if row["epoch"] <= epochs_done:
            rows.append(row)
    table = io.StringIO()
    if rows:
        w = csv.DictWriter(table, fieldnames=list(_csv_fields(rows[0])))
        w.writeheader()
        w.writerows(_csv_fields(r) for r in rows)
    atomic_write_text("".join(json.dumps(r) + "\n" for r in rows), path)
    atomic_write_text(table.getvalue(), out / "metrics.csv")


def read_metrics(out: str | Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []

