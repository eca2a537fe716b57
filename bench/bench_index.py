"""Benchmark the KB index candidates: build time, size, tuned recall@k and queries/s vs exact search.

    python bench/bench_index.py --n 100000 1000000 --d 512 --out bench/results/index.json
    python bench/bench_index.py --parts work/kb/<kb>/embeddings --out bench/results/index_real.json

For every dataset (clustered synthetic data of each --n, and real embeddings from --parts) and every
candidate index: build through the real pipeline (Parquet parts -> build_index -> ShardedIndex),
tune on held-out KB rows (self-excluded) to the cheapest setting at or above --recall-target (or
the best reached), and record build_s, bytes, recall@k, qps at that setting, the exact-search qps
of faiss in the same run, and which candidate choose_index picks for the --budget-gb.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kb_builder.embeddings_io import EmbeddingTable, list_parts, read_image_vectors, write_embeddings_part  # noqa: E402
from kb_builder.errors import UserError  # noqa: E402
from kb_builder.faiss_index import (  # noqa: E402
    ShardedIndex,
    build_index,
    choose_index,
    exact_ground_truth,
    make_plan,
    part_table,
    sample_queries,
    synthetic_clustered_vectors,
    tune_and_check,
)

log = logging.getLogger("bench_index")

CANDIDATES = ("flat", "hnsw", "ivf_flat", "ivf_sq8", "ivf_pq_refine")
ROWS_PER_PART = 100_000


def write_synthetic_parts(directory: Path, n: int, d: int, seed: int) -> list[Path]:
    """Clustered synthetic vectors as embeddings parts of ROWS_PER_PART rows."""
    vectors = synthetic_clustered_vectors(n, d, seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, n, ROWS_PER_PART)):
        rows = vectors[start : start + ROWS_PER_PART]
        size = len(rows)
        table = EmbeddingTable(
            uid=np.array([f"syn{j:09d}" for j in range(start, start + size)], dtype=object),
            image_emb=rows,
            text_emb=np.zeros((size, 1), dtype=np.float16),
            has_text=np.zeros(size, dtype=bool),
            caption=[None] * size,
            label=np.full(size, -1, dtype=np.int32),
            source=["synthetic"] * size,
        )
        write_embeddings_part(directory / f"part-{i:05d}.parquet", table)
    return list_parts(directory)


def exact_qps(parts: list[Path], queries: np.ndarray, k: int) -> float:
    """Queries/s of faiss's exact inner-product search over the KB held in RAM (fp32)."""
    d = queries.shape[1]
    index = faiss.IndexFlatIP(d)
    for p in parts:
        _, vectors = read_image_vectors(p)
        if len(vectors):
            index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    t0 = time.perf_counter()
    index.search(queries, k + 1)
    return len(queries) / (time.perf_counter() - t0)


def bench_dataset(name: str, parts: list[Path], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """All candidates on one dataset."""
    table = part_table(parts)
    n = table[-1]["offset"] + table[-1]["rows"]
    _, first = read_image_vectors(parts[0])
    d = first.shape[1]
    budget = int(args.budget_gb * 1e9)
    chosen = choose_index(n, d, budget, args.recall_target, args.k)
    query_ids, queries = sample_queries(parts, args.queries, seed=12345)
    t0 = time.perf_counter()
    ground_truth = exact_ground_truth(parts, queries, args.k, query_ids)
    gt_s = time.perf_counter() - t0
    result: dict[str, Any] = {
        "dataset": name,
        "n": n,
        "d": d,
        "k": args.k,
        "recall_target": args.recall_target,
        "num_queries": len(queries),
        "budget_bytes": budget,
        "choose_index": {"kind": chosen.kind, "factory": chosen.factory, "reason": chosen.reason},
        "exact_qps": exact_qps(parts, queries, args.k),
        "exact_streamed_s": gt_s,
        "candidates": [],
    }
    log.info("%s: N=%d d=%d, choose_index -> %s", name, n, d, chosen.factory)
    for kind in args.kinds:
        pq_m = (args.pq_m or max(1, d // 8)) if kind in ("ivf_pq", "ivf_pq_refine") else None
        plan = make_plan(kind, n, d, pq_m=pq_m, memory_budget_bytes=budget)
        out = work / "indexes" / f"{name}-{kind}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        record = build_index(parts, out, plan, args.shards)
        build_s = time.perf_counter() - t0
        index = ShardedIndex.load(out)
        try:
            report = tune_and_check(
                index,
                parts,
                queries,
                args.k,
                args.recall_target,
                query_ids=query_ids,
                ground_truth=ground_truth,
            )
        except UserError as exc:
            report = exc.report  # type: ignore[attr-defined]
        row = {
            "kind": kind,
            "factory": plan.factory,
            "picked_by_choose_index": plan.factory == chosen.factory,
            "build_s": round(build_s, 3),
            "train_s": round(record["timings"].get("train_s", 0.0), 3),
            "bytes": record["bytes"],
            "estimated_ram_bytes": plan.estimated_bytes,
            f"recall_at_{args.k}": round(report["recall"], 4),
            "reached_target": report["reached"],
            "params": report["chosen"],
            "qps": round(report["qps"], 1),
            "tried": [
                {"params": t["params"], "recall": round(t["recall"], 4), "qps": round(t["qps"], 1)}
                for t in report["tried"]
            ],
        }
        result["candidates"].append(row)
        log.info(
            "  %-40s build %7.1fs  %10.1f MB  recall@%d %.4f  %8.0f q/s  %s",
            plan.factory,
            build_s,
            record["bytes"] / 1e6,
            args.k,
            report["recall"],
            report["qps"],
            report["chosen"],
        )
        if not args.keep:
            del index
            shutil.rmtree(out, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*", default=[100_000], help="synthetic KB sizes")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--parts", type=Path, help="also benchmark real embeddings from this parts directory")
    ap.add_argument("--out", type=Path, default=Path("bench/results/index.json"))
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--recall-target", type=float, default=0.95)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--budget-gb", type=float, default=16.0, help="memory budget given to choose_index")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--kinds", nargs="*", default=list(CANDIDATES), choices=list(CANDIDATES) + ["ivf_pq"])
    ap.add_argument("--pq-m", type=int, default=0, help="PQ code bytes (default d/8: 64 for d=512)")
    ap.add_argument("--threads", type=int, default=0, help="faiss threads (default: all cores)")
    ap.add_argument("--workdir", type=Path, help="where parts and indexes go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the built indexes")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        faiss.omp_set_num_threads(args.threads)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_index-"))
    results = []
    try:
        for n in args.n:
            parts = write_synthetic_parts(work / f"synthetic-{n}", n, args.d, args.seed)
            results.append(bench_dataset(f"synthetic-{n}x{args.d}", parts, work, args))
            if not args.keep:
                shutil.rmtree(work / f"synthetic-{n}", ignore_errors=True)
        if args.parts:
            results.append(bench_dataset(f"real-{args.parts.name}", list_parts(args.parts), work, args))
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    doc = {
        "bench": "index",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpus": os.cpu_count(),
            "faiss_threads": faiss.omp_get_max_threads(),
            "faiss_version": faiss.__version__,
            "gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
            "python": platform.python_version(),
        },
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f"{args.out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, args.out)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
