"""Bad input in configs, overrides, partition seeds and partition files: one error line, nothing written."""
from __future__ import annotations

import json

import numpy as np
import pytest

from hydranets import HydraError, Partition
from hydranets.config import config_from_dict, load_config
from hydranets.partition import kmeans, make_partition, partition_kmeans, partition_random
from helpers import one_error_line, run_cli

BASE = ["data.name=synthetic", "model.name=resnet_cifar", "model.kwargs={depth: 8, width: 0.25}",
        "train.device=cpu", "train.progress=false", "train.threads=1"]


def train_error(capsys, tmp_path, *args: str) -> str:
    """``hydranets train ARGS`` into tmp_path/r: its one error line, after checking exit 2 and no run folder."""
    code, _, err = run_cli(capsys, "train", *args, *BASE, f"out={tmp_path / 'r'}")
    assert code == 2
    assert not (tmp_path / "r").exists()
    return one_error_line(err)


def test_a_config_file_that_is_not_text_is_one_error(capsys, tmp_path):
    f = tmp_path / "binary.yaml"
    f.write_bytes(b"\x00\x01\xff\xfe")
    assert str(f) in train_error(capsys, tmp_path, "--config", str(f))
    assert "not UTF-8 text" in train_error(capsys, tmp_path, "--config", str(f))


@pytest.mark.parametrize("text,key,line", [
    ("train:\n  epochs: 2\noptim:\n  lr: 0.1\ntrain:\n  epochs: 3\n", "'train'", "line 5"),
    ("train:\n  epochs: 2\n  batch_size: 16\n  epochs: 3\n", "'epochs'", "line 4"),
])
def test_a_key_twice_in_a_config_file_is_refused(capsys, tmp_path, text, key, line):
    f = tmp_path / "twice.yaml"
    f.write_text(text)
    err = train_error(capsys, tmp_path, "--config", str(f))
    for word in (str(f), key, "twice", line):
        assert word in err, (word, err)


def test_a_key_twice_in_an_override_is_refused(capsys, tmp_path):
    err = train_error(capsys, tmp_path, "model.kwargs={depth: 8, depth: 20}")
    assert "'depth' is given twice" in err


def test_yaml_merge_keys_still_override():
    from hydranets.config import load_yaml
    assert load_yaml("a: &x {p: 1, q: 2}\nb: {<<: *x, p: 3}\n")["b"] == {"p": 3, "q": 2}


@pytest.mark.parametrize("value", ["-1", ".nan", ".inf"])
def test_mixup_must_be_finite_and_not_negative(capsys, tmp_path, value):
    err = train_error(capsys, tmp_path, f"data.mixup={value}")
    assert "data.mixup must be a finite number >= 0" in err and "0 turns it off" in err


@pytest.mark.parametrize("setting", ["optim.momentum=0.5", "optim.nesterov=false"])
def test_sgd_settings_with_adamw_are_refused_not_ignored(capsys, tmp_path, setting):
    err = train_error(capsys, tmp_path, "optim.name=adamw", setting)
    assert f"optim.{setting.split('=')[0].split('.')[1]} is an SGD setting that AdamW does not use" in err


@pytest.mark.parametrize("value", ["0", "-2", ".nan", ".inf"])
def test_schedule_epochs_must_be_positive_or_null(capsys, tmp_path, value):
    err = train_error(capsys, tmp_path, f"optim.schedule_epochs={value}")
    assert "optim.schedule_epochs must be > 0, or null for train.epochs" in err


@pytest.mark.parametrize("seed", [-3, 1.5, True, "1"])
def test_a_partition_seed_must_be_a_whole_number_from_0(seed):
    from hydranets.partition import check_partition_seed
    with pytest.raises(HydraError, match="partition seed .* must be an integer >= 0"):
        check_partition_seed(seed)


def test_a_partition_seed_may_be_any_whole_number_from_0():
    from hydranets.partition import check_partition_seed
    check_partition_seed(0)
    check_partition_seed(np.int64(7))
    assert partition_random(6, 2, seed=np.int64(7)).subsets == partition_random(6, 2, seed=7).subsets


def test_partition_functions_refuse_a_negative_seed():
    x = np.random.default_rng(0).random((6, 6))
    for call in (lambda: kmeans(x, 2, seed=-1), lambda: partition_kmeans(x, 2, seed=-3),
                 lambda: partition_random(6, 2, seed=-3),
                 lambda: make_partition("random", num_subsets=2, num_classes=6, seed=-3),
                 lambda: make_partition("spectral", num_subsets=2, confusion=x, seed=-3)):
        with pytest.raises(HydraError, match="must be an integer >= 0, got -3|got -1"):
            call()


@pytest.mark.parametrize("content", [[[0, 1], [2, 3]], {"subsets": "x"}, {"subsets": [[0, 1], [2, 3]]},
                                     {"subsets": [0, 1, 2, 3], "num_classes": 4}, {"subsets": 5, "num_classes": 4}])
def test_a_partition_file_of_the_wrong_shape_says_what_it_must_hold(tmp_path, content):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(content))
    with pytest.raises(HydraError) as e:
        Partition.load(path)
    msg = str(e.value)
    assert "\n" not in msg
    for word in (str(path), "JSON object", '"subsets"', '"num_classes"', "hydranets partition"):
        assert word in msg, (word, msg)


def test_a_key_error_from_a_config_file_names_the_file(capsys, tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("train:\n  epoch: 3\n")
    err = train_error(capsys, tmp_path, "--config", str(f))
    for word in (f"config file {f}", "'train.epoch'", "did you mean 'train.epochs'"):
        assert word in err, (word, err)
    saved = tmp_path / "run" / "config.yaml"
    with pytest.raises(HydraError, match=f"config file {saved}: unknown config key 'train.epoch'"):
        config_from_dict({"train": {"epoch": 3}}, source=saved)
    with pytest.raises(HydraError, match="^unknown config key 'train.epoch'"):
        config_from_dict({"train": {"epoch": 3}})
    f.write_text("train:\n  epochs: 3\noptim:\n  lr: 0.5\n")
    cfg = load_config(f, ["train.epochs=4"], base={"optim": {"momentum": 0.8}})
    assert (cfg.train.epochs, cfg.optim.lr, cfg.optim.momentum) == (4, 0.5, 0.8)


def test_softmax_weighting_over_one_branch_is_noted(capsys, tmp_path, monkeypatch):
    """Softmax over a single routed score is 1: the task loss never reaches the gate. Said, not silent."""
    import hydranets.train as train_mod
    monkeypatch.setattr(train_mod, "train_one_epoch", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    hydra = ["hydra.enabled=true", "hydra.num_branches=2", "hydra.gate_loss=0", "hydra.routing=topk"]
    for extra, noted in ((["hydra.topk=1", "hydra.gate_weighting=softmax"], True),
                         (["hydra.topk=2", "hydra.gate_weighting=softmax"], False),
                         (["hydra.topk=1", "hydra.gate_weighting=sigmoid"], False)):
        _, _, err = run_cli(capsys, "train", *BASE, *hydra, *extra, f"out={tmp_path / str(len(extra)) / extra[0]}")
        assert ("gate_weighting=softmax over top-1 routing" in err) == noted, err
