"""Search a sharded KB index, and tune/check its recall against exact search on held-out queries.

Every shard is searched for k results and the S*k candidates are merged into the exact top-k by
(score descending, kb_id ascending): ties break the same way whatever the sharding, so for exact
indexes a sharded search equals the unsharded one.

Recall@k = mean over queries of |approx top-k ∩ exact top-k| / k
(faiss.contrib.evaluation.knn_intersection_measure). The ground truth comes from
faiss.contrib.exhaustive_search.knn_ground_truth fed block by block from the Parquet parts, so it
works for a KB larger than RAM. Held-out queries are a seeded sample of KB rows; each query's own
kb_id is dropped from both lists (search k+1, drop self), so self-matches do not inflate recall.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from faiss.contrib.evaluation import knn_intersection_measure
from faiss.contrib.exhaustive_search import knn_ground_truth

from retformer.artifacts.errors import UserError
from retformer.artifacts.names import INDEX_JSON
from retformer.kb_builder.index.build import shard_damage, write_index_record
from retformer.kb_builder.index.rows import iter_blocks, part_table, read_rows
from retformer.kb_builder.index.select import estimate_bytes

log = logging.getLogger(__name__)

DEFAULT_NUM_QUERIES = 1000
QUERY_SEED = 12345  # held-out query sample (different from the training-sample seed)
WARMUP_QUERIES = 100  # untimed search before timing (page faults of a memory-mapped index)


def _read_index(path: Path, mmap: bool) -> tuple[faiss.Index, str]:
    """faiss.read_index, memory-mapped where the type allows it. Returns (index, how)."""
    if mmap:
        # IO_FLAG_MMAP_IFC maps the codes of flat-code storages (Flat, HNSW storage, SQ, Refine)
        # and IVF lists; IO_FLAG_MMAP maps IVF lists only (older files); else read into RAM.
        for name in ("IO_FLAG_MMAP_IFC", "IO_FLAG_MMAP"):
            flag = getattr(faiss, name, None)
            if flag is None:
                continue
            try:
                return faiss.read_index(str(path), flag), name
            except RuntimeError as exc:
                log.debug("%s: %s not supported (%s)", path.name, name, str(exc).splitlines()[0])
    return faiss.read_index(str(path)), "ram"


def merge_topk(
    scores: np.ndarray, ids: np.ndarray, k: int, exclude_ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of candidate lists (nq, m) by score desc then id asc; drop ids < 0 and exclude_ids[i].

    Missing results (fewer than k valid candidates) come back as id -1, score -inf.
    """
    scores = np.array(scores, dtype=np.float32, copy=True)
    ids = np.array(ids, dtype=np.int64, copy=True)
    invalid = ids < 0
    if exclude_ids is not None:
        invalid |= ids == np.asarray(exclude_ids, dtype=np.int64)[:, None]
    scores[invalid] = -np.inf
    ids[invalid] = -1
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


