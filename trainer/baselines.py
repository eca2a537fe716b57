"""Training-free baselines over retrieval features."""

from __future__ import annotations

import torch

from retformer.trainer.features import RetrievalFeatures
from retformer.trainer.train import intra_op_threads

# A vote over at most this many (query, neighbour or class) cells runs on one CPU thread: its few
# small ops lose more at OpenMP barriers than they gain (50x slower on 2 threads than on 1 for the
# demo's 10,000 test queries on a busy 2-core machine).
SMALL_VOTE_ELEMENTS = 1 << 22


def knn_vote(
    features: RetrievalFeatures, num_classes: int | None = None, batch_size: int = 65536
) -> torch.Tensor:
    """k-NN majority vote of the retrieved KB items' labels, as (N, C) scores for `evaluate()`.

    score[c] = votes[c] + (summed cosine of the neighbors voting c + k) / (2k + 1).
    The second term is in [0, 1), so it only breaks ties between equal vote counts (higher summed
    similarity wins) and never outweighs one vote. Neighbors with label -1 (unlabelled KB rows)
    or a label outside [0, C) do not vote. A query with no labelled neighbor gets a uniform row
    (argmax falls on class 0, so it counts as wrong unless its label is 0).
    num_classes defaults to max(query label) + 1.
    """
    if num_classes is None:
        num_classes = int(features.labels.max()) + 1 if len(features) else 0
    n, k = features.nn_rows.shape
    out = torch.zeros(n, num_classes, dtype=torch.float32)
    # Small votes on one thread (scatter_add writes each row from one thread: the same values either way).
    with intra_op_threads(vote_threads(n, k, num_classes)):
        _vote(features, num_classes, batch_size, k, out)
    return out


def vote_threads(rows: int, k: int, num_classes: int) -> int | None:
    """One CPU thread for votes over at most SMALL_VOTE_ELEMENTS cells (None: torch's setting)."""
    return 1 if rows * max(k, num_classes) <= SMALL_VOTE_ELEMENTS else None


def _vote(features: RetrievalFeatures, num_classes: int, batch_size: int, k: int, out: torch.Tensor) -> None:
    n = len(out)
    for start in range(0, n, batch_size):
        rows = features.nn_rows[start : start + batch_size].cpu()
        lab = features.store_label.cpu()[rows]  # (B, k)
        sim = features.nn_score[start : start + batch_size].cpu().float()
        valid = (lab >= 0) & (lab < num_classes)
        lab = torch.where(valid, lab, torch.zeros_like(lab))
        votes = torch.zeros(len(rows), num_classes).scatter_add_(1, lab, valid.float())
        sim_sum = torch.zeros(len(rows), num_classes).scatter_add_(1, lab, torch.where(valid, sim, 0.0))
        tie = (sim_sum.clamp(-k, k) + k) / (2 * k + 1)
        # Classes without votes all get the same tie value k/(2k+1): no spurious ordering among them.
        tie = torch.where(votes > 0, tie, torch.full_like(tie, k / (2 * k + 1)))
        out[start : start + batch_size] = votes + tie


def kb_has_labels(store_label: torch.Tensor) -> bool:
    """Whether any KB item carries a label (-1 = none): a KB of web pairs has none."""
    return bool((store_label >= 0).any())


def kb_label_problem(
    store_label: torch.Tensor,
    num_classes: int,
    dataset: str,
    class_names: list[str] | None,
    kb_label_dataset: str | None,
    kb_class_names: list[str] | None,
) -> str | None:
    """Why the KB's labels cannot be voted as this dataset's classes, or None when they can.

    kb_label_dataset: the dataset whose classes label the KB (a KB manifest's `source.dataset`);
    kb_class_names: that dataset's class names (its dataset.json). Another dataset with other class
    names (Fashion-MNIST's world KB for digits) is a foreign label space, as are labels outside
    [0, num_classes) and a KB without labels."""
    if not kb_has_labels(store_label):
        return "the KB has no labels"
    labelled = store_label[store_label >= 0]
    if int(labelled.max()) >= num_classes:
        return f"the KB's labels reach {int(labelled.max())}, outside the dataset's {num_classes} classes"
    if kb_label_dataset is None or kb_label_dataset == dataset:
        return None
    if kb_class_names is None:
        return f"the KB is labelled with the classes of {kb_label_dataset}, whose class names are unknown"
    if class_names is None or list(kb_class_names) != list(class_names):
        names = ", ".join(kb_class_names[:3])
        return f"the KB's labels are classes of {kb_label_dataset} ({names}, ...), not of {dataset}"
    return None


def class_means(train: RetrievalFeatures, num_classes: int) -> torch.Tensor:
    """(C, D) unit-length mean of each class's unit-length training embeddings (the nearest-class-mean
    classifier's prototypes); a class without a labelled training image gets a zero row (never chosen
    over a class with one, whose cosine is not exactly 0 in practice)."""
    z = torch.nn.functional.normalize(train.query_img.float(), dim=1)
    y = train.labels.long()
    known = (y >= 0) & (y < num_classes)
    sums = torch.zeros(num_classes, z.shape[1]).index_add_(0, y[known], z[known])
    return torch.nn.functional.normalize(sums, dim=1)


def ncm_scores(features: RetrievalFeatures, means: torch.Tensor) -> torch.Tensor:
    """(N, C) cosine of each query's embedding with every class mean: nearest class mean, which reads
    no neighbour and weighs every class alike however many training images it has."""
    return torch.nn.functional.normalize(features.query_img.float(), dim=1) @ means.T
