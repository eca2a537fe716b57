"""Stage outputs are complete or absent, a complete one is skipped on rerun, and one writer at a time.

Issue 10 items 6-8: a killed neighbors run left `store.parquet.tmp-<pid>` and a half table set that
looked complete; `index.json` was written before the recall check; a completed neighbors stage was
recomputed on every rerun; two concurrent runs on one workdir both redid all the work.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retformer.artifacts.atomic import atomic_dir, atomic_path, remove_dead_temps_of
from retformer.artifacts.errors import UserError
from retformer.artifacts.lock import lock_path, output_lock
from retformer.artifacts.names import INDEX_JSON
from retformer.artifacts.workspace import Workspace
from retformer.kb_builder import index as index_stage
from retformer.kb_builder.kb_schema import IndexSection
from retformer.kb_builder.neighbors import RECORD, run_neighbors
from tests.conftest import REPO, needs_fmnist, write_manifest
from tests.helpers import synthetic_clustered_vectors, write_parts

N, D, K = 600, 16, 5
INDEX_CFG = IndexSection(kind="flat", num_shards=2, k=K, recall_target=0.9, num_queries=50)

# A process that holds an output's lock until its stdin closes (the test's "other run").
HOLDER = """
import sys
from retformer.artifacts.lock import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def _dead_pid() -> int:
    """The pid of a process that has exited (what a killed writer's temp file names)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    return int(proc.stdout)


def _hold(output: Path) -> subprocess.Popen:
    """Start a process holding `output`'s lock; return once it holds it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(output)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------ locks
def test_second_writer_waits_says_so_once_and_gets_the_lock_after_release(tmp_path: Path, capfd):
    """While another process holds an output's lock, output_lock blocks, prints one stderr line
    naming the output and the lock file, and returns when the holder lets go."""
    output = tmp_path / "index"
    holder = _hold(output)
    released_at = None
    try:
        import threading

        def release_later() -> None:
            nonlocal released_at
            time.sleep(1.0)
            released_at = time.monotonic()
            _release(holder)

        threading.Thread(target=release_later).start()
        with output_lock(output, "the index of KB x") as held:
            got_at = time.monotonic()
    finally:
        if holder.poll() is None:
            holder.kill()
    assert held.waited_s >= 0.8 and released_at is not None and got_at >= released_at
    err = capfd.readouterr().err.splitlines()
    waiting = [line for line in err if "waiting" in line]
    assert len(waiting) == 1 and "the index of KB x" in waiting[0] and str(lock_path(output)) in waiting[0]


def test_lock_of_a_killed_holder_is_free_at_once(tmp_path: Path, capfd):
    """SIGKILL of the holder releases the lock (the kernel drops a dead process's flock): the next
    run does not wait and prints nothing."""
    output = tmp_path / "shards"
    holder = _hold(output)
    holder.kill()
    holder.wait(timeout=30)
    with output_lock(output) as held:
        assert held.waited_s == 0.0
    assert "waiting" not in capfd.readouterr().err


# ------------------------------------------------------------------------------- atomic writes
def test_rewriting_an_output_removes_a_dead_writers_temp_but_not_a_live_ones(tmp_path: Path):
    """atomic_path first removes `<name>.tmp-<pid>` of a dead pid (a killed run's half-written
    file), and keeps one whose writer is alive (it may still be writing)."""
    target = tmp_path / "store.parquet"
    dead = tmp_path / f"store.parquet.tmp-{_dead_pid()}"
    live = tmp_path / f"store.parquet.tmp-{os.getppid()}"
    dead.write_bytes(b"half")
    live.write_bytes(b"busy")
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and not dead.exists() and live.exists()


def test_atomic_dir_swaps_the_whole_folder_or_leaves_the_old_one(tmp_path: Path):
    """A folder written with atomic_dir replaces the old one as a whole; a failure inside the block
    leaves the old folder as it was and no temporary folder; a dead writer's leftovers go."""
    out = tmp_path / "k8"
    with atomic_dir(out) as staging:
        (staging / "train.parquet").write_text("old")
        (staging / "store.parquet").write_text("old")
    leftover = tmp_path / f"k8.tmp-{_dead_pid()}"
    leftover.mkdir()
    (leftover / "train.parquet").write_text("half")
    with pytest.raises(RuntimeError), atomic_dir(out) as staging:
        (staging / "train.parquet").write_text("new")
        raise RuntimeError("killed half way")
    assert sorted(p.name for p in out.iterdir()) == ["store.parquet", "train.parquet"]
    assert (out / "train.parquet").read_text() == "old"
    assert not leftover.exists(), "the dead writer's folder is removed by the next writer"
    with atomic_dir(out) as staging:
        (staging / "train.parquet").write_text("new")
    assert [p.name for p in out.iterdir()] == ["train.parquet"], "no file of the old set survives"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k8"]


