import gzip
import hashlib
import http.server
import io
import os
import pickle
import re
import struct
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hydranets.data import (
    DATASET_NAMES,
    BatchLoader,
    ImageDataset,
    ImageFolderDataset,
    default_cache_dir,
    download_file,
    extract_archive,
    load_dataset,
    load_splits,
    make_imagefolder_loader,
)
from hydranets.data import cifar, decode, fashion_mnist, tiny_imagenet
from hydranets.errors import HydraError

RNG = np.random.default_rng(1234)


# ------------------------------------------------------------------------------------------ helpers

def write_pickle(path: Path, d: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({k.encode(): v for k, v in d.items()}, f, protocol=2)


def make_cifar10(root: Path, per_batch: int = 4, n_test: int = 3) -> dict:
    folder = root / "cifar-10-batches-py"
    names = [f"class{i}".encode() for i in range(10)]
    write_pickle(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": per_batch})
    out = {"train_data": [], "train_labels": [], "names": [n.decode() for n in names]}
    for i in range(1, 6):
        data = RNG.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = RNG.integers(0, 10, per_batch).tolist()
        write_pickle(folder / f"data_batch_{i}", {"data": data, "labels": labels,
                                                  "filenames": [b"x.png"] * per_batch, "batch_label": b"b"})
        out["train_data"].append(data)
        out["train_labels"] += labels
    data = RNG.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    labels = RNG.integers(0, 10, n_test).tolist()
    write_pickle(folder / "test_batch", {"data": data, "labels": labels, "filenames": [b"t.png"] * n_test})
    out["train_data"] = np.concatenate(out["train_data"])
    out["test_data"], out["test_labels"] = data, labels
    return out


def make_cifar100(root: Path, n_train: int = 30, n_test: int = 10) -> dict:
    folder = root / "cifar-100-python"
    fine = [f"fine{i}".encode() for i in range(100)]
    coarse = [f"coarse{i}".encode() for i in range(20)]
    write_pickle(folder / "meta", {"fine_label_names": fine, "coarse_label_names": coarse})
    out = {"names": [n.decode() for n in fine]}
    for split, n in (("train", n_train), ("test", n_test)):
        data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine_labels = RNG.integers(0, 100, n).tolist()
        coarse_labels = RNG.integers(0, 20, n).tolist()
        write_pickle(folder / split, {"data": data, "fine_labels": fine_labels, "coarse_labels": coarse_labels,
                                      "filenames": [b"f.png"] * n})
        out[split] = (data, fine_labels, coarse_labels)
    return out


def chw_from_rows(rows: np.ndarray) -> np.ndarray:
    """Independent CHW decoding of CIFAR rows: 1024 R values, then G, then B, each row-major 32x32."""
    n = rows.shape[0]
    out = np.empty((n, 3, 32, 32), dtype=np.uint8)
    for i in range(n):
        for c in range(3):
            plane = rows[i, c * 1024:(c + 1) * 1024]
            for y in range(32):
                out[i, c, y] = plane[y * 32:(y + 1) * 32]
    return out


WNIDS = ["n03000003", "n01000001", "n02000002"]
WORDS = {"n01000001": "goldfish, Carassius auratus", "n02000002": "tree frog, tree-frog",
         "n03000003": "school bus", "n09999999": "unused, other"}


def make_tiny(parent: Path, per_class: int = 3, val_per_class: int = 2, size: tuple[int, int] = (8, 6)) -> dict:
    """A Tiny-ImageNet tree of lossless PNG images (train) and quality-100 JPEGs (val), W x H = size."""
    root = parent / "tiny-imagenet-200"
    (root / "val" / "images").mkdir(parents=True)
    (root / "test" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (root / "words.txt").write_text("".join(f"{k}\t{v}\n" for k, v in WORDS.items()))
    w, h = size
    train = {}
    for wnid in WNIDS:
        d = root / "train" / wnid / "images"
        d.mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for k in range(per_class):
            arr = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"{wnid}_{k}.png")
            train[(wnid, k)] = arr.transpose(2, 0, 1)
    Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "test" / "images" / "test_0.png")
    lines, val = [], []
    for k in range(val_per_class * len(WNIDS)):
        wnid = WNIDS[k % len(WNIDS)]
        p = root / "val" / "images" / f"val_{k}.JPEG"
        Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p, quality=100)
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t{w}\t{h}")
        val.append((wnid, np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1)))
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return {"root": root, "train": train, "val": val, "per_class": per_class}


def expected_tiny(tree: dict, classes: int | None = None):
    order = sorted(WNIDS)[:classes]
    train_x = np.stack([tree["train"][(w, k)] for w in order for k in range(tree["per_class"])])
    train_y = np.repeat(np.arange(len(order)), tree["per_class"])
    val = [(order.index(w), a) for w, a in tree["val"] if w in order]
    return train_x, train_y, np.stack([a for _, a in val]), np.array([y for y, _ in val])


def tar_gz(src: Path, dest: Path, fmt: int = tarfile.GNU_FORMAT) -> Path:
    with tarfile.open(dest, "w:gz", format=fmt) as tar:
        tar.add(src, arcname=src.name)
    return dest


