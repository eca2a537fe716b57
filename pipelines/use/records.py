"""Prediction records, the JSON objects `retformer predict` prints and `Run.predict` tabulates: the
class, its softmax score, the top 5, the true label where known, what retrieval did, the neighbors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from retformer.pipelines.relevance import OodThreshold
from retformer.trainer.features import RetrievalFeatures


def _neighbors(
    features: RetrievalFeatures, store: Any, kb_id: np.ndarray, i: int, shown: int
) -> list[dict[str, Any]]:
    """The first `shown` neighbors of query i: kb_id, uid, caption, similarity, label (None: none)."""
    nn = []
    for j in range(shown):
        row = int(features.nn_rows[i, j])
        nn.append(
            {
                "kb_id": int(kb_id[row]),
                "uid": str(store.uid[row]),
                "caption": store.caption[row],
                "similarity": round(float(features.nn_score[i, j]), 6),
                "label": int(store.label[row]) if store.label[row] >= 0 else None,
            }
        )
    return nn


def prediction_records(
    logits: torch.Tensor,
    features: RetrievalFeatures,
    store: Any,
    kb_id: np.ndarray,
    names: list[str],
    uids: list[str | None],
    labels: list[int | None] | None,
    class_names: list[str],
    shown: int,
    used: Any,
    s: Any,
    ood: OodThreshold,
) -> list[dict[str, Any]]:
    """One record per query: path, uid, class, class_index, score (softmax), top5 [{class, index,
    score}], label / label_class / correct (the true class where `labels` gives one in the run's
    classes, else null), retrieval_used (`used`), mean_similarity (`s`), ood, neighbors (the first
    `shown` of k, from `store`, the KB rows `features.nn_rows` index)."""
    num_classes = len(class_names)
    probs = logits.softmax(dim=1)
    # the class is the logits' argmax, as in the evaluation (ties to the lowest class index)
    classes = logits.argmax(dim=1)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    out = []
    for i, name in enumerate(names):
        order = [int(classes[i])] + [int(c) for c in top[i] if int(c) != int(classes[i])]
        top5 = [
            {"class": class_names[c], "index": c, "score": round(float(probs[i, c]), 6)}
            for c in order[: top.shape[1]]
        ]
        label = labels[i] if labels is not None else None
        label = label if label is not None and label < num_classes else None  # not one of the run's
        out.append(
            {
                "path": name,
                "uid": uids[i],
                "class": top5[0]["class"],
                "class_index": top5[0]["index"],
                "score": top5[0]["score"],
                "top5": top5,
                "label": label,
                "label_class": None if label is None else class_names[label],
                "correct": None if label is None else label == top5[0]["index"],
                "retrieval_used": bool(used[i]),
                "mean_similarity": round(float(s[i]), 6),
                "ood": ood.flag(float(s[i])),
                "neighbors": _neighbors(features, store, kb_id, i, shown),
            }
        )
    return out
