"""Accuracy metrics: top-1, top-5, per class, macro-F1, worst class, many / medium / few-shot groups, and
the per-sample predictions table (`prediction_table`)."""

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
    macro_f1 (scikit-learn's, over the classes that occur among the labels or the predictions: a class
    absent from both says nothing), worst_class (the lowest per-class accuracy over the classes with test
    samples) and worst_class_index (that class; the lowest index on a tie),
    and with a shot_split: many / medium / few = accuracy over the test samples whose label is in
    that group (None when the group has no class or no test sample), plus <group>_samples counts.
    argmax ties go to the lowest class index."""
    scores, y = _tensors(logits, labels)
    if scores.ndim != 2 or scores.shape[0] != y.shape[0]:
        raise ValueError(
            f"logits {tuple(scores.shape)} and labels {tuple(y.shape)} do not match (expected (N, C), (N,))"
        )
    n, c = scores.shape
    if n and (int(y.min()) < 0 or int(y.max()) >= c):
        raise ValueError(f"labels must be in [0, {c}); got range [{int(y.min())}, {int(y.max())}]")
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

    present = [(acc, cls) for cls, acc in enumerate(per_class) if acc is not None]
    worst = min(present) if present else (None, None)
    out: dict[str, Any] = {
        "num_samples": n,
        "num_classes": c,
        "top1": float(correct.float().mean()) if n else None,
        "top5": float(in_top5.float().mean()) if n else None,
        "top5_k": k5,
        "per_class": per_class,
        "macro_f1": _macro_f1(y, scores.argmax(dim=1)) if n else None,
        "worst_class": worst[0],
        "worst_class_index": worst[1],
    }
    if shot_split is not None:
        for group in SHOT_GROUPS:
            classes = torch.as_tensor(list(shot_split.get(group, [])), dtype=torch.long)
            mask = torch.isin(y, classes) if len(classes) else torch.zeros(n, dtype=torch.bool)
            count = int(mask.sum())
            out[group] = float(correct[mask].float().mean()) if count else None
            out[f"{group}_samples"] = count
    return out


def _tensors(scores: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 scores, int64 labels) on the CPU, from tensors, arrays or lists."""
    s = scores if isinstance(scores, torch.Tensor) else torch.as_tensor(np.asarray(scores))
    y = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    return s.detach().cpu().float(), y.detach().cpu().long()


def _macro_f1(y: torch.Tensor, pred: torch.Tensor) -> float:
    """Mean F1 over the classes that occur in the labels or the predictions (scikit-learn's
    `f1_score(average="macro", zero_division=0)`, tested equal): counted here, because importing
    scikit-learn's metrics costs ~1 s in a process that has not yet."""
    c = int(max(int(y.max()), int(pred.max()))) + 1
    tp = torch.bincount(y[y == pred], minlength=c).double()
    support, predicted = torch.bincount(y, minlength=c).double(), torch.bincount(pred, minlength=c).double()
    present = (support + predicted) > 0
    f1 = 2 * tp / (support + predicted).clamp(min=1)  # 2tp / (2tp + fp + fn); 0 where neither occurs
    return float(f1[present].mean())


def shot_group_of(shot_split: dict[str, list[int]] | None, num_classes: int) -> list[str | None]:
    """The shot group ("many" / "medium" / "few") of each class index; None where no group has it."""
    groups: list[str | None] = [None] * num_classes
    for group in SHOT_GROUPS:
        for cls in (shot_split or {}).get(group, []):
            if 0 <= int(cls) < num_classes:
                groups[int(cls)] = group
    return groups


def prediction_table(
    scores: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    uids: Sequence[str] | None = None,
    shot_split: dict[str, list[int]] | None = None,
) -> Any:
    """One row per sample, in input order, as a pyarrow Table: index, uid, label, pred, score (the
    winning class's raw score), prob (its softmax probability), correct, shot_group (of the true label;
    null without a shot split). Predictions are argmax, ties to the lowest class, as in `evaluate`."""
    import pyarrow as pa

    s, y = _tensors(scores, labels)
    n = s.shape[0]
    if s.ndim != 2 or y.shape[0] != n or (uids is not None and len(uids) != n):
        raise ValueError(f"scores {tuple(s.shape)}, labels {tuple(y.shape)} and uids do not match")
    pred = s.argmax(dim=1) if n else torch.zeros(0, dtype=torch.long)
    top = s.gather(1, pred[:, None])[:, 0] if n else torch.zeros(0)
    prob = torch.softmax(s, dim=1).gather(1, pred[:, None])[:, 0] if n else torch.zeros(0)
    groups = shot_group_of(shot_split, s.shape[1])
    return pa.table(
        {
            "index": pa.array(np.arange(n, dtype=np.int64)),
            "uid": pa.array(list(uids) if uids is not None else [None] * n, type=pa.string()),
            "label": pa.array(y.numpy().astype(np.int64)),
            "pred": pa.array(pred.numpy().astype(np.int64)),
            "score": pa.array(top.numpy().astype(np.float32)),
            "prob": pa.array(prob.numpy().astype(np.float32)),
            "correct": pa.array((pred == y).numpy()),
            "shot_group": pa.array(
                [groups[int(v)] if 0 <= int(v) < len(groups) else None for v in y], type=pa.string()
            ),
        }
    )
