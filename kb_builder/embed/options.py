"""The manifest's `embed:` section, checked so that a typo is an error, and the loader's default width."""

from __future__ import annotations

import os
from typing import Any

import torch

from artifacts.errors import UserError

EMBED_OPTIONS = ("batch_size", "num_workers", "threads", "prefetch_factor", "device")


def embed_options(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """Validated keyword options for `embed_shard` from a manifest's `embed:` section.

    `batch_size` (images per forward, default 256), `num_workers` (loader processes per task; default
    0 on a one-core worker, else a few), `threads` (torch threads of the task), `prefetch_factor`
    (batches each loader worker keeps ready, default 2), `device` ("cpu", "cuda", "cuda:1"; default:
    cuda when available).
    """
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(EMBED_OPTIONS))
    if unknown:
        raise UserError(
            f"embed: unknown option(s) {', '.join(unknown)} (allowed: {', '.join(EMBED_OPTIONS)})"
        )
    out: dict[str, Any] = {}
    for key, minimum in (("batch_size", 1), ("num_workers", 0), ("threads", 1), ("prefetch_factor", 1)):
        value = cfg.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UserError(f"embed.{key} must be an integer >= {minimum}, got {value!r}")
        out[key] = value
    device = cfg.get("device")
    if device is not None:
        if not isinstance(device, str) or device.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise UserError(f"embed.device must be cpu, cuda, cuda:N or mps, got {device!r}")
        out["device"] = device
    return out


def default_num_workers(device: str, threads: int | None = None) -> int:
    """Loader processes for one task: none when the task owns a single core (a CPU LocalCluster
    worker: a loader process would only steal the encoder's core), else a few."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.startswith("cuda"):
        # The GPU computes; the CPU only feeds it: the host's cores shared between its GPUs.
        share = cores // max(1, torch.cuda.device_count())
        return max(0, min(8, share - 1))
    share = threads or torch.get_num_threads()
    if share <= 1 or cores <= 1:
        return 0
    # Decode + resize cost 5-20% of a CPU forward: one loader process per ~4 encoder threads.
    return min(4, max(1, share // 4))
