"""Top-1 of trained HydraNets before and after each branch's normalisation statistics are estimated again.

    python benchmarks/branch_norm_stats.py RUN [RUN ...] [--images 20000]

Why: in training, each branch normalises the images routed to it as one group. A branch with its own
normalisation layers keeps statistics of its own images; with ``hydra.share_branch_norms`` all branches
share one set of running statistics, an average over groups that each were normalised by their own mean
in training, so evaluation sees what training never did. This unties each branch's normalisation layers,
estimates their statistics afresh (cumulative average over training batches of the run's batch size and
augmentation, each image routed by its gate as in evaluation; everything outside the branches keeps its
statistics) and measures top-1 on the test set before and after. For a network whose statistics match
its training the two agree to within noise.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn

from hydranets import HydraError
from hydranets.config import config_from_dict
from hydranets.data import BatchLoader
from hydranets.distributed import pick_device
from hydranets.evaluate import evaluate
from hydranets.hydranet import HydraNet
from hydranets.train import load_data, load_trained

_BN = nn.modules.batchnorm._BatchNorm


def untie_branch_norms(model: HydraNet) -> None:
    """Give every branch its own copy of its normalisation layers (parameters and statistics)."""
    for branch in model.branches:
        for name, module in list(branch.named_modules()):
            if isinstance(module, _BN):
                parent = branch.get_submodule(name.rpartition(".")[0]) if "." in name else branch
                setattr(parent, name.rpartition(".")[2], copy.deepcopy(module))


@torch.no_grad()
def reestimate_branch_norms(model: HydraNet, batches, images: int) -> None:
    """Each branch's BN statistics as the cumulative average over ``images`` training images routed by the gate."""
    model.eval()
    norms = [m for b in model.branches for m in b.modules() if isinstance(m, _BN)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    for x, _ in batches:
        model(x, routing="topk")
        seen += len(x)
        if seen >= images:
            break
    model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="finished HydraNet run folders")
    ap.add_argument("--images", type=int, default=20000, help="training images to estimate the statistics on")
    args = ap.parse_args()
    torch.set_num_threads(1)
    device = pick_device("auto")
    print(f"{'run':>22}{'top-1 as trained':>18}{'top-1, statistics again':>25}")
    for run in args.runs:
        try:
            model, ckpt = load_trained(run, device)
        except HydraError as e:
            raise SystemExit(f"error: {e}") from None
        if not isinstance(model, HydraNet):
            raise SystemExit(f"error: {run} holds a dense network; this measures HydraNets' branch statistics")
        cfg = config_from_dict(ckpt["config"])
        train_set, test_set = load_data(cfg)
        test = BatchLoader(test_set, 500, train=False, device=device, prefetch=False, channels_last=False)
        before = evaluate(model, test)["top1"]
        untie_branch_norms(model)
        batches = BatchLoader(train_set, cfg.train.batch_size, train=True, augment=cfg.data.augment,
                              device=device, prefetch=False, channels_last=False, seed=12345)
        reestimate_branch_norms(model, batches, args.images)
        after = evaluate(model, test)["top1"]
        print(f"{run.rstrip('/').split('/')[-1]:>22}{before:>18.2f}{after:>25.2f}", flush=True)


if __name__ == "__main__":
    main()
