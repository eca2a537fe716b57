"""The neighbours' votes on val: the kNN vote's k, the weighted votes' (k, temperature) (knn_weighted,
caption_vote) and the log evidence RetFormer's rule adds, each read from the neighbour tables once per
split so a grid of (k, temperature) costs a softmax and a sum per cell."""

from __future__ import annotations

from typing import Any

import torch

from retformer.trainer.baselines import knn_vote
from retformer.trainer.config import SelectOptions
from retformer.trainer.evidence import (
    CAPTION_NULL,
    CAPTION_TEMP,
    ClassText,
    Neighbours,
    log_evidence,
    neighbour_vote,
    vote_from_parts,
    vote_parts,
)
from retformer.trainer.feature_batches import map_batches
from retformer.trainer.features import RetrievalFeatures
from retformer.trainer.model import RetFormer
from retformer.trainer.val_criteria import criterion, top1


def _neighbours(b: dict[str, torch.Tensor]) -> Neighbours:
    """(z, nn_img, nn_txt, nn_label) of a feature batch: what every vote reads."""
    return b["z"], b["nn_img"], b["nn_txt"], b["nn_label"]


@torch.inference_mode()
def split_evidence(
    model: RetFormer, features: RetrievalFeatures, kind: str, vote_temp: float, vote_k: int
) -> torch.Tensor:
    """(N, C) log evidence of every query under the model's evidence settings, `kind` and the vote's
    (k, temperature): what its rule adds, times beta (`RetFormer.evidence`'s values)."""
    rule = model.rule
    args = (int(model.num_classes), kind, model.class_reader(), rule.caption_temp, rule.caption_null)
    parts = split_vote_parts(features, *args)
    if parts is not None:
        vote = vote_from_parts(*parts, vote_k, vote_temp)
    else:  # too many (query, neighbour, class) entries to hold: stream it
        vote = vote_scores(features, *args[:3], vote_k, vote_temp, caption=args[3:])
    return log_evidence(vote).float()


# Elements of the (N, k, C) class distributions `split_vote_parts` holds at once (256 MB of float32).
VOTE_PARTS_MAX = 64 << 20


def split_vote_parts(
    features: RetrievalFeatures,
    num_classes: int,
    kind: str,
    class_text: ClassText | None = None,
    caption_temp: float = CAPTION_TEMP,
    caption_null: float = CAPTION_NULL,
    batch_size: int = 4096,
) -> tuple[torch.Tensor | None, torch.Tensor] | None:
    """`trainer.evidence.vote_parts` of every query (cos (N, k), class distributions (N, k, C)), read once
    so a grid of (k, temperature) votes costs a softmax and a sum each; None when they are too large to
    hold (`VOTE_PARTS_MAX`)."""
    if len(features) * features.k * num_classes > VOTE_PARTS_MAX:
        return None

    def parts(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor]:
        c, p = vote_parts(kind, _neighbours(b), num_classes, class_text, caption_temp, caption_null)
        return c, p.cpu()

    out = map_batches(features, parts, batch_size)
    if out is None:
        return None
    cos, probs = out
    return (None if cos is None else cos.cpu()), probs


def select_knn_k(
    val: RetrievalFeatures, num_classes: int, ks: tuple[int, ...], metric: str = "balanced"
) -> tuple[int, float, list[dict[str, Any]]]:
    """k of the kNN vote on val, the grid capped by the table's k, ties to the smaller k.
    Returns (k, val top-1, trials)."""
    score_of = criterion(metric)
    grid = sorted({min(k, val.k) for k in ks})
    trials = []
    for k in grid:
        scores = knn_vote(val.subset_k(k), num_classes)
        trials.append(
            {"k": k, "val_score": score_of(scores, val.labels), "val_top1": top1(scores, val.labels)}
        )
    best = max(trials, key=lambda r: (r["val_score"], -r["k"]))
    return best["k"], best["val_top1"], trials


def vote_scores(
    features: RetrievalFeatures,
    num_classes: int,
    kind: str,
    k: int,
    vote_temp: float,
    class_text: ClassText | None = None,
    batch_size: int = 4096,
    caption: tuple[float, float] = (CAPTION_TEMP, CAPTION_NULL),
) -> torch.Tensor:
    """(N, C) similarity-weighted vote of the first k neighbours: weights softmax(cos(z, e_j) / vote_temp),
    votes their KB labels ("label": knn_weighted) or the classes their captions name ("caption":
    caption_vote, with the class-name prompt vectors `class_text`; caption: its (temperature, null
    similarity))."""
    f = features.subset_k(min(k, features.k))
    return map_batches(
        f,
        lambda b: neighbour_vote(kind, *_neighbours(b), num_classes, vote_temp, class_text, *caption).cpu(),
        batch_size,
        lambda: torch.zeros(0, num_classes),
    )


def select_vote(
    val: RetrievalFeatures,
    num_classes: int,
    kind: str,
    opts: SelectOptions,
    class_text: ClassText | None = None,
    metric: str = "balanced",
) -> tuple[dict[str, Any], float, list[dict[str, Any]]]:
    """k and the vote temperature of a weighted vote (`vote_scores`) on val; ties to the smaller k, then
    the higher temperature. Returns ({k, vote_temp}, val top-1, trials)."""
    score_of = criterion(metric)
    trials = []
    parts = split_vote_parts(val, num_classes, kind, class_text)  # the neighbours read once for the grid
    for k in sorted({min(k, val.k) for k in opts.knn_k}):
        for temp in sorted(opts.vote_temps, reverse=True):
            if parts is not None:
                scores = vote_from_parts(*parts, k, temp)
            else:
                scores = vote_scores(val, num_classes, kind, k, temp, class_text)
            trials.append(
                {
                    "k": k,
                    "vote_temp": temp,
                    "val_score": score_of(scores, val.labels),
                    "val_top1": top1(scores, val.labels),
                }
            )
    best = max(trials, key=lambda r: (r["val_score"], -r["k"], r["vote_temp"]))
    return {"k": best["k"], "vote_temp": best["vote_temp"]}, best["val_top1"], trials
