"""Nearest class mean (`ncm`): the training-free long-tail baseline on the frozen embeddings."""

from __future__ import annotations

from pathlib import Path

import torch

from retformer.trainer.baselines import class_means, ncm_scores
from retformer.trainer.features import RetrievalFeatures
from tests.test_selection import EXPERIMENT, run


def _features(z: list[list[float]], labels: list[int]) -> RetrievalFeatures:
    n = len(z)
    return RetrievalFeatures(
        query_img=torch.tensor(z),
        labels=torch.tensor(labels),
        uids=[f"q{i}" for i in range(n)],
        nn_rows=torch.zeros(n, 1, dtype=torch.long),
        nn_score=torch.ones(n, 1),
        store_img=torch.ones(1, 2),
        store_txt=torch.zeros(1, 2),
        store_has_text=torch.zeros(1, dtype=torch.bool),
        store_label=torch.zeros(1, dtype=torch.long),
    )


def test_class_means_weigh_every_class_alike_and_skip_unknown_labels() -> None:
    """Proves the prototypes are the unit mean of unit embeddings: a head class of 100 images and a tail
    class of one image each get one prototype (so a query between them goes to the nearer, not to the
    larger); a label of -1 is not counted; a class without images has a zero row."""
    head = [[1.0, 0.1 * (i % 3)] for i in range(100)]
    train = _features(head + [[0.0, 2.0], [5.0, 5.0]], [0] * 100 + [1, -1])
    means = class_means(train, 3)
    assert torch.allclose(means.norm(dim=1), torch.tensor([1.0, 1.0, 0.0]))
    assert torch.allclose(means[1], torch.tensor([0.0, 1.0]))
    query = _features([[0.45, 0.55]], [1])  # nearer the tail class's direction
    scores = ncm_scores(query, means)
    assert int(scores.argmax(1)) == 1 and float(scores[0, 2]) == 0.0


def test_ncm_runs_as_a_method_with_its_val_figure_and_reads_no_neighbour(tmp_path: Path) -> None:
    """Proves `ncm` runs through an experiment like the votes: a test and a val figure (well above chance
    on the synthetic clusters), nothing selected, no shuffled-neighbour control (it reads no neighbour)."""
    exp = {**EXPERIMENT, "methods": ["ncm", "knn_vote"]}
    rep = run(tmp_path, exp)["methods"]
    ncm = rep["ncm"]
    assert 0.0 <= ncm["top1"] <= 1.0 and ncm["val"]["top1"] > 0.5 and ncm["mode"] == "vote"
    assert "selected" not in ncm and "ncm:shuffled" not in rep
