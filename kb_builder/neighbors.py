"""The neighbors stage: top-k KB rows per downstream image, plus a compact store of the rows used.

Entry point `run_neighbors(index_dir, kb_embeddings, query_dirs, out_dir, k, map_tasks)`. Tasks:
`self_matches` finds the queries that are KB rows, one task per group of KB parts (the KB's uid column
is read once per run); then `search_slice`, one task per slice of a split (a split is one slice up to
TASK_ROWS queries). Slices
start on SEARCH_BATCH boundaries, so every faiss search call sees the same query batch as one serial
pass over the split, and the merged tables are the same bytes whatever runs the tasks.

A query never retrieves itself: KB rows whose uid equals the query's uid (the downstream KB holds
the training split) are removed before the top-k is cut, by uid and never by rank.
The store holds only the KB rows that some query uses, so the trainer reads ids + scores + store
instead of k full feature vectors per image (the paper's 30 GB for ImageNet-LT).

Complete or absent: the tables, the store and the record `_neighbors.json` are written into
`<out>.tmp-<pid>/` and swapped in for `<out>` as one folder (`artifacts.atomic.atomic_dir`), so no
reader ever sees a half-written set, and a killed run's folder is removed by the next one. The
record carries `key`, a hash of what the tables depend on (k, the index record's key, tuned search
parameters and build time, the KB parts' and the query parts' names, sizes and mtimes); a rerun whose
key matches reuses the folder and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from retformer.artifacts.atomic import atomic_dir, atomic_path, remove_dead_temps_of
from retformer.artifacts.embeddings_io import (
    EmbeddingTable,
    arrow_to_table,
    list_parts,
    read_embeddings,
    read_part_arrow,
    table_to_arrow,
)
from retformer.artifacts.errors import UserError
from retformer.artifacts.names import INDEX_JSON, NEIGHBOR_STORE
from retformer.artifacts.workspace import read_json, write_stage_record
from retformer.kb_builder import MapTasks, map_inline

log = logging.getLogger(__name__)

SEARCH_BATCH = 4096
TASK_ROWS = 16 * SEARCH_BATCH  # queries per task (a multiple of SEARCH_BATCH: see the module doc)
SELF_MATCH_PARTS = 64  # KB parts per self-match task (their uid columns only)
_INDEXES: dict[tuple[str, int], Any] = {}  # the loaded index per worker process, by index.json mtime
RECORD = "_neighbors.json"  # the stage record, inside the table folder
KEY_FORMAT = 1


def part_offsets(parts: list[Path]) -> np.ndarray:
    """Cumulative row offsets of the KB parts (kb_id = offset of its part + row in part)."""
    counts = [pq.ParquetFile(p).metadata.num_rows for p in parts]
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def self_kb_ids(kb_parts: list[Path], offsets: np.ndarray, query_uids: np.ndarray) -> np.ndarray:
    """For each query, the kb_id of the KB row with the same uid, or -1 (a later part's row wins).
    Streams the parts' uid column only, so memory is one part's uids at a time."""
    return _match_uids(list(zip(kb_parts, offsets[:-1].tolist(), strict=True)), query_uids)


def _match_uids(parts: list[tuple[Path, int]], query_uids: np.ndarray) -> np.ndarray:
    result = np.full(len(query_uids), -1, dtype=np.int64)
    queries = pa.array(query_uids.tolist(), type=pa.string())
    for part, offset in parts:
        kb_uids = read_part_arrow(part, columns=["uid"]).column("uid")
        pos = pc.index_in(queries, value_set=kb_uids).to_numpy(zero_copy_only=False)
        hit = ~np.isnan(pos.astype(float))
        result[hit] = offset + pos[hit].astype(np.int64)
    return result


def self_matches(parts: list[tuple[Path, int]], query_uids: np.ndarray) -> dict[str, np.ndarray]:
    """The task: which queries (all splits' uids, concatenated) are rows of these KB parts (path,
    first kb_id): their positions `rows` and `kb_ids`, sparse (most KBs hold few or no queries)."""
    ids = _match_uids(parts, query_uids)
    rows = np.flatnonzero(ids >= 0)
    return {"rows": rows, "kb_ids": ids[rows]}


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
                f"the index returned fewer than k={k} neighbors for some queries: "
                "the KB is smaller than k (or the index is too coarse); lower k"
            )
        scores_out[start:stop] = scores
        ids_out[start:stop] = ids
    return scores_out, ids_out


def neighbor_table(uids: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> pa.Table:
    """The neighbor-table contract: uid, nn_id list<int64>[k], nn_score list<float32>[k] (fixed size)."""
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
    # The encoders stay; the first part's per-shard stats (its paths and timings) say nothing about
    # the store, and would make two runs' stores differ in bytes.
    store.meta.pop("shard_stats", None)
    arrow = table_to_arrow(store)
    return arrow.append_column("kb_id", pa.array(np.concatenate(kb_ids), pa.int64()))


def _load_index(index_dir: Path) -> Any:
    """The built index with its tuned search parameters, loaded once per process (memory-mapped)."""
    from retformer.kb_builder.index import load_kb_index

    key = (str(index_dir), (index_dir / INDEX_JSON).stat().st_mtime_ns)
    if key not in _INDEXES:
        _INDEXES.clear()
        _INDEXES[key] = load_kb_index(index_dir)
    return _INDEXES[key]


def search_slice(task: tuple[str, Path, int, int, np.ndarray], index_dir: Path, k: int) -> dict:
    """The task: top-k of the queries [start, stop) of one split's embeddings, never returning a
    query's own KB row (task = (split, query dir, start, stop, those queries' self kb_ids or -1));
    returns uids, ids, scores and the count excluded."""
    split, qdir, start, stop, self_ids = task
    t0 = time.perf_counter()
    queries = read_embeddings(qdir)
    uids = queries.uid[start:stop]
    vectors = queries.image_emb[start:stop].astype(np.float32)
    scores, ids = search_excluding_self(
        _load_index(Path(index_dir)), vectors, self_ids, k, desc=f"neighbors {split}"
    )
    return {
        "split": split,
        "start": start,
        "uid": uids,
        "ids": ids,
        "scores": scores,
        "excluded": int((self_ids >= 0).sum()),
        "seconds": time.perf_counter() - t0,
    }


def _query_uids(qdir: Path) -> np.ndarray:
    """A split's uids in row order (the uid column of its parts only)."""
    columns = [read_part_arrow(p, columns=["uid"]).column("uid") for p in list_parts(qdir)]
    return np.array(pa.chunked_array(columns, type=pa.string()).to_pylist(), dtype=object)


