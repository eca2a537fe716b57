"""Benchmark the KB index candidates: build time, size, tuned recall@k and queries/s vs exact search.

    python bench/bench_index.py --n 100000 1000000 --d 512 --out bench/results/index.json \
        [--parts work/kb/<kb>/embeddings] \
        [--neighbors-record work/datasets/<ds>/neighbors/<kb>/k32/_neighbors.json]

For every dataset (real embeddings from --parts, and clustered synthetic data of each --n) and every
candidate index: build through the real pipeline (Parquet parts -> build_index -> ShardedIndex), in a
child process killed after --max-build-s (recorded as skipped), tune on held-out KB rows
(self-excluded) to the cheapest setting at or above --recall-target (or the best reached), then time
that setting and faiss's exact search (IndexFlatIP, in RAM) alternately --time-reps times. The
machine is shared, so absolute queries/s drift with other jobs; the speed-up is the median of the
per-repetition ratios of two searches run back to back, which is robust to that drift.

Recorded per dataset and index: build_s, qps, recall_at_<k>, exact_qps, speedup, bytes (on disk)
and the estimated RAM, the tuned params, which index choose_index picks (with its reason), and
whether the pick meets the goal (recall >= --goal-recall at >= --goal-speedup x exact queries/s;
the goal applies from --goal-min-n vectors on). --neighbors-record adds the neighbor-storage
figures of a neighbor stage run and an estimate for ImageNet-LT scale. With faiss-gpu, builds train
and add on the GPU (kb_builder/index/build.py does so whenever faiss sees one: `built_on_gpu`), and
--gpu adds, per index, its search on GPU 0 at the tuned setting against exact search on that GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from faiss.contrib.evaluation import knn_intersection_measure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retformer.artifacts.atomic import write_json_atomic  # noqa: E402
from retformer.artifacts.embeddings_io import list_parts, read_image_vectors  # noqa: E402
from retformer.artifacts.errors import UserError  # noqa: E402
from retformer.artifacts.names import INDEX_JSON  # noqa: E402
from retformer.kb_builder.index.build import build_index  # noqa: E402
from retformer.kb_builder.index.rows import part_table  # noqa: E402
from retformer.kb_builder.index.search import ShardedIndex, exact_ground_truth, sample_queries, tune_and_check  # noqa: E402
from retformer.kb_builder.index.select import IndexPlan, choose_index, make_plan  # noqa: E402
from tests.helpers import synthetic_clustered_vectors, write_parts  # noqa: E402

log = logging.getLogger("bench_index")

CANDIDATES = ("flat", "hnsw", "ivf_flat", "ivf_sq8", "ivf_pq_refine")
ROWS_PER_PART = 100_000
PREDICTED_SKIP_FACTOR = 2.0  # skip a build without trying when predicted > this x --max-build-s
SYNTHETIC_SPREAD = 0.8  # synthetic_clustered_vectors' default: same-cluster cosine ~ 1/(1+0.8^2)
SYNTHETIC_DESCRIPTION = (
    "clustered synthetic (tests.helpers.synthetic_clustered_vectors): L2-normalised fp16, "
    "~sqrt(N) random unit centres with Zipf-like cluster sizes (weight 1/sqrt(rank)), Gaussian noise of "
    f"norm {SYNTHETIC_SPREAD} (same-cluster cosine ~0.61)"
)

# The paper's neighbor storage per downstream image, and the goal: at most 5% of it.
PAPER_BYTES_PER_IMAGE = 259_000
STORAGE_GOAL_FRACTION = 0.05
# ImageNet-LT estimate: its training set, k=32, CLIP ViT-B 512-d image + 512-d text per store row.
IMAGENET_LT_QUERIES = 115_800
IMAGENET_LT_DIM = 512
# Per store row besides the vectors: kb_id 8 B, uid ~16 B, label 4 B, caption ~50 B (web alt-text).
STORE_ROW_OTHER_BYTES = 80
# Per query in the table: uid ~16 B + k ids (int64) + k scores (float32), uncompressed.
TABLE_QUERY_BASE_BYTES = 16
TABLE_BYTES_PER_NEIGHBOR = 8 + 4


# --- data -----------------------------------------------------------------------------------------


def write_synthetic_parts(directory: Path, n: int, d: int, seed: int) -> list[Path]:
    """Clustered synthetic vectors as embeddings parts of ROWS_PER_PART rows."""
    vectors = synthetic_clustered_vectors(n, d, spread=SYNTHETIC_SPREAD, seed=seed)
    sizes = [min(ROWS_PER_PART, n - start) for start in range(0, n, ROWS_PER_PART)]
    return write_parts(directory, vectors, sizes, uid_format="syn{:09d}", text_dim=1)


# --- exact search and paired timing ----------------------------------------------------------------


def load_exact(parts: list[Path]) -> faiss.IndexFlatIP:
    """faiss's exact inner-product index over the KB held in RAM (fp32): the speed baseline."""
    _, first = read_image_vectors(parts[0])
    index = faiss.IndexFlatIP(first.shape[1])
    for p in parts:
        _, vectors = read_image_vectors(p)
        if len(vectors):
            index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def _qps(search: Any, nq: int) -> float:
    t0 = time.perf_counter()
    search()
    return nq / max(time.perf_counter() - t0, 1e-9)


