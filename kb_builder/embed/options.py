"""The embed loader's default width (the other `embed:` options and their defaults: the KB schema's
`EmbedSection`, kb_builder/kb_schema.py)."""

from __future__ import annotations

import os

import torch


def default_num_workers(device: str, threads: int | None = None) -> int:
    """Loader processes for one task: none when the task owns a single core (a CPU LocalCluster
    worker: a loader process would only steal the encoder's core), else a few."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.startswith("cuda"):
        # The GPU computes; the CPU only feeds it: the host's cores shared between its GPUs (all the
        # driver's GPUs: a dask-cuda worker sees only its own), or a GPU SLURM job's share per worker.
        from retformer.artifacts.devices import driver_info

        given = os.environ.get("RETFORMER_WORKER_CORES")
        share = int(given) if given else cores // max(1, torch.cuda.device_count(), len(driver_info().gpus))
        return max(0, min(8, share - 1))
    share = threads or torch.get_num_threads()
    if share <= 1 or cores <= 1:
        return 0
    # Decode + resize cost 5-20% of a CPU forward: one loader process per ~4 encoder threads.
    return min(4, max(1, share // 4))
