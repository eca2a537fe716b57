"""report.html's retrieval-quality section, read from the run's own neighbour tables.

- **neighbour label precision@k** per class on the eval split: for each image, the share of its k
  neighbours (the run's k, the stored tables' first k) whose KB label equals the image's label,
  averaged over the class's images; where the KB's labels are not the dataset's classes
  (`trainer.baselines.kb_label_problem`: no labels, another dataset's label space) the section says so
  instead;
- **query-neighbour similarity s** (`trainer.model.relevance` through `pipelines.relevance.mean_similarity`:
  the value RetFormer's gate reads) over the train split, the eval split and the eval split with its
  neighbour lists shuffled across images (`trainer.selection.shuffled`, the seed of the run's
  `retformer:shuffled` control), as histograms with the selected rule's gate t where it has one.

A run without neighbour tables (zero-shot only, or a run folder outside its workspace) gets one
sentence saying why the section is empty.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from retformer.artifacts.errors import UserError
from retformer.artifacts.workspace import Workspace, read_json
from retformer.pipelines.report_header import run_workspace
from retformer.pipelines.report_labels import class_ticks

FOLD_CLASSES = 30  # a per-class table longer than this is folded (<details>)


@dataclass
class RetrievalQuality:
    """What the section shows. precision: per class (None for a class without eval images), None
    with `label_problem` saying why; s: split label -> (N,) similarities."""

    k: int
    split: str
    class_names: list[str]
    images: list[int]
    precision: list[float | None] | None
    mean_precision: float | None
    label_problem: str | None
    s: dict[str, np.ndarray] = field(default_factory=dict)
    gate_t: float | None = None


def precision_at_k(labels: np.ndarray, nn_labels: np.ndarray, num_classes: int) -> tuple[list, list, float]:
    """(per-class precision, per-class image count, mean over images): labels (N,), nn_labels (N, k)
    the neighbours' KB labels; a class without images has precision None."""
    hit = (nn_labels == labels[:, None]).mean(axis=1) if len(labels) else np.zeros(0)
    per_class, images = [], []
    for c in range(num_classes):
        mine = labels == c
        images.append(int(mine.sum()))
        per_class.append(float(hit[mine].mean()) if mine.any() else None)
    return per_class, images, float(hit.mean()) if len(hit) else float("nan")


def _kb_label_dataset(ws: Workspace, kb: str) -> tuple[str | None, list[str] | None]:
    """The dataset whose classes label the KB (its shards record) and that dataset's class names."""
    record = read_json(ws.kb_stage_record(kb, "shards"), torn_ok=True) or {}
    name = (record.get("result") or {}).get("dataset") or (record.get("source") or {}).get("dataset")
    if not name:
        return None, None
    return str(name), (read_json(ws.dataset_info(str(name)), torn_ok=True) or {}).get("class_names")


def retrieval_quality(run_dir: Path, report: dict[str, Any]) -> RetrievalQuality | str:
    """The section's figures from the run's neighbour tables, or the reason there are none."""
    from retformer.pipelines.relevance import mean_similarity
    from retformer.trainer.baselines import kb_label_problem
    from retformer.trainer.config import SelectOptions
    from retformer.trainer.features import load_retrieval_features, neighbor_table_path
    from retformer.trainer.selection import shuffled

    ws, k = run_workspace(run_dir), report.get("k")
    dataset, kb, split = str(report.get("dataset")), str(report.get("kb")), str(report.get("eval_split"))
    if ws is None:
        return (
            "the run folder is not inside a workspace (<root>/runs/<run>): its neighbour tables are unknown"
        )
    if not k:
        return "eval.json records no k: the run reads no neighbours"
    if isinstance(k, list):  # a k sweep (`k_values`): its first k, the main result's (`retformer@k<first>`)
        k = k[0]
    table_k = int(report.get("neighbor_table_k") or k)
    if not neighbor_table_path(ws, dataset, kb, table_k, split).is_file():
        return f"no {split} neighbour table for {dataset} x {kb} at k={table_k} in {ws.root}"
    try:
        test = load_retrieval_features(ws, dataset, kb, table_k, split).subset_k(int(k))
        train = None
        if neighbor_table_path(ws, dataset, kb, table_k, "train").is_file():
            train = load_retrieval_features(ws, dataset, kb, table_k, "train").subset_k(int(k))
    except UserError as exc:  # a table of another KB state: say so, the rest of the report stands
        return f"the neighbour tables cannot be read: {exc}"
    names = list(report.get("class_names") or [])
    num_classes = len(names) or int(test.labels.max()) + 1
    problem = kb_label_problem(
        test.store_label, num_classes, dataset, names or None, *_kb_label_dataset(ws, kb)
    )
    labels = test.labels.numpy()
    per_class = mean = None
    images = [int((labels == c).sum()) for c in range(num_classes)]
    if problem is None:
        per_class, images, mean = precision_at_k(labels, test.store_label[test.nn_rows].numpy(), num_classes)
    seed = ((report.get("config") or {}).get("select") or {}).get("shuffle_seed", SelectOptions.shuffle_seed)
    s = {} if train is None else {"train": mean_similarity(train).numpy()}
    s[split] = mean_similarity(test).numpy()
    s[f"{split}, neighbours shuffled"] = mean_similarity(shuffled(test, int(seed))).numpy()
    # the selected rule's gate: eval.json's diagnostics, else (runs from before them) what val selected
    rule = (report.get("diagnostics") or {}).get("rule") or {}
    gate = rule.get(
        "gate_t", ((report["methods"].get("retformer") or {}).get("selected") or {}).get("gate_t")
    )
    names = names or [str(c) for c in range(num_classes)]
    return RetrievalQuality(int(k), split, names, images, per_class, mean, problem, s, gate)


