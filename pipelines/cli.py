"""The `retformer` command line: one command per stage, plus the end-to-end demo.

Every command reads YAML manifests (a name under manifests/ or a path to a file) and accepts
`--set key=value` overrides. Bad input ends with one `error:` line and exit status 1.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from artifacts import manifest
from artifacts.errors import UserError
from artifacts.workspace import Workspace

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="RetFormer: build a multimodal KB (embed, index, neighbours) and train the fusion model.",
)

WorkdirOpt = Annotated[Path, typer.Option("--workdir", help="Workspace root for all artifacts.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a manifest value: dotted.key=value (YAML value). Repeatable."),
]
SchedulerOpt = Annotated[
    str | None,
    typer.Option("--scheduler", help="Address of a running Dask scheduler (default: a LocalCluster)."),
]
WorkersOpt = Annotated[int | None, typer.Option("--workers", help="LocalCluster worker processes.")]
KbOpt = Annotated[str, typer.Option("--kb", help="KB manifest name (manifests/kb/) or path.")]
DatasetOpt = Annotated[
    str, typer.Option("--dataset", help="Dataset manifest name (manifests/datasets/) or path.")
]
ExperimentOpt = Annotated[
    str, typer.Option("--experiment", help="Experiment manifest name (manifests/experiments/) or path.")
]


def _setup_env() -> None:
    # img2dataset pulls albumentations and wandb: keep both quiet and offline.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    # Dask's own INFO lines (nannies starting and closing) drown the progress bars.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("distributed", "bokeh", "tornado", "httpx", "sentence_transformers", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _split_overrides(overrides: list[str] | None, prefix: str) -> list[str]:
    """Overrides addressed to one manifest (`kb.index.k=8` -> `index.k=8`) plus unprefixed ones."""
    out = []
    for item in overrides or []:
        head = item.split("=", 1)[0].split(".", 1)[0]
        if head == prefix:
            out.append(item.split(".", 1)[1])
        elif head not in ("kb", "dataset", "experiment"):
            out.append(item)
    return out


def load_kb(name: str, overrides: list[str] | None) -> dict[str, Any]:
    return manifest.load("kb", name, _split_overrides(overrides, "kb"))


def load_dataset_manifest(name: str, overrides: list[str] | None) -> dict[str, Any]:
    return manifest.load("datasets", name, _split_overrides(overrides, "dataset"))


def load_experiment(name: str, overrides: list[str] | None) -> dict[str, Any]:
    return manifest.load("experiments", name, _split_overrides(overrides, "experiment"))


def _datasets_for_kb(kb: dict[str, Any], overrides: list[str] | None) -> dict[str, dict]:
    name = kb.get("source", {}).get("dataset")
    return {name: load_dataset_manifest(name, overrides)} if name else {}


def _echo_record(title: str, record: dict[str, Any], keys: list[str]) -> None:
    shown = {k: record[k] for k in keys if k in record}
    typer.echo(f"{title}: " + json.dumps(shown, default=str))


# ----------------------------------------------------------------------------------------- commands
@app.command()
def shards(
    kb: Annotated[str | None, typer.Option("--kb", help="KB manifest name or path.")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Dataset manifest name or path.")] = None,
    workdir: WorkdirOpt = Path("work"),
    set_: SetOpt = None,
) -> None:
    """Write webdataset shards for a KB source or a downstream dataset's splits."""
    from pipelines import stages

    if not kb and not dataset:
        raise UserError("give --kb NAME and/or --dataset NAME")
    ws = Workspace(workdir)
    if kb:
        kb_m = load_kb(kb, set_)
        rec = stages.stage_kb_shards(ws, kb_m, _datasets_for_kb(kb_m, set_))
        _echo_record(f"shards {kb_m['name']}", rec, ["result", "seconds"])
    if dataset:
        ds_m = load_dataset_manifest(dataset, set_)
        rec = stages.stage_dataset_shards(ws, ds_m)
        _echo_record(f"shards {ds_m['name']}", rec, ["result", "seconds"])


