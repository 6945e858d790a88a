"""Inference on image files: load_model (run folder, checkpoint, safetensors), read_images, predict, `hydranets predict`."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import hydranets
from hydranets.data.inputs import InputSpec, image_files, read_images
from hydranets.data.synthetic import synthetic_splits
from hydranets.errors import HydraError
from hydranets.checkpoint import CHECKPOINT
from hydranets.train import load_trained
from helpers import one_error_line, run_cli, train_pair

BASE = ["data.name=synthetic", "model.name=resnet_cifar", "model.kwargs={depth: 8, width: 0.25}",
        "data.augment=none", "optim.lr=0.2", "optim.warmup_epochs=0", "train.epochs=2", "train.batch_size=32",
        "train.precision=fp32", "train.channels_last=false", "train.progress=false", "train.device=cpu",
        "train.threads=1"]
CLASSES = [f"class{c}" for c in range(10)]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A trained baseline and a HydraNet (3 branches, top-1), and 12 test images written as PNG files."""
    root = tmp_path_factory.mktemp("predict")
    trained = train_pair(root, BASE, [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]], CLASSES)
    _, test_set = synthetic_splits(10)
    pick = torch.arange(0, 100, 9)[:12]
    images = root / "images"
    images.mkdir()
    for i in pick.tolist():
        Image.fromarray(test_set.images[i].permute(1, 2, 0).numpy()).save(images / f"{i:03d}.png")
    return {**trained, "images": images,
            "x": test_set.images[pick], "labels": test_set.labels[pick]}