def paired_timing(
    index: ShardedIndex | None,
    exact: faiss.Index,
    queries: np.ndarray,
    query_ids: np.ndarray,
    k: int,
    reps: int,
) -> dict[str, Any]:
    """Time the index (at its current params) and exact search back to back, `reps` times.

    Both answer the same queries for k results plus the self-match (k+1); the ratio of each pair is
    measured under the same machine load, so its median is robust to other jobs on the machine.
    """
    nq = len(queries)
    exact_qps, index_qps = [], []
    for _ in range(reps):
        exact_qps.append(_qps(lambda: exact.search(queries, k + 1), nq))
        if index is not None:
            index_qps.append(_qps(lambda: index.search(queries, k, exclude_ids=query_ids), nq))
    out: dict[str, Any] = {"exact_qps_reps": [round(q, 1) for q in exact_qps]}
    out["exact_qps"] = statistics.median(exact_qps)
    if index is not None:
        out["qps_reps"] = [round(q, 1) for q in index_qps]
        out["qps"] = statistics.median(index_qps)
        out["speedup"] = statistics.median(i / e for i, e in zip(index_qps, exact_qps, strict=True))
    return out


# --- building in a child process (hard time limit) -----------------------------------------------


def _build_child(parts: list[str], out: str, plan: dict[str, Any], shards: int, threads: int) -> None:
    """Child process: build the index into `out` (its record lands in out/index.json)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s [build] %(message)s")
    if threads:
        faiss.omp_set_num_threads(threads)
    build_index([Path(p) for p in parts], Path(out), IndexPlan.from_dict(plan), shards)


def build_with_limit(
    parts: list[Path], out: Path, plan: IndexPlan, shards: int, threads: int, limit_s: float
) -> dict[str, Any] | None:
    """build_index in a spawned process; None when it ran past limit_s (then it is killed).

    Spawned, not forked: a fork of a process whose OpenMP threads have run can deadlock (libgomp).
    """
    ctx = mp.get_context("spawn")
    proc = ctx.Process(
        target=_build_child, args=([str(p) for p in parts], str(out), plan.to_dict(), shards, threads)
    )
    proc.start()
    proc.join(limit_s)
    if proc.is_alive():
        proc.terminate()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        return None
    if proc.exitcode != 0:
        raise RuntimeError(f"building {plan.factory} failed (exit code {proc.exitcode}); see the log above")
    return json.loads((out / INDEX_JSON).read_text())


def predict_build_s(
    kind: str, n: int, d: int, history: dict[tuple[str, int], tuple[int, float]]
) -> float | None:
    """Build time extrapolated from the largest earlier build of this kind and d (None: no data).

    HNSW inserts cost ~log N each (N log N); IVF training (64 points per centroid, K ~ sqrt N, so
    ~N work) and adding are linear; Flat is linear. PQ training (a capped sample) does not grow
    with N, so this over-predicts IVF-PQ.
    """
    prev = history.get((kind, d))
    if prev is None:
        return None
    n0, s0 = prev
    scale = n / n0
    if kind == "hnsw":
        scale *= math.log(n) / math.log(max(n0, 2))
    return s0 * scale


# --- the same index on a GPU (--gpu) --------------------------------------------------------------


def gpu_search(
    out: Path,
    params: dict[str, Any],
    exact: faiss.Index,
    queries: np.ndarray,
    query_ids: np.ndarray,
    ground_truth: tuple[np.ndarray, np.ndarray],
    k: int,
    reps: int,
) -> dict[str, Any]:
    """The built index cloned to GPU 0 and searched at its tuned params, timed against exact search
    on the same GPU (GpuIndexFlatIP), paired as on the CPU; recall@k against the exact ground truth.

    Skipped (with the reason) for index types faiss cannot clone to a GPU (HNSW, IDMap+Refine).
    """
    index = ShardedIndex.load(out, mmap=False)
    res = faiss.StandardGpuResources()
    try:
        shards = [faiss.index_cpu_to_gpu(res, 0, s) for s in index.shards]
    except RuntimeError as exc:
        return {"status": "skipped", "reason": f"no GPU version: {str(exc).splitlines()[0]}"}
    space = faiss.GpuParameterSpace()
    for shard in shards:
        for name, value in params.items():
            space.set_index_parameter(shard, name, float(value))
    on_gpu = ShardedIndex(shards, index.meta)
    exact_gpu = faiss.index_cpu_to_gpu(res, 0, exact)
    exact_gpu.search(queries[:100], k + 1)  # warm-up (kernels, temporary memory)
    on_gpu.search(queries[:100], k, exclude_ids=query_ids[:100])
    timing = paired_timing(on_gpu, exact_gpu, queries, query_ids, k, reps)
    _, ids = on_gpu.search(queries, k, exclude_ids=query_ids)
    return {
        "status": "ok",
        "params": params,
        f"recall_at_{k}": round(float(knn_intersection_measure(ids, ground_truth[1])), 4),
        "qps": round(timing["qps"], 1),
        "exact_qps": round(timing["exact_qps"], 1),
        "speedup": round(timing["speedup"], 2),
        "qps_reps": timing["qps_reps"],
        "exact_qps_reps": timing["exact_qps_reps"],
    }


# --- one dataset -----------------------------------------------------------------------------------


def bench_dataset(
    name: str,
    description: str,
    parts: list[Path],
    work: Path,
    args: argparse.Namespace,
    history: dict[tuple[str, int], tuple[int, float]],
) -> dict[str, Any]:
    """All candidates on one dataset."""
    table = part_table(parts)
    n = table[-1]["offset"] + table[-1]["rows"]
    _, first = read_image_vectors(parts[0])
    d = first.shape[1]
    k = args.k
    budget = int(args.budget_gb * 1e9)
    chosen = choose_index(n, d, budget, args.recall_target, k)
    query_ids, queries = sample_queries(parts, args.queries, seed=12345)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    t0 = time.perf_counter()
    ground_truth = exact_ground_truth(parts, queries, k, query_ids)
    gt_s = time.perf_counter() - t0
    exact = load_exact(parts)
    exact.search(queries[:100], k + 1)  # warm-up
    base = paired_timing(None, exact, queries, query_ids, k, args.time_reps)
    result: dict[str, Any] = {
        "dataset": name,
        "data": description,
        "n": n,
        "d": d,
        "k": k,
        "recall_target": args.recall_target,
        "num_queries": len(queries),
        "queries": "held-out sample of KB rows (seed 12345); each query's own row excluded from results",
        "budget_bytes": budget,
        "choose_index": {
            "kind": chosen.kind,
            "factory": chosen.factory,
            "reason": chosen.reason,
            "considered": chosen.considered,
        },
        "exact_qps": round(base["exact_qps"], 1),
        "exact_qps_reps": base["exact_qps_reps"],
        "exact_streamed_s": round(gt_s, 3),
        "candidates": [],
    }
    log.info(
        "%s: N=%d d=%d, exact %.0f q/s, choose_index -> %s", name, n, d, base["exact_qps"], chosen.factory
    )
    for kind in args.kinds:
        pq_m = (args.pq_m or max(1, d // 8)) if kind in ("ivf_pq", "ivf_pq_refine") else None
        plan = make_plan(kind, n, d, pq_m=pq_m, memory_budget_bytes=budget)
        row: dict[str, Any] = {
            "kind": kind,
            "factory": plan.factory,
            "picked_by_choose_index": plan.factory == chosen.factory,
            "estimated_ram_bytes": plan.estimated_bytes,
            "estimated_disk_bytes": plan.estimated_disk_bytes,
        }
        result["candidates"].append(row)
        predicted = predict_build_s(kind, n, d, history)
        # Skip only clearly hopeless builds: the extrapolation is rough (it over-predicted the IVF-PQ
        # build at 1M threefold: PQ training does not grow with N), and the hard limit still applies.
        if predicted is not None and predicted > PREDICTED_SKIP_FACTOR * args.max_build_s:
            row["status"] = "skipped"
            row["skip_reason"] = (
                f"predicted build time {predicted:.0f} s (extrapolated from N={history[(kind, d)][0]:,}) "
                f"exceeds {PREDICTED_SKIP_FACTOR:g} x --max-build-s {args.max_build_s:.0f} s"
            )
            log.info("  %-40s skipped: %s", plan.factory, row["skip_reason"])
            continue
        out = work / "indexes" / f"{name}-{kind}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        record = build_with_limit(parts, out, plan, args.shards, args.threads, args.max_build_s)
        wall_s = time.perf_counter() - t0
        if record is None:
            row["status"] = "skipped"
            row["skip_reason"] = f"build ran past --max-build-s {args.max_build_s:.0f} s and was stopped"
            log.info("  %-40s skipped: %s", plan.factory, row["skip_reason"])
            shutil.rmtree(out, ignore_errors=True)
            continue
        build_s = float(record["timings"]["total_s"])
        history[(kind, d)] = (n, build_s)
        index = ShardedIndex.load(out)
        try:
            report = tune_and_check(
                index, parts, queries, k, args.recall_target, query_ids=query_ids, ground_truth=ground_truth
            )
        except UserError as exc:
            report = exc.report  # type: ignore[attr-defined]
        timing = paired_timing(index, exact, queries, query_ids, k, args.time_reps)
        recall = float(report["recall"])
        row.update(
            {
                "status": "ok",
                "build_s": round(build_s, 3),
                "build_wall_s": round(wall_s, 3),
                "train_s": round(record["timings"].get("train_s", 0.0), 3),
                "add_s": round(record["timings"].get("add_s", 0.0), 3),
                "bytes": int(record["bytes"]),
                f"recall_at_{k}": round(recall, 4),
                "reached_target": bool(report["reached"]),
                "params": report["chosen"],
                "qps": round(timing["qps"], 1),
                "exact_qps": round(timing["exact_qps"], 1),
                "speedup": round(timing["speedup"], 2),
                "qps_reps": timing["qps_reps"],
                "exact_qps_reps": timing["exact_qps_reps"],
                "tuning_qps": round(report["qps"], 1),
                "meets_goal": recall >= args.goal_recall and timing["speedup"] >= args.goal_speedup,
                "load_modes": report["memory"]["load_modes"],
                "tried": [
                    {"params": t["params"], "recall": round(t["recall"], 4), "qps": round(t["qps"], 1)}
                    for t in report["tried"]
                ],
            }
        )
        row["built_on_gpu"] = any(sh.get("gpu") for sh in record.get("shards", []))
        if args.gpu:
            row["gpu"] = gpu_search(
                out, report["chosen"], exact, queries, query_ids, ground_truth, k, args.time_reps
            )
            log.info("  %-40s on the GPU: %s", plan.factory, row["gpu"])
        log.info(
            "  %-40s build %7.1fs  %9.1f MB  recall@%d %.4f  %8.0f q/s (exact %5.0f, x%.1f)  %s",
            plan.factory,
            build_s,
            record["bytes"] / 1e6,
            k,
            recall,
            timing["qps"],
            timing["exact_qps"],
            timing["speedup"],
            report["chosen"],
        )
        del index
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    del exact

    pick = next((c for c in result["candidates"] if c["picked_by_choose_index"]), None)
    goal: dict[str, Any] = {
        "recall": args.goal_recall,
        "speedup": args.goal_speedup,
        "applies": n >= args.goal_min_n,
        "pick": chosen.factory,
    }
    if pick is None or pick.get("status") != "ok":
        goal["met"] = None
        goal["note"] = "the picked index was not benchmarked (not in --kinds, or skipped)"
    else:
        goal.update(
            {
                f"recall_at_{k}": pick[f"recall_at_{k}"],
                "qps": pick["qps"],
                "exact_qps": pick["exact_qps"],
                "measured_speedup": pick["speedup"],
                "params": pick["params"],
                "met": pick["meets_goal"],
            }
        )
    result["goal"] = goal
    return result


# --- neighbor storage ----------------------------------------------------------------------------


def neighbor_storage(record_path: Path, k_default: int = 32) -> dict[str, Any]:
    """Bytes per downstream image of a neighbor stage run vs the goal, and an ImageNet-LT estimate.

    ImageNet-LT: 115.8K queries x k=32 = 3.7M neighbor slots; a store row holds a 512-d image and
    a 512-d text vector (CLIP) plus ~80 B of uid/caption/label/kb_id; the table ~400 B per query.
    Worst case: every slot a distinct KB row. Best case: neighbors shared as much as in the demo
    run (its reuse factor = slots / store rows). Break-even: the reuse at which the goal is just met.
    """
    rec = json.loads(record_path.read_text())
    k = int(rec.get("k", k_default))
    goal = STORAGE_GOAL_FRACTION * PAPER_BYTES_PER_IMAGE
    queries = sum(int(s["queries"]) for s in rec["splits"].values())
    demo_reuse = queries * k / max(int(rec["store_rows"]), 1)
    demo = {
        "record": str(record_path),
        "queries": queries,
        "k": k,
        "kb_rows": rec.get("kb_rows"),
        "store_rows": rec["store_rows"],
        "table_bytes": rec["table_bytes"],
        "store_bytes": rec["store_bytes"],
        "bytes_per_query_image": rec["bytes_per_query_image"],
        "store_bytes_per_row": round(rec["store_bytes"] / max(rec["store_rows"], 1), 1),
        "neighbor_reuse": round(demo_reuse, 2),
        "goal_bytes": goal,
        "fraction_of_paper": round(rec["bytes_per_query_image"] / PAPER_BYTES_PER_IMAGE, 4),
        "meets_goal": rec["bytes_per_query_image"] <= goal,
    }
    slots = IMAGENET_LT_QUERIES * k
    table_per_query = TABLE_QUERY_BASE_BYTES + TABLE_BYTES_PER_NEIGHBOR * k
    est: dict[str, Any] = {
        "queries": IMAGENET_LT_QUERIES,
        "k": k,
        "neighbor_slots": slots,
        "table_bytes_per_query": table_per_query,
        "assumptions": (
            f"store row = image {IMAGENET_LT_DIM}-d + text {IMAGENET_LT_DIM}-d vectors + "
            f"{STORE_ROW_OTHER_BYTES} B uid/caption/label/kb_id; table = {table_per_query} B/query "
            "(uid, int64 ids, float32 scores); sizes uncompressed (fp16 CLIP vectors barely compress)"
        ),
        "variants": {},
    }
    for name, vec_bytes in (("fp16", 2), ("int8", 1)):
        row_bytes = 2 * IMAGENET_LT_DIM * vec_bytes + STORE_ROW_OTHER_BYTES
        rows_allowed = (goal - table_per_query) / row_bytes  # distinct store rows per query at the goal

        def per_query(reuse: float, row_bytes: int = row_bytes) -> float:
            return table_per_query + k * row_bytes / reuse

        est["variants"][name] = {
            "store_row_bytes": row_bytes,
            "worst_bytes_per_query": round(per_query(1.0)),
            "worst_total_gb": round(per_query(1.0) * IMAGENET_LT_QUERIES / 1e9, 2),
            "best_reuse": round(demo_reuse, 2),
            "best_bytes_per_query": round(per_query(demo_reuse)),
            "break_even_reuse": round(k / rows_allowed, 2),
            "break_even_distinct_rows": int(IMAGENET_LT_QUERIES * rows_allowed),
        }
    return {
        "goal_bytes": goal,
        "paper_bytes_per_image": PAPER_BYTES_PER_IMAGE,
        "demo": demo,
        "imagenet_lt": est,
    }


# --- main ------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """Cores, CPU, RAM, load, niceness and library versions of this run."""
    cpu_model = ""
    mem_gb = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1e6, 1)
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "mem_total_gb": mem_gb,
        "loadavg_start": list(os.getloadavg()),
        "nice": os.nice(0),
        "faiss_threads": faiss.omp_get_max_threads(),
        "faiss_version": faiss.__version__,
        "numpy_version": np.__version__,
        "gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "shared": "other jobs ran on the machine meanwhile: compare speed-ups (paired), not absolute q/s",
    }


def write_doc(path: Path, doc: dict[str, Any]) -> None:
    """Atomic JSON write (after every dataset, so a later failure keeps the earlier results)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, doc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*", default=[100_000], help="synthetic KB sizes")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--parts", type=Path, help="also benchmark real embeddings from this parts directory")
    ap.add_argument(
        "--neighbors-record", type=Path, help="a neighbor stage's _neighbors.json: storage figures"
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results/index.json"))
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--recall-target", type=float, default=0.95)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--budget-gb", type=float, default=16.0, help="memory budget given to choose_index")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--kinds", nargs="*", default=list(CANDIDATES), choices=list(CANDIDATES) + ["ivf_pq"])
    ap.add_argument("--pq-m", type=int, default=0, help="PQ code bytes (default d/8: 64 for d=512)")
    ap.add_argument("--threads", type=int, default=0, help="faiss threads (default: all cores)")
    ap.add_argument("--time-reps", type=int, default=3, help="paired index/exact timings (median)")
    ap.add_argument(
        "--max-build-s",
        type=float,
        default=600.0,
        help="stop builds running longer (recorded as skipped); not tried if predicted past twice this",
    )
    ap.add_argument("--goal-recall", type=float, default=0.95)
    ap.add_argument("--goal-speedup", type=float, default=20.0)
    ap.add_argument("--goal-min-n", type=int, default=1_000_000, help="the goal applies from this N on")
    ap.add_argument("--workdir", type=Path, help="where parts and indexes go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the built indexes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--gpu",
        action="store_true",
        help="also search each built index on GPU 0 against exact search on the GPU (needs faiss-gpu)",
    )
    args = ap.parse_args(argv)
    if args.gpu and (not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0):
        ap.error("--gpu: faiss sees no GPU (faiss-cpu is installed, or no CUDA device is visible)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        faiss.omp_set_num_threads(args.threads)

    doc: dict[str, Any] = {
        "bench": "index",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": [],
    }
    if args.neighbors_record:
        doc["neighbor_storage"] = neighbor_storage(args.neighbors_record, args.k)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_index-"))
    history: dict[tuple[str, int], tuple[int, float]] = {}
    t_start = time.perf_counter()
    try:
        if args.parts:
            parts = list_parts(args.parts)
            if not parts:
                raise UserError(f"no embeddings parts in {args.parts}")
            label = args.parts.parent.name if args.parts.name == "embeddings" else args.parts.name
            n_real = sum(t["rows"] for t in part_table(parts))
            desc = f"real embeddings from {args.parts} ({n_real:,} rows)"
            doc["results"].append(bench_dataset(f"real-{label}", desc, parts, work, args, {}))
            write_doc(args.out, doc)
        for n in args.n:
            parts = write_synthetic_parts(work / f"synthetic-{n}", n, args.d, args.seed)
            doc["results"].append(
                bench_dataset(f"synthetic-{n}x{args.d}", SYNTHETIC_DESCRIPTION, parts, work, args, history)
            )
            if not args.keep:
                shutil.rmtree(work / f"synthetic-{n}", ignore_errors=True)
            write_doc(args.out, doc)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    doc["machine"]["loadavg_end"] = list(os.getloadavg())
    doc["total_s"] = round(time.perf_counter() - t_start, 1)
    write_doc(args.out, doc)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
