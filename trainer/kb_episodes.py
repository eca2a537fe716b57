"""The KB's labelled items as training queries ("KB episodes"): each item of the neighbour store whose
label is one of the dataset's classes joins the training split with its own top-k neighbours in the
store, itself left out.

Why: a labelled KB is labelled data the kNN votes already read at prediction; training on it too gives
the image branch and the fusion tens of thousands of (image, neighbours, label) examples where the
long-tailed split has a few per tail class, and teaches the fusion how neighbour lists relate to labels
from lists that look like the ones it sees at test (a query's neighbours, never the query itself).

The neighbours come from the store (the KB items some split's tables reference: the KB's neighbourhood
of the dataset), searched exactly on unit vectors (the cosine the tables hold) by the index stage's
`exact_ground_truth`. A KB without the dataset's labels adds nothing (`kb_label_problem` decides, as for
the votes), unless the experiment asks for the classes the items' captions name (`caption_labels`, for
web pairs; the experiment admits them on val: `pipelines.experiment_episodes`).
"""

from __future__ import annotations

from dataclasses import replace

import faiss
import numpy as np
import torch

from retformer.trainer.config import CAPTION_NULL, CAPTION_TEMP
from retformer.trainer.evidence import ClassText, caption_class_probs
from retformer.trainer.features import RetrievalFeatures

# A caption labels its item when more than half its mass names one class: the "names no class" slot
# and the runner-up together hold less.
CAPTION_MIN_PROB = 0.5


