"""The stage commands of `retformer` (the work is pipelines/stages.py): shards, download, embed, index,
neighbors, train, evaluate, and the demo.

Every command reads YAML manifests (a name under manifests/ or a path to a file) and accepts
`--set key=value` overrides. Registered on the app of pipelines/cli_app.py by importing this module
(pipelines/cli.py does, before `main`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from retformer.artifacts.errors import UserError
from retformer.pipelines import stages
from retformer.pipelines.cli_app import Ctx, command

KbOpt = Annotated[str, typer.Option("--kb", help="KB manifest name (manifests/kb/) or path.")]
DatasetOpt = Annotated[
    str, typer.Option("--dataset", help="Dataset manifest name (manifests/datasets/) or path.")
]
ExperimentOpt = Annotated[
    str, typer.Option("--experiment", help="Experiment manifest name (manifests/experiments/) or path.")
]
# --run-name: under torchrun, whose parser takes `--run` for its own `--run-path`.
RunOpt = Annotated[
    str | None,
    typer.Option("--run", "--run-name", help="Run name (default: dataset-kb-experiment-<config hash>)."),
]
TensorBoardOpt = Annotated[
    Path | None,
    typer.Option(
        "--tensorboard",
        help="Also log each trained model's per-epoch figures (loss, train_acc, lr, val) for TensorBoard "
        "under DIR/<run>/<method>/ (`tensorboard --logdir DIR`).",
        metavar="DIR",
    ),
]


def _echo_record(title: str, record: dict[str, Any], keys: list[str]) -> None:
    shown = {k: record[k] for k in keys if k in record}
    typer.echo(f"{title}: " + json.dumps(shown, default=str))


# ----------------------------------------------------------------------------------------- commands
@command("set")
def shards(
    ctx: Ctx,
    kb: Annotated[str | None, typer.Option("--kb", help="KB manifest name or path.")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Dataset manifest name or path.")] = None,
) -> None:
    """Write webdataset shards for a KB source or a downstream dataset's splits."""
    if not kb and not dataset:
        raise UserError("give --kb NAME and/or --dataset NAME")
    kb_m = stages.load_kb(kb, ctx.overrides) if kb else None
    ds_m = stages.load_dataset_manifest(dataset, ctx.overrides) if dataset else None
    for name, rec in stages.stage_shards(ctx.ws, kb_m, ds_m, ctx.overrides).items():
        _echo_record(f"shards {name}", rec, ["result", "seconds"])


@command("set", "dask")
def download(
    ctx: Ctx,
    kb: KbOpt,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Re-download the samples that failed in earlier runs.")
    ] = False,
) -> None:
    """Download a KB's url/text/uid Parquet metadata into webdataset shards with img2dataset."""
    kb_m = stages.load_kb(kb, ctx.overrides)
    rec = stages.stage_download(ctx.ws, kb_m, retry_failed, dask=ctx.dask)
    _echo_record(f"download {kb_m.name}", rec, ["totals", "failures", "seconds"])


@command("set", "dask")
def embed(
    ctx: Ctx,
    kb: KbOpt,
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="Also embed this dataset's splits with the KB's encoders.")
    ] = None,
) -> None:
    """Embed the KB's shards (and optionally a dataset's splits) into Parquet, one Dask task per shard."""
    kb_m = stages.load_kb(kb, ctx.overrides)
    ds_m = stages.load_dataset_manifest(dataset, ctx.overrides) if dataset else None
    records = stages.stage_embed(ctx.ws, kb_m, ds_m, ctx.overrides, dask=ctx.dask)
    for title, rec in records.items():
        extra = ["embedded_this_run"] if title == kb_m.name else []  # KB first, then dataset splits
        _echo_record(f"embed {title}", rec, ["images", *extra, "skipped", "images_per_s"])


@command("set", "dask")
def index(
    ctx: Ctx,
    kb: KbOpt,
    allow_partial: Annotated[
        bool,
        typer.Option(
            "--allow-partial",
            help="Index a KB whose embed is incomplete (the shards embedded so far; recorded in index.json).",
        ),
    ] = False,
) -> None:
    """Choose, build (in shards), tune and recall-check the KB's faiss index."""
    kb_m = stages.load_kb(kb, ctx.overrides)
    rec = stages.stage_index(ctx.ws, kb_m, dask=ctx.dask, allow_partial=allow_partial)
    keys = ["factory", "reason", "recall", "qps", "params", "seconds"]
    keys += ["partial"] if allow_partial else []
    _echo_record(f"index {kb_m.name}", rec, keys)


