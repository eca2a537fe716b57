"""Cluster manifests (pipelines/clusters.py) and the three ways `dask_client` reaches a cluster: a
manifest, a scheduler file, an address. The SLURM runs themselves are in tests/test_slurm.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from retformer.artifacts.errors import UserError
from retformer.pipelines.clusters import load_cluster, resolve_cluster, slurm_kwargs, spec_from_dict


def test_shipped_cluster_manifests_load():
    """local, slurm and slurm_gpu load by name with the kinds and scaling their comments promise: the
    GPU one asks one GPU per job (a --gres directive) and scales adaptively; the CPU one a fixed count."""
    local, cpu, gpu = load_cluster("local"), load_cluster("slurm"), load_cluster("slurm_gpu")
    assert (local.kind, cpu.kind, gpu.kind) == ("local", "slurm", "slurm")
    assert cpu.jobs == 4 and cpu.adapt is None and cpu.gpus_per_job == 0
    assert gpu.adapt == {"minimum_jobs": 0, "maximum_jobs": 8} and gpu.gpus_per_job == 1
    assert "--gres=gpu:1" in slurm_kwargs(gpu)["job_extra_directives"]
    assert not any("gres" in d for d in slurm_kwargs(cpu)["job_extra_directives"])


def test_slurm_job_script_has_the_manifests_settings(tmp_path):
    """The job script SLURMCluster submits carries the manifest's partition, account, cores, memory,
    walltime, extra directives and GPUs; the workers run this python with OMP/MKL set to
    cores/processes (as a LocalCluster's workers), so a task computes the same floats."""
    pytest.importorskip(
        "dask_jobqueue", reason="dask-jobqueue is not installed (pip install 'retformer[slurm]')"
    )
    from dask_jobqueue import SLURMCluster

    spec = spec_from_dict(
        {
            "name": "t",
            "kind": "slurm",
            "queue": "gpu-long",
            "account": "proj42",
            "cores": 8,
            "processes": 2,
            "memory": "16GB",
            "walltime": "02:30:00",
            "gpus_per_job": 2,
            "job_extra_directives": ["--constraint=a100"],
            "job_script_prologue": ["module load cuda"],
            "log_directory": str(tmp_path),
        }
    )
    with SLURMCluster(**slurm_kwargs(spec)) as cluster:
        script = cluster.job_script()
    for line in (
        "#SBATCH -p gpu-long",
        "#SBATCH -A proj42",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=15G",
        "#SBATCH -t 02:30:00",
        "#SBATCH --constraint=a100",
        "#SBATCH --gres=gpu:2",
        "export OMP_NUM_THREADS=4",
        "module load cuda",
    ):
        assert line in script, (line, script)
    assert f"{sys.executable} -m distributed.cli.dask_worker" in script
    # A GPU job: one thread per worker (one task per GPU), the job still books its 8 cores (issue 21).
    assert "--nthreads 1" in script and "--nworkers 2" in script
    # The prologue runs before the worker starts.
    assert script.index("module load cuda") < script.index("dask_worker")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"kind": "pbs"}, "kind must be one of local, slurm"),
        ({"kind": "slurm", "queu": "cpu"}, "unknown keys ['queu']"),
        ({"kind": "slurm", "cores": 0}, "cores must be an integer >= 1"),
        ({"kind": "slurm", "cores": 2, "processes": 4}, "processes (4) must not exceed cores (2)"),
        ({"kind": "slurm", "adapt": {"minimum_jobs": 3, "maximum_jobs": 1}}, "minimum_jobs <= maximum_jobs"),
        ({"kind": "slurm", "adapt": {"max": 3}}, "adapt must be a mapping"),
        ({"kind": "slurm", "job_extra_directives": "--qos=x"}, "must be a list of strings"),
    ],
)
def test_bad_cluster_manifest_is_one_user_error(tmp_path, data, message):
    """A manifest with a wrong kind, a misspelt key or an impossible value is one UserError naming it."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError) as err:
        load_cluster(str(path))
    assert message in str(err.value) and str(path) in str(err.value)


def test_unknown_cluster_name_lists_the_known_ones():
    """An unknown --cluster name says which cluster manifests exist."""
    with pytest.raises(UserError, match=r"unknown cluster 'nope'.*local, slurm, slurm_gpu"):
        load_cluster("nope")


def test_only_one_way_to_a_cluster(tmp_path):
    """--cluster, --scheduler and --scheduler-file exclude each other; a missing scheduler file is an
    error that says how it is made; a manifest name resolves to its spec, a spec to itself."""
    with pytest.raises(UserError, match="only one of --cluster, --scheduler"):
        resolve_cluster("local", "tcp://127.0.0.1:8786", None)
    with pytest.raises(UserError, match="scheduler file not found.*--scheduler-file"):
        resolve_cluster(None, None, tmp_path / "missing.json")
    assert resolve_cluster(None, None, None) is None
    spec = load_cluster("slurm")
    assert resolve_cluster(spec, None, None) is spec and resolve_cluster("slurm", None, None) == spec


def test_slurm_cluster_without_sbatch_is_a_user_error(monkeypatch):
    """A `kind: slurm` manifest on a machine without sbatch stops with one error line, not a hang."""
    pytest.importorskip(
        "dask_jobqueue", reason="dask-jobqueue is not installed (pip install 'retformer[slurm]')"
    )
    from retformer.pipelines.dask_runner import dask_client

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UserError, match="sbatch is not on PATH"), dask_client(cluster="slurm"):
        pass


@pytest.mark.slow
def test_local_manifest_and_scheduler_file(tmp_path):
    """`--cluster local` starts a LocalCluster of the manifest's worker count, and a cluster started
    the HPC way (`dask scheduler --scheduler-file`, `dask worker --scheduler-file`) is joined through
    the file; the tasks run in the worker processes, results in item order."""
    from retformer.pipelines.dask_runner import dask_client, run_tasks

    def _square(x: int) -> dict:  # local: pickled by value, the workers cannot import this test module
        return {"x": x, "square": x * x, "pid": os.getpid()}

    manifest = tmp_path / "one.yaml"
    manifest.write_text(yaml.safe_dump({"kind": "local", "workers": 1}))
    with dask_client(cluster=str(manifest)) as client:
        assert len(client.scheduler_info()["workers"]) == 1
        results = run_tasks(client, _square, [3, 1, 2])
    assert [r["square"] for r in results] == [9, 1, 4] and results[0]["pid"] != os.getpid()

    sched_file = tmp_path / "scheduler.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bin_dir = Path(sys.executable).parent
    procs = [
        subprocess.Popen(
            [str(bin_dir / "dask"), "scheduler", "--scheduler-file", str(sched_file), "--host", "127.0.0.1",
             "--dashboard-address", "127.0.0.1:0"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    ]  # fmt: skip
    try:
        deadline = time.time() + 60
        while not sched_file.is_file() and time.time() < deadline:
            time.sleep(0.2)
        procs.append(
            subprocess.Popen(
                [str(bin_dir / "dask"), "worker", "--scheduler-file", str(sched_file), "--nthreads", "1",
                 "--host", "127.0.0.1", "--no-dashboard"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
        with dask_client(scheduler_file=str(sched_file)) as client:
            client.wait_for_workers(1, timeout=60)
            results = run_tasks(client, _square, [5, 4])
        assert [r["square"] for r in results] == [25, 16]
        assert all(r["pid"] not in (os.getpid(), procs[0].pid) for r in results)
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_neighbor_slices_on_a_cluster_match_one_pass(tmp_path, monkeypatch):
    """Neighbors as Dask tasks: a split cut into several `search_slice` tasks (one per SEARCH_BATCH
    here) and the self-match lookup cut into one `self_matches` task per KB part, on a one-worker
    LocalCluster, give byte-identical tables and store to the serial in-process pass with one slice
    per split and one part group; inside a worker process the index is loaded once and memory-mapped
    (every task of the worker gets the same loaded object)."""
    from retformer.kb_builder import neighbors
    from retformer.kb_builder.index import run_index
    from retformer.kb_builder.kb_schema import IndexSection
    from retformer.pipelines.dask_runner import dask_client, run_tasks, task_mapper
    from tests.helpers import synthetic_clustered_vectors, write_parts

    kb = synthetic_clustered_vectors(3000, 16, seed=1)
    write_parts(tmp_path / "kb", kb, [1000, 1200, 800])
    # 2.5 search batches of queries: three slices when a slice is one batch; some queries are KB rows.
    n_q = int(neighbors.SEARCH_BATCH * 2.5)
    queries = synthetic_clustered_vectors(n_q, 16, seed=2)
    queries[:50] = kb[:50]
    write_parts(tmp_path / "q" / "train", queries, [n_q // 2, n_q - n_q // 2], uid_format="kb{:06d}")
    index_dir = tmp_path / "index"
    cfg = IndexSection(kind="flat", num_shards=2, k=5, num_queries=200)
    run_index(tmp_path / "kb", index_dir, cfg)
    qdirs = {"train": tmp_path / "q" / "train"}

    serial = neighbors.run_neighbors(index_dir, tmp_path / "kb", qdirs, tmp_path / "serial", 5)
    assert serial["splits"]["train"]["queries_in_kb_excluded"] >= 50
    monkeypatch.setattr(neighbors, "TASK_ROWS", neighbors.SEARCH_BATCH)
    monkeypatch.setattr(neighbors, "SELF_MATCH_PARTS", 1)
    assert len(neighbors._slices("train", qdirs["train"], np.full(n_q, -1))) == 3

    def loaded(_: int) -> dict:
        index = neighbors._load_index(index_dir)
        return {"pid": os.getpid(), "index": id(index), "modes": index.load_modes}

    with dask_client(n_workers=1) as client:
        sliced = neighbors.run_neighbors(
            index_dir, tmp_path / "kb", qdirs, tmp_path / "sliced", 5, task_mapper(client)
        )
        seen = run_tasks(client, loaded, [0, 1, 2])
    for name in ("train.parquet", "store.parquet"):
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "sliced" / name).read_bytes(), name
    assert sliced["splits"]["train"]["queries"] == n_q
    assert len({(s["pid"], s["index"]) for s in seen}) == 1 and seen[0]["pid"] != os.getpid()
    assert set(seen[0]["modes"]) <= {"IO_FLAG_MMAP_IFC", "IO_FLAG_MMAP"}, seen[0]["modes"]
