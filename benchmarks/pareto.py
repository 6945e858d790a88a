"""HydraNet family vs baseline family on real data: the paper's claim, measured here.

    python benchmarks/pareto.py --config configs/bench/tin100-cpu.yaml [key=value ...]
                                [--train-only | --only NAME ... | --eval-only]

The same as ``hydranets bench pareto``: trains every model of the protocol (each its own resumable
run folder: a rerun skips what finished), computes the subtasks from the named baseline, evaluates all
models in one process and writes benchmarks/results/<protocol>.{json,png,md}.
"""
import sys
from pathlib import Path

from hydranets.cli import main

if __name__ == "__main__":
    given = any(a in ("--smoke", "--results") or a.startswith("--results=") for a in sys.argv[1:])
    main(["bench", "pareto", *([] if given else ["--results", str(Path(__file__).parent / "results")]), *sys.argv[1:]])
