"""The neighbors stage: top-k KB rows per downstream image, plus a compact store of the rows used.

A query never retrieves itself: KB rows whose uid equals the query's uid (the downstream KB holds
the training split) are removed before the top-k is cut, by uid and never by rank.
The store holds only the KB rows that some query uses, so the trainer reads ids + scores + store
instead of k full feature vectors per image (the paper's 30 GB for ImageNet-LT).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from artifacts.atomic import atomic_path
from artifacts.embeddings_io import (
    EmbeddingTable,
    arrow_to_table,
    list_parts,
    read_embeddings,
    read_part_arrow,
    table_to_arrow,
)
from artifacts.errors import UserError

SEARCH_BATCH = 4096


def part_offsets(parts: list[Path]) -> np.ndarray:
    """Cumulative row offsets of the KB parts (kb_id = offset of its part + row in part)."""
    counts = [pq.ParquetFile(p).metadata.num_rows for p in parts]
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def self_kb_ids(kb_parts: list[Path], offsets: np.ndarray, query_uids: np.ndarray) -> np.ndarray:
    """For each query, the kb_id of the KB row with the same uid, or -1. Streams the parts' uid
    column only, so memory is one part's uids at a time."""
    result = np.full(len(query_uids), -1, dtype=np.int64)
    queries = pa.array(query_uids.tolist(), type=pa.string())
    for part, offset in zip(kb_parts, offsets[:-1], strict=True):
        kb_uids = read_part_arrow(part, columns=["uid"]).column("uid")
        pos = pc.index_in(queries, value_set=kb_uids).to_numpy(zero_copy_only=False)
        hit = ~np.isnan(pos.astype(float))
        result[hit] = offset + pos[hit].astype(np.int64)
    return result


def search_excluding_self(
    index: Any, queries: np.ndarray, self_ids: np.ndarray, k: int, desc: str = "search"
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) per query in batches; `self_ids[i]` (a kb_id or -1) is never returned for
    query i (the index searches k+1 and drops it)."""
    n = len(queries)
    scores_out = np.empty((n, k), dtype=np.float32)
    ids_out = np.empty((n, k), dtype=np.int64)
    for start in tqdm(range(0, n, SEARCH_BATCH), desc=desc, unit="batch", leave=False):
        stop = min(start + SEARCH_BATCH, n)
        q = np.ascontiguousarray(queries[start:stop], dtype=np.float32)
        scores, ids = index.search(q, k, exclude_ids=self_ids[start:stop])
        if (ids < 0).any():
            raise UserError(
                f"the index returned fewer than k={k} neighbours for some queries: "
                "the KB is smaller than k (or the index is too coarse); lower k"
            )
        scores_out[start:stop] = scores
        ids_out[start:stop] = ids
    return scores_out, ids_out


def neighbor_table(uids: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> pa.Table:
    """The neighbour-table contract: uid, nn_id list<int64>[k], nn_score list<float32>[k] (fixed size)."""
    k = ids.shape[1]
    return pa.table(
        {
            "uid": pa.array(uids.tolist(), type=pa.string()),
            "nn_id": pa.FixedSizeListArray.from_arrays(
                pa.array(ids.reshape(-1), pa.int64()), type=pa.list_(pa.int64(), k)
            ),
            "nn_score": pa.FixedSizeListArray.from_arrays(
                pa.array(scores.reshape(-1), pa.float32()), type=pa.list_(pa.float32(), k)
            ),
        }
    )


def build_store(kb_parts: list[Path], offsets: np.ndarray, used_ids: np.ndarray) -> pa.Table:
    """The KB rows with these kb_ids (ascending), in the embeddings layout plus a kb_id column."""
    used_ids = np.unique(used_ids)
    pieces: list[EmbeddingTable] = []
    kb_ids: list[np.ndarray] = []
    for i, part in enumerate(kb_parts):
        lo, hi = offsets[i], offsets[i + 1]
        sel = used_ids[(used_ids >= lo) & (used_ids < hi)]
        if len(sel) == 0:
            continue
        table = arrow_to_table(read_part_arrow(part))
        pieces.append(table.take(sel - lo))
        kb_ids.append(sel)
    store = EmbeddingTable.concat(pieces)
    arrow = table_to_arrow(store)
    return arrow.append_column("kb_id", pa.array(np.concatenate(kb_ids), pa.int64()))


def run_neighbors(
    index: Any,
    kb_embeddings: Path,
    query_dirs: dict[str, Path],
    out_dir: Path,
    k: int,
) -> dict[str, Any]:
    """Write <split>.parquet for every split and store.parquet; returns the stage record's body."""
    kb_parts = list_parts(kb_embeddings)
    offsets = part_offsets(kb_parts)
    kb_size = int(offsets[-1])
    if k > kb_size:
        raise UserError(f"k={k} is larger than the knowledge base ({kb_size} rows)")
    started = time.perf_counter()
    used: list[np.ndarray] = []
    per_split: dict[str, Any] = {}
    tables: dict[str, pa.Table] = {}
    for split, qdir in query_dirs.items():
        queries = read_embeddings(qdir)
        t0 = time.perf_counter()
        self_ids = self_kb_ids(kb_parts, offsets, queries.uid)
        scores, ids = search_excluding_self(
            index, queries.image_emb.astype(np.float32), self_ids, k, desc=f"neighbors {split}"
        )
        tables[split] = neighbor_table(queries.uid, ids, scores)
        used.append(ids.reshape(-1))
        per_split[split] = {
            "queries": len(queries),
            "queries_in_kb_excluded": int((self_ids >= 0).sum()),
            "search_seconds": round(time.perf_counter() - t0, 3),
            "mean_top1_score": float(scores[:, 0].mean()) if len(scores) else None,
        }
    store = build_store(kb_parts, offsets, np.concatenate(used))
    out_dir.mkdir(parents=True, exist_ok=True)
    total_bytes = 0
    for split, table in tables.items():
        with atomic_path(out_dir / f"{split}.parquet") as tmp:
            pq.write_table(table, tmp, compression="zstd")
        total_bytes += (out_dir / f"{split}.parquet").stat().st_size
    with atomic_path(out_dir / "store.parquet") as tmp:
        pq.write_table(store, tmp, compression="zstd")
    store_bytes = (out_dir / "store.parquet").stat().st_size
    n_queries = sum(s["queries"] for s in per_split.values())
    return {
        "k": k,
        "kb_rows": kb_size,
        "splits": per_split,
        "store_rows": store.num_rows,
        "table_bytes": total_bytes,
        "store_bytes": store_bytes,
        "bytes_per_query_image": round((total_bytes + store_bytes) / max(n_queries, 1), 1),
        "seconds": round(time.perf_counter() - started, 3),
    }
