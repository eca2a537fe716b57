"""The KB stages on a real SLURM: a one-node cluster on 127.0.0.1 (tests/slurm/start_slurm.sh, as root,
installing Debian's slurm-wlm and munge when missing), Dask workers submitted as SLURM jobs by
dask_jobqueue.SLURMCluster through a `kind: slurm` cluster manifest.

Skipped, with the reason, where the machine cannot: not Linux, not root without SLURM installed, no
apt mirror, dask-jobqueue missing, Fashion-MNIST missing, or RETFORMER_SKIP_SLURM=1. A cluster that is
installed but does not come up is a failure (with the daemons' log tails), not a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from retformer.artifacts.embeddings_io import list_parts
from tests.conftest import have_fmnist

SCRIPTS = Path(__file__).resolve().parent / "slurm"
# Small on purpose: the machine running the suite is shared (2 cores); RealMemory stays below it.
NODE_MEM_MB = 6144
JOB_MEMORY = "2500MB"


def _skip_reason() -> str | None:
    if os.environ.get("RETFORMER_SKIP_SLURM"):
        return "RETFORMER_SKIP_SLURM is set"
    if not sys.platform.startswith("linux"):
        return f"a one-node SLURM needs Linux (this is {sys.platform})"
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        return "dask-jobqueue is not installed (pip install 'retformer[slurm]')"
    if not have_fmnist():
        return "Fashion-MNIST IDX files are missing (make data)"
    have_slurm = all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged"))
    if os.geteuid() != 0:
        return (
            "starting slurmd and munged needs root"
            if have_slurm
            else "SLURM is not installed and installing slurm-wlm/munge needs root"
        )
    if not have_slurm and not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install slurm-wlm and munge"
    return None


pytestmark = pytest.mark.system  # a real SLURM (slurmctld + slurmd) started by the test


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> Iterator[Path]:
    """A running one-node SLURM (SLURM_CONF set for this process and the jobs it submits); stopped,
    with its jobs cancelled, after the module's tests."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_TEST_MEM_MB": str(NODE_MEM_MB), "SLURM_TEST_CPUS": "2"}
    proc = subprocess.run(
        [str(SCRIPTS / "start_slurm.sh"), str(root)], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode == 2:  # the script's "this machine cannot" (e.g. apt-get cannot reach a mirror)
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    if proc.returncode != 0:
        subprocess.run([str(SCRIPTS / "stop_slurm.sh"), str(root)], capture_output=True, check=False)
        pytest.fail(f"SLURM did not start:\n{proc.stdout}\n{proc.stderr}")
    mp = pytest.MonkeyPatch()
    mp.setenv("SLURM_CONF", str(root / "slurm.conf"))
    try:
        yield root
    finally:
        mp.undo()
        stop = subprocess.run(
            [str(SCRIPTS / "stop_slurm.sh"), str(root)], capture_output=True, text=True, check=False
        )
        assert stop.returncode == 0, stop.stderr


def _slurm_manifest(root: Path, jobs: int) -> Path:
    """A `kind: slurm` cluster manifest for the test cluster (what a user writes for theirs)."""
    import yaml

    path = root / "test_slurm.yaml"
    data = {
        "kind": "slurm",
        "queue": "debug",
        "cores": 1,
        "processes": 1,
        "memory": JOB_MEMORY,
        "walltime": "00:20:00",
        "jobs": jobs,
        "log_directory": str(root / "jobs"),
        # The test cluster is 127.0.0.1 only: the scheduler listens there, the workers connect there.
        "scheduler_options": {"host": "127.0.0.1"},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def _run_stages(ws_root: Path, manifests: dict[str, Path], **where) -> None:
    """embed (KB + dataset splits) -> index (2 shards: two build tasks) -> neighbors, all on `where`."""
    from retformer.artifacts.workspace import Workspace
    from retformer.pipelines import stages
    from retformer.pipelines.dask_target import DaskTarget

    ws = Workspace(ws_root)
    kb = stages.load_kb(str(manifests["kb"]), None)
    ds = stages.load_dataset_manifest(str(manifests["dataset"]), None)
    stages.stage_shards(ws, kb, ds, None)
    stages.stage_embed(ws, kb, ds, None, dask=DaskTarget(**where))
    stages.stage_index(ws, kb, dask=DaskTarget(**where))
    stages.stage_neighbors(ws, ds, kb, dask=DaskTarget(**where))


def _table(path: Path):
    """A Parquet file's rows and schema without its key-value metadata (the embed parts carry their
    shard's timing stats there, which differ between any two runs)."""
    table = pq.read_table(path)
    return table.replace_schema_metadata(None)


def _outputs(ws_root: Path) -> dict[str, Path]:
    """Every output file of the three stages, by path relative to the workspace; stage records and
    index.json (timings, qps) excluded."""
    files = {}
    for p in sorted(ws_root.rglob("*")):
        # the recall sample is named by its index record's key, which hashes absolute paths
        rel = re.sub(r"recall_sample-[0-9a-f]{16}", "recall_sample-<key>", p.relative_to(ws_root).as_posix())
        if p.is_file() and ("/embeddings/" in rel or "/index/" in rel or "/neighbors/" in rel):
            if p.suffix == ".json":
                continue
            files[rel] = p
    return files


def test_stages_on_slurm_match_local_cluster(slurm, small_manifests, tmp_path, monkeypatch):
    """embed + index + neighbors of a small KB run as tasks in SLURM jobs (two worker jobs submitted
    by SLURMCluster from a cluster manifest) write the same embeddings (every row and vector), the
    same faiss index files and byte-identical neighbor Parquet files as on a LocalCluster; the
    tasks ran in SLURM jobs (the controller allocated them, the workers' job logs show them joining
    the scheduler), and no job is left once the stages end."""
    started = time.perf_counter()
    local_ws, slurm_ws = tmp_path / "local", tmp_path / "slurm"
    _run_stages(local_ws, small_manifests, workers=1)
    local_seconds = time.perf_counter() - started
    # The jobs inherit this environment (sbatch --export=ALL): keep the workers' INFO lines ("Registered
    # to ...", checked below) even when an earlier test's CLI set Dask's logging to warning here.
    monkeypatch.setenv("DASK_LOGGING__DISTRIBUTED", "info")
    _run_stages(slurm_ws, small_manifests, cluster=str(_slurm_manifest(slurm, jobs=2)))
    slurm_seconds = time.perf_counter() - started - local_seconds
    print(f"local cluster {local_seconds:.1f}s, SLURM {slurm_seconds:.1f}s")

    local, on_slurm = _outputs(local_ws), _outputs(slurm_ws)
    assert sorted(local) == sorted(on_slurm)
    for rel, path in local.items():
        if "/embeddings/" in rel and path.suffix == ".parquet":
            assert _table(path).equals(_table(on_slurm[rel])), rel
        else:
            assert path.read_bytes() == on_slurm[rel].read_bytes(), rel
    # What was compared: the KB's parts, both splits' parts, two index shards, tables and store.
    assert len(list_parts(local_ws / "kb" / "tiny_all" / "embeddings")) >= 2
    assert sum(rel.endswith(".faissindex") for rel in local) == 2
    assert {"train.parquet", "test.parquet", "store.parquet"} <= {rel.split("/")[-1] for rel in local}

    ctld_log = (slurm / "log" / "slurmctld.log").read_text()
    allocated = set(re.findall(r"sched: Allocate JobId=(\d+)", ctld_log))
    assert len(allocated) >= 2, ctld_log[-2000:]
    joined = [p for p in (slurm / "jobs").glob("*.err") if "Registered to" in p.read_text()]
    assert joined, sorted(p.name for p in (slurm / "jobs").iterdir())
    left = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, check=True)
    deadline = time.time() + 30  # cancelled jobs take KillWait (5 s) to leave the queue
    while left.stdout.strip() and time.time() < deadline:
        time.sleep(1)
        left = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, check=True)
    assert not left.stdout.strip(), left.stdout


