"""The families compared: Pareto frontiers, the iso-accuracy saving and equal-cost gain (in MACs and in measured
time), the means over repeats, where the dense curve levels off, and how far the saving there hangs on the seeds."""
from __future__ import annotations

import math

import numpy as np

def _interp(x: float, xs: list[float], ys: list[float]) -> float | None:
    """Linear interpolation on a curve sorted by xs; None outside its range."""
    if not xs or x < xs[0] - 1e-9 or x > xs[-1] + 1e-9:
        return None
    return float(np.interp(x, xs, ys))


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The best top-1 reachable at each cost: sorted by cost, accuracy made non-decreasing."""
    out, best = [], -1.0
    for cost, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            out.append((cost, acc))
            best = acc
    return out


def compare_families(baseline: list[tuple[float, float]], hydra: list[tuple[float, float]]) -> dict:
    """Iso-accuracy saving at the baseline's best top-1 and the mean equal-cost gain over the shared range.

    Points are (cost, top1); cost is MACs/image or seconds/image. Curves are the Pareto frontiers.
    """
    b, h = frontier(baseline), frontier(hydra)
    best_cost, best_acc = b[-1]
    h_acc = [a for _, a in h]
    h_cost_at = _cost_to_reach(best_acc, h)
    along = [{"top1": a, "cost": c, "hydra_cost": hc, "saving": c / hc if hc else None,
              "at_least": hc is not None and a < h_acc[0]} for c, a in b for hc in [_cost_to_reach(a, h)]]
    lo, hi = max(b[0][0], h[0][0]), min(b[-1][0], h[-1][0])
    gains = []
    if lo <= hi:
        for c in np.linspace(lo, hi, 25):
            gains.append(_interp(c, [x for x, _ in h], h_acc) - _interp(c, [x for x, _ in b], [a for _, a in b]))
    return {"baseline_best_top1": best_acc, "baseline_best_cost": best_cost,
            "hydra_cost_at_that_top1": h_cost_at,
            "iso_accuracy_saving": best_cost / h_cost_at if h_cost_at else None,
            "iso_accuracy_at_least": h_cost_at is not None and best_acc < h_acc[0],  # cheapest HydraNet above it
            "equal_cost_gain_mean": float(np.mean(gains)) if gains else None,
            "equal_cost_gain_max": float(np.max(gains)) if gains else None,
            "shared_cost_range": [lo, hi] if lo <= hi else None,
            "saving_along_baseline": along}


def _cost_to_reach(acc: float, h: list[tuple[float, float]]) -> float | None:
    """The cost at which frontier ``h`` first reaches top-1 ``acc`` (its cheapest point if that is already above)."""
    h_acc = [a for _, a in h]
    if not h_acc or h_acc[-1] < acc:
        return None
    return _interp(acc, h_acc, [c for c, _ in h]) if h_acc[0] <= acc else h[0][0]


def compare_rows(result: dict) -> dict:
    """``result`` (its evaluated ``rows`` and what they were measured on) with the families compared: the HydraNets
    against the baselines, the check and ablation families, and on the means over repeats."""
    result = {k: v for k, v in result.items() if k not in ("macs", "seed_means") and not k.startswith("time_b")}
    rows = result["rows"]
    hydra = [r for r in rows if r["family"] == "hydranet"]
    baseline = [r for r in rows if r["family"] == "baseline"]
    result.update(_compare(baseline, hydra))
    result["vs_check_families"] = {name: _compare(members, hydra) for name, members in _curves(rows, "check").items()}
    ablations = _curves(rows, "ablation")
    result["ablation_families"] = {name: _compare(baseline, members) for name, members in ablations.items()}
    result["vs_ablation_families"] = {name: _compare(members, hydra) for name, members in ablations.items()}
    if any(r["family"] == "repeat" for r in rows):
        means = seed_means(rows)
        keep = ("name", "family", "curve", "macs", "top1", "top1_runs", "top1_sd")
        mean_base = [m for m in means if m["family"] == "baseline"]
        mean_hydra = [m for m in means if m["family"] == "hydranet"]
        mean_ablations = _curves(means, "ablation")
        result["seed_means"] = {"members": [{k: m[k] for k in m if k in keep or k.startswith("images_per_s_b")}
                                            for m in means],
                                **_compare(mean_base, mean_hydra),
                                "ablation_families": {n: _compare(mean_base, g) for n, g in mean_ablations.items()},
                                "vs_ablation_families": {n: _compare(g, mean_hydra) for n, g in mean_ablations.items()}}
        if result.get("test_images"):
            result["seed_means"]["seed_noise"] = seed_noise(means, result["test_images"])
    return result


def trained_precisions(rows: list[dict]) -> dict[str, list[str]]:
    """The names of the models trained in each precision (``auto`` resolves per machine, so a protocol trained on
    two machines can hold both)."""
    out: dict[str, list[str]] = {}
    for r in rows:
        if r.get("train_precision"):
            out.setdefault(r["train_precision"], []).append(r["name"])
    return out


def seed_means(rows: list[dict]) -> list[dict]:
    """Each baseline, HydraNet and ablation-family row with its evaluated repeats folded in: top-1 the mean over
    the runs (``top1_runs``, member first; ``top1_sd`` their sample standard deviation), images/s the median of the
    timed ones."""
    out = []
    for r in rows:
        if r["family"] not in ("baseline", "hydranet") and not (r["family"] == "ablation" and r.get("curve")):
            continue
        group = [r] + [x for x in rows if x.get("repeat_of") == r["name"]]
        runs = [g["top1"] for g in group]
        mean = dict(r, top1=float(np.mean(runs)), top1_runs=runs,
                    top1_sd=float(np.std(runs, ddof=1)) if len(runs) > 1 else None)
        for key in (k for k in r if k.startswith("images_per_s_b")):  # runs added untimed hold None
            timed = [g[key] for g in group if g[key] is not None]
            mean[key] = float(np.median(timed)) if timed else None
        out.append(mean)
    return out


def _curves(rows: list[dict], family: str) -> dict[str, list[dict]]:
    """Rows of one family grouped by their entry's ``family`` name, where a group has at least two members."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["family"] == family and r.get("curve"):
            groups.setdefault(r["curve"], []).append(r)
    return {name: members for name, members in sorted(groups.items()) if len(members) >= 2}


