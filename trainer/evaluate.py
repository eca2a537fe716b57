"""Accuracy metrics: top-1, top-5, per class, and many / medium / few-shot groups."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

SHOT_GROUPS = ("many", "medium", "few")


def shot_split_from_counts(
    counts: Sequence[int] | np.ndarray, many: int = 100, few: int = 20
) -> dict[str, list[int]]:
    """Class indexes by training count: > many is "many", < few is "few", the rest (few..many) "medium".

    The usual long-tail convention (Liu et al. 2019): many > 100, medium 20-100, few < 20."""
    counts = np.asarray(counts)
    return {
        "many": [int(c) for c in np.flatnonzero(counts > many)],
        "medium": [int(c) for c in np.flatnonzero((counts >= few) & (counts <= many))],
        "few": [int(c) for c in np.flatnonzero(counts < few)],
    }


def evaluate(
    logits: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    shot_split: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """Metrics of scores (N, C) against labels (N,): JSON-ready dict with

    top1, top5 (top-min(5, C) when there are fewer than 5 classes: "top5_k" says which),
    per_class (list of C accuracies, None for a class with no test sample), num_samples,
    and with a shot_split: many / medium / few = accuracy over the test samples whose label is in
    that group (None when the group has no class or no test sample), plus <group>_samples counts.
    argmax ties go to the lowest class index."""
    scores = (
        torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits).detach().cpu()
    )
    y = (
        torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if not isinstance(labels, torch.Tensor)
        else labels
    )
    y = y.detach().cpu().long()
    if scores.ndim != 2 or scores.shape[0] != y.shape[0]:
        raise ValueError(
            f"logits {tuple(scores.shape)} and labels {tuple(y.shape)} do not match (expected (N, C), (N,))"
        )
    n, c = scores.shape
    if n and (int(y.min()) < 0 or int(y.max()) >= c):
        raise ValueError(f"labels must be in [0, {c}); got range [{int(y.min())}, {int(y.max())}]")
    scores = scores.float()
    correct = scores.argmax(dim=1) == y
    k5 = min(5, c)
    in_top5 = (
        (scores.topk(k5, dim=1).indices == y[:, None]).any(dim=1) if n else torch.zeros(0, dtype=torch.bool)
    )

    per_class: list[float | None] = []
    hits = torch.bincount(y[correct], minlength=c)
    totals = torch.bincount(y, minlength=c)
    for cls in range(c):
        per_class.append(float(hits[cls] / totals[cls]) if totals[cls] else None)

    out: dict[str, Any] = {
        "num_samples": n,
        "num_classes": c,
        "top1": float(correct.float().mean()) if n else None,
        "top5": float(in_top5.float().mean()) if n else None,
        "top5_k": k5,
        "per_class": per_class,
    }
    if shot_split is not None:
        for group in SHOT_GROUPS:
            classes = torch.as_tensor(list(shot_split.get(group, [])), dtype=torch.long)
            mask = torch.isin(y, classes) if len(classes) else torch.zeros(n, dtype=torch.bool)
            count = int(mask.sum())
            out[group] = float(correct[mask].float().mean()) if count else None
            out[f"{group}_samples"] = count
    return out
