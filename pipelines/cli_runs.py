"""Commands that look around the workspace and the manifests: `retformer runs` (the finished runs),
`retformer compare RUN [RUN...]` (runs side by side) and `retformer list KIND` (datasets, KBs,
experiments, encoders, clusters). The work is pipelines/run_index.py, compare.py and catalog.py.

Registered on the `retformer` app (pipelines/cli_app.py) by importing this module (pipelines/cli.py
does, before `main`).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from retformer.artifacts.errors import UserError
from retformer.pipelines.cli_app import Ctx, command

JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON document on stdout instead of the table.")]


def plain_table(headers: list[str], rows: list[list[str]]) -> str:
    """Rows under headers, columns aligned, no borders, no wrapping (rich, as the results table)."""
    table = Table(box=None, pad_edge=False, show_edge=False)
    for header in headers:
        table.add_column(header, no_wrap=True)
    for row in rows:
        table.add_row(*row)
    out = io.StringIO()
    Console(file=out, width=100_000, color_system=None, highlight=False, markup=False).print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().rstrip("\n").splitlines())


@command()
def runs(ctx: Ctx, as_json: JsonOpt = False) -> None:
    """List the workspace's finished runs (<workdir>/runs/<run>/eval.json), newest last: name, dataset,
    KB, experiment, the top-1 of its RetFormer result (else its best one) on its eval split, and when it
    finished. The names (or a unique prefix, or a pattern) are what `evaluate` and `compare` take."""
    from retformer.pipelines.run_index import finished_runs, runs_root, summarize, unfinished_runs

    summaries = []
    for run_dir in finished_runs(ctx.ws.root):
        try:
            summaries.append(summarize(run_dir))
        except UserError as exc:  # a torn eval.json: one warning, the other runs are still listed
            typer.echo(f"warning: {exc}", err=True)
    if as_json:
        typer.echo(json.dumps([s.as_json() for s in summaries], indent=2))
    elif not summaries:
        typer.echo(f"no finished runs under {runs_root(ctx.ws.root)} (`retformer train` makes one)")
    else:
        rows = [
            [
                s.run,
                s.dataset or "-",
                s.kb or "-",
                s.experiment or "-",
                "-" if s.top1 is None else f"{100 * s.top1:.2f}",
                f"{s.method} on {s.eval_split}" if s.method else "-",
                time.strftime("%Y-%m-%d %H:%M", time.localtime(s.finished_s)),
            ]
            for s in summaries
        ]
        headers = ["run", "dataset", "kb", "experiment", "top1", "result", "finished"]
        typer.echo(plain_table(headers, rows))
    if unfinished := unfinished_runs(ctx.ws.root):
        typer.echo(f"not listed, unfinished (no eval.json): {', '.join(unfinished)}", err=True)


@command()
def compare(
    ctx: Ctx,
    run: Annotated[
        list[str],
        typer.Argument(
            metavar="RUN...",
            help="Finished runs: names, unique prefixes, patterns ('fmnist_lt-*': the newest match) or "
            "`latest`.",
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="The PNG to write (default: <workdir>/compare/<run>_vs_<run>.png)."),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            help="The result whose per-class accuracy is drawn (default: each run's RetFormer row).",
        ),
    ] = None,
) -> None:
    """Compare finished runs: one table (rows: results; columns: each run's top-1 and few-shot
    accuracy, %) and one figure of per-class accuracy, a line per run (class names on the x axis where
    the runs record them), written as PNG; its path is printed."""
    from retformer.pipelines.compare import (
        check_out,
        compare_table,
        default_out,
        per_class_figure,
        read_runs,
        write_png,
    )
    from retformer.pipelines.run_index import resolve_run

    found = read_runs([resolve_run(ctx.ws.root, name) for name in run])  # every name checked first
    target = out if out is not None else default_out(ctx.ws.root, [name for name, _ in found])
    check_out(target)
    figure = per_class_figure(found, method)
    typer.echo(compare_table(found))
    typer.echo(f"\nper-class accuracy: {write_png(figure, target)}")


@command(name="list")
def list_(
    ctx: Ctx,
    kind: Annotated[
        str, typer.Argument(metavar="KIND", help="datasets, kbs, experiments, encoders or clusters.")
    ],
    as_json: JsonOpt = False,
) -> None:
    """List what there is to run with: one line per dataset, KB, experiment, encoder or cluster: its
    name, what it is, whether it needs a GPU, whether its data is here or must be downloaded, and where
    that data is expected."""
    from retformer.pipelines.catalog import entries

    found = entries(kind, ctx.ws.root)
    if as_json:
        typer.echo(json.dumps([e.as_json() for e in found], indent=2))
        return
    rows = [[e.name, e.what, e.gpu, e.data, e.where] for e in found]
    typer.echo(plain_table(["name", "what", "gpu", "data", "where"], rows))
