"""The use layer (pipelines/use/): what the notebook API, `retformer predict`, serve and browse share
to predict, below the orchestration and the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import torch

from retformer.pipelines.relevance import OodThreshold
from retformer.pipelines.use.records import prediction_records
from retformer.trainer.features import RetrievalFeatures
from tests.package_layout import module_file

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("artifacts", "kb_builder", "trainer", "pipelines", "retformer")
# The orchestration and the command line: what predicting must not need.
ABOVE = (
    "retformer.pipelines.stages",
    "retformer.pipelines.experiment",
    "retformer.pipelines.demo",
    "retformer.pipelines.evaluate_kb",
    "retformer.pipelines.cli",
)


def _imports(module: str) -> set[str]:
    """The project modules `module` imports (module level and inside functions)."""
    path = module_file(module)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] not in PACKAGES:
                continue
            parts = name.split(".")
            # the longest prefix that is a module of the repository
            while parts and module_file(".".join(parts)) is None:
                parts.pop()
            if parts:
                found.add(".".join(parts))
    return found


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += sorted(_imports(module) - seen)
    return seen


def test_notebook_api_and_predictor_reach_no_orchestration() -> None:
    """Following every import (also those inside functions) from `retformer.api` and from the use
    layer's Predictor reaches neither the stages, the experiment, the demo, `evaluate --kb` nor the CLI:
    predicting needs the model file, the encoder and the index only."""
    for start in ("retformer.api", "retformer.pipelines.use.predictor"):
        above = sorted(m for m in _reachable(start) if m.startswith(ABOVE))
        assert above == [], (start, above)


def _features(scores: list[list[float]], nn_rows: list[list[int]]) -> RetrievalFeatures:
    n = len(scores)
    return RetrievalFeatures(
        query_img=torch.zeros(n, 2),
        labels=torch.full((n,), -1),
        uids=[""] * n,
        nn_rows=torch.tensor(nn_rows),
        nn_score=torch.tensor(scores),
        store_img=torch.zeros(3, 2),
        store_txt=torch.zeros(3, 2),
        store_has_text=torch.zeros(3, dtype=torch.bool),
        store_label=torch.tensor([0, -1, 2]),
    )


class _Store:
    uid = np.array(["a", "b", "c"], dtype=object)
    caption = ["ca", "cb", "cc"]
    label = np.array([0, -1, 2])


def test_prediction_records_class_top5_label_and_neighbors() -> None:
    """A record's class is the logits' argmax (ties to the lowest index) with its softmax score first in
    top5; a true label outside the run's classes is null; `shown` cuts the neighbors, whose label -1
    reads null; retrieval_used, mean_similarity and ood come from what the caller measured."""
    logits = torch.tensor([[1.0, 3.0, 3.0], [2.0, 0.0, 1.0]])
    features = _features([[0.9, 0.5], [0.2, 0.1]], [[1, 2], [0, 1]])
    ood = OodThreshold(value=0.3, split="val", images=10)
    out = prediction_records(
        logits,
        features,
        _Store(),
        np.array([10, 11, 12]),
        ["x.png", "y.png"],
        [None, "u"],
        [1, 7],
        ["zero", "one", "two"],
        1,
        [True, False],
        np.array([0.7, 0.15]),
        ood,
    )
    first, second = out
    assert first["class"] == "one" and first["class_index"] == 1
    assert [t["index"] for t in first["top5"]] == [1, 2, 0]
    assert first["score"] == round(float(logits[0].softmax(0)[1]), 6)
    assert first["label"] == 1 and first["label_class"] == "one" and first["correct"] is True
    assert first["neighbors"] == [
        {"kb_id": 11, "uid": "b", "caption": "cb", "similarity": 0.9, "label": None}
    ]
    assert first["retrieval_used"] is True and first["ood"] is False and first["mean_similarity"] == 0.7
    assert second["label"] is None and second["correct"] is None and second["uid"] == "u"
    assert second["ood"] is True and second["neighbors"][0]["label"] == 0
