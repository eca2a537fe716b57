"""The manifest's `embed:` section as `embed_shard` options, and the loader's default width."""

from __future__ import annotations

import os
from typing import Any

import torch


def embed_options(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """Keyword options for `embed_shard` from a manifest's `embed:` section, checked against the KB
    schema's `EmbedSection` (one home for the allowed keys and ranges; a typo gets "did you mean").

    `batch_size` (images per forward, default 256), `num_workers` (loader processes per task; default
    0 on a one-core worker, else a few), `threads` (torch threads of the task), `prefetch_factor`
    (batches each loader worker keeps ready, default 2), `device` ("cpu", "cuda", "cuda:1"; default:
    cuda when available).
    """
    from retformer.artifacts.schema import dump_given, validate_section
    from retformer.kb_builder.kb_schema import EmbedSection

    section = validate_section(EmbedSection, dict(cfg or {}), "embed")
    return {key: value for key, value in dump_given(section).items() if value is not None}


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
