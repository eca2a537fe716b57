"""A finished experiment's retrieval diagnostics, recorded in eval.json under `diagnostics` (issue 18):
for the selected RetFormer on the eval split, the attention figures and the share of images where its
rule used retrieval (`trainer.diagnostics`); for every method with a predictions file, accuracy against
neighbour-class agreement; per class, RetFormer minus mlp_only."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from retformer.pipelines.runs import read_predictions
from retformer.trainer.checkpoint import load_model
from retformer.trainer.diagnostics import (
    agreement_accuracy,
    attention_stats,
    neighbour_classes,
    retrieval_share,
)
from retformer.trainer.evidence import ClassText
from retformer.trainer.model import RetFormer

log = logging.getLogger(__name__)

# Methods whose accuracy the agreement table shows, where the run has them.
AGREEMENT_METHODS = ("mlp_only", "knn_vote", "knn_weighted", "caption_vote", "retformer")


def _correct(run_dir: Path, result: str) -> torch.Tensor | None:
    table = read_predictions(run_dir, result, ["correct"])
    return None if table is None else torch.as_tensor(table.column("correct").to_numpy(), dtype=torch.bool)


def diagnose(
    run_dir: Path,
    features: Any,
    results: dict[str, Any],
    num_classes: int,
    class_text: ClassText | None,
    evidence_kind: str | None,
) -> dict[str, Any]:
    """The diagnostics of a run whose eval split's features (at the run's k) are `features`;
    evidence_kind: "label" where the KB's labels are the dataset's classes, "caption" where captions
    are read with `class_text`, None otherwise."""
    classes = neighbour_classes(features, num_classes, class_text, evidence_kind)
    out: dict[str, Any] = {"neighbour_class_from": evidence_kind}
    correct = {m: c for m in AGREEMENT_METHODS if m in results and (c := _correct(run_dir, m)) is not None}
    if correct and evidence_kind is not None:
        out["agreement"] = agreement_accuracy(features, classes, correct)
    model_file = run_dir / "retformer.pt"
    if model_file.is_file() and "top1" in results.get("retformer", {}):
        model = load_model(model_file)
        if isinstance(model, RetFormer) and model.use_img:
            out["attention"] = attention_stats(model, features, classes)
            out["rule"] = {
                key: model.config.get(key)
                for key in (
                    "alpha",
                    "beta",
                    "gate_t",
                    "prior_tau",
                    "evidence",
                    "vote_temp",
                    "vote_k",
                    "image_weight",
                )
            }
            out["rule"]["retrieval_share"] = retrieval_share(model, features)
            out["query_bias"] = bool(model.config.get("query_bias"))
    ours, base = results.get("retformer", {}), results.get("mlp_only", {})
    if ours.get("per_class") and base.get("per_class"):
        out["per_class_minus_mlp_only"] = [
            None if a is None or b is None else a - b
            for a, b in zip(ours["per_class"], base["per_class"], strict=True)
        ]
    return out
