"""benchmarks/routing_split.py: a HydraNet's top-1 on the images its gate routes right and wrong."""
import math

import pytest
import torch

from hydranets import build_hydranet
from hydranets.evaluate import evaluate
from helpers import SUBSETS, load_benchmark, tiny_hydra_and_control

routing_split = load_benchmark("routing_split")


def test_split_groups_images_by_their_route_and_recombines_into_the_overall_figures():
    hydra, control, batches, x, y = tiny_hydra_and_control()
    split = routing_split.routing_split(hydra, batches, control=control)
    with torch.no_grad():
        route = hydra(x, return_gate=True).route[:, 0]
    subtask = torch.tensor([next(b for b, s in enumerate(SUBSETS) if c in s) for c in y.tolist()])
    right = int((route == subtask).sum())
    assert 0 < right < 60   # both groups hold images
    assert (split["right"]["count"], split["wrong"]["count"]) == (right, 60 - right)

    def overall(key):
        return (split["right"]["count"] * split["right"][key] + split["wrong"]["count"] * split["wrong"][key]) / 60

    ev = evaluate(hydra, batches, true_route=True)
    assert overall("top1") == pytest.approx(ev["top1"])
    assert overall("true_route_top1") == pytest.approx(ev["true_route_top1"])
    assert split["right"]["true_route_top1"] == pytest.approx(split["right"]["top1"])   # routed right: the same run
    assert overall("control_top1") == pytest.approx(evaluate(control, batches)["top1"])
    with torch.no_grad():
        wrong_hits = (control(x).argmax(1) == y)[route != subtask].float().mean().item()
    assert split["wrong"]["control_top1"] == pytest.approx(100.0 * wrong_hits)
    assert "control_top1" not in routing_split.routing_split(hydra, batches)["right"]


def test_design_tells_overlapping_subtasks_apart():
    from hydranets.partition import Partition
    hydra, *_ = tiny_hydra_and_control()
    subsets = [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9, 0]]
    wide = Partition(subsets, 10, overlap=True)
    even = Partition(subsets, 10, overlap=True, meta={"overlap_balanced": True})
    overlapping, evenly = (build_hydranet("resnet_cifar", 10, num_branches=3, topk=1, depth=8, width=0.5, partition=p)
                           for p in (wide, even))
    assert routing_split.design(hydra) == (3, "")
    assert routing_split.design(overlapping) == (3, "overlapping subtasks")
    assert routing_split.design(evenly) == (3, "overlapping subtasks, evenly")


def test_split_needs_a_partition_and_main_refuses_what_it_cannot_load(tmp_path):
    torch.manual_seed(0)
    bare = build_hydranet("resnet_cifar", 10, num_branches=3, topk=1, depth=8, width=0.5)
    with pytest.raises(ValueError, match="no partition"):
        routing_split.routing_split(bare, [])
    with pytest.raises(SystemExit, match="^routing_split: .*nowhere"):
        routing_split.main([str(tmp_path / "nowhere")])


def test_summarise_averages_the_differences_from_the_control_per_design():
    def split(right, wrong, hydra_right, control_right, hydra_wrong, control_wrong, wrong_true_route=0.0):
        return {"right": {"count": right, "top1": hydra_right, "control_top1": control_right},
                "wrong": {"count": wrong, "top1": hydra_wrong, "control_top1": control_wrong,
                          "true_route_top1": hydra_wrong + wrong_true_route}}

    no_control = {"right": {"count": 5, "top1": 1.0}, "wrong": {"count": 5, "top1": 1.0}}
    rows = [((8, ""), split(30, 70, 40.0, 41.0, 20.0, 23.0, 1.0)), ((2, ""), split(75, 25, 30.0, 30.5, 20.0, 21.0, 2.0)),
            ((8, ""), split(40, 60, 44.0, 42.0, 25.0, 26.0)), ((8, ""), no_control),
            ((8, "overlapping subtasks"), split(60, 40, 38.0, 39.0, 20.0, 22.0, 1.0))]
    # right: -1, -0.5, +2, -1 (mean -1/8, sd 1.44); rest: -3, -1, -1, -2 (mean -7/4, sd 0.96); the true route lifts
    # the rest by 1, 2, 0, 1
    assert routing_split.summarise(rows) == [
        "B=2: 1 pairs, routed right 75.0%; against the control -0.50 points on the images routed right, -1.00 on the rest",
        "B=8: 2 pairs, routed right 35.0%; against the control +0.50 points on the images routed right, -2.00 on the rest",
        "B=8, overlapping subtasks: 1 pairs, routed right 60.0%; against the control -1.00 points on the images routed "
        "right, -2.00 on the rest",
        "all 4 pairs: against the control -0.12 points on the images routed right (sd 1.44, above it in 1), -1.75 on "
        "the rest (sd 0.96, below it in 4); the true subtask's branch lifts the rest by +1.00"]
    assert routing_split.summarise(rows[:1]) == routing_split.summarise(rows[:1] + rows[3:])[:1]
    assert len(routing_split.summarise(rows[:1])) == 1


def test_a_group_without_images_has_no_top1_and_counts_in_no_mean():
    torch.manual_seed(0)
    one = build_hydranet("resnet_cifar", 10, num_branches=1, topk=1, depth=8, width=0.5, partition=[list(range(10))])
    _, control, batches, x, y = tiny_hydra_and_control()
    split = routing_split.routing_split(one, batches, control=control)
    assert (split["right"]["count"], split["wrong"]["count"]) == (60, 0)  # one branch holds every class
    assert split["right"]["top1"] == pytest.approx(evaluate(one.eval(), batches)["top1"])
    assert all(math.isnan(split["wrong"][k]) for k in ("top1", "true_route_top1", "control_top1"))  # not 0.00%

    def split_of(right, wrong, hydra_right, control_right, hydra_wrong, control_wrong, lift):
        return {"right": {"count": right, "top1": hydra_right, "control_top1": control_right},
                "wrong": {"count": wrong, "top1": hydra_wrong, "control_top1": control_wrong,
                          "true_route_top1": hydra_wrong + lift}}

    nan = float("nan")
    rows = [((8, ""), split_of(30, 70, 40.0, 41.0, 20.0, 23.0, 1.0)),
            ((8, ""), split_of(40, 60, 44.0, 42.0, 25.0, 26.0, 3.0)),
            ((8, ""), split_of(100, 0, 50.0, 49.0, nan, nan, nan))]
    # right: -1, +2, +1 (mean 2/3, sd 1.53); rest, the empty group left out: -3, -1 (mean -2, sd 1.41); lift 1, 3
    assert routing_split.summarise(rows) == [
        "B=8: 3 pairs, routed right 56.7%; against the control +0.67 points on the images routed right, -2.00 on the "
        "rest",
        "all 3 pairs: against the control +0.67 points on the images routed right (sd 1.53, above it in 2), -2.00 on "
        "the rest (sd 1.41, below it in 2); the true subtask's branch lifts the rest by +2.00"]
    assert routing_split.summarise([rows[2], rows[2]])[1] == (
        "all 2 pairs: against the control +1.00 points on the images routed right (sd 0.00, above it in 2), n/a on the "
        "rest (sd n/a, below it in 0); the true subtask's branch lifts the rest by n/a")
