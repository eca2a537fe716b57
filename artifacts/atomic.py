"""Write-then-rename helpers: a killed run never leaves a half-written file a rerun would trust."""

from __future__ import annotations

import glob
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from retformer.artifacts.faults import maybe_die


def tmp_name(path: Path) -> Path:
    """The temporary sibling of `path` this process writes before renaming."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write; rename it onto `path` only if the block succeeds.

    Temporary files of `path` that a killed writer left are removed first, so rewriting an output
    also clears what a kill during its last write left behind. An OSError of the block that names no
    file (a write to a full disk) is raised again naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps_of(path)
    tmp = tmp_name(path)
    try:
        try:
            yield tmp
        except OSError as exc:
            if exc.filename is not None:
                raise
            # a write refused without a file name (a full disk: ENOSPC): name the output, so the
            # CLI's one `error:` line says which file could not be written
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        maybe_die(f"rename:{path}")  # test hook (artifacts/faults.py): a kill leaves `tmp` behind
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()


@contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temporary folder to fill; swap it in for the folder `path` only if the block succeeds.

    A reader finds the old folder, the new one, or (after a kill between the swap's two renames)
    none, never a mix of old and new files or a half-written set. Leftovers of a killed writer
    (`<name>.tmp-<pid>`, `<name>.old.tmp-<pid>`) are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps_of(path)
    tmp = tmp_name(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        maybe_die(f"rename:{path}")
        old = path.with_name(f"{path.name}.old.tmp-{os.getpid()}") if path.exists() else None
        if old is not None:
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


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


def remove_dead_temps_of(path: Path | str) -> list[Path]:
    """Remove what killed writers of `path` left beside it (`<name>.tmp-<pid>`, `<name>.old.tmp-<pid>`,
    files or folders); return them. A live writer's temporary files are kept (`remove_dead_temps`)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return remove_dead_temps(path.parent.glob(f"{glob.escape(path.name)}.*tmp-*"))
