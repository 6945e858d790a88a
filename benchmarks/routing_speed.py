"""Top-k conditional execution vs the dense equivalent (all branches): MACs/image and measured speed.

    python benchmarks/routing_speed.py [--model hydra_resnet20_b8k2] [--classes 100] [--repeats 15]

Target (issue 2): measured speedup over the dense equivalent >= 0.8 x the MAC ratio at batch 256,
>= 0.6 x at batch 1.
"""
from __future__ import annotations

import argparse
import json

import torch

import hydranets
from hydranets.cost import compare_speed, model_macs
from hydranets.distributed import pick_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="hydra_resnet20_b8k2")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--batch-sizes", default="256,1")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = hydranets.create_model(args.model, num_classes=args.classes).eval()
    model = model.to(memory_format=torch.channels_last)
    size = (3, args.input_size, args.input_size)
    B = model.num_branches
    ks = sorted({1, 2, min(4, B), B})
    candidates = {"dense (all branches)": (model, {"routing": "soft"})}
    candidates.update({f"top-{k}": (model, {"routing": "topk", "topk": k}) for k in ks})
    macs = {name: model_macs(model, size, batch_size=64, **kw) for name, (_, kw) in candidates.items()}
    device = pick_device(args.device)
    model.to(device)
    rows = []
    print(f"{args.model}, {args.classes} classes, B={B}, input {size}, {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'routing':<22}{'batch':>6}{'MMACs/img':>11}{'MAC ratio':>10}{'images/s':>11}{'speedup':>9}{'speedup/MAC ratio':>19}")
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        speed = compare_speed(candidates, size, bs, repeats=args.repeats)
        dense = speed["dense (all branches)"]["images_per_s"]
        for name in candidates:
            ratio = macs["dense (all branches)"] / macs[name]
            speedup = speed[name]["images_per_s"] / dense
            rows.append({"routing": name, "batch": bs, "macs": macs[name], "mac_ratio": ratio,
                         "images_per_s": speed[name]["images_per_s"], "speedup": speedup,
                         "efficiency": speedup / ratio})
            print(f"{name:<22}{bs:>6}{macs[name] / 1e6:>11.2f}{ratio:>10.2f}{speed[name]['images_per_s']:>11.1f}"
                  f"{speedup:>9.2f}{speedup / ratio:>19.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
