"""What retrieval did for each image the browser shows: its relevance s, whether the model's rule used
retrieval for it, the image-only prediction, and whether retrieval helped, hurt or changed nothing.

- s and the rule's use of retrieval are `pipelines.relevance`'s (`mean_similarity`, `retrieval_applied`:
  the stacked rule adds its retrieval term where s > gate_t, `RetFormer.combine`);
- the image-only prediction is L_I, `RetFormer.branches`' first output, with the rule's prior adjustment
  (L_I - prior_tau log prior, as `combine` applies it under the stacked recipe); a model without a
  fusion module (mlp_only, linear_probe) is image-only already: its own prediction;
- the effect: "helped" where the model is right and L_I wrong, "hurt" the reverse, "same" where both
  are right or both wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from retformer.pipelines.relevance import mean_similarity, retrieval_applied
from retformer.trainer.feature_batches import map_batches
from retformer.trainer.features import RetrievalFeatures

EFFECTS = ("helped", "hurt", "same")
RULE_KEYS = ("recipe", "alpha", "beta", "gate_t", "image_weight", "prior_tau")
_BATCH = 1024  # images per L_I batch


@dataclass
class RetrievalEffect:
    """Per image (the features' order): s, used, image_pred and effect; `rule`: the model's rule keys
    (None for a model without a fusion module)."""

    s: np.ndarray
    used: np.ndarray
    image_pred: np.ndarray
    effect: np.ndarray
    rule: dict[str, Any] | None


@torch.inference_mode()
def image_only_logits(model: nn.Module, features: RetrievalFeatures) -> torch.Tensor:
    """(N, C) L_I of a RetFormer in eval mode: `branches(...)[0]`, minus prior_tau log prior under the
    stacked recipe (what `combine` starts from)."""
    cfg = model.config

    def image_only(b: dict[str, torch.Tensor]) -> torch.Tensor:
        logits_i = model.branches(b["z"], b["nn_img"], b["nn_txt"], b.get("nn_label"))[0]
        if cfg["recipe"] == "stacked" and float(cfg["prior_tau"]):
            logits_i = logits_i - float(cfg["prior_tau"]) * model.log_prior.to(logits_i)
        return logits_i.float().cpu()

    return map_batches(features, image_only, _BATCH, lambda: torch.zeros(0, int(cfg["num_classes"])))


def effects(correct: np.ndarray, image_correct: np.ndarray) -> np.ndarray:
    """(N,) "helped" / "hurt" / "same" from the model's and L_I's correctness."""
    out = np.full(len(correct), "same", dtype=object)
    out[correct & ~image_correct] = "helped"
    out[~correct & image_correct] = "hurt"
    return out


def retrieval_effect(
    model: nn.Module, features: RetrievalFeatures, pred: np.ndarray, labels: np.ndarray
) -> RetrievalEffect:
    """The columns of `RetrievalEffect` for `model` (eval mode) whose predictions are `pred`."""
    from retformer.trainer.model import RetFormer

    s = mean_similarity(features)
    used = retrieval_applied(model, s).numpy()
    if isinstance(model, RetFormer):
        image_pred = image_only_logits(model, features).argmax(dim=1).numpy()
        rule = {key: model.config.get(key) for key in RULE_KEYS}
    else:
        image_pred, rule = np.asarray(pred).copy(), None
    correct = np.asarray(pred) == labels
    return RetrievalEffect(s.numpy(), used, image_pred, effects(correct, image_pred == labels), rule)


def retrieval_reason(rule: dict[str, Any] | None, s: float, used: bool) -> str:
    """Why the rule did or did not use retrieval for an image with relevance s, in a few words."""
    if rule is None:
        return "no retrieval branch: the model reads the image alone"
    if rule["recipe"] == "paper":
        return "always: the paper's recipe adds L_R to every image"
    if not (float(rule["alpha"]) or float(rule["beta"])):
        return "never: the selected rule has alpha = beta = 0 (L_I alone)"
    if rule["gate_t"] is None:
        return "always: the selected rule has no gate"
    t = float(rule["gate_t"])
    return f"s = {s:.3f} > t = {t:.3f}" if used else f"s = {s:.3f} <= t = {t:.3f}: L_I alone"
