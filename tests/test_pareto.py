import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from hydranets import HydraError
from hydranets.machine import describe, machine_info
from hydranets.partition import Partition, partition_random
from hydranets.bench.compare import (_compare, compare_families, compare_rows, frontier, level_off_point,
                                     level_off_savings, mean_curves, pooled_seed_sd, seed_noise, top1_standard_error)
from hydranets.bench.protocol import all_entries, load_protocol, model_config, stops_early
from hydranets.bench.results import _seed_noise_line, markdown_table, means_table, write_results
from hydranets.bench.run import evaluate_protocol, run_protocol

REPO = Path(__file__).resolve().parents[1]


def test_frontier_keeps_only_improving_points():
    assert frontier([(3, 50), (1, 40), (2, 39), (4, 60)]) == [(1, 40), (3, 50), (4, 60)]
    assert frontier([(1, 50), (1, 60), (2, 70)]) == [(1, 60), (2, 70)]  # at equal cost only the better one


def test_compare_families_by_hand():
    baseline = [(40.0, 30.0), (80.0, 34.0)]
    hydra = [(20.0, 30.0), (40.0, 36.0)]
    r = compare_families(baseline, hydra)
    # HydraNet reaches the baseline's best (34%) at 20 + 20 * (34 - 30) / (36 - 30) = 33.33
    assert r["hydra_cost_at_that_top1"] == pytest.approx(20 + 20 * 4 / 6)
    assert r["iso_accuracy_saving"] == pytest.approx(80 / (20 + 20 * 4 / 6))
    # shared range is exactly 40: hydra 36 vs baseline 30
    assert r["shared_cost_range"] == [40.0, 40.0]
    assert r["equal_cost_gain_mean"] == pytest.approx(6.0)


def test_saving_along_the_baseline_curve_by_hand():
    baseline = [(10.0, 20.0), (40.0, 30.0), (80.0, 34.0), (160.0, 40.0)]
    hydra = [(20.0, 24.0), (40.0, 36.0)]
    along = compare_families(baseline, hydra)["saving_along_baseline"]
    assert [p["top1"] for p in along] == [20.0, 30.0, 34.0, 40.0]
    assert along[0]["hydra_cost"] == 20.0 and along[0]["at_least"]  # its cheapest member is already better
    assert along[0]["saving"] == pytest.approx(10 / 20)
    assert along[1]["hydra_cost"] == pytest.approx(30.0) and not along[1]["at_least"]  # 20 + 20 * 6 / 12
    assert along[1]["saving"] == pytest.approx(40 / 30)
    assert along[2]["saving"] == pytest.approx(80 / (20 + 20 * 10 / 12))
    assert along[3]["hydra_cost"] is None and along[3]["saving"] is None  # never reached
    assert along[2]["saving"] == compare_families(baseline[:3], hydra)["iso_accuracy_saving"]


def test_a_saving_met_by_the_cheapest_hydranet_is_reported_as_a_lower_bound():
    rows = [{"name": n, "family": f, "k": None, "epochs": 5, "top1": a, "top5": 50.0, "gate_recall": None,
             "macs": c, "params": 1e5} for n, f, c, a in
            [("b1", "baseline", 40e6, 30.0), ("b2", "baseline", 80e6, 34.0), ("h1", "hydranet", 20e6, 35.0)]]
    comp = compare_families([(40e6, 30.0), (80e6, 34.0)], [(20e6, 35.0)])
    assert comp["iso_accuracy_at_least"] and comp["iso_accuracy_saving"] == pytest.approx(4.0)
    assert not compare_families([(40.0, 30.0), (80.0, 34.0)], [(20.0, 30.0), (40.0, 36.0)])["iso_accuracy_at_least"]
    md = markdown_table({"rows": rows, "macs": comp, "dataset": "synthetic", "classes": 10, "device": "cpu",
                         "precision": "fp32", "torch": "x", "threads": 1})
    assert "(34.00%): >=4.00x (>=: its cheapest member is already more accurate)" in md


def test_compare_families_reports_a_miss():
    r = compare_families([(40.0, 30.0), (80.0, 34.0)], [(20.0, 25.0), (60.0, 31.0)])
    assert r["iso_accuracy_saving"] is None and r["hydra_cost_at_that_top1"] is None
    # over the shared costs [40, 60] the HydraNets' top-1 minus the baseline's is 25 + 0.15 (c - 20) - 30 - 0.1 (c - 40)
    # = 0.05 c - 4: from -2 at 40 to -1 at 60, -1.5 on average
    assert r["shared_cost_range"] == [40.0, 60.0]
    assert r["equal_cost_gain_mean"] == pytest.approx(-1.5)
    assert r["equal_cost_gain_max"] == pytest.approx(-1.0)


def test_markdown_reports_a_miss_as_not_reached():
    row = lambda name, family, macs, top1: {"name": name, "family": family, "k": None, "epochs": 5,  # noqa: E731
                                            "top1": top1, "top5": 50.0, "gate_recall": None, "macs": macs,
                                            "params": 1e5, "images_per_s_b1": 1e9 / macs}
    rows = [row("b1", "baseline", 40e6, 30.0), row("b2", "baseline", 80e6, 34.0),
            row("h1", "hydranet", 20e6, 25.0), row("h2", "hydranet", 60e6, 31.0)]
    comp = compare_families([(r["macs"], r["top1"]) for r in rows[:2]], [(r["macs"], r["top1"]) for r in rows[2:]])
    md = markdown_table({"rows": rows, "macs": comp, "time_b1": comp, "dataset": "synthetic", "classes": 10,
                         "device": "cpu", "precision": "fp32", "torch": "x", "threads": 1})
    assert "(34.00%): n/a (the HydraNet family does not reach it)" in md
    assert "batch 1: iso-accuracy saving n/a," in md and "n/ax" not in md
    # the HydraNet curve reaches 30% at 20 + 40 * 5 / 6 = 53.3M MACs: 40 / 53.3 = 0.75x; 34% never
    assert "along the dense curve, at each of its points' top-1: 30.00% 0.75x, 34.00% n/a\n" in md
    assert "Noise" not in md  # results written before the test-set size was recorded
    md = markdown_table({"rows": rows, "macs": comp, "time_b1": comp, "dataset": "synthetic", "classes": 10,
                         "device": "cpu", "precision": "fp32", "torch": "x", "threads": 1, "test_images": 2500})
    # mean top-1 30%: sqrt(0.3 * 0.7 / 2500) = 0.917 points; a difference needs 2 * sqrt(2) of that
    assert "on 2500 test images one standard error of a top-1 near 30% is 0.92 points" in md
    assert "beyond about 2.6 points (on one shared test set" in md
    rows.append(row("oracle", "ablation", 70e6, 90.0))  # ablations do not move the level the noise is quoted at
    md = markdown_table({"rows": rows, "macs": comp, "time_b1": comp, "dataset": "synthetic", "classes": 10,
                         "device": "cpu", "precision": "fp32", "torch": "x", "threads": 1, "test_images": 2500})
    assert "near 30% is 0.92 points" in md


def test_saving_where_a_flat_dense_curve_levels_off():
    # dense curve flat from 80M: 34.0 / 34.1 / 34.2%; on 2500 test images one standard error at 34.2% is
    # sqrt(0.342 * 0.658 / 2500) = 0.949 points, so 34.0% at 80M is where it levels off
    row = lambda name, family, macs, top1: {"name": name, "family": family, "k": None, "epochs": 5,  # noqa: E731
                                            "top1": top1, "top5": 50.0, "gate_recall": None, "macs": macs,
                                            "params": 1e5, "images_per_s_b1": 2e9 / macs}
    rows = [row("b1", "baseline", 40e6, 30.0), row("b2", "baseline", 80e6, 34.0), row("b3", "baseline", 160e6, 34.1),
            row("b4", "baseline", 320e6, 34.2), row("h1", "hydranet", 20e6, 30.0), row("h2", "hydranet", 60e6, 36.0)]
    pts = lambda key, f: [(key(r), r["top1"]) for r in rows if r["family"] == f]  # noqa: E731
    comp = {"macs": compare_families(pts(lambda r: r["macs"], "baseline"), pts(lambda r: r["macs"], "hydranet")),
            "time_b1": compare_families(pts(lambda r: 1 / r["images_per_s_b1"], "baseline"),
                                        pts(lambda r: 1 / r["images_per_s_b1"], "hydranet"))}
    along = comp["macs"]["saving_along_baseline"]
    assert level_off_point(along, 0.949)["top1"] == 34.0
    assert level_off_point(along, 0.1)["top1"] == 34.1
    assert level_off_point(along, 0.05) is along[-1]
    # the HydraNets reach 34.2% at 20 + 40 * 4.2 / 6 = 48M (6.67x), 34.0% at 46.67M: 80 / 46.67 = 1.71x
    assert comp["macs"]["iso_accuracy_saving"] == pytest.approx(320 / 48)
    md = markdown_table({"rows": rows, **comp, "dataset": "synthetic", "classes": 10, "device": "cpu",
                         "precision": "fp32", "torch": "x", "threads": 1, "test_images": 2500})
    assert ("- Where the dense curve levels off (its cheapest point within one standard error, 0.95 points, of its best "
            "top-1: 34.00% at 80.0M MACs): iso-accuracy saving 1.71x in MACs, 1.71x in batch-1 time\n") in md
    md = markdown_table({"rows": rows, **comp, "dataset": "synthetic", "classes": 10, "device": "cpu",
                         "precision": "fp32", "torch": "x", "threads": 1, "test_images": 10 ** 7})
    assert "levels off" not in md  # with a tiny standard error the best point is where it levels off


