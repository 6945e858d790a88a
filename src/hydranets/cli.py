"""The ``hydranets`` command line: train, eval, predict, export, partition, pipeline, report, bench, models."""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from .checkpoint import check_writable
from .errors import HydraError


def output_file(path: str | None, flag: str) -> Path | None:
    """The file an option names for output, checked before the work (not after it): not a folder, and a file can be
    written there (:func:`~hydranets.checkpoint.check_writable`)."""
    if path is None:
        return None
    out = Path(path)
    if out.is_dir():
        raise HydraError(f"{flag} {path} is a folder; give a file name, e.g. {out / 'out.json'}")
    try:
        check_writable(out)
    except HydraError as e:
        raise HydraError(f"{flag}: {e}") from None
    return out


def write_json(data: object, path: Path) -> None:
    """``data`` as JSON in ``path``, its folders made, written atomically."""
    from .checkpoint import atomic_write_text
    atomic_write_text(json.dumps(data, indent=1), path)


def _config(args):
    from .config import load_config
    if args.out is not None:
        raise HydraError(f"the run folder is the override out={args.out}, not --out {args.out}")
    return load_config(args.config, args.overrides)


def cmd_train(args) -> None:
    from .checkpoint import CHECKPOINT
    from .train import train
    cfg = _config(args)
    out = Path(cfg.out)
    if args.resume and not args.overwrite and not any((out / f).exists() for f in (CHECKPOINT, "summary.json")):
        print(f"note: {out} holds no checkpoint to resume; --resume starts the run from epoch 1", file=sys.stderr)
    summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if summary:
        print(json.dumps(summary, indent=1))


def cmd_pipeline(args) -> None:
    from .pipeline import run_pipeline
    run_pipeline(_config(args))


def cmd_eval(args) -> None:
    import torch

    from .cost import active_params, compare_speed, first_images, model_macs, unsteady_note
    from .data import BatchLoader
    from .distributed import pick_device
    from .evaluate import AUTOCAST_DTYPES, evaluate
    from .hydranet import HydraNet
    from .inference import fold_batchnorms
    from .train import load_data, load_trained, run_config
    for flag, value in (("--batch-size", args.batch_size), ("--speed-batch", args.speed_batch),
                        ("--repeats", args.repeats)):
        if value < 1:
            raise HydraError(f"{flag} must be at least 1, got {value}")
    json_out = output_file(args.json, "--json")
    device = pick_device(args.device)
    model, ckpt = load_trained(args.run, device)
    cfg = run_config(ckpt, args.run, "hydranets eval")
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    _, test_set = load_data(cfg)
    batches = list(BatchLoader(test_set, args.batch_size, train=False, device=device, prefetch=False,
                               channels_last=cfg.train.channels_last))
    size = tuple(test_set.images.shape[1:])
    hydra = isinstance(model, HydraNet)
    try:
        ks = [int(k) for k in args.topk.split(",")] if args.topk is not None else ([model.topk] if hydra else [None])
    except ValueError:
        raise HydraError(f"--topk {args.topk!r} must be comma-separated integers, e.g. 1,2,4") from None
    if not hydra and args.topk is not None:
        raise HydraError(f"{args.run} is a {ckpt['model_info']['name']} baseline; --topk is for HydraNets")
    rows, candidates = [], {}
    folded, _ = fold_batchnorms(model)
    for k in ks:
        kw = {"topk": k} if hydra else {}
        print(f"evaluating{f' k={k}' if hydra else ''} on {len(test_set)} test images ...", file=sys.stderr, flush=True)
        ev = evaluate(model, batches, topk=k, precision=cfg.train.precision, true_route=hydra, shuffled_branches=hydra)
        rows.append({"k": k, "top1": ev["top1"], "top5": ev["top5"], "gate_recall": ev.get("gate_recall"),
                     "true_route_top1": ev.get("true_route_top1"), "shuffled_top1": ev.get("shuffled_top1"),
                     "macs": model_macs(model, size, **kw), "active_params": active_params(model, k)})
        candidates[str(k)] = (model, kw)
        candidates[f"{k} folded"] = (folded, kw)
    print(f"timing images/s at batch {args.speed_batch}: {len(candidates)} variants, median of {args.repeats} "
          "interleaved runs ...", file=sys.stderr, flush=True)
    speed = compare_speed(candidates, size, args.speed_batch, repeats=args.repeats,
                          autocast=AUTOCAST_DTYPES.get(cfg.train.precision),
                          images=first_images(batches, args.speed_batch), channels_last=cfg.train.channels_last)
    if note := unsteady_note(speed):
        print(note, file=sys.stderr, flush=True)
    kind = f"HydraNet of {ckpt['model_info']['name']}, B={model.num_branches}" if hydra else ckpt['model_info']['name']
    print(f"{kind} on {cfg.data.name} ({len(test_set)} test images), {device}")
    print(f"{'k':>3}{'top-1':>8}{'top-5':>8}{'gate recall':>13}{'true route':>12}{'shuffled':>10}{'MMACs':>9}"
          f"{'active(M)':>11}{'images/s':>10}{'folded':>8}")
    for r, k in zip(rows, ks):
        r["images_per_s"] = speed[str(k)]["images_per_s"]
        r["images_per_s_folded"] = speed[f"{k} folded"]["images_per_s"]
        recall, true_route, shuffled = (f"{r[c]:.{d}f}" if r[c] is not None else "-" for c, d in
                                        (("gate_recall", 1), ("true_route_top1", 2), ("shuffled_top1", 2)))
        print(f"{r['k'] or '-':>3}{r['top1']:>8.2f}{r['top5']:>8.2f}{recall:>13}{true_route:>12}{shuffled:>10}"
              f"{r['macs'] / 1e6:>9.2f}{r['active_params'] / 1e6:>11.3f}{r['images_per_s']:>10.0f}"
              f"{r['images_per_s_folded']:>8.0f}")
    print(f"images/s at batch {args.speed_batch}: as trained, and folded (batch norms folded into the convolutions "
          "before them, hydranets.fold_batchnorms: the same outputs, as deployed)")
    print("active(M): millions of parameters that run for an image (of a HydraNet: its stem, gate and k branches)")
    if hydra:
        print("true route: top-1 with each image's true subtask among its k branches (a perfect gate); shuffled: "
              "top-1 with each chosen branch replaced by the next one (near top-1: routing adds nothing)")
    if json_out:
        write_json(rows, json_out)


