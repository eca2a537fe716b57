"""Sharded, resumable build of the KB's faiss index from the embeddings Parquet parts.

Layout of `out_dir`:

    trained.faissindex   the empty, trained index (IVF kinds only), shared by every shard
    shard-00000.faissindex + shard-00000.json   one index per contiguous kb_id range
    index.json           the record: factory, plan and reason, shards, part offsets, timings

kb_id = row offset of the part (parts in the given order) + row in the part. Shard s holds the
ids [id_lo, id_hi) and stores them in the index itself (IndexIDMap, or IVF add_with_ids), so a
search returns kb_ids directly and shards merge without any mapping.

Why the IVF training is shared: every shard gets the same coarse centroids (and PQ/SQ codebooks),
so shard scores are comparable, the shards could later be merged into one IVF
(faiss.contrib.ondisk), and k-means runs once instead of S times. HNSW and Flat need no training.

Every file is written under a temporary name and renamed (os.replace). A rerun reuses what is
already complete and matches the same inputs and plan (a hash of them is stored next to each file).
index.json is what makes the folder an index: a build that does not reuse it deletes it before
touching any shard, and the index stage writes it once, after the recall check (`write_record=False`
here, then `search.record_tuning`), so a kill at any point leaves no index.json beside new shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retformer.artifacts.atomic import atomic_path, remove_dead_temps, write_json_atomic
from retformer.artifacts.errors import UserError
from retformer.artifacts.names import INDEX_JSON
from retformer.kb_builder import MapTasks, map_inline
from retformer.kb_builder.index.rows import (
    ADD_BATCH_ROWS,
    iter_range,
    part_dim,
    part_table,
    sample_rows,
    shard_ranges,
)
from retformer.kb_builder.index.select import IndexPlan

log = logging.getLogger(__name__)

TRAINED_FILE = "trained.faissindex"
SHARD_PATTERN = "shard-{:05d}"
SHARD_SUFFIX = ".faissindex"
FORMAT_VERSION = 1
NORM_TOLERANCE = 1e-2  # fp16 storage: |norm - 1| below this counts as L2-normalised


# --- faiss helpers ------------------------------------------------------------------------------


def _metric(plan: IndexPlan) -> int:
    if plan.metric != "inner_product":
        raise ValueError(
            f"unsupported metric {plan.metric!r}: KB vectors are L2-normalised, use inner_product"
        )
    return faiss.METRIC_INNER_PRODUCT


def num_gpus() -> int:
    """GPUs faiss can use (0 with faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


def new_index(plan: IndexPlan) -> faiss.Index:
    """An empty index for the plan, with its build-time parameters applied."""
    index = faiss.index_factory(plan.d, plan.factory, _metric(plan))
    ef = plan.build_params.get("efConstruction")
    if ef is not None:
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
        if hasattr(inner, "hnsw"):
            inner.hnsw.efConstruction = int(ef)
    if "IVF" in plan.factory:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        if isinstance(ivf, faiss.IndexIVFPQ):
            # The factory enables polysemous training, which costs ~20x the PQ training itself and
            # serves only Hamming-filtered search (polysemous_ht), which we never use.
            ivf.do_polysemous_training = False
    return index


def train_index(plan: IndexPlan, sample: np.ndarray) -> faiss.Index:
    """Train an empty index of the plan on `sample` (float32). On GPUs, k-means runs there."""
    index = new_index(plan)
    clustering = None  # kept referenced here: the C++ index does not own it
    if "IVF" in plan.factory:
        ivf = faiss.extract_index_ivf(index)
        if num_gpus() > 0:
            # faiss wiki (GPU k-means for a CPU IVF): give the IVF a GPU clustering index; the
            # trained centroids land in the CPU index as usual.
            clustering = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, _metric(plan)))
            log.info("training %s on %d GPU(s)", plan.factory, num_gpus())
        elif not isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexFlat):
            # An HNSW coarse quantizer would be rebuilt at every k-means iteration: cluster with
            # exact flat assignment, then the centroids are added to the HNSW once.
            clustering = faiss.IndexFlat(ivf.d, _metric(plan))
        if clustering is not None:
            ivf.clustering_index = clustering
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    if clustering is not None:
        faiss.extract_index_ivf(index).clustering_index = None  # never serialise the helper
    return index