def _mean_row(name: str, family: str, macs: float, runs: list[float]) -> dict:
    """A member's mean over its runs, as ``seed_means`` gives it (images/s in proportion to 1 / MACs)."""
    return {"name": name, "family": family, "macs": macs, "top1": sum(runs) / len(runs), "top1_runs": runs,
            "images_per_s_b256": 2e9 / macs}


def test_pooled_seed_sd_by_hand():
    members = [_mean_row("a", "baseline", 1e6, [30.0, 32.0]), _mean_row("b", "baseline", 2e6, [33.0, 34.0, 35.0]),
               _mean_row("c", "baseline", 3e6, [40.0])]
    # variances 2 (1 dof) and 1 (2 dof): (2 + 2) / 3
    assert pooled_seed_sd(members) == pytest.approx((4 / 3) ** 0.5)
    assert pooled_seed_sd(members[2:]) is None


def test_seed_noise_without_spread_is_the_level_off_saving():
    runs = {"b1": (40e6, 30.0), "b2": (80e6, 34.0), "b3": (160e6, 34.1), "b4": (320e6, 34.2), "h1": (20e6, 30.0),
            "h2": (60e6, 36.0)}
    means = [_mean_row(n, "baseline" if n[0] == "b" else "hydranet", macs, [t, t]) for n, (macs, t) in runs.items()]
    noise = seed_noise(means, 2500, draws=50)
    point = level_off_savings(_compare([m for m in means if m["family"] == "baseline"],
                                       [m for m in means if m["family"] == "hydranet"]), 2500)
    assert (point["top1"], point["macs"]) == (34.0, pytest.approx(80 / (20 + 40 * 4 / 6)))  # 1.71x, as by hand above
    assert noise["pooled_sd"] == {"baseline": 0.0, "hydranet": 0.0}
    for q in ("median", "p10", "p90"):
        assert noise["savings"]["macs"][q] == pytest.approx(point["macs"])
        assert noise["savings"]["time_b256"][q] == pytest.approx(point["time_b256"])
    assert noise["share_at_target"] == {"macs": 0.0, "time_b256": 0.0}  # 1.71x < 2x in every draw
    assert seed_noise(means, 2500, draws=50, target=1.5)["share_at_target"] == {"macs": 1.0, "time_b256": 1.0}
    means[0]["top1_runs"] = means[4]["top1_runs"] = [30.0]  # one member of each family with repeats suffices
    assert seed_noise(means, 2500, draws=5) is not None
    means[5]["top1_runs"] = [36.0]  # a family without repeats has no seed spread to draw from
    assert seed_noise(means, 2500) is None


def test_seed_noise_counts_the_draws_whose_saving_is_a_lower_bound():
    """A cheapest HydraNet far above the dense level makes every draw's saving a lower bound; one far below, none."""
    dense = [_mean_row("b1", "baseline", 40e6, [29.0, 29.2]), _mean_row("b2", "baseline", 80e6, [34.0, 34.2]),
             _mean_row("b3", "baseline", 160e6, [34.1, 34.3])]
    above = seed_noise(dense + [_mean_row("h1", "hydranet", 50e6, [44.0, 44.2]),
                                _mean_row("h2", "hydranet", 90e6, [46.0, 46.2])], 5000, draws=100)
    assert {k: v["at_least"] for k, v in above["savings"].items()} == {"macs": 1.0, "time_b256": 1.0}
    assert above["savings"]["macs"]["median"] == pytest.approx(80 / 50)  # the level-off's cost / the cheapest's
    line = _seed_noise_line(above, ["256"])
    assert "in MACs median 1.60x (10-90%: 1.60x to 1.60x; a lower bound in 100% of draws, where the cheapest" in line
    below = seed_noise(dense + [_mean_row("h1", "hydranet", 20e6, [20.0, 20.2]),
                                _mean_row("h2", "hydranet", 90e6, [46.0, 46.2])], 5000, draws=100)
    assert {k: v["at_least"] for k, v in below["savings"].items()} == {"macs": 0.0, "time_b256": 0.0}
    assert "lower bound" not in _seed_noise_line(below, ["256"])


def test_seed_noise_spreads_the_saving_and_is_reproducible():
    # a flat dense curve (runs 2 points apart) and HydraNets far cheaper at every level (runs 1 point apart)
    means = [_mean_row("b1", "baseline", 40e6, [29.0, 31.0]), _mean_row("b2", "baseline", 80e6, [33.0, 35.0]),
             _mean_row("b3", "baseline", 160e6, [34.0, 35.0]), _mean_row("h1", "hydranet", 10e6, [29.5, 30.5]),
             _mean_row("h2", "hydranet", 20e6, [37.5, 38.5])]
    noise = seed_noise(means, 5000, draws=400, seed=3)
    assert noise["pooled_sd"]["baseline"] == pytest.approx(((2 + 2 + 0.5) / 3) ** 0.5)  # variances 2, 2, 0.5
    assert noise["pooled_sd"]["hydranet"] == pytest.approx(0.5 ** 0.5)
    s = noise["savings"]["macs"]
    assert s["p10"] < s["median"] < s["p90"]
    assert noise["share_at_target"]["macs"] == 1.0  # the HydraNets reach the dense top-1 by 20M: >= 4x everywhere
    assert noise == seed_noise(means, 5000, draws=400, seed=3)
    assert noise != seed_noise(means, 5000, draws=400, seed=4)


def test_means_table_rows():
    members = [dict(_mean_row("b1", "baseline", 40e6, [31.0, 33.0, 32.0]), curve=None, top1_sd=1.0),
               dict(_mean_row("a1", "ablation", 35.06e6, [32.5]), curve="one-branch", top1_sd=None,
                    images_per_s_b256=None)]
    table = means_table(members, ["256"]).splitlines()
    assert table[0] == "| member | family | runs | top-1 mean | sd | MMACs/img | img/s @256 |"
    assert table[2] == "| b1 | baseline | 3 | 32.00 | 1.00 | 40.0 | 50 |"
    assert table[3] == "| a1 | ablation (one-branch) | 1 | 32.50 | - | 35.1 | - |"  # untimed, one run


def test_mean_curves_by_hand():
    members = [_mean_row("b2", "baseline", 2e6, [33.0, 34.0, 35.0]), _mean_row("b1", "baseline", 1e6, [30.0, 32.0]),
               _mean_row("b3", "baseline", 3e6, [40.0]), _mean_row("h1", "hydranet", 1.5e6, [36.0]),
               _mean_row("c1", "ablation", 1.5e6, [37.0, 38.0]), _mean_row("c2", "ablation", 2.5e6, [39.0]),
               _mean_row("r1", "ablation", 1.5e6, [35.0, 36.0])]
    for m in members:
        m["curve"] = {"c": "control", "r": "random"}.get(m["name"][0]) if m["family"] == "ablation" else None
    members[-1]["curve"] = None  # an ablation outside any family
    sd = (4 / 3) ** 0.5  # variances 2 (1 dof) and 1 (2 dof), as pooled_seed_sd by hand
    curves = mean_curves(members)
    assert set(curves) == {"baseline", "hydranet"}  # the two-member control is below min_members
    assert curves["baseline"] == [(1e6, 31.0, pytest.approx(sd / 2 ** 0.5), 2), (2e6, 34.0, pytest.approx(sd / 3 ** 0.5), 3),
                                  (3e6, 40.0, pytest.approx(sd), 1)]  # in MACs order; one run: the family's sd
    assert curves["hydranet"] == [(1.5e6, 36.0, None, 1)]  # no repeats, no error
    assert mean_curves(members, min_members=2)["control"] == [(1.5e6, 37.5, pytest.approx(0.5 ** 0.5 / 2 ** 0.5), 2),
                                                               (2.5e6, 39.0, pytest.approx(0.5 ** 0.5), 1)]


def test_top1_standard_error_is_binomial():
    assert top1_standard_error(50.0, 10_000) == pytest.approx(0.5)
    assert top1_standard_error(10.0, 100) == pytest.approx(3.0)


