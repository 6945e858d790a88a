"""Where a HydraNet's top-1 goes: the test images its gate routes to their true subtask against the rest,
with a control network's top-1 on the same images.

    python benchmarks/routing_split.py HYDRA[:CONTROL] [HYDRA[:CONTROL] ...]

Why: on tin100-cpu-f2u, fewer branches end further below the one-branch control (B=2 -1.67 points in pairs, B=8
-0.82) although the gate routes more images right (73% at B=2, 36% at B=8). Splitting the test images by whether
the gate sent them to (one of) the branches of their true subtask shows which images the deficit comes from: if
the branches specialise, a misrouted image meets a branch trained on other classes, and the fewer and larger the
subtasks, the further that branch is from the image's own. For each pair it prints the share routed right, the
HydraNet's top-1 on each group, its top-1 on the misrouted images when sent to their true subtask instead (a
perfect gate for them), and the control's top-1 on the same two groups. Both runs are evaluated in eval mode at
the HydraNet's own k, in the precision they were trained with, on the HydraNet's test set. Last, for the pairs
with a control, one line per B (and per kind of subtasks: disjoint or overlapping): the mean share routed right
and the mean difference from the control on each group.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn

from hydranets.config import config_from_dict
from hydranets.data import BatchLoader
from hydranets.distributed import pick_device
from hydranets.errors import HydraError
from hydranets.evaluate import autocast_for, resolve_precision
from hydranets.hydranet import HydraNet
from hydranets.train import load_data, load_trained


@torch.no_grad()
def routing_split(hydra: HydraNet, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], precision: str = "fp32",
                  control: nn.Module | None = None) -> dict[str, dict[str, float]]:
    """Per group, ``right`` (the true subtask among the routed branches) and ``wrong``: its image count and
    top-1 (%) as routed (``top1``), with each image sent to its true subtask (``true_route_top1``) and, with
    ``control``, the control's top-1 on the same images (``control_top1``); NaN for a group without images."""
    if hydra.membership.numel() == 0:
        raise HydraError("this HydraNet has no partition, so no image has a true subtask to route to")
    hydra.eval()
    if control is not None:
        control.eval()
    device = next(hydra.parameters()).device
    keys = ["top1", "true_route_top1"] + (["control_top1"] if control is not None else [])
    hits = {g: dict.fromkeys(["count"] + keys, 0) for g in ("right", "wrong")}
    for x, y in batches:
        member = hydra.membership[y]
        with autocast_for(device, precision):
            out = hydra(x, routing="topk", return_gate=True)
            forced = hydra(x, routing="topk", force=member)
            other = control(x) if control is not None else None
        right = member.gather(1, out.route).amax(1).bool()
        correct = {"top1": out.logits.float().argmax(1) == y, "true_route_top1": forced.float().argmax(1) == y}
        if other is not None:
            correct["control_top1"] = other.float().argmax(1) == y
        for group, mask in (("right", right), ("wrong", ~right)):
            hits[group]["count"] += int(mask.sum())
            for key in keys:
                hits[group][key] += int((correct[key] & mask).sum())
    return {g: {"count": h["count"], **{k: 100.0 * h[k] / h["count"] if h["count"] else math.nan for k in keys}}
            for g, h in hits.items()}


def design(hydra: HydraNet) -> tuple[int, str]:
    """What ``summarise`` groups pairs by: the number of branches, and how the subtasks overlap ("" for disjoint
    subtasks, else "overlapping subtasks", with ", evenly" where ``partition.overlap_balanced`` spread them)."""
    part = hydra.partition
    if part is None or not part.overlap:
        return hydra.num_branches, ""
    return hydra.num_branches, "overlapping subtasks" + (", evenly" if part.meta.get("overlap_balanced") else "")


def _share_right(split: dict[str, dict[str, float]]) -> float:
    total = split["right"]["count"] + split["wrong"]["count"]
    return 100.0 * split["right"]["count"] / total if total else math.nan


def _over(splits: list[dict[str, dict[str, float]]], group: str, value: Callable[[dict[str, float]], float]
          ) -> list[float]:
    """``value`` of each split's ``group``, over the splits where that group holds images."""
    return [value(s[group]) for s in splits if s[group]["count"]]


def _vs_control(g: dict[str, float]) -> float:
    return g["top1"] - g["control_top1"]


def _mean(values: list[float]) -> str:
    return f"{statistics.mean(values):+.2f}" if values else "n/a"


def _spread(values: list[float], above: bool) -> str:
    sd = f"{statistics.stdev(values):.2f}" if len(values) > 1 else "n/a"
    side = f"above it in {sum(d > 0 for d in values)}" if above else f"below it in {sum(d < 0 for d in values)}"
    return f"sd {sd}, {side}"


