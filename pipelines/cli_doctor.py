"""`retformer doctor`: the machine as the stages see it (pipelines/doctor.py); exit 1 with one line when
GPUs exist but torch cannot use them.

Registered on the `retformer` app by importing this module (pipelines/cli.py does, before `main`).
"""

from __future__ import annotations

import sys

import typer

_main = sys.modules.get("__main__")
if getattr(getattr(_main, "__spec__", None), "name", None) == "pipelines.cli":
    app = _main.app  # type: ignore[union-attr]  # `python -m pipelines.cli`: the app that runs
else:
    from pipelines.cli import app


@app.command()
def doctor() -> None:
    """Python, torch (CUDA build, arch list), driver, GPUs (NVML vs torch), bf16, faiss, dask, open_clip
    weights, and the device each stage will use; exit 1 with one line when GPUs exist but torch
    cannot use them."""
    from artifacts.errors import UserError
    from pipelines.doctor import gather

    report = gather()
    typer.echo(report.text())
    if report.problem:
        raise UserError(report.problem)
