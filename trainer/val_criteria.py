"""The val criteria every selection maximises (`select.select_metric`) and the val figures it records."""

from __future__ import annotations

from typing import Any

import torch

from retformer.trainer.evaluate import evaluate
from retformer.trainer.evidence import balanced_accuracy


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy as a fraction, rounded to 6 decimals like every recorded figure (argmax ties to
    the lowest class, as `evaluate`)."""
    return round(float((logits.argmax(dim=1) == labels.to(logits.device)).float().mean()), 6)


METRICS = {"balanced": balanced_accuracy, "top1": top1}


def criterion(name: str) -> Any:
    """The val criterion `select_metric` names: (logits, labels) -> float."""
    return METRICS[name]


def val_metrics(logits: torch.Tensor, labels: torch.Tensor, shot_split: dict | None) -> dict[str, Any]:
    """The val figures a result records: top1, top5, many / medium / few."""
    m = evaluate(logits, labels, shot_split)
    return {k: m.get(k) for k in ("top1", "top5", "many", "medium", "few")}