def cmd_predict(args) -> None:
    from .data.inputs import image_files, read_images
    from .inference import load_model, predict
    json_out = output_file(args.json, "--json")
    model = load_model(args.run, args.device, fold=not args.no_fold)
    files = image_files(args.images)
    if args.batch_size < 1:
        raise HydraError(f"--batch-size must be at least 1, got {args.batch_size}")
    rows = []
    for start in range(0, len(files), args.batch_size):  # read a batch at a time: a folder may hold many images
        chunk = files[start:start + args.batch_size]
        for f, row in zip(chunk, predict(model, read_images(chunk, model.input_spec), args.top, args.batch_size)):
            row = {"image": str(f), **row}
            rows.append(row)
            guesses = ", ".join(f"{c} {p:.1%}" for c, p in zip(row["classes"], row["probs"]))
            routed = f"  [branch {' '.join(map(str, row['branches']))}]" if "branches" in row else ""
            print(f"{f}: {guesses}{routed}", flush=True)
    if json_out:
        write_json(rows, json_out)


def cmd_export(args) -> None:
    import torch

    from .export import export_model
    from .hydranet import HydraNet
    from .inference import load_model
    if args.out is not None and Path(args.out).is_dir():
        raise HydraError(f"--out {args.out} is a folder; give a file name, e.g. {Path(args.out) / 'model.pt2'}")
    given = output_file(args.out, "--out")
    run = Path(args.run)
    folder = run if run.is_dir() else run.parent.parent if run.parent.name == "checkpoints" else run.parent
    out = given or folder / "model.pt2"
    if out.exists() and not args.overwrite:
        raise HydraError(f"{out} exists; pass --overwrite to replace it or --out elsewhere")
    model = load_model(args.run, args.device, fold=True)
    hydra = isinstance(model, HydraNet)
    if args.topk is not None and not hydra:
        raise HydraError(f"{args.run} is a dense model; --topk is for HydraNets")
    path = export_model(model, out, topk=args.topk)
    size = path.stat().st_size
    kind = f"HydraNet, B={model.num_branches}, k={model.topk if args.topk is None else args.topk}" if hydra else "dense"
    device = next(model.parameters()).device
    print(f"wrote {path} ({size / 1e6:.2f} MB, {size:,} bytes): {kind}, batch norms folded, any batch size, for torch "
          f"{torch.__version__} on {'the CPU' if device.type == 'cpu' else device}")