class ShardedIndex:
    """The shards of one KB index, searched together; results are kb_ids and cosine scores."""

    def __init__(self, shards: list[faiss.Index], meta: dict[str, Any], index_dir: Path | None = None):
        if not shards:
            raise ValueError("a ShardedIndex needs at least one shard")
        self.shards = shards
        self.meta = meta
        self.index_dir = index_dir
        self.d = int(shards[0].d)
        self.params: dict[str, Any] = {}
        self.load_modes: list[str] = []

    @classmethod
    def load(cls, index_dir: Path | str, mmap: bool = True) -> ShardedIndex:
        """Open the index written by build_index; apply the tuned params recorded in index.json."""
        index_dir = Path(index_dir)
        meta_path = index_dir / INDEX_JSON
        if not meta_path.is_file():
            raise UserError(f"no index in {index_dir} ({INDEX_JSON} missing): run the index stage first")
        from retformer.artifacts.workspace import read_json

        return cls.from_record(index_dir, read_json(meta_path) or {}, mmap)

    @classmethod
    def from_record(cls, index_dir: Path | str, meta: dict[str, Any], mmap: bool = True) -> ShardedIndex:
        """Open the shards an index record (index.json's content) lists; apply its `params`. The index
        stage opens a new build this way, before its record is written (after the recall check)."""
        index_dir = Path(index_dir)
        shards, modes = [], []
        for s in meta["shards"]:
            path = index_dir / s["file"]
            if not path.is_file():
                raise UserError(f"index shard {path} is missing: rerun the index stage")
            # A cut or overwritten file: one line (faiss's reader would print its C++ trace, or worse).
            damage = shard_damage(index_dir, s, checksum=False)
            if damage is not None:
                raise UserError(f"damaged index shard: {damage}: rerun `retformer index` to rebuild it")
            try:
                index, how = _read_index(path, mmap)
            except RuntimeError as exc:
                why = " ".join(str(exc).split())
                raise UserError(
                    f"damaged index shard: {path} cannot be read ({why}): "
                    "rerun `retformer index` to rebuild it"
                ) from None
            if index.ntotal != s["ntotal"]:
                raise UserError(
                    f"index shard {path} holds {index.ntotal} vectors, index.json says {s['ntotal']}"
                )
            shards.append(index)
            modes.append(how)
        out = cls(shards, meta, index_dir)
        out.load_modes = modes
        if meta.get("params"):
            out.set_params(meta["params"])
        log.debug(
            "loaded %s: %d vectors in %d shard(s) (%s)", meta["factory"], out.ntotal, len(shards), modes[0]
        )
        return out

    @property
    def ntotal(self) -> int:
        return int(sum(s.ntotal for s in self.shards))

    @property
    def factory(self) -> str:
        return str(self.meta.get("factory", ""))

    def sweep(self) -> list[dict[str, Any]]:
        """The plan's search settings, cheapest first."""
        return [dict(p) for p in self.meta.get("plan", {}).get("search_sweep", [{}])]

    def set_params(self, params: dict[str, Any]) -> None:
        """Apply search parameters (efSearch, nprobe, quantizer_efSearch, k_factor) to every shard."""
        ps = faiss.ParameterSpace()
        for name, value in params.items():
            for shard in self.shards:
                # faiss names IndexRefine's re-ranking factor "k_factor_rf" ("k_factor" is IVFPQR's)
                names = (name, "k_factor_rf") if name == "k_factor" else (name,)
                for i, candidate in enumerate(names):
                    try:
                        ps.set_index_parameter(shard, candidate, float(value))
                        break
                    except RuntimeError as exc:
                        if i == len(names) - 1:
                            raise UserError(
                                f"search parameter {name}={value} does not apply to index {self.factory}"
                            ) from exc
        self.params.update(params)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        params: dict[str, Any] | None = None,
        exclude_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores float32 (nq, k) descending, kb_ids int64 (nq, k)) over all shards.

        `params` are applied first (and stay applied). `exclude_ids[i]` (a kb_id, or -1) is never
        returned for query i: each shard is searched for k+1 and that id dropped.
        """
        if params:
            self.set_params(params)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.d:
            raise ValueError(f"queries must have shape (nq, {self.d}), got {q.shape}")
        kk = k + (1 if exclude_ids is not None else 0)
        results = [shard.search(q, kk) for shard in self.shards]
        scores = np.concatenate([r[0] for r in results], axis=1)
        ids = np.concatenate([r[1] for r in results], axis=1)
        return merge_topk(scores, ids, k, exclude_ids)

    def memory(self) -> dict[str, Any]:
        """Bytes on disk, estimated RAM of the index structures, and this process's RSS."""
        plan = self.meta.get("plan", {})
        disk = 0
        if self.index_dir is not None:
            disk = sum((self.index_dir / s["file"]).stat().st_size for s in self.meta.get("shards", []))
        ram = 0
        if plan.get("kind"):
            ram = estimate_bytes(
                plan["kind"],
                self.ntotal,
                self.d,
                nlist=plan.get("nlist", 0),
                pq_m=plan.get("pq_m", 0),
                hnsw_m=plan.get("hnsw_m", 0) or 32,
            )[0]
        return {
            "disk_bytes": int(disk),
            "estimated_ram_bytes": int(ram),
            "process_rss_bytes": int(faiss.get_mem_usage_kb()) * 1024,
            "load_modes": sorted(set(self.load_modes)),
        }


