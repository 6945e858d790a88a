"""A protocol's results written: ``<protocol>.json``, the plots and the Markdown report with every comparison."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..checkpoint import atomic_write_text
from ..errors import HydraError
from ..machine import describe
from .compare import level_off_savings, mean_curves, top1_standard_error

def precision_list(by_precision: dict[str, list[str]]) -> str:
    return "; ".join(f"{p}: {', '.join(names)}" for p, names in by_precision.items())


def read_results(path: Path) -> dict:
    """A saved ``<protocol>.json``; a damaged one is one line that says how to get it back."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HydraError(f"{path} is not readable results JSON ({e}); restore it from git, or delete it and evaluate "
                         "every model again (--eval-only)") from None
    rows = saved.get("rows") if isinstance(saved, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "name" in r for r in rows):
        raise HydraError(f"{path} is not the results of a protocol (no list of named rows); restore it from git, or "
                         "delete it and evaluate every model again (--eval-only)")
    return saved


def check_results_kept(proto: dict, results_dir: str | Path, names: set[str]) -> None:
    """Refuse to replace ``<protocol>.json`` with results that lack some of its models (e.g. an evaluation in a
    checkout without their run folders): those measurements would be lost."""
    path = Path(results_dir) / f"{proto['protocol']}.json"
    if not path.exists():
        return
    lost = [r["name"] for r in read_results(path)["rows"] if r["name"] not in names]
    if lost:
        raise HydraError(f"{path} holds results of {len(lost)} model(s) this evaluation would not have "
                         f"({', '.join(lost[:5])}{', ...' if len(lost) > 5 else ''}: their runs are not here); "
                         "write elsewhere with --results DIR, or pass --replace-results to replace it")


def write_results(result: dict, results_dir: str | Path) -> tuple[Path, Path, Path]:
    """``<protocol>.json``, ``<protocol>.png`` (top-1 vs MACs, with the paper's curves beside) and ``<protocol>.md``;
    with repeats also ``<protocol>-means.png`` (the families on their means, with error bars)."""
    from ..report import plot_means, plot_pareto
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    name = result["protocol"]
    js, png, md = results_dir / f"{name}.json", results_dir / f"{name}.png", results_dir / f"{name}.md"
    atomic_write_text(json.dumps(result, indent=1), js)
    atomic_write_text(markdown_table(result), md)
    families = {}
    for f in ("baseline", "hydranet"):
        families[f] = [(r["macs"], r["top1"], r["name"]) for r in sorted(result["rows"], key=lambda r: r["macs"])
                       if r["family"] == f]
    for r in sorted(result["rows"], key=lambda r: r["macs"]):
        fam = r.get("curve")
        if r["family"] == "check" and r.get("partial_schedule"):  # a fork's source: its accuracy is no point of a curve
            continue
        if r["family"] == "check":  # a check family as a curve, a lone check as a point
            label = f"{fam} (check family)" if fam else f"{r['name']} (check, {r['epochs']} epochs)"
            families.setdefault(label, []).append((r["macs"], r["top1"], r["name"] if fam else ""))
        elif r["family"] == "ablation" and fam:
            families.setdefault(f"{fam} (ablation family)", []).append((r["macs"], r["top1"], r["name"]))
    means = result.get("seed_means", {}).get("members", [])
    for m in means:  # a mean curve only for a family with repeats; elsewhere it would hide the family's own
        if any(len(o["top1_runs"]) > 1 for o in means if (o["family"], o.get("curve")) == (m["family"], m.get("curve"))):
            families.setdefault(f"{m.get('curve') or m['family']}, mean over repeats", []).append((m["macs"], m["top1"], ""))
    plot_pareto(families, png, paper=True, title=f"{name}: top-1 vs multiply-adds")
    if any(len(m["top1_runs"]) > 1 for m in means):
        label = {"baseline": "baselines (dense)", "hydranet": "HydraNets"}
        plot_means({label.get(k, f"{k} (ablation)"): pts for k, pts in mean_curves(means).items()},
                   results_dir / f"{name}-means.png",
                   title=f"{name}: families on their means over seeds")
    return js, png, md


