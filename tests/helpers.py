"""Helpers the tests (and bench/) share: synthetic vectors, a part writer, a reference tar reader, a
process-pool `map_tasks`, and the one CLI runner."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np

from retformer.artifacts.embeddings_io import EmbeddingTable, list_parts, write_embeddings_part
from retformer.artifacts.errors import UserError
from retformer.artifacts.shards import to_record
from retformer.artifacts.tar_reader import split_name

REPO = Path(__file__).resolve().parents[1]


def synthetic_clustered_vectors(
    n: int, d: int, *, num_clusters: int | None = None, spread: float = 0.8, seed: int = 0
) -> np.ndarray:
    """L2-normalised float16 vectors around random centres (tests and benchmarks only).

    `spread` is the noise norm relative to the unit centre: same-cluster cosine ~ 1/(1+spread^2).
    Cluster sizes are skewed (Zipf-like), as KB concepts are.
    """
    rng = np.random.default_rng(seed)
    num_clusters = num_clusters or max(2, int(np.sqrt(n)))
    centres = rng.standard_normal((num_clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, num_clusters + 1) ** 0.5
    assign = rng.choice(num_clusters, size=n, p=weights / weights.sum())
    x = centres[assign] + rng.standard_normal((n, d)).astype(np.float32) * (spread / np.sqrt(d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16)


def write_parts(
    directory: Path,
    vectors: np.ndarray,
    sizes: Sequence[int],
    uid_format: str = "kb{:06d}",
    text_dim: int = 4,
) -> list[Path]:
    """`vectors` as embeddings parts of `sizes` rows each (uids `uid_format` of the row number, no
    text, label -1); returns the parts in kb_id order."""
    directory.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, size in enumerate(sizes):
        table = EmbeddingTable(
            uid=np.array([uid_format.format(j) for j in range(start, start + size)], dtype=object),
            image_emb=vectors[start : start + size],
            text_emb=np.zeros((size, text_dim), dtype=np.float16),
            has_text=np.zeros(size, dtype=bool),
            caption=[None] * size,
            label=np.full(size, -1, dtype=np.int32),
            source=["synthetic"] * size,
        )
        write_embeddings_part(directory / f"part-{i:05d}.parquet", table)
        start += size
    return list_parts(directory)


def read_shard_tarfile(path: Path | str) -> Iterator[dict[str, Any]]:
    """The reference reader the package's fast tar reader is checked against: the standard library's
    tarfile, grouping members into samples as webdataset does (records as `artifacts.shards.read_shard`)."""
    path = Path(path)
    try:
        with tarfile.open(path, mode="r|*") as tar:
            key: str | None = None
            files: dict[str, bytes] = {}
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = split_name(member.name)
                if key is not None and k != key:
                    yield to_record(key, files)
                    files = {}
                key = k
                f = tar.extractfile(member)
                files[ext] = f.read() if f is not None else b""
            if key is not None:
                yield to_record(key, files)
    except (tarfile.TarError, EOFError, ValueError) as exc:
        raise UserError(f"corrupt or truncated shard {path}: {exc}") from exc


def executor_map_tasks(pool: Executor) -> Callable[..., list[Any]]:
    """A `map_tasks` on a concurrent.futures executor (tasks must pickle, as on Dask)."""

    def map_tasks(fn: Callable[..., Any], items: list[Any], **kwargs: Any) -> list[Any]:
        for label in ("desc", "unit", "count_key"):
            kwargs.pop(label, None)
        return [f.result() for f in [pool.submit(fn, item, **kwargs) for item in items]]

    return map_tasks


def run_cli(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real `retformer` entry point in a subprocess (as a user would)."""
    cmd = [sys.executable, "-m", "retformer.pipelines.cli", *args]
    proc = subprocess.run(cmd, cwd=cwd or REPO, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def dataset_manifest(spec: Any) -> Any:
    """A dataset manifest written as a dict in a test, validated into its kind's model (a model passes
    as it is), as `load_dataset_manifest` hands it to the loaders."""
    from retformer.kb_builder.datasets.schema import DatasetManifest, validate_dataset

    return spec if isinstance(spec, DatasetManifest) else validate_dataset(spec)


def load_dataset(spec: Any) -> Any:
    """`kb_builder.datasets.load_dataset` of a manifest written as a dict (validated first)."""
    from retformer.kb_builder import datasets

    return datasets.load_dataset(dataset_manifest(spec))


def fashion_mnist_world_pool(spec: Any) -> np.ndarray:
    """`kb_builder.datasets.fashion_mnist_world_pool` of a manifest written as a dict (validated first)."""
    from retformer.kb_builder import datasets

    return datasets.fashion_mnist_world_pool(dataset_manifest(spec))


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]], fmt: int = tarfile.PAX_FORMAT) -> Path:
    """A webdataset tar written member by member, `<key>.<ext>` per file (write_shards would refuse broken
    images and keeps no odd member order)."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path