# ------------------------------------------------------------------------------------------ index
@pytest.fixture
def kb_parts(tmp_path: Path) -> Path:
    """A small synthetic KB as embeddings parts (uids kb000000...)."""
    emb = tmp_path / "kb" / "embeddings"
    write_parts(emb, synthetic_clustered_vectors(N, D, seed=1), (250, 350))
    return emb


def test_index_json_lands_only_after_the_recall_check(kb_parts: Path, tmp_path: Path, monkeypatch):
    """A run killed (here: failing) between the build and the recall check leaves no index.json, so
    nothing can use untuned shards; the rerun reuses the built shards, checks recall and writes
    index.json once, with its recall check."""
    index_dir = tmp_path / "kb" / "index"
    real_check = index_stage.tune_and_check

    def killed(*args, **kwargs):
        assert sorted(p.name for p in index_dir.glob("shard-*.faissindex")) == [
            "shard-00000.faissindex",
            "shard-00001.faissindex",
        ]
        assert not (index_dir / INDEX_JSON).exists(), "index.json must not exist before the recall check"
        raise RuntimeError("killed during the recall check")

    monkeypatch.setattr(index_stage, "tune_and_check", killed)
    with pytest.raises(RuntimeError):
        index_stage.run_index(kb_parts, index_dir, INDEX_CFG)
    assert not (index_dir / INDEX_JSON).exists()
    shards = {p: p.stat().st_mtime_ns for p in index_dir.glob("shard-*.faissindex")}
    monkeypatch.setattr(index_stage, "tune_and_check", real_check)
    index_stage.run_index(kb_parts, index_dir, INDEX_CFG)
    assert {p: p.stat().st_mtime_ns for p in shards} == shards, "the killed run's complete shards are reused"
    meta = json.loads((index_dir / INDEX_JSON).read_text())
    assert meta["recall_check"]["recall"] >= 0.9 and "reused" not in meta


def test_a_complete_index_is_skipped_and_a_changed_check_is_redone(
    kb_parts: Path, tmp_path: Path, monkeypatch
):
    """A rerun with the same settings writes nothing and measures nothing (index.json untouched); a
    rerun with another recall target re-checks the same shards and rewrites index.json."""
    index_dir = tmp_path / "kb" / "index"
    index_stage.run_index(kb_parts, index_dir, INDEX_CFG)
    stamp = (index_dir / INDEX_JSON).stat().st_mtime_ns
    real_check = index_stage.tune_and_check

    def must_not_run(*args, **kwargs):
        raise AssertionError("a complete, recall-checked index was checked again")

    monkeypatch.setattr(index_stage, "tune_and_check", must_not_run)
    again = index_stage.run_index(kb_parts, index_dir, INDEX_CFG)
    assert again["reused"] and (index_dir / INDEX_JSON).stat().st_mtime_ns == stamp
    monkeypatch.setattr(index_stage, "tune_and_check", real_check)
    index_stage.run_index(kb_parts, index_dir, INDEX_CFG.model_copy(update={"recall_target": 0.8}))
    assert json.loads((index_dir / INDEX_JSON).read_text())["recall_check"]["target"] == 0.8


def test_a_rebuild_removes_the_old_index_json_before_touching_shards(
    kb_parts: Path, tmp_path: Path, monkeypatch
):
    """A rebuild (here: 3 shards instead of 2) that dies while building shards leaves no index.json:
    the old record would otherwise describe shard files the new build has replaced."""
    from retformer.kb_builder.index import build

    index_dir = tmp_path / "kb" / "index"
    index_stage.run_index(kb_parts, index_dir, INDEX_CFG)

    def dies(*args, **kwargs):
        raise RuntimeError("killed while building a shard")

    monkeypatch.setattr(build, "build_shard", dies)
    with pytest.raises(RuntimeError):
        index_stage.run_index(kb_parts, index_dir, INDEX_CFG.model_copy(update={"num_shards": 3}))
    assert not (index_dir / INDEX_JSON).exists()


