"""The faiss index layer of the KB pipeline: choose, build (sharded), search, tune and check.

    plan = choose_index(n, d, memory_budget_bytes, recall_target, k)
    record = build_index(parts, out_dir, plan, num_shards, submit=client.submit)
    index = ShardedIndex.load(out_dir)                    # memory-mapped where possible
    report = tune_and_check(index, parts, 1000, k, recall_target)   # raises UserError if unmet
    record_tuning(out_dir, report)                        # tuned params land in index.json
    scores, kb_ids = index.search(queries, k)

Split over index_select (choice), index_build (sharded build) and index_search (search, recall).
"""

from kb_builder.index_build import (
    INDEX_JSON,
    build_index,
    build_shard,
    iter_blocks,
    part_table,
    sample_rows,
    shard_ranges,
    synthetic_clustered_vectors,
    train_shared,
)
from kb_builder.index_search import (
    ShardedIndex,
    exact_ground_truth,
    merge_topk,
    record_tuning,
    sample_queries,
    tune_and_check,
)
from kb_builder.index_select import IndexPlan, choose_index, estimate_bytes, make_plan

__all__ = [
    "INDEX_JSON",
    "IndexPlan",
    "ShardedIndex",
    "build_index",
    "build_shard",
    "choose_index",
    "estimate_bytes",
    "exact_ground_truth",
    "iter_blocks",
    "make_plan",
    "merge_topk",
    "part_table",
    "record_tuning",
    "sample_queries",
    "sample_rows",
    "shard_ranges",
    "synthetic_clustered_vectors",
    "train_shared",
    "tune_and_check",
]
