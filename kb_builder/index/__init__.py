"""The index stage: choose the index from the KB's size, build it in shards, tune it, check recall.

Entry point `run_index(emb_dir, index_dir, section, map_tasks)`; per-shard task `build.build_shard`.
Modules: select (which faiss index for N, d, memory, recall), build (sharded, resumable build and the
one index.json writer), search (ShardedIndex, exact merge, recall tuning).

index.json is written once, after the recall check: a folder without it is no index (a kill before
the check leaves none), and a rerun whose index.json matches the build inputs and the recall check's
settings (target, k, queries) skips the stage without rewriting anything.

Growth: when the KB's parts are the indexed ones plus new parts after them, the index is extended in
place (grow.py: the new rows become one more shard, recall is checked again on a fresh sample) unless
its kind no longer fits or recall falls below the target; index.json's `grown` lists each growth,
`rebuilt` says why a grown KB was rebuilt instead.

Manifest section `index:` (kb_builder/kb_schema.py's `IndexSection`, with the defaults) — kind (auto |
flat | hnsw | ivf_flat | ivf_sq8 | ivf_pq | ivf_pq_refine), recall_target, memory_budget_gb, num_shards,
k (the k recall is measured at), num_queries.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retformer.artifacts.atomic import remove_dead_temps
from retformer.artifacts.embeddings_io import list_parts, part_num_rows
from retformer.artifacts.errors import UserError
from retformer.artifacts.names import INDEX_JSON
from retformer.artifacts.workspace import read_json
from retformer.kb_builder import MapTasks
from retformer.kb_builder.index.build import build_index, part_dim, shard_damage, write_index_record
from retformer.kb_builder.index.grow import (
    Rebuild,
    grow_decision,
    grow_index,
    remove_other_samples,
    same_parts,
    write_recall_sample,
)
from retformer.kb_builder.index.rows import part_table
from retformer.kb_builder.index.search import (
    ShardedIndex,
    exact_ground_truth,
    record_tuning,
    sample_queries,
    tune_and_check,
)
from retformer.kb_builder.index.select import choose_index, make_plan

if TYPE_CHECKING:
    from retformer.kb_builder.kb_schema import IndexSection

log = logging.getLogger(__name__)


def run_index(
    emb_dir: Path,
    index_dir: Path,
    section: IndexSection,
    map_tasks: MapTasks | None = None,
    *,
    parts: list[Path] | None = None,
    partial: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Build, tune and recall-check the index of a KB's image embeddings; returns the stage record body.

    `parts`: the parts to index, in kb_id order (default: every part in `emb_dir`; the index stage
    passes those of the KB's current shard set). `partial`: recorded in index.json as it is (the
    stage's `--allow-partial` count of shards without a part), None for a complete KB."""
    started = time.perf_counter()
    parts = list_parts(emb_dir) if parts is None else [Path(p) for p in parts]
    if not parts:
        raise UserError(f"no embeddings parts in {emb_dir}: run the embed stage first")
    n = sum(part_num_rows(p) for p in parts)
    d = part_dim(parts[0])
    k = section.k
    if k >= n:
        raise UserError(f"index.k={k} must be smaller than the KB ({n} rows)")
    target = section.recall_target
    budget = int(section.memory_budget_gb * 1e9)
    kind = section.kind
    if kind == "auto":
        plan = choose_index(n, d, budget, target, k)
    else:
        try:
            plan = make_plan(
                kind, n, d, memory_budget_bytes=budget, reason=f"{kind} requested by the manifest"
            )
        except ValueError as exc:
            raise UserError(f"index.kind: {exc}") from exc
    checked_at = {"target": target, "k": k, "queries": min(section.num_queries, n)}
    table = part_table(parts)
    existing = read_json(Path(index_dir) / INDEX_JSON, torn_ok=True) if Path(index_dir).is_dir() else None
    rebuilt: dict[str, Any] | None = None
    if existing and "recall_check" in existing:
        if not same_parts(existing.get("parts", []), table):
            why = grow_decision(existing, table, plan)
            if why is None:
                try:
                    meta, report = grow_index(index_dir, existing, table, section, map_tasks, partial=partial)
                    return _body(meta, report, plan, n, d, partial, started, grown=meta["grown"][-1])
                except Rebuild as exc:
                    why = exc.reason
            log.info("rebuilding the index of %s: %s", index_dir, why)
            rebuilt = {"reason": why, "from_n": existing.get("n"), "to_n": n}
        elif existing.get("grown") and _grown_current(index_dir, existing, plan, checked_at):
            log.info("index in %s (grown in place) is complete and recall-checked: skipping", index_dir)
            report, meta = existing["tuning"], existing
            if meta.get("partial") != partial:
                meta = {k: v for k, v in meta.items() if k != "partial"}
                write_index_record(Path(index_dir), {**meta, **({"partial": partial} if partial else {})})
            return _body(meta, report, plan, n, d, partial, started, reused=True)
    built = build_index(parts, index_dir, plan, section.num_shards, map_tasks=map_tasks, write_record=False)
    num_queries = checked_at["queries"]
    checked = built.get("recall_check") or {}
    if built.get("reused") and {name: checked.get(name) for name in checked_at} == checked_at:
        log.info("index in %s is complete and recall-checked with these settings: skipping", index_dir)
        remove_dead_temps(Path(index_dir).iterdir())
        report, meta = built["tuning"], built
        if meta.get("partial") != partial:  # the same parts, but the shard set around them changed
            meta = {k: v for k, v in meta.items() if k not in ("partial", "reused")}
            write_index_record(Path(index_dir), {**meta, **({"partial": partial} if partial else {})})
    else:
        built = {k: v for k, v in built.items() if k not in ("partial", "rebuilt", "grown")}
        if partial:
            built["partial"] = partial  # what `--allow-partial` let through, for every reader to see
        if rebuilt:
            built["rebuilt"] = rebuilt  # why a grown KB was not added to its index
        index = ShardedIndex.from_record(index_dir, built)
        # The exact top-k of the check's queries is kept (recall_sample-<key>.npz): a later growth
        # of the KB extends it by the new rows instead of searching the whole KB again.
        t0 = time.perf_counter()
        query_ids, xq = sample_queries(parts, num_queries)
        gt_scores, gt_ids = exact_ground_truth(parts, xq, k, query_ids)
        exact_s = time.perf_counter() - t0
        report = tune_and_check(
            index, parts, xq, k, target, query_ids=query_ids, ground_truth=(gt_scores, gt_ids)
        )
        report.update({"exact_s": exact_s, "exact_qps": len(xq) / max(exact_s, 1e-9)})
        sample = write_recall_sample(Path(index_dir), built["key"], query_ids, gt_ids, gt_scores, n)
        # The record tests and users read: what was chosen, why, and what it measured.
        recall_check = {
            "recall": report["recall"],
            **checked_at,
            "queries": report["num_queries"],
            "sample_file": sample,
        }
        meta = record_tuning(index_dir, report, recall_check, meta=built)
        remove_other_samples(Path(index_dir), sample)
    return _body(
        meta, report, plan, n, d, partial, started, reused=bool(built.get("reused", False)), rebuilt=rebuilt
    )