# faiss-gpu's StandardGpuResources reserves scratch memory beside the index (up to 1.5 GiB).
GPU_SCRATCH_BYTES = 1536 * 2**20


def gpu_free_bytes() -> int | None:
    """Free memory of the GPU faiss adds on (GPU 0 of this process); None when unknown."""
    from retformer.artifacts.devices import free_gpu_memory

    return free_gpu_memory(0)


def gpu_bytes_for_add(index: faiss.Index, plan: IndexPlan, n_vectors: int) -> int:
    """What a shard of `n_vectors` costs on the GPU while adding: codes + ids of the vectors (x1.5 for
    the inverted lists' growth), the coarse centroids, faiss's scratch memory and one add batch."""
    ivf = faiss.extract_index_ivf(index)
    code = int(getattr(ivf, "code_size", 0) or plan.d * 4)
    centroids = int(ivf.nlist) * plan.d * 4
    return int(n_vectors * (code + 8) * 1.5) + centroids + GPU_SCRATCH_BYTES + ADD_BATCH_ROWS * plan.d * 4


def _to_gpu_for_add(index: faiss.Index, plan: IndexPlan, n_vectors: int = 0) -> tuple[faiss.Index, bool]:
    """Clone an IVF index to one GPU for adding, when its type allows it (IVF,Flat / SQ8 / PQ) and the
    shard fits in the GPU's free memory (else the add runs on the CPU, with a warning).

    One GPU per shard task: with dask-cuda each worker sees exactly one GPU, and replicas on
    several GPUs would each receive every vector.
    """
    if num_gpus() == 0 or plan.kind not in ("ivf_flat", "ivf_sq8", "ivf_pq"):
        return index, False
    need, free = gpu_bytes_for_add(index, plan, n_vectors), gpu_free_bytes()
    if free is not None and need > free:
        log.warning(
            "adding on CPU: the shard needs ~%.1f GiB on the GPU, %.1f GiB are free (more num_shards "
            "would make shards that fit)",
            need / 2**30,
            free / 2**30,
        )
        return index, False
    try:
        return faiss.index_cpu_to_all_gpus(index, ngpu=1), True
    except RuntimeError as exc:  # e.g. an HNSW coarse quantizer has no GPU version
        log.info("adding on CPU: %s cannot be cloned to GPU (%s)", plan.factory, str(exc).splitlines()[0])
        return index, False


