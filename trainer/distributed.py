"""Training on several processes (`torchrun`): the process group, who writes, and how a batch is split.

`retformer train` under `torchrun --nproc_per_node N` trains every model with N processes. What every
rank does the same way, and why the result equals one process's (within float rounding):

- every rank draws the same seeded order and the same mixup draws for each GLOBAL micro-batch
  (`config.batch_size` samples, as in one process), then computes its own contiguous part of it
  (`micro_shard`): the ranks' parts are the single-process batch cut in N;
- the loss of a part is weighted by its share of the optimizer step's samples and DDP averages the
  gradients over the ranks, so the summed gradient is the one-process gradient of the whole batch;
- mixup pairs a sample with another one of the global batch, which may sit in another rank's part:
  a rank also gathers (feature mode) or decodes (fine-tune mode) the partner rows of its samples;
- evaluation is whole on every rank in feature mode (cheap), sharded by batches and gathered in
  fine-tune mode; every rank then holds the same figures and makes the same selection choices;
- only rank 0 writes (checkpoints, model files, metrics, eval.json, report) and prints progress; a
  checkpoint holds nothing that depends on the number of processes, so it resumes on any.

Without WORLD_SIZE (or with 1) nothing here starts a process group and every helper is a no-op:
one process trains exactly as before.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from retformer.artifacts.errors import UserError

T = TypeVar("T")


def active() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    """Number of training processes (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Whether this process is rank 0: the one that writes files and prints progress."""
    return rank() == 0


def local_rank() -> int:
    """This process's rank on its machine (torchrun's LOCAL_RANK; 0 without one)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(timeout_s: float | None = None) -> bool:
    """Join the process group `torchrun` describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the
    environment); True when training is now distributed. No-op (False) when WORLD_SIZE is unset or 1,
    and when the group is already up (then True). Backend: gloo for CPU tensors, plus NCCL for CUDA
    tensors where this machine has a GPU for each of its processes (process LOCAL_RANK then uses GPU
    LOCAL_RANK); with fewer GPUs than processes, gloo alone (CPU training).

    timeout_s: how long a rank waits for the others in one collective (default RETFORMER_DIST_TIMEOUT_S,
    else 1800 s); rank 0 waiting for another run's lock on the run folder counts."""
    if dist.is_available() and dist.is_initialized():
        return active()
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return False
    if not dist.is_available():
        raise UserError("WORLD_SIZE is set but this torch build has no torch.distributed")
    backend = "gloo"
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if torch.cuda.is_available() and local_world <= torch.cuda.device_count():
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"  # collectives on CPU tensors (objects, CPU runs) go through gloo
    if timeout_s is None:
        timeout_s = float(os.environ.get("RETFORMER_DIST_TIMEOUT_S", "1800"))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    atexit.register(shutdown)
    return True


def shutdown() -> None:
    """Leave the process group (registered at exit by init_from_env)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(device: torch.device) -> torch.device:
    """A CUDA device without an index means this process's GPU (LOCAL_RANK) when distributed; UserError
    when this machine has fewer GPUs than training processes, and for an explicit index (`cuda:0`
    would put every process on the same GPU)."""
    if device.type == "cuda" and device.index is not None and active():
        raise UserError(
            f"train.device is {device} under torchrun: every process would use that one GPU; "
            "set it to cuda or auto (process LOCAL_RANK then uses GPU LOCAL_RANK)"
        )
    if device.type == "cuda" and device.index is None and active():
        if local_rank() >= torch.cuda.device_count():
            raise UserError(
                f"training process {local_rank()} on this machine has no GPU of its own "
                f"({torch.cuda.device_count()} GPU(s)): start one process per GPU (torchrun --nproc_per_node)"
            )
        return torch.device("cuda", local_rank())
    return device


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if active():
        dist.barrier()


def broadcast(value: T) -> T:
    """Rank 0's `value` on every rank (any picklable object; no-op in one process)."""
    if not active():
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_main(fn: Callable[[], T]) -> T:
    """fn() run on rank 0 only, its result on every rank: decisions that read or change files (resume or
    start over) are taken once. A UserError (or another exception) on rank 0 is raised on every rank
    as a UserError with the same message, so no rank is left waiting for the others."""
    if not active():
        return fn()
    outcome: tuple[str, Any] = ("ok", None)
    if is_main():
        try:
            outcome = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks heard of it
            broadcast(("error", str(exc)))
            raise
    kind, value = broadcast(outcome)
    if kind == "error":
        raise UserError(value)
    return value


def all_gather(value: T) -> list[T]:
    """Every rank's `value`, in rank order (one process: [value])."""
    if not active():
        return [value]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, value)
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the ranks, in place (no-op in one process)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def wrap(model: nn.Module, device: torch.device, find_unused: bool = False) -> nn.Module:
    """The module the training step calls: DistributedDataParallel around `model` when distributed
    (gradients averaged over the ranks during backward), else `model` itself. find_unused: some
    trainable parameters may take no part in the forward pass (a KB encoder's classifier layer in
    fine-tune mode); the heads use all of theirs."""
    if not active() or not any(p.requires_grad for p in model.parameters()):
        return model
    # A class token's gradient arrives as an expanded view; DDP copies it into its bucket either way.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


@contextlib.contextmanager
def no_sync(net: nn.Module, skip: bool) -> Iterator[None]:
    """DDP's no_sync() while `skip` (micro-batches before the last one of an accumulated step)."""
    if skip and isinstance(net, nn.parallel.DistributedDataParallel):
        with net.no_sync():
            yield
    else:
        yield


def shard_bounds(size: int, r: int | None = None, w: int | None = None) -> tuple[int, int]:
    """[lo, hi): rank r's contiguous part of `size` items cut into w near-equal parts (sizes differ by
    at most one; ranks past `size` get an empty part)."""
    r = rank() if r is None else r
    w = world() if w is None else w
    return size * r // w, size * (r + 1) // w


def micro_shard(
    size: int, partner: np.ndarray | torch.Tensor | None = None, r: int | None = None, w: int | None = None
) -> tuple[np.ndarray, int, np.ndarray | None, int]:
    """What rank r computes of a global micro-batch of `size` samples whose mixup pairs sample i with
    `partner[i]` (None: no mixup).

    Returns (needed, m, partner_at, counted): `needed` are the batch positions to load, this rank's own
    `m` samples first (in batch order), then the partners among the other ranks' samples (sorted);
    `partner_at[j]` is where own sample j's partner lies in `needed`; `counted` is m, or 0 when the
    rank's part is empty (a batch smaller than the world): it then computes one stand-in sample with
    weight 0, because DDP needs every rank in every backward pass. In one process: needed =
    0..size-1, m = size, partner_at = partner."""
    if (world() if w is None else w) == 1:  # one process: no numpy set arithmetic per micro-batch
        return np.arange(size), size, None if partner is None else np.asarray(partner), size
    lo, hi = shard_bounds(size, r, w)
    counted = hi - lo
    if counted == 0:
        lo, hi = size - 1, size
    own = np.arange(lo, hi)
    if partner is None:
        return own, len(own), None, counted
    wanted = np.asarray(partner)[lo:hi]
    others = np.setdiff1d(wanted, own)  # sorted, unique
    needed = np.concatenate([own, others])
    at = np.full(size, -1, dtype=np.int64)
    at[needed] = np.arange(len(needed))
    return needed, len(own), at[wanted], counted
