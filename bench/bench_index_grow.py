"""Grow an index in place vs rebuild it (issue 19): append 10% new rows to an index of N rows.

For each index kind: build the index of the first N rows through `run_index` (untimed), then time
`run_index` over N + 10% rows twice: in place (the new parts after the indexed ones: one more shard,
recall re-checked on the last check's queries extended by the new rows plus fresh new rows) and from
scratch in an empty folder (build, exact ground truth for 1,000 queries, tuning). Both are the whole
index stage, recall check included. Reports the seconds, the speed-up, recall@k of each against the
target, and for Flat whether the grown index returns the same neighbours (ids and scores) as the
rebuilt one on 2,000 queries (half of them new rows): the same ids, scores to float rounding.

    python bench/bench_index_grow.py --n 200000 --d 512 --kinds auto flat --out bench/results/index_grow.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retformer.artifacts.atomic import write_json_atomic  # noqa: E402
from retformer.kb_builder.index import run_index  # noqa: E402
from retformer.kb_builder.index.search import ShardedIndex  # noqa: E402
from retformer.kb_builder.kb_schema import IndexSection  # noqa: E402
from tests.helpers import synthetic_clustered_vectors, write_parts  # noqa: E402

PART_ROWS = 10_000


def bench_kind(kind: str, parts: list[Path], n_old_parts: int, x: np.ndarray, tmp: Path, k: int) -> dict:
    cfg = IndexSection(kind=kind, k=k, recall_target=0.95, memory_budget_gb=8, num_queries=1000)
    grown_dir, rebuilt_dir = tmp / f"{kind}-grown", tmp / f"{kind}-rebuilt"
    t0 = time.perf_counter()
    base = run_index(parts[0].parent, grown_dir, cfg, parts=parts[:n_old_parts])
    base_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    grown = run_index(parts[0].parent, grown_dir, cfg, parts=parts)
    grow_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rebuilt = run_index(parts[0].parent, rebuilt_dir, cfg, parts=parts)
    rebuild_s = time.perf_counter() - t0
    out = {
        "kind": kind,
        "factory": grown["factory"],
        "n_old": base["n"],
        "n_new": grown["n"],
        "initial_build_s": round(base_s, 2),
        "grow_s": round(grow_s, 2),
        "rebuild_s": round(rebuild_s, 2),
        "speedup": round(rebuild_s / grow_s, 1),
        "grown": grown.get("grown"),
        "rebuilt_instead": grown.get("rebuilt"),
        "grown_recall": grown["recall"],
        "grown_params": grown["params"],
        "rebuilt_recall": rebuilt["recall"],
        "rebuilt_params": rebuilt["params"],
        "recall_target": 0.95,
    }
    if grown["factory"] == "IDMap,Flat":
        rng = np.random.default_rng(7)
        n_old = base["n"]
        ids = np.concatenate(
            [rng.choice(n_old, 1000, replace=False), n_old + rng.choice(len(x) - n_old, 1000, replace=False)]
        )
        q = x[ids].astype(np.float32)
        s1, i1 = ShardedIndex.load(grown_dir).search(q, k, exclude_ids=ids)
        s2, i2 = ShardedIndex.load(rebuilt_dir).search(q, k, exclude_ids=ids)
        # ids: the same; scores: the same up to float rounding (BLAS blocks a larger matrix differently)
        out["flat_same_neighbor_ids"] = bool(np.array_equal(i1, i2))
        out["flat_max_score_diff"] = float(np.abs(s1 - s2).max())
        out["flat_queries_compared"] = len(ids)
    shutil.rmtree(grown_dir)
    shutil.rmtree(rebuilt_dir)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="rows of the existing index")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--grow", type=float, default=0.10, help="new rows as a fraction of --n")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--kinds", nargs="+", default=["auto", "flat"])
    ap.add_argument("--out", type=Path, default=Path("bench/results/index_grow.json"))
    args = ap.parse_args()
    import faiss

    added = int(args.n * args.grow)
    total = args.n + added
    x = synthetic_clustered_vectors(total, args.d, seed=0)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_grow_") as tmpdir:
        tmp = Path(tmpdir)
        sizes = [PART_ROWS] * (args.n // PART_ROWS) + ([args.n % PART_ROWS] if args.n % PART_ROWS else [])
        n_old_parts = len(sizes)
        sizes += [PART_ROWS] * (added // PART_ROWS) + ([added % PART_ROWS] if added % PART_ROWS else [])
        parts = write_parts(tmp / "emb", x, sizes)
        for kind in args.kinds:
            res = bench_kind(kind, parts, n_old_parts, x, tmp, args.k)
            results.append(res)
            print(json.dumps(res), flush=True)
    record = {
        "command": " ".join(sys.argv),
        "n": args.n,
        "added": added,
        "d": args.d,
        "k": args.k,
        "data": f"synthetic_clustered_vectors({total}, {args.d}, seed=0), parts of {PART_ROWS} rows",
        "machine": {
            "platform": platform.platform(),
            "cpus": len(__import__("os").sched_getaffinity(0)),
            "faiss": faiss.__version__,
            "faiss_threads": faiss.omp_get_max_threads(),
            "python": platform.python_version(),
        },
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": results,
    }
    write_json_atomic(args.out, record)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
