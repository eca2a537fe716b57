"""The faiss index layer: choice, sharded build, exact merge, recall tuning, idempotence, mmap."""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import pytest

from retformer.artifacts.errors import UserError
from retformer.artifacts.names import INDEX_JSON
from retformer.kb_builder.index.build import build_index
from retformer.kb_builder.index.rows import shard_ranges
from retformer.kb_builder.index.search import ShardedIndex, record_tuning, tune_and_check
from retformer.kb_builder.index.select import (
    IVF_CENTROIDS_PER_SQRT_N,
    MEMORY_HEADROOM,
    TRAIN_MAX_POINTS_PER_CENTROID,
    TRAIN_MIN_POINTS_PER_CENTROID,
    choose_index,
    make_plan,
)
from tests.helpers import executor_map_tasks, synthetic_clustered_vectors
from tests.helpers import write_parts as _write_parts

# Uneven parts, including an empty and a one-row part, so shard boundaries fall inside parts.
PART_SIZES = (4000, 0, 1, 3506, 2500)
N = sum(PART_SIZES)  # 10007: not divisible by 3, so shards are uneven
D = 32
K = 10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Keep faiss on one thread: the test machine's 2 cores are shared."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def kb(tmp_path_factory) -> tuple[list[Path], np.ndarray]:
    """Clustered synthetic KB written as embeddings parts: (parts, float16 vectors in kb_id order)."""
    vectors = synthetic_clustered_vectors(N, D, seed=3)
    directory = tmp_path_factory.mktemp("embeddings")
    return _write_parts(directory, vectors, PART_SIZES), vectors


@pytest.fixture(scope="module")
def built(kb, tmp_path_factory) -> dict[str, Path]:
    """Indexes built once for the module: kind/shards -> index directory."""
    parts, _ = kb
    root = tmp_path_factory.mktemp("indexes")
    out = {}
    for name, kind, shards in [
        ("flat1", "flat", 1),
        ("flat3", "flat", 3),
        ("hnsw2", "hnsw", 2),
        ("ivf2", "ivf_flat", 2),
        ("pq2", "ivf_pq_refine", 2),
    ]:
        build_index(parts, root / name, make_plan(kind, N, D), shards)
        out[name] = root / name
    return out


def _queries(vectors: np.ndarray, num: int, seed: int) -> np.ndarray:
    """Perturbed KB vectors: realistic queries that are not KB rows."""
    rng = np.random.default_rng(seed)
    q = vectors[rng.choice(len(vectors), num, replace=False)].astype(np.float32)
    q += rng.standard_normal(q.shape).astype(np.float32) * 0.05
    return q / np.linalg.norm(q, axis=1, keepdims=True)


# --- selection -----------------------------------------------------------------------------------


def test_choose_index_small_n_is_exact_flat(caplog):
    """A tiny KB gets exact Flat search, and the logged reason says why."""
    with caplog.at_level(logging.INFO, logger="retformer.kb_builder.index.select"):
        plan = choose_index(5_000, 512, 8 * 10**9, 0.95, 32)
    assert plan.kind == "flat" and "Flat" in plan.factory
    assert plan.train_size == 0 and plan.search_sweep == [{}]
    assert "exact" in plan.reason and plan.reason in caplog.text


def test_choose_index_mid_n_is_hnsw_or_ivf():
    """Mid-size KBs get HNSW (fits in RAM) or IVF with the wiki's cluster count and training size."""
    plan = choose_index(500_000, 512, 16 * 10**9, 0.95, 32)
    assert plan.kind == "hnsw" and "HNSW32" in plan.factory
    assert [p["efSearch"] for p in plan.search_sweep][:2] == [16, 32]
    assert "HNSW" in plan.reason

    plan = choose_index(5_000_000, 512, 16 * 10**9, 0.95, 32)
    assert plan.kind in ("ivf_flat", "ivf_sq8") and plan.factory.startswith("IVF")
    assert IVF_CENTROIDS_PER_SQRT_N * math.sqrt(5e6) <= plan.nlist <= 16 * math.sqrt(5e6)
    assert TRAIN_MIN_POINTS_PER_CENTROID * plan.nlist <= plan.train_size
    assert plan.train_size <= TRAIN_MAX_POINTS_PER_CENTROID * plan.nlist
    assert plan.search_sweep[0] == {"nprobe": 1} and plan.search_sweep[-1] == {"nprobe": plan.nlist}


