"""Rows of the embeddings parts as the index sees them: kb_id ranges, blocks, samples (faiss-free)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from retformer.artifacts.embeddings_io import part_num_rows, read_image_vectors
from retformer.artifacts.errors import UserError

ADD_BATCH_ROWS = 65_536  # vectors converted to fp32 and added at a time (bounds a task's memory)
# The training sample is drawn from random parts holding at least this many times the sample
# size, so that sampling reads a fraction of a web-scale KB instead of all of it.
TRAIN_PART_OVERSAMPLE = 4


def part_table(parts: Sequence[Path]) -> list[dict[str, Any]]:
    """Each part with its row count and kb_id offset (cumulative rows of the parts before it)."""
    table = []
    offset = 0
    for p in parts:
        p = Path(p)
        rows = part_num_rows(p)
        entry = {"path": str(p.resolve()), "name": p.name, "rows": rows, "offset": offset}
        table.append({**entry, "bytes": p.stat().st_size})
        offset += rows
    return table


def part_dim(path: Path) -> int:
    """The image embedding dimension stored in a part's schema metadata."""
    md = {k.decode(): v.decode() for k, v in (pq.read_schema(path).metadata or {}).items()}
    if "image_dim" not in md:
        raise UserError(f"{path} has no image_dim metadata: not an embeddings part")
    return int(md["image_dim"])


def shard_ranges(n: int, num_shards: int) -> list[tuple[int, int]]:
    """Split [0, n) into `num_shards` contiguous ranges whose sizes differ by at most one."""
    num_shards = max(1, min(int(num_shards), n))
    bounds = [n * s // num_shards for s in range(num_shards + 1)]
    return [(bounds[s], bounds[s + 1]) for s in range(num_shards)]


def iter_range(
    parts: list[dict[str, Any]], id_lo: int, id_hi: int, batch_rows: int = ADD_BATCH_ROWS
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (kb_ids int64, vectors float32) for the kb_ids in [id_lo, id_hi), in order, batched."""
    for part in parts:
        lo = max(id_lo - part["offset"], 0)
        hi = min(id_hi - part["offset"], part["rows"])
        if lo >= hi:
            continue
        _, vectors = read_image_vectors(Path(part["path"]))
        if len(vectors) != part["rows"]:
            raise UserError(
                f"{part['path']} changed while indexing ({len(vectors)} rows, expected {part['rows']})"
            )
        for start in range(lo, hi, batch_rows):
            stop = min(start + batch_rows, hi)
            ids = np.arange(part["offset"] + start, part["offset"] + stop, dtype=np.int64)
            yield ids, np.ascontiguousarray(vectors[start:stop], dtype=np.float32)


def iter_blocks(base: np.ndarray | Sequence[Path], batch_rows: int = ADD_BATCH_ROWS) -> Iterator[np.ndarray]:
    """float32 blocks of the KB in kb_id order, from an array or from Parquet parts (streamed)."""
    if isinstance(base, np.ndarray):
        for start in range(0, len(base), batch_rows):
            yield np.ascontiguousarray(base[start : start + batch_rows], dtype=np.float32)
        return
    table = part_table(list(base))
    total = table[-1]["offset"] + table[-1]["rows"] if table else 0
    for _, vectors in iter_range(table, 0, total, batch_rows):
        yield vectors


def sample_rows(parts: list[dict[str, Any]], size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded uniform sample of `size` KB rows: (kb_ids sorted, float32 vectors).

    Two stages: random parts until they hold TRAIN_PART_OVERSAMPLE x size rows, then rows
    uniformly among those parts. Deterministic for a given part table and seed.
    """
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    pool = 0
    for i in rng.permutation(len(parts)):
        chosen.append(int(i))
        pool += parts[i]["rows"]
        if pool >= TRAIN_PART_OVERSAMPLE * size:
            break
    chosen.sort()
    size = min(size, pool)
    picks = np.sort(rng.choice(pool, size=size, replace=False)) if size < pool else np.arange(pool)
    ids_out, vecs_out = [], []
    start = 0
    for i in chosen:
        part = parts[i]
        lo, hi = np.searchsorted(picks, [start, start + part["rows"]])
        rows = picks[lo:hi] - start
        start += part["rows"]
        if len(rows) == 0:
            continue
        _, vectors = read_image_vectors(Path(part["path"]))
        ids_out.append(part["offset"] + rows)
        vecs_out.append(np.asarray(vectors[rows], dtype=np.float32))
    ids = np.concatenate(ids_out).astype(np.int64)
    vecs = np.concatenate(vecs_out)
    order = np.argsort(ids, kind="stable")
    return ids[order], np.ascontiguousarray(vecs[order])


def read_rows(parts: list[dict[str, Any]], ids: np.ndarray) -> np.ndarray:
    """float32 vectors of the given kb_ids (any order), reading only the parts that hold them."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.empty((len(ids), 0), dtype=np.float32)
    for part in parts:
        mask = (ids >= part["offset"]) & (ids < part["offset"] + part["rows"])
        if not mask.any():
            continue
        _, vectors = read_image_vectors(Path(part["path"]))
        if out.shape[1] == 0:
            out = np.zeros((len(ids), vectors.shape[1]), dtype=np.float32)
        out[mask] = vectors[ids[mask] - part["offset"]]
    return out