def sample_kb_items(store_label: np.ndarray, num_classes: int, max_items: int, seed: int) -> np.ndarray:
    """Store rows (ascending) of up to `max_items` items labelled with one of the dataset's classes:
    all of them when they fit, else as even a share per class as the classes allow (a class with fewer
    items gives its remainder to the others), drawn with `seed`."""
    labelled = [np.flatnonzero(store_label == c) for c in range(num_classes)]
    total = sum(len(rows) for rows in labelled)
    if total <= max_items:
        return np.sort(np.concatenate(labelled)) if total else np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    quota, left = np.zeros(num_classes, np.int64), max_items
    sizes = np.array([len(rows) for rows in labelled])
    while left > 0:  # water-filling: equal shares, capped by what each class has
        open_classes = np.flatnonzero(quota < sizes)
        share = max(left // len(open_classes), 1)
        for c in open_classes:
            take = min(share, sizes[c] - quota[c], left)
            quota[c] += take
            left -= take
            if left == 0:
                break
    picked = [rng.choice(rows, size=int(q), replace=False) for rows, q in zip(labelled, quota, strict=True)]
    return np.sort(np.concatenate(picked))


def leave_one_out_neighbors(
    store_img: torch.Tensor, rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(nn_rows (N, k) int64, nn_score (N, k) float32) of the store rows `rows` among all store rows,
    by cosine, best first, each row's own entry removed: the index stage's exact search
    (`exact_ground_truth`: faiss.contrib's knn_ground_truth for k + 1, then the row itself dropped)."""
    from retformer.kb_builder.index.search import exact_ground_truth

    vectors = store_img.numpy().astype(np.float32)  # a copy: normalised in place below
    faiss.normalize_L2(vectors)
    scores, ids = exact_ground_truth(vectors, vectors[rows], k, query_ids=rows)
    return ids, scores


def caption_labels(
    store_txt: torch.Tensor,
    class_text: ClassText | torch.Tensor,
    min_prob: float = CAPTION_MIN_PROB,
    chunk: int = 65_536,
    null: float = CAPTION_NULL,
) -> np.ndarray:
    """(M,) int64: the class each store item's caption names (`trainer.evidence.caption_class_probs`:
    text to text against the class-name prompts, centred where `class_text` has a centre, with the "names
    no class" slot at cosine `null`), or -1 where no class gets at least `min_prob` of the caption's mass
    (an unrelated caption, an ambiguous one, none)."""
    out = np.full(store_txt.shape[0], -1, np.int64)
    for start in range(0, store_txt.shape[0], chunk):  # (chunk, C) at a time: a web store has millions
        probs = caption_class_probs(store_txt[start : start + chunk], class_text, CAPTION_TEMP, null)
        best, cls = probs.max(dim=1)
        named = (best >= min_prob).numpy()
        out[start : start + len(probs)][named] = cls.numpy()[named]
    return out


def with_kb_episodes(
    train: RetrievalFeatures,
    num_classes: int,
    max_items: int,
    seed: int = 0,
    item_labels: np.ndarray | None = None,
) -> tuple[RetrievalFeatures, int]:
    """`train` with up to `max_items` labelled KB items appended as queries (uids `kb:<store row>`),
    each with its leave-one-out neighbours in the shared store; and how many were added. item_labels:
    (M,) the store items' labels for this (default: the KB's own, `store_label`; -1 = not an episode);
    the store itself is unchanged. The store must hold at least k + 1 rows."""
    labels = train.store_label.cpu().numpy() if item_labels is None else np.asarray(item_labels, np.int64)
    rows = sample_kb_items(labels, num_classes, max_items, seed)
    if len(rows) == 0 or train.store_img.shape[0] <= train.k:
        return train, 0
    nn_rows, nn_score = leave_one_out_neighbors(train.store_img.cpu(), rows, train.k)
    row_t = torch.from_numpy(rows)
    union = replace(
        train,
        query_img=torch.cat([train.query_img.float(), train.store_img[row_t].float()]),
        labels=torch.cat([train.labels, torch.from_numpy(labels[rows])]),
        uids=[*train.uids, *(f"kb:{r}" for r in rows.tolist())],
        nn_rows=torch.cat([train.nn_rows, torch.from_numpy(nn_rows)]),
        nn_score=torch.cat([train.nn_score, torch.from_numpy(nn_score)]),
    )
    return union, len(rows)


# The deep-kNN filter's neighbourhood and how many of it must share an item's label. "Plurality" (keep
# where the label is the neighbours' commonest) was tried first and dropped: it also dropped a third of
# the right labels of confusable classes (Fashion-MNIST's shirts), cost Fashion-MNIST's mlp_only val and
# the probe's val on every dataset (docs/method-notes.md, "tenth round").
KNN_FILTER_K = 10
KNN_FILTER_MIN_AGREE = 2


def knn_agreeing_labels(
    store_img: torch.Tensor,
    item_labels: np.ndarray,
    train_img: torch.Tensor,
    train_labels: torch.Tensor,
    rows: np.ndarray | None = None,
    k: int = KNN_FILTER_K,
    min_agree: int = KNN_FILTER_MIN_AGREE,
) -> np.ndarray:
    """`item_labels` with -1 where fewer than `min_agree` of an item's k nearest images (cosine; the other
    store items and the training images) carry its label: a kNN filter for noisy labels (after Bahri et
    al. 2020, "Deep k-NN for noisy labels"). KB labels come from alt-text or captions (a fifth of the world
    KB's name a wrong class), and a wrong label sits among images of the true class, where almost none of
    its neighbours carry it. rows: the store rows to judge (default: every labelled one; the others come
    back -1), so a web-scale store costs one exact search of the items that may join. Unlabelled items
    (-1) stay -1. The search is the index stage's exact one (`exact_ground_truth`, GPUs where present)."""
    from retformer.kb_builder.index.search import exact_ground_truth

    labels = np.asarray(item_labels, np.int64)
    judged = np.flatnonzero(labels >= 0) if rows is None else np.asarray(rows, np.int64)
    judged = judged[labels[judged] >= 0]
    out = np.full(len(labels), -1, np.int64)
    if len(judged) == 0:
        return out
    pool = torch.cat([store_img.float(), train_img.float()]).numpy()  # a new array: normalised in place
    pool_labels = np.concatenate([labels, train_labels.cpu().numpy().astype(np.int64)])
    faiss.normalize_L2(pool)
    _, ids = exact_ground_truth(pool, pool[judged], min(k, len(pool) - 1), query_ids=judged)
    agree = ((pool_labels[ids] == labels[judged][:, None]) & (ids >= 0)).sum(axis=1)
    keep = judged[agree >= min_agree]
    out[keep] = labels[keep]
    return out


def class_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    """Training images per class (labels < 0 not counted): the prior a trained head learns."""
    known = labels[labels >= 0].long()
    return torch.bincount(known, minlength=num_classes)[:num_classes].tolist()
