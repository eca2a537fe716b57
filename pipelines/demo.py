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

import typer

from retformer.artifacts.atomic import write_json_atomic
from retformer.artifacts.errors import UserError
from retformer.artifacts.workspace import Workspace
from retformer.pipelines import stages
from retformer.pipelines.dask_target import DaskTarget

log = logging.getLogger(__name__)

# (dataset manifest, KB manifest): the development datasets the demo reports.
DEFAULT_PAIRS: tuple[tuple[str, str], ...] = (("fmnist_lt", "fmnist_world"), ("digits_lt", "digits_world"))
# The paper's second task, noisy training labels (`--noisy`, and every `--seeds` > 1 demo): Fashion-MNIST-LT
# with 40% symmetric noise, and 40% asymmetric noise between confusable classes; the same world KB.
NOISY_PAIRS: tuple[tuple[str, str], ...] = (
    ("fmnist_lt_noisy", "fmnist_world"),
    ("fmnist_lt_noisy_asym", "fmnist_world"),
)


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    # One info line as a stage starts; the times go to the table at the end (`stage_table`).
    log.info("%s", stage)
    started = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - started, 1)


# `retformer demo --quick` (make demo QUICK=1): a smoke run of the same code path, one small dataset and
# one cell per grid, a couple of minutes on 2 cores; its figures are not the demo's.
QUICK_PAIRS: tuple[tuple[str, str], ...] = (("digits_lt", "digits_world"),)
QUICK_OVERRIDES: tuple[str, ...] = (
    "experiment.select.lr_grid=[0.01]",
    "experiment.select.baseline_epochs=60",
    "experiment.select.retformer_grid=[[0.003, 0.0]]",
    "experiment.select.retformer_epochs=10",
)
QUICK_NOTE = (
    "QUICK smoke run: digits-LT only, one lr per grid, short training: the same code path as `make demo`, "
    "not its figures (docs and README report the full demo)"
)


def demo_pairs(
    datasets: list[str] | None, kbs: list[str] | None, noisy: bool = False
) -> list[tuple[str, str]]:
    """The (dataset, KB) pairs to run: the defaults (and the noisy-label pairs when `noisy`), or the
    user's `--dataset`/`--kb` lists zipped."""
    if not datasets and not kbs:
        return list(DEFAULT_PAIRS) + (list(NOISY_PAIRS) if noisy else [])
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
    dask: DaskTarget | None = None,
    seeds: int = 1,
    tensorboard: Path | None = None,
) -> tuple[dict, dict]:
    """Shards, embed, index, neighbors, then train + evaluate once per seed for one pair; returns
    (summary, the first seed's report). `dask`: where the Dask stages run (as the CLI's). seeds:
    training seeds, from the experiment's `train.seed` on; with more than one the summary's methods
    are their mean (`pipelines.seeds.mean_over_seeds`) and
    `comparison` the paired bootstrap of RetFormer minus the strongest baseline. `tensorboard`: the
    folder for the per-epoch figures (stage_train's)."""
    from retformer.pipelines.experiment_schema import TrainSection
    from retformer.pipelines.results import results_summary
    from retformer.pipelines.seeds import comparison, mean_over_seeds, seed_list

    started = time.perf_counter()
    ds_m = stages.load_dataset_manifest(dataset, overrides)
    kb_m = stages.load_kb(kb, overrides)
    exp_m = stages.load_experiment(experiment, overrides)
    timings: dict[str, float] = {}
    with _timed(timings, f"{ds_m.name}: shards"):
        stages.stage_shards(ws, kb_m, ds_m, overrides)
    with _timed(timings, f"{ds_m.name}: embed"):
        stages.stage_embed(ws, kb_m, ds_m, overrides, dask=dask)
    with _timed(timings, f"{ds_m.name}: index"):
        index_rec = stages.stage_index(ws, kb_m, dask=dask)
    with _timed(timings, f"{ds_m.name}: neighbors"):
        nn_rec = stages.stage_neighbors(ws, ds_m, kb_m, dask=dask)
    seed_values = seed_list((exp_m.train or TrainSection()).seed, seeds)
    reports = []
    with _timed(timings, f"{ds_m.name}: train+evaluate"):
        for seed in seed_values:  # each seed is its own run, named with its config hash
            seeded = exp_m.seeded(seed)
            reports.append(stages.stage_train(ws, ds_m, kb_m, seeded, tensorboard=tensorboard))
    report = reports[0]
    summary = results_summary(report)
    if seeds > 1:
        summary["methods"] = mean_over_seeds([results_summary(r) for r in reports])
    run_dirs = [ws.run_dir(r["run"]) for r in reports if r.get("run")]
    summary.update(
        {
            "dataset": ds_m.name,
            "description": ds_m.description,
            "kb": kb_m.name,
            "experiment": exp_m.name,
            "seeds": seed_values,
            "runs": [r.get("run") for r in reports],
            "comparison": comparison(run_dirs, summary["methods"]) if run_dirs else None,
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
    dask: DaskTarget | None = None,
    seeds: int = 1,
    quick: bool = False,
    tensorboard: Path | None = None,
) -> dict:
    """Run every (dataset, KB) pair (`seeds` training seeds each), print one table per dataset, write
    `demo/results.json`. quick: the smoke run's small grids (`QUICK_OVERRIDES`) on top of `overrides`,
    said so in the output and in results.json. `tensorboard`: each trained model's per-epoch figures
    under it, `<run>/<method>/`."""
    from retformer.pipelines.results import format_seed_table, format_table
    from retformer.pipelines.seeds import comparison_line

    started = time.perf_counter()
    if quick:
        typer.echo(QUICK_NOTE)
        overrides = [*QUICK_OVERRIDES, *(overrides or [])]
    results: dict[str, dict] = {}
    reports: dict[str, dict] = {}
    for dataset, kb in pairs:
        summary, report = run_pair(ws, dataset, kb, experiment, overrides, dask, seeds, tensorboard)
        results[summary["dataset"]] = summary
        reports[summary["dataset"]] = report
    wall = round(time.perf_counter() - started, 1)
    out = ws.root / "demo" / "results.json"
    write_json_atomic(out, {"datasets": results, "wall_seconds": wall, "quick": quick})
    for name, summary in results.items():
        report = reports[name]
        typer.echo("")
        typer.echo(
            f"{name} x {summary['kb']}, k={summary['k']}: every choice on "
            f"{summary.get('select_split') or 'train'}, reported on {summary['eval_split']}"
        )
        typer.echo(format_seed_table(summary["methods"], seeds) if seeds > 1 else format_table(report))
        if line := comparison_line(summary.get("comparison")):
            typer.echo(line)
        elif line := knn_comparison(report):
            typer.echo(line)
        if summary.get("run"):
            typer.echo(f"report: {ws.run_dir(summary['run']) / 'report.html'}")
    typer.echo("")
    typer.echo(stage_table(results))
    typer.echo(f"\nwall time {wall:.1f} s; written {out}")
    if quick:
        typer.echo(QUICK_NOTE)
    return {"datasets": results, "wall_seconds": wall, "quick": quick}