def _compare(baseline: list[dict], hydra: list[dict]) -> dict:
    """compare_families in counted MACs and in the measured time of every batch size the rows carry."""
    out = {"macs": compare_families([(r["macs"], r["top1"]) for r in baseline], [(r["macs"], r["top1"]) for r in hydra])}
    for key in (k for k in hydra[0] if k.startswith("images_per_s_b")
                and all(r.get(k) is not None for r in baseline + hydra)):  # runs added untimed hold None
        out[f"time_b{key[len('images_per_s_b'):]}"] = compare_families([(1.0 / r[key], r["top1"]) for r in baseline],
                                                                       [(1.0 / r[key], r["top1"]) for r in hydra])
    return out


def level_off_point(along: list[dict], tolerance: float) -> dict | None:
    """The cheapest point of a baseline frontier (``saving_along_baseline``) within ``tolerance`` points of its best
    top-1: where a flat curve stops rising, so a saving there does not hang on which costly model's noise came out on
    top."""
    if not along:
        return None
    best = along[-1]["top1"]
    return next(p for p in along if p["top1"] >= best - tolerance)


def level_off_savings(comp: dict, test_images: int) -> dict | None:
    """Where the baseline curve of a comparison levels off (``level_off_point`` within one binomial standard error of
    its best top-1): that point's top-1 and MACs, and the saving there in MACs and in each measured time (None where
    the HydraNets do not reach it, or the time curve has no such point)."""
    along = comp["macs"].get("saving_along_baseline", [])
    tolerance = top1_standard_error(comp["macs"]["baseline_best_top1"], test_images)
    point = level_off_point(along, tolerance)
    if point is None:
        return None
    out = {"top1": point["top1"], "cost": point["cost"], "tolerance": tolerance, "is_best": point is along[-1],
           "macs": point["saving"], "at_least": {"macs": point["at_least"]}}
    for key in (k for k in comp if k.startswith("time_b")):
        same = [p for p in comp[key].get("saving_along_baseline", []) if p["top1"] == point["top1"]]
        out[key] = same[0]["saving"] if same else None
        out["at_least"][key] = bool(same) and same[0]["at_least"]
    return out


