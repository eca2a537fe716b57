"""`report.html`: a run's results as one static, self-contained page (figures inlined as PNG).

What it shows, from the run folder alone (eval.json, `<result>.metrics.jsonl`, predictions/):

- the results table (top-1, top-5, many / medium / few, macro-F1, worst class);
- the long tail: each class's accuracy against its training count, per method, and many / medium /
  few side by side per method (this pair is the "main figure", `main_figure`);
- per-epoch training loss and val top-1 (a selection's grid: one line per fit);
- the k sweep, when the run has `<method>@k<k>` results;
- the KB comparison, when finished runs of the same dataset and experiment with other KBs sit next to
  this one (the `kb_choice` experiment run once per KB);
- the main method's confusion matrix (rows: true class, normalised).

Figures are drawn on `matplotlib.figure.Figure` objects (the Agg canvas: no display, no pyplot state).
`python -m retformer.pipelines.report RUN_DIR [--png PATH]` rewrites a run's report (and saves its main
figure).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from retformer.artifacts.atomic import atomic_path
from retformer.artifacts.names import safe_name
from retformer.artifacts.workspace import read_json
from retformer.pipelines.report_diagnostics import (
    agreement_figure,
    attention_html,
    per_class_delta_figure,
    rule_html,
)
from retformer.pipelines.report_header import header_html
from retformer.pipelines.report_labels import class_ticks, label_points, plain_log_axis
from retformer.pipelines.report_retrieval import retrieval_figure, retrieval_html, retrieval_quality
from retformer.pipelines.report_tables import other_kb_tables, results_table
from retformer.trainer.evaluate import SHOT_GROUPS
from retformer.trainer.progress import val_figure

GROUP_COLORS = {"many": "#4c72b0", "medium": "#dd8452", "few": "#c44e52"}
RETRIEVAL = "Retrieval quality"  # the section shown also without a figure (it says why)


# ----------------------------------------------------------------------------------------- reading
def primary_results(report: dict[str, Any]) -> list[str]:
    """The results on the run's first eval split, in table order: no skipped method, no control
    (`<name>:shuffled`), no other eval split (`<name>@<split>`); k-sweep names (`@k8`) stay."""
    others = set(report.get("eval_splits", [])[1:])
    out = []
    for name, m in report["methods"].items():
        if "skipped" in m or ":" in name or m.get("top1") is None:
            continue
        if "@" in name and name.rsplit("@", 1)[1] in others:
            continue
        out.append(name)
    return out


def main_result(report: dict[str, Any]) -> str | None:
    """The result the confusion matrix shows: the first primary RetFormer result, else the first one."""
    names = primary_results(report)
    return next((n for n in names if n.startswith("retformer")), names[0] if names else None)


def read_metrics(run_dir: Path, name: str) -> list[dict[str, Any]]:
    """The per-epoch entries of a result's metrics file (`<result>.metrics.jsonl`); [] without one."""
    path = run_dir / f"{safe_name(name)}.metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sibling_runs(run_dir: Path, report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """KB name -> eval.json of the latest finished run of this dataset and experiment with that KB, in
    the runs folder that holds `run_dir` (this run included)."""
    found: dict[str, tuple[float, dict[str, Any]]] = {}
    for path in run_dir.parent.glob("*/eval.json"):
        other = read_json(path)
        if not other or other.get("dataset") != report["dataset"]:
            continue
        if other.get("experiment") != report["experiment"] or other.get("eval_split") != report["eval_split"]:
            continue
        mtime = path.stat().st_mtime
        kb = other.get("kb")
        if kb not in found or mtime > found[kb][0]:
            found[kb] = (mtime, other)
    found[report["kb"]] = (math.inf, report)
    return {kb: rep for kb, (_, rep) in sorted(found.items())}


# ------------------------------------------------------------------------------------------ figures
def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _pct(v: Any) -> float:
    return float("nan") if v is None else 100 * float(v)


def long_tail_axes(ax: Any, report: dict[str, Any], names: list[str]) -> list[tuple[float, float, str]]:
    """Per-class accuracy against the class's training count (log x), one series per result. Returns
    the points to name (`report_labels.label_points`): the first RetFormer result's (else the first
    result's), every class up to 30 classes, else the 10 with the lowest accuracy."""
    counts = report.get("train_class_counts")
    if not counts:
        ax.text(0.5, 0.5, "no training counts in eval.json", ha="center", transform=ax.transAxes)
        return []
    counts = np.asarray(counts, dtype=float)
    order = np.argsort(counts, kind="stable")
    series = {}
    for name in names:
        acc = np.array([_pct(a) for a in report["methods"][name].get("per_class", [])], dtype=float)
        if len(acc) != len(counts):
            continue
        series[name] = acc
        ax.plot(counts[order], acc[order], marker="o", markersize=3, linewidth=1, alpha=0.85, label=name)
    shot = report.get("shot_split") or {}
    group_counts = {g: [counts[c] for c in shot.get(g, []) if c < len(counts)] for g in SHOT_GROUPS}
    for low, high in (("few", "medium"), ("medium", "many")):
        if group_counts[low] and group_counts[high]:
            # between the groups' nearest classes (geometric mean: the axis is logarithmic)
            edge = math.sqrt(max(group_counts[low]) * min(group_counts[high]))
            ax.axvline(edge, color="grey", linestyle=":", linewidth=1)
            ax.text(edge, 102, f"{low} | {high}", fontsize=7, color="grey", ha="center")
    ax.set_xscale("log")
    plain_log_axis(ax, float(counts.min()), float(counts.max()))
    ax.set_xlabel("training images of the class (log)")
    ax.set_ylabel(f"accuracy on {report['eval_split']} (%)")
    ax.set_ylim(-2, 108)
    ax.set_title("per-class accuracy against training count")
    ax.legend(fontsize=7, loc="lower right")
    class_names = report.get("class_names") or []
    named = next((n for n in series if n.startswith("retformer")), next(iter(series), None))
    if named is None or len(class_names) != len(counts):
        return []
    acc = series[named]
    picked = order if len(counts) <= 30 else np.argsort(np.nan_to_num(acc, nan=1e9), kind="stable")[:10]
    return [(float(counts[c]), float(acc[c]), str(class_names[c])) for c in picked]