def test_choose_index_web_scale_small_budget_is_ivf_pq_with_refine(caplog):
    """1.4B x 512 in 200 GB: IVF-PQ with fp16 re-ranking, inside the budget, and the reason says so."""
    budget = 200 * 10**9
    with caplog.at_level(logging.INFO, logger="retformer.kb_builder.index.select"):
        plan = choose_index(1_400_000_000, 512, budget, 0.95, 32)
    assert plan.kind == "ivf_pq_refine"
    assert "PQ64" in plan.factory and "Refine(SQfp16)" in plan.factory and "_HNSW32" in plan.factory
    assert plan.estimated_bytes <= MEMORY_HEADROOM * budget
    assert plan.estimated_disk_bytes > plan.estimated_bytes  # the fp16 copies live on disk
    assert "memory is tight" in plan.reason and "re-ranked" in plan.reason
    assert any(not c["fits"] for c in plan.considered)  # it says what it rejected
    assert all("k_factor" in p and "nprobe" in p for p in plan.search_sweep)
    assert "IVF262144_HNSW32,PQ64" in caplog.text


def test_choose_index_rejects_impossible_inputs():
    """Bad targets and budgets that fit no index are UserErrors naming the problem."""
    with pytest.raises(UserError, match="recall target"):
        choose_index(10_000, 64, 10**9, 1.5, 10)
    with pytest.raises(UserError, match="no index .* fits"):
        choose_index(1_400_000_000, 512, 10**9, 0.95, 32)
    with pytest.raises(UserError, match="exact search"):
        choose_index(1_400_000_000, 512, 200 * 10**9, 1.0, 32)


# --- build and search ------------------------------------------------------------------------------


def test_shard_ranges_are_contiguous_and_cover_all():
    """Shards are contiguous kb_id ranges covering [0, n), sizes within one of each other."""
    ranges = shard_ranges(N, 3)
    assert ranges[0][0] == 0 and ranges[-1][1] == N
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) == 1


def test_sharded_exact_search_equals_unsharded(kb, built):
    """Flat with 3 uneven shards returns the same ids and scores as 1 shard and as brute force."""
    _, vectors = kb
    q = _queries(vectors, 200, seed=1)
    one = ShardedIndex.load(built["flat1"])
    three = ShardedIndex.load(built["flat3"])
    assert len(three.shards) == 3
    assert len({s["ntotal"] for s in three.meta["shards"]}) > 1  # uneven
    s1, i1 = one.search(q, K)
    s3, i3 = three.search(q, K)
    np.testing.assert_array_equal(i1, i3)
    np.testing.assert_allclose(s1, s3, rtol=0, atol=1e-6)
    brute = q.astype(np.float64) @ vectors.astype(np.float64).T
    ref_ids = np.argsort(-brute, axis=1, kind="stable")[:, :K]
    np.testing.assert_array_equal(i1, ref_ids)
    np.testing.assert_allclose(s1, np.take_along_axis(brute, ref_ids, axis=1), atol=1e-5)
    assert np.all(np.diff(s1, axis=1) <= 0)  # descending


def test_ids_are_dense_kb_ids_across_parts(kb, built):
    """A KB row finds itself as kb_id = part offset + row; exclude_ids drops it; index.json has offsets."""
    parts, vectors = kb
    index = ShardedIndex.load(built["flat3"])
    meta = index.meta
    assert [p["offset"] for p in meta["parts"]] == list(np.cumsum((0,) + PART_SIZES[:-1]))
    assert [p["name"] for p in meta["parts"]] == [p.name for p in parts]
    rows = np.array([0, 3999, 4000, 4001, 7506, N - 1])  # first/last rows of parts, the 1-row part
    scores, ids = index.search(vectors[rows], 3)
    np.testing.assert_array_equal(ids[:, 0], rows)
    assert np.all(scores[:, 0] > 0.999)
    _, ids_ex = index.search(vectors[rows], 3, exclude_ids=rows)
    assert not np.any(ids_ex == rows[:, None])
    np.testing.assert_array_equal(ids_ex[:, :2], ids[:, 1:])


@pytest.mark.parametrize("name", ["hnsw2", "ivf2", "pq2"])
def test_tuned_index_reaches_recall_target(kb, built, name):
    """HNSW, IVF and IVF-PQ+refine tune to recall@k >= 0.95 on held-out KB rows; record persists."""
    parts, vectors = kb
    index = ShardedIndex.load(built[name])
    report = tune_and_check(index, parts, 300, K, 0.95)
    assert report["reached"] and report["recall"] >= 0.95
    assert report["tried"] and all(t["recall"] >= 0 and t["qps"] > 0 for t in report["tried"])
    assert report["tried"][-1]["params"] == report["chosen"]
    assert report["self_excluded"] and report["num_queries"] == 300
    assert report["memory"]["disk_bytes"] > 0 and report["memory"]["estimated_ram_bytes"] > 0
    if name != "pq2":  # same ground truth from the in-memory array as from the Parquet parts
        again = tune_and_check(index, vectors, 300, K, 0.95, sweep=[report["chosen"]])
        assert again["recall"] == pytest.approx(report["recall"])
    record_tuning(built[name], report)
    reloaded = ShardedIndex.load(built[name])
    assert reloaded.params == report["chosen"]
    assert reloaded.meta["tuning"]["recall"] == report["recall"]