@app.command()
def download(
    kb: KbOpt,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Re-download the samples that failed in earlier runs.")
    ] = False,
    workdir: WorkdirOpt = Path("work"),
    set_: SetOpt = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
) -> None:
    """Download a KB's url/text/uid Parquet metadata into webdataset shards with img2dataset."""
    from pipelines import stages
    from pipelines.dask_runner import dask_client

    ws = Workspace(workdir)
    kb_m = load_kb(kb, set_)
    with dask_client(scheduler, workers) as client:
        rec = stages.stage_download(ws, kb_m, client, retry_failed)
    _echo_record(f"download {kb_m['name']}", rec, ["totals", "failures", "seconds"])


@app.command()
def embed(
    kb: KbOpt,
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="Also embed this dataset's splits with the KB's encoders.")
    ] = None,
    workdir: WorkdirOpt = Path("work"),
    set_: SetOpt = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
) -> None:
    """Embed the KB's shards (and optionally a dataset's splits) into Parquet, one Dask task per shard."""
    from pipelines import stages
    from pipelines.dask_runner import dask_client

    ws = Workspace(workdir)
    kb_m = load_kb(kb, set_)
    ds_m = load_dataset_manifest(dataset, set_) if dataset else None
    if not stages.kb_shard_paths(ws, kb_m):
        stages.stage_kb_shards(ws, kb_m, _datasets_for_kb(kb_m, set_))
    if ds_m and not ws.dataset_info(ds_m["name"]).is_file():
        stages.stage_dataset_shards(ws, ds_m)
    with dask_client(scheduler, workers) as client:
        rec = stages.stage_embed_kb(ws, kb_m, client)
        _echo_record(f"embed {kb_m['name']}", rec, ["images", "embedded_this_run", "skipped", "images_per_s"])
        if ds_m:
            recs = stages.stage_embed_dataset(ws, ds_m, kb_m["encoders"], client, kb_m.get("embed"))
            for split, r in recs.items():
                _echo_record(f"embed {ds_m['name']}/{split}", r, ["images", "skipped", "images_per_s"])


@app.command()
def index(
    kb: KbOpt,
    workdir: WorkdirOpt = Path("work"),
    set_: SetOpt = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
) -> None:
    """Choose, build (in shards), tune and recall-check the KB's faiss index."""
    from pipelines import stages
    from pipelines.dask_runner import dask_client

    ws = Workspace(workdir)
    kb_m = load_kb(kb, set_)
    from artifacts.embeddings_io import list_parts

    if not list_parts(ws.kb_embeddings(kb_m["name"])):
        raise UserError(
            f"KB {kb_m['name']} has no embeddings: run `retformer embed --kb {kb_m['name']}` first"
        )
    shards_wanted = int(kb_m.get("index", {}).get("num_shards", 1))
    if shards_wanted > 1 or scheduler:
        with dask_client(scheduler, workers) as client:
            rec = stages.stage_index(ws, kb_m, client)
    else:
        rec = stages.stage_index(ws, kb_m, None)
    _echo_record(f"index {kb_m['name']}", rec, ["factory", "reason", "recall", "qps", "params", "seconds"])


def _kb_rows(ws: Workspace, kb_name: str) -> int:
    from artifacts.embeddings_io import list_parts, part_num_rows

    return sum(part_num_rows(p) for p in list_parts(ws.kb_embeddings(kb_name)))


@app.command()
def neighbors(
    dataset: DatasetOpt,
    kb: KbOpt,
    k: Annotated[
        int | None, typer.Option("--k", help="Neighbours per image (default: dataset manifest).")
    ] = None,
    workdir: WorkdirOpt = Path("work"),
    set_: SetOpt = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
) -> None:
    """Top-k KB neighbours for every split of a dataset (embeds the dataset first when needed)."""
    from pipelines import stages

    ws = Workspace(workdir)
    ds_m = load_dataset_manifest(dataset, set_)
    kb_m = load_kb(kb, set_)
    k = int(k or ds_m.get("neighbors", {}).get("k", 32))
    if k < 1:
        raise UserError(f"k must be >= 1 (got {k})")
    if not (ws.kb_index(kb_m["name"]) / "index.json").is_file():
        raise UserError(f"KB {kb_m['name']} has no index: run `retformer index --kb {kb_m['name']}` first")
    rows = _kb_rows(ws, kb_m["name"])
    if k > rows:
        raise UserError(f"k={k} is larger than the knowledge base {kb_m['name']} ({rows} rows)")
    _ensure_dataset_embedded(ws, ds_m, kb_m, scheduler, workers)
    rec = stages.stage_neighbors(ws, ds_m, kb_m, k)
    _echo_record(f"neighbors {ds_m['name']} x {kb_m['name']}", rec, ["k", "splits", "bytes_per_query_image"])