def write_idx(path: Path, arr: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def make_fashion(root: Path, n_train: int = 12, n_test: int = 5) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = RNG.integers(0, 10, n, dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
        out[prefix] = (images, labels)
    return out


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/served over HTTP on 127.0.0.1 and records the requested paths."""
    served = tmp_path / "served"
    served.mkdir()
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args):
            pass

        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()
    httpd.server_close()


# ------------------------------------------------------------------------------------------- CIFAR

def test_cifar10_pixels_labels_and_names(tmp_path):
    exp = make_cifar10(tmp_path)
    train = load_dataset("cifar10", "train", root=tmp_path)
    assert DATASET_NAMES == ("cifar10", "cifar100", "tiny-imagenet", "fashion-mnist")
    assert train.images.dtype == torch.uint8 and train.images.shape == (20, 3, 32, 32)
    assert train.images.is_contiguous()
    assert np.array_equal(train.images.numpy(), chw_from_rows(exp["train_data"]))
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == exp["train_labels"]
    assert train.classes == exp["names"] and len(train) == 20
    assert train.mean == (0.4914, 0.4822, 0.4465) and train.std == (0.2470, 0.2435, 0.2616)
    assert train.coarse_labels is None
    test = load_dataset("cifar10", "test", root=tmp_path)
    assert np.array_equal(test.images.numpy(), chw_from_rows(exp["test_data"]))
    assert test.labels.tolist() == exp["test_labels"]


def test_cifar100_coarse_labels_and_classes_subset(tmp_path):
    exp = make_cifar100(tmp_path)
    train, test = load_splits("cifar100", root=tmp_path / "cifar-100-python")
    data, fine, coarse = exp["train"]
    assert np.array_equal(train.images.numpy(), chw_from_rows(data))
    assert train.labels.tolist() == fine and train.coarse_labels.tolist() == coarse
    assert train.classes == exp["names"] and train.mean == (0.5071, 0.4865, 0.4409)
    assert test.labels.tolist() == exp["test"][1]
    sub = load_dataset("cifar100", "train", root=tmp_path, classes=50)
    keep = np.array(fine) < 50
    assert sub.classes == exp["names"][:50]
    assert sub.labels.tolist() == np.array(fine)[keep].tolist()
    assert sub.coarse_labels.tolist() == np.array(coarse)[keep].tolist()
    assert np.array_equal(sub.images.numpy(), chw_from_rows(data[keep]))
    with pytest.raises(HydraError, match="classes=101"):
        load_dataset("cifar100", root=tmp_path, classes=101)


def test_cifar_from_archive_extracts_once(tmp_path):
    exp = make_cifar10(tmp_path / "src")
    root = tmp_path / "root"
    root.mkdir()
    tar_gz(tmp_path / "src" / "cifar-10-batches-py", root / "cifar-10-python.tar.gz")
    ds = load_dataset("cifar10", "test", root=root)
    assert ds.labels.tolist() == exp["test_labels"]
    assert (root / "cifar-10-batches-py" / "test_batch").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_cifar_download_uses_overridable_url(tmp_path, server, monkeypatch):
    served, url, hits = server
    make_cifar10(tmp_path / "src")
    archive = tar_gz(tmp_path / "src" / "cifar-10-batches-py", served / "cifar-10-python.tar.gz")
    monkeypatch.setenv("HYDRANETS_CIFAR_URL", url + "/")
    monkeypatch.setitem(cifar.CIFAR_MD5, "cifar10", md5(archive))
    with pytest.raises(HydraError, match="download=True"):
        load_dataset("cifar10", root=tmp_path / "dl")
    ds = load_dataset("cifar10", "train", root=tmp_path / "dl", download=True)
    assert len(ds) == 20 and hits == ["/cifar-10-python.tar.gz"]
    assert (tmp_path / "dl" / "cifar-10-python.tar.gz").read_bytes() == archive.read_bytes()


def test_cifar_bad_pickles_name_the_file(tmp_path):
    make_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    write_pickle(batch, {"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 1]})
    with pytest.raises(HydraError, match=r"data_batch_3.*'labels'"):
        load_dataset("cifar10", root=tmp_path)
    write_pickle(batch, {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]})
    with pytest.raises(HydraError, match=r"data_batch_3.*outside 0\.\.9"):
        load_dataset("cifar10", root=tmp_path)
    write_pickle(batch, {"data": np.zeros((2, 3000), np.uint8), "labels": [0, 1]})
    with pytest.raises(HydraError, match=r"data_batch_3.*3072"):
        load_dataset("cifar10", root=tmp_path)
    batch.write_bytes(b"\x80\x02}q\x00(X")
    with pytest.raises(HydraError, match="data_batch_3"):
        load_dataset("cifar10", root=tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > evil_marker",))


def test_cifar_pickle_cannot_run_code(tmp_path, monkeypatch):
    make_cifar10(tmp_path)
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil()}, f)
    with pytest.raises(HydraError, match="test_batch"):
        load_dataset("cifar10", "test", root=tmp_path)
    assert not (tmp_path / "evil_marker").exists()


def test_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(HydraError, match="download=True"):
        load_dataset("cifar100", root=tmp_path)
    with pytest.raises(HydraError, match="download=True"):
        load_dataset("fashion-mnist", root=tmp_path)
    with pytest.raises(HydraError, match="root="):
        load_dataset("tiny-imagenet", root=tmp_path)
    with pytest.raises(HydraError, match="cifar10, cifar100"):
        load_dataset("mnist")
    with pytest.raises(HydraError, match="split"):
        load_dataset("cifar10", split="holdout", root=tmp_path)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HYDRANETS_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("HYDRANETS_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "hydranets"


# ----------------------------------------------------------------------------------- Fashion-MNIST

def test_fashion_mnist_pixels_and_labels(tmp_path):
    exp = make_fashion(tmp_path / "fm")
    train = load_dataset("fashion-mnist", "train", root=tmp_path / "fm")
    assert train.images.shape == (12, 1, 28, 28) and train.images.dtype == torch.uint8
    assert np.array_equal(train.images[:, 0].numpy(), exp["train"][0])
    assert train.labels.tolist() == exp["train"][1].tolist()
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    assert train.mean == (0.2860,) and train.std == (0.3530,)
    (tmp_path / "fm" / "t10k-images-idx3-ubyte.gz").rename(tmp_path / "fm" / "t10k-images-idx3-ubyte.raw")
    write_idx(tmp_path / "fm" / "t10k-images-idx3-ubyte", exp["t10k"][0], compress=False)
    test = load_dataset("fashion-mnist", "test", root=tmp_path / "fm", classes=5)
    keep = exp["t10k"][1] < 5
    assert np.array_equal(test.images[:, 0].numpy(), exp["t10k"][0][keep])


def test_fashion_mnist_bad_files(tmp_path):
    exp = make_fashion(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    good = gzip.decompress(images.read_bytes())
    images.write_bytes(gzip.compress(good[:-100]))
    with pytest.raises(HydraError, match=r"train-images-idx3-ubyte\.gz is truncated"):
        load_dataset("fashion-mnist", root=tmp_path)
    images.write_bytes(gzip.compress(good)[:-40])
    with pytest.raises(HydraError, match=r"train-images-idx3-ubyte\.gz"):
        load_dataset("fashion-mnist", root=tmp_path)
    images.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + good[4:]))
    with pytest.raises(HydraError, match=r"train-images-idx3-ubyte\.gz is not an idx file"):
        load_dataset("fashion-mnist", root=tmp_path)
    write_idx(images, exp["train"][0])
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.full(12, 10, np.uint8))
    with pytest.raises(HydraError, match=r"train-labels-idx1-ubyte\.gz has label 10"):
        load_dataset("fashion-mnist", root=tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(11, np.uint8))
    with pytest.raises(HydraError, match="11 labels"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_fashion_mnist_download(tmp_path, server, monkeypatch):
    served, url, hits = server
    make_fashion(served)
    for name in fashion_mnist.FASHION_MNIST_MD5:
        monkeypatch.setitem(fashion_mnist.FASHION_MNIST_MD5, name, md5(served / name))
    monkeypatch.setenv("HYDRANETS_FASHION_MNIST_URL", url)
    ds = load_dataset("fashion-mnist", "test", root=tmp_path / "fm", download=True)
    assert len(ds) == 5
    assert sorted(hits) == ["/t10k-images-idx3-ubyte.gz", "/t10k-labels-idx1-ubyte.gz"]


# ----------------------------------------------------------------------------------- Tiny-ImageNet

def test_tiny_imagenet_folder_pixels_labels_names(tmp_path):
    tree = make_tiny(tmp_path / "data")
    train, test = load_splits("tiny-imagenet", root=tmp_path / "data", cache_dir=tmp_path / "cache")
    tx, ty, vx, vy = expected_tiny(tree)
    assert train.images.shape == (9, 3, 6, 8)
    assert np.array_equal(train.images.numpy(), tx) and train.labels.tolist() == ty.tolist()
    assert np.array_equal(test.images.numpy(), vx) and test.labels.tolist() == vy.tolist()
    assert train.classes == ["goldfish", "tree frog", "school bus"] == test.classes
    pixels = tx.astype(np.float64) / 255
    assert np.allclose(train.mean, pixels.mean((0, 2, 3))) and np.allclose(train.std, pixels.std((0, 2, 3)))
    assert test.mean == train.mean and test.std == train.std

    two = load_dataset("tiny-imagenet", "test", root=tree["root"], classes=2, cache_dir=tmp_path / "cache")
    tx2, _, vx2, vy2 = expected_tiny(tree, classes=2)
    assert two.classes == ["goldfish", "tree frog"]
    assert np.array_equal(two.images.numpy(), vx2) and two.labels.tolist() == vy2.tolist()
    assert np.allclose(two.mean, (tx2 / 255).mean((0, 2, 3)))


def test_tiny_imagenet_folder_cache_sees_replaced_and_added_images(tmp_path, monkeypatch):
    tree = make_tiny(tmp_path / "data")
    cache = tmp_path / "cache"
    first = load_dataset("tiny-imagenet", "train", root=tree["root"], cache_dir=cache)
    tx, _, _, _ = expected_tiny(tree)
    assert np.array_equal(first.images.numpy(), tx)

    def broken(*args):
        raise AssertionError("decoded again instead of reading the cache")

    with monkeypatch.context() as m:
        m.setattr(decode, "_decode_image", broken)
        assert torch.equal(load_dataset("tiny-imagenet", "train", root=tree["root"], cache_dir=cache).images,
                           first.images)

    wnid = sorted(WNIDS)[0]
    images = tree["root"] / "train" / wnid / "images"
    Image.fromarray(np.full((6, 8, 3), 123, np.uint8)).save(images / f"{wnid}_0.png")
    replaced = load_dataset("tiny-imagenet", "train", root=tree["root"], cache_dir=cache)
    assert len(replaced) == 9 and (replaced.images[0] == 123).all()
    assert torch.equal(replaced.images[1:], first.images[1:])

    Image.fromarray(np.full((6, 8, 3), 77, np.uint8)).save(images / f"{wnid}_9.png")
    added = load_dataset("tiny-imagenet", "train", root=tree["root"], cache_dir=cache)
    assert len(added) == 10 and (added.images[3] == 77).all() and added.labels.tolist()[:4] == [0] * 4

    val = load_dataset("tiny-imagenet", "test", root=tree["root"], cache_dir=cache)
    Image.fromarray(np.full((6, 8, 3), 55, np.uint8)).save(tree["root"] / "val" / "images" / "val_0.JPEG",
                                                            quality=100)
    val_after = load_dataset("tiny-imagenet", "test", root=tree["root"], cache_dir=cache)
    assert not torch.equal(val.images[0], val_after.images[0]) and (val_after.images[0] == 55).all()


def test_tiny_imagenet_archive_matches_folder_and_caches(tmp_path, monkeypatch):
    tree = make_tiny(tmp_path / "data")
    archive = tar_gz(tree["root"], tmp_path / "tiny.tar.gz")
    cache = tmp_path / "cache"
    train = load_dataset("tiny-imagenet", "train", root=archive, cache_dir=cache)
    tx, ty, vx, vy = expected_tiny(tree)
    assert np.array_equal(train.images.numpy(), tx) and train.labels.tolist() == ty.tolist()
    assert sorted(p.name.split("-")[0] for p in (cache / "tiny-imagenet").iterdir()) == ["test", "train"]

    def broken(*args):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(decode, "_decode_image", broken)
    again_train, again_test = load_splits("tiny-imagenet", root=archive, cache_dir=cache)
    assert torch.equal(again_train.images, train.images) and again_train.classes == train.classes
    assert np.array_equal(again_test.images.numpy(), vx) and again_test.mean == train.mean
    with pytest.raises(HydraError, match="cannot decode"):
        load_dataset("tiny-imagenet", root=archive, classes=1, cache_dir=cache)


def test_tiny_imagenet_cache_of_an_earlier_state_is_removed(tmp_path, capsys):
    """A source that changed (here: the archive's time stamp) decodes again and deletes its earlier cache files, and
    those named as earlier versions named them; another source's files and foreign files stay."""
    tree = make_tiny(tmp_path / "data")
    archive = tar_gz(tree["root"], tmp_path / "tiny.tar.gz")
    folder = tmp_path / "cache" / "tiny-imagenet"
    load_splits("tiny-imagenet", root=archive, cache_dir=tmp_path / "cache")
    first = sorted(p.name for p in folder.iterdir())
    assert len(first) == 2 and all(re.fullmatch(r"(train|test)-all-[0-9a-f]{8}-[0-9a-f]{12}\.npz", n) for n in first)
    kept = ["train-all-00000000-111111111111.npz", "notes.npz", "train-all-old.npz"]
    for name in kept + ["test-100-0123456789abcdef.npz"]:
        (folder / name).write_bytes(b"x" * 1000)
    capsys.readouterr()
    os.utime(archive, ns=(archive.stat().st_atime_ns, archive.stat().st_mtime_ns + 10**9))
    train, _ = load_splits("tiny-imagenet", root=archive, cache_dir=tmp_path / "cache")
    now = sorted(p.name for p in folder.iterdir())
    assert not set(first) & set(now) and len(now) == 2 + len(kept) and set(kept) <= set(now)
    assert [n.split("-")[2] for n in now if n not in kept] == [first[0].split("-")[2]] * 2  # the same source
    err = capsys.readouterr().err
    assert "removed 3 stale cache file(s)" in err
    assert torch.equal(train.images, load_dataset("tiny-imagenet", "train", root=archive,
                                                  cache_dir=tmp_path / "cache").images)
    assert "stale" not in capsys.readouterr().err


def test_tiny_imagenet_tar_formats_and_pool(tmp_path, monkeypatch):
    tree = make_tiny(tmp_path / "data")
    long_dir = tree["root"] / "train" / WNIDS[1] / "images"
    long_name = "x" * 120 + ".png"
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(long_dir / long_name)
    monkeypatch.setattr(decode, "POOL_MIN_IMAGES", 1)
    results = []
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        archive = tar_gz(tree["root"], tmp_path / f"tiny{fmt}.tar.gz", fmt)
        fast = list(tiny_imagenet._fast_tar_files(archive, lambda n: True))
        slow = list(tiny_imagenet._tarfile_files(archive, lambda n: True))
        assert fast == slow and any(n.endswith(long_name) for n, _ in fast)
        results.append(load_dataset("tiny-imagenet", root=archive, cache_dir=tmp_path / f"c{fmt}"))
    assert torch.equal(results[0].images, results[1].images) and len(results[0]) == 10
    assert results[0].labels.tolist() == [0] * 4 + [1] * 3 + [2] * 3 and not results[0].images[3].any()


def test_tiny_imagenet_bad_images_name_the_file(tmp_path):
    tree = make_tiny(tmp_path / "data")
    bad = tree["root"] / "train" / WNIDS[2] / "images" / f"{WNIDS[2]}_1.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(HydraError, match=f"cannot decode image .*{bad.name}"):
        load_dataset("tiny-imagenet", root=tmp_path / "data", cache_dir=tmp_path / "cache")
    Image.fromarray(np.zeros((7, 8, 3), np.uint8)).save(bad)
    with pytest.raises(HydraError, match=f"{bad.name} is 8x7 .* one size"):
        load_dataset("tiny-imagenet", root=tmp_path / "data", cache_dir=tmp_path / "cache")
    archive = tar_gz(tree["root"], tmp_path / "tiny.tar.gz")
    with pytest.raises(HydraError, match=f"tiny.tar.gz:train/{WNIDS[2]}/images/{bad.name}"):
        load_dataset("tiny-imagenet", root=archive, cache_dir=tmp_path / "cache")


def test_real_tiny_imagenet_val_split(tiny_imagenet_archive, tmp_path, monkeypatch):
    ds = load_dataset("tiny-imagenet", "test", root=tiny_imagenet_archive, classes=10, cache_dir=tmp_path)
    assert ds.images.shape == (500, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert torch.bincount(ds.labels).tolist() == [50] * 10
    assert ds.classes[0] == "goldfish" and len(ds.classes) == 10
    assert all(0.1 < m < 0.9 for m in ds.mean) and all(0.1 < s < 0.5 for s in ds.std)
    monkeypatch.setattr(decode, "_decode_image", None)  # the train split comes from the cache the first load wrote
    train = load_dataset("tiny-imagenet", "train", root=tiny_imagenet_archive, classes=10, cache_dir=tmp_path)
    assert train.images.shape == (5000, 3, 32, 32) and train.mean == ds.mean


# ---------------------------------------------------------------------------------------- download

def test_download_file_checks_and_skips(tmp_path, server):
    served, url, hits = server
    payload = os.urandom(3000)
    (served / "blob.bin").write_bytes(payload)
    dest = tmp_path / "out" / "blob.bin"
    good = hashlib.md5(payload).hexdigest()
    assert download_file(f"{url}/blob.bin", dest, md5=good, progress=False) == dest
    assert dest.read_bytes() == payload and len(hits) == 1
    download_file(f"{url}/blob.bin", dest, md5=good)
    assert len(hits) == 1
    download_file(f"{url}/blob.bin", dest, sha256=hashlib.sha256(payload).hexdigest())
    assert len(hits) == 1

    wrong = "0" * 32
    other = tmp_path / "other" / "blob.bin"
    with pytest.raises(HydraError) as err:
        download_file(f"{url}/blob.bin", other, md5=wrong)
    assert f"{url}/blob.bin" in str(err.value) and good in str(err.value) and wrong in str(err.value)
    assert not other.parent.exists()  # nothing left, not even the folder made for it
    other.parent.mkdir()
    with pytest.raises(HydraError, match="missing.bin"):
        download_file(f"{url}/missing.bin", other)
    assert list(other.parent.iterdir()) == []  # a folder that was there stays


def test_extract_archive_rejects_path_traversal(tmp_path):
    def archive_with(name: str, member: tarfile.TarInfo) -> Path:
        path = tmp_path / name
        with tarfile.open(path, "w:gz") as tar:
            tar.addfile(member, io.BytesIO(b"x") if member.isfile() else None)
        return path

    escape = tarfile.TarInfo("../escaped.txt")
    escape.size = 1
    absolute = tarfile.TarInfo("/tmp/absolute.txt")
    absolute.size = 1
    link = tarfile.TarInfo("data/link")
    link.type, link.linkname = tarfile.SYMTYPE, "../../outside"
    dest = tmp_path / "dest"
    for archive in (archive_with("a.tar.gz", escape), archive_with("b.tar.gz", absolute),
                    archive_with("c.tar.gz", link)):
        with pytest.raises(HydraError, match=archive.name):
            extract_archive(archive, dest)
    assert not (tmp_path / "escaped.txt").exists() and list(dest.iterdir()) == []
    ok = tarfile.TarInfo("data/inner/file.txt")
    ok.size = 1
    extract_archive(archive_with("d.tar.gz", ok), dest)
    assert (dest / "data" / "inner" / "file.txt").read_bytes() == b"x"


def test_extract_archive_of_a_file_that_is_no_archive_is_one_line(tmp_path):
    """tarfile's message lists each compression it tried, a line each; the error keeps its first line."""
    notes = tmp_path / "notes.tar.gz"
    notes.write_text("not an archive\n")
    with pytest.raises(HydraError) as e:
        extract_archive(notes, tmp_path / "dest")
    assert "\n" not in str(e.value) and str(e.value).startswith(f"cannot extract {notes}: ")
    assert "the archive is damaged, get it again" in str(e.value)


# ------------------------------------------------------------------------------------- BatchLoader

def loader_dataset(n: int = 50, h: int = 12, w: int = 10) -> ImageDataset:
    """Each image has its own label, so a batch's labels say which source images it holds."""
    images = torch.from_numpy(RNG.integers(0, 256, (n, 3, h, w), dtype=np.uint8))
    return ImageDataset(images, torch.arange(n), [f"c{i}" for i in range(n)], (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))


def normalised(ds: ImageDataset) -> torch.Tensor:
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1)
    std = torch.tensor(ds.std).view(1, 3, 1, 1)
    return (ds.images.float() / 255 - mean) / std


def collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*list(loader))
    return torch.cat(xs), torch.cat(ys)


def test_loader_shapes_dtype_layout():
    ds = loader_dataset()
    loader = BatchLoader(ds, 16, train=True)
    assert len(loader) == 3
    batches = list(loader)
    assert len(batches) == 3
    for x, y in batches:
        assert x.shape == (16, 3, 12, 10) and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert y.dtype == torch.int64 and y.shape == (16,)
    x, _ = next(iter(BatchLoader(ds, 16, train=True, channels_last=False)))
    assert x.is_contiguous()


@pytest.mark.parametrize("train", [True, False])
def test_loader_one_channel_layout_follows_channels_last(train):
    """A one-channel batch is contiguous in both layouts at once; a convolution takes channels_last from its
    strides, so with channels_last=False the batch must have the standard strides (C's = H*W)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 12, 10, 1), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)  # C's stride 1
    ds = ImageDataset(images,
                      torch.arange(40) % 4, [str(i) for i in range(4)], (0.5,), (0.25,))
    conv = torch.nn.Conv2d(1, 4, 3, padding=1)
    x, _ = next(iter(BatchLoader(ds, 16, train=train, channels_last=False)))
    assert x.stride() == (120, 120, 10, 1)
    assert conv(x).is_contiguous() and not conv(x).is_contiguous(memory_format=torch.channels_last)


def test_loader_test_split_normalises_all_images_in_order():
    ds = loader_dataset()
    loader = BatchLoader(ds, 16, train=False)
    assert len(loader) == 4
    x, y = collect(loader)
    assert y.tolist() == list(range(50))
    assert torch.allclose(x, normalised(ds), atol=1e-5)
    x, y = collect(BatchLoader(ds, 16, train=True, augment="none"))
    assert len(y) == 48 and sorted(y.tolist()) != list(range(48))
    assert torch.allclose(x, normalised(ds)[y], atol=1e-5)


@pytest.mark.parametrize("pad_mode", ["zeros", "reflect"])
def test_loader_crop_flip_matches_shifted_or_flipped_source(pad_mode):
    ds = loader_dataset()
    norm = normalised(ds)
    x, y = collect(BatchLoader(ds, 10, train=True, seed=3, pad_mode=pad_mode, prefetch=False))
    moved = flipped = 0
    for img, label in zip(x, y):
        src = norm[label].numpy()
        padded = np.pad(src, ((0, 0), (4, 4), (4, 4)), mode="constant" if pad_mode == "zeros" else "reflect")
        matches = []
        for dy in range(9):
            for dx in range(9):
                crop = padded[:, dy:dy + 12, dx:dx + 10]
                for flip in (False, True):
                    cand = crop[:, :, ::-1] if flip else crop
                    if np.allclose(img.numpy(), cand, atol=1e-5):
                        matches.append((dy, dx, flip))
        assert matches, f"image {label} is no shifted/flipped copy of its source"
        moved += (4, 4, False) not in matches
        flipped += all(f for _, _, f in matches)
    assert moved > len(y) // 2 and 0 < flipped < len(y)


def test_loader_cutout_zeroes_one_square():
    ds = loader_dataset()
    norm = normalised(ds)
    x, y = collect(BatchLoader(ds, 10, train=True, augment="none", cutout=4))
    cut = 0
    for img, label in zip(x, y):
        changed = ~torch.isclose(img, norm[label], atol=1e-5)
        assert (img[changed] == 0).all()
        rows, cols = torch.nonzero(changed.any(0), as_tuple=True)
        if len(rows):
            cut += 1
            assert rows.max() - rows.min() < 4 and cols.max() - cols.min() < 4
    assert cut > len(y) // 2


def test_loader_is_deterministic_resumable_and_prefetch_invariant():
    ds = loader_dataset()

    def epoch(loader, e):
        loader.set_epoch(e)
        return collect(loader)

    kw = dict(train=True, seed=7, cutout=3)
    a = BatchLoader(ds, 8, prefetch=True, **kw)
    b = BatchLoader(ds, 8, prefetch=False, **kw)
    first = [epoch(a, e) for e in range(3)]
    resumed = epoch(b, 2)
    assert torch.equal(first[2][0], resumed[0]) and torch.equal(first[2][1], resumed[1])
    again = epoch(BatchLoader(ds, 8, prefetch=True, **kw), 0)
    assert torch.equal(first[0][0], again[0]) and torch.equal(first[0][1], again[1])
    assert first[0][1].tolist() != first[1][1].tolist()
    other_seed = epoch(BatchLoader(ds, 8, train=True, seed=8), 0)
    assert first[0][1].tolist() != other_seed[1].tolist()
    torch.manual_seed(123)
    assert torch.equal(epoch(b, 1)[0], first[1][0])


def test_loader_prefetch_stops_when_abandoned():
    loader = BatchLoader(loader_dataset(), 4, train=True)
    for _ in loader:
        break
    deadline = time.monotonic() + 30  # generous: a loaded CI machine may be slow to schedule the thread's exit
    while any(t.name == "hydranets-prefetch" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the prefetch thread outlived its abandoned loader"
        time.sleep(0.01)


def test_loader_distributed_shards():
    ds = loader_dataset()
    ranks = [collect(BatchLoader(ds, 5, train=True, seed=1, rank=r, world_size=2, drop_last=False))[1]
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 25
    assert set(ranks[0].tolist()).isdisjoint(ranks[1].tolist())
    assert sorted(ranks[0].tolist() + ranks[1].tolist()) == list(range(50))
    single = collect(BatchLoader(ds, 5, train=True, seed=1, drop_last=False))[1]
    assert torch.equal(torch.stack(ranks, 1).flatten(), single)

    odd = loader_dataset(n=51)
    padded = [BatchLoader(odd, 4, train=True, rank=r, world_size=2, drop_last=False) for r in range(2)]
    got = [collect(p)[1].tolist() for p in padded]
    assert len(padded[0]) == 7 and len(got[0]) == len(got[1]) == 26
    assert set(got[0] + got[1]) == set(range(51))
    dropped = [collect(BatchLoader(odd, 5, train=True, rank=r, world_size=2, drop_last=True))[1].tolist()
               for r in range(2)]
    assert len(dropped[0]) == len(dropped[1]) == 25 and set(dropped[0]).isdisjoint(dropped[1])


def test_loader_rejects_bad_arguments():
    ds = loader_dataset()
    for kwargs, match in ((dict(batch_size=0), "batch_size must be a positive whole number, got 0"),
                          (dict(augment="mixup"), "augment='mixup' is unknown"),
                          (dict(rank=2, world_size=2), "rank=2, world_size=2 is invalid"),
                          (dict(batch_size=60), "batch_size=60 is larger than the 50 images per rank"),
                          (dict(pad_mode="edge"), "pad_mode='edge' is unknown"),
                          (dict(padding=12, pad_mode="reflect"), r"padding=12 is invalid for 12x10 images; use 0 to 9"),
                          (dict(cutout=-1), "cutout=-1 is invalid")):
        args = dict(batch_size=8, train=True) | kwargs
        with pytest.raises(HydraError, match=match):
            BatchLoader(ds, **args)


# ----------------------------------------------------------------------------------- image folders

def make_folder(root: Path) -> None:
    sizes = {"cat": [(40, 30), (25, 50)], "dog": [(33, 33)]}
    for split in ("train", "val"):
        for cls, dims in sizes.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for k, (w, h) in enumerate(dims):
                arr = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{k}.png" if k % 2 == 0 else d / f"{k}.jpg", quality=95)


def test_imagefolder_test_transform_and_loader(tmp_path):
    make_folder(tmp_path)
    ds = ImageFolderDataset(tmp_path, "val", image_size=16)
    assert ds.classes == ["cat", "dog"] and ds.labels == [0, 0, 1] and not ds.train
    img, label = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 16, 16) and label == 0
    ref = Image.open(tmp_path / "val" / "cat" / "0.png").convert("RGB").resize((24, 18), Image.Resampling.BILINEAR)
    ref = np.asarray(ref.crop((4, 1, 20, 17))).transpose(2, 0, 1)
    assert np.array_equal(img.numpy(), ref)

    loader = make_imagefolder_loader(tmp_path, "train", batch_size=2, image_size=16, workers=1, seed=0)
    batches = list(loader)
    assert len(batches) == 1
    x, y = batches[0]
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.uint8 and y.dtype == torch.int64


def test_imagefolder_train_crops_and_errors(tmp_path):
    make_folder(tmp_path)
    # scale 1 and aspect 1: the crop is the largest centred square (no square of the whole area fits a 40x30 image)
    square = ImageFolderDataset(tmp_path, "train", image_size=12, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    flips = set()
    for i, (path, _) in enumerate(square.samples):
        with Image.open(path) as f:
            im = f.convert("RGB")
        w, h = im.size
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        ref = np.asarray(im.resize((12, 12), Image.Resampling.BILINEAR, box=box))
        ref = torch.from_numpy(ref.transpose(2, 0, 1).copy())
        for epoch in range(6):
            square.epoch = epoch
            img = square[i][0]
            assert torch.equal(img, ref) or torch.equal(img, ref.flip(2)), (path.name, epoch)
            flips.add(torch.equal(img, ref.flip(2)))
    assert flips == {False, True}

    ds = ImageFolderDataset(tmp_path, "train", image_size=12)
    torch.manual_seed(0)
    a = [ds[i][0] for i in range(3)]
    torch.manual_seed(1)  # a crop is a function of (seed, epoch, index) alone, not of torch's global generator
    b = [ds[i][0] for i in range(3)]
    assert all(torch.equal(p, q) and p.shape == (3, 12, 12) for p, q in zip(a, b))
    ds.epoch = 1
    assert not all(torch.equal(p, ds[i][0]) for i, p in enumerate(a))
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"junk")
    ds = ImageFolderDataset(tmp_path, "train", image_size=12)
    with pytest.raises(HydraError, match="broken.png"):
        ds[len(ds) - 1]
    with pytest.raises(HydraError, match="not found"):
        ImageFolderDataset(tmp_path, "test")


def test_folder_batches_epoch_order_survives_a_resume_with_workers(tmp_path):
    from hydranets.data.imagefolder import FolderBatches

    for c in range(2):
        d = tmp_path / "train" / f"c{c}"
        d.mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.full((4, 4, 3), c * 100 + i, np.uint8)).save(d / f"{i}.png")

    def orders(epochs: list[int]) -> list[list[float]]:
        fb = FolderBatches(tmp_path, "train", 4, train=True, image_size=4, workers=1, seed=3, channels_last=False)
        fb.loader.dataset.train = False  # a centre crop keeps each image's one colour, which names it
        out = []
        for e in epochs:
            fb.set_epoch(e)
            out.append([v for x, _ in fb for v in x[:, 0, 0, 0].tolist()])
        return out

    continuous = orders([0, 1, 2])
    resumed = orders([2])
    assert len(set(continuous[2])) == 16 and len({tuple(o) for o in continuous}) == 3
    assert resumed[0] == continuous[2]


def test_folder_batches_crops_survive_a_resume_and_any_worker_count(tmp_path):
    from hydranets.data.imagefolder import FolderBatches

    rng = np.random.default_rng(0)
    for c in range(2):
        d = tmp_path / "train" / f"c{c}"
        d.mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / f"{i}.png")

    def epochs(which: list[int], workers: int) -> list[torch.Tensor]:
        fb = FolderBatches(tmp_path, "train", 4, train=True, image_size=8, workers=workers, seed=5, channels_last=False)
        out = []
        for e in which:
            fb.set_epoch(e)
            out.append(torch.cat([x for x, _ in fb]))
        return out

    continuous = epochs([0, 1, 2], workers=1)
    assert not torch.equal(continuous[1], continuous[2])
    assert torch.equal(epochs([2], workers=1)[0], continuous[2])
    assert torch.equal(epochs([2], workers=2)[0], continuous[2])
    assert torch.equal(epochs([1], workers=0)[0], continuous[1])


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
def test_a_places_augmentation_is_the_same_for_every_world_size(world_size, drop_last):
    """Rank r's row j of batch b is global place ws*(b*bs + j) + r: it must hold the image, crop, flip and cutout
    that one process gives that place, also when the ranks' share of n = 11 images is padded or cut."""
    from hydranets.data.image_dataset import ImageDataset
    from hydranets.data.loader import BatchLoader
    n, bs = 11, 2
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ds = ImageDataset(images, torch.arange(n), [f"c{i}" for i in range(n)], (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))

    def places(rank: int, ws: int, batch: int) -> dict[int, tuple[torch.Tensor, int]]:
        loader = BatchLoader(ds, batch, train=True, seed=3, cutout=3, drop_last=drop_last, rank=rank,
                             world_size=ws, prefetch=False, channels_last=False)
        loader.set_epoch(1)
        return {ws * (b * batch + j) + rank: (x[j], int(y[j]))
                for b, (x, y) in enumerate(loader) for j in range(len(y))}

    one = places(0, 1, bs * world_size)
    ranks = {}
    for r in range(world_size):
        ranks.update(places(r, world_size, bs))
    shared = sorted(p for p in one if p in ranks)
    assert len(shared) >= 6
    for p in shared:
        assert ranks[p][1] == one[p][1], p
        torch.testing.assert_close(ranks[p][0], one[p][0], rtol=0, atol=0, msg=f"place {p}")
    if not drop_last:  # padded to a multiple of the world size: every image at least once
        assert {label for _, label in ranks.values()} == set(range(n))


def test_extractions_into_one_folder_take_turns(tmp_path, monkeypatch):
    """While one process moves an archive's entries into the folder, the folder is locked against another; one
    that waited skips the work when the file it needs is there."""
    fcntl = pytest.importorskip("fcntl", reason="the folder lock is POSIX flock")
    import hydranets.data.download as download
    archive = tmp_path / "a.tar.gz"
    member = tarfile.TarInfo("data/file.txt")
    member.size = 1
    with tarfile.open(archive, "w:gz") as tar:
        tar.addfile(member, io.BytesIO(b"x"))
    dest = tmp_path / "dest"
    dest.mkdir()
    locked, real_replace = [], os.replace

    def replace(src, dst):
        fd = os.open(dest, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another process would
            locked.append(False)
        except BlockingIOError:
            locked.append(True)
        finally:
            os.close(fd)
        return real_replace(src, dst)

    monkeypatch.setattr(download.os, "replace", replace)
    extract_archive(archive, dest)
    assert locked == [True] and (dest / "data" / "file.txt").read_bytes() == b"x"
    assert [p.name for p in dest.iterdir()] == ["data"]  # no lock file left
    (dest / "data" / "file.txt").write_bytes(b"y")  # as if another process had finished the same work
    extract_archive(archive, dest, done="data/file.txt")
    assert locked == [True] and (dest / "data" / "file.txt").read_bytes() == b"y"
    extract_archive(archive, dest)
    assert (dest / "data" / "file.txt").read_bytes() == b"x"