def test_unreachable_target_raises_user_error(kb, built):
    """A crippled IVF (nprobe capped at 1) at 0.999, and a target above 1, raise clear UserErrors."""
    parts, _ = kb
    index = ShardedIndex.load(built["ivf2"])
    message = r"IVF\d+,Flat reached recall@10 0\.\d+ at best .* below the target 0.999"
    with pytest.raises(UserError, match=message) as e:
        tune_and_check(index, parts, 200, K, 0.999, sweep=[{"nprobe": 1}])
    report = e.value.report
    assert not report["reached"] and len(report["tried"]) == 1 and report["recall"] < 0.999
    with pytest.raises(UserError, match="impossible"):
        tune_and_check(index, parts, 200, K, 1.01)


def test_build_is_atomic_and_idempotent(kb, tmp_path):
    """No temp file is left; a rerun reuses the index; a lost shard is rebuilt alone; S changes clean up."""
    parts, _ = kb
    plan = make_plan("ivf_flat", N, D)
    out = tmp_path / "idx"
    first = build_index(parts, out, plan, 3)
    assert not first["reused"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    files = {p.name: p.stat().st_mtime_ns for p in out.glob("*.faissindex")}
    assert len(files) == 4  # trained + 3 shards

    again = build_index(parts, out, plan, 3)
    assert again["reused"] and again["key"] == first["key"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.faissindex")} == files

    (out / "shard-00001.faissindex").unlink()
    os.remove(out / INDEX_JSON)
    resumed = build_index(parts, out, plan, 3)
    assert not resumed["reused"]
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.faissindex")}
    assert after["shard-00000.faissindex"] == files["shard-00000.faissindex"]
    assert after["trained.faissindex"] == files["trained.faissindex"]  # k-means not redone
    assert after["shard-00001.faissindex"] != files["shard-00001.faissindex"]

    build_index(parts, out, plan, 1)
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.faissindex", "shard-00000.json"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_killed_build_leaves_no_trusted_partial_file(kb, tmp_path, monkeypatch):
    """A crash while writing a shard leaves neither the shard nor index.json; a rerun completes it."""
    parts, _ = kb
    plan = make_plan("flat", N, D)
    out = tmp_path / "idx"
    real_write = faiss.write_index
    calls = {"n": 0}

    def crash_on_second_shard(index, path):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(path).write_bytes(b"half an index")
            raise RuntimeError("killed")
        real_write(index, path)

    monkeypatch.setattr(faiss, "write_index", crash_on_second_shard)
    with pytest.raises(RuntimeError, match="killed"):
        build_index(parts, out, plan, 3)
    monkeypatch.setattr(faiss, "write_index", real_write)
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.faissindex", "shard-00000.json"]
    (out / "shard-00002.faissindex.tmp-999999").write_bytes(b"left by a killed process")
    os.utime(out / "shard-00002.faissindex.tmp-999999", (0, 0))
    record = build_index(parts, out, plan, 3)
    assert record["num_shards"] == 3 and not record["reused"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert ShardedIndex.load(out).ntotal == N


def test_mmap_load_matches_ram_load(kb, built):
    """Memory-mapped shards (Flat, HNSW, IVF, refine) load via faiss's mmap flags and search the same."""
    _, vectors = kb
    q = _queries(vectors, 50, seed=2)
    for name in ("flat3", "hnsw2", "ivf2", "pq2"):
        mapped = ShardedIndex.load(built[name], mmap=True)
        loaded = ShardedIndex.load(built[name], mmap=False)
        assert set(mapped.load_modes) <= {"IO_FLAG_MMAP_IFC", "IO_FLAG_MMAP"}, mapped.load_modes
        assert set(loaded.load_modes) == {"ram"}
        params = mapped.sweep()[-1]
        s1, i1 = mapped.search(q, K, params)
        s2, i2 = loaded.search(q, K, params)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(s1, s2)


def test_build_through_a_process_pool_submit(kb, built, tmp_path):
    """Shard tasks are picklable top-level functions: a process pool's submit gives the same index."""
    parts, vectors = kb
    with ProcessPoolExecutor(max_workers=1) as pool:
        pool_map = executor_map_tasks(pool)
        record = build_index(parts, tmp_path / "pool", make_plan("flat", N, D), 3, map_tasks=pool_map)
    assert record["num_shards"] == 3 and sum(s["ntotal"] for s in record["shards"]) == N
    q = _queries(vectors, 20, seed=4)
    _, i_pool = ShardedIndex.load(tmp_path / "pool").search(q, K)
    _, i_ref = ShardedIndex.load(built["flat3"]).search(q, K)
    np.testing.assert_array_equal(i_pool, i_ref)


def test_build_rejects_wrong_dimension(kb, tmp_path):
    """A plan for another dimension is a UserError naming both dimensions."""
    parts, _ = kb
    with pytest.raises(UserError, match="d=64.*d=32"):
        build_index(parts, tmp_path / "bad", make_plan("flat", N, 64), 1)
