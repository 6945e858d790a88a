"""Are a HydraNet's branches better specialists than one generalist? Top-1 among the classes of each test image's
true subtask, for the HydraNet with every image sent to its true subtask's branch and for a control network told the
same subtask (its scores outside the subtask's classes ignored).

    python benchmarks/within_subtask.py HYDRA:CONTROL [HYDRA:CONTROL ...]

Why: the HydraNet's premise is that a branch that learns only its subtask's classes tells them apart better than a
network that learns all of them. `routing_split.py` compares the two on the images the gate routes right, which are
the easy ones and whose route already says something about the class. Here both networks are given the same
knowledge, the image's subtask, so the difference is the specialists' edge alone (a perfect gate would hand them no
more). For each pair it prints both networks' plain top-1 (the HydraNet's with a perfect gate), both within the
subtask, and last, per design (B, how the subtasks overlap) and over all pairs, the mean difference within the
subtask. Evaluated in eval mode at the HydraNet's own k, in the precision it was trained with, on its test set.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn

from hydranets.distributed import pick_device
from hydranets.errors import HydraError
from hydranets.evaluate import autocast_for
from hydranets.hydranet import HydraNet

from routing_split import design, each_pair


@torch.no_grad()
def within_subtask(hydra: HydraNet, control: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   precision: str = "fp32") -> dict[str, float]:
    """Over ``batches``: the image count; top-1 (%) of the HydraNet with each image sent to its true subtask's
    branch (``true_route_top1``) and of ``control`` (``control_top1``); and both among the classes that share a
    subtask with the image's class only (``specialist_within``, ``control_within``)."""
    if hydra.membership.numel() == 0:
        raise HydraError("this HydraNet has no partition, so no image has a true subtask")
    hydra.eval()
    control.eval()
    device = next(hydra.parameters()).device
    member = hydra.membership
    allowed = (member @ member.T) > 0  # (C, C): the classes that share a subtask with class c
    keys = ("true_route_top1", "control_top1", "specialist_within", "control_within")
    hits, count = dict.fromkeys(keys, 0), 0
    for x, y in batches:
        with autocast_for(device, precision):
            forced = hydra(x, routing="topk", force=member[y]).float()
            other = control(x).float()
        inside = allowed.to(y.device)[y]
        for key, scores in (("true_route_top1", forced), ("control_top1", other)):
            hits[key] += int((scores.argmax(1) == y).sum())
        for key, scores in (("specialist_within", forced), ("control_within", other)):
            hits[key] += int((scores.masked_fill(~inside, float("-inf")).argmax(1) == y).sum())
        count += y.numel()
    if not count:
        raise HydraError("within_subtask got no images: pass the test batches")
    return {"count": count, **{k: 100.0 * v / count for k, v in hits.items()}}


def summarise(rows: list[tuple[tuple[int, str], dict[str, float]]]) -> list[str]:
    """One line per design (B, how the subtasks overlap), then one over all pairs: the mean HydraNet-minus-control
    difference within the subtask, in points (with two or more pairs, its sd and how many are above zero)."""
    by_design: dict[tuple[int, str], list[float]] = {}
    for d, r in rows:
        by_design.setdefault(d, []).append(r["specialist_within"] - r["control_within"])
    lines = []
    for (b, overlap), diffs in sorted(by_design.items()):
        kind = f", {overlap}" if overlap else ""
        lines.append(f"B={b}{kind}: {len(diffs)} pairs, the specialists against the control within the subtask "
                     f"{statistics.mean(diffs):+.2f} points")
    diffs = [d for ds in by_design.values() for d in ds]
    if len(diffs) > 1:
        lines.append(f"all {len(diffs)} pairs: {statistics.mean(diffs):+.2f} points within the subtask (sd "
                     f"{statistics.stdev(diffs):.2f}, above the control in {sum(d > 0 for d in diffs)})")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", help="HYDRA_RUN:CONTROL_RUN (finished run folders)")
    ap.add_argument("--batch-size", type=int, default=500)
    args = ap.parse_args(argv)
    device = pick_device("auto")
    names = [[Path(p).name for p in spec.split(":")] for spec in args.pairs]
    if any(len(n) != 2 for n in names):
        raise SystemExit("within_subtask: give each HydraNet with its control, as HYDRA_RUN:CONTROL_RUN")
    w1, w2 = max([24] + [len(n[0]) + 2 for n in names]), max([22] + [len(n[1]) + 2 for n in names])
    rows = []
    for i, (hydra, control, precision, batches) in enumerate(each_pair(args.pairs, device, args.batch_size,
                                                                       "within_subtask")):
        if i == 0:
            print(f"{'HydraNet':>{w1}}{'B':>4}{'true route':>12}{'within subtask':>16}{'control':>{w2}}{'top-1':>8}"
                  f"{'within subtask':>16}")
        r = within_subtask(hydra, control, batches, precision)
        rows.append((design(hydra), r))
        print(f"{names[i][0]:>{w1}}{hydra.num_branches:>4}{r['true_route_top1']:>12.2f}{r['specialist_within']:>16.2f}"
              f"{names[i][1]:>{w2}}{r['control_top1']:>8.2f}{r['control_within']:>16.2f}", flush=True)
    for line in summarise(rows):
        print(line)


if __name__ == "__main__":
    main()
