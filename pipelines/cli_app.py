"""The `retformer` typer app and what its commands share: the `Ctx` of shared options, the `command`
decorator that appends them, the global options (--version, --quiet, --verbose), and
`serve_until_stopped` for the two commands that run a local server (browse, serve).

The command modules (pipelines/cli_*.py) register onto `app` here; pipelines/cli.py, the entry point,
imports them all. Nothing here imports a command module: the CLI has no import circle.
"""

from __future__ import annotations

import functools
import inspect
import os
import signal
import socketserver
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from retformer.artifacts.errors import UserError
from retformer.artifacts.workspace import Workspace
from retformer.pipelines.clusters import ClusterSpec
from retformer.pipelines.dask_target import DaskTarget

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="RetFormer: build a multimodal KB (embed, index, neighbors) and train the fusion model.",
)

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
    def dask(self) -> DaskTarget:
        """Where the Dask tasks run, as the stage_* functions take it."""
        return DaskTarget(self.scheduler, self.workers, self.cluster, self.scheduler_file)


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
            from retformer.pipelines.clusters import resolve_cluster

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


def serve_until_stopped(server: socketserver.BaseServer) -> None:
    """Serve `server` until Ctrl+C or a plain `kill`, then close it (`retformer browse`, `serve`); the
    caller has printed its URL line."""
    sys.stdout.flush()  # the URL line must reach a pipe at once (a test, a script waiting for it)
    # Ctrl+C and a plain `kill` stop it cleanly even when started from a non-interactive shell's
    # background job, which starts with SIGINT ignored (Python then installs no KeyboardInterrupt).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("stopped", err=True)
    finally:
        server.server_close()


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
    from retformer.pipelines import console

    console.configure(quiet, verbose)
