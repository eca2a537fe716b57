"""The `retformer` command line: one typer command per stage (pipelines/stages.py), plus the demo.

Every command reads YAML manifests (a name under manifests/ or a path to a file) and accepts
`--set key=value` overrides. Bad input ends with one `error:` line and exit status 1.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from artifacts.errors import UserError
from artifacts.workspace import Workspace
from pipelines import stages
from pipelines.clusters import ClusterSpec

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="RetFormer: build a multimodal KB (embed, index, neighbors) and train the fusion model.",
)

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

# The options several commands share, defined once: (parameter, annotation, default) per group.
_SHARED: dict[str, list[tuple[str, Any, Any]]] = {
    "workdir": [
        (
            "workdir",
            Annotated[Path, typer.Option("--workdir", help="Workspace root for all artifacts.")],
            Path("work"),
        )
    ],
    "set": [
        (
            "set_",
            Annotated[
                list[str] | None,
                typer.Option(
                    "--set", help="Override a manifest value: dotted.key=value (YAML value). Repeatable."
                ),
            ],
            None,
        )
    ],
    "dask": [
        (
            "scheduler",
            Annotated[
                str | None,
                typer.Option(
                    "--scheduler", help="Address of a running Dask scheduler (default: a LocalCluster)."
                ),
            ],
            None,
        ),
        (
            "workers",
            Annotated[
                int | None,
                typer.Option(
                    "--workers",
                    min=1,
                    help="LocalCluster worker processes (with a SLURM --cluster: Dask workers).",
                ),
            ],
            None,
        ),
        (
            "cluster",
            Annotated[
                str | None,
                typer.Option(
                    "--cluster",
                    help="Cluster manifest name (manifests/clusters/: local, slurm, slurm_gpu) or path.",
                ),
            ],
            None,
        ),
        (
            "scheduler_file",
            Annotated[
                Path | None,
                typer.Option(
                    "--scheduler-file",
                    help="Scheduler file of a running cluster (`dask scheduler --scheduler-file PATH`).",
                ),
            ],
            None,
        ),
    ],
}


class Interrupted(Exception):
    """Ctrl+C (SIGINT) during a command: `main` turns it into one line and exit status 130. Not a
    KeyboardInterrupt, which typer would turn into a bare exit status."""

    def __init__(self, command: str) -> None:
        super().__init__(command)
        self.command = command


@dataclass(frozen=True)
class Ctx:
    """The shared options of one command, as its first argument."""

    ws: Workspace
    overrides: list[str] | None = None
    scheduler: str | None = None
    workers: int | None = None
    cluster: ClusterSpec | None = None
    scheduler_file: Path | None = None

    @property
    def dask(self) -> dict[str, Any]:
        """Where the Dask tasks run, as the keywords of the stage_* functions (and dask_client)."""
        return {
            "scheduler": self.scheduler,
            "workers": self.workers,
            "cluster": self.cluster,
            "scheduler_file": self.scheduler_file,
        }


def command(*groups: str, name: str | None = None) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register `fn(ctx, **own options)` as a command whose CLI also takes the shared option `groups`
    ("workdir" always; "set", "dask"), appended to its own options. `name`: the command's name when
    it cannot be the function's (`list`, a builtin)."""

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        own = list(inspect.signature(fn, eval_str=True).parameters.values())[1:]
        shared = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
            for group in ("workdir", *groups)
            for name, annotation, default in _SHARED[group]
        ]

        @functools.wraps(fn)
        def run(**kwargs: Any) -> None:
            from pipelines.clusters import resolve_cluster

            scheduler, scheduler_file = kwargs.pop("scheduler", None), kwargs.pop("scheduler_file", None)
            ctx = Ctx(
                Workspace(_usable_workdir(kwargs.pop("workdir"))),
                kwargs.pop("set_", None),
                scheduler,
                kwargs.pop("workers", None),
                # The cluster manifest loaded and checked now: a bad one (or two ways to a cluster at
                # once) is one error line before any work, even when the outputs turn out complete.
                resolve_cluster(kwargs.pop("cluster", None), scheduler, scheduler_file),
                scheduler_file,
            )
            try:
                fn(ctx, **kwargs)
            except KeyboardInterrupt:
                raise Interrupted(fn.__name__) from None

        run.__signature__ = inspect.Signature(
            [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + shared
        )
        run.__annotations__ = {p.name: p.annotation for p in run.__signature__.parameters.values()}
        return app.command(name=name or fn.__name__)(run)

    return register


def _usable_workdir(path: Path) -> Path:
    """`path` if it is (or can become) a writable folder; one clear UserError otherwise."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # the nearest existing ancestor decides whether it can be created
    if probe.exists() and not probe.is_dir():
        raise UserError(f"workdir {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"workdir {path}: {probe} is not writable")
    return path


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"retformer {version('retformer')}")
        raise typer.Exit()


@app.callback()
def _global(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bars, no info lines: results and errors only.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs.")] = False,
) -> None:
    """RetFormer: build a multimodal KB (embed, index, neighbors) and train the fusion model."""
    from pipelines import console

    console.configure(quiet, verbose)


def _setup_env() -> None:
    # img2dataset pulls albumentations and wandb: keep both quiet and offline.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    # Dask's own INFO lines (nannies starting and closing) drown the progress bars.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("distributed", "bokeh", "tornado", "httpx", "sentence_transformers", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
    rec = stages.stage_download(ctx.ws, kb_m, retry_failed, **ctx.dask)
    _echo_record(f"download {kb_m['name']}", rec, ["totals", "failures", "seconds"])


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
    records = stages.stage_embed(ctx.ws, kb_m, ds_m, ctx.overrides, **ctx.dask)
    for title, rec in records.items():
        extra = ["embedded_this_run"] if title == kb_m["name"] else []  # KB first, then dataset splits
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
    rec = stages.stage_index(ctx.ws, kb_m, **ctx.dask, allow_partial=allow_partial)
    keys = ["factory", "reason", "recall", "qps", "params", "seconds"]
    keys += ["partial"] if allow_partial else []
    _echo_record(f"index {kb_m['name']}", rec, keys)


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
    rec = stages.stage_neighbors(ctx.ws, ds_m, kb_m, k, **ctx.dask)
    _echo_record(f"neighbors {ds_m['name']} x {kb_m['name']}", rec, ["k", "splits", "bytes_per_query_image"])


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
    from pipelines.results import format_table
    from pipelines.tensorboard import check_dir

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
    from pipelines.results import format_table

    if run_name and run and run_name != run:
        raise typer.BadParameter(f"two runs given: {run_name} and --run {run}")
    run = run_name or run
    if kb is None:
        name, report = stages.stage_evaluate(ctx.ws, run)
        typer.echo(f"run {name}")
    else:
        from pipelines.evaluate_kb import eval_file, stage_evaluate_kb

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
    from pipelines.demo import QUICK_PAIRS, demo_pairs, run_demo
    from pipelines.tensorboard import check_dir

    board = check_dir(tensorboard) if tensorboard is not None else None
    with_noisy = seeds > 1 if noisy is None else noisy
    pairs = list(QUICK_PAIRS) if quick and not dataset else demo_pairs(dataset, kb, with_noisy)
    run_demo(ctx.ws, pairs, experiment, ctx.overrides, ctx.dask, seeds, quick, board)


import pipelines.cli_browse  # noqa: E402,F401  (registers browse)
import pipelines.cli_doctor  # noqa: E402,F401  (registers doctor)
import pipelines.cli_runs  # noqa: E402,F401  (registers runs, compare, list)
import pipelines.cli_serve  # noqa: E402,F401  (registers serve)
import pipelines.cli_use  # noqa: E402,F401  (registers predict)


def main() -> None:
    """Entry point: run the app. Bad input -- a UserError, a usage error, a path the OS refuses --
    becomes one `error:` line on stderr and exit status 1 (2 for usage errors, as click has it)."""
    _setup_env()
    try:
        code = app(standalone_mode=False)
    except Interrupted as exc:
        _interrupted(f"`retformer {exc.command}`")
    except UserError as exc:
        _fail(str(exc), 1)
    except typer.TyperException as exc:  # typer bundles its own click: its errors derive from this
        _fail(_usage_line(exc), getattr(exc, "exit_code", 2))
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _interrupted("retformer")
    except OSError as exc:  # a workdir that is a file, a read-only disk, a full one
        where = f": {exc.filename}" if exc.filename else ""
        _fail(f"{exc.strerror or exc}{where}", 1)
    except Exception:  # a bug: its traceback, also in torchrun's failure summary (hidden ranks included)
        import traceback

        _tell_torchrun(traceback.format_exc().strip().splitlines()[-1], traceback.format_exc())
        raise
    else:
        # Without standalone mode typer returns a status instead of exiting: 130 for a Ctrl+C it
        # caught itself (outside a command's body), a typer.Exit's code otherwise.
        if code == 130:
            _interrupted("retformer")
        if isinstance(code, int) and code:
            sys.exit(code)


def _interrupted(what: str) -> None:
    """Ctrl+C: one line (finished outputs are complete, a temporary file is removed by the rerun) and
    exit status 130, so that `set -e` scripts stop here."""
    typer.echo(
        f"error: interrupted: {what} stopped by Ctrl+C (SIGINT); what it finished is kept, "
        "run the same command again to resume",
        err=True,
    )
    sys.exit(130)


def _usage_line(exc: Exception) -> str:
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    message = message or "no command given"  # `retformer` alone: the help was printed
    ctx = getattr(exc, "ctx", None)
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    return " ".join(message.split()) + where


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    _tell_torchrun(f"error: {message}")
    sys.exit(code)


def _tell_torchrun(line: str, callstack: str | None = None) -> None:
    """Under torchrun, a rank's error also goes to the error file torchrun gave it (what torch's
    `@record` writes), so torchrun's failure summary shows every rank's error, including the ranks
    `--local-ranks-filter 0` hides."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import time

    message = f"rank {os.environ.get('RANK', '?')}: {line}"
    data = {
        "message": {
            "message": message,
            "extraInfo": {"py_callstack": callstack or message, "timestamp": str(int(time.time()))},
        }
    }
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass


if __name__ == "__main__":
    main()