def by_hand(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class probabilities of uint8 images normalised here with the synthetic set's mean 0.5 and std 0.25."""
    with torch.no_grad():
        return model((x.float() / 255 - 0.5) / 0.25).softmax(1)


def test_runs_save_what_an_image_needs(runs):
    from safetensors import safe_open
    for name in ("baseline", "hydranet"):
        ckpt = torch.load(runs[name] / CHECKPOINT, weights_only=True)
        assert ckpt["inputs"] == {"classes": CLASSES, "mean": [0.5] * 3, "std": [0.25] * 3, "resize": 16, "size": 16}
        with safe_open(str(runs[name] / "model.safetensors"), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in f.metadata().items()}
        assert meta["inputs"] == ckpt["inputs"] and meta["model_info"] == ckpt["model_info"]
        assert meta["topk"] == ckpt["topk"] and meta["partition"] == ckpt["partition"]


@pytest.mark.parametrize("name", ["baseline", "hydranet"])
def test_load_model_from_folder_checkpoint_and_safetensors(runs, name):
    x = runs["x"]
    expected, ckpt = load_trained(runs[name])
    ref = by_hand(expected, x)
    for where in (runs[name], runs[name] / CHECKPOINT, runs[name] / "model.safetensors"):
        model = hydranets.load_model(where, "cpu")
        assert not model.training and model.input_spec.classes == CLASSES and model.input_spec.in_chans == 3
        assert torch.equal(by_hand(model, x), ref)
        folded = hydranets.load_model(where, "cpu", fold=True)
        assert torch.allclose(by_hand(folded, x), ref, atol=1e-5)
    st = hydranets.load_model(runs[name] / "model.safetensors", "cpu")
    if name == "hydranet":  # the subtasks travel with the weights: gate recall works from safetensors alone
        assert st.topk == 1 and torch.equal(st.membership, expected.membership)


def test_read_images_is_the_test_pipeline(runs):
    files = image_files([runs["images"]])
    assert [f.name for f in files] == sorted(f.name for f in files) and len(files) == 12
    spec = InputSpec(CLASSES, [0.5] * 3, [0.25] * 3, 16, 16)
    assert torch.equal(read_images(files, spec), runs["x"])  # PNG round trip at the run's size: the same pixels


def test_read_images_resizes_the_shorter_side_and_crops_the_centre(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)  # 50 wide, 30 high
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    spec = InputSpec(CLASSES, [0.5] * 3, [0.25] * 3, 12, 10)
    got = read_images([tmp_path / "wide.png"], spec)
    resized = Image.fromarray(pixels).resize((20, 12), Image.Resampling.BILINEAR)  # shorter side 30 -> 12
    expected = np.asarray(resized)[1:11, 5:15]  # the centre 10 x 10 of 20 x 12
    assert got.shape == (1, 3, 10, 10) and torch.equal(got[0], torch.from_numpy(expected.copy()).permute(2, 0, 1))
    gray = read_images([tmp_path / "wide.png"], InputSpec(CLASSES, [0.5], [0.25], 12, 10))
    expected_gray = np.asarray(Image.fromarray(pixels).convert("L").resize((20, 12), Image.Resampling.BILINEAR))
    assert gray.shape == (1, 1, 10, 10) and torch.equal(gray[0, 0], torch.from_numpy(expected_gray[1:11, 5:15].copy()))


@pytest.mark.parametrize("name", ["baseline", "hydranet"])
def test_predict_matches_an_independent_forward_pass(runs, name):
    model = hydranets.load_model(runs[name], "cpu")
    rows = hydranets.predict(model, runs["x"], top=3, batch_size=5)
    probs = by_hand(model, runs["x"])
    top_p, top_i = probs.topk(3, dim=1)
    assert len(rows) == 12
    for row, p, i in zip(rows, top_p, top_i):
        assert row["indices"] == i.tolist() and row["classes"] == [CLASSES[j] for j in i.tolist()]
        assert row["probs"] == pytest.approx(p.tolist(), abs=1e-6) and row["probs"] == sorted(row["probs"], reverse=True)
    _, test_set = synthetic_splits(10)  # on the whole test set, the top-1 that training measured last
    every = hydranets.predict(model, test_set.images)
    assert {len(r["classes"]) for r in every} == {5}  # the default: five classes
    top1 = 100 * sum(r["indices"][0] == y for r, y in zip(every, test_set.labels.tolist())) / len(every)
    assert top1 == pytest.approx(json.loads((runs[name] / "summary.json").read_text())["test_top1"])
    if name == "hydranet":
        with torch.no_grad():
            out = model((runs["x"].float() / 255 - 0.5) / 0.25, return_gate=True)
        assert [r["branches"] for r in rows] == out.route.tolist()
        scores = out.gate_logits.gather(1, out.route).sigmoid()
        assert [r["gate_scores"][0] for r in rows] == pytest.approx(scores[:, 0].tolist(), abs=1e-6)
    else:
        assert "branches" not in rows[0]


@pytest.mark.parametrize("name", ["baseline", "hydranet"])
def test_predict_with_a_bf16_model(runs, name):
    model = hydranets.load_model(runs[name], "cpu").to(torch.bfloat16)
    rows = hydranets.predict(model, runs["x"], top=3)
    with torch.no_grad():
        out = model(((runs["x"].float() / 255 - 0.5) / 0.25).bfloat16(), return_gate=True) if name == "hydranet" \
            else None
        probs = by_hand(model.float(), runs["x"])  # the same weights (bf16 values) in fp32
    for i, row in enumerate(rows):
        assert row["probs"] == pytest.approx(probs[i, row["indices"]].tolist(), abs=2e-2)
        assert row["probs"][0] >= probs[i].max().item() - 2e-2
        if out is not None:
            assert row["branches"] == out.route[i].tolist()


def test_predict_on_a_model_in_training_mode_predicts_as_in_eval_and_changes_nothing(runs):
    model = hydranets.load_model(runs["hydranet"], "cpu")
    expected = hydranets.predict(model, runs["x"], top=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    assert hydranets.predict(model, runs["x"], top=2) == expected
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_predict_bad_input(runs):
    model = hydranets.load_model(runs["baseline"], "cpu")
    with pytest.raises(HydraError, match="uint8"):
        hydranets.predict(model, runs["x"].float())
    with pytest.raises(HydraError, match="top must be"):
        hydranets.predict(model, runs["x"], top=11)
    with pytest.raises(HydraError, match="load_model"):
        hydranets.predict(hydranets.create_model("resnet20", num_classes=10), runs["x"])
    size = model.input_spec.size
    with pytest.raises(HydraError, match=f"takes {size}x{size} images, got {size + 4}x{size + 4}; .*read_images"):
        hydranets.predict(model, torch.zeros(2, runs["x"].shape[1], size + 4, size + 4, dtype=torch.uint8))
    assert hydranets.predict(model, runs["x"][:0]) == []


def test_old_run_without_inputs_reads_its_data_set(runs, tmp_path, capsys):
    ckpt = torch.load(runs["baseline"] / CHECKPOINT, weights_only=True)
    del ckpt["inputs"]
    torch.save(ckpt, tmp_path / "old.pt")
    model = hydranets.load_model(tmp_path / "old.pt", "cpu")
    assert "predates saved class names" in capsys.readouterr().err
    assert model.input_spec == InputSpec(CLASSES, [0.5] * 3, [0.25] * 3, 16, 16)


def test_cli_predict(runs, capsys, tmp_path):
    rows_file = tmp_path / "rows.json"
    code, out, err = run_cli(capsys, "predict", str(runs["hydranet"]), str(runs["images"]), "--top", "2",
                             "--batch-size", "5", "--device", "cpu", "--json", str(rows_file))
    assert code == 0, err
    lines = out.splitlines()
    rows = json.loads(rows_file.read_text())
    assert len(lines) == len(rows) == 12
    expected = hydranets.predict(hydranets.load_model(runs["hydranet"], "cpu", fold=True), runs["x"], top=2)
    for line, row, exp in zip(lines, rows, expected):
        assert row["indices"] == exp["indices"] and row["branches"] == exp["branches"]
        assert line == (f"{row['image']}: {row['classes'][0]} {row['probs'][0]:.1%}, {row['classes'][1]} "
                        f"{row['probs'][1]:.1%}  [branch {row['branches'][0]}]")
    assert [r["image"] for r in rows] == [str(f) for f in sorted(runs["images"].iterdir())]


def test_cli_predict_bad_input(runs, capsys, tmp_path):
    (tmp_path / "note.png").write_text("not an image")
    (tmp_path / "empty").mkdir()
    for args, words in (([str(tmp_path / "missing.png")], ("missing.png", "does not exist")),
                        ([str(tmp_path / "note.png")], ("cannot decode image", "note.png")),
                        ([str(tmp_path / "empty")], ("holds no", "images")),
                        ([str(runs["images"]), "--top", "0"], ("top must be",)),
                        ([str(runs["images"]), "--batch-size", "0"], ("--batch-size",))):
        code, out, err = run_cli(capsys, "predict", str(runs["baseline"]), *args, "--device", "cpu")
        assert code == 2 and out == ""
        one_error_line(err, *words)
    code, _, err = run_cli(capsys, "predict", str(tmp_path / "nowhere"), str(runs["images"]), "--device", "cpu")
    assert code == 2
    one_error_line(err, "does not exist")


def _synced_replaces(monkeypatch) -> list[tuple[str, bool, int | None]]:
    """Spy on os.replace: (target name, whether the file renamed had been fsynced, its folder's inode) for each
    call, then ("folder synced", True, None) once the folder holding it is fsynced after the rename."""
    synced, replaced = set(), []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.add(os.fstat(fd).st_ino)
        if replaced and replaced[-1][0] != "folder synced" and os.fstat(fd).st_ino == replaced[-1][2]:
            replaced.append(("folder synced", True, None))
        return real_fsync(fd)

    def replace(src, dst):
        replaced.append((os.path.basename(dst), os.stat(src).st_ino in synced, os.stat(os.path.dirname(dst)).st_ino))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return replaced


def test_saved_files_are_synced_before_they_replace_the_old_ones(tmp_path, monkeypatch):
    from hydranets.checkpoint import atomic_save, atomic_write_text, load_safetensors, save_safetensors
    model = hydranets.create_model("resnet_cifar", num_classes=10, depth=8, width=0.25)
    replaced = _synced_replaces(monkeypatch)
    atomic_write_text('{"epoch": 1}\n', tmp_path / "metrics.jsonl")
    save_safetensors(model, tmp_path / "model.safetensors", {"model_info": {"name": "resnet_cifar"}})
    atomic_save({"model": model.state_dict()}, tmp_path / "last.pt")
    assert [r[:2] for r in replaced] == [("metrics.jsonl", True), ("folder synced", True),
                                         ("model.safetensors", True), ("folder synced", True),
                                         ("last.pt", True), ("folder synced", True)]
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 1}\n'
    loaded = load_safetensors(tmp_path / "model.safetensors")
    assert loaded["model_info"] == {"name": "resnet_cifar"}
    assert all(torch.equal(loaded["model"][k], v) for k, v in model.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "metrics.jsonl", "model.safetensors"]


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_saved_files_get_the_permissions_of_a_plainly_written_file(tmp_path):
    from hydranets.checkpoint import atomic_save, atomic_write_text, save_safetensors
    model = hydranets.create_model("resnet_cifar", num_classes=10, depth=8, width=0.25)
    old = os.umask(0o022)
    try:
        (tmp_path / "plain.txt").write_text("x")
        save_safetensors(model, tmp_path / "model.safetensors", {"model_info": {}})
        atomic_save({"model": model.state_dict()}, tmp_path / "last.pt")
        atomic_write_text("{}", tmp_path / "summary.json")
        os.umask(0o077)
        atomic_write_text("{}", tmp_path / "private.json")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"plain.txt": 0o644, "model.safetensors": 0o644, "last.pt": 0o644, "summary.json": 0o644,
                     "private.json": 0o600}


def test_a_failed_save_keeps_the_old_file_and_leaves_no_temporary_one(tmp_path, monkeypatch):
    import safetensors.torch
    from hydranets.checkpoint import atomic_write_text, save_safetensors
    model = hydranets.create_model("resnet_cifar", num_classes=10, depth=8, width=0.25)
    (tmp_path / "model.safetensors").write_bytes(b"old weights")
    (tmp_path / "summary.json").write_text("old summary")

    def disk_full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a fi")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        save_safetensors(model, tmp_path / "model.safetensors", {"model_info": {}})
    def broken_rename(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("os.replace", broken_rename)
    with pytest.raises(OSError, match="Input/output error"):
        atomic_write_text("new summary", tmp_path / "summary.json")
    assert (tmp_path / "model.safetensors").read_bytes() == b"old weights"
    assert (tmp_path / "summary.json").read_text() == "old summary"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "summary.json"]
