"""A Dask worker plugin that lets a worker process leave without the interpreter's teardown once Dask
has closed it (why: pipelines/dask_runner.py's docstring, "Shutdown"), and keeps that close quiet."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
from typing import Any

from distributed import WorkerPlugin

_closed_by_dask = False  # set by FastExit.teardown when Dask closes this process's worker


def _exit_without_teardown() -> None:
    """atexit hook: after a clean close, flush the logs and streams and leave at once (exit status 0)."""
    if not _closed_by_dask:
        return  # anything else (a crash, a failed start): the normal exit
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


class _HeartbeatAbortedByClose(logging.Filter):
    """Drops distributed's "Failed to communicate with scheduler during heartbeat" record (an ERROR
    with a 40-line traceback on the user's console) when it comes from a worker that is closing:
    the close itself shuts the connection pool under a heartbeat still in flight, which happens on a
    loaded machine when a stage ends (CI saw it after a stage's one-line error). A heartbeat failure
    of a running worker is still logged."""

    def __init__(self, worker: Any) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        from distributed.core import Status

        if not record.getMessage().startswith("Failed to communicate with scheduler during heartbeat"):
            return True
        return self.worker.status not in (Status.closing, Status.closing_gracefully, Status.closed)


class FastExit(WorkerPlugin):
    """Registered by `dask_client` on the clusters it starts itself (never on a joined scheduler's
    workers). Results are returned and files renamed into place before Dask closes a worker, so the
    skipped teardown (2-8 s with torch, open_clip and sentence-transformers loaded) loses nothing."""

    name = "retformer-fast-exit"

    def setup(self, worker: Any) -> None:
        """At the worker's start, so the hook runs after the atexit hooks of what tasks import later."""
        atexit.register(_exit_without_teardown)
        logging.getLogger("distributed.worker").addFilter(_HeartbeatAbortedByClose(worker))
        # Ctrl+C reaches the whole process group: the CLI process says it was interrupted and closes
        # the cluster; a worker process of ours would only print a KeyboardInterrupt traceback.
        import multiprocessing

        if multiprocessing.parent_process() is not None:  # a nanny's worker process, not the CLI's own
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            except ValueError:  # not that process's main thread
                pass

    def teardown(self, worker: Any) -> None:
        """Dask is closing the worker: its process may skip the teardown."""
        global _closed_by_dask
        _closed_by_dask = True