def write_index_atomic(index: faiss.Index, path: Path) -> None:
    """faiss.write_index under a temporary name, then rename."""
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def write_index_record(index_dir: Path, record: dict[str, Any]) -> None:
    """The one writer of index.json (atomically): the build's record, later with its tuning."""
    write_json_atomic(Path(index_dir) / INDEX_JSON, record)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 8 MiB blocks (~1 s per GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            digest.update(block)
    return digest.hexdigest()


def shard_damage(out_dir: Path, shard: dict[str, Any], checksum: bool = True) -> str | None:
    """Why the faiss file a shard record describes cannot be used as it is (missing, another size
    than written, other bytes: overwritten or cut), or None. `checksum=False`: the size only (cheap,
    for readers; the index stage, which can rebuild it, checks the bytes too)."""
    path = Path(out_dir) / shard["file"]
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if "bytes" in shard and size != shard["bytes"]:
        return f"{path} is {size} bytes, {shard['bytes']} were written"
    if checksum and shard.get("sha256") and file_sha256(path) != shard["sha256"]:
        return f"{path} does not hold the bytes written (its SHA-256 differs)"
    return None


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- tasks (pure top-level functions: picklable for Dask) ----------------------------------------


def train_shared(
    parts: list[dict[str, Any]], plan: IndexPlan, out_path: str, build_key: str
) -> dict[str, Any]:
    """Sample plan.train_size rows (seeded), train, write the empty trained index atomically.
    (`build_key`, not `key`: Dask's submit reserves `key` for itself.)"""
    t0 = time.perf_counter()
    ids, sample = sample_rows(parts, plan.train_size, plan.seed)
    t_sample = time.perf_counter() - t0
    norms = np.linalg.norm(sample, axis=1)
    if len(norms) and np.abs(norms - 1).max() > NORM_TOLERANCE:
        log.warning(
            "KB vectors are not L2-normalised (norms %.3f..%.3f): inner product is not cosine",
            norms.min(),
            norms.max(),
        )
    t1 = time.perf_counter()
    index = train_index(plan, sample)
    t_train = time.perf_counter() - t1
    out = Path(out_path)
    write_index_atomic(index, out)
    record = {"key": build_key, "train_size": int(len(ids)), "sample_s": t_sample, "train_s": t_train}
    write_json_atomic(out.with_suffix(".json"), record)
    log.info("trained %s on %d vectors in %.1fs", plan.factory, len(ids), t_train)
    return record


def build_shard(
    shard: tuple[int, int, int],
    parts: list[dict[str, Any]],
    plan: IndexPlan,
    out_dir: str,
    trained_path: str | None,
    build_key: str,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Build one shard (shard_no, id_lo, id_hi): vectors with kb_ids in [id_lo, id_hi) into
    shard-XXXXX.faissindex.

    Starts from the shared trained index (IVF) or an empty one, adds in batches with the kb_ids,
    writes the index and then its small JSON record, both atomically. Returns the record.
    """
    shard_no, id_lo, id_hi = shard
    if num_threads:
        faiss.omp_set_num_threads(int(num_threads))
    t0 = time.perf_counter()
    index = faiss.read_index(trained_path) if trained_path else new_index(plan)
    index, on_gpu = _to_gpu_for_add(index, plan, id_hi - id_lo)
    for ids, vectors in iter_range(parts, id_lo, id_hi):
        index.add_with_ids(vectors, ids)
    if on_gpu:
        index = faiss.index_gpu_to_cpu(index)
    if index.ntotal != id_hi - id_lo:
        raise RuntimeError(f"shard {shard_no}: added {index.ntotal} vectors, expected {id_hi - id_lo}")
    name = SHARD_PATTERN.format(shard_no)
    path = Path(out_dir) / f"{name}{SHARD_SUFFIX}"
    write_index_atomic(index, path)
    record = {
        "shard": shard_no,
        "file": path.name,
        "id_lo": int(id_lo),
        "id_hi": int(id_hi),
        "ntotal": int(index.ntotal),
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
        "build_s": time.perf_counter() - t0,
        "gpu": on_gpu,
        "key": build_key,
    }
    write_json_atomic(path.with_suffix(".json"), record)
    log.debug("shard %d: %d vectors in %.1fs -> %s", shard_no, index.ntotal, record["build_s"], path.name)
    return record


# --- the stage -----------------------------------------------------------------------------------


def build_index(
    parts: list[Path],
    out_dir: Path,
    plan: IndexPlan,
    num_shards: int,
    map_tasks: MapTasks | None = None,
    num_threads: int | None = None,
    write_record: bool = True,
) -> dict[str, Any]:
    """Build the sharded index of the parts' image embeddings into out_dir; return index.json's content.

    `parts` in the order that defines kb_ids (sorted names, as `list_parts` returns them).
    `map_tasks`: runs the training task, then one task per shard to build (None = in this process).
    Idempotent: a complete index of the same inputs and plan is reused (`reused: true`, its record as
    it is, tuning included); complete shards of an interrupted build are kept and only the missing
    ones are built. `write_record=False`: return the record without writing index.json (the index
    stage writes it after its recall check); a stand-alone build writes it untuned (`params: {}`).
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    parts = [Path(p) for p in parts]
    if not parts:
        raise UserError("no embeddings parts to index (run the embed stage first)")
    table = part_table(parts)
    n = table[-1]["offset"] + table[-1]["rows"]
    d = part_dim(parts[0])
    for p in parts[1:]:
        if part_dim(p) != d:
            raise UserError(f"{p} has image_dim {part_dim(p)}, but {parts[0]} has {d}: mixed encoders")
    if n == 0:
        raise UserError("the embeddings parts hold no rows: nothing to index")
    if plan.d != d:
        raise UserError(f"index plan is for d={plan.d}, but the embeddings have d={d}")
    if plan.n != n:
        log.warning("index plan was made for N=%d, the parts hold N=%d", plan.n, n)
    ranges = shard_ranges(n, num_shards)
    key_src = {
        "format": FORMAT_VERSION,
        "plan": {k: v for k, v in plan.to_dict().items() if k not in ("reason", "considered")},
        "parts": [(t["name"], t["rows"], t["bytes"]) for t in table],
        "ranges": ranges,
        "faiss": faiss.__version__,
    }
    key = _hash(key_src)
    out_dir.mkdir(parents=True, exist_ok=True)

    existing = _read_json(out_dir / INDEX_JSON)
    damaged = [d for s in (existing or {}).get("shards", []) if (d := shard_damage(out_dir, s))]
    if existing and existing.get("key") == key and not damaged:
        log.info("index in %s is complete and up to date: reusing it", out_dir)
        return {**existing, "reused": True}
    for reason in damaged:
        log.warning("index shard %s: rebuilding it", reason)
    # From here on the folder is not a usable index until the new record lands.
    (out_dir / INDEX_JSON).unlink(missing_ok=True)

    run = map_tasks or map_inline
    timings: dict[str, float] = {}
    trained_path: str | None = None
    if plan.needs_training:
        train_key = _hash({k: v for k, v in key_src.items() if k != "ranges"})
        tp = out_dir / TRAINED_FILE
        rec = _read_json(tp.with_suffix(".json"))
        if tp.is_file() and rec and rec.get("key") == train_key:
            log.info("reusing the trained index %s", tp)
        else:
            [rec] = run(
                train_shared,
                [table],
                desc="index: train",
                unit="task",
                plan=plan,
                out_path=str(tp),
                build_key=train_key,
            )
        timings["sample_s"] = rec.get("sample_s", 0.0)
        timings["train_s"] = rec.get("train_s", 0.0)
        trained_path = str(tp)

    reused: dict[int, dict[str, Any]] = {}
    todo: list[tuple[int, int, int]] = []
    for s, (lo, hi) in enumerate(ranges):
        name = SHARD_PATTERN.format(s)
        rec = _read_json(out_dir / f"{name}.json")
        if rec and rec.get("key") == key and shard_damage(out_dir, rec) is None:
            log.debug("shard %d is complete: reusing it", s)
            reused[s] = rec
        else:
            todo.append((s, lo, hi))
    built = run(
        build_shard, todo, desc="index: shards", parts=table, plan=plan, out_dir=str(out_dir),
        trained_path=trained_path, build_key=key, num_threads=num_threads,
    )  # fmt: skip
    reused.update({rec["shard"]: rec for rec in built})
    shards = [reused[s] for s in range(len(ranges))]
    timings["add_s"] = float(sum(s["build_s"] for s in shards))
    timings["total_s"] = time.perf_counter() - t_start

    # Files of an earlier build with more shards would only confuse a reader, and temporary files
    # of a killed run only take space.
    keep = {s["file"] for s in shards} | {f"{SHARD_PATTERN.format(s['shard'])}.json" for s in shards}
    for stale in remove_dead_temps(out_dir.iterdir()):
        log.info("removing %s (killed run's temp file)", stale.name)
    for stale in out_dir.iterdir():
        if (
            stale.is_file()
            and stale.name.startswith("shard-")
            and ".tmp-" not in stale.name
            and stale.name not in keep
        ):
            log.info("removing %s (stale)", stale.name)
            stale.unlink()
    if trained_path is None:
        for f in (out_dir / TRAINED_FILE, (out_dir / TRAINED_FILE).with_suffix(".json")):
            f.unlink(missing_ok=True)

    record = {
        "format": FORMAT_VERSION,
        "key": key,
        "factory": plan.factory,
        "kind": plan.kind,
        "metric": plan.metric,
        "n": n,
        "d": d,
        "num_shards": len(shards),
        "reason": plan.reason,
        "plan": plan.to_dict(),
        "trained_file": TRAINED_FILE if trained_path else None,
        "shards": [{k: v for k, v in s.items() if k != "key"} for s in shards],
        "parts": [{k: t[k] for k in ("path", "name", "rows", "offset", "bytes")} for t in table],
        # faiss's defaults until tune_and_check's operating point is recorded (search.record_tuning)
        "params": {},
        "bytes": int(sum(s["bytes"] for s in shards)),
        "timings": timings,
        "faiss_version": faiss.__version__,
        "gpus": num_gpus(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if write_record:
        write_index_record(out_dir, record)
    log.info("index %s: %d vectors in %d shard(s), %.1fs", plan.factory, n, len(shards), timings["total_s"])
    return {**record, "reused": False}
