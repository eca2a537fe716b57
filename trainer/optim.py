"""The optimizer and its schedule: AdamW without decay on biases, norms, class tokens and position
embeddings; a per-step linear warm-up then cosine decay (the recipe: `trainer/train.py`'s docstring)."""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from retformer.trainer.config import TrainConfig


class WarmupCosine:
    """LR multiplier per optimizer step: linear warm-up to 1, then cosine decay to min_ratio."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps  # never 0: the first step already learns
        if self.total_steps <= self.warmup_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def steps_per_epoch(num_samples: int, batch_size: int, accumulate: int = 1) -> int:
    """Optimizer steps in one epoch (the last, smaller batch is kept), `accumulate` micro-batches a step."""
    return math.ceil(math.ceil(num_samples / batch_size) / accumulate)


def weight_decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """timm's AdamW parameter groups: no decay on 1-d parameters (biases, norms) and on the names in
    `module.no_weight_decay()` (class tokens, position embeddings), `weight_decay` on the rest."""
    skip = module.no_weight_decay() if hasattr(module, "no_weight_decay") else ()
    return param_groups_weight_decay(module, weight_decay, no_weight_decay_list=skip)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with no decay on biases, norms, class tokens and position embeddings."""
    # Decayed group first: the optimizer-state layout of the checkpoints written so far.
    return torch.optim.AdamW(weight_decay_groups(model, config.weight_decay)[::-1], lr=config.lr)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, num_samples: int, accumulate: int = 1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step warm-up + cosine schedule for `config.epochs` epochs over `num_samples` samples."""
    spe = steps_per_epoch(num_samples, config.batch_size, accumulate)
    fn = WarmupCosine(round(config.warmup_epochs * spe), config.epochs * spe, config.min_lr / config.lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
