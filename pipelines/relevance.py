"""What a prediction record says about retrieval, per image (pipelines/use/records.py):

- `mean_similarity`: s, the mean cosine between the query image and its k neighbours' images
  (`trainer.model.relevance`, the value RetFormer's stacked rule gates on);
- `retrieval_used`: whether the model's rule added its retrieval term for this image. The stacked rule
  is L_I - prior_tau log prior + 1[s > gate_t] (alpha L_R + beta log e) (`RetFormer.combine`): false
  where alpha = beta = 0 or s <= gate_t; the paper's recipe tau/2 (L_I + L_R) always uses it; models
  without a fusion module (mlp_only, linear_probe) never do;
- `ood`: s below the 1st percentile of s over the run's val images (`OOD_PERCENTILE`), read from the
  run's own val neighbour table when the predictor first needs it. An image whose neighbours are less
  alike than those of 99% of the val images is one the KB knows little about: on the demo's
  Fashion-MNIST run val images score 0.85-0.92 and a hand-drawn t-shirt 0.61.

Why a percentile of val and not a fixed number: s depends on the encoder and the KB (the demo's
EfficientNet at 64 px and a CLIP ViT live on different cosine scales), and val is the split every other
choice of the run is made on. About 1% of in-distribution images are flagged by construction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from retformer.artifacts.errors import UserError
from retformer.artifacts.workspace import Workspace
from retformer.trainer.features import RetrievalFeatures

log = logging.getLogger(__name__)

OOD_PERCENTILE = 1.0  # % of the reference split's images below the threshold (flagged although normal)
_BATCH = 1024  # queries per relevance batch: (B, k, D) float32 neighbour vectors at a time


@torch.inference_mode()
def mean_similarity(features: RetrievalFeatures) -> torch.Tensor:
    """s (N,) float32: each query's mean cosine to its neighbours' image vectors (all of features' k),
    computed by `trainer.model.relevance` on the vectors the model reads."""
    from retformer.trainer.model import relevance

    out = [torch.zeros(0)]
    for start in range(0, len(features), _BATCH):
        rows = features.nn_rows[start : start + _BATCH]
        z = features.query_img[start : start + _BATCH].float()
        out.append(relevance(z, features.store_img[rows].float()).cpu())
    return torch.cat(out)


def retrieval_applied(model: nn.Module, s: torch.Tensor) -> torch.Tensor:
    """(N,) bool: whether `model` (eval mode) added its retrieval term to the prediction of each image
    whose relevance is `s` (see the module doc). A fine-tuned model is judged by its head."""
    from retformer.trainer.model import RetFormer

    config = getattr(model, "config", {}) or {}
    # FinetuneModel wraps the head (RetFormer has a `head` too: its linear h, not a wrapper)
    head = model.head if config.get("kind") == "finetune" else model
    if not isinstance(head, RetFormer):
        return torch.zeros(len(s), dtype=torch.bool)
    cfg = head.config
    alpha, beta, gate_t = float(cfg["alpha"]), float(cfg["beta"]), cfg["gate_t"]
    if cfg["recipe"] == "paper" or (gate_t is None and (alpha or beta)):
        return torch.ones(len(s), dtype=torch.bool)
    if not (alpha or beta):
        return torch.zeros(len(s), dtype=torch.bool)
    # the gate as `combine` applies it; a fine-tuned stacked head (no experiment trains one) would gate
    # on its own encoder's z, s here is the frozen KB encoder's
    return s > float(gate_t)


@dataclass(frozen=True)
class OodThreshold:
    """The OOD rule of a run: `ood` = s < value. `value` None (no reference split found: `reason`)
    makes every record's `ood` null."""

    value: float | None
    split: str | None = None
    images: int = 0
    percentile: float = OOD_PERCENTILE
    reason: str | None = None

    def flag(self, s: float) -> bool | None:
        """Whether an image with relevance s is out of distribution (None: no threshold)."""
        return None if self.value is None else bool(s < self.value)

    def describe(self) -> dict[str, Any]:
        """The rule as JSON values (serve's /health, predict's --json summary)."""
        return {
            "threshold": None if self.value is None else round(self.value, 6),
            "rule": (
                f"s below percentile {self.percentile:g} of s over the run's {self.split} images "
                f"({self.images})"
                if self.value is not None
                else f"none: {self.reason}"
            ),
        }


def ood_threshold(info: dict[str, Any], ws: Workspace | None) -> OodThreshold:
    """The run's threshold from its own neighbour tables in `ws` (the run's workspace): the split its
    choices were made on (`select_split`, else `val`), else `train`; s over its images with the model's
    k neighbours, as the model reads them. No table: a threshold of None with the reason, logged once."""
    from retformer.trainer.features import load_retrieval_features, neighbor_table_path

    dataset = (info.get("dataset") or {}).get("name")
    kb = (info.get("kb") or {}).get("name")
    k, table_k = int(info["k"]), int(info.get("search_k") or info["k"])
    splits = list(dict.fromkeys(s for s in (info.get("select_split"), "val", "train") if s))
    if ws is None or not dataset or not kb:
        return _none("the run's workspace, dataset or KB is unknown")
    for split in splits:
        if not neighbor_table_path(ws, dataset, kb, table_k, split).is_file():
            continue
        try:
            features = load_retrieval_features(ws, dataset, kb, table_k, split).subset_k(k)
        except UserError as exc:  # a table of an older KB state: say so, predict without the flag
            return _none(f"{split} neighbour table unreadable ({exc})")
        s = mean_similarity(features).numpy()
        if len(s) == 0:
            continue
        return OodThreshold(float(np.percentile(s, OOD_PERCENTILE)), split, len(s))
    return _none(f"no {'/'.join(splits)} neighbour table for {dataset} x {kb} (k{table_k}) in {ws.root}")


def _none(reason: str) -> OodThreshold:
    log.warning("no out-of-distribution threshold (`ood` is null): %s", reason)
    return OodThreshold(None, reason=reason)
