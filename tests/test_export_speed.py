"""benchmarks/export_speed.py: trained runs exported, evaluated and timed beside their eager selves."""
import contextlib
import io
import re
import sys

import pytest

from hydranets import Partition
from hydranets.config import load_config
from hydranets.train import train
from helpers import load_benchmark

export_speed = load_benchmark("export_speed")

BASE = ["data.name=synthetic", "model.name=resnet_cifar", "model.kwargs={depth: 8, width: 0.25}", "data.augment=none",
        "optim.warmup_epochs=0", "train.epochs=1", "train.batch_size=32", "train.precision=fp32",
        "train.channels_last=false", "train.progress=false", "train.device=cpu", "train.threads=1"]


@pytest.mark.usefixtures("one_thread")
def test_export_speed_reports_equal_top1_and_both_speeds(tmp_path, monkeypatch, capsys):
    part = tmp_path / "subtasks.json"
    Partition([[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]], 10, [f"class{i}" for i in range(10)], "random").save(part)
    runs = {"dense": [], "hydra": ["hydra.enabled=true", "hydra.num_branches=2", "hydra.topk=1",
                                   f"hydra.partition={part}"]}
    with contextlib.redirect_stderr(io.StringIO()):
        for name, extra in runs.items():
            train(load_config(overrides=[*BASE, *extra, f"out={tmp_path / name}"]))
    monkeypatch.setattr(sys, "argv", ["export_speed.py", str(tmp_path / "dense"), str(tmp_path / "hydra"),
                                      "--batch-sizes", "8,1", "--repeats", "1", "--device", "cpu"])
    export_speed.main()
    out = capsys.readouterr().out
    accuracy = {m.group(1): m.groups()[1:] for m in re.finditer(r"^(dense|hydra) +(dense|B=2, k=1) +(\S+) +(\S+) +(\S+)$",
                                                                 out, flags=re.M)}
    assert accuracy["dense"][0] == "dense" and accuracy["hydra"][0] == "B=2, k=1"
    for _, top1, top1_exported, gap in accuracy.values():
        assert top1 == top1_exported and float(gap) < 1e-4
    for bs in ("8", "1"):
        block = out.split(f"batch {bs}: images/s")[1].split("batch")[0]
        rows = re.findall(r"^(dense|hydra) +(\d+) +(\d+) +(\d+\.\d\d)x$", block, flags=re.M)
        assert [r[0] for r in rows] == ["dense", "hydra"]
        for _, eager, exported, ratio in rows:
            assert float(ratio) == pytest.approx(int(exported) / int(eager), rel=0.05, abs=0.02)
