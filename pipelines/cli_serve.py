"""`retformer serve RUN`: a run's model as a local JSON service (the work is pipelines/serve.py).

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
def serve(
    ctx: Ctx,
    run: Annotated[
        str,
        typer.Argument(
            help="A run folder, a run name under <workdir>/runs (a pattern picks the newest match), "
            "or a model file (<run>/<method>.pt)."
        ),
    ],
    method: Annotated[
        str | None,
        typer.Option(
            "--method", help="The run's model to serve (default: retformer, else the run's only model)."
        ),
    ] = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (default: this machine only).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port; 0 picks a free one.")] = 8765,
    max_bytes: Annotated[
        int, typer.Option("--max-bytes", min=1, help="Largest request body accepted (bytes); larger: 413.")
    ] = 10 * 1024 * 1024,
    neighbors: Annotated[int, typer.Option("--neighbors", min=0, help="KB neighbors listed per image.")] = 5,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    kb: Annotated[
        str | None,
        typer.Option("--kb", help="Search this KB instead of the run's (as `retformer predict --kb`)."),
    ] = None,
) -> None:
    """Serve a run's model over HTTP, kept loaded: POST /predict with an image's raw bytes as the body
    (Content-Type image/*) answers the JSON record `retformer predict` prints for it; GET /health names
    the run and method. Errors are JSON {"error": ...} with a 4xx status (413 above --max-bytes, 400
    for a body that is not an image). One prediction at a time; Ctrl+C stops it."""
    from retformer.pipelines.serve import PredictService, make_server, server_url
    from retformer.pipelines.use.predictor import Predictor

    for noisy in ("retformer.kb_builder", "faiss"):  # index loading notes: not what a serve user asked for
        logging.getLogger(noisy).setLevel(logging.WARNING)
    service = PredictService(Predictor.open(run, method, ctx.ws.root, device, kb=kb), neighbors)
    service.warm_up()
    server = make_server(service, host, port, max_bytes)
    if host not in LOOPBACK and not host.startswith("127."):
        typer.echo(
            f"warning: listening on {host}: the service has no login, anyone who can reach it can use it",
            err=True,
        )
    health = service.health()
    typer.echo(
        f"serving {health['method']} of run {health['run']} at {server_url(server)}  "
        f"(POST /predict with an image's bytes, GET /health; Ctrl+C stops)"
    )
    serve_until_stopped(server)
