"""The ``hydranets`` command line: models, eval, partition, report, train errors and --help."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hydranets import Partition, list_models
from hydranets.cli import build_parser
from hydranets.data import BatchLoader
from hydranets.data.synthetic import synthetic_splits
from hydranets.evaluate import evaluate
from hydranets.partition import partition_random
from hydranets.train import load_trained
from helpers import one_error_line, run_cli as run, snapshot, train_pair

BASE = ["data.name=synthetic", "model.name=resnet_cifar", "model.kwargs={depth: 8, width: 0.5}",
        "data.augment=none", "optim.lr=0.2", "optim.warmup_epochs=0", "train.epochs=3", "train.batch_size=32",
        "train.precision=fp32", "train.channels_last=false", "train.progress=false", "train.device=cpu",
        "train.threads=1"]
CLASSES = [f"class{c}" for c in range(10)]
SPEED = ["--repeats", "1", "--speed-batch", "32", "--batch-size", "64", "--device", "cpu"]
SUBCOMMANDS = ("train", "pipeline", "eval", "predict", "partition", "report", "models")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A trained baseline and a trained HydraNet (2 branches, random subtasks, trained at k=1)."""
    return train_pair(tmp_path_factory.mktemp("cli"), BASE, [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]], CLASSES)


# ---------------------------------------------------------------- models
def test_models_lists_registered_names(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0
    names = out.split()
    assert names == list_models() and "resnet_cifar" in names and len(names) > 1


def test_models_pattern_filters(capsys):
    code, out, _ = run(capsys, "models", "resnet*")
    names = out.split()
    assert code == 0 and names and all(n.startswith("resnet") for n in names)
    assert set(names) == {n for n in list_models() if n.startswith("resnet")}
    assert len(names) < len(list_models())
    code, out, err = run(capsys, "models", "no-such-model-*")  # nothing matches: said, not an empty list
    assert code == 2 and out == ""
    assert "no registered model matches 'no-such-model-*'" in one_error_line(err)


# ---------------------------------------------------------------- eval
def eval_rows(stdout: str) -> list[list[str]]:
    lines = stdout.splitlines()
    header = next(i for i, l in enumerate(lines) if "top-1" in l and "MMACs" in l)
    return [l.split() for l in lines[header + 1:] if l.startswith(" ")]  # rows, not the legend below them


@pytest.mark.slow
def test_eval_sweeps_topk(runs, capsys, tmp_path):
    rows_file = tmp_path / "rows.json"
    code, out, err = run(capsys, "eval", str(runs["hydranet"]), "--topk", "1,2", "--json", str(rows_file), *SPEED)
    assert code == 0, err
    assert "HydraNet of resnet_cifar, B=2 on synthetic (100 test images)" in out
    assert err.splitlines() == ["evaluating k=1 on 100 test images ...", "evaluating k=2 on 100 test images ...",
                                "timing images/s at batch 32: 4 variants, median of 1 interleaved runs ..."]
    printed = eval_rows(out)
    assert [r[0] for r in printed] == ["1", "2"]
    macs = [float(r[6]) for r in printed]
    assert macs[0] < macs[1]
    rows = json.loads(rows_file.read_text())
    assert [r["k"] for r in rows] == [1, 2]
    assert rows[0]["macs"] < rows[1]["macs"] and rows[0]["active_params"] < rows[1]["active_params"]
    # an independent evaluation of the same weights on the same test images
    model, _ = load_trained(runs["hydranet"])
    _, test_set = synthetic_splits(10)
    batches = list(BatchLoader(test_set, 50, train=False, channels_last=False, prefetch=False))
    for printed_row, row in zip(printed, rows):
        ev = evaluate(model, batches, topk=row["k"], precision="fp32", true_route=True, shuffled_branches=True)
        assert row["top1"] == pytest.approx(ev["top1"]) and row["top5"] == pytest.approx(ev["top5"])
        assert row["gate_recall"] == pytest.approx(ev["gate_recall"])
        assert row["true_route_top1"] == pytest.approx(ev["true_route_top1"])
        assert row["shuffled_top1"] == pytest.approx(ev["shuffled_top1"])
        assert float(printed_row[1]) == pytest.approx(ev["top1"], abs=0.006)
        assert float(printed_row[4]) == pytest.approx(ev["true_route_top1"], abs=0.006)
        assert float(printed_row[5]) == pytest.approx(ev["shuffled_top1"], abs=0.006)
        assert row["images_per_s"] > 0 and row["images_per_s_folded"] > 0
        assert float(printed_row[9]) == pytest.approx(row["images_per_s_folded"], abs=0.5)
    # and the k the HydraNet was trained at scores what its training measured last
    summary = json.loads((runs["hydranet"] / "summary.json").read_text())
    assert rows[0]["top1"] == pytest.approx(summary["test_top1"])


@pytest.mark.slow
def test_eval_of_baseline(runs, capsys):
    code, out, err = run(capsys, "eval", str(runs["baseline"]), *SPEED)
    assert code == 0, err
    assert "\nresnet_cifar on synthetic (100 test images)" in "\n" + out
    (row,) = eval_rows(out)
    summary = json.loads((runs["baseline"] / "summary.json").read_text())
    assert row[0] == "-" and float(row[1]) == pytest.approx(summary["test_top1"], abs=0.006)
    assert row[3:6] == ["-", "-", "-"]  # gate recall, true route, shuffled: HydraNets only


@pytest.mark.slow
def test_eval_bad_input(runs, capsys, tmp_path):
    code, _, err = run(capsys, "eval", str(runs["baseline"]), "--topk", "1,2", *SPEED)
    assert code == 2 and "--topk" in one_error_line(err) and "baseline" in one_error_line(err)
    code, _, err = run(capsys, "eval", str(tmp_path / "missing"), *SPEED)
    assert code == 2 and "does not exist" in one_error_line(err)
    code, _, err = run(capsys, "eval", str(runs["hydranet"]), "--topk", "1,x", *SPEED)
    assert code == 2 and "--topk" in one_error_line(err)
    code, _, err = run(capsys, "eval", str(runs["hydranet"]), "--topk", "3", *SPEED)
    assert code == 2 and "topk" in one_error_line(err)
    for flag in ("--repeats", "--speed-batch", "--batch-size"):
        code, _, err = run(capsys, "eval", str(runs["hydranet"]), *SPEED, flag, "0")
        assert code == 2 and f"{flag} must be at least 1, got 0" in one_error_line(err)


# ---------------------------------------------------------------- partition
def check_partition(path: Path, method: str) -> Partition:
    part = Partition.load(path, expected_num_classes=10, expected_class_names=CLASSES)
    flat = [c for s in part.subsets for c in s]
    assert sorted(flat) == list(range(10)) and len(flat) == len(set(flat))
    assert [len(s) for s in part.subsets] == [5, 5] and part.method == method and not part.overlap
    return part


@pytest.mark.slow
def test_partition_kmeans_default_place_and_overwrite(runs, capsys):
    default = runs["baseline"] / "partition_kmeans_b2.json"
    code, out, err = run(capsys, "partition", str(runs["baseline"]), "-B", "2", "--method", "kmeans")
    assert code == 0, err
    part = check_partition(default, "kmeans")
    assert part.meta["precision"] == "fp32"  # the descriptors in the precision the baseline was trained in
    assert f"saved {default}" in out and "2 subtasks over 10 classes (kmeans)" in out
    assert all(CLASSES[c] in out for c in range(10))
    assert part.meta["dataset"] == "synthetic"
    before = default.read_bytes()
    code, _, err = run(capsys, "partition", str(runs["baseline"]), "-B", "2")
    assert code == 2 and "--overwrite" in one_error_line(err)
    assert default.read_bytes() == before
    default.write_text("{}")
    code, _, err = run(capsys, "partition", str(runs["baseline"]), "-B", "2", "--overwrite")
    assert code == 0, err
    assert check_partition(default, "kmeans").subsets == part.subsets  # the same subtasks again


@pytest.mark.slow
def test_partition_random_to_out(runs, capsys, tmp_path):
    dst = tmp_path / "sub" / "random.json"
    dst.parent.mkdir()
    code, out, err = run(capsys, "partition", str(runs["baseline"] / "checkpoints" / "last.pt"), "-B", "2",
                         "--method", "random", "--seed", "3", "--out", str(dst))
    assert code == 0, err
    assert check_partition(dst, "random").subsets == partition_random(10, 2, seed=3).subsets
    assert check_partition(dst, "random").subsets != partition_random(10, 2, seed=0).subsets  # the seed was used
    assert f"saved {dst}" in out


@pytest.mark.slow
def test_partition_overlap_default_place(runs, capsys):
    code, out, err = run(capsys, "partition", str(runs["baseline"]), "-B", "3", "--overlap", "--overlap-balanced")
    assert code == 0, err
    path = runs["baseline"] / "partition_kmeans_overlap-balanced_b3.json"
    part = Partition.load(path)
    assert part.overlap and part.meta["overlap_balanced"] and f"saved {path}" in out
    assert part.membership().sum(1).tolist() == [2.0] * 10
    assert "3 subtasks over 10 classes (kmeans, overlapping evenly)" in out


def test_partition_of_a_safetensors_file_lands_in_its_run_folder(runs, capsys, tmp_path):
    import shutil
    run_dir = tmp_path / "baseline"
    shutil.copytree(runs["baseline"], run_dir)
    code, out, err = run(capsys, "partition", str(run_dir / "model.safetensors"), "-B", "2", "--method", "random")
    assert code == 0, err
    saved = [p.name for p in run_dir.glob("partition_random*.json")]
    assert len(saved) == 1 and f"saved {run_dir / saved[0]}" in out
    assert not list(tmp_path.glob("partition_*.json"))


def test_partition_bad_input(runs, capsys, tmp_path):
    code, _, err = run(capsys, "partition", str(runs["baseline"]), "-B", "2", "--overlap-balanced")
    assert code == 2 and "pass --overlap too" in one_error_line(err)
    code, _, err = run(capsys, "partition", str(runs["baseline"]), "-B", "11", "--out", str(tmp_path / "p.json"))
    assert code == 2 and "11 subtasks (hydra.num_branches, or partition -B) exceed the 10 classes" in one_error_line(err)
    assert not (tmp_path / "p.json").exists()
    code, _, err = run(capsys, "partition", str(tmp_path / "missing"), "-B", "2")
    assert code == 2 and "does not exist" in one_error_line(err)


def test_partition_needs_a_subtask(capsys, tmp_path):
    code, _, err = run(capsys, "partition", str(tmp_path), "-B", "0")
    assert code == 2
    one_error_line(err, "partition -B (the number of subtasks) must be at least 1, got 0")


@pytest.mark.parametrize("name,words", [("notes.pt", ["is not a readable PyTorch checkpoint", "run folder"]),
                                        ("model.safetensors", ["is not a readable safetensors file", "run folder"])])
def test_a_file_that_is_no_checkpoint_is_one_error(capsys, tmp_path, name, words):
    f = tmp_path / name
    f.write_text("# some text, not weights\n")
    for command in (["eval", str(f), *SPEED], ["predict", str(f), str(tmp_path)], ["partition", str(f), "-B", "2"]):
        code, _, err = run(capsys, *command)
        assert code == 2
        assert "Weights only load failed" not in one_error_line(err, str(f), *words)


# ---------------------------------------------------------------- report, train
def test_report_of_a_missing_folder(capsys, tmp_path):
    code, out, err = run(capsys, "report", str(tmp_path / "nope"))
    assert code == 2 and out == ""
    one_error_line(err, "nope is not a folder", "hydranets pipeline")
    assert not (tmp_path / "nope").exists()


def test_pipeline_out_naming_a_file_is_one_error(capsys, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    code, _, err = run(capsys, "pipeline", *BASE, f"out={f}")
    assert code == 2
    one_error_line(err, f"out={f} is a file")
    assert f.read_text() == "keep me"


def test_report_without_eval_json(capsys, tmp_path):
    code, out, err = run(capsys, "report", str(tmp_path))
    assert code == 2 and "hydranets pipeline" in one_error_line(err) and "eval.json" in one_error_line(err)
    assert out == "" and not (tmp_path / "report.html").exists()


def test_train_unknown_key(capsys, tmp_path):
    code, out, err = run(capsys, "train", *BASE, "train.epocs=1", f"out={tmp_path / 'r'}")
    assert code == 2 and out == ""
    assert err.strip() == one_error_line(err)  # exactly one line
    assert "train.epocs" in err and "train.epochs" in err  # names the key and the close match
    assert not (tmp_path / "r").exists()


def test_train_bad_value_and_missing_config(capsys, tmp_path):
    code, _, err = run(capsys, "train", "train.epochs=many", f"out={tmp_path / 'r'}")
    assert code == 2 and "train.epochs" in one_error_line(err)
    code, _, err = run(capsys, "train", "--config", str(tmp_path / "none.yaml"))
    assert code == 2 and "does not exist" in one_error_line(err)


def test_train_and_pipeline_refuse_each_others_folders(runs, capsys, tmp_path, monkeypatch):
    """Each wrote its config.yaml (and more) into the other's folder, which it then refused as its own."""
    import hydranets.train as train_mod
    monkeypatch.setattr(train_mod, "train_one_epoch", lambda *a, **k: pytest.fail("trained into another's folder"))
    pipe = tmp_path / "pipe"
    (pipe / "baseline").mkdir(parents=True)
    (pipe / "config.yaml").write_text("out: somewhere\n")
    (pipe / "partition.json").write_text("{}")
    before = snapshot(pipe)
    for flags in ([], ["--overwrite"], ["--resume"]):
        code, _, err = run(capsys, "train", *BASE, f"out={pipe}", *flags)
        assert code == 2
        one_error_line(err, f"out={pipe} holds a pipeline (baseline, partition.json)", str(pipe / "baseline"))
        assert snapshot(pipe) == before
    before = snapshot(runs["baseline"])
    code, _, err = run(capsys, "pipeline", *BASE, f"out={runs['baseline']}")
    assert code == 2
    one_error_line(err, "holds a training run (checkpoints, summary.json, metrics.jsonl, model.safetensors)")
    assert snapshot(runs["baseline"]) == before


def test_resume_of_a_folder_without_a_run_says_it_starts_afresh(runs, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("hydranets.train.train", lambda cfg, resume, overwrite: {})
    (tmp_path / "empty").mkdir()
    for out, noted in ((tmp_path / "empty", True), (tmp_path / "typo", True), (runs["baseline"], False)):
        code, _, err = run(capsys, "train", *BASE, f"out={out}", "--resume")
        assert code == 0 and (f"note: {out} holds no checkpoint to resume" in err) == noted, err


def test_options_are_not_abbreviated(capsys, tmp_path):
    for argv in (["train", *BASE, f"out={tmp_path / 'r'}", "--resum"], ["eval", "x", "--rep", "1"],
                 ["bench", "pareto", "--conf", "x.yaml"]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and ("unrecognized arguments" in err or "required: --config" in err), err
    assert not (tmp_path / "r").exists()


def test_partition_negative_seed_is_refused_before_the_baseline_is_read(runs, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("hydranets.train.load_trained", lambda *a, **k: pytest.fail("read the run before the seed"))
    code, _, err = run(capsys, "partition", str(runs["baseline"]), "-B", "2", "--seed", "-3",
                       "--out", str(tmp_path / "p.json"))
    assert code == 2
    one_error_line(err, "must be an integer >= 0, got -3")
    assert not (tmp_path / "p.json").exists()


def test_a_folder_of_runs_names_them(runs, capsys, monkeypatch):
    """A pipeline's folder given where a run is wanted said only that its checkpoints/last.pt does not exist."""
    import torch

    from hydranets.errors import HydraError
    folder = runs["baseline"].parent
    for argv in (["eval", str(folder), *SPEED], ["predict", str(folder), "x.png"], ["export", str(folder)]):
        code, _, err = run(capsys, *argv)
        assert code == 2
        one_error_line(err, f"{folder} holds no run itself", f"give one of {runs['baseline']}, {runs['hydranet']}")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(HydraError, match="no usable mps device"):
        load_trained(runs["baseline"], "mps")


def test_eval_empty_topk_is_refused(runs, capsys):
    code, _, err = run(capsys, "eval", str(runs["hydranet"]), "--topk", "", *SPEED)
    assert code == 2
    one_error_line(err, "--topk '' must be comma-separated integers")


# ---------------------------------------------------------------- help
def test_top_level_help_subprocess():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "hydranets", "--help"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert all(cmd in p.stdout for cmd in SUBCOMMANDS)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and f"usage: hydranets {command}" in out
    assert out == build_parser()._subparsers._group_actions[0].choices[command].format_help()


def test_no_command_is_a_usage_error(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "usage: hydranets" in err
    code, _, err = run(capsys, "bench")
    assert code == 2 and "required: pareto" in err


def test_bench_pareto_bad_input_is_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "bench", "pareto", "--config", str(tmp_path / "none.yaml"))
    assert code == 2
    one_error_line(err, "protocol file", "does not exist")
    protocol = Path(__file__).resolve().parents[1] / "configs" / "bench" / "tin100-cpu-short.yaml"
    code, _, err = run(capsys, "bench", "pareto", "--config", str(protocol), "--only", "hydra-r99")
    assert code == 2
    one_error_line(err, "--only 'hydra-r99' is not an entry of protocol tin100-cpu-short")
    code, _, err = run(capsys, "bench", "pareto", "--config", str(protocol), "--only", "train.threads=1")
    assert code == 2
    one_error_line(err, "--only needs at least one entry name of the protocol (key=value words are overrides)")
    base = ["bench", "pareto", "--config", "x"]
    assert build_parser().parse_args([*base, "--eval-only"]).eval_only
    assert build_parser().parse_args([*base, "--train-only"]).train_only
    code, _, err = run(capsys, *base, "--eval-only", "--train-only")
    assert code == 2 and "argument --train-only: not allowed with argument --eval-only" in err


# ---------------------------------------------------------------- output paths
def test_output_paths_are_checked_before_the_work(capsys, tmp_path):
    """A --json or --out that cannot be written stops at once with one error line (it was a traceback after the whole
    evaluation); the run is not even read."""
    (tmp_path / "file").write_text("")
    missing_run = str(tmp_path / "no-run")
    cases = [("eval", missing_run, "--json", str(tmp_path)), ("predict", missing_run, "x.png", "--json", str(tmp_path)),
             ("predict", missing_run, "x.png", "--json", str(tmp_path / "file" / "p.json")),
             ("partition", missing_run, "-B", "2", "--out", str(tmp_path / "file" / "sub" / "p.json"))]
    for argv in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2
        line = one_error_line(err, "--json" if "--json" in argv else "--out")
        assert "folder" in line and "no-run" not in line
    assert not (tmp_path / "file" / "sub").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no folder can be made")
def test_unwritable_outputs_are_refused_before_the_work(runs, capsys, tmp_path, monkeypatch):
    """Each was a PermissionError / FileNotFoundError traceback, for --json after the whole evaluation."""
    import hydranets.bench.run as run_mod
    import hydranets.train as train_mod
    monkeypatch.setattr(train_mod, "train_one_epoch", lambda *a, **k: pytest.fail("trained before checking out="))
    monkeypatch.setattr(run_mod, "run_protocol", lambda *a, **k: pytest.fail("trained before checking --results"))
    monkeypatch.setattr("hydranets.evaluate.evaluate", lambda *a, **k: pytest.fail("evaluated before checking --json"))
    protocol = tmp_path / "p.yaml"
    protocol.write_text(f"protocol: x\nout: {tmp_path / 'runs'}\nbase: {{}}\npartition_from: a\n"
                        "baselines: [{name: a}]\nhydranets: [{name: h}]\n")
    nowhere = "/proc/no-such-folder"
    cases = [(["train", *BASE, f"out={nowhere}/run"], f"cannot write {nowhere}/run/config.yaml"),
             (["pipeline", *BASE, f"out={nowhere}/pipe"], f"cannot write {nowhere}/pipe/config.yaml"),
             (["eval", str(runs["hydranet"]), "--json", f"{nowhere}/x.json", *SPEED], f"--json: cannot write {nowhere}"),
             (["export", str(runs["hydranet"]), "--out", f"{nowhere}/m.pt2"], f"--out: cannot write {nowhere}"),
             (["bench", "pareto", "--config", str(protocol), "--results", nowhere], f"--results: cannot write {nowhere}")]
    for argv, words in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        one_error_line(err, words, "cannot create files in /proc", "choose a writable path")


def test_bench_results_that_is_a_file_is_refused_before_training(capsys, tmp_path, monkeypatch):
    import hydranets.bench.run as run_mod
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_mod, "run_protocol", lambda *a, **k: pytest.fail("trained before checking --results"))
    (tmp_path / "p.yaml").write_text(f"protocol: x\nout: {tmp_path / 'runs'}\nbase: {{}}\npartition_from: a\n"
                                     "baselines: [{name: a}]\nhydranets: [{name: h}]\n")
    (tmp_path / "file").write_text("")
    code, _, err = run(capsys, "bench", "pareto", "--config", str(tmp_path / "p.yaml"), "--results",
                       str(tmp_path / "file"))
    assert code == 2
    one_error_line(err, f"--results {tmp_path / 'file'} is a file")


def test_predict_json_into_a_new_folder(runs, capsys, tmp_path):
    from PIL import Image
    import numpy as np
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(tmp_path / "grey.png")
    dest = tmp_path / "new" / "sub" / "p.json"
    code, out, err = run(capsys, "predict", str(runs["hydranet"]), str(tmp_path / "grey.png"), "--json", str(dest),
                         "--device", "cpu", "--top", "2")
    assert code == 0, err
    (row,) = json.loads(dest.read_text())
    assert row["image"] == str(tmp_path / "grey.png") and len(row["classes"]) == 2
    assert f"{tmp_path / 'grey.png'}: {row['classes'][0]}" in out


def test_bench_results_folder_default_smoke_and_given(capsys, tmp_path, monkeypatch):
    """--results is where <protocol>.json goes, with --smoke too; without it, benchmarks/results, or the smoke
    folder's results/ with --smoke. The benchmarks/pareto.py wrapper never sends a smoke run into its results."""
    import runpy

    import hydranets.cli as cli_mod
    import hydranets.bench.results as results_mod
    import hydranets.bench.run as run_mod
    monkeypatch.chdir(tmp_path)
    written = []
    monkeypatch.setattr(run_mod, "run_protocol", lambda proto, **k: {"protocol": proto["protocol"], "rows": []})
    monkeypatch.setattr(results_mod, "check_results_kept", lambda *a: None)

    def fake_write(result, folder):
        written.append((result["protocol"], Path(folder)))
        (tmp_path / "t.md").write_text("table")
        return tmp_path / "t.json", tmp_path / "t.png", tmp_path / "t.md"
    monkeypatch.setattr(results_mod, "write_results", fake_write)
    (tmp_path / "p.yaml").write_text(f"protocol: x\nout: {tmp_path / 'runs'}\nbase: {{}}\npartition_from: a\n"
                                     "baselines: [{name: a}]\nhydranets: [{name: h}]\n")
    base = ["bench", "pareto", "--config", str(tmp_path / "p.yaml")]
    for extra in ([], ["--smoke"], ["--smoke", "--results", str(tmp_path / "mine")]):
        assert run(capsys, *base, *extra)[0] == 0
    assert written == [("x", Path("benchmarks/results")), ("x-smoke", tmp_path / "runs-smoke" / "results"),
                       ("x-smoke", tmp_path / "mine")]
    wrapper = Path(__file__).resolve().parents[1] / "benchmarks" / "pareto.py"
    calls = []
    monkeypatch.setattr(cli_mod, "main", lambda argv: calls.append(argv))
    for extra in ([], ["--smoke"], ["--results=elsewhere"]):
        monkeypatch.setattr(sys, "argv", [str(wrapper), "--config", "p.yaml", *extra])
        runpy.run_path(str(wrapper), run_name="__main__")
    assert [c.count("--results") + sum(a.startswith("--results=") for a in c) for c in calls] == [1, 0, 1]
    assert calls[0][2:4] == ["--results", str(wrapper.parent / "results")]


def test_eval_times_the_model_as_it_trained(runs, capsys, tmp_path, monkeypatch):
    """eval times each model in its run's memory format and autocast precision (the inputs were channels_last and
    the weights not; fp16 ran without autocast)."""
    import shutil

    import torch

    import hydranets.cost as cost_mod
    from hydranets.checkpoint import CHECKPOINT
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        run_dir = tmp_path / precision
        shutil.copytree(runs["baseline"], run_dir)
        ckpt = torch.load(run_dir / CHECKPOINT, weights_only=True)
        ckpt["config"]["train"].update(channels_last=True, precision=precision)
        torch.save(ckpt, run_dir / CHECKPOINT)
        seen = []

        def fake_speed(candidates, size, batch_size, **kw):
            convs = {n: next(c for c in m.modules() if isinstance(c, torch.nn.Conv2d)) for n, (m, _) in candidates.items()}
            seen.append((kw["autocast"], kw["channels_last"],
                         {n: c.weight.is_contiguous(memory_format=torch.channels_last) for n, c in convs.items()}))
            return {n: {"images_per_s": 1.0, "spread": 1.0} for n in candidates}
        monkeypatch.setattr(cost_mod, "compare_speed", fake_speed)
        monkeypatch.setattr(cost_mod, "model_macs", lambda *a, **k: 1.0)
        monkeypatch.setattr("hydranets.evaluate.evaluate", lambda *a, **k: {"top1": 1.0, "top5": 1.0})
        code, _, err = run(capsys, "eval", str(run_dir), *SPEED)
        assert code == 0, err
        assert seen == [(dtype, True, {"None": True, "None folded": True})]


@pytest.mark.parametrize("command", ["train", "pipeline"])
def test_out_as_an_option_points_to_the_override(capsys, tmp_path, command):
    code, _, err = run(capsys, command, "--out", str(tmp_path / "run"), "train.epochs=1")
    assert code == 2
    one_error_line(err, f"the run folder is the override out={tmp_path / 'run'}, not --out")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- your own model
MY_MODEL = '''
import hydranets

@hydranets.register_model
def tiny_mine(num_classes=10, in_chans=3, **kwargs):
    return hydranets.create_model("resnet_cifar", num_classes=num_classes, in_chans=in_chans, depth=8, width=0.25)
'''


def test_a_users_model_module_is_imported_for_training_and_again_for_loading(capsys, tmp_path, monkeypatch):
    """model.modules names the module that registers the user's model: training imports it, the run records it, and
    a later process that loads the run (eval here, in a fresh interpreter) imports it again."""
    (tmp_path / "mynets_for_test.py").write_text(MY_MODEL)
    monkeypatch.chdir(tmp_path)
    base = [a for a in BASE if not a.startswith("model.")] + ["train.epochs=1"]
    code, _, err = run(capsys, "train", *base, "model.name=tiny_mine", f"out={tmp_path / 'r0'}")
    assert code == 2
    one_error_line(err, "unknown model 'tiny_mine'")
    code, _, err = run(capsys, "train", *base, "model.name=tiny_mine", "model.modules=[no_such_module_here]",
                       f"out={tmp_path / 'r0'}")
    assert code == 2
    one_error_line(err, "model.modules: no module 'no_such_module_here' here or on the import path")
    code, _, err = run(capsys, "train", *base, "model.name=tiny_mine", "model.modules=[mynets_for_test]",
                       f"out={tmp_path / 'run'}")
    assert code == 0, err
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "hydranets", "eval", "run", *SPEED], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "tiny_mine on synthetic (100 test images)" in p.stdout
    p = subprocess.run([sys.executable, "-m", "hydranets", "eval", str(tmp_path / "run"), *SPEED], capture_output=True,
                       text=True, env=env, cwd=tmp_path.parent, timeout=300)   # where the module is not
    assert p.returncode == 2
    one_error_line(p.stderr, "model.modules: no module 'mynets_for_test' here or on the import path")
