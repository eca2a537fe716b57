"""The index stage: choose the index from the KB's size, build it in shards, tune it, check recall.

Entry point `run_index(emb_dir, index_dir, cfg, map_tasks)`; per-shard task `build.build_shard`.
Modules: select (which faiss index for N, d, memory, recall), build (sharded, resumable build and the
one index.json writer), search (ShardedIndex, exact merge, recall tuning).

index.json is written once, after the recall check: a folder without it is no index (a kill before
the check leaves none), and a rerun whose index.json matches the build inputs and the recall check's
settings (target, k, queries) skips the stage without rewriting anything.

Manifest section `index:` — kind (auto | flat | hnsw | ivf_flat | ivf_sq8 | ivf_pq | ivf_pq_refine),
recall_target, memory_budget_gb, num_shards, k (the k recall is measured at), num_queries.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from artifacts.atomic import remove_dead_temps
from artifacts.embeddings_io import list_parts, part_num_rows
from artifacts.errors import UserError
from kb_builder import MapTasks
from kb_builder.index.build import build_index, part_dim, write_index_record
from kb_builder.index.search import ShardedIndex, record_tuning, tune_and_check
from kb_builder.index.select import choose_index, make_plan

log = logging.getLogger(__name__)

DEFAULT_QUERIES = 1000


def run_index(
    emb_dir: Path,
    index_dir: Path,
    cfg: dict[str, Any],
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
    k = int(cfg.get("k", 32))
    if k >= n:
        raise UserError(f"index.k={k} must be smaller than the KB ({n} rows)")
    target = float(cfg.get("recall_target", 0.95))
    budget = int(float(cfg.get("memory_budget_gb", 8)) * 1e9)
    kind = cfg.get("kind", "auto")
    if kind == "auto":
        plan = choose_index(n, d, budget, target, k)
    else:
        try:
            plan = make_plan(
                kind, n, d, memory_budget_bytes=budget, reason=f"{kind} requested by the manifest"
            )
        except ValueError as exc:
            raise UserError(f"index.kind: {exc}") from exc
    built = build_index(
        parts, index_dir, plan, int(cfg.get("num_shards", 1)), map_tasks=map_tasks, write_record=False
    )
    num_queries = min(int(cfg.get("num_queries", DEFAULT_QUERIES)), n)
    settings = {"target": target, "k": k, "queries": num_queries}
    checked = built.get("recall_check") or {}
    if built.get("reused") and {name: checked.get(name) for name in settings} == settings:
        log.info("index in %s is complete and recall-checked with these settings: skipping", index_dir)
        remove_dead_temps(Path(index_dir).iterdir())
        report, meta = built["tuning"], built
        if meta.get("partial") != partial:  # the same parts, but the shard set around them changed
            meta = {k: v for k, v in meta.items() if k not in ("partial", "reused")}
            write_index_record(Path(index_dir), {**meta, **({"partial": partial} if partial else {})})
    else:
        built = {k: v for k, v in built.items() if k != "partial"}
        if partial:
            built["partial"] = partial  # what `--allow-partial` let through, for every reader to see
        index = ShardedIndex.from_record(index_dir, built)
        report = tune_and_check(index, parts, num_queries, k, target)
        # The record tests and users read: what was chosen, why, and what it measured.
        recall_check = {"recall": report["recall"], **settings, "queries": report["num_queries"]}
        meta = record_tuning(index_dir, report, recall_check, meta=built)
    return {
        "factory": plan.factory,
        "reason": plan.reason,
        "n": n,
        "d": d,
        "num_shards": len(meta.get("shards", [])),
        "reused": bool(built.get("reused", False)),
        "partial": partial,
        "recall": round(report["recall"], 4),
        "recall_target": target,
        "qps": round(report["qps"], 1),
        "exact_qps": round(report["exact_qps"], 1),
        "params": report["chosen"],
        "memory": report["memory"],
        "seconds": round(time.perf_counter() - started, 2),
    }


def load_kb_index(index_dir: Path) -> ShardedIndex:
    """The built index with its tuned search parameters applied."""
    return ShardedIndex.load(index_dir)