@pytest.mark.parametrize("name", ["tin100-cpu", "tin200-gpu", "cifar100-gpu"])
def test_shipped_protocols_are_valid(name):
    proto = load_protocol(REPO / "configs" / "bench" / f"{name}.yaml")
    assert len(proto["baselines"]) >= 4 and len(proto["hydranets"]) >= 4


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "bench").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_entry_of_a_shipped_protocol_builds(path):
    """Each entry's config is valid, names a run it starts from that exists, and its model builds and runs."""
    from hydranets.train import build_model, model_info
    proto = load_protocol(path)
    entries = all_entries(proto)
    names = {e["name"] for e in entries}
    for entry in entries:
        cfg = model_config(proto, entry)
        source = entry.get("hydra", {}).get("init_from")
        assert source in (None, "baseline") or source.partition("@")[0] in names, (entry["name"], source)
        cfg.hydra.enabled = "hydra" in entry
        model = build_model(model_info(cfg, 100, 3), topk=cfg.hydra.topk if cfg.hydra.enabled else 1)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_stops_early_reads_the_schedule():
    assert stops_early({"train": {"epochs": 2}, "optim": {"schedule_epochs": 15}})
    assert not stops_early({"train": {"epochs": 13}, "optim": {"schedule_epochs": 15, "schedule_start": 2}})
    assert not stops_early({"train": {"epochs": 15}, "optim": {"schedule_epochs": None}})
    assert stops_early({"train": {"epochs": 4}, "optim": {"schedule_epochs": 15, "schedule_start": 7}})


def test_plot_leaves_out_checks_that_stop_partway(tmp_path, monkeypatch):
    import hydranets.bench.results as P
    import hydranets.report as R
    drawn = {}
    monkeypatch.setattr(R, "plot_pareto", lambda families, path, **kw: drawn.update(families))
    monkeypatch.setattr(P, "markdown_table", lambda result: "")
    row = lambda name, family, macs, top1, partial=False: {"name": name, "family": family, "macs": macs, "top1": top1,
                                                           "epochs": 2 if partial else 15, "partial_schedule": partial}
    rows = [row("b1", "baseline", 1e6, 30.0), row("h1", "hydranet", 2e6, 31.0), row("long", "check", 1e6, 32.0),
            row("b1-e2", "check", 1e6, 12.0, partial=True)]
    write_results({"protocol": "x", "rows": rows}, tmp_path)
    assert set(drawn) == {"baseline", "hydranet", "long (check, 15 epochs)"}
    assert drawn["long (check, 15 epochs)"] == [(1e6, 32.0, "")]


def test_protocols_sharing_a_run_folder_agree_on_its_runs():
    """Shipped protocols with one ``out`` train the same run folder under the same name: its settings must match, or
    whichever protocol trained it first would decide what the other evaluates."""
    by_folder: dict[str, dict[str, tuple[str, dict]]] = {}
    shared = 0
    for path in sorted((REPO / "configs" / "bench").glob("*.yaml")):
        proto = load_protocol(path)
        runs = by_folder.setdefault(str(proto["out"]), {})
        for entry in all_entries(proto):
            cfg = model_config(proto, entry).to_dict()
            if entry["name"] in runs:
                shared += 1
                assert cfg == runs[entry["name"]][1], (entry["name"], path.stem, runs[entry["name"]][0])
            else:
                runs[entry["name"]] = (path.stem, cfg)
    assert shared > 0


@pytest.mark.parametrize("source,keep,words", [
    ("c1@2", [1], "starts from 'c1@2', but 'c1' does not keep that epoch; add 2 to its train.keep_epochs"),
    ("c9", [], "starts from 'c9', which is neither an entry of the protocol nor an existing run folder"),
    ("c1@x", [], "the part after '@' must be an epoch number, e.g. c1@7"),
    ("c1", [], "entry 'h' distils from 'c8', which is neither an entry of the protocol nor an existing run folder"),
])
def test_protocol_with_a_bad_start_is_refused(tmp_path, source, keep, words):
    teacher = {"distill": {"teacher": "c8", "weight": 0.5}} if "distils" in words else {}
    proto = {"protocol": "x", "base": {}, "partition_from": "c1", "baselines": [],
             "hydranets": [{"name": "h", "hydra": {"init_from": source}, **teacher}],
             "checks": [{"name": "c1", "train": {"epochs": 2, "keep_epochs": keep}}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(proto))
    with pytest.raises(HydraError, match=re.escape(words)):
        load_protocol(tmp_path / "p.yaml")


def test_partition_from_an_epoch_the_baseline_does_not_keep_is_refused(tmp_path):
    proto = {"protocol": "x", "base": {}, "partition_from": "b@3", "hydranets": [],
             "baselines": [{"name": "b", "train": {"epochs": 4, "keep_epochs": [2]}}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(proto))
    with pytest.raises(HydraError, match=re.escape("partition_from 'b@3', but 'b' does not keep that epoch; "
                                                   "add 3 to its train.keep_epochs")):
        load_protocol(tmp_path / "p.yaml")
    proto["baselines"][0]["train"]["keep_epochs"] = [3]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(proto))
    assert load_protocol(tmp_path / "p.yaml")["partition_from"] == "b@3"


def test_protocol_with_unknown_key_is_refused(tmp_path):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"protocol": "x", "base": {}, "baselines": [],
                                                     "hydranets": [], "partition_from": "a", "extra": 1}))
    with pytest.raises(HydraError, match="unknown key 'extra'"):
        load_protocol(tmp_path / "p.yaml")
    (tmp_path / "q.yaml").write_text(yaml.safe_dump({"protocol": "x", "base": {}, "partition_from": "a",
                                                     "baselines": [{"name": "a", "train": {"epoch": 1}}],
                                                     "hydranets": []}))
    with pytest.raises(HydraError, match="train.epoch"):
        load_protocol(tmp_path / "q.yaml")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"protocol": "x", "base": {}, "partition_from": "a",
                                                     "baselines": [{"name": "a", "family": "f"}], "hydranets": []}))
    with pytest.raises(HydraError, match="entry 'a' has a 'family'; only checks and ablations take one"):
        load_protocol(tmp_path / "r.yaml")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"protocol": "x", "base": {}, "partition_from": "a",
                                                     "baselines": [{"name": "a"}], "hydranets": [],
                                                     "checks": [{"name": "c", "hydra": {"topk": 1}}]}))
    with pytest.raises(HydraError, match="entry 'c' has hydra settings but is not a HydraNet"):
        load_protocol(tmp_path / "s.yaml")  # it would train a dense network without a word
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"protocol": "x", "base": {}, "partition_from": "a",
                                                     "baselines": [{"name": "a"}], "hydranets": [],
                                                     "fold_batchnorms": "yes"}))
    with pytest.raises(HydraError, match="fold_batchnorms must be true or false, got 'yes'"):
        load_protocol(tmp_path / "t.yaml")


def test_repeats_take_their_members_settings(tmp_path):
    member = {"name": "h", "model": {"name": "resnet20"}, "train": {"epochs": 3, "seed": 0},
              "hydra": {"num_branches": 4, "topk": 1, "branch_width": 0.5}}
    proto = {"protocol": "x", "base": {}, "partition_from": "b", "baselines": [{"name": "b"}], "hydranets": [member],
             "checks": [{"name": "c"}], "ablations": [{"name": "a", "hydra": {"topk": 1}},
                                                      {"name": "f", "family": "ctl", "hydra": {"num_branches": 1}}],
             "repeats": [{"name": "h-s1", "repeat_of": "h", "train": {"seed": 1}, "hydra": {"topk": 2}},
                         {"name": "f-s1", "repeat_of": "f", "train": {"seed": 1}}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(proto))
    loaded = load_protocol(tmp_path / "p.yaml")
    cfg, rep = model_config(loaded, loaded["hydranets"][0]), model_config(loaded, loaded["repeats"][0])
    assert (rep.train.seed, rep.train.epochs, rep.hydra.topk, rep.hydra.num_branches) == (1, 3, 2, 4)
    assert (cfg.train.seed, cfg.hydra.topk) == (0, 1) and rep.out.endswith("h-s1")
    assert [e["name"] for e in all_entries(loaded)][-2:] == ["h-s1", "f-s1"]
    ctl = loaded["repeats"][1]  # a repeat of an ablation family's member: its settings, not its place on the curve
    assert "family" not in ctl and ctl["repeat_of"] == "f" and model_config(loaded, ctl).hydra.num_branches == 1
    for bad in ("c", "a", "nope"):  # only family members have repeats (a lone ablation is no family's member)
        proto["repeats"][0]["repeat_of"] = bad
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(proto))
        with pytest.raises(HydraError, match=f"repeat 'h-s1' has repeat_of '{bad}', which is not a baseline, "):
            load_protocol(tmp_path / "p.yaml")