def sample_queries(
    base: np.ndarray | Sequence[Path], num: int, seed: int = QUERY_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded uniform sample of KB rows as held-out queries: (kb_ids sorted, float32 vectors).

    The same ids whether the KB is given as an array or as its parts.
    """
    if isinstance(base, np.ndarray):
        n = len(base)
    else:
        table = part_table(list(base))
        n = table[-1]["offset"] + table[-1]["rows"] if table else 0
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(n, size=min(num, n), replace=False)).astype(np.int64)
    if isinstance(base, np.ndarray):
        return ids, np.ascontiguousarray(base[ids], dtype=np.float32)
    return ids, read_rows(table, ids)


def exact_ground_truth(
    base: np.ndarray | Sequence[Path], queries: np.ndarray, k: int, query_ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (scores, kb_ids) by inner product, streaming the KB block by block.

    Uses faiss.contrib.exhaustive_search.knn_ground_truth (GPUs when present). With query_ids,
    searches k+1 and drops each query's own id.
    """
    xq = np.ascontiguousarray(queries, dtype=np.float32)
    kk = k + (1 if query_ids is not None else 0)
    scores, ids = knn_ground_truth(xq, iter_blocks(base), kk, metric_type=faiss.METRIC_INNER_PRODUCT)
    return merge_topk(scores, ids, k, query_ids)


def tune_and_check(
    index: ShardedIndex,
    base: np.ndarray | Sequence[Path],
    queries: np.ndarray | int,
    k: int,
    recall_target: float,
    *,
    query_ids: np.ndarray | None = None,
    sweep: list[dict[str, Any]] | None = None,
    seed: int = QUERY_SEED,
    ground_truth: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Find the cheapest search setting with recall@k >= recall_target; leave it set on `index`.

    base: the KB vectors in kb_id order (array) or its Parquet parts (streamed from disk).
    queries: float32 (nq, d) with their kb_ids in `query_ids` (dropped from both result lists;
    None = no self-exclusion), or an int = that many KB rows sampled with `seed`.
    sweep: settings to try, cheapest first (default: the plan's efSearch / nprobe sweep).
    ground_truth: (scores, ids) from exact_ground_truth for these queries, to reuse across indexes.
    Returns the report (every setting tried with recall and queries/s, the chosen one, memory).
    Raises UserError when no setting reaches the target (the report is on `exc.report`).
    """
    if not 0.0 < recall_target <= 1.0:
        raise UserError(f"recall target {recall_target} is impossible: recall@k lies in [0, 1]")
    if isinstance(queries, (int, np.integer)):
        query_ids, queries = sample_queries(base, int(queries), seed)
    xq = np.ascontiguousarray(queries, dtype=np.float32)
    nq = len(xq)
    if nq == 0:
        raise UserError("no queries to measure recall with")
    exclude = None if query_ids is None else np.asarray(query_ids, dtype=np.int64)

    exact_s: float | None = None
    if ground_truth is None:
        t0 = time.perf_counter()
        _, gt_ids = exact_ground_truth(base, xq, k, exclude)
        exact_s = time.perf_counter() - t0
    else:
        gt_ids = np.asarray(ground_truth[1])[:, :k]

    settings = [dict(p) for p in (sweep if sweep is not None else index.sweep())]
    if settings:
        index.set_params(settings[0])
        index.search(
            xq[:WARMUP_QUERIES], k, exclude_ids=None if exclude is None else exclude[:WARMUP_QUERIES]
        )
    tried: list[dict[str, Any]] = []
    chosen: dict[str, Any] | None = None
    for params in settings:
        index.set_params(params)
        t1 = time.perf_counter()
        _, ids = index.search(xq, k, exclude_ids=exclude)
        dt = max(time.perf_counter() - t1, 1e-9)
        recall = float(knn_intersection_measure(ids, gt_ids))
        tried.append({"params": params, "recall": recall, "qps": nq / dt, "search_s": dt})
        log.debug("%s %s: recall@%d %.4f, %.0f queries/s", index.factory, params, k, recall, nq / dt)
        if recall >= recall_target:
            chosen = params
            break

    best = max(tried, key=lambda t: t["recall"]) if tried else {"params": {}, "recall": 0.0, "qps": 0.0}
    pick = next(t for t in tried if t["params"] is chosen) if chosen is not None else best
    report: dict[str, Any] = {
        "factory": index.factory,
        "k": k,
        "recall_target": recall_target,
        "num_queries": nq,
        "query_seed": seed,
        "self_excluded": exclude is not None,
        "tried": tried,
        "reached": chosen is not None,
        "chosen": pick["params"],
        "recall": pick["recall"],
        "qps": pick["qps"],
        # streamed exact search, including reading the parts (None when ground_truth was given)
        "exact_s": exact_s,
        "exact_qps": None if exact_s is None else nq / max(exact_s, 1e-9),
        "threads": faiss.omp_get_max_threads(),
        "memory": index.memory(),
    }
    index.set_params(pick["params"])
    if chosen is None:
        err = UserError(
            f"index {index.factory} reached recall@{k} {best['recall']:.4f} at best ({best['params']}), "
            f"below the target {recall_target}: lower the recall target, raise the memory budget "
            "(for a less compressed index) or widen the search sweep (efSearch / nprobe / k_factor)"
        )
        err.report = report  # type: ignore[attr-defined]
        raise err
    log.info(
        "%s: recall@%d %.4f >= %s with %s", index.factory, k, pick["recall"], recall_target, pick["params"]
    )
    return report


def record_tuning(
    index_dir: Path | str,
    report: dict[str, Any],
    recall_check: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Store the tuning report, its chosen params and the stage's `recall_check` summary (when given)
    in index.json (atomically); return the record. `meta`: the build's record (build_index's return
    value) when index.json is not written yet; default: index.json as it is."""
    meta = dict(meta) if meta is not None else json.loads((Path(index_dir) / INDEX_JSON).read_text())
    meta.pop("reused", None)  # how this build went, not a property of the index
    meta["params"] = dict(report["chosen"])
    meta["tuning"] = report
    if recall_check is not None:
        meta["recall_check"] = recall_check
    write_index_record(Path(index_dir), meta)
    return meta
