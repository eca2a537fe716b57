"""A test hook: SIGKILL at a named point, so the kill-matrix test kills a stage deterministically.

Not a feature. With `RETFORMER_KILL_AT` unset (always, outside tests) `maybe_die` is one dictionary
lookup. `tests/test_kill_matrix.py` sets it on a `retformer` command it starts in a new session:

    RETFORMER_KILL_AT=<glob>[@<n>]

The n-th time (default: the first) a process of that command reaches a point whose name matches the
glob (fnmatch), it SIGKILLs its whole process group: the CLI, its Dask nanny and workers die at once,
as with `kill -9 -<pgid>`, and nothing gets to clean up. Points:

    rename:<path>   a temporary file is completely written and about to be renamed onto <path>
                    (every `artifacts.atomic.atomic_path` write, shard tars, ...): the output is
                    half-written, i.e. the state a kill during the stage leaves behind.

The count is per process (a Dask worker counts its own hits). The process group is killed only when
it leads its own session (as a command started with `start_new_session=True` does); otherwise only
this process dies, so a stray variable in an interactive shell cannot take the shell's job with it.
"""

from __future__ import annotations

import fnmatch
import os
import signal

ENV = "RETFORMER_KILL_AT"
_hits: dict[str, int] = {}


def kill_spec(spec: str) -> tuple[str, int]:
    """(glob, n) of a `RETFORMER_KILL_AT` value: `pattern@3` is the third hit, `pattern` the first."""
    pattern, sep, count = spec.rpartition("@")
    if sep and count.isdigit() and int(count) >= 1:
        return pattern, int(count)
    return spec, 1


def maybe_die(point: str) -> None:
    """SIGKILL this process group at `point` when `RETFORMER_KILL_AT` names it (test hook; see above)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    pattern, nth = kill_spec(spec)
    if not fnmatch.fnmatchcase(point, pattern):
        return
    _hits[spec] = _hits.get(spec, 0) + 1
    if _hits[spec] != nth:
        return
    pgid = os.getpgrp()
    if pgid == os.getsid(0):
        os.killpg(pgid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
