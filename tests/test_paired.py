"""benchmarks/paired.py: pair-by-pair top-1 differences of a saved pareto result, and its errors."""
import json

import pytest

from helpers import load_benchmark

paired = load_benchmark("paired")


@pytest.fixture
def results(tmp_path):
    rows = [{"name": n, "top1": t} for n, t in
            [("h", 30.0), ("c", 31.0), ("h-s1", 32.5), ("c-s1", 32.0), ("h-s2", 29.0), ("c-s2", 30.5)]]
    path = tmp_path / "proto.json"
    path.write_text(json.dumps({"protocol": "proto", "rows": rows}))
    return path


def test_paired_prints_each_difference_and_their_mean_sd_and_standard_error(results, capsys):
    paired.main([str(results), "h:c", "h-s1:c-s1", "h-s2:c-s2"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("= ")[1] for line in lines[:3]] == ["-1.00", "+0.50", "-1.50"]
    # diffs -1, 0.5, -1.5: mean -2/3; sample sd sqrt(((1/3)^2 + (7/6)^2 + (5/6)^2) / 2) = 1.0408; se 1.0408 / sqrt(3)
    assert lines[3] == "mean -0.67 points over 3 pairs (sd 1.04, standard error 0.60); A above B in 1 of 3"
    paired.main([str(results), "h-s1:c-s1"])
    assert capsys.readouterr().out.splitlines()[1] == "mean +0.50 points over 1 pairs; A above B in 1 of 1"


def test_paired_refuses_unknown_runs_and_malformed_pairs(results, capsys):
    with pytest.raises(SystemExit, match="not in the results: nope"):
        paired.main([str(results), "h:c", "nope:c"])
    with pytest.raises(SystemExit) as exit_info:
        paired.main([str(results), "h-c"])
    assert exit_info.value.code == 2
    assert "'h-c' is not a pair: write RUN_A:RUN_B" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="No such file"):
        paired.main([str(results.with_name("missing.json")), "h:c"])


def test_paired_refuses_a_run_in_two_pairs(results, capsys):
    # h:c three times would read as three pairs with sd 0 and standard error 0.00 instead of one pair
    for pairs in (["h:c", "h:c", "h:c"], ["h:c", "h-s1:c"], ["h:h"]):
        with pytest.raises(SystemExit, match="named more than once: .*standard error is too small"):
            paired.main([str(results), *pairs])
    with pytest.raises(ValueError, match="named more than once: c, h;"):
        paired.paired_differences({"h": 30.0, "c": 31.0}, [("h", "c"), ("h", "c")])
    summary = paired.paired_differences({"h": 30.0, "c": 31.0, "h-s1": 32.5, "c-s1": 32.0},
                                        [("h", "c"), ("h-s1", "c-s1")])
    assert (summary["n"], summary["mean"], summary["se"]) == (2, -0.25, pytest.approx(1.5 / 2 ** 0.5 / 2 ** 0.5))