def _self_ids(
    kb_parts: list[Path], offsets: np.ndarray, query_uids: np.ndarray, map_tasks: MapTasks
) -> np.ndarray:
    """`self_kb_ids` as `self_matches` tasks over groups of SELF_MATCH_PARTS KB parts: the KB's uid
    column is read once per run, in parallel, instead of once per search slice."""
    located = list(zip(kb_parts, offsets[:-1].tolist(), strict=True))
    groups = [located[i : i + SELF_MATCH_PARTS] for i in range(0, len(located), SELF_MATCH_PARTS)]
    found = map_tasks(self_matches, groups, desc="self-matches", unit="part group", query_uids=query_uids)
    ids = np.full(len(query_uids), -1, dtype=np.int64)
    for hits in found:  # in part order: a later part's row wins, as in self_kb_ids
        ids[hits["rows"]] = hits["kb_ids"]
    return ids


def _slices(split: str, qdir: Path, self_ids: np.ndarray) -> list[tuple[str, Path, int, int, np.ndarray]]:
    """The search tasks of one split; `self_ids` has one entry per query row, so its length is the
    split's size."""
    n = len(self_ids)
    if n == 0:
        read_embeddings(qdir)  # no parts at all: the reader's error names the folder
    return [
        (split, qdir, lo, min(lo + TASK_ROWS, n), self_ids[lo : min(lo + TASK_ROWS, n)])
        for lo in range(0, max(n, 1), TASK_ROWS)
    ]


