"""report.html's HTML tables: a run's results, and one table per evaluation of its models with another
(or a grown) KB (`retformer evaluate RUN --kb B`)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from retformer.pipelines.run_index import other_evaluations


def results_table(report: dict[str, Any]) -> str:
    """The results as an HTML table: top-1, top-5, many / medium / few, macro-F1 and the worst class per
    result; a skipped method with its reason."""
    names = report.get("class_names") or []
    cols = ("top1", "top5", "many", "medium", "few", "macro_f1")
    head = "".join(f"<th>{c}</th>" for c in (*cols, "worst class"))
    rows = []
    for name, m in report["methods"].items():
        if "skipped" in m:
            rows.append(f"<tr><td>{html.escape(name)}</td><td colspan='{len(cols) + 1}'>skipped: ")
            rows[-1] += f"{html.escape(str(m['skipped']))}</td></tr>"
            continue
        cells = "".join(f"<td>{'-' if m.get(c) is None else f'{100 * m[c]:.2f}'}</td>" for c in cols)
        worst, idx = m.get("worst_class"), m.get("worst_class_index")
        label = names[idx] if idx is not None and idx < len(names) else idx
        cells += "<td>-</td>" if worst is None else f"<td>{100 * worst:.2f} ({html.escape(str(label))})</td>"
        rows.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
    return f"<table><tr><th>result</th>{head}</tr>{''.join(rows)}</table>"


def other_kb_tables(run_dir: Path, report: dict[str, Any]) -> list[str]:
    """One table per evaluation of the run's models with another (or a grown) KB (`retformer evaluate
    RUN --kb B`, `<run>/eval.<B>.json`), headed "trained with A, evaluated with B"."""
    out = []
    for kb, rep in other_evaluations(run_dir).items():
        index = rep.get("kb_index") or {}
        grown = f", grown in place {len(index['grown'])} time(s)" if index.get("grown") else ""
        when = html.escape(str(rep.get("evaluated_at", "")))
        head = (
            f"Trained with {html.escape(str(rep.get('trained_kb') or report.get('kb')))}, "
            f"evaluated with {html.escape(kb)}"
        )
        text = (
            f"The same trained models, the eval split's neighbours retrieved from KB {html.escape(kb)} "
            f"({index.get('n')} rows, {html.escape(str(index.get('factory')))}{grown}) on {when}: "
            f"<code>eval.{html.escape(kb)}.json</code>."
        )
        out.append(f"<h2>{head}</h2><p>{text}</p>{results_table(rep)}")
    return out