def pooled_seed_sd(members: list[dict]) -> float | None:
    """The pooled sample standard deviation of top-1 over seeds of the members with repeats (each weighted by its
    runs - 1); None if none has repeats."""
    groups = [m["top1_runs"] for m in members if len(m["top1_runs"]) > 1]
    if not groups:
        return None
    dof = sum(len(g) - 1 for g in groups)
    return math.sqrt(sum((len(g) - 1) * float(np.var(g, ddof=1)) for g in groups) / dof)


def mean_curves(members: list[dict], min_members: int = 3) -> dict[str, list[tuple[float, float, float | None, int]]]:
    """The families on their means, for the means plot: the baselines, the HydraNets and each ablation family with at
    least ``min_members`` members, as points ``(macs, mean top-1, standard error, runs)`` in MACs order. The standard
    error is the family's pooled seed sd / sqrt(runs), the error the seed-noise draws give each mean (None where the
    family has no repeats)."""
    groups: dict[str, list[dict]] = {}
    for m in members:
        name = m["curve"] if m["family"] == "ablation" else m["family"]
        if name:
            groups.setdefault(name, []).append(m)
    out = {}
    for name, ms in groups.items():
        if name not in ("baseline", "hydranet") and len(ms) < min_members:
            continue
        sd = pooled_seed_sd(ms)
        out[name] = [(m["macs"], m["top1"], None if sd is None else sd / math.sqrt(len(m["top1_runs"])),
                      len(m["top1_runs"])) for m in sorted(ms, key=lambda m: m["macs"])]
    return out


def seed_noise(means: list[dict], test_images: int, draws: int = 2000, seed: int = 0, target: float = 2.0,
               time_share: float = 0.8) -> dict | None:
    """How far the saving where the dense curve levels off, on the means over repeats, hangs on the seeds.

    Each draw moves every baseline and HydraNet member's mean by a normal error of its family's pooled seed standard
    deviation / sqrt(its runs), then compares the families again (the level-off point included). Returns the pooled
    sds, each saving's median and 10th / 90th percentiles (a draw whose HydraNets do not reach the level counts as no
    saving, 0), the share of draws in which each is only a lower bound (the cheapest HydraNet already more accurate),
    and the share of draws with at least ``target`` x in MACs, and with that and at least ``time_share``
    of the MACs saving in each measured time. None unless both families have repeats."""
    fams = {f: [m for m in means if m["family"] == f] for f in ("baseline", "hydranet")}
    sds = {f: pooled_seed_sd(ms) for f, ms in fams.items()}
    if None in sds.values():
        return None
    rng = np.random.default_rng(seed)
    got: dict[str, list[float]] = {}
    bound: dict[str, list[bool]] = {}
    for _ in range(draws):
        moved = {f: [dict(m, top1=m["top1"] + rng.normal() * sds[f] / math.sqrt(len(m["top1_runs"]))) for m in ms]
                 for f, ms in fams.items()}
        point = level_off_savings(_compare(moved["baseline"], moved["hydranet"]), test_images)
        for key, value in point.items():
            if key == "macs" or key.startswith("time_b"):
                got.setdefault(key, []).append(value or 0.0)
                bound.setdefault(key, []).append(bool(point.get("at_least", {}).get(key)))
    savings = {k: {"median": float(np.median(v)), "p10": float(np.percentile(v, 10)),
                   "p90": float(np.percentile(v, 90)), "at_least": float(np.mean(bound[k]))} for k, v in got.items()}
    macs = np.array(got["macs"])
    share = {"macs": float(np.mean(macs >= target))}
    for key in (k for k in got if k != "macs"):
        share[key] = float(np.mean((macs >= target) & (np.array(got[key]) >= time_share * macs)))
    return {"draws": draws, "pooled_sd": sds, "savings": savings, "target": target, "time_share": time_share,
            "share_at_target": share}


def top1_standard_error(top1: float, n: int) -> float:
    """One binomial standard error, in points, of a top-1 of ``top1`` % measured on ``n`` test images."""
    p = top1 / 100
    return 100 * math.sqrt(p * (1 - p) / n)

