"""The device-sensitive paths, on the CPU and (where there is one) on a CUDA GPU: top-k dispatch, the batch loader's
augmentation, training with its resumption and checkpoints that load on another device, and export. Each test
compares the device's result with an independent CPU computation, so the CPU run checks the tests themselves and
a GPU machine (`bash scripts/gpu_check.sh`) checks the GPU."""
import copy

import pytest
import torch

from hydranets import Partition, build_hydranet, export_model, load_exported
from hydranets.data import BatchLoader, ImageDataset
from hydranets.run_folder import read_metrics
from hydranets.train import load_trained
from helpers import run_cli

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run scripts/gpu_check.sh on one)")
SUBSETS = [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=CUDA)])
def device(request):
    """The device under test; on a GPU with TF32 off, so that its float32 results compare with the CPU's closely."""
    if request.param == "cpu":
        yield torch.device("cpu")
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield torch.device("cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.float().cpu(), b.float().cpu(), rtol=1e-4, atol=1e-4)


def spread_hydranet(topk: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """An untrained B=3 HydraNet whose gate sends 48 random images to every branch, and the images."""
    torch.manual_seed(0)
    model = build_hydranet("resnet_cifar", 10, num_branches=3, topk=topk, depth=8, width=0.5, partition=SUBSETS).eval()
    x = torch.randn(48, 3, 16, 16)
    with torch.no_grad():
        feats = model.gate[:-1](model.stem(x))
        head = model.gate[-1]
        head.weight.copy_(torch.randn_like(head.weight))
        head.bias.copy_(-(head.weight @ feats.mean(0)))
    return model, x


@pytest.mark.parametrize("topk", [1, 2])
def test_topk_dispatch_on_the_device_equals_the_cpu(device, topk):
    """Grouped by branch on the device: the CPU's routes and logits, and those of each image run alone there."""
    model, x = spread_hydranet(topk)
    on = copy.deepcopy(model).to(device)
    with torch.no_grad():
        want = model(x, return_gate=True)
        assert len(set(want.route.flatten().tolist())) == 3  # every branch runs on part of the batch
        for batch in (x, x[:1], x[want.route[:, 0] != 0]):  # all branches; one image; branch 0 without images
            got, ref = on(batch.to(device), return_gate=True), model(batch, return_gate=True)
            assert got.logits.device.type == device.type
            assert torch.equal(got.route.cpu(), ref.route) and close(got.logits, ref.logits)
            one_by_one = torch.cat([on(image[None].to(device)) for image in batch])  # the batch-1 path, no grouping
            assert close(got.logits, one_by_one)


def test_batches_on_the_device_equal_the_cpus(device):
    """The augmentation's randomness depends on (seed, epoch) only: the same crops, flips and holes on any device."""
    g = torch.Generator().manual_seed(0)
    data = ImageDataset(torch.randint(0, 256, (48, 3, 12, 12), dtype=torch.uint8, generator=g),
                        torch.arange(48) % 4, [f"c{i}" for i in range(4)], (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    loaders = [BatchLoader(data, 16, train=True, seed=3, device=d, augment="crop_flip", cutout=4, prefetch=False)
               for d in ("cpu", device)]
    for loader in loaders:
        loader.set_epoch(1)
    pairs = list(zip(*loaders))
    assert len(pairs) == 3
    for (x_cpu, y_cpu), (x, y) in pairs:
        assert x.device.type == device.type and torch.equal(y.cpu(), y_cpu) and close(x, x_cpu)
    assert not torch.equal(pairs[0][0][0], pairs[1][0][0])


def test_training_on_the_device_resumes_and_loads_anywhere(device, tmp_path, capsys):
    """A HydraNet trained on the device (autocast where the device has a fast half precision), stopped after epoch
    1 and resumed for epoch 2; its checkpoint then gives the same logits on the CPU as on the device."""
    part = tmp_path / "subtasks.json"
    Partition(SUBSETS, 10, [f"class{i}" for i in range(10)], "random").save(part)
    out = tmp_path / "run"
    args = ["train", "data.name=synthetic", "model.name=resnet_cifar", "model.kwargs={depth: 8, width: 0.25}",
            "data.augment=crop_flip", "optim.schedule=constant", "train.batch_size=32", "train.precision=auto",
            "train.progress=false", f"train.device={device.type}", "train.threads=1", "hydra.enabled=true",
            "hydra.num_branches=3", "hydra.topk=1", f"hydra.partition={part}", f"out={out}"]
    code, _, err = run_cli(capsys, *args, "train.epochs=1")
    assert code == 0, err
    (out / "summary.json").unlink()  # as if stopped after epoch 1 of 2
    code, _, err = run_cli(capsys, *args, "train.epochs=2", "--resume")
    assert code == 0, err
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["train_loss"] == r["train_loss"] for r in rows)
    x = torch.randn(8, 3, 32, 32)
    on_device, ckpt = load_trained(out, device)
    on_cpu, _ = load_trained(out, "cpu")
    assert ckpt["epoch"] == 2 and next(on_device.parameters()).device.type == device.type
    with torch.no_grad():
        assert close(on_device(x.to(device)), on_cpu(x))


def test_export_on_the_device(device, tmp_path):
    model, x = spread_hydranet(1)
    program, meta = load_exported(export_model(copy.deepcopy(model).to(device), tmp_path / "m.pt2", x[:1].to(device)))
    with torch.no_grad():
        for batch in (x, x[:1]):
            got = program(batch.to(device))
            assert got.device.type == device.type and close(got, model(batch))
    assert meta["topk"] == 1 and meta["num_branches"] == 3
