"""benchmarks/fold_speed.py: trained models timed as trained and folded, and the families' time savings both ways."""
import contextlib
import io
import re
import sys

import pytest

from hydranets import Partition
from hydranets.config import load_config
from hydranets.train import train
from helpers import load_benchmark

fold_speed = load_benchmark("fold_speed")

BASE = ["data.name=synthetic", "model.name=resnet_cifar", "data.augment=none", "optim.warmup_epochs=0",
        "train.epochs=1", "train.batch_size=32", "train.precision=fp32", "train.channels_last=false",
        "train.progress=false", "train.device=cpu", "train.threads=1"]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_fold_speed_prints_both_timings_and_savings(tmp_path, monkeypatch, capsys):
    part = tmp_path / "subtasks.json"
    Partition([[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]], 10, [f"class{i}" for i in range(10)], "random").save(part)
    runs = {"b1": ["model.kwargs={depth: 8, width: 0.25}"], "b2": ["model.kwargs={depth: 8, width: 0.5}"],
            "h1": ["model.kwargs={depth: 8, width: 0.25}", "hydra.enabled=true", "hydra.num_branches=2",
                   "hydra.topk=1", f"hydra.partition={part}"]}
    with contextlib.redirect_stderr(io.StringIO()):
        for name, extra in runs.items():
            train(load_config(overrides=[*BASE, *extra, f"out={tmp_path / name}"]))
    monkeypatch.setattr(sys, "argv", ["fold_speed.py", "--baselines", str(tmp_path / "b1"), str(tmp_path / "b2"),
                                      "--hydranets", str(tmp_path / "h1"), "--batch-sizes", "16", "--repeats", "1"])
    fold_speed.main()
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if re.match(r"(b1|b2|h1) ", line)}
    assert set(rows) == {"b1", "b2", "h1"}
    # ResNet-8: the stem's conv, two per block (3 blocks), two shortcuts; the HydraNet: the stages before the last
    # (6 of those 9), then the last stage (3) in the gate and in each of its 2 branches
    folded_pairs = {"b1": 9, "b2": 9, "h1": 6 + 3 * (1 + 2)}
    for name, (_, family, pairs, top1, top1_folded, speed, speed_folded, ratio) in rows.items():
        assert family == ("hydranet" if name == "h1" else "baseline")
        assert int(pairs) == folded_pairs[name] and top1 == top1_folded  # folding keeps every prediction
        assert float(ratio[:-1]) == pytest.approx(float(speed_folded) / float(speed), abs=0.02)
    saving = r"hydranet family: time saving at the best baseline's top-1 \(\d+\.\d\d%\), (as trained|folded): "
    assert re.findall(saving, out) == ["as trained", "folded"] and "control family" not in out
