"""Run folders: their default name (a hash of the resolved configuration), the refusal to overwrite a
finished run of another configuration, and the per-sample predictions files of their results."""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retformer.artifacts.atomic import atomic_path
from retformer.artifacts.errors import UserError
from retformer.artifacts.names import prediction_file
from retformer.artifacts.schema import dump_given
from retformer.artifacts.workspace import read_json

if TYPE_CHECKING:
    from retformer.kb_builder.datasets.schema import DatasetManifest
    from retformer.kb_builder.kb_schema import KBManifest
    from retformer.pipelines.experiment_schema import ExperimentManifest


def _without_private(value: Any) -> Any:
    """A manifest without the keys the loader adds (`_manifest_path`: where it was read from)."""
    if isinstance(value, dict):
        return {k: _without_private(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, list):
        return [_without_private(v) for v in value]
    return value


def run_config(ds: DatasetManifest, kb: KBManifest, exp: ExperimentManifest) -> dict[str, Any]:
    """What a run's results depend on: the resolved dataset, KB and experiment manifests (after `--set`;
    the experiment's given keys, `dump_given`; the KB as loaded), without where they were read from."""
    return {"dataset": ds.given(), "kb": _without_private(kb.as_loaded()), "experiment": dump_given(exp)}


def config_hash(ds: DatasetManifest, kb: KBManifest, exp: ExperimentManifest) -> str:
    """8 hex digits of the SHA-256 of `run_config` (canonical JSON): the default run name's suffix."""
    text = json.dumps(run_config(ds, kb, exp), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The code a run is trained by, for eval.json's `code_version`: the installed package version, plus
    `+g<commit>` where the package is a git checkout (an editable install) and `.dirty` where its tracked
    files differ from that commit. The config hash leaves the code out on purpose (a new default would
    rename every run); this lets a reused run say that other code trained it."""
    try:
        version = metadata.version("retformer")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return checkout_version(Path(__file__).resolve(), version)


def checkout_version(source_file: Path, version: str) -> str:
    """`version`, plus `+g<commit>[.dirty]` where `source_file` is tracked by the git repository around it.
    Tracked, not merely inside: a wheel installed into a project's ignored .venv sits inside that
    project's work tree, whose commit says nothing about this code."""

    def git(*args: str) -> subprocess.CompletedProcess:
        cmd = ["git", "-C", str(source_file.parent), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10)

    try:
        if git("ls-files", "--error-unmatch", source_file.name).returncode != 0:
            return version  # not a git checkout of this code (a wheel), wherever it was installed
        commit = git("rev-parse", "--short=12", "HEAD").stdout.strip()
        dirty = git("diff", "--quiet", "HEAD", "--").returncode != 0
    except (OSError, subprocess.SubprocessError):
        return version  # no git on this machine
    return f"{version}+g{commit}" + (".dirty" if dirty else "") if commit else version


def default_run_name(ds: DatasetManifest, kb: KBManifest, exp: ExperimentManifest) -> str:
    """`<dataset>-<kb>-<experiment>-<config hash>`: another configuration gets another run folder."""
    return f"{ds.name}-{kb.name}-{exp.name}-{config_hash(ds, kb, exp)}"


def check_overwrite(run_dir: Path, wanted: str, force: bool = False) -> None:
    """UserError when `run_dir` holds a finished run of another configuration (its eval.json's
    config_hash differs from `wanted`, or it has none: a run from before the hashes) and not `force`.
    An unfinished run is not refused: its methods resume or restart by their own fingerprints."""
    done = read_json(run_dir / "eval.json", torn_ok=True)
    if done is None or force or done.get("config_hash") == wanted:
        return
    had = done.get("config_hash") or "not recorded"
    raise UserError(
        f"run {run_dir.name} already holds a finished run of another configuration (config {had}, "
        f"this one {wanted}): choose another --run name, or pass --force to replace it"
    )


def predictions_path(run_dir: Path, name: str) -> Path:
    """`<run>/predictions/<result>.parquet`: where a result's per-sample predictions live."""
    return run_dir / prediction_file(name)


def write_predictions(run_dir: Path, name: str, table: Any) -> str:
    """Write a result's predictions table; its path relative to the run folder."""
    import pyarrow.parquet as pq

    path = predictions_path(run_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return str(path.relative_to(run_dir))


def read_predictions(run_dir: Path, name: str, columns: list[str]) -> Any:
    """Those columns of a result's predictions table (pyarrow), or None where the run has none."""
    import pyarrow.parquet as pq

    path = predictions_path(run_dir, name)
    return pq.read_table(path, columns=columns) if path.is_file() else None
