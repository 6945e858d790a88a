"""Batch-1 latency of a HydraNet with this version's dispatch against an earlier version's, side by side.

    python benchmarks/batch1_dispatch.py --against 6d0cf39 [--repeats 15] [--threads 2]

Loads ``src/hydranets/routing.py`` as it was at the git revision ``--against`` and times the same
HydraNet (tin100-cpu's hydra-r20-b8k1: resnet20's stem, its stage 3 at full width as gate and shared
path, B=8 half-width branches, top-1) with each dispatch, and resnet20 beside them, in interleaved
rounds (medians). Untrained weights: at batch 1 each image runs one branch whatever the gate picks.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import tempfile
from pathlib import Path

import torch

import hydranets
import hydranets.hydranet as hydranet_mod
from hydranets.cost import compare_speed

REPO = Path(__file__).resolve().parents[1]


def old_dispatch(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:src/hydranets/routing.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "routing_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("routing_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dispatch


class WithDispatch(torch.nn.Module):
    """The HydraNet's forward with another dispatch function swapped in for the call."""

    def __init__(self, model: torch.nn.Module, dispatch) -> None:
        super().__init__()
        self.model, self.dispatch = model, dispatch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        current = hydranet_mod.dispatch
        hydranet_mod.dispatch = self.dispatch
        try:
            return self.model(x)
        finally:
            hydranet_mod.dispatch = current


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", required=True, help="git revision whose dispatch to compare with")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = hydranets.create_model("resnet20", num_classes=100).eval().to(memory_format=torch.channels_last)
    hydra = hydranets.build_hydranet("resnet20", 100, num_branches=8, topk=1, branch_width=0.5, gate_width=1.0,
                                     shared_path=True).eval().to(memory_format=torch.channels_last)
    candidates = {"resnet20": (dense, {}),
                  f"hydra-r20-b8k1, dispatch of {args.against}": (WithDispatch(hydra, old_dispatch(args.against)), {}),
                  "hydra-r20-b8k1, this dispatch": (hydra, {})}
    old = candidates[f"hydra-r20-b8k1, dispatch of {args.against}"][0]
    with torch.no_grad():  # the same logits either way
        for x in torch.randn(8, 1, 3, 32, 32):
            torch.testing.assert_close(old(x), hydra(x))
    speed = compare_speed(candidates, (3, 32, 32), 1, repeats=args.repeats)
    print(f"batch 1, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} rounds (medians)")
    for name, s in speed.items():
        print(f"{name:<45}{s['latency_ms']:>8.3f} ms{s['images_per_s']:>9.0f} img/s")


if __name__ == "__main__":
    main()