def _grown_current(index_dir: Path, existing: dict[str, Any], plan: Any, checked_at: dict[str, Any]) -> bool:
    """A grown index of exactly the parts now is reused when its shards are intact, its kind still the
    one the stage would choose and its recall checked at these settings (target, k)."""
    checked = existing.get("recall_check") or {}
    if (checked.get("target"), checked.get("k")) != (checked_at["target"], checked_at["k"]):
        return False
    if (existing.get("plan") or {}).get("kind") != plan.kind:
        return False
    return all(shard_damage(Path(index_dir), s) is None for s in existing.get("shards", []))


def _body(
    meta: dict[str, Any],
    report: dict[str, Any],
    plan: Any,
    n: int,
    d: int,
    partial: dict[str, int] | None,
    started: float,
    *,
    reused: bool = False,
    grown: dict[str, Any] | None = None,
    rebuilt: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The stage record's body: what was chosen, how it went, what the recall check measured."""
    body = {
        "factory": meta.get("factory", plan.factory),
        "reason": meta.get("reason", plan.reason),
        "n": n,
        "d": d,
        "num_shards": len(meta.get("shards", [])),
        "reused": reused,
        "partial": partial,
        "recall": round(report["recall"], 4),
        "recall_target": report.get("recall_target"),
        "qps": round(report["qps"], 1),
        "exact_qps": round(report["exact_qps"], 1) if report.get("exact_qps") is not None else None,
        "params": report["chosen"],
        "memory": report["memory"],
        "seconds": round(time.perf_counter() - started, 2),
    }
    if grown is not None:
        body["grown"] = grown
    if rebuilt is not None:
        body["rebuilt"] = rebuilt
    return body


def load_kb_index(index_dir: Path) -> ShardedIndex:
    """The built index with its tuned search parameters applied."""
    return ShardedIndex.load(index_dir)