def cmd_partition(args) -> None:
    from .partition import check_partition_seed, format_partition, partition_filename
    from .pipeline import compute_partition
    from .train import load_trained, run_config
    if args.branches < 1:
        raise HydraError(f"partition -B (the number of subtasks) must be at least 1, got {args.branches}")
    check_partition_seed(args.seed)
    if args.overlap_balanced and not args.overlap:
        raise HydraError("--overlap-balanced spreads the second subtasks of --overlap; pass --overlap too")
    given = output_file(args.out, "--out")
    _, ckpt = load_trained(args.run)
    cfg = run_config(ckpt, args.run, "hydranets partition")
    pc = cfg.partition
    pc.method, pc.overlap, pc.overlap_balanced, pc.seed = args.method, args.overlap, args.overlap_balanced, args.seed
    run = Path(args.run)
    folder = run if run.is_dir() else run.parent.parent if run.parent.name == "checkpoints" else run.parent
    out = given or folder / partition_filename(pc.method, args.branches, pc.overlap, pc.overlap_balanced, pc.seed)
    if out.exists() and not args.overwrite:
        raise HydraError(f"{out} exists; pass --overwrite to replace it or --out elsewhere")
    p = compute_partition(cfg, args.run, out, args.branches)
    print(format_partition(p))
    print(f"saved {out}")


def cmd_report(args) -> None:
    from .report import write_report
    print(write_report(args.run))


def cmd_models(args) -> None:
    from . import list_models
    names = list_models(args.pattern)
    if not names:
        raise HydraError(f"no registered model matches {args.pattern!r}; `hydranets models` lists them all")
    print("\n".join(names))