def bar_results(report: dict[str, Any], names: list[str]) -> list[str]:
    """The shot-group bars' results: `names`, each followed by its shuffled-neighbour control
    (`<name>:shuffled`) where the run evaluated one."""
    methods = report["methods"]
    out = []
    for name in names:
        out.append(name)
        control = methods.get(f"{name}:shuffled") or {}
        if "skipped" not in control and control.get("top1") is not None:
            out.append(f"{name}:shuffled")
    return out


def shot_bars_axes(ax: Any, report: dict[str, Any], names: list[str]) -> None:
    """Many / medium / few accuracy, one group of three bars per result; a shuffled-neighbour control
    (`:shuffled`) hatched, beside the result it controls."""
    x = np.arange(len(names))
    width = 0.8 / len(SHOT_GROUPS)
    for i, group in enumerate(SHOT_GROUPS):
        label = f"{group} ({len((report.get('shot_split') or {}).get(group, []))} classes)"
        for j, name in enumerate(names):
            control = name.endswith(":shuffled")
            ax.bar(
                x[j] + (i - 1) * width,
                _pct(report["methods"][name].get(group)),
                width,
                label=label if j == 0 else None,
                color=GROUP_COLORS[group],
                alpha=0.55 if control else 1.0,
                hatch="///" if control else None,
                edgecolor="white" if control else None,
            )
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 116)  # the legend sits above 100
    ax.set_yticks(range(0, 101, 20))
    ax.set_title("many / medium / few-shot accuracy (hatched: neighbours shuffled)")
    ax.legend(fontsize=7, ncols=3, loc="upper center")


def main_figure(report: dict[str, Any]) -> Figure:
    """The long-tail picture: per-class accuracy against training count, and the shot-group bars."""
    names = primary_results(report)
    fig = Figure(figsize=(13, 4.6), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1.25, 1])
    points = long_tail_axes(left, report, names)
    shot_bars_axes(right, report, bar_results(report, names))
    fig.suptitle(
        f"{report['dataset']} x {report['kb']}, {report['experiment']} ({report['eval_split']} split)"
    )
    label_points(fig, left, points)  # last: it fixes the layout to measure the labels
    return fig