def _fmt(v, spec: str, none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def _at_least(comparison: dict) -> str:
    return ">=" if comparison.get("iso_accuracy_at_least") else ""


def _times(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _level_off_line(comp: dict, bss: list[str], test_images: int) -> list[str]:
    """The saving where the baseline curve levels off, in MACs and measured time, if that is not its best point."""
    point = level_off_savings(comp, test_images)
    if point is None or point["is_best"]:
        return []
    least = point.get("at_least", {})
    mark = lambda key: ">=" if least.get(key) else ""  # noqa: E731 - a lower bound, as in the other lines
    times = [f"{mark(f'time_b{b}')}{_times(point[f'time_b{b}'])} in batch-{b} time"
             for b in bss if f"time_b{b}" in point]
    return [f"- Where the dense curve levels off (its cheapest point within one standard error, {point['tolerance']:.2f} "
            f"points, of its best top-1: {point['top1']:.2f}% at {point['cost'] / 1e6:.1f}M MACs): iso-accuracy "
            f"saving " + ", ".join([f"{mark('macs')}{_times(point['macs'])} in MACs"] + times)
            + (" (>=: the cheapest HydraNet is already more accurate)" if any(least.values()) else "")]


def _seed_noise_line(noise: dict, bss: list[str]) -> str:
    s, sd = noise["savings"], noise["pooled_sd"]
    def spread(k: str) -> str:
        least = s[k].get("at_least", 0.0)
        return (f"median {_times(s[k]['median'])} (10-90%: {_times(s[k]['p10'])} to {_times(s[k]['p90'])}"
                + (f"; a lower bound in {100 * least:.0f}% of draws, where the cheapest HydraNet is already more "
                   f"accurate" if least else "") + ")")

    share = noise["share_at_target"]
    return (f"- Seed noise ({noise['draws']} draws, each member's mean moved by a normal error of its family's pooled "
            f"seed sd / sqrt(runs): dense {sd['baseline']:.2f}, HydraNets {sd['hydranet']:.2f} points): the saving "
            f"where the dense curve levels off in MACs {spread('macs')}, "
            + ", ".join(f"in batch-{b} time {spread(f'time_b{b}')}" for b in bss if f"time_b{b}" in s)
            + f"; at least {noise['target']:g}x in MACs in {100 * share['macs']:.0f}% of draws"
            + "".join(f", and with batch-{b} time at least {noise['time_share']:g} of it in "
                      f"{100 * share[f'time_b{b}']:.0f}%" for b in bss if f"time_b{b}" in share))


def _comparison_lines(comp: dict, bss: list[str], against: str, hydra: str = "the HydraNet family",
                      test_images: int | None = None) -> list[str]:
    """The report lines of one comparison; with ``test_images``, also the saving where the reference curve levels off."""
    m = comp["macs"]
    lines = [f"- Iso-accuracy saving in MACs at {against}'s best top-1 ({m['baseline_best_top1']:.2f}%): "
             f"{_at_least(m)}{_times(m['iso_accuracy_saving'])}" + (
                 f" ({hydra} does not reach it)" if not m["iso_accuracy_saving"] else
                 " (>=: its cheapest member is already more accurate)" if _at_least(m) else ""),
             f"- Equal-cost top-1 gain over the shared MACs range: mean {_fmt(m['equal_cost_gain_mean'], '+.2f')}, "
             f"max {_fmt(m['equal_cost_gain_max'], '+.2f')} points"]
    along = m.get("saving_along_baseline", [])
    if len(along) > 1:
        lines.append("- Iso-accuracy saving in MACs along the dense curve, at each of its points' top-1: " + ", ".join(
            f"{p['top1']:.2f}% {'>=' if p['at_least'] else ''}{_times(p['saving'])}" for p in along)
            + (" (>=: the cheapest HydraNet is already more accurate)" if any(p["at_least"] for p in along) else ""))
    for b in (b for b in bss if f"time_b{b}" in comp):
        t = comp[f"time_b{b}"]
        lines.append(f"- Measured time at batch {b}: iso-accuracy saving {_at_least(t)}{_times(t['iso_accuracy_saving'])}, "
                     f"equal-time gain mean {_fmt(t['equal_cost_gain_mean'], '+.2f')} points")
    if test_images:
        lines += _level_off_line(comp, bss, test_images)
    return lines


def _recall(row: dict) -> str:
    """A HydraNet's gate recall@k; in parentheses, a dense network's own subtask recall@1 (see subtask_recall)."""
    if row.get("gate_recall") is not None:
        return f"{row['gate_recall']:.1f}"
    return f"({row['subtask_recall']:.1f})" if row.get("subtask_recall") is not None else "-"


def _noise_line(result: dict) -> str:
    """Test-set sampling noise near the two curves' top-1 (their members; checks and ablations aside)."""
    n, rows = result["test_images"], result["rows"]
    rows = [r for r in rows if r["family"] in ("baseline", "hydranet")] or rows
    mean = sum(r["top1"] for r in rows) / len(rows)
    se = top1_standard_error(mean, n)
    return (f"- Noise: on {n} test images one standard error of a top-1 near {mean:.0f}% is {se:.2f} points, "
            f"so two models' errors, were they independent, differ by more than chance only beyond about "
            f"{2 * math.sqrt(2) * se:.1f} points (on one shared test set their errors overlap, so a paired "
            "difference is less noisy than that; training seeds add their own spread, see the repeats)")


def _seed_lines(means: dict, bss: list[str], test_images: int | None = None) -> list[str]:
    runs = [f"{m['name']} {' / '.join(f'{t:.2f}' for t in m['top1_runs'])} (mean {m['top1']:.2f}, sd {m['top1_sd']:.2f})"
            for m in means["members"] if len(m["top1_runs"]) > 1]
    lines = [f"- Repeats: top-1 of each run, first the member's own: {'; '.join(runs)}",
             "- On the means over repeats (a member without repeats counts with its one run):"] + \
        ["  " + line for line in _comparison_lines(means, bss, "the baseline family", test_images=test_images)]
    if means.get("seed_noise"):
        lines.append("  " + _seed_noise_line(means["seed_noise"], bss))
    for group in means.get("ablation_families", {}):
        lines += ["  " + line for line in _ablation_family_lines(means, group, group, bss, test_images)]
    return lines


def means_table(members: list[dict], bss: list[str]) -> str:
    """The families on their means: one row per member with its repeats folded in (runs, mean top-1, sample sd,
    median speed of its timed runs), the view the comparisons on the means read."""
    lines = ["| member | family | runs | top-1 mean | sd | MMACs/img | " + " | ".join(f"img/s @{b}" for b in bss) + " |",
             "|" + "---|" * (6 + len(bss))]
    for m in members:
        family = f"{m['family']} ({m['curve']})" if m.get("curve") else m["family"]
        lines.append(f"| {m['name']} | {family} | {len(m['top1_runs'])} | {m['top1']:.2f} | "
                     f"{_fmt(m['top1_sd'], '.2f', '-')} | {m['macs'] / 1e6:.1f} | "
                     + " | ".join(_fmt(m.get('images_per_s_b' + b), ".0f", "-") for b in bss) + " |")
    return "\n".join(lines) + "\n"


def _ablation_family_lines(comps: dict, group: str, label: str, bss: list[str],
                           test_images: int | None = None) -> list[str]:
    """An ablation family against the baselines, then the HydraNets against it, from ``comps``' comparisons."""
    lines = [f"- The ablation family {label} instead of the HydraNets, against the baselines:"]
    lines += ["  " + line for line in
              _comparison_lines(comps["ablation_families"][group], bss, "the baseline family", f"the {group} family",
                                test_images)]
    lines.append(f"  - The HydraNet family against the {group} family as the reference curve:")
    lines += ["    " + line for line in _comparison_lines(comps["vs_ablation_families"][group], bss, f"the {group} family")]
    return lines


def markdown_table(result: dict) -> str:
    bss = [k[len("images_per_s_b"):] for k in result["rows"][0] if k.startswith("images_per_s_b")]
    head = "| model | family | k | epochs (total) | top-1 | top-5 | gate recall | top-1 true route | " \
        "top-1 shuffled branches | busiest branch | " \
        "MMACs/img | params (M) | " + " | ".join(f"img/s @{b}" for b in bss) + " |"
    lines = [head, "|" + "---|" * (12 + len(bss))]
    for r in result["rows"]:
        total = r.get("total_epochs", r["epochs"])
        epochs = f"{r['epochs']} ({total})" if total != r["epochs"] else str(r["epochs"])
        family = f"{r['family']} ({r['curve']})" if r.get("curve") else \
            f"repeat of {r['repeat_of']}" if r.get("repeat_of") else r["family"]
        lines.append(f"| {r['name']} | {family} | {r['k'] or '-'} | {epochs} | {r['top1']:.2f} | "
                     f"{r['top5']:.2f} | {_recall(r)} | {_fmt(r.get('true_route_top1'), '.2f', '-')} | "
                     f"{_fmt(r.get('shuffled_top1'), '.2f', '-')} | "
                     f"{_fmt(r.get('busiest_branch'), '.0f', '-')} | {r['macs'] / 1e6:.1f} | "
                     f"{r['params'] / 1e6:.2f} | "
                     + " | ".join(_fmt(r['images_per_s_b' + b], ".0f", "-") for b in bss) + " |")
    lines.append("")
    members = result.get("seed_means", {}).get("members", [])
    if any(len(m["top1_runs"]) > 1 for m in members):
        lines += ["On the means over repeats (each member with its repeats folded in; speeds the median of the "
                  "timed runs):", "", means_table(members, bss)]
    if any(r.get("subtask_recall") is not None for r in result["rows"]):
        lines.append("- Gate recall: a HydraNet gate's recall@k of the true subtask; in parentheses, for a dense network, "
                     "recall@1 of the subtask its summed class probabilities pick (a gate as good as the whole network)")
    if any(r.get("true_route_top1") is not None for r in result["rows"]):
        lines.append("- Top-1 true route: a HydraNet's top-1 when each image's true subtask is among its k branches "
                     "(a perfect gate); far above top-1 means routing errors cost most, near it that the branches do")
        lines.append("- Busiest branch: the share of test images (%) that run the most used branch; with B branches and "
                     "top-k, balanced routing gives 100 k/B, 100 means every image runs that branch (collapsed routing)")
    if any(r.get("shuffled_top1") is not None for r in result["rows"]):
        lines.append("- Top-1 shuffled branches: a HydraNet's top-1 when each chosen branch is replaced by the next "
                     "one (b -> b+1 mod B), gate weights unchanged; near top-1 means the branches are interchangeable "
                     "and routing adds nothing")
    n = result.get("test_images")
    if n:
        lines.append(_noise_line(result))
    lines += _comparison_lines(result, bss, "the baseline family", test_images=n)
    for group, comp in result.get("vs_check_families", {}).items():
        members = ", ".join(r["name"] for r in result["rows"] if r["family"] == "check" and r.get("curve") == group)
        lines.append(f"- Against the check family {group} ({members}) instead of the baselines:")
        lines += ["  " + line for line in _comparison_lines(comp, bss, group)]
    for group in result.get("ablation_families", {}):  # e.g. a dense control of the HydraNets' own shape
        members = ", ".join(r["name"] for r in result["rows"] if r["family"] == "ablation" and r.get("curve") == group)
        lines += _ablation_family_lines(result, group, f"{group} ({members})", bss, n)
    if result.get("seed_means"):
        lines += _seed_lines(result["seed_means"], bss, n)
    for added in result.get("added_untimed", []):
        on = f", {describe(added['machine'])}" if "machine" in added else ""
        lines.append(f"- Added later without timing (--add-repeats; torch {added['torch']}, {added['device']}{on}): "
                     f"{', '.join(added['names'])}: their top-1 counts in the means over repeats, whose speeds are "
                     "those of the timed runs")
    if result.get("not_run"):
        lines.append(f"- Not trained, so not in the table: {', '.join(result['not_run'])}")
    if result.get("missing_members"):
        lines.append(f"- **Family members not trained** (the families are compared without them): "
                     f"{', '.join(result['missing_members'])}")
    if len(result.get("trained_precisions", {})) > 1:
        lines.append(f"- **Trained in different precisions** ({precision_list(result['trained_precisions'])}): "
                     "the families' training differs by more than the recipe")
    timed = {True: ", timed with batch norms folded", False: ", timed as trained (batch norms not folded)"}
    trained = list(result.get("trained_precisions", {}))
    precision = result["precision"] if trained in ([], [result["precision"]]) else \
        f"evaluated in {result['precision']} (trained in {', '.join(trained)})"
    on = f" ({describe(result['machine'])})" if "machine" in result else ""
    lines.append(f"- {result['dataset']} ({result['classes']} classes), {result['device']}{on}, {precision}, "
                 f"torch {result['torch']}, {result['threads']} threads{timed.get(result.get('fold_batchnorms'), '')}")
    return "\n".join(lines) + "\n"