def cmd_bench_pareto(args) -> None:
    from .bench.protocol import all_entries, load_protocol, protocol_dir, smoke_protocol
    from .bench.results import check_results_kept, write_results
    from .bench.run import add_repeats, evaluate_protocol, finished_entries, run_protocol
    if args.only:  # `--only A B key=value`: entry names never hold '=', so those words are overrides
        args.overrides += [w for w in args.only if "=" in w]
        args.only = [w for w in args.only if "=" not in w]
        if not args.only:
            raise HydraError("--only needs at least one entry name of the protocol (key=value words are overrides)")
    proto = load_protocol(args.config, args.overrides)
    if args.smoke:
        proto = smoke_protocol(proto)
    if args.results is None:
        args.results = protocol_dir(proto) / "results" if args.smoke else Path("benchmarks/results")
    if Path(args.results).exists() and not Path(args.results).is_dir():
        raise HydraError(f"--results {args.results} is a file; give the folder for <protocol>.{{json,png,md}}")
    output_file(str(Path(args.results) / f"{proto['protocol']}.json"), "--results")
    if not (args.replace_results or args.add_repeats or args.train_only or args.only):  # before the work, not after
        check_results_kept(proto, args.results, finished_entries(proto) if args.eval_only
                           else {e["name"] for e in all_entries(proto)})
    if args.add_repeats:
        result = add_repeats(proto, args.results)
    elif args.eval_only:
        result = evaluate_protocol(proto)
    else:
        result = run_protocol(proto, only_train=args.train_only, only=args.only)
    if result is not None:
        if not args.replace_results:
            check_results_kept(proto, args.results, {r["name"] for r in result["rows"]})
        paths = write_results(result, args.results)
        print(Path(paths[2]).read_text())
        print("wrote", *paths)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hydranets", description="HydraNets: train, evaluate and measure "
                                 "networks of class-specialised branches.", allow_abbrev=False)
    exact = functools.partial(argparse.ArgumentParser, allow_abbrev=False)   # `--over` is not --overwrite
    sub = ap.add_subparsers(dest="command", required=True, parser_class=exact)

    def with_config(p):
        p.add_argument("--config", help="YAML config (see configs/)")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5 model.name=resnet32")
        p.add_argument("--out", help=argparse.SUPPRESS)

    p = sub.add_parser("train", help="train a baseline or a HydraNet into a run folder")
    with_config(p)
    p.add_argument("--resume", action="store_true", help="continue the run in the folder from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in the folder")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("pipeline", help="baseline -> subtasks -> HydraNet -> evaluation -> report (resumable)")
    with_config(p)
    p.set_defaults(fn=cmd_pipeline)

    p = sub.add_parser("eval", help="accuracy, gate recall, MACs/image and images/s of a trained model")
    p.add_argument("run", help="run folder, checkpoint file or model.safetensors")
    p.add_argument("--topk", help="comma-separated k to sweep for a HydraNet, e.g. 1,2,4")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--speed-batch", type=int, default=256, help="batch size for images/s")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the rows to this file")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("predict", help="classify image files with a trained model (its most likely classes)")
    p.add_argument("run", help="run folder, checkpoint file or model.safetensors")
    p.add_argument("images", nargs="+", help="image files (.jpg/.jpeg/.png) or folders of them")
    p.add_argument("--top", type=int, default=None, help="classes to list per image (default 5)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-fold", action="store_true", help="run the model as trained (default: batch norms folded)")
    p.add_argument("--json", help="also write the predictions to this file")
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("export", help="a trained model as a torch.export program (.pt2) that runs without hydranets")
    p.add_argument("run", help="run folder, checkpoint file or model.safetensors")
    p.add_argument("--out", help="the .pt2 file (default: RUN/model.pt2)")
    p.add_argument("--topk", type=int, help="the k a HydraNet is exported at (default: its own)")
    p.add_argument("--overwrite", action="store_true", help="replace the file if it exists")
    p.add_argument("--device", default="cpu", help="where the program will run: cpu (default) or cuda")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("partition", help="subtasks from a trained baseline run")
    p.add_argument("run", help="baseline run folder or checkpoint")
    p.add_argument("--branches", "-B", type=int, required=True, help="number of subtasks")
    p.add_argument("--method", default="kmeans", choices=["kmeans", "spectral", "random"])
    p.add_argument("--overlap", action="store_true", help="each class also joins its second-nearest subtask")
    p.add_argument("--overlap-balanced", action="store_true",
                   help="with --overlap: the nearest other subtask with room, so every subtask gets about 2C/B classes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON file (default: beside the run)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_partition)

    p = sub.add_parser("report", help="plots and a self-contained report.html for a pipeline folder")
    p.add_argument("run", help="the pipeline folder (the out= of `hydranets pipeline`)")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("bench", help="benchmarks; `bench pareto`: a HydraNet family against a baseline family")
    bench = p.add_subparsers(dest="bench", required=True, metavar="pareto", parser_class=exact)
    p = bench.add_parser("pareto", help="train (resumable), evaluate and compare the families of a protocol")
    p.add_argument("--config", required=True, help="protocol YAML (configs/bench/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the shared base config")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--train-only", action="store_true", help="train what is missing, skip evaluation")
    what.add_argument("--only", nargs="+", metavar="NAME", help="train just these entries (the runs they start "
                      "from must have finished): several processes can share a protocol, each its own entries")
    what.add_argument("--eval-only", action="store_true", help="evaluate what has finished (ablations and checks "
                      "that have not are listed as not run)")
    what.add_argument("--add-repeats", action="store_true", help="add the repeats (seeds) and ablations that "
                      "finished since <protocol>.json was written to it, and compare again, without evaluating or "
                      "timing the rest (their run folders need not be here)")
    p.add_argument("--results", help="folder for <protocol>.{json,png,md} (default benchmarks/results; with --smoke "
                   "<out>-smoke/results)")
    p.add_argument("--replace-results", action="store_true", help="replace <protocol>.json even where it holds "
                   "models this evaluation lacks (refused by default: their measurements would be lost)")
    p.add_argument("--smoke", action="store_true", help="the protocol in miniature (2-epoch schedules, 1,024 "
                   "training images) in <out>-smoke: tries a config end to end in minutes")
    p.set_defaults(fn=cmd_bench_pareto)

    p = sub.add_parser("models", help="list registered model names")
    p.add_argument("pattern", nargs="?", default="*")
    p.set_defaults(fn=cmd_models)
    return ap


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may also follow a flag (`--resume out=...`), as argparse does not gather them
        if not hasattr(args, "overrides") or any("=" not in w or w.startswith("-") for w in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*(args.overrides or []), *extra]
    try:
        args.fn(args)
    except HydraError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept (continue with --resume)", file=sys.stderr)
        sys.exit(130)
