"""The end-to-end pipeline on the built-in synthetic set: folder layout, tables, report, resumption, bad input."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import hydranets.run_folder as run_folder
import hydranets.train as train_mod
from hydranets import Partition
from hydranets.checkpoint import CHECKPOINT
from hydranets.cli import main
from hydranets.run_folder import read_metrics
from helpers import one_error_line, snapshot

# Small: 10 classes of 16x16 images, a ResNet-8 at half width, fp32 and contiguous (PyTorch 2.13's CPU backward of
# channels_last 1x1 stride-2 convolutions corrupts the heap), three baseline epochs (about 95% top-1) and two
# HydraNet epochs.
BRANCHES = 5
COMMON = ["data.name=synthetic", "model.name=resnet_cifar", "model.kwargs={depth: 8, width: 0.5}",
          "data.augment=none", "optim.lr=0.2", "optim.warmup_epochs=0", "train.epochs=3", "pipeline.hydra_epochs=2",
          "train.batch_size=32",
          "train.precision=fp32", "train.channels_last=false", "train.progress=false", "train.device=cpu",
          "train.threads=1", "pipeline.speed_repeats=2", "pipeline.speed_batch=32",
          f"hydra.num_branches={BRANCHES}", "hydra.topk=1"]
PLOTS = {"accuracy_vs_macs.png", "subtasks.png", "routing.png", "training.png"}
CLASSES = [f"class{c}" for c in range(10)]


pytestmark = pytest.mark.usefixtures("one_thread")


def pipeline(capsys, out: Path, *extra: str) -> tuple[int, str, str]:
    """``hydranets pipeline`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        main(["pipeline", *COMMON, f"out={out}", *extra])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def mtimes(folder: Path) -> dict[str, int]:
    return {run: (folder / run / CHECKPOINT).stat().st_mtime_ns for run in ("baseline", "hydranet")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One pipeline run, shared: its folder, stdout, stderr and the calls to the HydraNet's stem initialisation."""
    out = tmp_path_factory.mktemp("pipeline") / "run"
    real, calls = train_mod.init_stem_from, []

    def spy(model, path, *rest):
        calls.append(str(path))
        return real(model, path, *rest)

    o, e, n = io.StringIO(), io.StringIO(), torch.get_num_threads()
    train_mod.init_stem_from = spy  # capsys and monkeypatch are per test
    try:
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            main(["pipeline", *COMMON, f"out={out}"])
    finally:
        train_mod.init_stem_from = real
        torch.set_num_threads(n)
    return {"out": out, "stdout": o.getvalue(), "stderr": e.getvalue(), "init_calls": calls}


def copy_of(finished, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished["out"], dst)  # copy2: mtimes kept
    return dst


# ---------------------------------------------------------------- a full run
@pytest.mark.slow
def test_pipeline_writes_every_file(finished):
    out = finished["out"]
    for name in ("config.yaml", "partition.json", "eval.json", "samples.npz", "report.html"):
        assert (out / name).is_file(), name
    for run in ("baseline", "hydranet"):
        for name in ("config.yaml", "metrics.jsonl", CHECKPOINT, "model.safetensors", "summary.json"):
            assert (out / run / name).is_file(), f"{run}/{name}"
        assert json.loads((out / run / "summary.json").read_text())["finished"] is True
    assert json.loads((out / "baseline" / "summary.json").read_text())["hydra"] is False
    hyd = json.loads((out / "hydranet" / "summary.json").read_text())
    assert hyd["hydra"] is True and hyd["epochs"] == 2
    assert hyd["machine"]["torch"] == torch.__version__ and hyd["machine"]["threads"] == torch.get_num_threads()
    assert [r["epoch"] for r in read_metrics(out / "hydranet")] == [1, 2]
    assert [r["epoch"] for r in read_metrics(out / "baseline")] == [1, 2, 3]
    assert {p.name for p in (out / "plots").glob("*.png")} == PLOTS
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (10, 6, 3, 16, 16) and images.dtype == np.uint8


@pytest.mark.slow
def test_pipeline_eval_rows(finished):
    ev = json.loads((finished["out"] / "eval.json").read_text())
    assert ev["dataset"] == "synthetic" and ev["num_classes"] == 10 and ev["class_names"] == CLASSES
    assert ev["fold_batchnorms"] is True  # timed as deployed
    rows = ev["rows"]
    assert [(r["name"], r["k"]) for r in rows] == [("baseline", None)] + [("hydranet", k)
                                                                          for k in range(1, BRANCHES + 1)]
    for r in rows:
        assert 0 <= r["top1"] <= r["top5"] <= 100
        assert r["images_per_s"] > 0
    # multiply-adds per 16x16 image of every convolution and linear layer that runs, counted by hooks
    base_model, hydra = (train_mod.load_trained(finished["out"] / run)[0].eval() for run in ("baseline", "hydranet"))

    def macs(module, x):
        counted = []
        hooks = [m.register_forward_hook(lambda m, i, o: counted.append(o.numel() * m.weight[0].numel()))
                 for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        with torch.no_grad():
            module(x)
        for h in hooks:
            h.remove()
        return sum(counted)

    x = torch.zeros(1, 3, 16, 16)
    assert rows[0]["macs"] == macs(base_model, x)
    assert rows[0]["params"] == sum(p.numel() for p in base_model.parameters())
    with torch.no_grad():
        feats = hydra.stem(x)
    shared = macs(hydra.stem, x) + macs(hydra.gate, feats) + macs(hydra.classifier, torch.zeros(1, hydra.num_features))
    shared += macs(hydra.shared, torch.zeros(1, hydra.shared.in_features))  # the shared path (hydra.shared_path)
    branch = macs(hydra.branches[0], feats)
    branch_params = sum(p.numel() for p in hydra.branches[0].parameters())
    hyd = rows[1:]
    for k, r in enumerate(hyd, 1):
        assert r["macs"] == shared + k * branch
        assert r["params"] == sum(p.numel() for p in hydra.parameters())
        assert r["active_params"] == r["params"] - (BRANCHES - k) * branch_params
    # the HydraNet's k=1 row is the model its training evaluated at the end (hydra.topk=1)
    last = read_metrics(finished["out"] / "hydranet")[-1]
    assert hyd[0]["top1"] == pytest.approx(last["test_top1"])
    # the baseline row is the trained baseline (the synthetic set is learnable: far above 10% chance)
    base = json.loads((finished["out"] / "baseline" / "summary.json").read_text())
    assert rows[0]["top1"] == pytest.approx(base["test_top1"]) and rows[0]["top1"] > 50
    assert ev["routing"]["k"] == 1 and len(ev["routing"]["load"]) == BRANCHES


@pytest.mark.slow
def test_pipeline_prints_partition_and_results(finished):
    stdout, out = finished["stdout"], finished["out"]
    part = Partition.load(out / "partition.json")
    assert f"{BRANCHES} subtasks over 10 classes (kmeans)" in stdout
    for b, subset in enumerate(part.subsets):
        line = f"{b:>7}  {len(subset):>4}  " + ", ".join(CLASSES[c] for c in subset)
        assert line in stdout.splitlines()
    lines = stdout.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("model") and "top-1" in l and "MMACs" in l)
    table = lines[header + 1:header + 2 + BRANCHES]
    ev = json.loads((out / "eval.json").read_text())
    for line, row in zip(table, ev["rows"]):
        cells = line.split()
        assert cells[0] == row["name"] and cells[1] == (str(row["k"]) if row["k"] else "-")
        assert float(cells[2]) == pytest.approx(row["top1"], abs=0.006)
        assert float(cells[4]) == pytest.approx(row["macs"] / 1e6, abs=0.006)
    assert f"report: {out / 'report.html'}" in stdout
    # the progress log goes to stderr, the tables to stdout
    assert "[pipeline] 5/5 report" in finished["stderr"] and "[pipeline]" not in stdout
    # step 4 reports each model's top-1 as it is measured, then the timing, before its table
    for row in ev["rows"]:
        label = f"{row['name']} k={row['k']}" if row["k"] else row["name"]
        assert f"[pipeline]   {label}: top-1 {row['top1']:.2f}%" in finished["stderr"]
    assert f"[pipeline]   timing {1 + BRANCHES} models at batch" in finished["stderr"]


@pytest.mark.slow
def test_pipeline_partition_is_disjoint_cover(finished):
    out = finished["out"]
    part = Partition.load(out / "partition.json", expected_num_classes=10, expected_class_names=CLASSES)
    raw = json.loads((out / "partition.json").read_text())
    assert part.num_subsets == BRANCHES and not part.overlap and part.method == "kmeans"
    flat = [c for s in raw["subsets"] for c in s]
    assert sorted(flat) == list(range(10)) and len(flat) == len(set(flat))
    assert [len(s) for s in raw["subsets"]] == [2] * BRANCHES
    assert raw["meta"]["dataset"] == "synthetic"
    # the HydraNet was trained with exactly these subtasks
    ckpt = torch.load(out / "hydranet" / CHECKPOINT, map_location="cpu", weights_only=True)
    assert ckpt["partition"]["subsets"] == raw["subsets"]


@pytest.mark.slow
def test_pipeline_initialises_hydranet_stem_from_baseline(finished):
    # pipeline.init_stem defaults to true: the fresh HydraNet starts from the trained baseline's stages
    assert finished["init_calls"] == [str(finished["out"] / "baseline")]


@pytest.mark.slow
def test_report_inlines_every_plot(finished):
    out = finished["out"]
    html = (out / "report.html").read_text()
    pngs = sorted((out / "plots").glob("*.png"))
    assert {p.name for p in pngs} == PLOTS
    inlined = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    for p in pngs:
        assert base64.b64encode(p.read_bytes()).decode() in inlined, p.name
    assert "<img" in html and 'src="plots/' not in html  # self-contained
    assert "Images/s with batch norms folded into the convolutions (as deployed)." in html


# ---------------------------------------------------------------- resumption
@pytest.mark.slow
def test_rerun_retrains_nothing(finished, tmp_path, capsys, monkeypatch):
    out = copy_of(finished, tmp_path)
    before, ev_before = mtimes(out), (out / "eval.json").read_bytes()
    summaries = {r: (out / r / "summary.json").read_bytes() for r in ("baseline", "hydranet")}
    part = (out / "partition.json").read_bytes()
    monkeypatch.setattr(train_mod, "train_one_epoch", lambda *a, **k: pytest.fail("retrained an epoch"))
    monkeypatch.setattr("hydranets.pipeline.evaluate_models", lambda *a, **k: pytest.fail("re-evaluated"))
    code, stdout, err = pipeline(capsys, out)
    assert code == 0, err
    assert mtimes(out) == before and (out / "eval.json").read_bytes() == ev_before
    assert {r: (out / r / "summary.json").read_bytes() for r in summaries} == summaries
    assert (out / "partition.json").read_bytes() == part
    assert "4/5 evaluation (done)" in err and "2/5 subtasks" in err and "(done)" in err
    assert "subtasks over 10 classes" in stdout and "hydranet" in stdout


@pytest.mark.slow
def test_deleted_eval_is_recomputed_alone(finished, tmp_path, capsys, monkeypatch):
    out = copy_of(finished, tmp_path)
    old = json.loads((out / "eval.json").read_text())
    (out / "eval.json").unlink()
    (out / "report.html").unlink()
    before = mtimes(out)
    monkeypatch.setattr(train_mod, "train_one_epoch", lambda *a, **k: pytest.fail("retrained an epoch"))
    code, _, err = pipeline(capsys, out)
    assert code == 0, err
    assert mtimes(out) == before
    new = json.loads((out / "eval.json").read_text())
    assert [(r["name"], r["k"], r["top1"], r["top5"], r["macs"], r["params"]) for r in new["rows"]] == \
        [(r["name"], r["k"], r["top1"], r["top5"], r["macs"], r["params"]) for r in old["rows"]]
    assert (out / "report.html").is_file()


@pytest.mark.slow
def test_killed_hydranet_training_continues_from_checkpoint(finished, tmp_path, capsys, monkeypatch):
    out = copy_of(finished, tmp_path)
    shutil.rmtree(out / "hydranet")
    for name in ("eval.json", "report.html", "samples.npz"):
        (out / name).unlink()
    base_mtime = (out / "baseline" / CHECKPOINT).stat().st_mtime_ns
    real, epochs, kill = train_mod.train_one_epoch, [], [True]

    def killed_in_second_epoch(cfg, net, model, hydra, *args):
        epoch = args[-3]
        if kill[0] and hydra is not None and epoch == 1:
            raise KeyboardInterrupt
        epochs.append((hydra is not None, epoch))
        return real(cfg, net, model, hydra, *args)

    monkeypatch.setattr(train_mod, "train_one_epoch", killed_in_second_epoch)
    code, _, err = pipeline(capsys, out)
    assert code == 130 and "interrupted" in err
    assert epochs == [(True, 0)]
    ckpt = torch.load(out / "hydranet" / CHECKPOINT, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1
    assert not (out / "hydranet" / "summary.json").exists() and not (out / "eval.json").exists()

    epochs.clear()
    kill[0] = False
    code, _, err = pipeline(capsys, out)
    assert code == 0, err
    assert epochs == [(True, 1)]  # only the HydraNet's second epoch; the baseline is not touched
    assert "resuming" in err and "after epoch 1" in err
    assert (out / "baseline" / CHECKPOINT).stat().st_mtime_ns == base_mtime
    assert [r["epoch"] for r in read_metrics(out / "hydranet")] == [1, 2]
    assert json.loads((out / "hydranet" / "summary.json").read_text())["epochs"] == 2
    assert len(json.loads((out / "eval.json").read_text())["rows"]) == 1 + BRANCHES


def test_a_resumed_baseline_keeps_its_precision_and_the_subtasks_follow_it(tmp_path, capsys, monkeypatch):
    """precision=auto: a baseline started in fp32 (here: auto made to pick fp32) and resumed where auto picks bf16
    ends in fp32, with a note, and its subtasks are computed in fp32 too."""
    from hydranets.evaluate import resolve_precision
    if resolve_precision("auto", torch.device("cpu")) == "fp32":
        pytest.skip("this CPU has no fast bf16, so train.precision=auto picks fp32 either way")
    out, auto = tmp_path / "run", [a for a in COMMON if not a.startswith("train.precision")] + ["train.precision=auto"]
    real_epoch, real_resolve, seen = train_mod.train_one_epoch, run_folder.resolve_precision, []

    def killed_in_second_epoch(cfg, net, model, hydra, *args):
        if args[-3] == 1:
            raise KeyboardInterrupt
        return real_epoch(cfg, net, model, hydra, *args)

    def run(*patches) -> tuple[int, str]:
        capsys.readouterr()
        with pytest.MonkeyPatch.context() as mp:
            for patch in patches:
                mp.setattr(*patch)
            try:
                main(["pipeline", *auto, f"out={out}"])
                code = 0
            except SystemExit as e:
                code = e.code
        return code, capsys.readouterr().err

    def stop_at_subtasks(cfg, *args):
        seen.append(cfg.train.precision)
        raise KeyboardInterrupt

    code, _ = run((train_mod, "train_one_epoch", killed_in_second_epoch),
                  (run_folder, "resolve_precision", lambda p, d: "fp32" if p == "auto" else real_resolve(p, d)))
    assert code == 130 and torch.load(out / "baseline" / CHECKPOINT, weights_only=True)["epoch"] == 1
    code, err = run(("hydranets.pipeline.compute_partition", stop_at_subtasks))
    assert code == 130 and "was started in fp32; it continues in fp32" in err
    assert "precision: fp32" in (out / "baseline" / "config.yaml").read_text()
    assert [r["epoch"] for r in read_metrics(out / "baseline")] == [1, 2, 3] and seen == ["fp32"]


# ---------------------------------------------------------------- bad input
def test_too_many_branches_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_mod, "train_one_epoch", lambda *a, **k: pytest.fail("trained despite bad input"))
    out = tmp_path / "run"
    code, _, err = pipeline(capsys, out, "hydra.num_branches=12")
    assert code == 2
    line = one_error_line(err)
    assert "hydra.num_branches=12" in line and "10 classes" in line
    # nothing was written, so the same folder still takes the corrected config
    assert not (out / "config.yaml").exists() and not (out / "baseline").exists()


def test_a_class_without_training_images_fails_before_training(tmp_path, capsys, monkeypatch):
    """The subtasks need every class; a train_subset too small to hold one stopped the pipeline only after the
    baseline had trained."""
    monkeypatch.setattr(train_mod, "train_one_epoch", lambda *a, **k: pytest.fail("trained despite bad input"))
    code, _, err = pipeline(capsys, tmp_path / "run", "data.train_subset=6")
    assert code == 2
    one_error_line(err, "have no training images (data.train_subset=6)", "larger train_subset")
    assert not (tmp_path / "run").exists()


def test_a_negative_partition_seed_fails_before_training(tmp_path, capsys, monkeypatch):
    """numpy refused it only when the subtasks were computed, after the baseline, and the folder then kept it."""
    monkeypatch.setattr(train_mod, "train_one_epoch", lambda *a, **k: pytest.fail("trained despite bad input"))
    code, _, err = pipeline(capsys, tmp_path / "run", "partition.seed=-1")
    assert code == 2
    one_error_line(err, "partition seed (partition.seed, or partition --seed) must be an integer >= 0, got -1")
    assert not (tmp_path / "run").exists()


def test_topk_above_branches_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_mod, "train_one_epoch", lambda *a, **k: pytest.fail("trained despite bad input"))
    code, _, err = pipeline(capsys, tmp_path / "run", f"hydra.topk={BRANCHES + 1}")
    assert code == 2 and f"hydra.topk={BRANCHES + 1}" in one_error_line(err)


@pytest.mark.slow
def test_too_many_branches_keeps_a_finished_folder(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    code, _, err = pipeline(capsys, out, "hydra.num_branches=11")
    assert code == 2 and "hydra.num_branches=11" in one_error_line(err)
    assert snapshot(out) == before


@pytest.mark.slow
def test_partition_of_another_data_set_is_refused(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    shutil.rmtree(out / "hydranet")
    (out / "eval.json").unlink()
    Partition([[c for c in range(12) if c % 2 == b] for b in range(2)], 12,
              [f"other{c}" for c in range(12)]).save(out / "partition.json")
    code, _, err = pipeline(capsys, out)
    assert code == 2
    line = one_error_line(err)
    assert "partition.json" in line and "another data set" in line and "12 classes" in line
    assert not (out / "hydranet").exists() and not (out / "eval.json").exists()
    assert (out / "baseline" / "summary.json").exists()


def test_train_refuses_partition_of_another_data_set(tmp_path, capsys):
    part = tmp_path / "p.json"
    Partition([list(range(6)), list(range(6, 12))], 12).save(part)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train", *COMMON, f"out={tmp_path / 'h'}", "hydra.enabled=true", f"hydra.partition={part}"])
    assert e.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "another data set" in line and "12 classes" in line
    assert not (tmp_path / "h").exists()


@pytest.mark.slow
@pytest.mark.parametrize("override, key", [("model.kwargs={depth: 8, width: 0.25}", "model.kwargs"),
                                           ("data.classes=8", "data.classes"),
                                           ("train.epochs=2", "train.epochs")])
def test_folder_of_another_config_is_refused(finished, tmp_path, capsys, override, key):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    code, _, err = pipeline(capsys, out, override)
    assert code == 2
    line = one_error_line(err)
    assert key in line and "another out=" in line
    assert snapshot(out) == before


# ---------------------------------------------------------------- forking the HydraNet off the baseline mid-schedule
def test_fork_epoch_splits_one_schedule_between_baseline_and_hydranet():
    from hydranets.config import Config
    from hydranets.pipeline import stage_configs
    cfg = Config(out="runs/x")
    cfg.train.epochs, cfg.train.keep_epochs, cfg.pipeline.fork_epoch = 20, [10], 5
    base, hyd = stage_configs(cfg)
    assert base.train.epochs == 20 and base.train.keep_epochs == [5, 10]
    assert hyd.hydra.init_from == str(Path("runs/x/baseline/checkpoints/epoch5.pt"))
    assert (hyd.train.epochs, hyd.optim.schedule_epochs, hyd.optim.schedule_start) == (15, 20, 5)
    assert cfg.train.keep_epochs == [10]  # the user's config is not changed


@pytest.mark.slow
def test_pipeline_fork_epoch_continues_the_baselines_schedule(tmp_path, capsys, monkeypatch):
    real, calls = train_mod.init_stem_from, []
    monkeypatch.setattr(train_mod, "init_stem_from", lambda model, path, *rest: calls.append(path) or
                        real(model, path, *rest))
    out = tmp_path / "run"
    code, _, err = pipeline(capsys, out, "pipeline.hydra_epochs=null", "pipeline.fork_epoch=1")
    assert code == 0, err
    kept = out / "baseline" / "checkpoints" / "epoch1.pt"
    assert calls == [str(kept)] and kept.exists()
    base, hyd = read_metrics(out / "baseline"), read_metrics(out / "hydranet")
    assert len(base) == 3 and len(hyd) == 2
    # one learning-rate schedule: the HydraNet's two epochs end where the baseline's last two ended
    assert [r["lr"] for r in hyd] == pytest.approx([r["lr"] for r in base[1:]])


@pytest.mark.parametrize("extra, words", [
    (["pipeline.hydra_epochs=null", "pipeline.fork_epoch=3"], ["pipeline.fork_epoch=3", "train.epochs-1=2"]),
    (["pipeline.fork_epoch=1"], ["pipeline.fork_epoch", "pipeline.hydra_epochs"]),
])
def test_bad_fork_epoch_is_refused_before_training(tmp_path, capsys, monkeypatch, extra, words):
    monkeypatch.setattr(train_mod, "train_one_epoch", lambda *a, **k: pytest.fail("trained despite bad input"))
    out = tmp_path / "run"
    code, _, err = pipeline(capsys, out, *extra)
    assert code == 2
    one_error_line(err, *words)
    assert not out.exists()


@pytest.mark.parametrize("name", ["pipeline-cifar100", "pipeline-tiny-imagenet-32"])
def test_shipped_pipeline_configs_fork_the_upcycled_hydranet_early(name):
    """The full-size pipelines use the best measured design: upcycled full-width branches forked off the baseline
    after a tenth of its schedule, trained the rest of it."""
    from hydranets.config import load_config
    from hydranets.pipeline import stage_configs
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    base, hyd = stage_configs(cfg)
    assert base.train.keep_epochs == [10] and hyd.hydra.init_from.endswith(str(Path("baseline/checkpoints/epoch10.pt")))
    assert (hyd.train.epochs, hyd.optim.schedule_start, hyd.optim.schedule_epochs) == (90, 10, 100)
    assert (hyd.hydra.branch_width, hyd.hydra.gate_width, hyd.hydra.shared_path) == (1.0, 1.0, True)


@pytest.mark.parametrize("setting", ["pipeline.speed_repeats=0", "pipeline.speed_batch=0", "pipeline.hydra_epochs=0"])
def test_bad_pipeline_settings_are_refused_before_training(tmp_path, capsys, monkeypatch, setting):
    """speed_repeats=0 failed with a traceback at the evaluation, after both trainings (speed_batch=0 then also locked
    the folder); hydra_epochs=0 silently trained train.epochs."""
    monkeypatch.setattr(train_mod, "train_one_epoch", lambda *a, **k: pytest.fail("trained despite bad input"))
    out = tmp_path / "run"
    code, _, err = pipeline(capsys, out, setting)
    assert code == 2
    one_error_line(err, f"{setting} must be at least 1")
    assert not out.exists()


def test_a_config_that_fails_before_training_does_not_lock_the_folder(tmp_path, capsys, monkeypatch):
    """A pipeline whose config fails before anything is computed (here a model that cannot be built) leaves a
    folder that takes the corrected config; it used to be refused as "made with" the broken one."""
    monkeypatch.setattr(train_mod, "train_one_epoch", lambda *a, **k: pytest.fail("trained despite bad input"))
    out = tmp_path / "run"
    code, _, err = pipeline(capsys, out, "model.kwargs={depth: 8, bogus: 1}")
    assert code == 2
    one_error_line(err, "cannot be built", "bogus")
    code, _, err = pipeline(capsys, out, "model.kwargs={depth: 8, width: 0.5, typo: 1}")
    assert code == 2
    one_error_line(err, "cannot be built", "typo")
    assert not (out / "baseline").exists()
