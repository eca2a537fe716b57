"""What a person sees on the console: `--quiet` (no progress bars, no INFO lines: the results and the
errors only) and `--verbose` (DEBUG logs), the global options of `retformer` (the typer callback of
pipelines/cli_app.py calls `configure`).

Progress bars are tqdm lines on stderr. `--quiet` turns off every bar: the stages ask
`progress_enabled()`; every other tqdm bar of this process (kb_builder's, the libraries') gets
`disable=True` as its default, and the Dask workers started after it inherit `TQDM_DISABLE=1` (tqdm
reads that variable once, when it is imported, which in this process happened before the options were
parsed). Log records go through `tqdm.write`, so a log line never tears a bar.
"""

from __future__ import annotations

import logging
import os
import sys
from functools import partialmethod

from tqdm import std as tqdm_std
from tqdm import tqdm

from retformer.artifacts.errors import UserError

_state = {"progress": True, "set_tqdm_disable": False}
_TQDM_INIT = tqdm_std.tqdm.__init__  # restored by a configure() without quiet
_FORMAT = "%(levelname)s %(name)s: %(message)s"


class _TqdmHandler(logging.Handler):
    """Writes log records above the progress bars (tqdm.write) on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise (logging.Handler's contract)
            self.handleError(record)


def configure(quiet: bool = False, verbose: bool = False) -> None:
    """Set the console up: log level (WARNING with `quiet`, DEBUG with `verbose`, else INFO), log
    records above the bars, and progress bars on or off. UserError when both are asked."""
    if quiet and verbose:
        raise UserError("--quiet and --verbose exclude each other")
    root = logging.getLogger()
    root.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
    if not any(isinstance(h, _TqdmHandler) for h in root.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(handler)
    _state["progress"] = not quiet
    # tqdm's own default: a bar created without `disable=` is off (an explicit disable= still wins).
    tqdm_std.tqdm.__init__ = partialmethod(_TQDM_INIT, disable=True) if quiet else _TQDM_INIT
    if quiet and "TQDM_DISABLE" not in os.environ:
        os.environ["TQDM_DISABLE"] = "1"  # for the processes started from here on (Dask workers)
        _state["set_tqdm_disable"] = True
    elif not quiet and _state["set_tqdm_disable"]:
        os.environ.pop("TQDM_DISABLE", None)  # only what this function set (a second configure)
        _state["set_tqdm_disable"] = False


def progress_enabled() -> bool:
    """Whether stages draw progress bars (False after `configure(quiet=True)`)."""
    return bool(_state["progress"])
