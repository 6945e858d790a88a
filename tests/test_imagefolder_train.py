import json

import numpy as np
import pytest
import torch
from PIL import Image

import hydranets
from hydranets.config import load_config
from hydranets.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD, FolderBatches, ImageFolderDataset
from hydranets.data.inputs import image_files, read_images
from hydranets.train import train


def make_folder(root, classes=("cat", "dog"), per_class=6, size=40):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) // 2 + 100 * c
                Image.fromarray(img).save(root / split / name / f"{i}.png")


def test_folder_batches_normalise_on_the_device(tmp_path):
    make_folder(tmp_path, size=32)
    batches = FolderBatches(tmp_path, "val", 4, False, image_size=28, workers=0)
    x, y = next(iter(batches))
    assert x.shape == (4, 3, 28, 28) and x.dtype == torch.float32 and batches.classes == ["cat", "dog"]
    raw = next(iter(batches.loader))[0][:4].float()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (raw / 255 - mean) / std, rtol=1e-5, atol=1e-5)
    assert len(batches) == 3


def test_train_on_an_image_folder(tmp_path):
    make_folder(tmp_path / "data")
    cfg = load_config(overrides=[f"out={tmp_path / 'run'}", "data.name=imagefolder", f"data.root={tmp_path / 'data'}",
                                 "data.image_size=32", "data.workers=0", "model.name=resnet_cifar",
                                 "model.kwargs={depth: 8, width: 0.5}", "train.epochs=1", "train.batch_size=4",
                                 "train.progress=false", "train.channels_last=false", "train.precision=fp32"])
    summary = train(cfg)
    assert summary["finished"] and summary["num_classes"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and 0 <= rows[0]["test_top1"] <= 100
    # the run keeps what its images need: predicting on the val files is its own test evaluation
    model = hydranets.load_model(tmp_path / "run", "cpu")
    spec = model.input_spec
    assert spec.classes == ["cat", "dog"] and (spec.resize, spec.size) == (37, 32)  # 32 * 256 / 224, then the crop
    assert spec.mean == list(IMAGENET_MEAN) and spec.std == list(IMAGENET_STD)
    files = image_files([tmp_path / "data" / "val"])
    images = read_images(files, spec)
    val = ImageFolderDataset(tmp_path / "data", "val", 32, train=False)
    assert [str(f) for f in files] == [str(p) for p, _ in val.samples]
    assert all(torch.equal(images[i], val[i][0]) for i in range(len(val)))
    rows = hydranets.predict(model, images)
    top1 = 100 * sum(r["indices"][0] == label for r, label in zip(rows, val.labels)) / len(rows)
    assert abs(top1 - rows_metrics(tmp_path)) < 1e-9


def rows_metrics(tmp_path):
    return json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["test_top1"]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # the 16-CPU case on a smaller machine
def test_imagefolder_workers_default_to_at_most_the_cpus(tmp_path, monkeypatch):
    """data.workers unset: 4 decoding processes, or as many as the CPUs this process may use where fewer."""
    import hydranets.data.decode as decode
    from hydranets.distributed import Runtime
    from hydranets.train import make_loaders
    make_folder(tmp_path / "data", size=8, per_class=2)
    rt = Runtime(0, 1, 0, torch.device("cpu"))
    for cpus, expected in ((2, 2), (16, 4)):
        monkeypatch.setattr(decode, "usable_cpus", lambda: cpus)
        cfg = load_config(overrides=["data.name=imagefolder", f"data.root={tmp_path / 'data'}", "data.image_size=8"])
        train_b, test_b, _ = make_loaders(cfg, rt)
        assert train_b.loader.num_workers == test_b.loader.num_workers == expected
    cfg = load_config(overrides=["data.name=imagefolder", f"data.root={tmp_path / 'data'}", "data.workers=1"])
    assert make_loaders(cfg, rt)[0].loader.num_workers == 1
