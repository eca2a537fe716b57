"""Dask worker preload of GPU SLURM jobs (`dask worker --preload pipelines.gpu_worker`, added by
pipelines/clusters.py `slurm_kwargs` when a manifest has `gpus_per_job`): each worker process of the job
takes its own GPU.

A job of N GPUs runs `dask worker --nworkers N`, whose workers are named `<job name>-<i>`, i = 0..N-1,
and all inherit the job's CUDA_VISIBLE_DEVICES (SLURM sets it to the job's GPUs, e.g. "3,5"). Before
anything touches CUDA, worker i keeps only the i-th entry of that list (or GPU i when SLURM set none),
so torch and faiss in that worker see exactly one GPU, as dask-cuda's workers do. The job script
exports RETFORMER_WORKER_GPUS=N; without it (a CPU job) this does nothing.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def worker_gpu(name: str, gpus: int, visible: str | None) -> str:
    """The CUDA_VISIBLE_DEVICES of worker `name` in a job of `gpus` workers / GPUs."""
    index = 0
    if gpus > 1:
        suffix = str(name).rsplit("-", 1)[-1]
        if not suffix.isdigit() or int(suffix) >= gpus:
            raise RuntimeError(f"GPU worker {name!r}: expected a name ending in -0..-{gpus - 1}")
        index = int(suffix)
    listed = [e.strip() for e in (visible or "").split(",") if e.strip()]
    if visible is None or not listed:
        return str(index)
    if index >= len(listed):
        raise RuntimeError(
            f"GPU worker {name!r}: the job shows {len(listed)} GPU(s) (CUDA_VISIBLE_DEVICES={visible}) "
            f"for {gpus} workers"
        )
    return listed[index]


def dask_setup(worker) -> None:  # noqa: ANN001 - distributed's preload hook
    gpus = int(os.environ.get("RETFORMER_WORKER_GPUS", "0") or 0)
    if gpus < 1:
        return
    gpu = worker_gpu(str(worker.name), gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    log.info("worker %s: CUDA_VISIBLE_DEVICES=%s", worker.name, gpu)
