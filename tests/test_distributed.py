"""Data-parallel training on 2 CPU processes (torchrun, gloo) against 1 process with gradient accumulation."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hydranets.checkpoint import CHECKPOINT
from hydranets.run_folder import read_metrics

pytestmark = pytest.mark.slow

TIMEOUT = 300
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# augmentation on (crop/flip/cutout): its randomness must follow the image's place in the global batch
ARGS = ["data.name=synthetic", "model.name=resnet_cifar", "model.kwargs={depth: 8, width: 0.25}",
        "data.train_subset=192", "data.augment=crop_flip", "data.cutout=4", "optim.lr=0.05", "train.epochs=2",
        "train.batch_size=16", "train.precision=fp32", "train.threads=1", "train.device=cpu",
        "train.progress=false", "train.channels_last=false"]

# Runs `hydranets train ARGS` (the CLI's main) and, after each epoch, saves this rank's parameters and buffers.
SCRIPT = '''
import os, sys, torch
import hydranets.train as T
from hydranets.cli import main

dump, rank = sys.argv[1], int(os.environ.get("RANK", "0"))
inner = T.train_one_epoch

def hooked(cfg, net, model, *args, **kwargs):
    stats = inner(cfg, net, model, *args, **kwargs)
    torch.save({"params": {k: v.detach().clone() for k, v in model.named_parameters()},
                "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
                "world_size": int(os.environ.get("WORLD_SIZE", "1"))}, f"{dump}/rank{rank}.pt")
    return stats

T.train_one_epoch = hooked
main(["train", *sys.argv[2:]])
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp: Path, name: str, nproc: int, *extra: str) -> tuple[Path, Path]:
    out, dump = tmp / name, tmp / f"{name}_dump"
    dump.mkdir()
    script = tmp / "hooked_train.py"
    script.write_text(SCRIPT)
    if nproc == 1:
        cmd = [sys.executable, str(script)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script)]
    r = subprocess.run([*cmd, str(dump), *ARGS, f"out={out}", *extra], capture_output=True, text=True, env=ENV,
                       timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, dump


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    tmp = tmp_path_factory.mktemp("ddp")
    return {"ddp": launch(tmp, "ddp", 2), "single": launch(tmp, "single", 1, "train.accum_steps=2")}


def test_ranks_hold_identical_parameters(runs):
    out, dump = runs["ddp"]
    r0, r1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["params"].keys() == r1["params"].keys() and len(r0["params"]) > 10
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    # rank 0 wrote the run folder; its checkpoint is what rank 0 trained
    ckpt = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2
    for k, v in r0["params"].items():
        assert torch.equal(ckpt["model"][k], v), k
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    summary = (out / "summary.json").read_text()
    assert '"world_size": 2' in summary
    # each rank trained on its own half of every batch: the BatchNorm statistics differ between ranks
    assert any(not torch.equal(r0["buffers"][k], r1["buffers"][k]) for k in r0["buffers"] if "running_mean" in k)


def test_two_processes_equal_one_with_accumulation(runs):
    """Rank r gets x[r::2] of each global batch; accum_steps=2 splits it the same way, so the averaged
    gradients and hence the parameters agree up to float rounding."""
    _, ddp_dump = runs["ddp"]
    _, one_dump = runs["single"]
    ddp = torch.load(ddp_dump / "rank0.pt", weights_only=True)
    one = torch.load(one_dump / "rank0.pt", weights_only=True)
    assert one["world_size"] == 1
    assert ddp["params"].keys() == one["params"].keys()
    for k in one["params"]:
        torch.testing.assert_close(ddp["params"][k], one["params"][k], rtol=0, atol=1e-5, msg=k)
    ra, rb = read_metrics(runs["ddp"][0]), read_metrics(runs["single"][0])
    # the logged loss is the mean over both ranks' halves of each batch: the single run's over the whole batch
    assert [a["train_loss"] for a in ra] == pytest.approx([b["train_loss"] for b in rb], rel=1e-4)
    assert [a["lr"] for a in ra] == [b["lr"] for b in rb]


def test_training_moved_the_parameters(runs, tmp_path):
    """Guard against a vacuous match: the parameters differ from their initial values."""
    import hydranets
    torch.manual_seed(0)
    init = hydranets.create_model("resnet_cifar", num_classes=10, depth=8, width=0.25)
    one = torch.load(runs["single"][1] / "rank0.pt", weights_only=True)
    diff = max((one["params"][k] - v.detach()).abs().max().item() for k, v in init.named_parameters())
    assert diff > 1e-2


def test_teardown_leaves_a_callers_own_process_group(monkeypatch):
    """A caller that made its own process group before train() keeps it after train()'s teardown."""
    import torch.distributed as dist

    from hydranets import distributed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("WORLD_SIZE", "1"), ("RANK", "0")):
        monkeypatch.setenv(key, value)
    try:
        dist.init_process_group("gloo", rank=0, world_size=1)
        monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun would say; the group above stands in for its ranks
        rt = distributed.setup("cpu")
        assert rt.distributed and not rt.owns_group
        distributed.teardown(rt)
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("rank,order", [(0, ["load", "barrier"]), (1, ["barrier", "load"])])
def test_data_is_loaded_by_the_main_process_first(monkeypatch, rank, order):
    """Under torchrun, rank 0 downloads, extracts and caches the data while the others wait at a barrier."""
    import torch.distributed as dist

    from hydranets import distributed
    calls = []
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    rt = distributed.Runtime(rank, 2, rank, torch.device("cpu"))
    assert distributed.main_first(rt, lambda: calls.append("load") or 7) == 7
    assert calls == order
    calls.clear()
    assert distributed.main_first(distributed.Runtime(0, 1, 0, torch.device("cpu")), lambda: calls.append("load")) is None
    assert calls == ["load"]