def _ensure_dataset_embedded(
    ws: Workspace, ds_m: dict, kb_m: dict, scheduler: str | None, workers: int | None
):
    from artifacts.workspace import read_json
    from pipelines import stages
    from pipelines.dask_runner import dask_client

    info = read_json(ws.dataset_info(ds_m["name"]))
    if info is None:
        stages.stage_dataset_shards(ws, ds_m)
        info = read_json(ws.dataset_info(ds_m["name"]))
    stale = False
    for split in info["splits"]:
        rec = read_json(ws.dataset_stage_record(ds_m["name"], f"embed-{split}"))
        stale |= rec is None or rec.get("encoders") != kb_m["encoders"]
    if stale:
        with dask_client(scheduler, workers) as client:
            stages.stage_embed_dataset(ws, ds_m, kb_m["encoders"], client, kb_m.get("embed"))


@app.command()
def train(
    dataset: DatasetOpt,
    kb: KbOpt,
    experiment: ExperimentOpt = "demo",
    run: Annotated[
        str | None, typer.Option("--run", help="Run name (default: dataset-kb-experiment).")
    ] = None,
    workdir: WorkdirOpt = Path("work"),
    set_: SetOpt = None,
) -> None:
    """Train and evaluate the experiment's methods on precomputed neighbour tables."""
    from pipelines.experiment import format_table, run_experiment

    ws = Workspace(workdir)
    ds_m = load_dataset_manifest(dataset, set_)
    kb_m = load_kb(kb, set_)
    exp_m = load_experiment(experiment, set_)
    run_name = run or f"{ds_m['name']}-{kb_m['name']}-{exp_m['name']}"
    results = run_experiment(ws, ds_m, kb_m, exp_m, ws.run_dir(run_name))
    typer.echo(format_table(results))


@app.command()
def evaluate(
    run: Annotated[str | None, typer.Option("--run", help="Run name (default: the latest run).")] = None,
    workdir: WorkdirOpt = Path("work"),
) -> None:
    """Print a finished run's evaluation table (top-1, top-5, many / medium / few)."""
    from pipelines.experiment import format_table

    runs_root = Workspace(workdir).root / "runs"
    runs = sorted(runs_root.glob("*/eval.json"), key=lambda p: p.stat().st_mtime)
    if run:
        path = runs_root / run / "eval.json"
        if not path.is_file():
            raise UserError(f"run {run!r} has no eval.json under {runs_root}")
    elif runs:
        path = runs[-1]
    else:
        raise UserError(f"no finished runs under {runs_root}: run `retformer train` first")
    typer.echo(f"run {path.parent.name}")
    typer.echo(format_table(json.loads(path.read_text())))


@app.command()
def demo(
    workdir: WorkdirOpt = Path("work"),
    set_: SetOpt = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    dataset: Annotated[str, typer.Option("--dataset")] = "fmnist_lt",
    kb: Annotated[str, typer.Option("--kb")] = "fmnist_world",
    experiment: Annotated[str, typer.Option("--experiment")] = "demo",
) -> None:
    """Everything on Fashion-MNIST-LT: shards, embed, index, neighbours, train RetFormer + baselines."""
    from pipelines.demo import run_demo

    run_demo(Workspace(workdir), dataset, kb, experiment, set_, scheduler, workers)


def main() -> None:
    """Entry point: run the app; a UserError becomes one `error:` line and exit status 1."""
    _setup_env()
    try:
        app(standalone_mode=False)
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
