"""The workspace layout: every artifact's path in one place (root = --workdir, default ./work)."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from artifacts.atomic import write_json_atomic


@dataclass(frozen=True)
class Workspace:
    """Paths of the artifacts every stage reads and writes."""

    root: Path

    # knowledge bases
    def kb_dir(self, kb: str) -> Path:
        return self.root / "kb" / kb

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
        return self.root / "datasets" / dataset

    def dataset_shards(self, dataset: str) -> Path:
        return self.dataset_dir(dataset) / "shards"

    def dataset_embeddings(self, dataset: str, split: str) -> Path:
        return self.dataset_dir(dataset) / "embeddings" / split

    def dataset_info(self, dataset: str) -> Path:
        return self.dataset_dir(dataset) / "dataset.json"

    def dataset_stage_record(self, dataset: str, stage: str) -> Path:
        return self.dataset_dir(dataset) / "_stages" / f"{stage}.json"

    def neighbors_dir(self, dataset: str, kb: str, k: int) -> Path:
        return self.dataset_dir(dataset) / "neighbors" / kb / f"k{k}"

    # training runs
    def run_dir(self, run: str) -> Path:
        return self.root / "runs" / run


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


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's content, or None when it does not exist."""
    return json.loads(path.read_text()) if path.is_file() else None
