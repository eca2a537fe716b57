"""`retformer doctor`: the machine as the stages see it (pipelines/doctor.py); exit 1 with one line when
GPUs exist but torch cannot use them.

Registered on the `retformer` app (pipelines/cli_app.py) by importing this module (pipelines/cli.py
does, before `main`).
"""

from __future__ import annotations

import typer

from retformer.pipelines.cli_app import app


@app.command()
def doctor() -> None:
    """Python, torch (CUDA build, arch list), driver, GPUs (NVML vs torch), bf16, faiss, dask, open_clip
    weights, and the device each stage will use; exit 1 with one line when GPUs exist but torch
    cannot use them."""
    from retformer.artifacts.errors import UserError
    from retformer.pipelines.doctor import gather

    report = gather()
    typer.echo(report.text())
    if report.problem:
        raise UserError(report.problem)
