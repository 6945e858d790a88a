import base64
import io
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

from hydranets.errors import HydraError  # noqa: E402
from hydranets.partition import Partition, partition_random  # noqa: E402
from hydranets.report import PLOT_FILES, curve_styles, plot_means, plot_pareto, write_report  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
NAMES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def make_run(root: Path, dataset: str = "fashion-mnist", channels: int = 1, partition: bool = True,
             samples: bool = True, metrics: tuple[str, ...] = ("baseline", "hydranet"), routing: bool = True) -> Path:
    """A pipeline run folder in the documented shape, 10 classes and 3 branches, random but valid."""
    rng = np.random.default_rng(0)
    run = root / "run"
    run.mkdir()
    rows = [{"name": "baseline", "model": "resnet20", "k": None, "top1": 91.2, "top5": 99.8, "macs": 40.8e6,
             "params": 0.27e6, "images_per_s": 1234.0}]
    for k, (top1, macs) in enumerate([(89.37, 15.5e6), (90.64, 27.25e6), (91.05, 39.0e6)], 1):
        rows.append({"name": "hydranet", "model": "hydra_resnet20", "k": k, "top1": top1, "top5": 99.5 + k / 10,
                     "macs": macs, "params": 0.61e6, "images_per_s": 2000.0 - 300 * k})
    ev = {"dataset": dataset, "num_classes": 10, "class_names": NAMES, "rows": rows}
    if routing:
        matrix = rng.integers(0, 50, (3, 3)) + np.diag([900, 1100, 1000])
        ev["routing"] = {"k": 2, "matrix": matrix.tolist(), "load": [0.62, 0.71, 0.67]}
    (run / "eval.json").write_text(json.dumps(ev))
    if partition:
        partition_random(10, 3, seed=1, class_names=NAMES).save(run / "partition.json")
    if samples:
        images = rng.integers(0, 256, (10, 4, channels, 28, 28), dtype=np.uint8)
        np.savez(run / "samples.npz", images=images)
    for name in metrics:
        (run / name).mkdir()
        lines = []
        for epoch in range(1, 6):
            rec = {"epoch": epoch, "train_loss": 2.0 / epoch, "test_top1": 80 + 2 * epoch, "test_top5": 98.0,
                   "lr": 0.1 / epoch, "images_per_s": 900.0}
            if name == "hydranet":
                rec |= {"gate_recall": 0.8 + epoch / 50, "branch_load": [0.3, 0.4, 0.3]}
            lines.append(json.dumps(rec))
        (run / name / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def check_png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.format == "PNG"
    assert img.width > 300 and img.height > 150 and len(data) > 5000
    assert np.asarray(img.convert("L")).std() > 5
    return img


def test_full_report(tmp_path):
    run = make_run(tmp_path)
    out = write_report(run)
    assert out == run / "report.html"
    page = out.read_text(encoding="utf-8")
    pngs = sorted((run / "plots").glob("*.png"))
    assert [p.name for p in pngs] == sorted(PLOT_FILES.values())
    for p in pngs:
        check_png(p.read_bytes())
        assert page.count(base64.b64encode(p.read_bytes()).decode()) == 1
    uris = DATA_URI.findall(page)
    assert len(uris) == len(pngs) == page.count("<img ")
    for uri in uris:
        check_png(base64.b64decode(uri))
    for value in ["91.20", "99.80", "40.80", "0.270", "1234", "89.37", "15.50", "0.610", "1700", "hydra_resnet20"]:
        assert f"<td>{value}</td>" in page
    assert "2.63× fewer" in page
    assert "Omitted" not in page
    assert "sneaker" in page
    assert not re.search(r"<script|<link|https?://", page)


def colour_spread(path: Path) -> int:
    """The largest difference between two colour channels of a pixel: 0 for a grey image."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int(np.abs(np.diff(rgb, axis=2)).max())


def test_cifar100_overlay_and_color_samples(tmp_path):
    run = make_run(tmp_path, dataset="cifar100", channels=3)
    page = write_report(run).read_text(encoding="utf-8")
    assert "paper&#x27;s CIFAR-100" in page
    assert len(DATA_URI.findall(page)) == 4
    assert colour_spread(run / "plots" / PLOT_FILES["subtasks"]) > 100  # RGB samples drawn in colour
    (tmp_path / "grey").mkdir()
    grey = make_run(tmp_path / "grey")
    write_report(grey)
    assert colour_spread(grey / "plots" / PLOT_FILES["subtasks"]) == 0  # one-channel samples drawn in grey


def test_optional_files_missing(tmp_path):
    run = make_run(tmp_path, partition=False, samples=False, metrics=(), routing=False)
    (run / "plots").mkdir()
    (run / "plots" / PLOT_FILES["routing"]).write_bytes(b"stale")
    page = write_report(run).read_text(encoding="utf-8")
    assert [p.name for p in (run / "plots").glob("*.png")] == [PLOT_FILES["pareto"]]
    assert len(DATA_URI.findall(page)) == 1
    for why in ["partition.json not found", "no &#x27;routing&#x27; entry", "metrics.jsonl"]:
        assert why in page
    assert page.count("Omitted") == 3


def test_partition_without_samples_and_one_metrics_file(tmp_path):
    run = make_run(tmp_path, samples=False, metrics=("hydranet",))
    page = write_report(run).read_text(encoding="utf-8")
    assert "samples.npz not found" in page and "No metrics for: baseline" in page
    assert len(DATA_URI.findall(page)) == 3


def test_missing_eval_is_an_error(tmp_path):
    with pytest.raises(HydraError, match=r"eval\.json not found; run `hydranets pipeline` first"):
        write_report(tmp_path)


def test_bad_inputs_are_errors(tmp_path):
    run = make_run(tmp_path)
    partition_random(12, 3).save(run / "partition.json")
    with pytest.raises(HydraError, match="is for another data set"):
        write_report(run)
    partition_random(10, 2, class_names=NAMES).save(run / "partition.json")
    with pytest.raises(HydraError, match="routing has 3 branches"):
        write_report(run)
    (run / "eval.json").write_text(json.dumps({"dataset": "x", "num_classes": 10, "rows": [{"name": "a"}]}))
    with pytest.raises(HydraError, match="lacks 'top1'"):
        write_report(run)


def test_damaged_samples_file_is_one_error(tmp_path):
    run = make_run(tmp_path)
    path = run / "samples.npz"
    whole = path.read_bytes()
    for broken in (whole[: len(whole) // 2], b"", whole[:-30]):
        path.write_bytes(broken)
        with pytest.raises(HydraError, match=r"samples\.npz .*damaged or half-written: delete it and eval\.json"):
            write_report(run)
    np.savez(path, other=np.zeros(3))
    with pytest.raises(HydraError, match=r"samples\.npz .*KeyError"):
        write_report(run)
    path.unlink()
    assert "samples.npz not found" in write_report(run).read_text()


def test_plot_pareto_with_paper_panel(tmp_path):
    families = {"ours": [(30e6, 70.0, "k=1"), (50e6, 72.0, "k=2")], "base": [(60e6, 71.0)]}
    wide = check_png(plot_pareto(families, tmp_path / "a.png", paper=True, title="t").read_bytes())
    narrow = check_png(plot_pareto(families, tmp_path / "b.png").read_bytes())
    assert wide.width > narrow.width
    many = {f"curve {i}": [(30e6 + i * 1e6, 70.0 + i)] for i in range(12)}  # the legend moves below the panels
    crowded = check_png(plot_pareto(many, tmp_path / "e.png", paper=True).read_bytes())
    assert crowded.width == wide.width and crowded.height > wide.height
    with pytest.raises(HydraError, match="macs > 0"):
        plot_pareto({"x": [(0.0, 50.0)]}, tmp_path / "c.png")
    with pytest.raises(HydraError, match="nothing to plot"):
        plot_pareto({}, tmp_path / "d.png")


def test_crowded_curves_do_not_repeat_a_look():
    styles = curve_styles(60)
    looks = {(s["color"], s["linestyle"], s["marker"]) for s in styles}
    assert len(looks) == 60 and len({s["color"] for s in styles}) == 20
    assert styles[20]["color"] == styles[0]["color"] and styles[20]["linestyle"] != styles[0]["linestyle"]


def test_plot_means_draws_error_bars(tmp_path):
    def curves(se):
        return {"baseline": [(40e6, 32.0, se, 5), (70e6, 33.0, se, 9)], "hydranet": [(35e6, 32.5, None, 1)]}
    bare = plot_means(curves(None), tmp_path / "a.png").read_bytes()
    barred = plot_means(curves(1.5), tmp_path / "b.png").read_bytes()
    assert check_png(bare).width == check_png(barred).width and bare != barred
    assert plot_means(curves(None), tmp_path / "c.png").read_bytes() == bare  # deterministic: the bars made the change
    with pytest.raises(HydraError, match="macs > 0"):
        plot_means({"x": [(0.0, 50.0, None, 1)]}, tmp_path / "d.png")
    with pytest.raises(HydraError, match="nothing to plot"):
        plot_means({"x": []}, tmp_path / "e.png")


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)")
def test_report_renders_in_chromium(tmp_path):
    run = make_run(tmp_path)
    html_path = write_report(run).resolve()
    shot = tmp_path / "shot.png"
    base = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    res = subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,3000", html_path.as_uri()],
                         capture_output=True, timeout=180)
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-2000:]
    img = Image.open(shot)
    assert img.format == "PNG" and img.size[0] >= 1000
    assert np.asarray(img.convert("L")).astype(float).var() > 100
    res = subprocess.run([*base, "--dump-dom", html_path.as_uri()], capture_output=True, timeout=180)
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-2000:]
    dom = res.stdout.decode()
    imgs = re.findall(r"<img [^>]*>", dom)
    assert len(imgs) == len(PLOT_FILES)
    assert all('src="data:image/png;base64,' in tag for tag in imgs)


def routing_bars(monkeypatch, run: Path) -> tuple[list[float], str]:
    """Write the report and return the heights and y label of the routing plot's branch-load bars."""
    import hydranets.report as report
    figs = {}
    original = report._save

    def keep(fig, path):
        figs[Path(path).name] = fig
        return original(fig, path)

    monkeypatch.setattr(report, "_save", keep)
    write_report(run)
    bax = figs[PLOT_FILES["routing"]].axes[1]
    return [p.get_height() for p in bax.patches], bax.get_ylabel()


@pytest.mark.parametrize("load", ["absent", None])
def test_routing_load_without_a_load_entry_is_the_share_of_images(tmp_path, monkeypatch, load):
    """eval.json with a routing matrix but no (or a null) 'load': each branch's bar is the share of test images that ran
    it, as the pipeline writes it, computed here from the images' routes."""
    run = make_run(tmp_path, samples=False, metrics=())
    part = Partition.load(run / "partition.json")
    labels = np.arange(12) % 10
    routes = np.array([[0, 1]] * 6 + [[2, 0]] * 4 + [[1, 2]] * 2)  # k = 2; loads 10/12, 8/12, 6/12
    chosen = np.zeros((12, 3))
    np.put_along_axis(chosen, routes, 1.0, axis=1)
    matrix = part.membership().numpy()[labels].T @ chosen
    ev = json.loads((run / "eval.json").read_text())
    ev["routing"] = {"k": 2, "matrix": matrix.tolist()} | ({} if load == "absent" else {"load": load})
    (run / "eval.json").write_text(json.dumps(ev))
    heights, ylabel = routing_bars(monkeypatch, run)
    np.testing.assert_allclose(heights, chosen.mean(0))
    assert ylabel == "share of test images routed here"


def test_routing_load_as_written_is_drawn(tmp_path, monkeypatch):
    heights, _ = routing_bars(monkeypatch, make_run(tmp_path, samples=False, metrics=()))
    np.testing.assert_allclose(heights, [0.62, 0.71, 0.67])


@pytest.mark.parametrize("key, value", [("top1", "n/a"), ("macs", [1, 2]), ("top1", True)])
def test_non_numeric_row_is_an_error(tmp_path, key, value):
    run = make_run(tmp_path)
    ev = json.loads((run / "eval.json").read_text())
    ev["rows"][1][key] = value
    (run / "eval.json").write_text(json.dumps(ev))
    with pytest.raises(HydraError, match=f"row 1: {key!r} must be a number"):
        write_report(run)


def test_routing_load_of_overlapping_subtasks_without_a_load_entry_is_the_share_of_choices(tmp_path, monkeypatch):
    """With classes in two subtasks the matrix counts an image twice, so without 'load' the bars can only be the share
    of gate choices, and say so."""
    run = make_run(tmp_path, samples=False, metrics=())
    Partition([[0, 1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 7, 8, 9], [0, 1, 2, 7, 8, 9]], 10, NAMES, overlap=True).save(
        run / "partition.json")
    ev = json.loads((run / "eval.json").read_text())
    matrix = [[30, 10, 0], [0, 20, 20], [10, 0, 10]]
    ev["routing"] = {"k": 2, "matrix": matrix}
    (run / "eval.json").write_text(json.dumps(ev))
    heights, ylabel = routing_bars(monkeypatch, run)
    np.testing.assert_allclose(heights, [40 / 100, 30 / 100, 30 / 100])
    assert ylabel == "share of gate choices"
    assert "share of gate choices going to each branch" in (run / "report.html").read_text()
