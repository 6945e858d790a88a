"""Images/s of trained models as trained and with their batch norms folded, side by side, and what folding
does to a HydraNet family's measured time saving.

    python benchmarks/fold_speed.py --baselines RUN [RUN ...] --hydranets RUN [RUN ...] [--controls RUN [RUN ...]]

Every run is evaluated on its test set (top-1 of the model as trained and of its folded copy) and
timed on the same real test images in interleaved rounds (medians of ``--repeats``). The families are
then compared as ``hydranets bench pareto`` compares them: the time at the best baseline's top-1,
interpolated along each family's frontier of (seconds/image, top-1), once with the times as trained
and once folded; ``--controls`` is a second family compared with the baselines the same way (e.g. the
HydraNets' one-branch control).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hydranets import HydraNet, fold_batchnorms
from hydranets.config import config_from_dict
from hydranets.cost import compare_speed, first_images
from hydranets.data import BatchLoader
from hydranets.distributed import pick_device
from hydranets.evaluate import evaluate, resolve_precision
from hydranets.bench.compare import compare_families
from hydranets.train import load_data, load_trained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baselines", nargs="+", required=True, help="finished dense run folders")
    ap.add_argument("--hydranets", nargs="*", default=[], help="finished HydraNet run folders")
    ap.add_argument("--controls", nargs="*", default=[], help="a second family compared with the baselines")
    ap.add_argument("--batch-sizes", default="256,1")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    device = pick_device("auto")
    runs = {run: "baseline" for run in args.baselines} | {run: "hydranet" for run in args.hydranets} \
        | {run: "control" for run in args.controls}
    models = {run: load_trained(run, device) for run in runs}
    cfg = config_from_dict(next(iter(models.values()))[1]["config"])
    _, test_set = load_data(cfg)
    batches = list(BatchLoader(test_set, 256, train=False, device=device, prefetch=False))
    precision = resolve_precision(cfg.train.precision, device)
    amp = torch.bfloat16 if precision == "bf16" else None
    rows, candidates = {}, {}
    for run, (model, ckpt) in models.items():
        model = model.to(memory_format=torch.channels_last).eval()
        folded, pairs = fold_batchnorms(model)
        k = model.topk if isinstance(model, HydraNet) else None
        kw = {"topk": k} if k else {}
        rows[run] = {"family": runs[run], "pairs": pairs,
                     "top1": evaluate(model, batches, topk=k, precision=precision)["top1"],
                     "top1_folded": evaluate(folded, batches, topk=k, precision=precision)["top1"]}
        candidates[(run, "trained")], candidates[(run, "folded")] = (model, kw), (folded, kw)
    print(f"{device}, {precision}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.repeats} repeats (medians), real test images")
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        speed = compare_speed(candidates, tuple(test_set.images.shape[1:]), bs, repeats=args.repeats, autocast=amp,
                              images=first_images(batches, bs))
        print(f"\nbatch {bs}")
        print(f"{'model':<24}{'family':>10}{'folded':>8}{'top-1':>8}{'folded':>8}{'images/s':>10}{'folded':>9}"
              f"{'speed-up':>10}")
        for run, r in rows.items():
            trained, folded = (speed[(run, how)]["images_per_s"] for how in ("trained", "folded"))
            r[bs] = (trained, folded)
            print(f"{Path(run).name:<24}{r['family']:>10}{r['pairs']:>8}{r['top1']:>8.2f}{r['top1_folded']:>8.2f}"
                  f"{trained:>10.0f}{folded:>9.0f}{folded / trained:>9.2f}x")
        for family in ("hydranet", "control"):
            for i, how in enumerate(("as trained", "folded")):
                fam = {f: [(1.0 / r[bs][i], r["top1"]) for r in rows.values() if r["family"] == f]
                       for f in ("baseline", family)}
                if not fam[family]:
                    continue
                comp = compare_families(fam["baseline"], fam[family])
                saving = comp["iso_accuracy_saving"]
                print(f"{family} family: time saving at the best baseline's top-1 ({comp['baseline_best_top1']:.2f}%), "
                      f"{how}: " + (f"{saving:.2f}x" if saving else "not reached"))


if __name__ == "__main__":
    main()
