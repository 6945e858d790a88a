"""Images/s of trained models timed on random inputs and on real test images, side by side.

    python benchmarks/speed_inputs.py RUN [RUN ...] [--batch-sizes 256,1] [--repeats 7]

Why the benchmarks time real images (``compare_speed(images=...)``): a trained HydraNet's gate sends
random noise to fewer branches than real images (4-5 of 8 against 8 of 8 on tin100-cpu), so random
inputs time fewer, larger branch calls than real data causes. The table shows, per model and input,
how many branches a batch of 256 used and the measured images/s.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hydranets.config import config_from_dict
from hydranets.cost import compare_speed, first_images
from hydranets.data import BatchLoader
from hydranets.distributed import pick_device
from hydranets.evaluate import resolve_precision
from hydranets.hydranet import HydraNet
from hydranets.train import load_data, load_trained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="finished run folders (the first one's test set is used)")
    ap.add_argument("--batch-sizes", default="256,1")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    device = pick_device("auto")
    models = {run: load_trained(run, device) for run in args.runs}
    cfg = config_from_dict(next(iter(models.values()))[1]["config"])
    _, test_set = load_data(cfg)
    real = first_images(list(BatchLoader(test_set, 256, train=False, device=device, prefetch=False)), 256)
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(0)).to(device)
    precision = resolve_precision("auto", device)
    amp = torch.bfloat16 if precision == "bf16" else None
    size = tuple(real.shape[1:])
    print(f"{device}, {precision}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.repeats} repeats (medians)")
    print(f"{'model':<28}{'input':>8}{'batch':>7}{'branches used':>15}{'images/s':>10}")
    for run, (model, _) in models.items():
        model.to(memory_format=torch.channels_last).eval()
    candidates = {(run, label): (OnInputs(model, x), {}) for run, (model, _) in models.items()
                  for x, label in ((noise, "random"), (real, "real"))}
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        speed = compare_speed(candidates, size, bs, repeats=args.repeats, autocast=amp)
        for (run, label), (wrapped, _) in candidates.items():
            used = "-"
            if isinstance(wrapped.model, HydraNet):
                with torch.inference_mode():
                    used = str(wrapped.model(wrapped.inputs[:256], return_gate=True).route.unique().numel())
            print(f"{Path(run).name:<28}{label:>8}{bs:>7}{used:>15}{speed[(run, label)]['images_per_s']:>10.0f}")


class OnInputs(torch.nn.Module):
    """A model that runs on its own fixed inputs (as many as the batch it is given), so that random and
    real inputs are timed in the same interleaved rounds."""

    def __init__(self, model: torch.nn.Module, inputs: torch.Tensor) -> None:
        super().__init__()
        self.model, self.inputs = model, inputs.contiguous(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.inputs[:x.shape[0]])


if __name__ == "__main__":
    main()
