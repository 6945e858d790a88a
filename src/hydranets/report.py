"""Run reports: PNG plots and one self-contained HTML page for a pipeline run folder.

Reads ``RUN/eval.json`` (required) and, when present, ``partition.json``, ``samples.npz`` and
``{baseline,hydranet}/metrics.jsonl``; writes ``RUN/plots/*.png`` and ``RUN/report.html`` with every
image inlined, so the page can be mailed or archived as one file.
"""
from __future__ import annotations

import base64
import html
import json
import math
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np

from .checkpoint import atomic_write_text
from .errors import HydraError
from .partition import Partition
from .reference_curves import PAPER_CIFAR100, PAPER_FAMILIES

Point = Union[tuple[float, float], tuple[float, float, str]]

PLOT_FILES = {
    "pareto": "accuracy_vs_macs.png",
    "subtasks": "subtasks.png",
    "routing": "routing.png",
    "training": "training.png",
}
RUN_NAMES = ("baseline", "hydranet")
MAX_IMAGES_PER_ROW = 24

_PAPER_STYLE = {
    "Hydra-Res": ("tab:purple", "-"),
    "ResNet-baseline": ("tab:purple", "--"),
    "Hydra-Dense": ("tab:brown", "-"),
    "DenseNet-baseline": ("tab:brown", "--"),
}


def _new_figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise HydraError("plots need matplotlib: pip install 'hydranets[report]'") from None
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def _check_points(name: str, points: Sequence[Point]) -> list[tuple[float, float, str | None]]:
    out = []
    for p in points:
        if not isinstance(p, (tuple, list)) or len(p) not in (2, 3):
            raise HydraError(f"curve {name!r}: points must be (macs, top1) or (macs, top1, label), got {p!r}")
        try:
            macs, top1 = float(p[0]), float(p[1])
        except (TypeError, ValueError):
            raise HydraError(f"curve {name!r}: point {p!r} is not numeric") from None
        if not (math.isfinite(macs) and math.isfinite(top1)) or macs <= 0:
            raise HydraError(f"curve {name!r}: point {p!r} needs finite values and macs > 0")
        out.append((macs, top1, str(p[2]) if len(p) == 3 else None))
    return sorted(out, key=lambda q: q[0])


def _draw_paper(ax: Any, label_prefix: str) -> list[float]:
    xs: list[float] = []
    for family, models in PAPER_FAMILIES.items():
        for model in models:
            pts = PAPER_CIFAR100[model]
            x = [g * 1000.0 for g, _ in pts]
            color, style = _PAPER_STYLE.get(model, ("gray", ":"))
            ax.plot(x, [t for _, t in pts], linestyle=style, marker=".", color=color, alpha=0.55,
                    label=f"{label_prefix}{model}")
            xs += x
    return xs


