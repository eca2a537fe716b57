"""`retformer browse RUN`: serve the neighbor browser of a trained run (the work is pipelines/browse.py).

Registered on the `retformer` app (pipelines/cli_app.py) by importing this module (pipelines/cli.py
does, before `main`).
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from retformer.pipelines.cli_app import Ctx, command, serve_until_stopped

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
    from retformer.pipelines.browse import BrowseRun
    from retformer.pipelines.browse_server import make_server, server_url

    for noisy in ("retformer.kb_builder", "faiss"):  # index loading notes: not what a browse user asked for
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
    serve_until_stopped(server)