def _file_identity(path: Path) -> list[Any]:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def neighbors_key(index_dir: Path, kb_embeddings: Path, query_dirs: dict[str, Path], k: int) -> str:
    """A hash of what the neighbor tables depend on: k, the index (its record's build key, tuned search
    parameters and build time), the KB parts and every split's query parts (name, size, mtime)."""
    index = read_json(Path(index_dir) / INDEX_JSON) or {}
    src = {
        "format": KEY_FORMAT,
        "k": k,
        "search_batch": SEARCH_BATCH,
        "index": {f: index.get(f) for f in ("key", "params", "created")},
        "kb_parts": [_file_identity(p) for p in list_parts(kb_embeddings)],
        "queries": {split: [_file_identity(p) for p in list_parts(q)] for split, q in query_dirs.items()},
    }
    return hashlib.sha256(json.dumps(src, sort_keys=True).encode()).hexdigest()[:16]


def split_keys(index_dir: Path, kb_embeddings: Path, query_dirs: dict[str, Path], k: int) -> dict[str, str]:
    """`neighbors_key` of each split alone: a split's table depends on the index, the KB parts, k and
    that split's query parts only, so a set made for more splits serves a request for fewer (`retformer
    evaluate --kb` asks for the eval split alone; a full set computed before is reused)."""
    return {s: neighbors_key(index_dir, kb_embeddings, {s: q}, k) for s, q in query_dirs.items()}


def index_identity(index_dir: Path) -> dict[str, Any]:
    """What the tables of an index depend on in its record: build key, tuned parameters, creation time,
    rows (the row count says by how much a grown index grew)."""
    index = read_json(Path(index_dir) / INDEX_JSON, torn_ok=True) or {}
    return {f: index.get(f) for f in ("key", "params", "created", "n")}


def stale_reason(out_dir: Path, index_dir: Path) -> str | None:
    """Why a complete table set in `out_dir` no longer matches the KB's index (it grew in place or was
    rebuilt after its tables were computed), or None (current, or no set there). Tables computed against
    an older index are stale: `neighbors` and `evaluate --kb` recompute them, `train` refuses them."""
    record = read_json(Path(out_dir) / RECORD, torn_ok=True)
    if not record or "index" not in record:
        return None
    was, now = record["index"], index_identity(index_dir)
    if {f: was.get(f) for f in ("key", "params", "created")} == {
        f: now.get(f) for f in ("key", "params", "created")
    }:
        return None
    if was.get("n") is not None and now.get("n") is not None and now["n"] != was["n"]:
        return f"the KB index changed from {was['n']} to {now['n']} rows after they were computed"
    return "the KB index was rebuilt or re-tuned after they were computed"


