"""`retformer demo`: the whole chain on the embedded default, timed stage by stage (the CLI's stages)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import typer

from artifacts.atomic import write_json_atomic
from artifacts.workspace import Workspace
from pipelines import stages


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    typer.echo(f"== {stage}")
    started = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - started, 1)
    typer.echo(f"== {stage} done in {timings[stage]:.1f} s")


def run_demo(
    ws: Workspace,
    dataset: str,
    kb: str,
    experiment: str,
    overrides: list[str] | None,
    scheduler: str | None,
    workers: int | None,
) -> dict:
    """Shards, embed, index, neighbors, train + evaluate through the same stage_* as the CLI
    commands; prints the table, writes results.json."""
    from pipelines.experiment import format_table, results_summary

    started = time.perf_counter()
    ds_m = stages.load_dataset_manifest(dataset, overrides)
    kb_m = stages.load_kb(kb, overrides)
    exp_m = stages.load_experiment(experiment, overrides)
    timings: dict[str, float] = {}
    with _timed(timings, "shards"):
        stages.stage_shards(ws, kb_m, ds_m, overrides)
    with _timed(timings, "embed"):
        stages.stage_embed(ws, kb_m, ds_m, overrides, scheduler, workers)
    with _timed(timings, "index"):
        index_rec = stages.stage_index(ws, kb_m, scheduler=scheduler, workers=workers)
    with _timed(timings, "neighbors"):
        nn_rec = stages.stage_neighbors(ws, ds_m, kb_m, scheduler=scheduler, workers=workers)
    with _timed(timings, "train+evaluate"):
        report = stages.stage_train(ws, ds_m, kb_m, exp_m, f"demo-{ds_m['name']}-{kb_m['name']}")
    wall = round(time.perf_counter() - started, 1)
    summary = results_summary(report)
    summary.update(
        {
            "dataset": ds_m["name"],
            "kb": kb_m["name"],
            "experiment": exp_m["name"],
            "k": report["k"],
            "stage_seconds": timings,
            "wall_seconds": wall,
            "index": {key: index_rec.get(key) for key in ("factory", "recall", "params")},
            "neighbor_bytes_per_image": nn_rec.get("bytes_per_query_image"),
        }
    )
    out = ws.root / "demo" / "results.json"
    write_json_atomic(out, summary)
    typer.echo("")
    typer.echo(f"Fashion-MNIST-LT (r=100) x {kb_m['name']}, k={report['k']}, eval on {report['eval_split']}")
    typer.echo(format_table(report))
    typer.echo(f"\nwall time {wall:.1f} s; stages: {timings}; written {out}")
    return summary