# -------------------------------------------------------------------------------------- neighbors
@pytest.fixture
def searchable(kb_parts: Path, tmp_path: Path) -> dict[str, Path]:
    """Index of the synthetic KB plus two query splits of dataset "ds", in the workspace layout at
    tmp_path (the KB is "kb"); paths by role."""
    ws = Workspace(tmp_path)
    index_dir = tmp_path / "kb" / "index"
    index_stage.run_index(kb_parts, index_dir, INDEX_CFG)
    queries = {}
    for i, split in enumerate(("train", "test")):
        queries[split] = ws.dataset_embeddings("ds", split)
        vectors = synthetic_clustered_vectors(40, D, seed=10 + i)
        write_parts(queries[split], vectors, (40,), uid_format=f"{split}{{:04d}}")
    return {"index": index_dir, "kb": kb_parts, "out": ws.neighbors_dir("ds", "kb", K), **queries}


def _neighbors(paths: dict[str, Path], k: int = K) -> dict:
    out = paths["out"].with_name(f"k{k}")
    queries = {"train": paths["train"], "test": paths["test"]}
    return run_neighbors(paths["index"], paths["kb"], queries, out, k)


def test_complete_neighbor_tables_are_skipped_on_rerun(searchable: dict[str, Path]):
    """The second run with the same inputs reuses the tables (no file rewritten); another k is its
    own table set; a rebuilt index (a new index.json) makes the tables stale and they are rebuilt."""
    first = _neighbors(searchable)
    out = searchable["out"]
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert first["reused"] is False and set(stamps) == {
        "train.parquet",
        "test.parquet",
        "store.parquet",
        RECORD,
    }
    again = _neighbors(searchable)
    assert again["reused"] is True and again["key"] == first["key"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert _neighbors(searchable, k=3)["reused"] is False
    meta = json.loads((searchable["index"] / INDEX_JSON).read_text())
    (searchable["index"] / INDEX_JSON).write_text(json.dumps({**meta, "created": "later"}))
    assert _neighbors(searchable)["reused"] is False


def test_a_killed_neighbors_run_leaves_no_readable_half_set(searchable: dict[str, Path], tmp_path: Path):
    """What a SIGKILL after train.parquet appeared leaves (a `k5.tmp-<pid>/` folder holding
    train.parquet and store.parquet.tmp-<pid>) is invisible to the readers (no table set for that
    k) and is removed by the rerun, which writes the complete set."""
    from retformer.trainer.features import load_retrieval_features, neighbor_k_values

    out = searchable["out"]
    pid = _dead_pid()
    half = out.with_name(f"{out.name}.tmp-{pid}")
    half.mkdir(parents=True)
    (half / "train.parquet").write_bytes(b"PAR1 half")
    (half / f"store.parquet.tmp-{pid}").write_bytes(b"PAR1 half")
    ws = Workspace(tmp_path)
    assert neighbor_k_values(ws, "ds", "kb") == []
    with pytest.raises(UserError, match="neighbor file not found"):
        load_retrieval_features(ws, "ds", "kb", K, "train")
    record = _neighbors(searchable)
    assert record["reused"] is False and not half.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["train.parquet", "test.parquet", "store.parquet", RECORD]
    )


def test_leftovers_beside_a_complete_set_are_removed_by_a_skipping_rerun(searchable: dict[str, Path]):
    """A rerun that skips a complete set still removes what a killed writer left beside it."""
    _neighbors(searchable)
    leftover = searchable["out"].with_name(f"{searchable['out'].name}.tmp-{_dead_pid()}")
    leftover.mkdir()
    assert _neighbors(searchable)["reused"] is True
    assert not leftover.exists()
    assert remove_dead_temps_of(searchable["out"]) == []


# ------------------------------------------------------------------------------- through the CLI
def _two_runs_one_lock(output: Path, args: list[str], logs: Path) -> list[tuple[int, str, str]]:
    """Hold `output`'s lock, start the same command twice, release once both say they wait; return
    (exit code, stdout, stderr) of each. Output goes to files: a pipe nobody reads could block the
    run holding the lock while the test waits for the other one."""
    holder = _hold(output)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs, files = [], []
    try:
        for i in range(2):
            out, err = logs / f"{i}.out", logs / f"{i}.err"
            files.append((out, err))
            with open(out, "w") as fo, open(err, "w") as fe:
                cmd = [sys.executable, "-m", "retformer.pipelines.cli", *args]
                procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fo, stderr=fe))
        deadline = time.monotonic() + 300
        while not all("waiting for another retformer run" in err.read_text() for _, err in files):
            assert time.monotonic() < deadline, [err.read_text() for _, err in files]
            assert all(p.poll() is None for p in procs), [err.read_text() for _, err in files]
            time.sleep(0.2)
    finally:
        _release(holder)
        for proc in procs:
            try:
                proc.wait(timeout=900)
            finally:
                if proc.poll() is None:
                    proc.kill()
    return [
        (p.returncode, out.read_text(), err.read_text()) for p, (out, err) in zip(procs, files, strict=True)
    ]


