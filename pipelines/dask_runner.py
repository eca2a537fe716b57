"""The only fan-out: one task per shard on Dask (a LocalCluster by default, or a running cluster by
address), handed to every kb_builder `run_<stage>` as its `map_tasks` (see `task_mapper`).

Why processes and one thread per worker: every worker holds its own encoder and torch already
parallelises inside an op; a task per shard costs ~2 ms of scheduling, negligible at shard size.

Shutdown: a worker process that has loaded torch, open_clip and sentence-transformers needs 2-8 s of
interpreter teardown (module and extension finalisation; measured on the shared 2-core machine) after
Dask has closed it, more than the 4 s its nanny waits before killing it with "Worker process still
alive after 4.0 seconds, killing". `FastExit` (pipelines/worker_exit.py) lets the workers of the
clusters started here leave at once, skipping that teardown, once Dask has closed them cleanly (their
results are returned and their files renamed into place by then).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from retformer.kb_builder import MapTasks, map_inline

log = logging.getLogger(__name__)


def default_workers() -> int:
    """One worker per core, at most 8 (each holds a model in memory)."""
    return max(1, min(8, os.cpu_count() or 1))


def gpu_count() -> int:
    """Number of CUDA devices torch can use (0 without torch, CUDA or a driver torch can use)."""
    from retformer.artifacts.devices import torch_gpu_count

    return torch_gpu_count()


# The dashboard shows task names and paths: loopback only (":0" would listen on every interface).
DASHBOARD_ADDRESS = "127.0.0.1:0"


@contextmanager
def dask_client(
    scheduler: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    *,
    cluster: str | Any | None = None,
    scheduler_file: str | Path | None = None,
    gpu: bool = False,
) -> Iterator[Any]:
    """A distributed Client on one of (at most one given; pipelines/clusters.py):

    - `scheduler` (an address) or `scheduler_file` (`dask scheduler --scheduler-file`): joins it;
    - `cluster` (a manifest name, path or ClusterSpec): `kind: slurm` submits SLURM jobs
      (SLURMCluster, `n_workers` overrides the manifest's count), `kind: local` as below with the
      manifest's workers and threads;
    - nothing: a LocalCUDACluster (one worker per GPU, when `gpu`, dask-cuda and GPUs are present) or a
      CPU LocalCluster of `n_workers` processes.

    `gpu`: the tasks use a GPU (the embed stage). Only then does a GPU machine get one worker per GPU
    and a GPU SLURM manifest its GPU jobs; the other stages run on CPU workers (`clusters.cpu_spec`).
    (A machine whose GPUs torch cannot use: `stages.stage_embed` stops with one UserError first.)

    Closes what it started (a SLURMCluster cancels its jobs)."""
    from distributed import Client, LocalCluster

    from retformer.pipelines.clusters import cpu_spec, resolve_cluster, start_slurm_cluster

    spec = resolve_cluster(cluster, scheduler, scheduler_file)
    if spec is not None and not gpu and spec.gpus_per_job:
        cpu = cpu_spec(spec)
        log.info("cluster %s books GPUs: these CPU tasks run on %s", spec.name, cpu.name)
        spec = cpu
    if scheduler or scheduler_file:
        client = Client(scheduler) if scheduler else Client(scheduler_file=str(scheduler_file))
        log.info("joined Dask scheduler %s", client.scheduler.address)
        try:
            yield client
        finally:
            client.close()
        return
    cluster = None
    if spec is not None and spec.kind == "slurm":
        cluster = start_slurm_cluster(spec, n_workers)
        log.info("SLURM cluster %s: jobs submitted with\n%s", spec.name, cluster.job_script())
    elif spec is not None:
        n_workers = n_workers or spec.workers
        threads_per_worker = spec.threads_per_worker
    if cluster is None and gpu and gpu_count() > 0:
        try:
            from dask_cuda import LocalCUDACluster

            cluster = LocalCUDACluster(
                threads_per_worker=threads_per_worker, dashboard_address=DASHBOARD_ADDRESS
            )
        except ImportError:
            log.warning("GPUs present but dask-cuda is not installed (pip install 'retformer[gpu]')")
    if cluster is None:
        cluster = LocalCluster(
            n_workers=n_workers or default_workers(),
            threads_per_worker=threads_per_worker,
            processes=True,
            dashboard_address=DASHBOARD_ADDRESS,
            # Workers inherit OMP/MKL thread counts: one thread each, so workers do not oversubscribe cores.
            env={"OMP_NUM_THREADS": str(threads_per_worker), "MKL_NUM_THREADS": str(threads_per_worker)},
        )
    client = Client(cluster)
    if isinstance(cluster, LocalCluster):  # LocalCUDACluster too; not others' workers or SLURM jobs
        from retformer.pipelines.worker_exit import FastExit

        client.register_plugin(FastExit())
    log.info("Dask dashboard: %s", client.dashboard_link)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def run_tasks(
    client: Any,
    fn: Callable[..., dict],
    items: Sequence[Any],
    desc: str = "tasks",
    unit: str = "shard",
    count_key: str | None = None,
    **kwargs: Any,
) -> list[dict]:
    """Submit `fn(item, **kwargs)` per item, show a progress bar, return results in item order.

    With `count_key`, the bar's postfix also shows the summed `result[count_key]` per second
    (images/s for the embed stage). A task's exception is raised here, after the other tasks end.
    `kwargs` may not use the names `client.submit` reserves for itself (key, workers, retries, ...).
    """
    import time

    from distributed import as_completed

    if not items:
        return []
    futures = [client.submit(fn, item, pure=False, **kwargs) for item in items]
    index = {f.key: i for i, f in enumerate(futures)}
    results: list[dict | None] = [None] * len(items)
    total = 0
    start = time.perf_counter()
    from retformer.pipelines.console import progress_enabled

    with tqdm(total=len(items), desc=desc, unit=unit, disable=not progress_enabled()) as bar:
        for future in as_completed(futures):
            res = future.result()
            results[index[future.key]] = res
            if count_key:
                total += int(res.get(count_key, 0))
                bar.set_postfix({f"{count_key}/s": f"{total / max(time.perf_counter() - start, 1e-9):.1f}"})
            bar.update(1)
    return [r for r in results if r is not None]


def task_mapper(client: Any | None) -> MapTasks:
    """The `map_tasks(fn, items, desc=, unit=, count_key=, **kwargs)` of the kb_builder stages: the
    tasks on the Dask `client` with a progress bar (`run_tasks`), or in this process when it is None."""
    return map_inline if client is None else functools.partial(run_tasks, client)
