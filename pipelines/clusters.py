"""Where the Dask tasks run: cluster manifests (manifests/clusters/) and the choice between them.

Three ways, one per option of every stage command (pipelines/dask_runner.py `dask_client` opens the
Client):

* `--cluster NAME|PATH`: a cluster manifest. `kind: local` is a LocalCluster on this machine (the
  default when nothing is given); `kind: slurm` submits Dask workers as SLURM jobs through
  `dask_jobqueue.SLURMCluster` (the `slurm` extra) and scales them to a fixed count or adaptively.
* `--scheduler-file PATH`: a cluster started the HPC way (`dask scheduler --scheduler-file PATH` in
  one job, `dask worker --scheduler-file PATH` in others); the Client reads the address from the file.
* `--scheduler ADDRESS`: a running scheduler, by address.

A stage writes the same output whichever of these ran its tasks: tasks are per shard / per slice and
the merges are ordered, and every worker runs its tasks single-threaded per worker thread (see
`worker_threads`), as a LocalCluster's do.

GPU jobs (`gpus_per_job: N`): N Dask workers per job, one thread and one GPU each (the preload
pipelines/gpu_worker.py gives worker i of the job the i-th of the job's GPUs), while the job still
books all its `cores` for the image loader processes. Only the embed stage uses such a cluster; the CPU
stages (download, index, neighbors) use `cpu_cluster` (a CPU manifest) or, without one, the same
jobs without GPUs, one worker per job with all its cores as threads (`cpu_spec`).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retformer.artifacts import manifest
from retformer.artifacts.errors import UserError

KINDS = ("local", "slurm")


@dataclass(frozen=True)
class ClusterSpec:
    """One cluster manifest. `local` reads `workers` and `threads_per_worker`; `slurm` the rest."""

    name: str
    kind: str = "local"
    description: str | None = None  # one line for `retformer list clusters`, as other manifests have
    # local
    workers: int | None = None  # LocalCluster worker processes (default: one per core, at most 8)
    threads_per_worker: int = 1
    # slurm: one job = `processes` Dask workers sharing `cores` cores, `memory` and `gpus_per_job` GPUs
    queue: str | None = None  # partition (#SBATCH -p)
    account: str | None = None  # #SBATCH -A
    cores: int = 1
    processes: int = 1
    memory: str = "4GB"
    walltime: str = "01:00:00"
    gpus_per_job: int = 0  # adds `--gres=gpu:N` to the job's directives
    jobs: int | None = 1  # a fixed number of jobs (ignored when `adapt` is set)
    adapt: dict[str, int] | None = None  # {minimum_jobs: , maximum_jobs: }: scale with the task queue
    job_extra_directives: list[str] = field(default_factory=list)  # more `#SBATCH` lines
    job_script_prologue: list[str] = field(default_factory=list)  # shell lines before the worker starts
    job_directives_skip: list[str] = field(default_factory=list)
    interface: str | None = None  # network interface of workers and scheduler (ib0, eth0, ...)
    local_directory: str | None = None  # worker scratch (spilling), e.g. $TMPDIR
    log_directory: str | None = None  # job stdout/stderr (default: sbatch's, the working directory)
    python: str | None = None  # the workers' python (default: the one submitting, sys.executable)
    death_timeout: float | None = 120  # seconds a worker waits for the scheduler before it exits
    scheduler_options: dict[str, Any] = field(default_factory=dict)  # passed to the Dask scheduler
    # GPU manifests: the cluster manifest (name or path) the CPU stages (download, index, neighbors) use
    cpu_cluster: str | None = None


def load_cluster(name_or_path: str, overrides: list[str] | None = None) -> ClusterSpec:
    """The cluster manifest behind a name (manifests/clusters/<name>.yaml) or a path, checked."""
    data = manifest.load("clusters", name_or_path, overrides)
    path = data.pop("_manifest_path")
    return spec_from_dict(data, source=path)


def spec_from_dict(data: dict[str, Any], source: str = "cluster manifest") -> ClusterSpec:
    """A ClusterSpec from a manifest's mapping; unknown keys and bad values are one UserError."""
    known = {f.name for f in dataclasses.fields(ClusterSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{source}: unknown keys {unknown} (known: {', '.join(sorted(known))})")
    data = dict(data)
    data.setdefault("name", Path(source).stem)
    kind = data.get("kind", "local")
    if kind not in KINDS:
        raise UserError(f"{source}: kind must be one of {', '.join(KINDS)} (got {kind!r})")
    for key in ("cores", "processes", "threads_per_worker"):
        if key in data and (not isinstance(data[key], int) or data[key] < 1):
            raise UserError(f"{source}: {key} must be an integer >= 1 (got {data[key]!r})")
    for key in ("workers", "jobs", "gpus_per_job"):
        value = data.get(key)
        if value is not None and (not isinstance(value, int) or value < 0):
            raise UserError(f"{source}: {key} must be an integer >= 0 (got {value!r})")
    gpus = data.get("gpus_per_job") or 0
    if gpus and data.get("processes", 1) != gpus:
        raise UserError(
            f"{source}: processes ({data.get('processes', 1)}) must equal gpus_per_job ({gpus}): "
            "one Dask worker per GPU"
        )
    if data.get("processes", 1) > data.get("cores", 1):
        raise UserError(f"{source}: processes ({data['processes']}) must not exceed cores ({data['cores']})")
    if data.get("adapt") is not None:
        adapt = data["adapt"]
        if not isinstance(adapt, dict) or set(adapt) - {"minimum_jobs", "maximum_jobs"}:
            raise UserError(
                f"{source}: adapt must be a mapping of minimum_jobs and maximum_jobs (got {adapt!r})"
            )
        lo, hi = int(adapt.get("minimum_jobs", 0)), int(adapt.get("maximum_jobs", 1))
        if not 0 <= lo <= hi or hi < 1:
            raise UserError(f"{source}: adapt needs 0 <= minimum_jobs <= maximum_jobs, maximum_jobs >= 1")
    for key in ("job_extra_directives", "job_script_prologue", "job_directives_skip"):
        if not isinstance(data.get(key, []), list):
            raise UserError(f"{source}: {key} must be a list of strings")
    return ClusterSpec(**data)


def worker_threads(spec: ClusterSpec) -> int:
    """Threads per Dask worker of a SLURM job: the job's cores shared between its worker processes."""
    return max(1, spec.cores // spec.processes)


def slurm_kwargs(spec: ClusterSpec) -> dict[str, Any]:
    """The `dask_jobqueue.SLURMCluster` arguments of a `kind: slurm` manifest."""
    threads = worker_threads(spec)
    directives = list(spec.job_extra_directives)
    # The same thread count per worker as a LocalCluster's workers get (OMP/MKL from the env), so
    # a task computes the same floats whichever cluster ran it.
    prologue = [f"export OMP_NUM_THREADS={threads}", f"export MKL_NUM_THREADS={threads}"]
    extra_args: list[str] = []
    if spec.gpus_per_job:
        if not any("--gres" in skip for skip in spec.job_directives_skip):  # a site booking GPUs its own
            directives.append(f"--gres=gpu:{spec.gpus_per_job}")  # way: job_extra_directives
        # One task at a time per GPU (one Dask thread), each worker on its own GPU (the preload picks
        # it from the worker's name), the worker's share of the cores for its loader processes.
        prologue += [
            f"export RETFORMER_WORKER_GPUS={spec.gpus_per_job}",
            f"export RETFORMER_WORKER_CORES={threads}",
        ]
        extra_args = ["--preload", "retformer.pipelines.gpu_worker"]
    # The dashboard shows task names and paths: loopback by default (reach it through an ssh tunnel).
    scheduler_options = {"dashboard_address": "127.0.0.1:0", **spec.scheduler_options}
    kwargs: dict[str, Any] = {
        "queue": spec.queue,
        "account": spec.account,
        # GPU jobs: `cores` would make each worker run cores/processes tasks at once on one GPU; one
        # thread per worker, and the job still books its cores (job_cpu: #SBATCH --cpus-per-task).
        "cores": spec.processes if spec.gpus_per_job else spec.cores,
        "job_cpu": spec.cores,
        "processes": spec.processes,
        "memory": spec.memory,
        "walltime": spec.walltime,
        "job_extra_directives": directives,
        "job_script_prologue": prologue + list(spec.job_script_prologue),
        "job_directives_skip": list(spec.job_directives_skip),
        "python": spec.python or sys.executable,
        "scheduler_options": scheduler_options,
        "worker_extra_args": extra_args,
    }
    for key in ("interface", "local_directory", "log_directory", "death_timeout"):
        if getattr(spec, key) is not None:
            kwargs[key] = getattr(spec, key)
    return kwargs


def cpu_spec(spec: ClusterSpec) -> ClusterSpec:
    """The cluster the CPU stages (download, index, neighbors) use for a manifest: itself without GPUs;
    for a GPU manifest its `cpu_cluster`, else the same jobs without GPUs, one worker per job with all
    the job's cores as threads (a GPU worker's one thread would crawl through faiss and downloads)."""
    if not spec.gpus_per_job:
        return spec
    if spec.cpu_cluster:
        cpu = load_cluster(spec.cpu_cluster)
        if cpu.gpus_per_job:
            raise UserError(f"cluster {spec.name}: its cpu_cluster {spec.cpu_cluster} books GPUs too")
        return cpu
    return dataclasses.replace(spec, name=f"{spec.name}-cpu", gpus_per_job=0, processes=1)


def check_job_script(script: str) -> None:
    """`sbatch --test-only` on a worker job script: a partition, account or resource SLURM refuses is
    one UserError now, instead of workers that never come while the tasks wait for them."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="retformer-job-") as f:
        f.write(script)
        f.flush()
        proc = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        reason = " ".join((proc.stderr or proc.stdout).split()) or f"exit status {proc.returncode}"
        raise UserError(f"SLURM refuses the worker job script: {reason}")


def start_slurm_cluster(spec: ClusterSpec, n_workers: int | None = None) -> Any:
    """A SLURMCluster for the manifest, scaled: to `n_workers` Dask workers when given (`--workers`),
    else adaptively between the manifest's `adapt` bounds, else to its `jobs` jobs."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise UserError(
            f"cluster {spec.name} is a SLURM cluster: install dask-jobqueue (pip install 'retformer[slurm]')"
        ) from exc
    if shutil.which("sbatch") is None:
        raise UserError(
            f"cluster {spec.name} is a SLURM cluster but sbatch is not on PATH: run on a SLURM node"
        )
    cluster = SLURMCluster(**slurm_kwargs(spec))
    try:
        check_job_script(cluster.job_script())
    except UserError:
        cluster.close()
        raise
    if n_workers:
        cluster.scale(n=n_workers)
    elif spec.adapt is not None:
        cluster.adapt(
            minimum_jobs=int(spec.adapt.get("minimum_jobs", 0)),
            maximum_jobs=int(spec.adapt.get("maximum_jobs", 1)),
        )
    else:
        cluster.scale(jobs=spec.jobs or 1)
    return cluster


def resolve_cluster(
    cluster: str | ClusterSpec | None, scheduler: str | None, scheduler_file: str | Path | None
) -> ClusterSpec | None:
    """The cluster manifest to start (None: join `scheduler` / `scheduler_file`, or a default
    LocalCluster); more than one of the three is one UserError."""
    given = [
        o
        for o, v in (("--cluster", cluster), ("--scheduler", scheduler), ("--scheduler-file", scheduler_file))
        if v
    ]
    if len(given) > 1:
        raise UserError(f"give only one of {', '.join(given)}")
    if scheduler_file and not Path(scheduler_file).is_file():
        raise UserError(
            f"scheduler file not found: {scheduler_file} (start `dask scheduler --scheduler-file`)"
        )
    if cluster is None or isinstance(cluster, ClusterSpec):
        return cluster
    return load_cluster(cluster)