@pytest.mark.slow
def test_small_protocol_end_to_end(tmp_path, capsys):
    tiny = {"name": "resnet_cifar", "kwargs": {"depth": 8, "width": 0.25}}
    proto = {
        "protocol": "smoke", "out": str(tmp_path / "runs"), "partition_from": "b1", "speed_batches": [32],
        "speed_repeats": 2,
        "base": {"data": {"name": "synthetic"}, "train": {"epochs": 1, "batch_size": 32, "progress": False,
                                                            "precision": "fp32", "channels_last": False},
                 "optim": {"lr": 0.05}},
        "baselines": [{"name": "b1", "model": tiny},
                      {"name": "b2", "model": {"name": "resnet_cifar", "kwargs": {"depth": 8, "width": 0.5}}}],
        "hydranets": [{"name": "h1", "model": tiny,
                       "hydra": {"num_branches": 2, "topk": 1, "branch_width": 1.0, "init_from": "baseline"}},
                      {"name": "h2", "model": tiny, "hydra": {"num_branches": 4, "topk": 2, "routing": "soft"}}],
        "ablations": [{"name": "a1", "model": tiny, "partition": {"method": "random"}, "family": "alt",
                       "hydra": {"num_branches": 2, "topk": 1}, "distill": {"teacher": "b2", "weight": 0.5}},
                      {"name": "a3", "model": tiny, "family": "alt",  # upcycled from a check after its epoch 1
                       "hydra": {"num_branches": 2, "topk": 1, "branch_width": 1.0, "init_from": "c1@1"}},
                      {"name": "a4", "model": tiny,  # a3's two branches copied into four
                       "hydra": {"num_branches": 4, "topk": 1, "branch_width": 1.0, "init_from": "a3"}}],
        "checks": [{"name": "c1", "model": tiny, "train": {"epochs": 2, "keep_epochs": [1]}, "family": "long"},
                   {"name": "c2", "model": {"name": "resnet_cifar", "kwargs": {"depth": 8, "width": 0.5}},
                    "train": {"epochs": 2}, "family": "long"}],
        "repeats": [{"name": "b1-s1", "repeat_of": "b1", "train": {"seed": 1}},
                    {"name": "h1-s1", "repeat_of": "h1", "train": {"seed": 1}},
                    {"name": "a3-s1", "repeat_of": "a3", "train": {"seed": 1}}],
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(proto))
    with pytest.raises(HydraError, match="--only 'h9' is not an entry"):
        run_protocol(load_protocol(tmp_path / "p.yaml"), only=["h9"])
    with pytest.raises(HydraError, match=r"partition_from baseline .*b1 has not finished training"):
        run_protocol(load_protocol(tmp_path / "p.yaml"), only=["h1"])  # its subtasks need b1, which is not trained
    assert not (tmp_path / "runs" / "h1").exists()
    run_protocol(load_protocol(tmp_path / "p.yaml"), only=["b1"])
    assert (tmp_path / "runs" / "b1" / "summary.json").exists() and not (tmp_path / "runs" / "b2").exists()
    with pytest.raises(HydraError, match=r"init_from .*c1 has not reached epoch 1 yet; .*--only c1"):
        run_protocol(load_protocol(tmp_path / "p.yaml"), only=["a3"])
    with pytest.raises(HydraError, match=r"distill.teacher .*b2 has not finished training; .*--only b2"):
        run_protocol(load_protocol(tmp_path / "p.yaml"), only=["a1"])
    assert not (tmp_path / "runs" / "a1").exists()
    result = run_protocol(load_protocol(tmp_path / "p.yaml"))
    err = capsys.readouterr().err
    assert f"stem from {tmp_path / 'runs' / 'b1'}; branches and gate upcycled" in err  # both at full width
    assert f"stem from {tmp_path / 'runs' / 'c1' / 'checkpoints' / 'epoch1.pt'}; branches and gate upcycled" in err
    assert f"every part from {tmp_path / 'runs' / 'a3'}, its branches copied into this one's 4" in err
    progress = [line for line in err.splitlines() if line.startswith("[bench smoke] evaluating") or "timing" in line]
    assert progress == [f"[bench smoke] evaluating {name} on 100 test images" for name in (
        "b1", "b2", "h1", "h2", "a1", "a3", "a4", "c1", "c2", "b1-s1", "h1-s1", "a3-s1")] + [
        "[bench smoke] timing 12 models at batch 32 (median of 2 interleaved runs)"]
    assert [(r["name"], r["family"]) for r in result["rows"]] == [
        ("b1", "baseline"), ("b2", "baseline"), ("h1", "hydranet"), ("h2", "hydranet"), ("a1", "ablation"),
        ("a3", "ablation"), ("a4", "ablation"), ("c1", "check"), ("c2", "check"), ("b1-s1", "repeat"), ("h1-s1", "repeat"),
        ("a3-s1", "repeat")]
    a1_cfg = yaml.safe_load((tmp_path / "runs" / "a1" / "config.yaml").read_text())
    assert a1_cfg["distill"]["teacher"] == str(tmp_path / "runs" / "b2")  # a named entry becomes its run folder
    rep_cfg = yaml.safe_load((tmp_path / "runs" / "h1-s1" / "config.yaml").read_text())
    h1_cfg = yaml.safe_load((tmp_path / "runs" / "h1" / "config.yaml").read_text())
    assert rep_cfg["train"]["seed"] == 1 and h1_cfg["train"]["seed"] != 1
    assert rep_cfg["hydra"] == h1_cfg["hydra"] and rep_cfg["model"] == h1_cfg["model"]  # the member's settings
    top1 = {r["name"]: r["top1"] for r in result["rows"]}
    means = {m["name"]: m for m in result["seed_means"]["members"]}
    assert means["h1"]["top1_runs"] == [top1["h1"], top1["h1-s1"]]
    assert means["h1"]["top1"] == pytest.approx((top1["h1"] + top1["h1-s1"]) / 2)
    assert means["b2"]["top1_runs"] == [top1["b2"]] and means["b2"]["top1_sd"] is None
    mean_pts = lambda fam: [(m["macs"], m["top1"]) for m in means.values() if m["family"] == fam]  # noqa: E731
    assert result["seed_means"]["macs"] == compare_families(mean_pts("baseline"), mean_pts("hydranet"))
    assert next(r for r in result["rows"] if r["name"] == "c1")["epochs"] == 2
    total = {r["name"]: r["total_epochs"] for r in result["rows"]}  # own epochs + those of the run it started from
    assert (total["b1"], total["h1"], total["h2"], total["a3"], total["a4"]) == (1, 2, 1, 2, 3)
    best = max(r["top1"] for r in result["rows"] if r["family"] == "baseline")
    assert result["macs"]["baseline_best_top1"] == best  # checks stay off the baseline curve
    long = [(r["macs"], r["top1"]) for r in result["rows"] if r["curve"] == "long"]
    hydras = [(r["macs"], r["top1"]) for r in result["rows"] if r["family"] == "hydranet"]
    assert result["vs_check_families"]["long"]["macs"] == compare_families(long, hydras)
    assert set(result["vs_check_families"]["long"]) == {"macs", "time_b32"}
    alt = [(r["macs"], r["top1"]) for r in result["rows"] if r["curve"] == "alt"]  # an ablation family: a second
    bases = [(r["macs"], r["top1"]) for r in result["rows"] if r["family"] == "baseline"]  # HydraNet curve
    assert len(alt) == 2 and result["ablation_families"]["alt"]["macs"] == compare_families(bases, alt)
    assert result["vs_ablation_families"]["alt"]["macs"] == compare_families(alt, hydras)  # and the HydraNets against it
    assert means["a3"]["top1_runs"] == [top1["a3"], top1["a3-s1"]] and means["a1"]["top1_runs"] == [top1["a1"]]
    alt_means = [(means[n]["macs"], means[n]["top1"]) for n in ("a1", "a3")]  # the ablation family on its means
    assert result["seed_means"]["ablation_families"]["alt"]["macs"] == compare_families(mean_pts("baseline"), alt_means)
    assert result["seed_means"]["vs_ablation_families"]["alt"]["macs"] == compare_families(alt_means,
                                                                                          mean_pts("hydranet"))
    assert {p.name for p in (tmp_path / "runs").glob("partition_*.json")} == {"partition_kmeans_b2.json",
                                                                              "partition_kmeans_b4.json",
                                                                              "partition_random_b2.json"}
    h1 = next(r for r in result["rows"] if r["name"] == "h1")
    assert h1["k"] == 1 and h1["gate_recall"] is not None and h1["images_per_s_b32"] > 0
    b1 = next(r for r in result["rows"] if r["name"] == "b1")  # dense: its own subtask recall, on h1's subtasks
    assert b1["gate_recall"] is None and 0 <= b1["subtask_recall"] <= 100
    b1_line = next(line for line in markdown_table(result).splitlines() if line.startswith("| b1 |"))
    assert f"| ({b1['subtask_recall']:.1f}) | - | - | - |" in b1_line
    assert b1["true_route_top1"] is None and 0 <= h1["true_route_top1"] <= 100
    h1_line = next(line for line in markdown_table(result).splitlines() if line.startswith("| h1 |"))
    assert 50 <= h1["busiest_branch"] <= 100 and b1["busiest_branch"] is None  # B=2, k=1: at least half the images
    assert b1["shuffled_top1"] is None and 0 <= h1["shuffled_top1"] <= 100
    assert f"| {h1['gate_recall']:.1f} | {h1['true_route_top1']:.2f} | {h1['shuffled_top1']:.2f} | " \
           f"{h1['busiest_branch']:.0f} |" in h1_line
    h2 = next(r for r in result["rows"] if r["name"] == "h2")
    assert 50 <= h2["busiest_branch"] <= 100  # B=4, k=2
    assert compare_rows(result) == result  # the comparisons follow from the rows alone (so repeats can be added)
    proto["ablations"].append({"name": "a2", "model": tiny, "hydra": {"num_branches": 2, "topk": 2}})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(proto))
    partial = evaluate_protocol(load_protocol(tmp_path / "p.yaml"))  # a2 never trained: listed, not evaluated
    assert partial["not_run"] == ["a2"] and [r["name"] for r in partial["rows"]] == [r["name"] for r in result["rows"]]
    assert "Not trained, so not in the table: a2" in markdown_table(partial)
    proto["hydranets"].append({"name": "h3", "model": tiny, "hydra": {"num_branches": 2, "topk": 1}})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(proto))
    partial = evaluate_protocol(load_protocol(tmp_path / "p.yaml"))  # a family member not trained: said loudly
    assert partial["missing_members"] == ["h3"] and "h3" not in [r["name"] for r in partial["rows"]]
    assert partial["macs"] == result["macs"]  # the curves without it
    assert "**Family members not trained** (the families are compared without them): h3" in markdown_table(partial)
    assert "warning: hydranet h3 has not finished training" in capsys.readouterr().err
    proto["hydranets"].pop()
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(proto))
    js, png, md = write_results(result, tmp_path / "results")
    assert png.stat().st_size > 10_000 and "Iso-accuracy saving" in md.read_text()
    assert (png.parent / f"{result['protocol']}-means.png").stat().st_size > 10_000  # with repeats: the means plot
    assert result["fold_batchnorms"] is True and "threads, timed with batch norms folded" in md.read_text()
    assert result["machine"] == machine_info("cpu") and f"cpu ({describe(result['machine'])})," in md.read_text()
    assert "Against the check family long (c1, c2) instead of the baselines:" in md.read_text()
    assert "The ablation family alt (a1, a3) instead of the HydraNets, against the baselines:" in md.read_text()
    assert "  - The HydraNet family against the alt family as the reference curve:\n    - Iso-accuracy saving in MACs " \
           "at the alt family's best top-1" in md.read_text()
    assert "| a1 | ablation (alt) |" in md.read_text() and "| c1 | check (long) |" in md.read_text()
    assert "| h1-s1 | repeat of h1 |" in md.read_text()
    assert f"Repeats: top-1 of each run, first the member's own: b1 {top1['b1']:.2f} / {top1['b1-s1']:.2f}" in md.read_text()
    assert "- On the means over repeats (a member without repeats counts with its one run):" in md.read_text()
    b1_speeds = [r["images_per_s_b32"] for r in result["rows"] if r["name"] in ("b1", "b1-s1")]
    assert f"| b1 | baseline | 2 | {means['b1']['top1']:.2f} | {means['b1']['top1_sd']:.2f} | {b1['macs'] / 1e6:.1f} | " \
           f"{sum(b1_speeds) / 2:.0f} |" in md.read_text()  # the means table: speed the median of the two runs
    assert "  - Seed noise (2000 draws, each member's mean moved by a normal error of its family's pooled seed sd" \
        in md.read_text()
    assert "  - The ablation family alt instead of the HydraNets, against the baselines:\n    - Iso-accuracy saving " \
           "in MACs at the baseline family's best top-1" in md.read_text()
    assert result["trained_precisions"] == {"fp32": [r["name"] for r in result["rows"]]}
    assert "different precisions" not in md.read_text()
    proto["checks"].append({"name": "c3", "model": tiny, "train": {"precision": "bf16"}})  # as on another machine
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(proto))
    run_protocol(load_protocol(tmp_path / "p.yaml"), only=["c3"])
    capsys.readouterr()
    mixed = evaluate_protocol(load_protocol(tmp_path / "p.yaml"))
    assert mixed["trained_precisions"]["bf16"] == ["c3"] and "c3" not in mixed["trained_precisions"]["fp32"]
    assert "warning: the models were trained in different precisions (fp32: b1, b2," in capsys.readouterr().err
    assert "- **Trained in different precisions** (fp32: b1, b2, " in markdown_table(mixed)
    assert "; bf16: c3):" in markdown_table(mixed)
    here = describe(machine_info("cpu"))
    assert f"synthetic (10 classes), cpu ({here}), evaluated in fp32 (trained in fp32, bf16), torch" in markdown_table(mixed)
    assert f"synthetic (10 classes), cpu ({here}), fp32, torch" in md.read_text()
    proto["checks"].pop()
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(proto))
    mtime = (tmp_path / "runs" / "b1" / "summary.json").stat().st_mtime
    run_protocol(load_protocol(tmp_path / "p.yaml"), only_train=True)  # a rerun skips finished runs
    assert (tmp_path / "runs" / "b1" / "summary.json").stat().st_mtime == mtime


