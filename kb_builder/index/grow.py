"""Grow a KB's index in place: new embeddings parts after the indexed ones become one more index shard.

A KB grows when new shards join its source (a new crawl, new labelled photos of rare classes): the
embed stage embeds only the new shards, and `retformer index` then extends the index instead of
rebuilding it, when

- the indexed parts are, unchanged (name, rows, bytes), the first parts of the KB now, so every indexed
  row keeps its kb_id and the new rows take the ids after them (a new part that sorts before an indexed
  one would move ids: rebuild);
- the index kind still fits the grown KB: `choose_index` (or the manifest's kind) names the same kind
  for the new N, an IVF has at least half the lists `ivf_nlist` would give it now, a PQ the same code;
- fewer than MAX_GROWN_SHARDS shards were added since the last build (more: rebuild, i.e. compact).

The new rows are added with their kb_ids to a new shard `shard-<S>` built from the index's own plan
(IVF kinds: from the shared trained index, so the centroids and codebooks are the ones the indexed rows
were encoded with; Flat, HNSW: an empty index, rows added). The indexed shards are not touched: a
sharded search merges the shards exactly (search.merge_topk), so a grown Flat index returns what a
rebuilt one returns, and the cost is that of the new rows. Then recall is checked again on a fresh
sample: the last check's queries (their exact top-k kept in `recall_sample-<key>.npz`, merged with an
exact search of the new rows only) plus new rows drawn at the same rate; the search parameters are
tuned again from the cheapest. Recall below the target: the stage rebuilds, and says why.

Complete or absent as every index write: the new shard and its record are renamed into place, the
sample file too, and index.json last; a kill at any point leaves the previous index.json (the previous
index, complete), and a rerun reuses a complete new shard (its record's key) and gives the same index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from retformer.artifacts.atomic import atomic_path
from retformer.artifacts.errors import UserError
from retformer.kb_builder import MapTasks, map_inline
from retformer.kb_builder.index.build import (
    SHARD_PATTERN,
    TRAINED_FILE,
    _read_json,
    build_shard,
    shard_damage,
)
from retformer.kb_builder.index.rows import iter_range, read_rows
from retformer.kb_builder.index.search import (
    QUERY_SEED,
    ShardedIndex,
    exact_ground_truth,
    merge_topk,
    record_tuning,
    sample_queries,
    tune_and_check,
)
from retformer.kb_builder.index.select import IndexPlan, ivf_nlist

if TYPE_CHECKING:
    from retformer.kb_builder.kb_schema import IndexSection

log = logging.getLogger(__name__)

SAMPLE_PREFIX = "recall_sample-"
# Shards a KB may grow by before the next growth rebuilds (compacts) it: every shard is one more
# search per query batch.
MAX_GROWN_SHARDS = 8


class Rebuild(Exception):
    """The index cannot be grown (or failed its recall check once grown): rebuild it, for `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def part_ids(table: list[dict[str, Any]]) -> list[tuple[str, int, int | None]]:
    """(name, rows, bytes) of each part of a part table or of index.json's `parts`."""
    return [(t["name"], int(t["rows"]), t.get("bytes")) for t in table]


def same_parts(indexed: list[dict[str, Any]], table: list[dict[str, Any]]) -> bool:
    """The index record's parts are exactly the parts now (bytes compared where recorded)."""
    return len(indexed) == len(table) and _prefix(indexed, table)


def _prefix(indexed: list[dict[str, Any]], table: list[dict[str, Any]]) -> bool:
    if len(indexed) > len(table):
        return False
    for (name, rows, size), (n2, r2, s2) in zip(part_ids(indexed), part_ids(table), strict=False):
        if name != n2 or rows != r2 or (size is not None and size != s2):
            return False
    return True


def grow_decision(
    existing: dict[str, Any] | None, table: list[dict[str, Any]], plan: IndexPlan
) -> str | None:
    """Whether a complete index (index.json's content) can be grown to the parts of `table` (the new
    parts after its own): None when it can, else why not (said in index.json when the stage rebuilds).
    `plan`: the index the stage would build for the grown KB (its kind decides whether the old fits)."""
    if not existing or "recall_check" not in existing:
        return "no complete index to grow"
    if not _prefix(existing.get("parts", []), table):
        return (
            "an indexed embeddings part was removed or rewritten, or a new part sorts before an indexed "
            "one: the kb_ids of indexed rows would move"
        )
    old = existing.get("plan", {})
    if int(existing.get("d", -1)) != plan.d:
        return f"the embeddings are {plan.d}-d now, the index is {existing.get('d')}-d"
    if old.get("kind") != plan.kind:
        return (
            f"the index kind no longer fits: {existing.get('factory')} holds N={existing.get('n'):,}; "
            f"for N={plan.n:,} the choice is {plan.factory} ({plan.reason or 'manifest'})"
        )
    if plan.kind.startswith("ivf"):
        if 2 * int(old.get("nlist") or 0) < ivf_nlist(plan.n):
            return (
                f"the index kind no longer fits: {old.get('nlist')} IVF lists are too few for N={plan.n:,} "
                f"(ivf_nlist gives {ivf_nlist(plan.n)})"
            )
        if int(old.get("pq_m") or 0) != int(plan.pq_m or 0):
            return f"the index kind no longer fits: PQ{old.get('pq_m')} codes, the choice is PQ{plan.pq_m}"
    grown = len(existing.get("grown") or [])
    if grown >= MAX_GROWN_SHARDS:
        return f"the index grew {grown} times since it was built: compacting it into a fresh build"
    return None


def _sample_file(key: str) -> str:
    return f"{SAMPLE_PREFIX}{key}.npz"


def write_recall_sample(
    index_dir: Path, key: str, ids: np.ndarray, gt_ids: np.ndarray, gt_scores: np.ndarray, n: int
) -> str:
    """Keep a recall check's queries and their exact top-k (the next growth extends them); the name."""
    import zipfile

    name = _sample_file(key)
    arrays = {"ids": ids, "gt_ids": gt_ids, "gt_scores": gt_scores, "n": np.int64(n)}
    with atomic_path(Path(index_dir) / name) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        for field, value in arrays.items():
            # np.savez stamps each entry with the clock: a fixed date makes the same sample the same bytes
            with zf.open(zipfile.ZipInfo(f"{field}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w") as fh:
                np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=False)
    return name


def read_recall_sample(index_dir: Path, record: dict[str, Any], k: int) -> dict[str, np.ndarray] | None:
    """The recall sample an index record names, when it is there and was made at this k; else None."""
    name = (record.get("recall_check") or {}).get("sample_file")
    path = Path(index_dir) / name if name else None
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path) as data:
            sample = {key: data[key] for key in ("ids", "gt_ids", "gt_scores", "n")}
    except (OSError, ValueError, KeyError):
        return None
    if sample["gt_ids"].ndim != 2 or sample["gt_ids"].shape[1] != k or int(sample["n"]) != record.get("n"):
        return None
    return sample


def remove_other_samples(index_dir: Path, keep: str | None) -> None:
    for p in Path(index_dir).glob(f"{SAMPLE_PREFIX}*.npz"):
        if p.name != keep:
            p.unlink(missing_ok=True)


def _exact_over_range(
    table: list[dict[str, Any]], lo: int, hi: int, xq: np.ndarray, k: int, exclude: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of the queries among the KB rows [lo, hi) only (streamed), as kb_ids."""
    blocks = (v for _, v in iter_range(table, lo, hi))
    kk = min(k + 1, hi - lo)
    import faiss

    scores, ids = knn_ground_truth(
        np.ascontiguousarray(xq), blocks, kk, metric_type=faiss.METRIC_INNER_PRODUCT
    )
    ids = np.where(ids >= 0, ids + lo, -1)
    return merge_topk(scores, ids, min(k, kk), exclude)


def grow_index(
    index_dir: Path,
    existing: dict[str, Any],
    table: list[dict[str, Any]],
    section: IndexSection,
    map_tasks: MapTasks | None = None,
    *,
    partial: dict[str, int] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Add the rows of the parts after the indexed ones as a new shard, check recall again, write
    index.json; returns (index.json's content, the tuning report). Raises Rebuild when recall falls
    below the target (nothing of the index changed then but an unlisted shard file)."""
    started = time.perf_counter()
    index_dir = Path(index_dir)
    n_old = int(existing["n"])
    n_new = table[-1]["offset"] + table[-1]["rows"]
    added = n_new - n_old
    plan = IndexPlan.from_dict(existing["plan"])
    shard_no = len(existing["shards"])
    key = _hash({"grown_from": existing["key"], "parts": part_ids(table), "range": [n_old, n_new]})
    trained = index_dir / TRAINED_FILE if existing.get("trained_file") else None
    if trained is not None and not trained.is_file():
        raise Rebuild(f"the trained index {trained} the IVF shards share is missing")

    # The new shard: reused when a killed growth of the same inputs finished it.
    t0 = time.perf_counter()
    name = SHARD_PATTERN.format(shard_no)
    rec = _read_json(index_dir / f"{name}.json")
    if rec and rec.get("key") == key and shard_damage(index_dir, rec) is None:
        log.info("growing the index: shard %d is complete, reusing it", shard_no)
    else:
        [rec] = (map_tasks or map_inline)(
            build_shard, [(shard_no, n_old, n_new)], desc="index: add", unit="task", parts=table,
            plan=plan, out_dir=str(index_dir), trained_path=str(trained) if trained else None,
            build_key=key,
        )  # fmt: skip
    add_s = time.perf_counter() - t0
    shards = [*existing["shards"], {k: v for k, v in rec.items() if k != "key"}]
    history = [
        *(existing.get("grown") or []),
        {
            "from_n": n_old,
            "to_n": n_new,
            "added": added,
            "shard": shard_no,
            "parts_added": len(table) - len(existing["parts"]),
        },
    ]
    meta = {
        **{k: v for k, v in existing.items() if k not in ("reused", "partial", "rebuilt")},
        "key": key,
        "n": n_new,
        "num_shards": len(shards),
        "shards": shards,
        "parts": [{k: t[k] for k in ("path", "name", "rows", "offset", "bytes")} for t in table],
        "bytes": int(sum(s["bytes"] for s in shards)),
        "grown": history,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if partial:
        meta["partial"] = partial

    # Recall on a fresh sample: the last check's queries (exact top-k extended by the new rows) plus new
    # rows at the same sampling rate; without a kept sample, a fresh one over the whole KB.
    t1 = time.perf_counter()
    k, target = section.k, section.recall_target
    paths = [Path(t["path"]) for t in table]
    kept = read_recall_sample(index_dir, existing, k)
    rng = np.random.default_rng(QUERY_SEED + n_new)
    if kept is not None and len(kept["ids"]):
        old_ids = kept["ids"].astype(np.int64)
        old_q = read_rows(table, old_ids)
        s_new, i_new = _exact_over_range(table, n_old, n_new, old_q, k, old_ids)
        old_s, old_i = merge_topk(
            np.concatenate([kept["gt_scores"], s_new], axis=1),
            np.concatenate([kept["gt_ids"], i_new], axis=1),
            k,
            old_ids,
        )
        fresh = min(added, max(1, math.ceil(len(old_ids) * added / n_old)))
        fresh_ids = (n_old + np.sort(rng.choice(added, size=fresh, replace=False))).astype(np.int64)
        fresh_q = read_rows(table, fresh_ids)
        f_s, f_i = exact_ground_truth(paths, fresh_q, k, fresh_ids)
        ids = np.concatenate([old_ids, fresh_ids])
        xq = np.concatenate([old_q, fresh_q])
        gt_s, gt_i = np.concatenate([old_s, f_s]), np.concatenate([old_i, f_i])
        how = (
            f"the last check's {len(old_ids)} queries (exact top-{k} extended by the new rows) "
            f"+ {fresh} new rows"
        )
    else:
        num = min(section.num_queries, n_new)
        ids, xq = sample_queries(paths, num, QUERY_SEED + n_new)
        gt_s, gt_i = exact_ground_truth(paths, xq, k, ids)
        fresh = len(ids)
        how = f"{len(ids)} KB rows sampled afresh (no kept sample of the last check)"
    exact_s = time.perf_counter() - t1
    index = ShardedIndex.from_record(index_dir, meta)
    try:
        report = tune_and_check(index, paths, xq, k, target, query_ids=ids, ground_truth=(gt_s, gt_i))
    except UserError as exc:
        got = getattr(exc, "report", {}).get("recall", float("nan"))
        raise Rebuild(
            f"after adding {added} rows the grown index reached recall@{k} {got:.4f} at best, below the "
            f"target {target}"
        ) from exc
    report["exact_s"] = exact_s
    report["exact_qps"] = len(xq) / max(exact_s, 1e-9)
    sample = write_recall_sample(index_dir, key, ids, gt_i, gt_s, n_new)
    recall_check = {
        "recall": report["recall"],
        "target": target,
        "k": k,
        "queries": int(len(ids)),
        "fresh_queries": int(fresh),
        "sample": how,
        "sample_file": sample,
    }
    history[-1].update(
        {
            "recall": report["recall"],
            "params": report["chosen"],
            "add_s": round(add_s, 3),
            "check_s": round(time.perf_counter() - t1, 3),
        }
    )
    meta["timings"] = {
        "add_s": add_s,
        "check_s": time.perf_counter() - t1,
        "total_s": time.perf_counter() - started,
    }
    meta = record_tuning(index_dir, report, recall_check, meta=meta)
    remove_other_samples(index_dir, sample)
    log.info(
        "index %s grown in place: %d -> %d rows (shard %d), recall@%d %.4f, %.1fs",
        meta["factory"], n_old, n_new, shard_no, k, report["recall"], time.perf_counter() - started,
    )  # fmt: skip
    return meta, report