def retrieval_figure(q: RetrievalQuality) -> Figure:
    """Left: precision@k per class (where the KB's labels are the dataset's); right: histograms of s."""
    panels = 2 if q.precision is not None else 1
    width = min(14.0, 4.5 + 0.12 * len(q.class_names)) if panels == 2 else 7.0
    fig = Figure(figsize=(width + (6.5 if panels == 2 else 0), 3.9), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False, width_ratios=[width, 6.5] if panels == 2 else None)[0]
    if q.precision is not None:
        ax = axes[0]
        values = [float("nan") if p is None else 100 * p for p in q.precision]
        ax.bar(range(len(values)), values, color="#4c72b0")
        ax.set(ylabel=f"neighbour label precision@{q.k} (%)", ylim=(0, 100), xlim=(-0.6, len(values) - 0.4))
        ax.set_title(f"share of the {q.k} neighbours with the image's label ({q.split})")
        class_ticks(ax, q.class_names, "x", 0.85 * width)
    ax = axes[-1]
    low = min(float(v.min()) for v in q.s.values() if len(v))
    high = max(float(v.max()) for v in q.s.values() if len(v))
    bins = np.linspace(low, high, 41) if high > low else 10
    for (label, values), color in zip(q.s.items(), ("#55a868", "#4c72b0", "#c44e52"), strict=False):
        ax.hist(values, bins=bins, density=True, histtype="step", linewidth=1.4, color=color, label=label)
    if q.gate_t is not None:
        ax.axvline(
            float(q.gate_t), color="#333", linestyle="--", linewidth=1, label=f"gate t = {q.gate_t:.3f}"
        )
    ax.set(xlabel="s: mean cosine between an image and its neighbours' images", ylabel="density")
    ax.set_title("query-neighbour similarity s")
    ax.legend(fontsize=7)
    return fig


def _pct(v: float | None) -> str:
    return "-" if v is None or v != v else f"{100 * v:.2f}"


def retrieval_html(q: RetrievalQuality | str) -> str:
    """The section's text and tables (the figure is added by the page like the others)."""
    if isinstance(q, str):
        return f"<p>No retrieval figures: {html.escape(q)}.</p>"
    out = []
    if q.precision is None:
        out.append(
            f"<p>Neighbour label precision@{q.k}: not measured, {html.escape(str(q.label_problem))} "
            "(the KB has no labels for the dataset's classes).</p>"
        )
    else:
        known = [p for p in q.precision if p is not None]
        over_classes = _pct(float(np.mean(known)) if known else None)
        out.append(
            f"<p>Neighbour label precision@{q.k} on the {html.escape(q.split)} split (the share of an "
            f"image's {q.k} neighbours whose KB label is the image's label): "
            f"<b>{_pct(q.mean_precision)}%</b> over images, {over_classes}% over classes.</p>"
        )
        rows = "".join(
            f"<tr><td>{html.escape(name)}</td><td>{n}</td><td>{_pct(p)}</td></tr>"
            for name, n, p in zip(q.class_names, q.images, q.precision, strict=True)
        )
        table = (
            f"<table class='precision'><tr><th>class</th><th>{html.escape(q.split)} images</th>"
            f"<th>precision@{q.k} (%)</th></tr>{rows}</table>"
        )
        # a long table (ImageNet-LT: 1,000 rows) folds away; the figure shows every class
        folded = len(q.class_names) > FOLD_CLASSES
        out.append(
            f"<details><summary>per class ({len(q.class_names)})</summary>{table}</details>"
            if folded
            else table
        )
    gate = q.gate_t is not None
    head = "<tr><th>split</th><th>images</th><th>median s</th><th>mean s</th>"
    head += f"<th>s &gt; t = {q.gate_t:.3f} (%)</th></tr>" if gate else "</tr>"
    rows = []
    for label, s in q.s.items():
        cells = f"<td>{html.escape(label)}</td><td>{len(s)}</td>"
        cells += f"<td>{np.median(s):.4f}</td><td>{s.mean():.4f}</td>" if len(s) else "<td>-</td><td>-</td>"
        if gate:
            cells += f"<td>{_pct(float((s > float(q.gate_t)).mean()) if len(s) else None)}</td>"
        rows.append(f"<tr>{cells}</tr>")
    out.append(f"<table class='similarity'>{head}{''.join(rows)}</table>")
    return "".join(out)
