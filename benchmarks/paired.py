"""Paired top-1 differences between runs of a saved pareto result: A minus B, pair by pair.

    python benchmarks/paired.py benchmarks/results/tin100-cpu-f2u.json A:B [A:B ...]

Why: one seed to the next moves a run's top-1 by up to 2-3 points, more than most design changes.
Two designs trained with the same seed from the same checkpoint share most of that noise, so the
mean of their pair-by-pair differences, with its standard error, tells them apart where the two
families' means cannot. Which runs pair up (same seed, same start) is the caller's to say.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def paired_differences(top1: dict[str, float], pairs: list[tuple[str, str]]) -> dict:
    """Each pair's top-1 difference (A - B) and their mean, sd, standard error and how many A wins; a ValueError
    where a run is in more than one pair (or on both sides of one)."""
    missing = sorted({name for pair in pairs for name in pair if name not in top1})
    if missing:
        raise KeyError(f"not in the results: {', '.join(missing)}")
    names = [name for pair in pairs for name in pair]
    reused = sorted({name for name in names if names.count(name) > 1})
    if reused:
        raise ValueError(f"named more than once: {', '.join(reused)}; each run belongs to one pair, else the pairs "
                         "are not independent and the standard error is too small")
    diffs = [top1[a] - top1[b] for a, b in pairs]
    sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    return {"pairs": [(a, b, top1[a], top1[b], d) for (a, b), d in zip(pairs, diffs)],
            "mean": statistics.fmean(diffs), "sd": sd, "se": sd / len(diffs) ** 0.5,
            "wins": sum(d > 0 for d in diffs), "n": len(diffs)}


def parse_pair(text: str) -> tuple[str, str]:
    """'A:B' -> (A, B)."""
    a, sep, b = text.partition(":")
    if not sep or not a or not b or ":" in b:
        raise argparse.ArgumentTypeError(f"{text!r} is not a pair: write RUN_A:RUN_B")
    return a, b


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="a bench pareto results JSON (benchmarks/results/<protocol>.json)")
    ap.add_argument("pairs", nargs="+", type=parse_pair, help="RUN_A:RUN_B, the same seed and start")
    args = ap.parse_args(argv)
    try:
        rows = json.loads(args.results.read_text())["rows"]
        summary = paired_differences({r["name"]: r["top1"] for r in rows}, args.pairs)
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"paired.py: {args.results}: {e.args[0] if isinstance(e, KeyError) else e}")
    width = max(len(a) for a, *_ in summary["pairs"])
    for a, b, ta, tb, d in summary["pairs"]:
        print(f"{a:>{width}} - {b}: {ta:.2f} - {tb:.2f} = {d:+.2f}")
    spread = f" (sd {summary['sd']:.2f}, standard error {summary['se']:.2f})" if summary["n"] > 1 else ""
    print(f"mean {summary['mean']:+.2f} points over {summary['n']} pairs{spread}; "
          f"A above B in {summary['wins']} of {summary['n']}")


if __name__ == "__main__":
    main()