def summarise(rows: list[tuple[tuple[int, str], dict[str, dict[str, float]]]]) -> list[str]:
    """One line per design, (B, how the subtasks overlap), over the (design, ``routing_split`` result) rows that
    have a control: the mean share routed right and the mean HydraNet-minus-control top-1 difference on each group,
    in points; with two or more such rows, a last line over all of them: those differences' means, sample sds and
    signs, and how much a perfect gate lifts the misrouted images on average. A group without images (every image
    routed right, say) counts in no mean of that group."""
    pairs = [(d, s) for d, s in rows if "control_top1" in s["right"]]
    by_design: dict[tuple[int, str], list[dict[str, dict[str, float]]]] = {}
    for design, split in pairs:
        by_design.setdefault(design, []).append(split)
    lines = []
    for (b, overlap), splits in sorted(by_design.items()):
        share = sum(_share_right(s) for s in splits)
        kind = f", {overlap}" if overlap else ""
        lines.append(f"B={b}{kind}: {len(splits)} pairs, routed right {share / len(splits):.1f}%; against the control "
                     f"{_mean(_over(splits, 'right', _vs_control))} points on the images routed right, "
                     f"{_mean(_over(splits, 'wrong', _vs_control))} on the rest")
    if len(pairs) > 1:
        splits = [s for _, s in pairs]
        right, wrong = _over(splits, "right", _vs_control), _over(splits, "wrong", _vs_control)
        lift = _over(splits, "wrong", lambda g: g["true_route_top1"] - g["top1"])
        lines.append(f"all {len(pairs)} pairs: against the control {_mean(right)} points on the images routed right "
                     f"({_spread(right, True)}), {_mean(wrong)} on the rest ({_spread(wrong, False)}); the true "
                     f"subtask's branch lifts the rest by {_mean(lift)}")
    return lines


def load_pair(spec: str, device: torch.device) -> tuple[HydraNet, nn.Module | None, dict]:
    hydra_path, _, control_path = spec.partition(":")
    hydra, ckpt = load_trained(hydra_path, device)
    if not isinstance(hydra, HydraNet):
        raise HydraError(f"{hydra_path} is not a HydraNet run; the first of a pair must be one")
    control = None
    if control_path:
        control, other = load_trained(control_path, device)
        if other["config"]["data"] != ckpt["config"]["data"]:
            raise HydraError(f"{control_path} was trained on other data than {hydra_path}; pair runs of one data set")
    return hydra, control, ckpt


def each_pair(specs: list[str], device: torch.device, batch_size: int, tool: str
              ) -> Iterator[tuple[HydraNet, nn.Module | None, str, BatchLoader]]:
    """Each ``HYDRA[:CONTROL]`` spec loaded, with the precision its HydraNet was trained in and that HydraNet's test
    batches (each data set decoded once); a spec that does not load ends the script with one line naming ``tool``."""
    test_sets = {}
    for spec in specs:
        try:
            hydra, control, ckpt = load_pair(spec, device)
        except (HydraError, OSError) as e:
            raise SystemExit(f"{tool}: {e}") from None
        cfg = config_from_dict(ckpt["config"])
        data_key = json.dumps(ckpt["config"]["data"], sort_keys=True)
        if data_key not in test_sets:
            test_sets[data_key] = load_data(cfg)[1]
        batches = BatchLoader(test_sets[data_key], batch_size, train=False, device=device, prefetch=False)
        yield hydra, control, resolve_precision(cfg.train.precision, device), batches


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", help="HYDRA_RUN or HYDRA_RUN:CONTROL_RUN (finished run folders)")
    ap.add_argument("--batch-size", type=int, default=500)
    args = ap.parse_args(argv)
    device = pick_device("auto")
    names = [[Path(p).name for p in spec.split(":")] for spec in args.pairs]
    w1 = max([24] + [len(n[0]) + 2 for n in names])
    w2 = max([22] + [len(n[-1]) + 2 for n in names if len(n) > 1])
    header = (f"{'HydraNet':>{w1}}{'B':>4}{'routed right':>14}{'top-1 right':>13}{'top-1 wrong':>13}"
              f"{'wrong, true route':>19}{'control':>{w2}}{'control right':>15}{'control wrong':>15}")
    rows = []
    for i, (hydra, control, precision, batches) in enumerate(each_pair(args.pairs, device, args.batch_size,
                                                                       "routing_split")):
        if i == 0:
            print(header)
        split = routing_split(hydra, batches, precision, control)
        rows.append((design(hydra), split))
        right, wrong = split["right"], split["wrong"]
        line = (f"{names[i][0]:>{w1}}{hydra.num_branches:>4}{_share_right(split):>13.1f}%{right['top1']:>13.2f}"
                f"{wrong['top1']:>13.2f}{wrong['true_route_top1']:>19.2f}")
        if control is not None:
            line += f"{names[i][-1]:>{w2}}{right['control_top1']:>15.2f}{wrong['control_top1']:>15.2f}"
        print(line, flush=True)
    for line in summarise(rows):
        print(line)


if __name__ == "__main__":
    main()
