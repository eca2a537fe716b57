"""`make setup` on a filesystem without room for the venv (~7 GB: the pinned torch is a CUDA build) stops
with one line before pip starts, and creates nothing: CI once died of pip's "No space left on device"
half-way through an install."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tests.package_layout import REPO


def test_setup_without_room_for_the_venv_stops_with_one_line_and_creates_nothing(tmp_path: Path) -> None:
    """A free-space floor no disk meets: make fails, stderr's one line names the venv and the free space,
    and the venv's folder is never made. PYTHON=false: were the check to let setup through, creating the
    venv fails at once instead of installing 7 GB."""
    venv = tmp_path / "nested" / ".venv"
    proc = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "setup",
            f"VENV={venv}",
            "VENV_MIN_FREE_GB=100000000",
            "PYTHON=false",
        ],
        cwd=REPO,
        # not a sub-make of `make test`: its MAKEFLAGS and MAKELEVEL would change what make prints
        env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if not re.match(r"make(\[\d+\])?: ", line)]
    assert len(lines) == 1, proc.stderr
    assert str(venv) in lines[0] and "GB free" in lines[0], lines[0]
    assert not (tmp_path / "nested").exists()
