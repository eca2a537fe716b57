"""How a fit runs on its device: its autocast policy and its intra-op threads (the device itself is
`artifacts.devices.resolve_device`'s)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def amp_policy(enabled: bool, device: torch.device) -> tuple[bool, torch.dtype]:
    """(autocast on?, dtype): bfloat16 on CUDA where native (compute capability >= 8.0), else float16
    (with a GradScaler; emulated bf16 on a T4/V100 is slow); off on the CPU."""
    if not (enabled and device.type == "cuda"):
        return False, torch.float32
    from retformer.artifacts.devices import amp_dtype

    return True, amp_dtype(device)


# A head with at most this many parameters trains and predicts on one CPU thread (TrainConfig.threads
# = 0): its ops are too small for OpenMP to pay, and on a busy machine every op waits at a barrier for
# a descheduled thread. The demo's heads (RetFormer width 64, depth 1: 0.31 M parameters; mlp_only
# 0.17 M) ran 7-10x slower per step on 2 threads than on 1 on a 2-core machine shared with a test run
# (BENCHMARKS.md, "Trainer"); a width-256 depth-4 RetFormer (8.4 M) keeps torch's threads.
SMALL_HEAD_PARAMS = 1 << 20


def head_threads(model: nn.Module, device: torch.device, threads: int = 0) -> int | None:
    """The intra-op threads a feature-mode head runs with on `device`: `threads` when given, one for a
    small head on the CPU, else None (torch's setting is left alone)."""
    if device.type != "cpu":
        return None
    if threads:
        return threads
    return 1 if sum(p.numel() for p in model.parameters()) <= SMALL_HEAD_PARAMS else None


@contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """torch.set_num_threads(threads) inside the block, the previous count restored after it."""
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
