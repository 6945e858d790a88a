"""Evaluation: top-1/top-5 and, for a HydraNet, how well the gate routes (recall@k, branch load)."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterable

import torch
import torch.nn as nn

from .errors import HydraError
from .hydranet import HydraNet


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the hardware runs it fast (a CUDA GPU of compute capability 8.0 or later, ROCm, a CPU
    with AVX512-BF16/AMX), else fp32.

    On a CPU without bf16 instructions, PyTorch falls back to slow reference kernels (about 10x slower
    than fp32), so ``auto`` never picks bf16 there.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":  # native bf16 from Ampere (8.0) on; is_bf16_supported() also counts slow emulation
        native = torch.version.hip is not None or torch.cuda.get_device_capability(device) >= (8, 0)
        return "bf16" if native else "fp32"
    return "bf16" if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""The autocast dtype of each resolved reduced precision (fp32 runs without autocast)."""


def autocast_for(device: torch.device, precision: str):
    """The autocast context of a resolved precision (``resolve_precision`` first: ``auto`` is refused here, so that it
    never runs silently in fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    if precision == "fp32":
        return nullcontext()
    raise ValueError(f"precision {precision!r} is not one of bf16, fp16, fp32 (resolve 'auto' with resolve_precision)")


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], topk: int | None = None,
             precision: str = "fp32", collect_probs: bool = False, true_route: bool = False,
             shuffled_branches: bool = False) -> dict:
    """Accuracy over ``batches``; for a HydraNet (top-k routing) also the gate's recall@k, the load on
    each branch and the B x B matrix of true subtask vs chosen branch.

    ``collect_probs`` also returns the softmax outputs and labels (for class descriptors). ``true_route``
    also measures a HydraNet's top-1 when each image's true subtask is among its k branches (``true_route_top1``):
    what its branches could do with a perfect gate, to tell routing errors from weak branches. ``shuffled_branches``
    also measures its top-1 when each chosen branch is replaced by the next one (b -> b+1 mod B), gate weights
    unchanged (``shuffled_top1``): near top-1 means the branches are interchangeable, so routing adds nothing.
    """
    was_training = model.training
    model.eval()
    hydra = model if isinstance(model, HydraNet) else None
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    correct1 = correct5 = total = 0
    recall_hits = true_hits = shuffled_hits = 0
    load = matrix = None
    probs, labels = [], []
    try:
        for x, y in batches:
            with autocast_for(device, precision):
                if hydra is not None:
                    out = hydra(x, routing="topk", topk=topk, return_gate=True)
                    logits, route = out.logits, out.route
                else:
                    logits, route = model(x), None
            logits = logits.float()
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += (top5[:, 0] == y).sum().item()
            correct5 += (top5 == y[:, None]).any(1).sum().item()
            total += y.numel()
            if collect_probs:
                probs.append(logits.softmax(1).cpu())
                labels.append(y.cpu())
            if hydra is not None:
                if shuffled_branches:
                    with autocast_for(device, precision), _shifted_branches(hydra):
                        shuffled = hydra(x, routing="topk", topk=topk)
                    shuffled_hits += (shuffled.float().argmax(1) == y).sum().item()
                B = hydra.num_branches
                chosen = torch.zeros(y.numel(), B, device=route.device).scatter_(1, route, 1.0)
                load = chosen.sum(0) if load is None else load + chosen.sum(0)
                if hydra.membership.numel():
                    member = hydra.membership[y]
                    recall_hits += (member * chosen).amax(1).sum().item()
                    m = member.T @ chosen
                    matrix = m if matrix is None else matrix + m
                    if true_route:
                        with autocast_for(device, precision):
                            forced = hydra(x, routing="topk", topk=topk, force=member)
                        true_hits += (forced.float().argmax(1) == y).sum().item()
    finally:
        model.train(was_training)
    if total == 0:
        raise HydraError("nothing to evaluate: the batches hold no images; check the test split or its subset size")
    result = {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "count": total,
              "precision": precision}
    if hydra is not None:
        result["topk"] = topk or hydra.topk
        result["branch_load"] = (load / total).tolist() if load is not None else []
        if shuffled_branches:
            result["shuffled_top1"] = 100.0 * shuffled_hits / total
        if matrix is not None:
            result["gate_recall"] = 100.0 * recall_hits / total
            result["routing_matrix"] = matrix.round().long().tolist()
            if true_route:
                result["true_route_top1"] = 100.0 * true_hits / total
    if collect_probs:
        result["probs"] = torch.cat(probs)
        result["labels"] = torch.cat(labels)
    return result


@contextmanager
def _shifted_branches(hydra: HydraNet):
    """Within the block, branch b runs wherever the gate picks branch b-1 (mod B)."""
    branches = hydra.branches
    hydra.branches = nn.ModuleList(list(branches)[1:] + [branches[0]])
    try:
        yield
    finally:
        hydra.branches = branches


def subtask_recall(probs: torch.Tensor, labels: torch.Tensor, membership: torch.Tensor, k: int = 1) -> float:
    """Recall@k (%) of the true subtask when subtasks are ranked by the classifier's summed class probabilities.

    For a dense network this is the recall of a gate as good as the whole network: the reference for a
    HydraNet's gate recall, which reads only the stem.
    """
    scores = probs.float() @ membership.float()
    chosen = torch.zeros_like(scores).scatter_(1, scores.topk(k, dim=1).indices, 1.0)
    return 100.0 * (membership[labels].float() * chosen).amax(1).mean().item()
