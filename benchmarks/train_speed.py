"""Training throughput of the real training loop: resnet20 vs a HydraNet of similar inference cost.

    python benchmarks/train_speed.py [--steps 30] [--precisions fp32,bf16] [--repeats 3]

Runs ``hydranets.train.train_one_epoch`` (data loader, augmentation, loss, backward, optimiser) on
CIFAR-size input (random uint8 images, 100 classes) and prints images/s and the share of time spent
waiting for data (target: under 5%). Medians over repeats, configurations interleaved.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from hydranets.config import load_config
from hydranets.cost import model_macs
from hydranets.data import BatchLoader, ImageDataset
from hydranets.distributed import setup
from hydranets.partition import partition_random
from hydranets.train import build_model, make_optimizer, model_info, train_one_epoch

MODELS = {
    "resnet20": ["model.name=resnet20"],
    "hydra resnet20 B=8 k=2 (top-k training)": ["model.name=resnet20", "hydra.enabled=true", "hydra.num_branches=8",
                                                "hydra.topk=2", "hydra.routing=topk"],
    "hydra resnet20 B=8 k=2 (soft training)": ["model.name=resnet20", "hydra.enabled=true", "hydra.num_branches=8",
                                               "hydra.topk=2", "hydra.routing=soft"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="training steps per timing")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rt = setup("auto")
    n = args.steps * args.batch_size
    g = torch.Generator().manual_seed(0)
    data = ImageDataset(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                        torch.randint(0, 100, (n,), generator=g), [str(c) for c in range(100)],
                        (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    part = partition_random(100, 8)
    runs = {}
    for prec in args.precisions.split(","):
        for name, overrides in MODELS.items():
            cfg = load_config(overrides=overrides + [f"train.precision={prec}", "train.progress=false",
                                                     f"train.batch_size={args.batch_size}", "train.epochs=1"])
            model = build_model(model_info(cfg, 100, 3), part if cfg.hydra.enabled else None, cfg.hydra.topk)
            macs = model_macs(model, (3, 32, 32), batch_size=16)
            model = model.to(rt.device, memory_format=torch.channels_last)
            loader = BatchLoader(data, args.batch_size, train=True, device=rt.device)
            runs[(prec, name)] = (cfg, model, make_optimizer(cfg, model), loader, macs)
    results: dict = {key: [] for key in runs}
    for r in range(args.repeats + 1):  # the first round warms up
        for key, (cfg, model, opt, loader, _) in runs.items():
            loader.set_epoch(r)
            hydra = model if cfg.hydra.enabled else None
            stats = train_one_epoch(cfg, model, model, hydra, None, loader, opt,
                                    torch.amp.GradScaler("cuda", enabled=False), 0, args.steps, rt)
            if r:
                results[key].append(stats)
    print(f"device {rt.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU bf16 kernels: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}, batch {args.batch_size}, "
          f"{args.steps} steps x {args.repeats} repeats (medians)")
    print(f"{'model':<42}{'precision':>10}{'MMACs/img':>11}{'train img/s':>13}{'data wait':>11}")
    for (prec, name), stats in results.items():
        ips = statistics.median(s["images_per_s"] for s in stats)
        wait = statistics.median(s["data_wait"] for s in stats)
        print(f"{name:<42}{prec:>10}{runs[(prec, name)][4] / 1e6:>11.1f}{ips:>13.0f}{100 * wait:>10.1f}%")


if __name__ == "__main__":
    main()
