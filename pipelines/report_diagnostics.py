"""report.html's retrieval diagnostics (eval.json `diagnostics`, `pipelines.run_diagnostics`): what val
selected, accuracy against neighbour agreement per method, RetFormer minus mlp_only per class, and the
attention figures."""

from __future__ import annotations

import html
from typing import Any

from matplotlib.figure import Figure

from retformer.pipelines.results import selected_rule_lines


def rule_html(report: dict[str, Any]) -> str:
    """The selected rule in words under the run's title; its no-retrieval warning in bold."""
    lines = selected_rule_lines(report)
    return "".join(
        f"<p class='meta'><b>{html.escape(x)}</b></p>"
        if x.startswith("warning")
        else f"<p class='meta'>{html.escape(x)}</p>"
        for x in lines
    )


def agreement_figure(report: dict[str, Any]) -> Figure | None:
    """Accuracy per bin of neighbour agreement (share of the neighbours whose class is the true label),
    one line per method, with each bin's image count on the axis."""
    agreement = (report.get("diagnostics") or {}).get("agreement")
    if not agreement:
        return None
    bins = agreement["bins"]
    fig = Figure(figsize=(7, 3.6))
    ax = fig.subplots()
    x = list(range(len(bins)))
    for name in agreement["methods"]:
        ys = [None if b.get(name) is None else 100 * b[name] for b in bins]
        ax.plot(x, [float("nan") if y is None else y for y in ys], marker="o", label=name)
    ax.set_xticks(x, [f"{b['from']:.2f}-{b['to']:.2f}\n({b['images']} img)" for b in bins], fontsize=8)
    ax.set_xlabel("share of neighbours whose class is the true label")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def per_class_delta_figure(report: dict[str, Any]) -> Figure | None:
    """RetFormer minus mlp_only accuracy per class (points), classes in the dataset's order by name."""
    delta = (report.get("diagnostics") or {}).get("per_class_minus_mlp_only")
    if not delta:
        return None
    names = report.get("class_names") or [str(i) for i in range(len(delta))]
    fig = Figure(figsize=(max(6, 0.45 * len(delta)), 3.4))
    ax = fig.subplots()
    values = [0.0 if d is None else 100 * d for d in delta]
    ax.bar(range(len(values)), values, color=["#2a7" if v >= 0 else "#c33" for v in values])
    ax.axhline(0, color="#444", lw=0.8)
    if len(values) <= 60:
        ax.set_xticks(range(len(values)), names[: len(values)], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("RetFormer - mlp_only (points)")
    fig.tight_layout()
    return fig


def attention_html(report: dict[str, Any]) -> str:
    """The attention figures as a small table (empty without them)."""
    diag = report.get("diagnostics") or {}
    att = diag.get("attention")
    if not att:
        return ""
    rows = [
        ("attention-similarity correlation (per query, mean)", att.get("attention_similarity_corr"), ""),
        ("attention entropy / log k (1 = uniform)", att.get("attention_entropy_over_log_k"), ""),
        ("attention on other-class neighbours", att.get("attention_on_other_class"), "%"),
        ("the same share under uniform attention", att.get("uniform_on_other_class"), "%"),
        ("images measured", att.get("images"), "n"),
    ]
    cells = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{_fmt(value, kind)}</td></tr>" for label, value, kind in rows
    )
    bias = "on" if diag.get("query_bias") else "off"
    return f"<p>Query-aware attention bias: {bias}.</p><table>{cells}</table>"


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "%":
        return f"{100 * value:.1f}%"
    if kind == "n":
        return str(value)
    return f"{value:.3f}"
