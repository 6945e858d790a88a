"""What exporting costs: a trained run as `hydranets export` writes it (.pt2) against the same model in eager PyTorch.

    python benchmarks/export_speed.py RUN [RUN ...] [--batch-sizes 256,1] [--repeats 7] [--device auto]

Each run is loaded as deployed (batch norms folded), exported with :func:`hydranets.export_model` into a temporary
file and loaded back with ``torch.export.load`` alone. Both are evaluated on the run's test set in fp32 (top-1, and the
largest difference of any logit), then timed side by side on the same real test images in interleaved rounds
(medians of ``--repeats``), so a HydraNet's gate spreads them over its branches as it does in use.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from hydranets import HydraNet, export_model, load_model
from hydranets.cost import compare_speed, first_images
from hydranets.data import BatchLoader
from hydranets.distributed import pick_device
from hydranets.run_folder import saved_config
from hydranets.train import load_data


class Program(nn.Module):
    """An exported program as a module that ``compare_speed`` can time: a loaded program refuses ``eval()``, so it is
    held outside the module tree; the empty parameter says its device."""

    def __init__(self, program: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.program = [program]
        self.anchor = nn.Parameter(torch.empty(0, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program[0](x)


@torch.no_grad()
def top1_and_gap(a: nn.Module, b: nn.Module, batches: list) -> tuple[float, float, float]:
    """Top-1 (%) of ``a`` and of ``b`` on the batches, and the largest absolute difference of their logits."""
    hits_a = hits_b = total = 0
    gap = 0.0
    for x, y in batches:
        la, lb = a(x), b(x)
        hits_a += (la.argmax(1) == y).sum().item()
        hits_b += (lb.argmax(1) == y).sum().item()
        gap = max(gap, (la - lb).abs().max().item())
        total += len(y)
    return 100 * hits_a / total, 100 * hits_b / total, gap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="finished run folders")
    ap.add_argument("--batch-sizes", default="256,1")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = pick_device(args.device)
    candidates, rows = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            model = load_model(run, device, fold=True)
            program = torch.export.load(export_model(model, Path(tmp) / f"{Path(run).name}.pt2")).module()
            timed = Program(program, device)
            _, test_set = load_data(saved_config(Path(run)))
            batches = list(BatchLoader(test_set, 256, train=False, device=device, prefetch=False))
            k = f"B={model.num_branches}, k={model.topk}" if isinstance(model, HydraNet) else "dense"
            rows[run] = (k, *top1_and_gap(model, timed, batches), first_images(batches, 256))
            candidates[(run, "eager")], candidates[(run, "exported")] = (model, {}), (timed, {})
        print(f"{device}, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats "
              "(medians), real test images, batch norms folded")
        print(f"{'run':<22}{'model':>12}{'top-1':>8}{'exported':>10}{'max |dlogit|':>14}")
        for run, (k, t_eager, t_exported, gap, _) in rows.items():
            print(f"{Path(run).name:<22}{k:>12}{t_eager:>8.2f}{t_exported:>10.2f}{gap:>14.2e}")
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            print(f"\nbatch {bs}: images/s")
            print(f"{'run':<22}{'eager':>9}{'exported':>10}{'exported/eager':>16}")
            for run in rows:
                images = rows[run][4]
                speed = compare_speed({key: candidates[key] for key in ((run, "eager"), (run, "exported"))},
                                      tuple(images.shape[1:]), bs, repeats=args.repeats, channels_last=False,
                                      images=images)
                eager, exported = (speed[(run, how)]["images_per_s"] for how in ("eager", "exported"))
                print(f"{Path(run).name:<22}{eager:>9.0f}{exported:>10.0f}{exported / eager:>15.2f}x")


if __name__ == "__main__":
    main()
