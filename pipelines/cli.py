"""The `retformer` command line's entry point (`main`, the console script, `python -m retformer` and
`python -m retformer.pipelines.cli`): the app of pipelines/cli_app.py with every command module
registered on it, and how errors end.

Bad input ends with one `error:` line and exit status 1. The commands: pipelines/cli_stages.py (one per
stage, plus the demo), cli_use.py (predict), cli_serve.py, cli_browse.py, cli_runs.py (runs, compare,
list), cli_doctor.py.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import typer

# Importing a command module registers its commands on `app`, in the order `--help` lists them.
import retformer.pipelines.cli_stages  # noqa: F401  (shards, download, embed, index, neighbors, train, evaluate, demo)

# isort: split
import retformer.pipelines.cli_browse  # noqa: F401  (browse)
import retformer.pipelines.cli_doctor  # noqa: F401  (doctor)
import retformer.pipelines.cli_runs  # noqa: F401  (runs, compare, list)
import retformer.pipelines.cli_serve  # noqa: F401  (serve)
import retformer.pipelines.cli_use  # noqa: F401  (predict)
from retformer.artifacts.errors import UserError
from retformer.pipelines.cli_app import Interrupted, app


def _setup_env() -> None:
    # img2dataset pulls albumentations and wandb: keep both quiet and offline.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    # Dask's own INFO lines (nannies starting and closing) drown the progress bars.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("distributed", "bokeh", "tornado", "httpx", "sentence_transformers", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
