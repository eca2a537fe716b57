"""What a step trains against: label-smoothed targets, mixup's blend, and the logit adjustment of
loss="logit_adjusted" (Menon et al. 2021)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from retformer.artifacts.errors import UserError
from retformer.trainer.config import TrainConfig


def soft_targets(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Label-smoothed one-hot targets: (1 - eps) on the label plus eps / C everywhere."""
    return F.one_hot(y, num_classes).float() * (1 - smoothing) + smoothing / num_classes


def logit_adjustment(class_counts: torch.Tensor | np.ndarray | list[int], tau: float = 1.0) -> torch.Tensor:
    """tau * log(prior) per class (Menon et al. 2021), added to the logits at train time.
    Classes with no training sample are counted as 1 (log 0 would make the loss infinite)."""
    counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float64).clamp(min=1)
    return (tau * torch.log(counts / counts.sum())).float()


def mixed(own: torch.Tensor, partner: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """Mixup's lam * own + (1 - lam) * partner, as one lerp from the partner, written into `partner`
    (one pass instead of three: it was a fifth of a linear probe's step; the values differ from the
    two products and a sum in the last bit only). lam: a float, or per row, shaped to broadcast."""
    return partner.lerp_(own, lam)


def loss_adjustment(
    config: TrainConfig, class_counts: Any, labels: torch.Tensor, num_classes: int, device: torch.device
) -> torch.Tensor | None:
    """The logit adjustment added at train time (`logit_adjustment` of the class counts, counted from
    `labels` when not given), or None unless config.loss is "logit_adjusted"."""
    if config.loss != "logit_adjusted":
        return None
    if class_counts is None:
        class_counts = torch.bincount(labels.cpu(), minlength=num_classes)
    if len(class_counts) != num_classes:
        raise UserError(f"class_counts has {len(class_counts)} entries, the model has {num_classes} classes")
    return logit_adjustment(class_counts, config.la_tau).to(device)
