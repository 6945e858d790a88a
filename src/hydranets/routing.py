"""Conditional execution: run each branch only on the images routed to it."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


def topk_route(gate_logits: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k) indices of the k highest-scoring branches per image."""
    return gate_logits.topk(k, dim=1).indices


def dispatch(x: torch.Tensor, branches: Sequence[nn.Module], route: torch.Tensor, weight: torch.Tensor,
             out_features: int) -> torch.Tensor:
    """Sum of ``weight * branch(x)`` over each image's routed branches, running each branch once.

    Images are grouped by branch (an index gather that keeps channels_last), each branch runs on its group only, and the outputs
    are scattered back (index_add); a single image skips the grouping. A branch with no images does not run. ``route`` and ``weight``
    are (N, k); the result is (N, out_features).
    """
    if torch.compiler.is_exporting():  # torch.export: the same computation in tensor ops only (no routing baked in)
        return dispatch_traceable(x, branches, route, weight, out_features)
    n, k = route.shape
    if n == 1:  # one image (batch-1 inference): call its branches directly, in branch order as below
        out = None
        for j, b in sorted(enumerate(route[0].tolist()), key=lambda jb: jb[1]):
            y = branches[b](x) * weight[:, j, None].to(x.dtype)
            out = y if out is None else out + y
        return out
    flat_branch = route.reshape(-1)
    flat_image = torch.arange(n, device=x.device).repeat_interleave(k)
    flat_weight = weight.reshape(-1)
    order = torch.argsort(flat_branch, stable=True)
    counts = torch.bincount(flat_branch, minlength=len(branches)).tolist()
    images, weights = flat_image[order], flat_weight[order]
    out = None
    start = 0
    for b, count in enumerate(counts):
        if count == 0:
            continue
        w = weights[start:start + count, None].to(x.dtype)
        if count == n:  # every image (stable sort: rows are 0..n-1 in order): no gather, no scatter
            y = branches[b](x) * w
            out = y if out is None else out + y
        else:
            rows = images[start:start + count]
            y = branches[b](x[rows]) * w
            out = x.new_zeros(n, out_features, dtype=y.dtype) if out is None else out
            out = out.index_add(0, rows, y)
        start += count
    return out if out is not None else x.new_zeros(n, out_features)


def dispatch_traceable(x: torch.Tensor, branches: Sequence[nn.Module], route: torch.Tensor, weight: torch.Tensor,
                       out_features: int) -> torch.Tensor:
    """:func:`dispatch` without data-dependent Python, as ``torch.export`` needs (it takes this path while exporting).

    Each branch still runs only on its own images: their rows (``nonzero`` of ``route == b``: a size only known at
    run time, possibly 0) are gathered, the branch runs on them and its weighted outputs are added back to their rows
    (index_add), branch after branch in order, as :func:`dispatch` adds them. Every branch is called, on no images
    where none is routed to it; the batch size is never read as a number, so one exported program serves every batch.
    """
    out = None
    for b, branch in enumerate(branches):
        rows, slots = (route == b).nonzero(as_tuple=True)
        y = branch(x[rows]) * weight[rows, slots][:, None].to(x.dtype)
        out = (y.new_zeros(x.shape[0], out_features) if out is None else out).index_add(0, rows, y)
    return out


def run_all(x: torch.Tensor, branches: Sequence[nn.Module], weight: torch.Tensor) -> torch.Tensor:
    """Soft routing: every branch on every image, weighted by (N, B) ``weight`` and summed."""
    out = None
    for b, branch in enumerate(branches):
        y = branch(x) * weight[:, b, None].to(x.dtype)
        out = y if out is None else out + y
    return out


def balance_loss(gate_logits: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
    """Load-balancing loss (Switch Transformer's): B * sum_b f_b * p_b over the batch.

    f_b is the share of routing slots on branch b (from ``route``, (N, k)), p_b the mean softmax gate
    probability of b. It is 1 for uniform routing and approaches B/k when every image goes to the same k
    branches; its gradient (through p) pushes probability off the overloaded branches. An empty batch
    adds nothing (0, still attached to the graph) rather than NaN.
    """
    b = gate_logits.shape[1]
    if route.numel() == 0:
        return gate_logits.float().sum() * 0.0
    f = torch.bincount(route.reshape(-1), minlength=b).float() / route.numel()
    p = gate_logits.float().softmax(1).mean(0)
    return b * (f * p).sum()