@pytest.mark.slow
def test_smoke_run_of_a_gpu_protocol(tmp_path, monkeypatch):
    """--smoke runs a shipped protocol end to end in miniature (here on synthetic data): mid-schedule starts
    from kept epochs included, in its own folder."""
    from hydranets.cli import main
    monkeypatch.chdir(tmp_path)
    path = REPO / "configs" / "bench" / "cifar100-gpu.yaml"
    main(["bench", "pareto", "--config", str(path), "--smoke", "data={name: synthetic, root: null, download: false, "
          "classes: 16}", "train.threads=1"])
    proto = load_protocol(path)
    runs = tmp_path / f"{proto['out']}-smoke"
    assert (runs / "resnet20" / "checkpoints" / "epoch1.pt").exists() and not (tmp_path / proto["out"]).exists()
    result = json.loads((runs / "results" / "cifar100-gpu-smoke.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {e["name"] for e in proto["baselines"] + proto["hydranets"] + proto["ablations"]}
    assert (rows["resnet20"]["epochs"], rows["f20u-r20"]["epochs"], rows["f20u-r20"]["total_epochs"]) == (2, 1, 2)
    assert result["macs"]["baseline_best_top1"] == max(r["top1"] for r in result["rows"] if r["family"] == "baseline")


@pytest.mark.slow
def test_subtasks_from_a_kept_epoch(tmp_path, monkeypatch, capsys):
    """partition_from NAME@N: the subtasks come from the baseline's checkpoint after epoch N, so a HydraNet can
    start half-way through the baseline's schedule (tin100-cpu-long, in miniature)."""
    from hydranets.cli import main
    monkeypatch.chdir(tmp_path)
    path = REPO / "configs" / "bench" / "tin100-cpu-long.yaml"
    proto = load_protocol(path)
    assert proto["partition_from"] == "resnet20-60ep@30"
    argv = ["bench", "pareto", "--config", str(path), "--smoke", "data={name: synthetic, root: null, download: false, "
            "classes: 16}", "train.threads=1", "model.kwargs={width: 0.5}"]
    with pytest.raises(SystemExit) as exit_:  # the HydraNet's subtasks need the baseline's epoch 1, not trained yet
        main(argv + ["--only", "hydra-r20-b8k1-60ep"])
    assert exit_.value.code == 2 and "has not reached epoch 1 yet" in capsys.readouterr().err
    main(argv + ["--only", "resnet20-60ep", "train.seed=3"])  # an override after --only is an override
    runs = tmp_path / f"{proto['out']}-smoke"
    assert "seed: 3" in (runs / "resnet20-60ep" / "config.yaml").read_text()
    (runs / "resnet20-60ep" / "summary.json").unlink()  # not finished: the subtasks must not need it
    main(argv + ["--only", "hydra-r20-b8k1-60ep"])
    meta = json.loads((runs / "partition_kmeans_b8.json").read_text())["meta"]
    assert meta["baseline"] == str(Path(proto["out"] + "-smoke") / "resnet20-60ep" / "checkpoints" / "epoch1.pt")


TINY = {"name": "resnet_cifar", "kwargs": {"depth": 8, "width": 0.25}}


def tiny_protocol(tmp_path: Path, partition_from: str, **entries) -> dict:
    """A protocol of one-epoch ResNet-8s at quarter width on synthetic data: baseline b and HydraNet h (B=2, top-1),
    with ``entries`` (checks, ablations, repeats) beside them."""
    return {"protocol": "x", "out": str(tmp_path / "runs"), "partition_from": partition_from,
            "base": {"data": {"name": "synthetic"}, "train": {"epochs": 1, "batch_size": 32, "progress": False,
                                                              "precision": "fp32", "channels_last": False}},
            "baselines": [{"name": "b", "model": TINY}],
            "hydranets": [{"name": "h", "model": TINY, "hydra": {"num_branches": 2, "topk": 1}}], **entries}


def test_subtasks_from_a_check(tmp_path):
    """partition_from may name a check (tin100-cpu-fork2-e50 takes its subtasks from the 20-epoch run of another
    protocol): it trains before the HydraNets, and the subtasks come from its outputs."""
    proto = tiny_protocol(tmp_path, "c", checks=[{"name": "c", "model": TINY, "train": {"seed": 5}}])
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(proto))
    with pytest.raises(HydraError, match=r"partition_from check .*c has not finished training; .*--only c"):
        run_protocol(load_protocol(tmp_path / "p.yaml"), only=["h"])
    run_protocol(load_protocol(tmp_path / "p.yaml"), only=["c", "h"])
    runs = tmp_path / "runs"
    assert (runs / "c" / "summary.json").exists() and (runs / "h" / "summary.json").exists()
    assert not (runs / "b").exists()
    meta = json.loads((runs / "partition_kmeans_b2.json").read_text())["meta"]
    assert meta["baseline"] == str(runs / "c")
    proto["partition_from"] = "h"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(proto))
    with pytest.raises(HydraError, match=re.escape("partition_from 'h' is neither a baseline, a baseline's repeat nor a "
                                                   "check of the protocol")):
        load_protocol(tmp_path / "p.yaml")