@pytest.mark.slow
@needs_fmnist
def test_two_concurrent_neighbors_runs_compute_once(e2e_workspace: Path, small_manifests, tmp_path: Path):
    """Two `retformer neighbors` on one workdir: both wait for the lock (saying so once), one
    computes the tables, the other finds them complete and reuses them; the tables are those of an
    uninterrupted run, byte for byte."""
    work = tmp_path / "work"
    shutil.copytree(e2e_workspace, work)
    ref = e2e_workspace / "datasets" / "tiny_lt" / "neighbors" / "tiny_all" / "k8"
    out = work / "datasets" / "tiny_lt" / "neighbors" / "tiny_all" / "k8"
    shutil.rmtree(out)
    m = small_manifests
    args = ["neighbors", "--dataset", str(m["dataset"]), "--kb", str(m["kb"]), "--workdir", str(work)]
    results = _two_runs_one_lock(out, args, tmp_path)
    for rc, _, err in results:
        assert rc == 0, err
        assert err.count("waiting for another retformer run") == 1
    reused = ["are complete and up to date: reusing them" in err for _, _, err in results]
    assert sorted(reused) == [False, True], "exactly one run computes"
    for name in ("train.parquet", "test.parquet", "store.parquet"):
        assert (out / name).read_bytes() == (ref / name).read_bytes()


@pytest.mark.slow
@needs_fmnist
def test_two_concurrent_train_runs_train_once(e2e_workspace: Path, small_manifests, tmp_path: Path):
    """Two identical `retformer train` on one workdir: one trains, the other waits and returns the
    run the first one finished, instead of repeating it."""
    work = tmp_path / "work"
    shutil.copytree(e2e_workspace, work, ignore=shutil.ignore_patterns("runs"))
    exp = write_manifest(
        tmp_path / "one.yaml",
        {
            "name": "one",
            "k": 4,
            "eval_split": "test",
            "methods": ["mlp_only"],
            "model": {"width": 32, "depth": 1, "heads": 2},
            "train": {"epochs": 1, "batch_size": 32, "seed": 0},
        },
    )
    m = small_manifests
    args = ["train", "--dataset", str(m["dataset"]), "--kb", str(m["kb"]), "--experiment", str(exp)]
    args += ["--run", "one", "--workdir", str(work)]
    results = _two_runs_one_lock(work / "runs" / "one", args, tmp_path)
    for rc, _, err in results:
        assert rc == 0, err
        assert err.count("waiting for another retformer run") == 1
    reused = ["was finished by the run this one waited for" in err for _, _, err in results]
    assert sorted(reused) == [False, True], "exactly one run trains"
    tables = [[line for line in out.splitlines() if line.startswith("mlp_only")] for _, out, _ in results]
    assert tables[0] and tables[0] == tables[1], "both print the one run's results"


@pytest.mark.slow
@needs_fmnist
def test_a_finished_run_of_the_same_configuration_is_skipped(small_manifests, e2e_workspace, tmp_path):
    """`retformer train` again with the same manifests and --run: the finished run is not trained again
    (eval.json, model files and report untouched) and its table is printed; a run killed before its
    report would get only the report written."""
    from tests.helpers import run_cli

    ws = tmp_path / "work"
    shutil.copytree(e2e_workspace, ws)
    run = ws / "runs" / "tiny"
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()}
    (run / "report.html").unlink()
    m = small_manifests
    proc = run_cli(
        "train", "--dataset", str(m["dataset"]), "--kb", str(m["kb"]), "--experiment", str(m["experiment"]),
        "--run", "tiny", "--workdir", str(ws),
    )  # fmt: skip
    assert "is complete with this configuration" in proc.stderr, proc.stderr
    assert "retformer" in proc.stdout  # the results table
    after = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.is_file()}
    assert (run / "report.html").is_file()
    assert {k: v for k, v in after.items() if k != "report.html"} == {
        k: v for k, v in before.items() if k != "report.html"
    }
