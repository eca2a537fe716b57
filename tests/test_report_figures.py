"""report.html's figures towards paper figures (issue 20 item 6): class names on the long-tail points,
tick labels that never overlap for 10-100 classes, and the shuffled-neighbour control beside RetFormer
in the shot-group bars. Real figure code (pipelines/report.py, report_labels.py, report_retrieval.py)
on synthetic eval.json contents; overlaps are measured on the drawn text extents (Agg renderer)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from retformer.pipelines.report import confusion_figure, main_figure
from retformer.pipelines.report_labels import class_ticks, overlapping
from retformer.pipelines.report_retrieval import RetrievalQuality, retrieval_figure

SIZES = (10, 30, 60, 100)


def names(c: int) -> list[str]:
    """Class names as long as real ones ("Ankle boot", "great white shark")."""
    return [f"class name {i:03d}" for i in range(c)]


def fake_report(c: int, shuffled: bool = True) -> dict:
    """An eval.json with c long-tailed classes (500 ... 5 training images), RetFormer, its shuffled
    control and mlp_only, per-class accuracies from a fixed generator."""
    rng = np.random.default_rng(c)
    counts = [int(500 * (0.01 ** (i / max(c - 1, 1)))) for i in range(c)]
    shot = {"many": [i for i in range(c) if counts[i] > 100], "medium": [], "few": []}
    shot["medium"] = [i for i in range(c) if 20 <= counts[i] <= 100]
    shot["few"] = [i for i in range(c) if counts[i] < 20]

    def result(base: float) -> dict:
        per_class = np.clip(base + 0.2 * rng.standard_normal(c), 0, 1).round(3).tolist()
        groups = {g: float(np.mean([per_class[i] for i in shot[g]])) for g in shot}
        return {"top1": float(np.mean(per_class)), "per_class": per_class, **groups}

    methods = {"retformer": result(0.7), "mlp_only": result(0.6)}
    if shuffled:
        methods["retformer:shuffled"] = {**result(0.5), "control": "neighbors shuffled"}
    return {
        "dataset": "ds",
        "kb": "kb",
        "experiment": "exp",
        "eval_split": "test",
        "class_names": names(c),
        "train_class_counts": counts,
        "shot_split": shot,
        "methods": methods,
    }


def renderer_of(fig: Figure):
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


@pytest.mark.parametrize("c", SIZES)
def test_long_tail_names_its_points_without_overlap(c: int) -> None:
    """The long-tail panel names RetFormer's points: every class up to 30 classes (10 and 30 here: all
    placed), the 10 lowest-accuracy classes beyond; no two names, nor a name and the legend or the
    group-boundary texts, overlap; every name sits inside the axes; the x tick labels (a log axis of
    plain numbers) do not overlap either."""
    report = fake_report(c)
    fig = main_figure(report)
    r = renderer_of(fig)
    ax = fig.axes[0]
    labels = [t for t in ax.texts if t.get_text().startswith("class name")]
    want = c if c <= 30 else 10
    assert len(labels) == want, [t.get_text() for t in labels]
    acc = np.array(report["methods"]["retformer"]["per_class"])
    if c > 30:
        worst = {report["class_names"][i] for i in np.argsort(acc, kind="stable")[:10]}
        assert {t.get_text() for t in labels} == worst
    assert overlapping([*ax.texts, *ax.get_legend().get_texts()], r) == []
    legend = ax.get_legend().get_window_extent(r)
    box = ax.get_window_extent(r)
    for t in labels:
        e = t.get_window_extent(r)
        assert (
            not e.overlaps(legend) and box.x0 <= e.x0 and e.x1 <= box.x1 and box.y0 <= e.y0 <= e.y1 <= box.y1
        )
    ticks = [t for t in [*ax.get_xticklabels(), *ax.get_xticklabels(minor=True)] if t.get_text()]
    assert ticks and overlapping(ticks, r) == []


def test_shot_bars_put_the_shuffled_control_beside_retformer() -> None:
    """The shot-group bars hold `retformer:shuffled` right after `retformer` (hatched), with its many /
    medium / few values; without a control in eval.json the bars are the results alone."""
    report = fake_report(10)
    ax = main_figure(report).axes[1]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["retformer", "retformer:shuffled", "mlp_only"]
    bars = ax.patches  # group by group (many, medium, few), result by result within a group
    for g, group in enumerate(("many", "medium", "few")):
        heights = [bars[g * 3 + j].get_height() for j in range(3)]
        assert heights == pytest.approx([100 * report["methods"][n][group] for n in ticks])
        assert bars[g * 3 + 1].get_hatch() == "///" and not bars[g * 3].get_hatch()
    plain = main_figure(fake_report(10, shuffled=False)).axes[1]
    assert [t.get_text() for t in plain.get_xticklabels()] == ["retformer", "mlp_only"]


@pytest.mark.parametrize("c", SIZES)
def test_class_name_ticks_never_overlap(c: int, tmp_path) -> None:
    """Class names as ticks (the confusion matrix's two axes, the precision@k bars) for 10-100
    classes: no two drawn tick labels overlap, every name is written up to 60 classes and at least
    every second one at 100."""
    y = np.repeat(np.arange(c), 3)
    (tmp_path / "predictions").mkdir()
    pq.write_table(pa.table({"label": y, "pred": np.roll(y, 1)}), tmp_path / "predictions" / "r.parquet")
    report = {
        "class_names": names(c),
        "methods": {"r": {"predictions": "predictions/r.parquet", "num_classes": c}},
    }
    q = RetrievalQuality(
        8, "test", names(c), [3] * c, [0.5] * c, 0.5, None, {"test": np.linspace(0.2, 0.9, 50)}
    )
    for fig, axis in (
        (confusion_figure(tmp_path, report, "r"), "x"),
        (confusion_figure(tmp_path, report, "r"), "y"),
        (retrieval_figure(q), "x"),
    ):
        r = renderer_of(fig)
        ax = fig.axes[0]
        labels = [t for t in (ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()) if t.get_text()]
        assert overlapping(labels, r) == [], (c, axis)
        assert len(labels) == c if c <= 60 else len(labels) >= c // 2, (c, axis, len(labels))


def test_class_ticks_shrink_then_thin_out() -> None:
    """On a fixed 6-inch axis the names keep 8 pt while they fit, then shrink, then every m-th name is
    written at 5 pt (m the smallest step that fits): never an unreadable font."""
    fig = Figure(figsize=(7, 3))
    ax = fig.subplots()
    assert class_ticks(ax, names(10), "x", 6.0) == 1 and ax.get_xticklabels()[0].get_fontsize() == 8
    assert class_ticks(ax, names(60), "x", 6.0) == 1 and 5 <= ax.get_xticklabels()[0].get_fontsize() < 8
    step = class_ticks(ax, names(300), "x", 6.0)
    assert (
        step > 1 and ax.get_xticklabels()[0].get_fontsize() == 5 and len(ax.get_xticks()) == -(-300 // step)
    )