def test_subtasks_from_another_seed_for_one_entry(tmp_path):
    """An entry's own partition_from (here a baseline's repeat: another seed) gives it subtasks from that network, in
    a file of their own, while the other HydraNets keep the protocol's; a source that is no network is refused."""
    proto = tiny_protocol(tmp_path, "b",
                          ablations=[{"name": "a", "family": "other subtasks", "model": TINY, "partition_from": "b-s1",
                                      "hydra": {"num_branches": 2, "topk": 1}}],
                          repeats=[{"name": "b-s1", "repeat_of": "b", "train": {"seed": 1}},
                                   {"name": "a-s1", "repeat_of": "a", "train": {"seed": 1}}])
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump(proto))
    run_protocol(load_protocol(config), only=["b"])
    with pytest.raises(HydraError, match=r"partition_from baseline .*b-s1 has not finished training; .*--only b-s1"):
        run_protocol(load_protocol(config), only=["a"])
    run_protocol(load_protocol(config), only=["b-s1", "h", "a", "a-s1"])
    runs = tmp_path / "runs"
    own, other = runs / "partition_kmeans_b2.json", runs / "partition_kmeans_b2_from-b-s1.json"
    assert json.loads(own.read_text())["meta"]["baseline"] == str(runs / "b")
    assert json.loads(other.read_text())["meta"]["baseline"] == str(runs / "b-s1")
    used = {n: yaml.safe_load((runs / n / "config.yaml").read_text())["hydra"]["partition"] for n in ("h", "a", "a-s1")}
    assert used == {"h": str(own), "a": str(other), "a-s1": str(other)}
    for bad, words in (({"partition_from": "h"}, "partition_from 'h' is neither a baseline, a baseline's repeat nor"),
                       ({"partition_from": "b@1"}, "'b@1', but 'b' does not keep that epoch")):
        config.write_text(yaml.safe_dump({**proto, "ablations": [{**proto["ablations"][0], **bad}]}))
        with pytest.raises(HydraError, match=re.escape(words)):
            load_protocol(config)
    config.write_text(yaml.safe_dump({**proto, "baselines": [{"name": "b", "model": TINY, "partition_from": "b"}]}))
    with pytest.raises(HydraError, match="entry 'b' has a partition_from but is not a HydraNet"):
        load_protocol(config)


def test_overlapping_subtasks_for_one_entry(tmp_path):
    """An entry with ``partition: {overlap: true}`` gets overlapping subtasks (each class in two) in a file of their
    own, the same k-means clusters widened, as does one that spreads them evenly (``overlap_balanced``) and one
    with another partition seed, while the other HydraNets keep the disjoint ones."""
    tiny = {"model": TINY, "hydra": {"num_branches": 3, "topk": 1}}
    proto = tiny_protocol(tmp_path, "b",
                          ablations=[{"name": "o", "partition": {"overlap": True}, **tiny},
                                     {"name": "e", "partition": {"overlap": True, "overlap_balanced": True}, **tiny},
                                     {"name": "r", "partition": {"method": "random", "seed": 4}, **tiny},
                                     {"name": "d", **tiny}])
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(proto))
    run_protocol(load_protocol(tmp_path / "p.yaml"), only=["b", "o", "e", "r", "d"])
    runs = tmp_path / "runs"
    files = {"o": "partition_kmeans_overlap_b3.json", "e": "partition_kmeans_overlap-balanced_b3.json",
             "r": "partition_random_b3_seed4.json", "d": "partition_kmeans_b3.json"}
    used = {n: yaml.safe_load((runs / n / "config.yaml").read_text())["hydra"]["partition"] for n in files}
    assert used == {n: str(runs / f) for n, f in files.items()}
    wide, even, narrow = (Partition.load(runs / files[n]) for n in "oed")
    assert wide.overlap and even.overlap and not narrow.overlap
    for p in (wide, even):
        assert p.membership().sum(1).tolist() == [2.0] * p.num_classes
        assert all(any(set(n) <= set(w) for w in p.subsets) for n in narrow.subsets)
    assert sorted(map(len, even.subsets)) == [6, 7, 7]  # 10 classes: 4/3/3 first members, 4/3/3 second ones
    assert Partition.load(runs / files["r"]).subsets == partition_random(10, 3, seed=4).subsets
    assert torch.equal(torch.load(runs / "o" / "checkpoints" / "last.pt", weights_only=True)["model"]["membership"],
                       wide.membership())


def test_eval_only_keeps_results_of_models_whose_runs_are_absent(tmp_path, capsys):
    """An evaluation in a checkout without some run folders must not replace the results that hold them."""
    from helpers import one_error_line, run_cli
    proto = {"protocol": "x", "out": str(tmp_path / "runs"), "partition_from": "b", "base": {"data": {"name": "synthetic"}},
             "baselines": [{"name": "b"}], "hydranets": [{"name": "h", "hydra": {"num_branches": 2}}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(proto))
    results = tmp_path / "results"
    results.mkdir()
    saved = json.dumps({"rows": [{"name": "b"}, {"name": "h"}, {"name": "old"}]})
    (results / "x.json").write_text(saved)
    (tmp_path / "runs" / "b").mkdir(parents=True)
    (tmp_path / "runs" / "b" / "summary.json").write_text("{}")  # finished: only h and old would be lost
    argv = ("bench", "pareto", "--config", str(tmp_path / "p.yaml"), "--eval-only", "--results", str(results))
    code, _, err = run_cli(capsys, *argv)
    line = one_error_line(err, "x.json holds results of 2 model(s) this evaluation would not have (h, old")
    assert code == 2 and "--replace-results" in line
    assert (results / "x.json").read_text() == saved
    code, _, err = run_cli(capsys, *argv, "--replace-results")  # goes on to evaluate (and fails on the fake run)
    assert code != 0 and "would not have" not in err


def test_a_full_run_checks_the_saved_results_before_training(tmp_path, capsys, monkeypatch):
    """A protocol whose saved results hold a model it no longer has is refused before training and evaluation (the
    refusal came after both, throwing the evaluation away); one that keeps every saved model goes on."""
    import hydranets.bench.run as run_mod
    from helpers import one_error_line, run_cli
    monkeypatch.chdir(tmp_path)
    ran = []
    monkeypatch.setattr(run_mod, "run_protocol", lambda *a, **k: ran.append(1))
    proto = {"protocol": "x", "out": str(tmp_path / "runs"), "partition_from": "b", "base": {},
             "baselines": [{"name": "b"}], "hydranets": [{"name": "h"}]}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(proto))
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "x.json").write_text(json.dumps({"rows": [{"name": "b"}, {"name": "gone"}]}))
    argv = ("bench", "pareto", "--config", str(tmp_path / "p.yaml"), "--results", str(tmp_path / "results"))
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and not ran
    one_error_line(err, "x.json holds results of 1 model(s) this evaluation would not have (gone")
    (tmp_path / "results" / "x.json").write_text(json.dumps({"rows": [{"name": "b"}, {"name": "h"}]}))
    assert run_cli(capsys, *argv)[0] == 0 and ran == [1]
    assert run_cli(capsys, *argv, "--only", "b")[0] == 0 and ran == [1, 1]


