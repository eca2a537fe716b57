"""What a trained RetFormer does with its neighbours, measured on a split (report.html, eval.json).

- **attention**: the class tokens' attention over the k neighbours (last layer, head mean, both streams
  averaged): its Pearson correlation with the query-neighbour image cosine per query (then averaged),
  its entropy over log k (1 = uniform), and the share of attention on neighbours whose class (KB label,
  or the class their caption names) differs from the query's true label, beside that share under uniform
  attention (attention that reads the query puts less mass on them);
- **agreement**: test images binned by the fraction of their neighbours whose class is the query's
  true label, with each method's accuracy per bin (where retrieval helps, and where it misleads);
- **retrieval use**: the share of images whose relevance s passes the selected rule's gate.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from retformer.trainer.config import CAPTION_NULL, CAPTION_TEMP
from retformer.trainer.evidence import ClassText, caption_class_probs
from retformer.trainer.feature_batches import map_batches
from retformer.trainer.features import RetrievalFeatures
from retformer.trainer.model import RetFormer, neighbor_attention, neighbour_similarity, relevance

AGREEMENT_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)


def neighbour_classes(
    features: RetrievalFeatures, num_classes: int, class_text: ClassText | None, kind: str | None
) -> torch.Tensor:
    """(N, k) each neighbour's class: its KB label ("label"), else the class its caption names most
    ("caption", -1 where it names none or has no caption); -1 everywhere without either."""
    rows = features.nn_rows
    if kind == "label":
        labels = features.store_label[rows]
        return torch.where((labels >= 0) & (labels < num_classes), labels, torch.full_like(labels, -1))
    if kind == "caption" and class_text is not None:
        txt = features.store_txt[rows].float()
        probs = caption_class_probs(txt, class_text, CAPTION_TEMP, CAPTION_NULL)
        best = probs.max(dim=-1)
        return torch.where(best.values > 0.5, best.indices, torch.full_like(best.indices, -1))
    return torch.full(rows.shape, -1, dtype=torch.long)


@torch.inference_mode()
def attention_stats(
    model: RetFormer,
    features: RetrievalFeatures,
    classes: torch.Tensor,
    batch_size: int = 512,
    max_images: int = 2000,
) -> dict[str, float]:
    """Correlation of the class tokens' neighbour attention with similarity, its normalised entropy and
    its mass on neighbours of another class than the query's (and that mass under uniform attention),
    over the first `max_images` images (means over images settle well before a 10,000-image test)."""
    model.eval()
    corr, entropy, wrong, wrong_uniform, counted = [], [], [], [], 0
    n = min(len(features), max_images)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        b = features.inputs(start, stop)
        _, attn = model._retrieval_logits(b["z"], b["nn_img"], b["nn_txt"], True, b.get("nn_label"))
        per_stream = neighbor_attention(attn)
        a = torch.stack(list(per_stream.values())).mean(0)  # (B, k)
        a = a / a.sum(1, keepdim=True).clamp_min(1e-12)  # over the neighbours only
        sim = neighbour_similarity(b["z"], b["nn_img"])
        ac, sc = a - a.mean(1, keepdim=True), sim - sim.mean(1, keepdim=True)
        denom = (ac.norm(dim=1) * sc.norm(dim=1)).clamp_min(1e-12)
        corr.append((ac * sc).sum(1) / denom)
        entropy.append(-(a * a.clamp_min(1e-12).log()).sum(1) / math.log(a.shape[1]))
        cls = classes[start:stop]
        known = cls >= 0
        other = known & (cls != features.labels[start:stop, None])
        has = known.any(1)
        wrong.append(((a * other).sum(1) / (a * known).sum(1).clamp_min(1e-12))[has])
        wrong_uniform.append((other.sum(1).float() / known.sum(1).clamp_min(1).float())[has])
        counted += int(has.sum())
    cat = torch.cat
    return {
        "attention_similarity_corr": float(cat(corr).mean()),
        "attention_entropy_over_log_k": float(cat(entropy).mean()),
        "attention_on_other_class": float(cat(wrong).mean()) if counted else None,
        "uniform_on_other_class": float(cat(wrong_uniform).mean()) if counted else None,
        "images": n,
    }


def agreement_accuracy(
    features: RetrievalFeatures, classes: torch.Tensor, correct: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Images binned by the share of their (classed) neighbours that carry the true label: per bin the
    image count and each method's accuracy (`correct`: per method, (N,) bool in the features' order;
    None for an empty bin)."""
    known = classes >= 0
    agree = ((classes == features.labels[:, None]) & known).sum(1).float() / known.sum(1).clamp_min(1).float()
    edges = AGREEMENT_BINS
    bins = []
    for i in range(len(edges) - 1):
        lo, hi = edges[i], edges[i + 1]
        mask = (agree >= lo) & ((agree < hi) if i < len(edges) - 2 else (agree <= hi))
        n = int(mask.sum())
        row: dict[str, Any] = {"from": lo, "to": hi, "images": n}
        for name, right in correct.items():
            row[name] = float(right[mask].float().mean()) if n else None
        bins.append(row)
    return {"bins": bins, "methods": list(correct)}


@torch.inference_mode()
def retrieval_share(model: RetFormer, features: RetrievalFeatures) -> float:
    """Share of the images where the selected rule adds its retrieval term (1 without a gate, 0 when
    alpha = beta = 0)."""
    rule = model.rule
    if not (float(rule.alpha) or float(rule.beta)):
        return 0.0
    if rule.gate_t is None:
        return 1.0
    gate_t = float(rule.gate_t)
    passed = map_batches(
        features,
        lambda b: relevance(b["z"], b["nn_img"]) > gate_t,
        2048,
        lambda: torch.zeros(0, dtype=torch.bool),
    )
    return int(passed.sum()) / max(len(features), 1)
