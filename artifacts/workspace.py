"""The workspace layout: every artifact's path in one place (root = --workdir, default ./work)."""

from __future__ import annotations

import json
import platform
import re
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from retformer.artifacts.atomic import write_json_atomic
from retformer.artifacts.errors import UserError

# A KB, dataset or run name is one folder under the workdir: no separator, not `.`/`..`, no leading dot.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]*")


def plain_name(name: str, what: str) -> str:
    """`name` when it is a plain name (letters, digits, `_ - . + =`, not starting with a dot); a
    UserError otherwise: `../..` or an absolute path would put (and remove) files outside --workdir."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or len(name) > 200:
        raise UserError(
            f"{what} name {name!r} is not a plain name (letters, digits and _ - . + =, not starting with "
            "a dot, no /): it names a folder under --workdir"
        )
    return name


@dataclass(frozen=True)
class Workspace:
    """Paths of the artifacts every stage reads and writes."""

    root: Path

    # knowledge bases
    def kb_dir(self, kb: str) -> Path:
        return self.root / "kb" / plain_name(kb, "KB")

    def kb_shards(self, kb: str) -> Path:
        return self.kb_dir(kb) / "shards"

    def kb_embeddings(self, kb: str) -> Path:
        return self.kb_dir(kb) / "embeddings"

    def kb_index(self, kb: str) -> Path:
        return self.kb_dir(kb) / "index"

    def kb_stage_record(self, kb: str, stage: str) -> Path:
        return self.kb_dir(kb) / "_stages" / f"{stage}.json"

    # downstream datasets
    def dataset_dir(self, dataset: str) -> Path:
        return self.root / "datasets" / plain_name(dataset, "dataset")

    def dataset_shards(self, dataset: str) -> Path:
        return self.dataset_dir(dataset) / "shards"

    def dataset_embeddings(self, dataset: str, split: str) -> Path:
        return self.dataset_dir(dataset) / "embeddings" / split

    def dataset_info(self, dataset: str) -> Path:
        return self.dataset_dir(dataset) / "dataset.json"

    def dataset_stage_record(self, dataset: str, stage: str) -> Path:
        return self.dataset_dir(dataset) / "_stages" / f"{stage}.json"

    def neighbors_dir(self, dataset: str, kb: str, k: int) -> Path:
        return self.dataset_dir(dataset) / "neighbors" / plain_name(kb, "KB") / f"k{k}"

    # training runs
    def run_dir(self, run: str) -> Path:
        return self.root / "runs" / plain_name(run, "run")


def versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes the outputs (for stage records)."""
    out = {"python": platform.python_version()}
    for dist in (
        "torch",
        "open_clip_torch",
        "timm",
        "faiss-cpu",
        "faiss-gpu-cu12",
        "pyarrow",
        "dask",
        "retformer",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def write_stage_record(path: Path, stage: str, record: dict[str, Any]) -> dict[str, Any]:
    """Write one stage run's JSON record (inputs, params, versions, counts, timings) atomically."""
    full = {
        "stage": stage,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
        **record,
    }
    write_json_atomic(path, full)
    return full


def read_json(path: Path, *, torn_ok: bool = False) -> dict[str, Any] | None:
    """A JSON record's content, or None when it does not exist.

    A torn record (cut short by a full disk or another tool, edited by hand: not a JSON object) is a
    UserError naming it; with `torn_ok` (the stage that writes it is asking whether its output is
    complete) it is None, so that the stage redoes that output."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        data, why = None, " ".join(str(exc).split())
    else:
        why = f"a JSON {type(data).__name__}, not an object"
    if isinstance(data, dict):
        return data
    if torn_ok:
        return None
    raise UserError(f"{path} is torn or not a record ({why}): rerun the stage that writes it, or remove it")