@pytest.mark.slow
def test_repeats_added_to_saved_results_without_the_other_runs(tmp_path, capsys):
    """--add-repeats: a seed trained after the evaluation joins the saved results with the top-1 a whole evaluation
    gives it, untimed, in a checkout that lacks the other models' run folders."""
    import shutil

    from helpers import one_error_line, run_cli
    tiny = {"name": "resnet_cifar", "kwargs": {"depth": 8, "width": 0.25}}
    proto = {"protocol": "x", "out": str(tmp_path / "runs"), "partition_from": "b1", "speed_batches": [32],
             "speed_repeats": 1,
             "base": {"data": {"name": "synthetic"}, "train": {"epochs": 1, "batch_size": 32, "progress": False,
                                                               "precision": "fp32", "channels_last": False}},
             "baselines": [{"name": "b1", "model": tiny},
                           {"name": "b2", "model": {"name": "resnet_cifar", "kwargs": {"depth": 8, "width": 0.5}}}],
             "hydranets": [{"name": "h1", "model": tiny, "hydra": {"num_branches": 2, "topk": 1}},
                           {"name": "h2", "model": tiny, "hydra": {"num_branches": 2, "topk": 2}}],
             "repeats": [{"name": "h1-s1", "repeat_of": "h1", "train": {"seed": 1}}]}
    config, results = tmp_path / "p.yaml", tmp_path / "results"
    config.write_text(yaml.safe_dump(proto))
    argv = ("bench", "pareto", "--config", str(config), "--results", str(results))
    code, _, err = run_cli(capsys, *argv, "--add-repeats")
    assert code == 2 and "x.json does not exist; evaluate every model first" in one_error_line(err)
    write_results(run_protocol(load_protocol(config)), results)
    saved = json.loads((results / "x.json").read_text())
    code, _, err = run_cli(capsys, *argv, "--add-repeats")
    assert code == 2 and "no repeat or ablation of protocol x has finished training that" in one_error_line(err)
    proto["repeats"] += [{"name": "b1-s1", "repeat_of": "b1", "train": {"seed": 1}},
                         {"name": "b1-s2", "repeat_of": "b1", "train": {"seed": 2}}]
    config.write_text(yaml.safe_dump(proto))
    run_protocol(load_protocol(config), only=["b1-s1", "b1-s2"])
    whole = {r["name"]: r for r in evaluate_protocol(load_protocol(config))["rows"]}
    for name in ("b2", "h1", "h2", "h1-s1"):  # only the new seeds' runs are here
        shutil.rmtree(tmp_path / "runs" / name)
    code, out, err = run_cli(capsys, *argv, "--add-repeats")
    assert code == 0, err
    added = json.loads((results / "x.json").read_text())
    assert added["rows"][:len(saved["rows"])] == saved["rows"]  # what was measured stays as it was
    new = {r["name"]: r for r in added["rows"][len(saved["rows"]):]}
    assert list(new) == ["b1-s1", "b1-s2"]
    for name, row in new.items():
        same = ("top1", "top5", "macs", "params", "epochs", "subtask_recall", "repeat_of", "family")
        assert {k: row[k] for k in same} == {k: whole[name][k] for k in same}
        assert row["images_per_s_b32"] is None
    means = {m["name"]: m for m in added["seed_means"]["members"]}
    top1 = {r["name"]: r["top1"] for r in added["rows"]}
    assert means["b1"]["top1_runs"] == [top1["b1"], top1["b1-s1"], top1["b1-s2"]]
    assert means["h1"]["top1_runs"] == [top1["h1"], top1["h1-s1"]]
    b1 = next(r for r in saved["rows"] if r["name"] == "b1")
    mean_rows = [dict(r, top1=means[r["name"]]["top1"]) for r in saved["rows"] if r["family"] in ("baseline",
                                                                                                  "hydranet")]
    h1s = [r for r in saved["rows"] if r["name"] in ("h1", "h1-s1")]  # h1's speed: the median of its timed runs
    for r in mean_rows:
        if r["name"] == "h1":
            r["images_per_s_b32"] = sum(x["images_per_s_b32"] for x in h1s) / 2
    expect = _compare([r for r in mean_rows if r["family"] == "baseline"],
                      [r for r in mean_rows if r["family"] == "hydranet"])
    assert added["seed_means"]["macs"] == expect["macs"] and added["seed_means"]["time_b32"] == expect["time_b32"]
    assert b1["images_per_s_b32"] > 0 and added["seed_means"]["time_b32"]["baseline_best_cost"] in \
        {1 / r["images_per_s_b32"] for r in saved["rows"]}
    md = (results / "x.md").read_text()
    assert "- Added later without timing (--add-repeats; torch" in md and "): b1-s1, b1-s2: their top-1 counts" in md
    assert f"{describe(machine_info('cpu'))}): b1-s1" in md
    assert re.search(r"\| b1-s2 \| repeat of b1 \|.*\| - \|$", md, re.M)
    code, _, err = run_cli(capsys, *argv, "--add-repeats")  # nothing new since
    assert code == 2 and "no repeat or ablation of protocol x has finished training that" in one_error_line(err)
    proto["ablations"] = [{"name": "a1", "family": "random subtasks", "model": tiny, "partition": {"method": "random"},
                           "hydra": {"num_branches": 2, "topk": 1}}]  # an ablation and its seed, trained later
    proto["repeats"].append({"name": "a1-s1", "repeat_of": "a1", "train": {"seed": 1}})
    config.write_text(yaml.safe_dump(proto))
    run_protocol(load_protocol(config), only=["a1", "a1-s1"])
    code, out, err = run_cli(capsys, *argv, "--add-repeats")
    assert code == 0, err
    later = json.loads((results / "x.json").read_text())
    assert later["rows"][:len(added["rows"])] == added["rows"]
    new = {r["name"]: r for r in later["rows"][len(added["rows"]):]}
    assert [(n, r["family"], r["curve"], r["images_per_s_b32"]) for n, r in new.items()] == \
        [("a1", "ablation", "random subtasks", None), ("a1-s1", "repeat", None, None)]
    means = {m["name"]: m for m in later["seed_means"]["members"]}
    assert means["a1"]["top1_runs"] == [new["a1"]["top1"], new["a1-s1"]["top1"]]
    assert later["seed_means"]["macs"] == added["seed_means"]["macs"]  # the families' comparison is unchanged
    md = (results / "x.md").read_text()
    assert f"a1 {new['a1']['top1']:.2f} / {new['a1-s1']['top1']:.2f} (mean {means['a1']['top1']:.2f}" in md
    assert re.search(r"\| a1 \| ablation \(random subtasks\) \|.*\| - \|$", md, re.M)
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "x.json").write_text(json.dumps({**saved, "rows": [r for r in saved["rows"] if r["name"] != "b1"]}))
    code, _, err = run_cli(capsys, "bench", "pareto", "--config", str(config), "--results", str(orphan),
                           "--add-repeats")
    assert code == 2 and "repeat 'b1-s1' repeats 'b1', which" in one_error_line(err, "--eval-only")


def protocol_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


VALID = "protocol: x\nbase: {}\npartition_from: a\nbaselines: [{name: a}]\nhydranets: [{name: h}]\n"


@pytest.mark.parametrize("text, words", [
    ("protocol: x\n  bad: [\n", "is not valid YAML"),
    (VALID + "baselines: [{name: b}]\n", "key 'baselines' is given twice in one mapping (line 6)"),
    ("", "must hold a mapping (protocol, base, baselines, ...), got NoneType"),
    ("- a\n- b\n", "must hold a mapping (protocol, base, baselines, ...), got list"),
    (VALID.replace("base: {}", "base: null"), "base must be a mapping of config sections, got None"),
    (VALID.replace("[{name: a}]", "[a]"), "baselines must be a list of entries, each a mapping with a name"),
    (VALID + "checks: {name: c}\n", "checks must be a list of entries"),
    (VALID + "speed_batches: 256\n", "speed_batches must be a list of batch sizes >= 1, e.g. [256, 1], got 256"),
    (VALID + "speed_batches: [256, 0]\n", "speed_batches must be a list of batch sizes >= 1"),
    (VALID + "speed_repeats: 0\n", "speed_repeats must be a whole number >= 1, got 0"),
])
def test_malformed_protocol_is_one_error_line(tmp_path, capsys, monkeypatch, text, words):
    """A protocol file of the wrong shape stops with one error line, not a traceback (speed_batches and speed_repeats
    before hours of training, not at the evaluation after it)."""
    import hydranets.bench.run as run_mod
    from helpers import one_error_line, run_cli
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_mod, "run_protocol", lambda *a, **k: pytest.fail("trained despite a bad protocol"))
    code, _, err = run_cli(capsys, "bench", "pareto", "--config", str(protocol_file(tmp_path, text)))
    assert code == 2
    one_error_line(err, words)


def test_protocol_folder_is_one_error_line(tmp_path, capsys):
    from helpers import one_error_line, run_cli
    (tmp_path / "p.yaml").mkdir()
    code, _, err = run_cli(capsys, "bench", "pareto", "--config", str(tmp_path / "p.yaml"))
    assert code == 2
    one_error_line(err, "is a folder")


def test_empty_optional_lists_are_none(tmp_path):
    proto = load_protocol(protocol_file(tmp_path, VALID + "checks:\nablations:\n"))
    assert [e["name"] for e in all_entries(proto)] == ["a", "h"]


def test_num_subsets_is_not_a_protocol_key(tmp_path):
    """It was accepted and never read: B is each HydraNet's hydra.num_branches."""
    with pytest.raises(HydraError, match="unknown key 'num_subsets'"):
        load_protocol(protocol_file(tmp_path, VALID + "num_subsets: 4\n"))


def test_out_override_of_the_base_is_refused(tmp_path):
    """Each entry trains in <protocol out>/<name>: an ``out=`` override (or an entry's out) was silently ignored."""
    path = protocol_file(tmp_path, VALID + f"out: {tmp_path / 'runs'}\n")
    assert model_config(load_protocol(path), {"name": "a"}).out == str(tmp_path / "runs" / "a")
    with pytest.raises(HydraError, match="out is not a setting of the shared base config"):
        load_protocol(path, [f"out={tmp_path / 'mine'}"])
    with pytest.raises(HydraError, match="entry 'a' sets out"):
        load_protocol(protocol_file(tmp_path, VALID.replace("{name: a}", "{name: a, out: elsewhere}")))


