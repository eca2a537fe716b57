"""`retformer compare RUN [RUN...]`: finished runs side by side, as one table (rows: results, columns:
each run's top-1 and few-shot accuracy) and one figure of per-class accuracy with a line per run.

Everything comes from the runs' eval.json files (pipelines/run_index.py finds the runs); the figure is
drawn on a `matplotlib.figure.Figure` (the Agg canvas, no display) and written atomically as PNG.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from retformer.artifacts.atomic import atomic_path
from retformer.artifacts.errors import UserError
from retformer.artifacts.workspace import read_json
from retformer.pipelines.run_index import EVAL, main_row, primary_rows

COLUMNS = ("top1", "few")  # per run, in percent
MAX_NAMED_CLASSES = 60  # more classes than this: the x axis shows class indices, not names
MAX_STEM = 160  # the default file name's stem, in characters (file systems allow 255 bytes)


def read_runs(run_dirs: list[Path]) -> list[tuple[str, dict[str, Any]]]:
    """(run name, eval.json) of each run folder, in order, each run once."""
    seen: dict[Path, None] = dict.fromkeys(run_dirs)
    return [(p.name, read_json(p / EVAL) or {}) for p in seen]


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.2f}"


def legend(runs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """One line per run: its number in the table's headers, name, dataset x KB, experiment, split."""
    return [
        f"[{i}] {name}: {r.get('dataset')} x {r.get('kb')}, experiment {r.get('experiment')}, "
        f"{r.get('eval_split')} split"
        for i, (name, r) in enumerate(runs, 1)
    ]


def compare_table(runs: list[tuple[str, dict[str, Any]]]) -> str:
    """Rows: every result any run has (first run's order first); columns `[i] top1`, `[i] few` per run
    (percent; `-` where a run lacks the result or skipped it). Rendered by rich as plain text."""
    rows: dict[str, None] = {}
    for _, report in runs:
        rows.update(dict.fromkeys(report.get("methods") or {}))
    table = Table(box=None, pad_edge=False, show_edge=False)
    table.add_column("method", no_wrap=True)
    for i in range(1, len(runs) + 1):
        for col in COLUMNS:
            table.add_column(f"[{i}] {col}", justify="right", no_wrap=True)
    for row in rows:
        cells = []
        for _, report in runs:
            m = (report.get("methods") or {}).get(row)
            usable = isinstance(m, dict) and "skipped" not in m
            cells += [_pct(m.get(col)) if usable else "-" for col in COLUMNS]
        table.add_row(row, *cells)
    out = io.StringIO()
    Console(file=out, width=250, color_system=None, highlight=False, markup=False).print(table)
    return "\n".join([*legend(runs), "", out.getvalue().rstrip("\n")])


def plotted_row(name: str, report: dict[str, Any], method: str | None) -> str:
    """The result whose per-class accuracy is drawn for a run: `method`, else its main row."""
    rows = [r for r in primary_rows(report) if (report["methods"][r].get("per_class") is not None)]
    if method is None:
        row = main_row(report)
        if row is None or row not in rows:
            raise UserError(f"run {name} has no result with per-class accuracy to plot")
        return row
    if method not in rows:
        raise UserError(
            f"run {name} has no result {method!r} with per-class accuracy (--method); "
            f"it has: {', '.join(rows)}"
        )
    return method


def per_class_figure(runs: list[tuple[str, dict[str, Any]]], method: str | None = None) -> Any:
    """One line per run: the per-class accuracy (percent) of its plotted row, classes in label order
    on the x axis, named where every run records the same class names (and there are few enough)."""
    from matplotlib.figure import Figure

    lines = [(name, r, plotted_row(name, r, method)) for name, r in runs]
    accs = [[100 * float(a) for a in r["methods"][row]["per_class"]] for _, r, row in lines]
    width = max(len(a) for a in accs)
    names = [r.get("class_names") for _, r, _ in lines]
    same_names = all(n == names[0] for n in names) and names[0] is not None and len(names[0]) == width
    fig = Figure(figsize=(max(7.0, min(20.0, 3 + 0.4 * width)), 4.8), layout="constrained")
    ax = fig.subplots()
    for i, ((name, _, row), acc) in enumerate(zip(lines, accs, strict=True), 1):
        label = f"[{i}] {name} ({row})"
        ax.plot(range(len(acc)), acc, marker="o", markersize=3.5, linewidth=1.3, label=label)
    if same_names and width <= MAX_NAMED_CLASSES:
        ax.set_xticks(range(width), names[0], rotation=60, ha="right", fontsize=8)
        ax.set_xlabel("class")
    else:
        ax.set_xlabel("class index (label order)")
    splits = sorted({str(r.get("eval_split")) for _, r, _ in lines})
    ax.set(ylabel="accuracy (%)", ylim=(-2, 102), title=f"per-class accuracy ({', '.join(splits)} split)")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", fontsize=8, ncols=1)
    return fig


def default_out(workdir: Path, names: list[str]) -> Path:
    """`<workdir>/compare/<run>_vs_<run>....png`; a stem too long for a file name is cut and gets 8
    hex digits of its hash, so two different comparisons never share a file."""
    stem = "_vs_".join(names)
    if len(stem) > MAX_STEM:
        stem = f"{stem[: MAX_STEM - 9]}-{hashlib.sha256(stem.encode()).hexdigest()[:8]}"
    return Path(workdir) / "compare" / f"{stem}.png"


def check_out(out: Path) -> None:
    """UserError unless `out` can be the PNG file to write (checked before any work)."""
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: the figure is a PNG, give a path ending in .png")
    if out.exists() and not out.is_file():
        raise UserError(f"--out {out} exists and is not a file: give the path of the PNG to write")


def write_png(fig: Any, out: Path) -> Path:
    """Save `fig` to `out` atomically (a temporary file renamed: a reader never sees half a PNG)."""
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)  # the temporary name has no .png suffix to infer from
    return out
