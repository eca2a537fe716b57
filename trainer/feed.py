"""What a training mode gives the epoch loop: a `Feed` of this rank's `Micro` parts of each global
micro-batch (feature mode: `trainer/feature_feed.py`; fine-tune mode: `trainer/finetune.py`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

Batch = dict[str, torch.Tensor]


@dataclass
class Micro:
    """This rank's part of one global micro-batch.

    b: its rows, `x` (the model's first input: query embeddings, or images in fine-tune mode), `y`,
    and `nn_img` / `nn_txt` when the model reads the neighbors. mix: None, or (lambda, the rows each
    row of b is mixed with: same keys). counted: the rows that count (len(b["y"]); 0 for the stand-in
    row of a rank whose part is empty, `distributed.micro_shard`). targets: None, or the label-smoothed
    targets the feed made, mixed as the loop would mix them, b's inputs then being mixed already
    (`feature_feed`: `mixed`, as the loop calls it)."""

    b: Batch
    mix: tuple[float, Batch] | None
    counted: int
    targets: torch.Tensor | None = None  # the feed's soft targets: b's inputs and these are mixed already


def split_micro(
    batch: Batch, needed_m: int, partner_at: np.ndarray | None, lam: float | None, counted: int
) -> Micro:
    """A Micro from the rows a rank loaded (`distributed.micro_shard`'s `needed`): its own first
    `needed_m` rows, the mixup partners at `partner_at`. In one process the partners are the batch
    permuted, as before: the same tensors bit for bit."""
    own = {k: v[:needed_m] for k, v in batch.items()}
    if partner_at is None or lam is None:
        return Micro(own, None, counted)
    at = torch.as_tensor(partner_at, device=batch["y"].device)
    return Micro(own, (lam, {k: v[at] for k, v in batch.items()}), counted)


@dataclass
class Feed:
    """What a training mode gives the epoch loop.

    batches(epoch) -> (GLOBAL micro-batch sizes, iterable of this rank's `Micro` parts of them, in
    order). gen / np_rng: the mode's own RNGs, saved in checkpoints (every rank draws the same).
    extra(seconds): mode-specific fields of an epoch's history entry."""

    batches: Callable[[int], tuple[list[int], Iterable[Micro]]]
    accumulate: int = 1  # micro-batches per optimizer step
    find_unused: bool = False  # some trainable parameters may sit out a forward pass (DDP must know)
    gen: torch.Generator | None = None
    np_rng: np.random.Generator | None = None
    extra: Callable[[float], dict[str, Any]] = field(default=lambda seconds: {})