@pytest.mark.parametrize("extra", ["baselines: [{name: a}, {name: a, train: {seed: 3}}]\n",
                                   "repeats: [{name: a, repeat_of: a, train: {seed: 1}}]\n",
                                   "checks: [{name: h}]\n"])
def test_two_entries_of_one_name_are_refused(tmp_path, extra):
    """Two entries of one name would share one run folder: the second resumed the first's finished run and its
    top-1 counted twice (e.g. as a seed repeat)."""
    text = VALID.replace("baselines: [{name: a}]\n", "") if extra.startswith("baselines") else VALID
    with pytest.raises(HydraError, match="two entries are named '(a|h)'; each entry trains in its own run folder"):
        load_protocol(protocol_file(tmp_path, text + extra))


def test_compare_families_against_a_hand_computation():
    """Iso-accuracy saving, lower bounds, misses and the equal-cost gain on made-up curves with dominated points,
    ties in cost and in top-1, computed by hand."""
    # baseline frontier (1, 30) (2, 40) (4, 50): (3, 35) is dominated, (2, 38) loses the tie at cost 2,
    # (5, 50) ties (4, 50) in top-1 at a higher cost
    baseline = [(4, 50), (3, 35), (2, 38), (1, 30), (2, 40), (5, 50)]
    # HydraNet frontier (1.5, 35) (3, 45) (6, 55): (2, 34) is dominated
    hydra = [(6, 55), (2, 34), (1.5, 35), (3, 45)]
    r = compare_families(baseline, hydra)
    # best baseline 50 at cost 4; the HydraNets reach 50 halfway from (3, 45) to (6, 55): 3 + 3 * 5/10 = 4.5
    assert (r["baseline_best_top1"], r["baseline_best_cost"]) == (50, 4)
    assert r["hydra_cost_at_that_top1"] == pytest.approx(4.5)
    assert r["iso_accuracy_saving"] == pytest.approx(4 / 4.5) and not r["iso_accuracy_at_least"]
    # along the dense curve: 30 is below the cheapest HydraNet (1.5 at >= 35): >= 1/1.5; 40 at 1.5 + 1.5 * 5/10 = 2.25
    along = [(p["top1"], p["cost"], p["hydra_cost"], p["at_least"]) for p in r["saving_along_baseline"]]
    assert along == [(30, 1, 1.5, True), (40, 2, pytest.approx(2.25), False), (50, 4, pytest.approx(4.5), False)]
    # equal cost over [1.5, 4]: 25 evenly spaced costs, each HydraNet top-1 minus the baseline's, both interpolated
    def acc(curve, c):
        for (c0, a0), (c1, a1) in zip(curve, curve[1:]):
            if c0 <= c <= c1:
                return a0 + (a1 - a0) * (c - c0) / (c1 - c0)
    gains = [acc([(1.5, 35), (3, 45), (6, 55)], c) - acc([(1, 30), (2, 40), (4, 50)], c)
             for c in (1.5 + 2.5 * i / 24 for i in range(25))]
    assert r["shared_cost_range"] == [1.5, 4]
    assert r["equal_cost_gain_mean"] == pytest.approx(sum(gains) / 25)
    assert r["equal_cost_gain_max"] == pytest.approx(max(gains))
    # a HydraNet family that never reaches the best baseline, and one entirely outside the baselines' cost range
    miss = compare_families(baseline, [(1, 20), (10, 45)])
    assert miss["iso_accuracy_saving"] is None and miss["hydra_cost_at_that_top1"] is None
    assert [p["hydra_cost"] for p in miss["saving_along_baseline"]] == [pytest.approx(1 + 9 * 10 / 25),
                                                                        pytest.approx(1 + 9 * 20 / 25), None]
    apart = compare_families(baseline, [(8, 60), (9, 61)])
    assert apart["shared_cost_range"] is None and apart["equal_cost_gain_mean"] is None
    assert apart["iso_accuracy_saving"] == pytest.approx(4 / 8) and apart["iso_accuracy_at_least"]


def test_seed_noise_draws_match_an_independent_simulation():
    """Every draw redone by hand on the same normal stream (baselines, then HydraNets, in member order): each mean
    moved by its family's pooled sd / sqrt(runs), the dense frontier's cheapest point within one binomial standard
    error of its best top-1, the HydraNet frontier interpolated there, an unreached level counting 0."""
    import math
    import numpy as np
    means = [_mean_row("b1", "baseline", 40e6, [31.0, 33.0]), _mean_row("b2", "baseline", 80e6, [33.5]),
             _mean_row("b3", "baseline", 160e6, [33.0, 34.0, 35.5]), _mean_row("h1", "hydranet", 30e6, [31.5, 32.5]),
             _mean_row("h2", "hydranet", 60e6, [34.0]), _mean_row("h3", "hydranet", 90e6, [35.0, 36.0])]
    # variances 2 (1 dof) and 19/12 (2 dof); 0.5 and 0.5 (1 dof each)
    sd = {"baseline": math.sqrt((2 + 2 * 19 / 12) / 3), "hydranet": math.sqrt((0.5 + 0.5) / 2)}

    def front(points):
        out = []
        for cost, acc in sorted(points):
            if not out or acc > out[-1][1]:
                out.append((cost, acc))
        return out

    rng, savings, bounds = np.random.default_rng(5), [], 0
    for _ in range(300):
        moved = {f: [(m["macs"], m["top1"] + rng.normal() * sd[f] / math.sqrt(len(m["top1_runs"])))
                     for m in means if m["family"] == f] for f in ("baseline", "hydranet")}
        b, h = front(moved["baseline"]), front(moved["hydranet"])
        best = b[-1][1]
        level_cost, level = next(p for p in b if p[1] >= best - 100 * math.sqrt(best / 100 * (1 - best / 100) / 5000))
        if h[-1][1] < level:
            savings.append(0.0)
            continue
        if h[0][1] >= level:
            savings.append(level_cost / h[0][0])
            bounds += 1
            continue
        (c0, a0), (c1, a1) = next((p, q) for p, q in zip(h, h[1:]) if p[1] <= level <= q[1])
        savings.append(level_cost / (c0 + (level - a0) / (a1 - a0) * (c1 - c0)))

    def percentile(values, q):
        s = sorted(values)
        i = q / 100 * (len(s) - 1)
        return s[math.floor(i)] + (i - math.floor(i)) * (s[math.ceil(i)] - s[math.floor(i)])

    noise = seed_noise(means, 5000, draws=300, seed=5)
    assert noise["pooled_sd"] == {f: pytest.approx(v) for f, v in sd.items()}
    assert noise["savings"]["macs"] == {"median": pytest.approx(percentile(savings, 50)),
                                        "p10": pytest.approx(percentile(savings, 10)),
                                        "p90": pytest.approx(percentile(savings, 90)),
                                        "at_least": pytest.approx(bounds / 300)}
    assert noise["share_at_target"]["macs"] == pytest.approx(sum(s >= 2.0 for s in savings) / 300)
    assert 0 < sum(s == 0 for s in savings) < 300 and 0 < noise["share_at_target"]["macs"] < 1  # both cases drawn


def test_level_off_saving_met_by_the_cheapest_hydranet_is_written_as_a_lower_bound():
    """The level-off line marks a lower bound with >= like the headline, along and time lines: here the dense curve
    levels off at 34.0% (80M), below the cheapest HydraNet's 35.0% (50M), so 80 / 50 = 1.60x is only a lower bound."""
    row = lambda name, family, macs, top1: {"name": name, "family": family, "k": None, "epochs": 5,  # noqa: E731
                                            "top1": top1, "top5": 50.0, "gate_recall": None, "macs": macs,
                                            "params": 1e5, "images_per_s_b1": 2e9 / macs}
    rows = [row("b1", "baseline", 40e6, 30.0), row("b2", "baseline", 80e6, 34.0), row("b3", "baseline", 160e6, 34.1),
            row("b4", "baseline", 320e6, 34.2), row("h1", "hydranet", 50e6, 35.0), row("h2", "hydranet", 100e6, 36.0)]
    result = compare_rows({"rows": rows, "dataset": "synthetic", "classes": 10, "device": "cpu", "precision": "fp32",
                           "torch": "x", "threads": 1, "test_images": 2500})
    point = level_off_savings(result, 2500)
    assert (point["top1"], point["macs"], point["time_b1"]) == (34.0, pytest.approx(1.6), pytest.approx(1.6))
    md = markdown_table(result)
    assert "(34.20%): >=6.40x" in md  # the headline already says so
    assert ("- Where the dense curve levels off (its cheapest point within one standard error, 0.95 points, of its best "
            "top-1: 34.00% at 80.0M MACs): iso-accuracy saving >=1.60x in MACs, >=1.60x in batch-1 time "
            "(>=: the cheapest HydraNet is already more accurate)\n") in md
