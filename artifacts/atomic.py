"""Write-then-rename helpers: a killed run never leaves a half-written file a rerun would trust."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def tmp_name(path: Path) -> Path:
    """The temporary sibling of `path` this process writes before renaming."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()


def write_json_atomic(path: Path | str, obj: Any) -> None:
    """Write `obj` as indented JSON under a temporary name, then rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def pid_alive(pid: int) -> bool:
    """True while process `pid` exists: its temporary files may still be being written."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_leftover_tmp(path: Path) -> bool:
    """True for a temporary file a killed run left behind (never an output)."""
    return ".tmp-" in path.name


def remove_dead_temps(paths: Iterable[Path]) -> list[Path]:
    """Delete the temporary files (or folders) among `paths` whose writer process is gone; return them.

    The one clean-up of a killed run's leftovers: a live writer's temp is kept (Dask may still run an
    older attempt of the same task, or another process may be writing this very file), and so is one
    of this process. A temp whose name carries no pid is removed. Other paths are ignored.
    """
    removed = []
    for path in paths:
        path = Path(path)
        if not is_leftover_tmp(path):
            continue
        pid = path.name.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and (int(pid) == os.getpid() or pid_alive(int(pid))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