def _gpu_manifest(root: Path) -> Path:
    """A GPU manifest (2 GPUs, 2 workers per job) for a node without GPUs: the `--gres` line is skipped
    and the prologue exports the CUDA_VISIBLE_DEVICES SLURM's gres plugin would give the job."""
    import yaml

    path = root / "test_slurm_gpu.yaml"
    data = {
        "kind": "slurm",
        "queue": "debug",
        "cores": 2,
        "processes": 2,
        "gpus_per_job": 2,
        "memory": JOB_MEMORY,
        "walltime": "00:20:00",
        "jobs": 1,
        "log_directory": str(root / "jobs"),
        "scheduler_options": {"host": "127.0.0.1"},
        "job_directives_skip": ["--gres"],
        "job_script_prologue": ["export CUDA_VISIBLE_DEVICES=4,7"],
    }
    path.write_text(yaml.safe_dump(data))
    return path


def test_gpu_jobs_run_one_thread_and_own_gpu_per_worker(slurm):
    """Issue 21 on the real SLURM: a GPU manifest's job books all its cores (--cpus-per-task=2) but runs
    2 workers of 1 thread each, worker i on the i-th of the job's GPUs (CUDA_VISIBLE_DEVICES 4 and 7,
    read inside the workers); a CPU stage given the same manifest (gpu=False) gets one worker with the
    job's 2 cores as threads instead."""
    from retformer.pipelines.dask_runner import dask_client

    def env() -> tuple[str | None, str | None]:
        return os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("OMP_NUM_THREADS")

    manifest = _gpu_manifest(slurm)
    with dask_client(cluster=str(manifest), gpu=True) as client:
        script = client.cluster.job_script()
        client.wait_for_workers(2, timeout=240)
        nthreads = sorted(w["nthreads"] for w in client.scheduler_info()["workers"].values())
        seen = sorted(client.run(env).values())
    assert "#SBATCH --cpus-per-task=2" in script and "--nthreads 1 " in script and "gres" not in script
    assert nthreads == [1, 1]
    assert seen == [("4", "1"), ("7", "1")], seen
    with dask_client(cluster=str(manifest)) as client:  # a CPU stage: download, index, neighbors
        client.wait_for_workers(1, timeout=240)
        workers = client.scheduler_info()["workers"].values()
        assert [w["nthreads"] for w in workers] == [2]
        assert list(client.run(env).values()) == [("4,7", "2")]
