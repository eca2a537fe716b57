"""One writer per stage output: an exclusive `flock` on a lock file beside the output.

Two `retformer` commands on one workdir would otherwise both build the same output (and both rename
their files onto it). With `output_lock(output)` around a stage, the second one waits, says so once
on stderr, and when it gets the lock finds the output complete and skips it (every stage checks
completeness after taking its lock). The kernel drops a `flock` when its holder dies, SIGKILL
included, so a killed run never leaves a stale lock behind; the lock file itself stays (an empty
`<output>.lock`): deleting it while another process waits on it would let a third one lock a new
file and run alongside the second.

Local filesystems only: on NFS, whether `flock` locks across machines depends on the mount (Linux
emulates it with byte-range locks since 2.6.12; `local_lock=flock` makes it per machine).
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

LOCK_SUFFIX = ".lock"


@dataclass
class Held:
    """What `output_lock` yields: the lock file, and how long this process waited for it (0: no one
    else held it)."""

    path: Path
    waited_s: float = 0.0


def lock_path(output: Path | str) -> Path:
    """The lock file of an output (a file or a folder): `<output>.lock` beside it."""
    output = Path(output)
    return output.with_name(output.name + LOCK_SUFFIX)


@contextmanager
def output_lock(output: Path | str, what: str | None = None) -> Iterator[Held]:
    """Hold the exclusive lock of `output` for the block; wait while another process holds it.

    `what` names the output in the one stderr line printed when this process has to wait.
    """
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    held = Held(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"waiting for another retformer run that is writing {what or Path(output).name} "
                f"(lock {path})",
                file=sys.stderr,
                flush=True,
            )
            started = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)
            held.waited_s = time.monotonic() - started
        yield held
    finally:
        os.close(fd)  # closing the last descriptor of the open file releases the lock
