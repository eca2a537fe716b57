"""`retformer browse RUN`: serve the neighbor browser of a trained run (the work is pipelines/browse.py).

Registered on the `retformer` app by importing this module (pipelines/cli.py does, before `main`).
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Annotated

import typer

_main = sys.modules.get("__main__")
if getattr(getattr(_main, "__spec__", None), "name", None) == "pipelines.cli":
    # `python -m pipelines.cli` runs cli.py as __main__: register on the app that runs, not on the second
    # copy of the module that `import pipelines.cli` would make
    Ctx, app, command = _main.Ctx, _main.app, _main.command  # type: ignore[union-attr]
else:
    from pipelines.cli import Ctx, app, command  # noqa: F401 - app: where `command` registers

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@command()
def browse(
    ctx: Ctx,
    run: Annotated[
        str,
        typer.Argument(
            help="A run folder, a run name under <workdir>/runs, or a model file (<run>/<method>.pt)."
        ),
    ],
    method: Annotated[
        str | None,
        typer.Option(
            "--method", help="The run's model to show (default: retformer, else the run's only model)."
        ),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option("--split", help="The dataset split to browse (default: the run's eval split)."),
    ] = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (default: this machine only).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port; 0 picks a free one.")] = 0,
) -> None:
    """Serve a page to browse a run's test images: filter by class, correct / wrong, shot group and
    whether retrieval helped or hurt, pick one and see its top-k KB neighbors (thumbnails read from the
    shards, captions, similarity), the attention the fusion module gave each, whether the rule used
    retrieval (s against the gate t), the image-only prediction beside the model's, and the true class.
    Prints the URL; Ctrl+C stops it."""
    from pipelines.browse import BrowseRun
    from pipelines.browse_server import make_server, server_url

    for noisy in ("kb_builder", "faiss"):  # index loading notes: not what a browse user asked for
        logging.getLogger(noisy).setLevel(logging.WARNING)
    browser = BrowseRun.open(run, method, ctx.ws.root, split)
    server = make_server(browser, host, port)
    if host not in LOOPBACK:
        typer.echo(
            f"warning: listening on {host}: the page has no login, anyone who can reach it sees the run",
            err=True,
        )
    typer.echo(
        f"browsing run {browser.run_dir.name} ({browser.method}, {browser.split} split, "
        f"{len(browser.features)} images) at {server_url(server)}  (Ctrl+C stops)"
    )
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
