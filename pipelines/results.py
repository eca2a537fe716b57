"""An experiment's report as a table (rich) and as results.json's `{"methods": ...}` form."""

from __future__ import annotations

import io
import json
from typing import Any

from rich.console import Console
from rich.table import Table


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.2f}"


def format_table(report: dict[str, Any]) -> str:
    """Method x top-1 / top-5 / many / medium / few, in percent: a plain-text table rendered by rich.

    Where methods were selected on a val split, a last column `val_top1` gives the val top-1 each
    choice was made on (the other columns are the eval split's)."""
    metrics = ("top1", "top5", "many", "medium", "few")
    with_val = any(isinstance(m.get("val"), dict) for m in report["methods"].values())
    table = Table(box=None, pad_edge=False, show_edge=False)
    table.add_column("method", no_wrap=True)
    for name in (*metrics, "val_top1") if with_val else metrics:
        table.add_column(name, justify="right", no_wrap=True)
    skipped = []
    for method, m in report["methods"].items():
        if "skipped" in m:
            skipped.append(f"{method} skipped: {m['skipped']}")
            continue
        row = [_pct(m.get(key)) for key in metrics]
        if with_val:
            row.append(_pct((m.get("val") or {}).get("top1")))
        table.add_row(method, *row)
    out = io.StringIO()
    Console(file=out, width=200, color_system=None, highlight=False).print(table)
    return "\n".join([out.getvalue().rstrip("\n"), *skipped])


def results_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The `{"methods": {m: {top1, top5, many, medium, few, macro_f1, worst_class}}}` form of
    results.json (plus `selected` and `val` where the method was selected on val)."""
    keys = ("top1", "top5", "many", "medium", "few", "macro_f1", "worst_class")
    out: dict[str, Any] = {}
    for m, v in report["methods"].items():
        if "skipped" in v:
            out[m] = {"skipped": v["skipped"]}
            continue
        out[m] = {key: v.get(key) for key in keys}
        for extra in ("selected", "val"):
            if extra in v:
                out[m][extra] = v[extra]
    return {"methods": out}


def dump(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)