def complete_tables(out_dir: Path, key: str, wanted: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The record of a complete table set in `out_dir` made for `key`, or None (must be built).
    `wanted` (split -> `split_keys` entry): also accept a set holding at least those splits, each made
    from the same inputs (a full set serves a request for the eval split alone)."""
    record = read_json(Path(out_dir) / RECORD, torn_ok=True)  # torn: the set is rebuilt
    if not record:
        return None
    have = record.get("split_keys") or {}
    same_splits = wanted is not None and all(have.get(s) == v for s, v in wanted.items())
    if record.get("key") != key and not same_splits:
        return None
    files = [f"{split}.parquet" for split in record.get("splits", {})] + [NEIGHBOR_STORE]
    return record if all((Path(out_dir) / f).is_file() for f in files) else None


def run_neighbors(
    index_dir: Path,
    kb_embeddings: Path,
    query_dirs: dict[str, Path],
    out_dir: Path,
    k: int,
    map_tasks: MapTasks | None = None,
    record_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write <split>.parquet for every split, store.parquet and the record `_neighbors.json` (with
    `record_extra`) into out_dir, as one folder swapped in whole; returns the record.

    A complete set made from the same inputs is reused as it is (the record comes back with
    `reused: true`). The searches run as `search_slice` tasks through `map_tasks` (None: in this
    process)."""
    kb_parts = list_parts(kb_embeddings)
    offsets = part_offsets(kb_parts)
    kb_size = int(offsets[-1])
    if k > kb_size:
        raise UserError(f"k={k} is larger than the knowledge base ({kb_size} rows)")
    key = neighbors_key(index_dir, kb_embeddings, query_dirs, k)
    per_split_keys = split_keys(index_dir, kb_embeddings, query_dirs, k)
    done = complete_tables(out_dir, key, per_split_keys)
    if done is not None:
        log.info("neighbor tables in %s are complete and up to date: reusing them", out_dir)
        remove_dead_temps_of(out_dir)  # what an interrupted rewrite may have left beside them
        return {**done, "reused": True}
    if (stale := stale_reason(out_dir, index_dir)) is not None:
        log.info("neighbor tables in %s are stale (%s): recomputing them", out_dir, stale)
    started = time.perf_counter()
    map_tasks = map_tasks or map_inline
    split_uids = {split: _query_uids(qdir) for split, qdir in query_dirs.items()}
    all_self_ids = _self_ids(kb_parts, offsets, np.concatenate(list(split_uids.values())), map_tasks)
    tasks, first = [], 0
    for split, qdir in query_dirs.items():
        n = len(split_uids[split])
        tasks += _slices(split, qdir, all_self_ids[first : first + n])
        first += n
    results = map_tasks(search_slice, tasks, desc="neighbors", unit="slice", index_dir=index_dir, k=k)
    used: list[np.ndarray] = []
    per_split: dict[str, Any] = {}
    tables: dict[str, pa.Table] = {}
    for split in query_dirs:
        mine = sorted((r for r in results if r["split"] == split), key=lambda r: r["start"])
        uids = np.concatenate([r["uid"] for r in mine])
        ids = np.concatenate([r["ids"] for r in mine]).reshape(len(uids), k)
        scores = np.concatenate([r["scores"] for r in mine]).reshape(len(uids), k)
        tables[split] = neighbor_table(uids, ids, scores)
        used.append(ids.reshape(-1))
        per_split[split] = {
            "queries": len(uids),
            "queries_in_kb_excluded": sum(r["excluded"] for r in mine),
            "search_seconds": round(sum(r["seconds"] for r in mine), 3),
            "mean_top1_score": float(scores[:, 0].mean()) if len(scores) else None,
        }
    store = build_store(kb_parts, offsets, np.concatenate(used))
    with atomic_dir(out_dir) as staging:
        total_bytes = 0
        for split, table in tables.items():
            with atomic_path(staging / f"{split}.parquet") as tmp:
                pq.write_table(table, tmp, compression="zstd")
            total_bytes += (staging / f"{split}.parquet").stat().st_size
        with atomic_path(staging / NEIGHBOR_STORE) as tmp:
            pq.write_table(store, tmp, compression="zstd")
        store_bytes = (staging / NEIGHBOR_STORE).stat().st_size
        n_queries = sum(s["queries"] for s in per_split.values())
        body = {
            "key": key,
            "split_keys": per_split_keys,
            "index": index_identity(index_dir),
            "k": k,
            "kb_rows": kb_size,
            "splits": per_split,
            "store_rows": store.num_rows,
            "table_bytes": total_bytes,
            "store_bytes": store_bytes,
            "bytes_per_query_image": round((total_bytes + store_bytes) / max(n_queries, 1), 1),
            "seconds": round(time.perf_counter() - started, 3),
            **(record_extra or {}),
        }
        record = write_stage_record(staging / RECORD, "neighbors", body)
    return {**record, "reused": False}