def curves_figure(run_dir: Path, report: dict[str, Any]) -> Figure | None:
    """Training loss and val top-1 per epoch of every trained result: one colour per result, one line
    style per fit of its selection grid (the legend names the grid's fits)."""
    series = []  # (result, fit index, number of fits, rows)
    for name in primary_results(report):
        entries = read_metrics(run_dir, name)
        fits = sorted({e.get("fit", 1) for e in entries})
        for i, fit in enumerate(fits):
            series.append((name, i, len(fits), [e for e in entries if e.get("fit", 1) == fit]))
    if not series:
        return None
    with_val = any(val_figure(e) is not None for *_, rows in series for e in rows)
    fig = Figure(figsize=(13, 4.2) if with_val else (7.5, 4.2), layout="constrained")
    axes = fig.subplots(1, 2 if with_val else 1, squeeze=False)[0]
    colors = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(s[0] for s in series))}
    styles = ("-", "--", ":", "-.")
    for name, i, n, rows in series:
        label = None
        if i == 0:
            label = (
                name
                if n == 1
                else f"{name} ({n} fits: " + ", ".join(_fit_label(r) for r in _firsts(series, name)) + ")"
            )
        style = {"color": colors[name], "linestyle": styles[i % len(styles)], "linewidth": 0.9}
        epochs = [e["epoch"] for e in rows]
        axes[0].plot(epochs, [e.get("loss") for e in rows], label=label, **style)
        if with_val:
            axes[1].plot(epochs, [_pct(val_figure(e)) for e in rows], label=label, **style)
    axes[0].set(xlabel="epoch", ylabel="training loss", title="training loss per epoch")
    if with_val:
        # a selection records one val figure per choice (alpha, say): the best of them
        axes[1].set(xlabel="epoch", ylabel="val top-1 (%)", title="val top-1 per epoch")
    else:
        axes[0].set_title("training loss per epoch (no val split: no val figures)")
    for ax in axes:
        ax.legend(fontsize=6)
    return fig


def _firsts(series: list[tuple[str, int, int, list[dict[str, Any]]]], name: str) -> list[dict[str, Any]]:
    return [rows[0] for n, _, _, rows in series if n == name]


def _fit_label(entry: dict[str, Any]) -> str:
    """A fit's grid cell in a few characters: `lr 0.003`, `lr 0.003 la_tau 1.0` or `l2 0.0001`."""
    cfg = entry.get("fit_config") or {}
    parts = [f"{key} {cfg[key]:g}" for key in ("lr", "la_tau", "l2") if key in cfg]
    return " ".join(parts) or f"fit {entry.get('fit', 1)}"


def k_sweep_figure(report: dict[str, Any]) -> Figure | None:
    """Top-1 and many / medium / few against k, per method, where the run has `<method>@k<k>` results."""
    sweeps: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for name in primary_results(report):
        base, _, k = name.rpartition("@k")
        if base and k.isdigit():
            sweeps.setdefault(base, []).append((int(k), report["methods"][name]))
    sweeps = {b: sorted(v, key=lambda t: t[0]) for b, v in sweeps.items() if len(v) > 1}
    if not sweeps:
        return None
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    axes = fig.subplots(1, 4, sharey=True)
    for ax, metric in zip(axes, ("top1", *SHOT_GROUPS), strict=True):
        for base, points in sweeps.items():
            ax.plot([k for k, _ in points], [_pct(m.get(metric)) for _, m in points], marker="o", label=base)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="k (neighbors)", title=metric)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=7)
    return fig


def kb_figure(run_dir: Path, report: dict[str, Any]) -> Figure | None:
    """The main result's top-1 and many / medium / few per KB, where runs of this dataset and
    experiment exist for more than one KB."""
    runs = sibling_runs(run_dir, report)
    main = main_result(report)
    rows = {kb: rep["methods"][main] for kb, rep in runs.items() if main in rep.get("methods", {})}
    if len(rows) < 2:
        return None
    metrics = ("top1", *SHOT_GROUPS)
    fig = Figure(figsize=(8, 3.8), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(metrics))
    width = 0.8 / len(rows)
    for i, (kb, m) in enumerate(rows.items()):
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, [_pct(m.get(k)) for k in metrics], width, label=kb)
    ax.set_xticks(x, metrics)
    ax.set(ylabel="accuracy (%)", ylim=(0, 100), title=f"{main}: one run per knowledge base")
    ax.legend(fontsize=7)
    return fig


def confusion_figure(run_dir: Path, report: dict[str, Any], name: str) -> Figure | None:
    """Row-normalised confusion matrix of `name` from its predictions file."""
    rel = report["methods"][name].get("predictions")
    if not rel or not (run_dir / rel).is_file():
        return None
    import pyarrow.parquet as pq

    table = pq.read_table(run_dir / rel, columns=["label", "pred"])
    y, p = table.column("label").to_numpy(), table.column("pred").to_numpy()
    c = int(report["methods"][name].get("num_classes") or max(int(y.max()), int(p.max())) + 1)
    cm = np.zeros((c, c))
    np.add.at(cm, (y, p), 1)
    cm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    side = min(9.0, 3 + 0.35 * c)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    names = report.get("class_names") or []
    if len(names) == c and c <= 100:
        class_ticks(ax, names, "x", 0.8 * side)
        class_ticks(ax, names, "y", 0.8 * side)
    ax.set(xlabel="predicted class", ylabel="true class", title=f"confusion matrix: {name}")
    return fig


