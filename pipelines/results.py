"""An experiment's report as a table (rich) and as results.json's `{"methods": ...}` form."""

from __future__ import annotations

import io
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
    return "\n".join([out.getvalue().rstrip("\n"), *skipped, *selected_rule_lines(report)])


def selected_rule_lines(report: dict[str, Any]) -> list[str]:
    """What val selected for the stacked RetFormer, in words (console, report header, `evaluate`): lr,
    epoch, the prediction rule and the share of eval images where retrieval was used; plus a warning
    line when the rule uses no retrieval at all (the row is then L_I, i.e. mlp_only, to the digit)."""
    sel = (report.get("methods", {}).get("retformer") or {}).get("selected")
    if not sel or "alpha" not in sel:
        return []
    share = ((report.get("diagnostics") or {}).get("rule") or {}).get("retrieval_share")
    return [rule_text(sel, share)] + (
        [
            "warning: retrieval is off in the selected rule (alpha = beta = 0): the retformer row is its "
            "image branch L_I alone, i.e. mlp_only with a prior adjustment"
        ]
        if not sel.get("alpha") and not sel.get("beta")
        else []
    )


# What a single-source rule is, in words (select.single_source: the fitted rule did not beat it on val).
SOURCES = {
    "l_i": "L_I alone beat the fitted rule on val",
    "vote": "the vote alone beat the fitted rule on val",
}


def rule_text(sel: dict[str, Any], share: float | None = None) -> str:
    """One line: `retformer selected on val: lr .., epoch .., rule ..., retrieval used on ..%`."""
    trained = sel.get("lr") is not None or sel.get("alpha")
    parts = [f"lr {sel.get('lr')}", f"epoch {sel.get('epoch')}"] if trained else ["no L_R"]
    if sel.get("source") in SOURCES:  # a single source: the fitted rule did not beat it on val
        parts.append(SOURCES[sel["source"]])
    if sel.get("la_tau"):
        parts.append(f"L_R logit-adjusted (tau {sel['la_tau']})")
    # weights fitted on val (trainer/stacking.py), not picked from a grid
    if sel.get("rule_fit") == "stack" and sel.get("source") != "vote":
        parts.append("weights fitted on val")
    # the image weight only applies with a retrieval term (combine() returns L_I alone otherwise)
    w = sel.get("image_weight", 1.0) if (sel.get("alpha") or sel.get("beta")) else 1.0
    image = f"L_I - {sel['prior_tau']:g} log prior" if sel.get("prior_tau") else "L_I"
    terms = [image if w == 1 else f"{w:g} * ({image})"] if w else []  # summed; w = 0: the vote alone
    when_closed = ""  # what predicts where the gate is closed
    retrieval = []
    if sel.get("alpha"):
        retrieval.append(f"{sel['alpha']:g} L_R")
    if sel.get("beta"):
        k = f"k {sel['vote_k']}, " if sel.get("vote_k") else ""
        retrieval.append(f"{sel['beta']:g} log vote({sel.get('evidence')}, {k}T {sel.get('vote_temp')})")
    if retrieval:
        gate = (
            f"[s > {sel['gate_t']:.3f} (val q {sel.get('gate_quantile')})] "
            if sel.get("gate_t") is not None
            else ""
        )
        terms.append(gate + " + ".join(retrieval))
        closed = sel.get("closed_prior_tau")
        if closed is not None and sel.get("gate_t") is not None:  # a fitted rule: L_I's own shift there
            image_closed = f"L_I - {closed:g} log prior" if closed else "L_I"
            when_closed = f" ({image_closed} where the gate is closed)"
        elif w != 1 and sel.get("gate_t") is not None:
            when_closed = " (L_I alone where the gate is closed)"
    line = f"retformer selected on val: {', '.join(parts)}; rule {' + '.join(terms)}{when_closed}"
    if share is not None:
        line += f"; retrieval used on {100 * share:.1f}% of eval images"
    return line


def format_seed_table(methods: dict[str, Any], seeds: int) -> str:
    """results.json's mean-over-seeds `methods` as a table: mean and sample standard deviation (over
    `seeds` training seeds) of top-1 / many / medium / few, in percent, and the mean val top-1."""
    metrics = ("top1", "many", "medium", "few")
    table = Table(box=None, pad_edge=False, show_edge=False)
    table.add_column(f"method (mean ± sd, {seeds} seeds)", no_wrap=True)
    for name in (*metrics, "val_top1"):
        table.add_column(name, justify="right", no_wrap=True)
    skipped = []
    for method, m in methods.items():
        if "skipped" in m:
            skipped.append(f"{method} skipped: {m['skipped']}")
            continue
        row = [
            "-" if m.get(key) is None else f"{100 * m[key]:.2f} ± {100 * m.get(key + '_sd', 0.0):.2f}"
            for key in metrics
        ]
        table.add_row(method, *row, _pct(m.get("val_top1")))
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
