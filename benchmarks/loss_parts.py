"""A trained network's training objective split into its parts, on training images without augmentation.

    python benchmarks/loss_parts.py RUN [RUN ...] [--images 10000] [--topk K]

Why: the training loss a run logs holds lambda x the gate's loss and the balance term besides the
classifier's cross-entropy. For a one-branch network (B=1) those are about 0 and exactly 1; for B=8
about 0.36 and 1.15 on tin100-cpu-fork2, so the logged losses of B=8 and B=1 do not compare fits.
This prints each part (in eval mode: running statistics, top-k routing) and their weighted sum.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from hydranets.config import config_from_dict
from hydranets.data import BatchLoader
from hydranets.distributed import pick_device
from hydranets.hydranet import HydraNet
from hydranets.routing import balance_loss
from hydranets.train import load_data, load_trained


def loss_parts(run: str, images: int, topk: int | None) -> dict[str, float]:
    """Mean cross-entropy, gate BCE and balance loss of RUN's model over its first ``images`` training images."""
    device = pick_device("auto")
    model, ckpt = load_trained(run, device)
    cfg = config_from_dict(ckpt["config"])
    train_set, _ = load_data(cfg)
    sums, n = {"ce": 0.0, "gate_bce": 0.0, "balance": 0.0}, 0
    hydra = isinstance(model, HydraNet)
    for x, y in BatchLoader(train_set, 500, train=False, device=device, prefetch=False):
        with torch.no_grad():
            if hydra:
                out = model(x, topk=topk, return_gate=True)
                bce = F.binary_cross_entropy_with_logits(out.gate_logits, model.gate_targets(y))
                sums["gate_bce"] += bce.item() * len(y)
                sums["balance"] += balance_loss(out.gate_logits, out.route).item() * len(y)
                logits = out.logits
            else:
                logits = model(x)
            sums["ce"] += F.cross_entropy(logits, y, reduction="sum").item()
        n += len(y)
        if n >= images:
            break
    parts = {k: v / n for k, v in sums.items()}
    parts["objective"] = parts["ce"] + (cfg.hydra.gate_loss * parts["gate_bce"] + cfg.hydra.balance_loss
                                        * parts["balance"] if hydra else 0.0)
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="finished run folders")
    ap.add_argument("--images", type=int, default=10000, help="training images to average over")
    ap.add_argument("--topk", type=int, default=None, help="branches per image (default: each model's own k)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'run':>22}{'cross-entropy':>15}{'gate BCE':>10}{'balance':>9}{'objective':>11}")
    for run in args.runs:
        p = loss_parts(run, args.images, args.topk)
        print(f"{run.rstrip('/').split('/')[-1]:>22}{p['ce']:>15.3f}{p['gate_bce']:>10.3f}{p['balance']:>9.3f}"
              f"{p['objective']:>11.3f}")


if __name__ == "__main__":
    main()
