"""Many processes with PyTorch's own engine: torchrun sets the environment, DDP syncs the gradients."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from .errors import HydraError

T = TypeVar("T")


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _usable(device_type: str) -> bool:
    """Whether this torch build and machine can compute on ``device_type`` (other than cpu and cuda)."""
    if device_type == "mps":
        return torch.backends.mps.is_available()
    is_available = getattr(getattr(torch, device_type, None), "is_available", None)
    try:
        return callable(is_available) and bool(is_available())
    except Exception:  # noqa: BLE001 - a backend that cannot even say is not usable
        return False


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> the local CUDA device when there is one, else the CPU; a device this machine cannot compute on
    is refused."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns of deprecated names (mkldnn) that are refused below
            device = torch.device(name)
    except (RuntimeError, TypeError):
        raise HydraError(f"device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "meta":
        raise HydraError(f"device {name!r} holds no data to compute on; use auto, cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HydraError(f"device {name!r} was asked for but no CUDA device is available; use auto or cpu")
    if device.type not in ("cpu", "cuda") and not _usable(device.type):
        raise HydraError(f"device {name!r} was asked for but this torch build has no usable {device.type} device; "
                         "use auto, cpu or cuda")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def setup(device: str = "auto") -> Runtime:
    """Join the process group when launched by torchrun (nccl on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    owns = world_size > 1 and not dist.is_initialized()
    if owns:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(rank, world_size, local_rank, dev, owns)


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def main_first(rt: Runtime, fn: Callable[[], T]) -> T:
    """``fn()`` on the main process first, then on the others, which wait for it: a download, an archive's
    extraction or a data cache is then made by one process, not raced by all."""
    if not rt.is_main:
        barrier(rt)
    out = fn()
    if rt.is_main:
        barrier(rt)
    return out


def mean_over_ranks(x: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """The mean of ``x`` over every process (``x`` itself in one process)."""
    if not rt.distributed:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / rt.world_size


def teardown(rt: Runtime) -> None:
    """Leave the process group if :func:`setup` joined it; a caller's own group stays for the caller."""
    if rt.owns_group and dist.is_initialized():
        dist.destroy_process_group()