@command("set", "dask")
def neighbors(
    ctx: Ctx,
    dataset: DatasetOpt,
    kb: KbOpt,
    k: Annotated[
        int | None, typer.Option("--k", min=1, help="Neighbors per image (default: dataset manifest).")
    ] = None,
) -> None:
    """Top-k KB neighbors for every split of a dataset (embeds the dataset first when needed)."""
    ds_m = stages.load_dataset_manifest(dataset, ctx.overrides)
    kb_m = stages.load_kb(kb, ctx.overrides)
    rec = stages.stage_neighbors(ctx.ws, ds_m, kb_m, k, dask=ctx.dask)
    _echo_record(f"neighbors {ds_m.name} x {kb_m.name}", rec, ["k", "splits", "bytes_per_query_image"])


@command("set")
def train(
    ctx: Ctx,
    dataset: DatasetOpt,
    kb: KbOpt,
    experiment: ExperimentOpt = "demo",
    run: RunOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a finished run of another configuration under --run.")
    ] = False,
    tensorboard: TensorBoardOpt = None,
) -> None:
    """Train and evaluate the experiment's methods on precomputed neighbor tables."""
    from retformer.pipelines.results import format_table
    from retformer.pipelines.tensorboard import check_dir

    board = check_dir(tensorboard) if tensorboard is not None else None
    ds_m = stages.load_dataset_manifest(dataset, ctx.overrides)
    kb_m = stages.load_kb(kb, ctx.overrides)
    exp_m = stages.load_experiment(experiment, ctx.overrides)
    report = stages.stage_train(ctx.ws, ds_m, kb_m, exp_m, run, force=force, tensorboard=board)
    typer.echo(format_table(report))


@command("set", "dask")
def evaluate(
    ctx: Ctx,
    run_name: Annotated[
        str | None,
        typer.Argument(
            metavar="[RUN]",
            help="A finished run: its name, a unique prefix of it, a pattern ('fmnist_lt-*': the newest "
            "match) or `latest` (the default). `retformer runs` lists them.",
        ),
    ] = None,
    run: Annotated[
        str | None, typer.Option("--run", "--run-name", help="The run, as RUN (default: the latest run).")
    ] = None,
    kb: Annotated[
        str | None,
        typer.Option(
            "--kb",
            help="Evaluate the run's models with this KB (manifest name or path; embedded with the run's "
            "encoders): the eval split's neighbours against it, results in <run>/eval.<kb>.json.",
        ),
    ] = None,
) -> None:
    """Print a finished run's evaluation table (top-1, top-5, many / medium / few); with --kb, evaluate
    its trained models with another (or a grown) KB first, without retraining."""
    from retformer.pipelines.results import format_table

    if run_name and run and run_name != run:
        raise typer.BadParameter(f"two runs given: {run_name} and --run {run}")
    run = run_name or run
    if kb is None:
        name, report = stages.stage_evaluate(ctx.ws, run)
        typer.echo(f"run {name}")
    else:
        from retformer.pipelines.evaluate_kb import stage_evaluate_kb
        from retformer.pipelines.run_index import eval_file

        name, report = stage_evaluate_kb(ctx.ws, run, kb, ctx.overrides, dask=ctx.dask)
        typer.echo(
            f"run {name}: trained with {report['trained_kb']}, evaluated with {report['evaluated_kb']} "
            f"({report['kb_index']['n']} rows; {eval_file(ctx.ws.run_dir(name), report['evaluated_kb'])})"
        )
    typer.echo(format_table(report))


@command("set", "dask")
def demo(
    ctx: Ctx,
    dataset: Annotated[
        list[str] | None,
        typer.Option(
            "--dataset", help="Dataset manifest; repeatable, one --kb each (default: both dev sets)."
        ),
    ] = None,
    kb: Annotated[
        list[str] | None, typer.Option("--kb", help="KB manifest for the --dataset at the same place.")
    ] = None,
    experiment: Annotated[str, typer.Option("--experiment")] = "demo",
    seeds: Annotated[
        int,
        typer.Option(
            "--seeds", min=1, help="Training seeds per dataset: tables show mean ± sd and a paired bootstrap."
        ),
    ] = 1,
    noisy: Annotated[
        bool | None,
        typer.Option(
            "--noisy/--no-noisy",
            help="Also the noisy-label sets (40% symmetric, 40% asymmetric); default: with --seeds > 1.",
        ),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Smoke run: digits-LT only, small grids (~2 min on 2 cores).")
    ] = False,
    tensorboard: TensorBoardOpt = None,
) -> None:
    """Everything on the development datasets (Fashion-MNIST-LT, digits-LT): shards, embed, index,
    neighbors, train RetFormer + baselines with every choice on val, test reported once."""
    from retformer.pipelines.demo import QUICK_PAIRS, demo_pairs, run_demo
    from retformer.pipelines.tensorboard import check_dir

    board = check_dir(tensorboard) if tensorboard is not None else None
    with_noisy = seeds > 1 if noisy is None else noisy
    pairs = list(QUICK_PAIRS) if quick and not dataset else demo_pairs(dataset, kb, with_noisy)
    run_demo(ctx.ws, pairs, experiment, ctx.overrides, ctx.dask, seeds, quick, board)
