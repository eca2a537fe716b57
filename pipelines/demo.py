"""`retformer demo`: the whole chain on the embedded development datasets, timed stage by stage.

Each (dataset, KB) pair goes through the same stage_* functions as the CLI commands. The default
pairs are the two development datasets of issue 9: Fashion-MNIST-LT with its world KB and sklearn's
digits made long-tailed with theirs; every choice is made on each dataset's val split and the test
split is reported once.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from artifacts.atomic import write_json_atomic
from artifacts.errors import UserError
from artifacts.workspace import Workspace
from pipelines import stages

log = logging.getLogger(__name__)

# (dataset manifest, KB manifest): the development datasets the demo reports.
DEFAULT_PAIRS: tuple[tuple[str, str], ...] = (("fmnist_lt", "fmnist_world"), ("digits_lt", "digits_world"))


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    # One info line as a stage starts; the times go to the table at the end (`stage_table`).
    log.info("%s", stage)
    started = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - started, 1)


def demo_pairs(datasets: list[str] | None, kbs: list[str] | None) -> list[tuple[str, str]]:
    """The (dataset, KB) pairs to run: the defaults, or the user's `--dataset`/`--kb` lists zipped."""
    if not datasets and not kbs:
        return list(DEFAULT_PAIRS)
    datasets, kbs = list(datasets or []), list(kbs or [])
    if len(datasets) != len(kbs):
        raise UserError(
            f"demo: give one --kb per --dataset (got {len(datasets)} dataset(s), {len(kbs)} KB(s))"
        )
    return list(zip(datasets, kbs, strict=True))


def run_pair(
    ws: Workspace,
    dataset: str,
    kb: str,
    experiment: str,
    overrides: list[str] | None,
    dask: dict[str, Any] | None = None,
    tensorboard: Path | None = None,
) -> tuple[dict, dict]:
    """Shards, embed, index, neighbors, train + evaluate for one pair; returns (summary, report).
    `dask`: where the Dask stages run (scheduler / workers / cluster / scheduler_file, as the CLI's);
    `tensorboard`: the folder for the per-epoch figures (stage_train's)."""
    dask = dask or {}
    from pipelines.results import results_summary

    started = time.perf_counter()
    ds_m = stages.load_dataset_manifest(dataset, overrides)
    kb_m = stages.load_kb(kb, overrides)
    exp_m = stages.load_experiment(experiment, overrides)
    timings: dict[str, float] = {}
    with _timed(timings, f"{ds_m['name']}: shards"):
        stages.stage_shards(ws, kb_m, ds_m, overrides)
    with _timed(timings, f"{ds_m['name']}: embed"):
        stages.stage_embed(ws, kb_m, ds_m, overrides, **dask)
    with _timed(timings, f"{ds_m['name']}: index"):
        index_rec = stages.stage_index(ws, kb_m, **dask)
    with _timed(timings, f"{ds_m['name']}: neighbors"):
        nn_rec = stages.stage_neighbors(ws, ds_m, kb_m, **dask)
    with _timed(timings, f"{ds_m['name']}: train+evaluate"):
        report = stages.stage_train(ws, ds_m, kb_m, exp_m, tensorboard=tensorboard)  # named by config hash
    summary = results_summary(report)
    summary.update(
        {
            "dataset": ds_m["name"],
            "description": ds_m.get("description"),
            "kb": kb_m["name"],
            "experiment": exp_m["name"],
            "run": report.get("run"),
            "k": report["k"],
            "select_split": report.get("select_split"),
            "eval_split": report["eval_split"],
            "stage_seconds": {key.split(": ", 1)[1]: value for key, value in timings.items()},
            "wall_seconds": round(time.perf_counter() - started, 1),
            "index": {key: index_rec.get(key) for key in ("factory", "recall", "params")},
            "neighbor_bytes_per_image": nn_rec.get("bytes_per_query_image"),
        }
    )
    return summary, report


def knn_comparison(report: dict) -> str | None:
    """One sentence on RetFormer against kNN vote, where the KB has the dataset's labels."""
    methods = report.get("methods", {})
    ours, knn = methods.get("retformer", {}), methods.get("knn_vote", {})
    if "top1" not in ours or "top1" not in knn:
        return None
    diff = 100 * (ours["top1"] - knn["top1"])
    return (
        f"RetFormer vs kNN vote: {diff:+.1f} top-1. The KB's labels are its captions' classes and the KB "
        "is class-balanced: kNN reads them directly, free of the long-tailed training prior that any "
        "trained head learns (docs/method-notes.md)."
    )


def stage_table(results: dict[str, dict]) -> str:
    """Seconds per stage (rows) and dataset (columns), with each dataset's total: a table drawn by rich."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="stage times (s)", box=None, pad_edge=False, show_edge=False)
    table.add_column("stage", no_wrap=True)
    for name in results:
        table.add_column(name, justify="right", no_wrap=True)
    stage_names = list(dict.fromkeys(k for r in results.values() for k in r.get("stage_seconds", {})))
    for stage in stage_names:
        cells = [r.get("stage_seconds", {}).get(stage) for r in results.values()]
        table.add_row(stage, *["-" if c is None else f"{c:.1f}" for c in cells])
    table.add_row("total", *[f"{r.get('wall_seconds', 0):.1f}" for r in results.values()])
    out = io.StringIO()
    Console(file=out, width=200, color_system=None, highlight=False).print(table)
    return out.getvalue().rstrip("\n")


def run_demo(
    ws: Workspace,
    pairs: list[tuple[str, str]],
    experiment: str,
    overrides: list[str] | None,
    dask: dict[str, Any] | None = None,
    tensorboard: Path | None = None,
) -> dict:
    """Run every (dataset, KB) pair, print one table per dataset, write `demo/results.json`
    (`tensorboard`: each trained model's per-epoch figures under it, `<run>/<method>/`)."""
    from pipelines.results import format_table

    started = time.perf_counter()
    results: dict[str, dict] = {}
    reports: dict[str, dict] = {}
    for dataset, kb in pairs:
        summary, report = run_pair(ws, dataset, kb, experiment, overrides, dask, tensorboard)
        results[summary["dataset"]] = summary
        reports[summary["dataset"]] = report
    wall = round(time.perf_counter() - started, 1)
    out = ws.root / "demo" / "results.json"
    write_json_atomic(out, {"datasets": results, "wall_seconds": wall})
    for name, summary in results.items():
        report = reports[name]
        typer.echo("")
        typer.echo(
            f"{name} x {summary['kb']}, k={summary['k']}: every choice on "
            f"{summary.get('select_split') or 'train'}, reported on {summary['eval_split']}"
        )
        typer.echo(format_table(report))
        if line := knn_comparison(report):
            typer.echo(line)
        if summary.get("run"):
            typer.echo(f"report: {ws.run_dir(summary['run']) / 'report.html'}")
    typer.echo("")
    typer.echo(stage_table(results))
    typer.echo(f"\nwall time {wall:.1f} s; written {out}")
    return {"datasets": results, "wall_seconds": wall}
