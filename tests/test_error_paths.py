"""Bad input met on the less-travelled paths: each is one `HydraError` line (`error: ...`, exit 2), no traceback."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import hydranets
from hydranets.checkpoint import check_writable, load_checkpoint, load_safetensors
from hydranets.data import load_dataset, make_imagefolder_loader
from hydranets.data.imagefolder import FolderBatches
from hydranets.distributed import pick_device
from hydranets.errors import HydraError
from hydranets.export import _LOAD_LOGGERS, export_model, load_exported
from helpers import one_error_line, run_cli, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line(excinfo: pytest.ExceptionInfo, *words: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


# ---------------------------------------------------------------- devices
@pytest.mark.parametrize("name", ["mps", "xpu", "mtia:0"])
def test_a_device_this_build_cannot_use_is_refused(name, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    monkeypatch.setattr(torch.mtia, "is_available", lambda: False)
    kind = name.split(":")[0]
    with pytest.raises(HydraError) as e:
        pick_device(name)
    one_line(e, f"device {name!r} was asked for but this torch build has no usable {kind} device",
             "use auto, cpu or cuda")


def test_meta_and_devices_without_a_backend_are_refused(monkeypatch):
    with pytest.raises(HydraError) as e:
        pick_device("meta")
    one_line(e, "'meta' holds no data to compute on", "use auto, cpu or cuda")
    for name in ("hpu", "vulkan", "mkldnn"):  # no torch.<type>.is_available to say yes
        with pytest.raises(HydraError) as e:
            pick_device(name)
        one_line(e, f"no usable {name} device")

    def broken() -> bool:
        raise RuntimeError("backend not linked")
    monkeypatch.setattr(torch.xpu, "is_available", broken)
    with pytest.raises(HydraError, match="no usable xpu device"):
        pick_device("xpu")


def test_an_available_other_device_is_kept(monkeypatch):
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("xpu:1") == torch.device("xpu:1") and pick_device("mps") == torch.device("mps")
    assert pick_device("cpu") == torch.device("cpu")


def test_cli_and_load_model_refuse_an_unusable_device(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    code, out, err = run_cli(capsys, "eval", str(tmp_path), "--device", "mps")
    assert code == 2 and out == ""
    one_error_line(err, "device 'mps' was asked for but this torch build has no usable mps device")
    with pytest.raises(HydraError, match="'meta' holds no data"):
        hydranets.load_model(tmp_path, "meta")
    code, _, err = run_cli(capsys, "train", "data.name=synthetic", "train.device=meta", f"out={tmp_path / 'run'}")
    assert code == 2
    one_error_line(err, "device 'meta' holds no data to compute on")


# ---------------------------------------------------------------- CIFAR archive that is no archive
def test_a_cifar_root_that_is_no_archive_is_one_line(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not an archive\n")
    with pytest.raises(HydraError) as e:
        load_dataset("cifar100", "train", root=text)
    one_line(e, f"{text} is not a readable tar archive", "data.root=")
    code, _, err = run_cli(capsys, "train", "data.name=cifar100", f"data.root={text}", "train.device=cpu",
                           f"out={tmp_path / 'run'}")
    assert code == 2
    one_error_line(err, "is not a readable tar archive")


# ---------------------------------------------------------------- a damaged image, decoded in a worker
def image_folder(root: Path) -> Path:
    """Two classes of three 8x8 images in train/ and val/, and a file of junk named train/b/fake.png."""
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / split / c / f"{i}.png")
    bad = root / "train" / "b" / "fake.png"
    bad.write_text("junk")
    return bad


def test_a_damaged_image_in_a_worker_is_the_workers_one_line(tmp_path):
    bad = image_folder(tmp_path)
    want = f"cannot decode image {bad}: UnidentifiedImageError"
    loader = make_imagefolder_loader(tmp_path, "train", batch_size=7, image_size=8, workers=1)
    with pytest.raises(HydraError) as e:
        list(loader)
    assert one_line(e, want, "replace or delete the file").startswith(want)
    batches = FolderBatches(tmp_path, "train", 7, train=True, image_size=8, workers=1, channels_last=False)
    with pytest.raises(HydraError) as e:
        list(batches)
    assert one_line(e, want).startswith(want)


def test_cli_training_on_a_damaged_image_is_one_line(tmp_path, capsys):
    bad = image_folder(tmp_path / "data")
    code, _, err = run_cli(capsys, "train", "data.name=imagefolder", f"data.root={tmp_path / 'data'}",
                           "data.image_size=8", "data.workers=1", "model.name=resnet_cifar",
                           "model.kwargs={depth: 8, width: 0.25}", "train.epochs=1", "train.batch_size=7",
                           "train.progress=false", "train.precision=fp32", "train.device=cpu",
                           "train.channels_last=false", f"out={tmp_path / 'run'}")
    assert code == 2
    line = one_error_line(err, f"cannot decode image {bad}", "replace or delete the file")
    assert "DataLoader worker" not in err and line.startswith("error: cannot decode image")


# ---------------------------------------------------------------- damaged benchmark results
@pytest.mark.parametrize("text", ["{oops", "[1, 2]", '{"rows": [{"top1": 1}]}'])
@pytest.mark.parametrize("add_repeats", [False, True])
def test_damaged_results_json_is_one_line(tmp_path, capsys, monkeypatch, text, add_repeats):
    import hydranets.bench.run as run_mod

    def no_work(*a, **k):
        raise AssertionError("work started before the saved results were read")
    monkeypatch.setattr(run_mod, "run_protocol", no_work)
    monkeypatch.setattr(run_mod, "_test_setup", no_work)
    proto = {"protocol": "x", "out": str(tmp_path / "runs"), "partition_from": "b", "base": {},
             "baselines": [{"name": "b"}], "hydranets": [{"name": "h"}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(proto))
    results = tmp_path / "results"
    results.mkdir()
    (results / "x.json").write_text(text)
    argv = ["bench", "pareto", "--config", str(tmp_path / "p.yaml"), "--results", str(results)]
    code, _, err = run_cli(capsys, *argv, *(["--add-repeats"] if add_repeats else []))
    assert code == 2
    one_error_line(err, str(results / "x.json"), "restore it from git", "delete it and evaluate every model again")
    assert (results / "x.json").read_text() == text


# ---------------------------------------------------------------- a checkpoint path that is no regular file
def test_a_checkpoint_that_is_no_regular_file(tmp_path, capsys):
    for load, what in ((load_checkpoint, "checkpoint"), (load_safetensors, "weights file")):
        with pytest.raises(HydraError) as e:
            load(tmp_path / "none.pt")
        one_line(e, f"{what} {tmp_path / 'none.pt'} does not exist")
        with pytest.raises(HydraError) as e:
            load(tmp_path)
        one_line(e, f"{what} {tmp_path} is a folder")
        if Path("/dev/null").exists():
            with pytest.raises(HydraError) as e:
                load("/dev/null")
            one_line(e, f"{what} /dev/null is not a regular file")
    if Path("/dev/null").exists():
        code, _, err = run_cli(capsys, "eval", "/dev/null", "--device", "cpu")
        assert code == 2
        line = one_error_line(err, "/dev/null is not a regular file")
        assert "does not exist" not in line


# ---------------------------------------------------------------- writable output paths
def test_check_writable_makes_and_leaves_nothing(tmp_path):
    (tmp_path / "kept.txt").write_text("x")
    before = sorted(tmp_path.rglob("*"))
    check_writable(tmp_path / "new" / "deeper" / "m.pt2")
    check_writable(tmp_path / "kept.txt")  # an existing file is replaced, not refused
    check_writable(tmp_path / "fresh.pt2")
    assert sorted(tmp_path.rglob("*")) == before and snapshot(tmp_path) == {"kept.txt": b"x"}


def test_check_writable_refuses_paths_that_cannot_be_written(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    cases = [(tmp_path / "file.txt" / "m.pt2", f"{tmp_path / 'file.txt'} is a file, not a folder"),
             (tmp_path / "file.txt" / "sub" / "m.pt2", f"{tmp_path / 'file.txt'} is a file, not a folder"),
             (tmp_path, "it is a folder")]
    if Path("/dev/null").exists():
        cases.append((Path("/dev/null"), "it is not a regular file"))
    if Path("/proc/self").is_dir():
        cases.append((Path("/proc/nope/x.pt2"), "cannot create files in /proc"))
    for path, words in cases:
        with pytest.raises(HydraError) as e:
            check_writable(path)
        one_line(e, f"cannot write {path}: {words}")
    assert snapshot(tmp_path) == {"file.txt": b"x"} and sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_export_model_checks_its_path_before_exporting(tmp_path, monkeypatch):
    def no_export(*a, **k):
        raise AssertionError("exported before the path was checked")
    monkeypatch.setattr(torch.export, "export", no_export)
    (tmp_path / "file.txt").write_text("x")
    model = hydranets.create_model("resnet_cifar", num_classes=10, depth=8, width=0.25).eval()
    targets = [tmp_path / "file.txt" / "m.pt2"] + (["/proc/nope/x.pt2"] if Path("/proc/self").is_dir() else [])
    for target in targets:
        with pytest.raises(HydraError) as e:
            export_model(model, target, torch.zeros(1, 3, 8, 8))
        one_line(e, f"cannot write {target}", "choose a writable path")


# ---------------------------------------------------------------- torch's logging while loading a bad program
class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_load_exported_of_a_bad_file_logs_nothing(tmp_path):
    """torch.export.load logs a traceback (logger torch.export, which its child loggers reach and which does not
    propagate) before it raises; the user is to see the HydraError line only."""
    (tmp_path / "junk.pt2").write_bytes(os.urandom(64))
    torch.save({"a": torch.zeros(3)}, tmp_path / "weights.pt")
    (tmp_path / "cut.pt2").write_bytes((tmp_path / "weights.pt").read_bytes()[:200])
    levels = [logging.getLogger(n).level for n in _LOAD_LOGGERS]
    seen = Records()
    logging.getLogger("torch.export").addHandler(seen)
    try:
        for name in ("junk.pt2", "weights.pt", "cut.pt2"):
            with pytest.raises(HydraError) as e:
                load_exported(tmp_path / name)
            one_line(e, "is not a readable torch.export program")
    finally:
        logging.getLogger("torch.export").removeHandler(seen)
    assert [r.getMessage() for r in seen.records] == []
    assert [logging.getLogger(n).level for n in _LOAD_LOGGERS] == levels
