"""Inference cost, counted and timed: multiply-adds of what actually ran, parameters, throughput."""
from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import HydraError
from .hydranet import HydraNet, _check_topk
from .inference import fold_batchnorms


def _module_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _as_input(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``x`` on the model's device, floating-point inputs in the dtype of its parameters (a bf16 or fp16 model)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return x.to(_module_device(model), dtype if dtype is not None and x.is_floating_point() else x.dtype)


def count_macs(fn: Callable[..., Any] | nn.Module, *inputs: torch.Tensor, batch_size: int | None = None,
               **kwargs) -> float:
    """Multiply-adds per image of one call ``fn(*inputs, **kwargs)``: FLOPs counted by PyTorch / 2 / batch."""
    batch_size = batch_size or inputs[0].shape[0]
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn(*inputs, **kwargs)
    return counter.get_total_flops() / 2 / batch_size


def model_macs(model: nn.Module, input_size: tuple[int, ...], batch_size: int = 32, seed: int = 0,
               inputs: torch.Tensor | None = None, **forward_kwargs) -> float:
    """MACs per image of ``model`` in eval mode, averaged over a batch (random or given inputs)."""
    was_training = model.training
    model.eval()
    if inputs is None:
        g = torch.Generator().manual_seed(seed)
        inputs = torch.randn((batch_size, *input_size), generator=g)
    try:
        return count_macs(model, _as_input(inputs, model), **forward_kwargs)
    finally:
        model.train(was_training)


def first_images(batches: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> torch.Tensor:
    """The first ``n`` images (or all, if fewer) of evaluation batches: real inputs to time models on."""
    out, have = [], 0
    for x, _ in batches:
        if have >= n:
            break
        out.append(x[:n - have])
        have += out[-1].shape[0]
    return torch.cat(out)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def active_params(model: nn.Module, k: int | None = None) -> int:
    """Parameters used per image: for a HydraNet, stem + gate + k branches + classifier."""
    if not isinstance(model, HydraNet):
        return count_params(model)
    k = model.topk if k is None else _check_topk(k, model.num_branches)
    in_branches = {id(p) for p in model.branches.parameters()}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in in_branches)
    ran = {id(p): p.numel() for branch in model.branches[:k] for p in branch.parameters()}  # once if shared
    return rest + sum(ran.values())


def _sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work, so a timing covers the work and not only its launch."""
    if device.type == "cpu":
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "synchronize"):
        raise HydraError(f"cannot time on device {device}: torch.{device.type}.synchronize does not exist; "
                         "time on cpu or cuda")
    backend.synchronize()


def compare_speed(candidates: dict[str, tuple[nn.Module, dict]], input_size: tuple[int, ...],
                  batch_size: int, repeats: int = 10, warmup: int = 2, min_time: float = 0.05,
                  autocast: torch.dtype | None = None, channels_last: bool = True,
                  images: torch.Tensor | None = None, fold: bool = False) -> dict[str, dict]:
    """Images/s of several models, timed side by side in interleaved rounds; medians over ``repeats``.

    ``candidates`` maps a name to ``(model, forward_kwargs)``. Each round times every candidate once,
    so load on a shared machine falls on all of them alike. A timing runs the forward enough times
    to last ``min_time`` seconds. ``images`` times real inputs instead of random ones (the first
    ``batch_size``, repeated if there are fewer): a trained HydraNet's gate sends random images to
    fewer branches than real ones (4-5 of 8 against 8 of 8 on tin100-cpu), so fewer, larger calls.
    ``fold`` times each model with its batch norms folded into its convolutions (as deployed; the same
    outputs, see :func:`hydranets.fold_batchnorms`) instead of as trained. ``spread`` is the slowest repeat's time
    over the fastest's (see :func:`unsteady_note`).
    """
    if images is None:
        x_cpu = torch.randn((batch_size, *input_size), generator=torch.Generator().manual_seed(0))
    elif tuple(images.shape[1:]) != tuple(input_size) or not len(images):
        raise HydraError(f"compare_speed needs images of size {tuple(input_size)}, got a tensor of shape "
                         f"{tuple(images.shape)}")
    else:
        x_cpu = images.repeat((-(-batch_size // len(images)),) + (1,) * len(input_size))[:batch_size]
    modes = {id(model): (model, model.training) for model, _ in candidates.values()}
    try:
        return _time_side_by_side(candidates, x_cpu, batch_size, repeats, warmup, min_time, autocast,
                                  channels_last, fold)
    finally:
        for model, training in modes.values():
            model.train(training)


def _time_side_by_side(candidates: dict[str, tuple[nn.Module, dict]], x_cpu: torch.Tensor, batch_size: int,
                       repeats: int, warmup: int, min_time: float, autocast: torch.dtype | None,
                       channels_last: bool, fold: bool) -> dict[str, dict]:
    """:func:`compare_speed` on its input batch ``x_cpu``."""
    prepared, folded = {}, {}
    for name, (model, kwargs) in candidates.items():
        model.eval()
        if fold:
            if id(model) not in folded:
                folded[id(model)] = fold_batchnorms(model)[0]
            model = folded[id(model)]
        device = _module_device(model)
        x = _as_input(x_cpu, model)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        prepared[name] = (model, kwargs, x, device)
    amp = (lambda d: torch.autocast(d.type, dtype=autocast)) if autocast else (lambda d: nullcontext())

    def run(model, kwargs, x, device, n):
        with torch.inference_mode(), amp(device):
            t = time.perf_counter()
            for _ in range(n):
                model(x, **kwargs)
            _sync(device)
            return time.perf_counter() - t

    calls = {}
    for name, (model, kwargs, x, device) in prepared.items():
        for _ in range(warmup):
            run(model, kwargs, x, device, 1)
        one = max(run(model, kwargs, x, device, 1), 1e-6)
        calls[name] = max(1, int(min_time / one))
    times: dict[str, list[float]] = {name: [] for name in prepared}
    for _ in range(repeats):
        for name, (model, kwargs, x, device) in prepared.items():
            n = calls[name]
            times[name].append(run(model, kwargs, x, device, n) / n)
    return {name: {"batch_size": batch_size, "median_s": statistics.median(ts),
                   "images_per_s": batch_size / statistics.median(ts),
                   "latency_ms": 1000 * statistics.median(ts), "spread": max(ts) / min(ts)} for name, ts in times.items()}


UNSTEADY = 1.5


def unsteady_note(speed: dict[str, dict]) -> str | None:
    """A note for results of :func:`compare_speed` whose repeats of one model differ by more than ``UNSTEADY`` x
    (slowest / fastest): the machine was busy, so the images/s are rough; None when they are steady."""
    worst = max(speed, key=lambda name: speed[name]["spread"], default=None)
    if worst is None or speed[worst]["spread"] <= UNSTEADY:
        return None
    return (f"note: the timings are unsteady (the repeats of {worst} differ {speed[worst]['spread']:.1f}x, slowest / "
            "fastest): something else is using the machine, so the images/s are rough; time again on a quiet one")