def _style_macs_axis(ax: Any, xs: Sequence[float]) -> None:
    from matplotlib.ticker import FuncFormatter

    if xs and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("multiply-adds per image (millions)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(True, alpha=0.3, which="both")


_LEGEND_INSIDE = 8  # curves that one panel's legend holds without hiding them
_CROWDED_LINES = (("-", "o"), ("--", "^"), (":", "D"))


def curve_styles(n: int) -> list[dict[str, Any]]:
    """Colour, line style and marker for ``n`` curves of a crowded plot: twenty colours, then the same colours
    dashed with other markers, then dotted, so no two of the first sixty curves look alike."""
    from matplotlib import colormaps

    colours = colormaps["tab20"].colors
    return [{"color": colours[i % len(colours)], "linestyle": _CROWDED_LINES[i // len(colours) % 3][0],
             "marker": _CROWDED_LINES[i // len(colours) % 3][1]} for i in range(n)]


def plot_pareto(families: Mapping[str, Sequence[Point]], path: str | Path, paper: bool = False, title: str = "",
                *, overlay_paper: bool = False) -> Path:
    """Plot top-1 against multiply-adds per image for named curves and save a PNG; returns its path.

    ``families`` maps a curve name to points ``(macs, top1_pct)`` with MACs as a plain count (drawn in
    millions); a third element labels the point (e.g. ``"k=2"``). ``paper`` adds a second panel with the
    paper's CIFAR-100 curves; ``overlay_paper`` draws them on the same axes instead, for CIFAR-100 runs.
    """
    if not isinstance(families, Mapping):
        raise HydraError("families must map a curve name to a list of (macs, top1) points")
    curves = {str(n): _check_points(str(n), pts) for n, pts in families.items()}
    curves = {n: pts for n, pts in curves.items() if pts}
    if not curves and not (paper or overlay_paper):
        raise HydraError("nothing to plot: every curve given to plot_pareto is empty")
    crowded = len(curves) > _LEGEND_INSIDE  # the legend goes below the panels, and twenty colours instead of ten
    rows = -(-len(curves) // 3) if crowded else 0
    fig = _new_figure(13.0 if paper else 8.0, 5.5 + 0.2 * rows)
    axes = fig.subplots(1, 2) if paper else [fig.subplots(1, 1)]
    ax = axes[0]
    styles = curve_styles(len(curves)) if crowded else [{} for _ in curves]
    xs: list[float] = []
    for (name, pts), style in zip(curves.items(), styles):
        x = [p[0] / 1e6 for p in pts]
        y = [p[1] for p in pts]
        line = ax.plot(x, y, marker=style.get("marker", "o") if len(pts) > 1 else "s",
                       markersize=6 if len(pts) > 1 else 8, color=style.get("color"),
                       linestyle=style.get("linestyle", "-") if len(pts) > 1 else "none", label=name)[0]
        for xi, yi, (_, _, lab) in zip(x, y, pts):
            if lab:
                ax.annotate(lab, (xi, yi), xytext=(5, 5), textcoords="offset points", fontsize=8,
                            color=line.get_color())
        xs += x
    if overlay_paper:
        xs += _draw_paper(ax, "paper, CIFAR-100: ")
    _style_macs_axis(ax, xs)
    ax.set_title(title or "accuracy vs. cost")
    if crowded:
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=8)
    elif curves or overlay_paper:
        ax.legend(fontsize=8, loc="best")
    if paper:
        pax = axes[1]
        _style_macs_axis(pax, _draw_paper(pax, ""))
        pax.set_title("the paper, CIFAR-100 (digitized)")
        pax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_means(curves: Mapping[str, Sequence[tuple[float, float, float | None, int]]], path: str | Path,
               title: str = "") -> Path:
    """Plot families on their means over seeds and save a PNG; returns its path.

    ``curves`` maps a family to points ``(macs, mean top-1 %, standard error or None, runs)``, as
    ``bench.compare.mean_curves`` gives them; each point carries a +-1 standard error bar and its number of runs.
    """
    curves = {str(n): list(pts) for n, pts in curves.items() if pts}
    if not curves:
        raise HydraError("nothing to plot: every curve given to plot_means is empty")
    fig = _new_figure(8.0, 5.5)
    ax = fig.subplots(1, 1)
    xs: list[float] = []
    for name, pts in curves.items():
        _check_points(name, [p[:2] for p in pts])
        x = [p[0] / 1e6 for p in pts]
        err = [p[2] if p[2] is not None else 0.0 for p in pts]
        bars = ax.errorbar(x, [p[1] for p in pts], yerr=err, marker="o", capsize=3, label=name)
        for xi, (_, yi, _, runs) in zip(x, pts):
            ax.annotate(f"{runs}", (xi, yi), xytext=(4, -11), textcoords="offset points", fontsize=7,
                        color=bars.lines[0].get_color())
        xs += x
    _style_macs_axis(ax, xs)
    ax.set_title(title or "families on their means")
    ax.legend(fontsize=8, loc="best", title="+-1 standard error; number: runs", title_fontsize=8)
    return _save(fig, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HydraError(f"cannot read {path}: {e}") from None


def _read_eval(run: Path) -> dict:
    path = run / "eval.json"
    if not path.is_file():
        raise HydraError(f"{path} not found; run `hydranets pipeline` first")
    ev = _read_json(path)
    if not isinstance(ev, dict) or not isinstance(ev.get("rows"), list) or not ev["rows"]:
        raise HydraError(f"{path} has no 'rows' list of evaluated models")
    for i, row in enumerate(ev["rows"]):
        if not isinstance(row, dict):
            raise HydraError(f"{path}: row {i} is not an object")
        for key in ("name", "top1", "macs"):
            if row.get(key) is None:
                raise HydraError(f"{path}: row {i} lacks {key!r}")
        for key in ("top1", "macs"):
            try:
                if isinstance(row[key], bool):
                    raise TypeError
                float(row[key])
            except (TypeError, ValueError):
                raise HydraError(f"{path}: row {i}: {key!r} must be a number, got {row[key]!r}") from None
    names = ev.get("class_names")
    n = ev.get("num_classes", len(names) if names else None)
    if not isinstance(n, int) or n < 1:
        raise HydraError(f"{path} lacks a positive 'num_classes'")
    if names is not None and len(names) != n:
        raise HydraError(f"{path} has {len(names)} class_names for num_classes={n}")
    ev["num_classes"] = n
    ev["class_names"] = [str(c) for c in names] if names else None
    ev["dataset"] = str(ev.get("dataset") or "")
    return ev


def _read_metrics(path: Path) -> list[dict]:
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise HydraError(f"cannot read {path}: {e}") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise HydraError(f"{path}:{i} is not JSON: {e}") from None
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _read_samples(path: Path, num_classes: int) -> np.ndarray:
    """The (classes, n, C, H, W) uint8 sample images; a damaged file is one HydraError naming the cure."""
    try:
        with np.load(path, allow_pickle=False) as z:
            images = z["images"]
    except Exception as e:  # noqa: BLE001 - a cut or damaged .npz raises BadZipFile, EOFError, zlib.error, ...
        raise HydraError(f"cannot read images from {path} ({type(e).__name__}: {e}); it is damaged or half-written: "
                         "delete it and eval.json and run `hydranets pipeline` again to rewrite both, or delete "
                         "only it to report without sample images") from None
    if images.ndim != 5 or images.shape[0] != num_classes or images.shape[2] not in (1, 3) or images.shape[1] < 1:
        raise HydraError(f"{path}: images must have shape ({num_classes}, n, 1 or 3, H, W), "
                         f"got {tuple(images.shape)}")
    if images.dtype != np.uint8:
        raise HydraError(f"{path}: images must be uint8, got {images.dtype}")
    return images


def _fmt(value: Any, scale: float = 1.0, digits: int = 2) -> str:
    if value is None:
        return "—"
    try:
        return f"{float(value) / scale:.{digits}f}"
    except (TypeError, ValueError):
        return html.escape(str(value))


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _figure_section(heading: str, caption: str, path: Path, extra: str = "") -> str:
    return (f"<section><h2>{_e(heading)}</h2>\n<p class=\"cap\">{_e(caption)}</p>\n"
            f"{_img_tag(path, heading)}\n{extra}</section>")


def _missing_section(heading: str, why: str) -> str:
    return f"<section><h2>{_e(heading)}</h2>\n<p class=\"missing\">Omitted: {_e(why)}</p></section>"


def _eval_table(rows: list[dict], folded: bool | None = None) -> str:
    head = ["name", "model", "k", "top-1 (%)", "top-5 (%)", "MMACs / image", "params (M)", "images/s"]
    body = []
    for r in rows:
        cells = [_e(r["name"]), _e(r.get("model") or "—"), _e("—" if r.get("k") is None else r["k"]),
                 _fmt(r["top1"]), _fmt(r.get("top5")), _fmt(r["macs"], 1e6), _fmt(r.get("params"), 1e6, 3),
                 _fmt(r.get("images_per_s"), 1.0, 0)]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    timed = {True: " Images/s with batch norms folded into the convolutions (as deployed).",
             False: " Images/s of the models as trained (batch norms not folded)."}.get(folded, "")
    return ("<section><h2>Evaluation</h2>\n<p class=\"cap\">Test-set accuracy and the cost of what runs per "
            f"image; k is the number of branches the HydraNet runs.{timed}</p>\n<table><thead><tr>"
            + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>\n" + "\n".join(body)
            + "\n</tbody></table></section>")


def _summary(rows: list[dict]) -> str:
    base = next((r for r in rows if r.get("k") is None), None)
    items = []
    for r in rows:
        if r.get("k") is None or base is None:
            continue
        ratio = float(base["macs"]) / float(r["macs"])
        diff = float(r["top1"]) - float(base["top1"])
        cost = f"{ratio:.2f}× fewer" if ratio >= 1 else f"{1 / ratio:.2f}× more"
        items.append(f"<li>{_e(r['name'])} k={_e(r['k'])}: {float(r['top1']):.2f}% top-1 "
                     f"({diff:+.2f} points vs. {_e(base['name'])}) at {float(r['macs']) / 1e6:.2f} MMACs, "
                     f"{cost} multiply-adds</li>")
    return "<ul class=\"summary\">" + "".join(items) + "</ul>" if items else ""


def _pareto_section(ev: dict, plots: Path) -> str:
    groups: dict[str, list[dict]] = {}
    for r in ev["rows"]:
        groups.setdefault(str(r["name"]), []).append(r)
    families: dict[str, list[Point]] = {}
    for name, rows in groups.items():
        models = {str(r.get("model")) for r in rows if r.get("model")}
        label = f"{name} ({models.pop()})" if len(models) == 1 else name
        pts: list[Point] = []
        for r in rows:
            tag = f"k={r['k']}" if r.get("k") is not None else (str(r.get("model") or name) if len(rows) > 1 else name)
            pts.append((float(r["macs"]), float(r["top1"]), tag))
        families[label] = pts
    cifar100 = ev["dataset"].lower().replace("-", "").replace("_", "") == "cifar100"
    path = plot_pareto(families, plots / PLOT_FILES["pareto"], title=f"{ev['dataset'] or 'run'}: accuracy vs. cost",
                       overlay_paper=cifar100)
    caption = ("Top-1 accuracy against multiply-adds per image of what actually runs; HydraNet points are "
               "labelled with k, the number of branches run per image.")
    if cifar100:
        caption += " Faint curves are the paper's CIFAR-100 results (digitized from its figure, ±0.1 points)."
    return _figure_section("Accuracy vs. multiply-adds", caption, path)


def _row_strip(images: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    n = images.shape[1]
    shown = list(classes)[:MAX_IMAGES_PER_ROW]
    per_class = max(1, min(n, MAX_IMAGES_PER_ROW // len(shown)))
    h = images.shape[3]
    gap, class_gap = 2, 8
    order = [(c, i) for c in shown for i in range(per_class)]
    tiles: list[np.ndarray] = []
    for pos, (c, i) in enumerate(order):
        tiles.append(np.transpose(images[c, i], (1, 2, 0)))
        if pos < len(order) - 1:
            width = gap if order[pos + 1][0] == c else class_gap
            tiles.append(np.full((h, width, images.shape[2]), 255, dtype=np.uint8))
    strip = np.concatenate(tiles, axis=1)
    return strip[:, :, 0] if images.shape[2] == 1 else strip


def _subtasks_section(part: Partition, names: list[str], images: np.ndarray | None, plots: Path) -> str:
    rows = "".join(f"<tr><td>{b}</td><td>{len(s)}</td><td>{_e(', '.join(names[c] for c in s))}</td></tr>"
                   for b, s in enumerate(part.subsets))
    table = ("<table><thead><tr><th>branch</th><th>size</th><th>classes</th></tr></thead>"
             f"<tbody>{rows}</tbody></table>\n")
    heading = "Subtasks"
    kind = f"method {part.kind}"
    if images is None:
        return (f"<section><h2>{heading}</h2>\n<p class=\"cap\">The classes each branch specialises in "
                f"({kind}).</p>\n<p class=\"missing\">Sample images omitted: samples.npz not found.</p>\n"
                f"{table}</section>")
    strips = [_row_strip(images, s) for s in part.subsets]
    widest = max(s.shape[1] for s in strips)
    strips = [np.pad(s, [(0, 0), (0, widest - s.shape[1])] + [(0, 0)] * (s.ndim - 2), constant_values=255)
              for s in strips]
    width_in = 12.0
    heights = [min(1.6, (width_in - 0.5) * s.shape[0] / s.shape[1]) + 0.45 for s in strips]
    fig = _new_figure(width_in, sum(heights) + 0.3)
    axes = fig.subplots(len(strips), 1, gridspec_kw={"height_ratios": heights}, squeeze=False)[:, 0]
    for b, (ax, strip) in enumerate(zip(axes, strips)):
        s = part.subsets[b]
        label = f"branch {b} ({len(s)} classes): " + ", ".join(names[c] for c in s)
        ax.imshow(strip, cmap="gray" if strip.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(textwrap.shorten(label, 190, placeholder=" …"), fontsize=8, loc="left")
        ax.set_axis_off()
    path = _save(fig, plots / PLOT_FILES["subtasks"])
    caption = (f"The classes each branch specialises in ({kind}), with test images of those classes "
               f"(at most {MAX_IMAGES_PER_ROW} per row).")
    return _figure_section(heading, caption, path, table)


def _routing_section(routing: Any, part: Partition | None, plots: Path) -> str:
    heading = "Routing"
    if not isinstance(routing, dict) or routing.get("matrix") is None:
        return _missing_section(heading, "eval.json has no 'routing' entry.")
    k = routing.get("k")
    try:
        matrix = np.asarray(routing["matrix"], dtype=np.float64)
        load = routing.get("load")
        by_images = load is not None or (isinstance(k, int) and part is not None and not part.overlap)
        if load is None:  # each image adds k to the matrix (once per chosen branch) when its class is in one subtask
            load = matrix.sum(0) * (k if by_images else 1) / max(matrix.sum(), 1.0)
        load = np.asarray(load, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise HydraError(f"eval.json: routing is not numeric: {e}") from None
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 1:
        raise HydraError(f"eval.json: routing matrix must be B x B, got shape {matrix.shape}")
    b = matrix.shape[0]
    if load.shape != (b,):
        raise HydraError(f"eval.json: routing load must have {b} entries, got shape {load.shape}")
    if part is not None and part.num_subsets != b:
        raise HydraError(f"eval.json routing has {b} branches but partition.json has {part.num_subsets} subtasks")
    rowsum = matrix.sum(1, keepdims=True)
    share = np.divide(matrix, rowsum, out=np.zeros_like(matrix), where=rowsum > 0)
    fig = _new_figure(12.0, 5.0)
    hax, bax = fig.subplots(1, 2, width_ratios=[1.1, 1.0])
    im = hax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=hax, shrink=0.85, label="share of the row's gate choices")
    if b <= 12:
        for i in range(b):
            for j in range(b):
                hax.text(j, i, f"{share[i, j]:.2f}", ha="center", va="center", fontsize=8,
                         color="white" if share[i, j] > 0.6 else "black")
    ticks = range(b) if b <= 20 else range(0, b, max(1, b // 10))
    hax.set_xticks(list(ticks))
    hax.set_yticks(list(ticks))
    hax.set_xlabel("branch chosen by the gate")
    hax.set_ylabel("true subtask of the image")
    hax.set_title(f"where the gate sends each subtask (k={k})" if k is not None else "where the gate sends each subtask")
    bax.bar(np.arange(b), load, color="tab:blue")
    bax.axhline(float(load.mean()), color="gray", linestyle="--", linewidth=1, label="even load")
    bax.set_xticks(list(ticks))
    bax.set_xlabel("branch")
    bax.set_ylabel("share of test images routed here" if by_images else "share of gate choices")
    bax.set_title("branch load")
    bax.legend(fontsize=8)
    path = _save(fig, plots / PLOT_FILES["routing"])
    caption = ("Left: for the test images of each true subtask (row), the share of gate choices going to each "
               "branch (rows sum to 1; each image counts once per chosen branch); a strong diagonal means images "
               "reach their subtask's branch. Right: share of " + ("test images routed to" if by_images else
                                                                "gate choices going to") + " each branch.")
    return _figure_section(heading, caption, path)


def _training_section(run: Path, plots: Path) -> str:
    heading = "Training curves"
    found = {n: _read_metrics(run / n / "metrics.jsonl") for n in RUN_NAMES if (run / n / "metrics.jsonl").is_file()}
    if not found:
        return _missing_section(heading, "no baseline/metrics.jsonl or hydranet/metrics.jsonl found.")
    keys = [("train_loss", "train loss"), ("test_top1", "test top-1 (%)")]
    if any("gate_recall" in r for recs in found.values() for r in recs):
        keys.append(("gate_recall", "gate recall"))
    fig = _new_figure(4.2 * len(keys) + 0.6, 4.0)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, (key, label) in zip(axes, keys):
        for name, recs in found.items():
            pts = [(r.get("epoch", i + 1), r[key]) for i, r in enumerate(recs)
                   if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 60 else None, label=name)
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    path = _save(fig, plots / PLOT_FILES["training"])
    caption = "Per-epoch training loss and test accuracy" + (", and the gate's recall of the true subtask" if
                                                              len(keys) == 3 else "") + "."
    missing = [n for n in RUN_NAMES if n not in found]
    if missing:
        caption += f" No metrics for: {', '.join(missing)}."
    return _figure_section(heading, caption, path)


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1250px; margin: 1.5em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
.cap { color: #555; margin-top: 0.2em; } .missing { color: #a33; font-style: italic; }
img { max-width: 100%; height: auto; display: block; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td:nth-child(n+3) { font-variant-numeric: tabular-nums; } th { background: #f2f2f2; }
"""


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/plots/*.png`` and a self-contained ``run_dir/report.html``; returns the HTML path.

    Sections whose input files are absent are left out, and the page says which and why.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise HydraError(f"{run} is not a folder; give the out= folder of a `hydranets pipeline` run")
    ev = _read_eval(run)
    plots = run / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for name in PLOT_FILES.values():
        (plots / name).unlink(missing_ok=True)
    n = ev["num_classes"]
    part = None
    if (run / "partition.json").is_file():
        part = Partition.load(run / "partition.json", expected_num_classes=n, expected_class_names=ev["class_names"])
    names = ev["class_names"] or (part.class_names if part and part.class_names else [str(c) for c in range(n)])
    images = _read_samples(run / "samples.npz", n) if (run / "samples.npz").is_file() else None

    sections = [_eval_table(ev["rows"], ev.get("fold_batchnorms")), _pareto_section(ev, plots)]
    if part is None:
        sections.append(_missing_section("Subtasks", "partition.json not found."))
    else:
        sections.append(_subtasks_section(part, names, images, plots))
    sections.append(_routing_section(ev.get("routing"), part, plots))
    sections.append(_training_section(run, plots))

    dataset = ev["dataset"] or "unknown data set"
    branches = f", {part.num_subsets} branches" if part else ""
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            f"<title>HydraNets report: {_e(dataset)}</title>\n<style>{_CSS}</style></head>\n<body>\n"
            f"<h1>HydraNets report: {_e(dataset)}</h1>\n"
            f"<p class=\"cap\">Run folder {_e(run.resolve().name)}; {n} classes{branches}.</p>\n"
            f"{_summary(ev['rows'])}\n" + "\n".join(sections) + "\n</body></html>\n")
    out = run / "report.html"
    atomic_write_text(page, out)
    return out
