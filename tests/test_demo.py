"""The demo's pairing of datasets with KBs and its kNN comparison line."""

from __future__ import annotations

import pytest

from retformer.artifacts.errors import UserError
from retformer.pipelines.demo import DEFAULT_PAIRS, demo_pairs, knn_comparison


def test_demo_runs_both_development_datasets_by_default() -> None:
    """Without --dataset/--kb the demo reports Fashion-MNIST-LT and digits-LT, each with its own world KB."""
    assert demo_pairs(None, None) == list(DEFAULT_PAIRS)
    assert [d for d, _ in DEFAULT_PAIRS] == ["fmnist_lt", "digits_lt"]


def test_demo_pairs_zip_the_users_lists_and_refuse_a_mismatch() -> None:
    """--dataset/--kb given in pairs run those pairs in order; one KB too few is one clear error."""
    assert demo_pairs(["a", "b"], ["ka", "kb"]) == [("a", "ka"), ("b", "kb")]
    with pytest.raises(UserError, match="one --kb per --dataset"):
        demo_pairs(["a", "b"], ["ka"])


def test_knn_comparison_only_where_knn_voted() -> None:
    """The kNN sentence gives the signed top-1 gap, and is absent when kNN vote was skipped."""
    line = knn_comparison({"methods": {"retformer": {"top1": 0.80}, "knn_vote": {"top1": 0.83}}})
    assert line is not None and line.startswith("RetFormer vs kNN vote: -3.0 top-1")
    skipped = {"methods": {"retformer": {"top1": 0.8}, "knn_vote": {"skipped": "foreign labels"}}}
    assert knn_comparison(skipped) is None
