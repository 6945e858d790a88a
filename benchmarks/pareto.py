"""HydraNet family vs baseline family on real data: the paper's claim, measured here.

    python benchmarks/pareto.py --config configs/bench/tin100-cpu.yaml [key=value ...] [--train-only | --only NAME ... | --eval-only]

Trains every model of the protocol (each its own resumable run folder: a rerun skips what finished),
computes the subtasks from the named baseline, evaluates all models in one process and writes
benchmarks/results/<protocol>.{json,png,md}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hydranets.errors import HydraError
from hydranets.pareto import evaluate_protocol, load_protocol, run_protocol, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="protocol YAML (configs/bench/)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the shared base config")
    ap.add_argument("--train-only", action="store_true", help="train what is missing, skip evaluation")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="train just these entries (their baseline must have "
                    "finished); with several processes, each its own entries")
    ap.add_argument("--eval-only", action="store_true", help="evaluate what has finished training (baselines and "
                    "HydraNets must have; ablations and checks that have not are listed as not run)")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    try:
        proto = load_protocol(args.config, args.overrides)
        result = evaluate_protocol(proto) if args.eval_only else \
            run_protocol(proto, only_train=args.train_only, only=args.only)
        if result is not None:
            paths = write_results(result, args.results)
            print(Path(paths[2]).read_text())
            print("wrote", *paths)
    except HydraError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