# --------------------------------------------------------------------------------------------- page
_CSS = (
    "body{font-family:sans-serif;max-width:1400px;margin:1em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;font-size:14px}td,th{padding:3px 10px;text-align:right;"
    "border-bottom:1px solid #ddd}td:first-child,th:first-child{text-align:left}"
    "img{max-width:100%}h2{margin-top:1.6em}.meta{color:#555;font-size:14px}"
    "table.header td{text-align:left}table.header th{text-align:left;color:#555;font-weight:normal}"
    "table.similarity,details{margin-top:1em}"
)


def build_html(run_dir: Path, report: dict[str, Any]) -> str:
    """The report page of a finished run (`report`: its eval.json)."""
    sections: list[tuple[str, str, Figure | None]] = [
        (
            "The long tail",
            "Left: each class's accuracy against its number of training images (dotted lines: the "
            "few / medium / many boundaries; the points named are RetFormer's). Right: accuracy over the "
            "test images of each shot group; hatched beside a result, the same model with its neighbours "
            "shuffled across images (the irrelevant-neighbour control).",
            main_figure(report),
        ),
        (
            "Training",
            "Per-epoch figures from the metrics files (<code>&lt;result&gt;.metrics.jsonl</code>); in a "
            "selection grid, one line per fit.",
            curves_figure(run_dir, report),
        ),
        ("Effect of k", "One result per k (the k_sweep experiment).", k_sweep_figure(report)),
        (
            "Choice of knowledge base",
            "The latest finished run of this dataset and experiment for each KB in this runs folder.",
            kb_figure(run_dir, report),
        ),
    ]
    sections += [
        (
            "Retrieval and agreement",
            "Test images binned by the share of their neighbours whose class (KB label, or the class their "
            "caption names) is the image's true label; each method's accuracy per bin.",
            agreement_figure(report),
        ),
        (
            "RetFormer minus mlp_only per class",
            "Accuracy difference in points, per class.",
            per_class_delta_figure(report),
        ),
    ]
    quality = retrieval_quality(run_dir, report)
    figure = None if isinstance(quality, str) else retrieval_figure(quality)
    sections.insert(1, (RETRIEVAL, retrieval_html(quality), figure))
    main = main_result(report)
    if main is not None:
        text = "Rows: true class, normalised; per-sample predictions in <code>predictions/</code>."
        sections.append(("Confusion matrix", text, confusion_figure(run_dir, report, main)))
    meta = ", ".join(
        f"{k}: {html.escape(str(report.get(k)))}"
        for k in ("dataset", "kb", "experiment", "eval_split", "select_split", "k", "recipe", "config_hash")
        if report.get(k) is not None
    )
    body = [f"<h1>Run {html.escape(report.get('run') or run_dir.name)}</h1><p class='meta'>{meta}</p>"]
    body.append(header_html(run_dir, report))
    body.append(rule_html(report))
    body.append(results_table(report))
    if attention := attention_html(report):
        body.append(f"<h2>RetFormer's attention over its neighbours</h2>{attention}")
    body += other_kb_tables(run_dir, report)
    for title, text, fig in sections:
        if fig is None and title != RETRIEVAL:  # the retrieval section says why it has no figure
            continue
        img = "" if fig is None else f"<img alt='{title}' src='data:image/png;base64,{_png(fig)}'>"
        body.append(f"<h2>{title}</h2>{text if text.startswith('<') else f'<p>{text}</p>'}{img}")
    page = "\n".join(body)
    head = f"<meta charset='utf-8'><title>{html.escape(run_dir.name)}</title><style>{_CSS}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{page}</body></html>\n"


def write_report(run_dir: Path | str) -> Path:
    """Write `<run_dir>/report.html` from the run's eval.json and files; returns its path."""
    run_dir = Path(run_dir)
    report = read_json(run_dir / "eval.json")
    if report is None:
        from retformer.artifacts.errors import UserError

        raise UserError(f"{run_dir} has no eval.json: the run has not finished")
    out = run_dir / "report.html"
    page = build_html(run_dir, report)
    with atomic_path(out) as tmp:
        tmp.write_text(page)
    return out


def save_main_figure(run_dir: Path | str, png: Path | str) -> Path:
    """The run's main figure (`main_figure`) as a PNG file (README's picture)."""
    report = read_json(Path(run_dir) / "eval.json")
    if report is None:
        from retformer.artifacts.errors import UserError

        raise UserError(f"{run_dir} has no eval.json: the run has not finished")
    png = Path(png)
    with atomic_path(png) as tmp:
        main_figure(report).savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return png


def main(argv: list[str] | None = None) -> None:
    """`python -m retformer.pipelines.report RUN_DIR [--png PATH]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--png", type=Path, help="also save the main figure here")
    args = parser.parse_args(argv)
    print(write_report(args.run_dir))
    if args.png:
        print(save_main_figure(args.run_dir, args.png))


if __name__ == "__main__":
    main()
