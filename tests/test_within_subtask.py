"""benchmarks/within_subtask.py: specialists against a generalist, both told each image's subtask."""
import pytest
import torch

from hydranets.evaluate import evaluate
from helpers import SUBSETS, load_benchmark, tiny_hydra_and_control

within_subtask = load_benchmark("within_subtask")


def test_top1_within_the_true_subtask_by_hand():
    hydra, control, batches, x, y = tiny_hydra_and_control()
    r = within_subtask.within_subtask(hydra, control, batches)
    assert r["count"] == 60
    assert r["true_route_top1"] == pytest.approx(evaluate(hydra, batches, true_route=True)["true_route_top1"])
    assert r["control_top1"] == pytest.approx(evaluate(control, batches)["top1"])
    with torch.no_grad():
        subtask = [next(s for s in SUBSETS if c in s) for c in y.tolist()]
        forced = hydra(x, force=hydra.membership[y])
        other = control(x)

    def within(scores):
        return 100.0 * sum(s[sub].argmax().item() == sub.index(c) for s, sub, c in zip(scores, subtask, y.tolist())) / 60

    assert r["specialist_within"] == pytest.approx(within(forced))
    assert r["control_within"] == pytest.approx(within(other))
    assert r["control_within"] > r["control_top1"] and r["specialist_within"] >= r["true_route_top1"]


def test_no_images_is_an_error_not_zero_points():
    from hydranets.errors import HydraError
    hydra, control, *_ = tiny_hydra_and_control()
    with pytest.raises(HydraError, match="no images"):
        within_subtask.within_subtask(hydra, control, [])


def test_summarise_by_design_and_over_all_pairs():
    def row(spec, ctrl):
        return {"specialist_within": spec, "control_within": ctrl}

    rows = [((8, ""), row(60.0, 61.0)), ((8, ""), row(64.0, 62.0)), ((2, ""), row(40.0, 40.5))]
    assert within_subtask.summarise(rows) == [
        "B=2: 1 pairs, the specialists against the control within the subtask -0.50 points",
        "B=8: 2 pairs, the specialists against the control within the subtask +0.50 points",
        "all 3 pairs: +0.17 points within the subtask (sd 1.61, above the control in 1)"]
    assert len(within_subtask.summarise(rows[:1])) == 1


def test_main_wants_pairs(tmp_path):
    with pytest.raises(SystemExit, match="HYDRA_RUN:CONTROL_RUN"):
        within_subtask.main([str(tmp_path / "hydra")])
