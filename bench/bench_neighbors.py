"""The neighbors stage against its bare kernel: `run_neighbors` vs one faiss search of the same queries.

    python bench/bench_neighbors.py --kb-rows 50000 --part-rows 5000 --queries 70000 --dim 256 \
        --out bench/results/neighbors.json      (make bench-neighbors)

Writes a synthetic KB (`--kb-rows` clustered unit vectors in parts of `--part-rows`, as the embed stage
writes them) whose first `--in-kb` rows are also queries (a downstream training split inside its KB),
builds an exact (flat) index with the index stage, then times in this process:

  bare_search: `index.search` of every query in one call (the kernel; no I/O, no id excluded);
  bare_search_in_stage_batches: the same in the stage's SEARCH_BATCH-query calls (the batch size's cost);
  self_match_once: the query-is-a-KB-row lookup as the stage runs it now (one pass over the KB's uid
      column, `self_matches` tasks over part groups);
  self_match_per_slice: the same lookup repeated per search slice (how the stage ran before: each
      slice of TASK_ROWS queries read every KB part's uids);
  run_neighbors: the whole stage (lookup, search, tables, store, atomic write), in process.

Reports each as seconds and as a ratio to bare_search. Queries span several slices when
--queries > TASK_ROWS (65,536).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retformer.artifacts.atomic import write_json_atomic  # noqa: E402
from retformer.kb_builder import map_inline  # noqa: E402
from retformer.kb_builder import neighbors as nb  # noqa: E402
from retformer.kb_builder.index import load_kb_index, run_index  # noqa: E402
from tests.helpers import synthetic_clustered_vectors, write_parts  # noqa: E402


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kb-rows", type=int, default=50_000)
    ap.add_argument("--part-rows", type=int, default=5_000)
    ap.add_argument("--queries", type=int, default=70_000)
    ap.add_argument("--in-kb", type=int, default=5_000, help="queries that are KB rows")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("bench/results/neighbors.json"))
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_neighbors_"))
    try:
        kb = synthetic_clustered_vectors(args.kb_rows, args.dim, seed=1)
        sizes = [args.part_rows] * (args.kb_rows // args.part_rows)
        if args.kb_rows % args.part_rows:
            sizes.append(args.kb_rows % args.part_rows)
        kb_parts = write_parts(root / "kb", kb, sizes, uid_format="r{:09d}")
        queries = synthetic_clustered_vectors(args.queries, args.dim, seed=2)
        queries[: args.in_kb] = kb[: args.in_kb]
        # Two query parts: the first --in-kb queries carry the KB rows' own uids, the rest `q...` uids.
        qdir = root / "q"
        qdir.mkdir()
        for j, (lo, hi, fmt) in enumerate(
            [(0, args.in_kb, "r{:09d}"), (args.in_kb, args.queries, "q{:09d}")]
        ):
            (part,) = write_parts(root / f"q{j}", queries[lo:hi], [hi - lo], uid_format=fmt)
            part.rename(qdir / f"part-{j:05d}.parquet")
        _, index_seconds = _timed(run_index, root / "kb", root / "index", {"kind": "flat", "k": args.k})
        index = load_kb_index(root / "index")
        q32 = queries.astype(np.float32)
        no_self = np.full(len(q32), -1, dtype=np.int64)
        _, bare = _timed(index.search, q32, args.k, exclude_ids=no_self)
        start = time.perf_counter()
        for lo in range(0, len(q32), nb.SEARCH_BATCH):  # the stage's batches, nothing else
            index.search(
                q32[lo : lo + nb.SEARCH_BATCH], args.k, exclude_ids=no_self[lo : lo + nb.SEARCH_BATCH]
            )
        bare_batched = time.perf_counter() - start

        offsets = nb.part_offsets(kb_parts)
        uids = nb._query_uids(qdir)
        once_ids, once = _timed(nb._self_ids, kb_parts, offsets, uids, map_inline)
        slices = range(0, len(uids), nb.TASK_ROWS)
        start = time.perf_counter()
        per_slice_ids = np.concatenate(
            [nb.self_kb_ids(kb_parts, offsets, uids[lo : lo + nb.TASK_ROWS]) for lo in slices]
        )
        per_slice = time.perf_counter() - start
        assert np.array_equal(once_ids, per_slice_ids)
        record, stage = _timed(
            nb.run_neighbors, root / "index", root / "kb", {"train": qdir}, root / "out", args.k
        )

        doc = {
            "command": "python bench/bench_neighbors.py " + " ".join(sys.argv[1:]),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "kb_rows": args.kb_rows,
            "kb_parts": len(kb_parts),
            "queries": args.queries,
            "search_slices": len(slices),
            "queries_in_kb": int((once_ids >= 0).sum()),
            "dim": args.dim,
            "k": args.k,
            "index_build_seconds": round(index_seconds, 2),
            "seconds": {
                "bare_search": round(bare, 3),
                "bare_search_in_stage_batches": round(bare_batched, 3),
                "self_match_once": round(once, 3),
                "self_match_per_slice": round(per_slice, 3),
                "run_neighbors": round(stage, 3),
            },
            "ratio_to_bare_search": {
                "bare_search_in_stage_batches": round(bare_batched / bare, 3),
                "self_match_once": round(once / bare, 3),
                "self_match_per_slice": round(per_slice / bare, 3),
                "run_neighbors": round(stage / bare, 3),
            },
            "stage_excluded": record["splits"]["train"]["queries_in_kb_excluded"],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, doc)
        print(json.dumps(doc, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
