"""What the retrieved KB items say about a query's class, without training.

Two kinds of neighbour evidence, both turned into one class distribution per query by a
similarity-weighted vote, w_j = softmax_j(cos(z, e_j) / T) over the k neighbours (DINO's weighted kNN):

- **label evidence**: a neighbour's KB label (only where the KB is labelled with the dataset's
  classes; `knn_weighted`);
- **caption evidence** (label-free: web KBs have captions, not labels): a neighbour's caption embedding
  against the class-name prompts embedded by the KB's own text tower (text to text, so any text
  encoder works, not only a CLIP pair), q_j = softmax_c(cos(t_j, p_c) / T_c) over the C classes and a
  "names no class" slot whose similarity is `null_sim`; a caption nearer to no class name than that
  votes mostly for nothing, and a neighbour without a caption votes nothing (`caption_vote`).
  Both sides are read **centred** (`ClassText`): each caption less the mean caption vector of the KB's
  neighbour store, each prompt less the prompts' mean. Every caption of a KB shares its template's
  direction, every prompt the prompts' one; uncentred, a class whose prompt leans on the captions' shared
  direction wins captions that never name it (MiniLM read 132 of the 616 own-data digit captions as
  another digit, mostly "nine", or as none; centred: none, docs/method-notes.md "eighth round").

RetFormer's stacked rule adds beta * log(evidence) to its logits (trainer/model.py), so everything here
is also what a reloaded model computes from (z, nn_img, nn_txt) alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from retformer.trainer.config import CAPTION_NULL, CAPTION_TEMP

# Prompts the class names are put into (averaged per class): the bare name and two short phrases, so a
# caption matches the name it mentions whatever template it was written in.
CAPTION_TEMPLATES = ("{name}", "a photo of a {name}.", "an image of {name}.")
# Evidence is floored at this before its log: a class no neighbour supports costs a bounded amount.
EVIDENCE_FLOOR = 1e-3


@torch.inference_mode()
def class_text_embeddings(
    text_encoder: Any, class_names: Sequence[str], templates: Sequence[str] = CAPTION_TEMPLATES
) -> torch.Tensor:
    """(C, Dt) unit rows: per class, the renormalised mean of its prompts' unit text embeddings from
    `text_encoder.encode(list[str])` (the KB's text tower)."""
    names = [n.replace("_", " ") for n in class_names]
    prompts = [t.format(name=n) for n in names for t in templates]
    emb = text_encoder.encode(prompts).float().cpu().view(len(names), len(templates), -1)
    return F.normalize(F.normalize(emb, dim=-1).mean(dim=1), dim=-1)


@dataclass(frozen=True)
class ClassText:
    """What a caption is read against: the class-name prompts' unit text vectors `prompts` (C, Dt) and the
    KB's mean unit caption vector `centre` (Dt,) (`caption_centre`); an all-zero centre reads captions
    uncentred (a model saved before centring; a bare (C, Dt) tensor passed as class text)."""

    prompts: torch.Tensor
    centre: torch.Tensor

    @classmethod
    def of(cls, class_text: ClassText | torch.Tensor) -> ClassText:
        """`class_text` itself, or a bare prompt tensor (C, Dt) with a zero centre (read uncentred)."""
        if isinstance(class_text, ClassText):
            return class_text
        return cls(class_text, torch.zeros(class_text.shape[-1], dtype=class_text.dtype))

    @property
    def centred(self) -> bool:
        """Whether captions are read centred (the centre is not all zero)."""
        return bool(self.centre.abs().sum() > 0)


@torch.inference_mode()
def caption_centre(store_txt: torch.Tensor, chunk: int = 65_536) -> torch.Tensor:
    """(Dt,) float32 mean of the unit caption vectors of `store_txt` (M, Dt) over the rows with a caption
    (all-zero rows have none); zeros where no row has one. Chunked: a web store has millions of rows."""
    total = torch.zeros(store_txt.shape[1], dtype=torch.float64)
    count = 0
    for start in range(0, store_txt.shape[0], chunk):
        rows = store_txt[start : start + chunk].float()
        rows = rows[rows.abs().sum(-1) > 0]
        total += F.normalize(rows, dim=-1).sum(0).double()
        count += len(rows)
    return (total / max(count, 1)).float()


def caption_class_probs(
    txt: torch.Tensor, class_text: ClassText | torch.Tensor, temperature: float, null_sim: float
) -> torch.Tensor:
    """(..., C) class distribution of each caption vector in `txt` (..., Dt): softmax over the C class
    prompts and a "names no class" slot at similarity null_sim, the slot then dropped (its mass is a vote
    for nothing), cosines taken centred where `class_text` has a centre (`ClassText`). An all-zero vector
    (no caption) gives all zeros."""
    reader = ClassText.of(class_text)
    has_text = txt.abs().sum(-1, keepdim=True) > 0
    captions = F.normalize(txt.float(), dim=-1)
    prompts = reader.prompts.to(txt.device, torch.float32)
    centre = reader.centre.to(txt.device, torch.float32)
    captions = captions - centre  # a zero centre (read uncentred) leaves them as they are, bit for bit
    if len(prompts) > 1:  # one class has no prompt direction of its own to centre on
        # prompts centred only with a centre: chosen on the device, so a GPU batch does not wait for
        # the host to read `reader.centred`
        centred = centre.abs().sum() > 0
        prompts = torch.where(centred, F.normalize(prompts - prompts.mean(dim=0), dim=-1), prompts)
    sims = F.normalize(captions, dim=-1) @ prompts.T
    null = torch.full_like(sims[..., :1], float(null_sim))
    probs = torch.softmax(torch.cat([sims, null], dim=-1) / temperature, dim=-1)[..., :-1]
    return probs * has_text


def neighbour_weights(z: torch.Tensor, nn_img: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, k) vote weights: softmax over the neighbours of cos(z, neighbour image) / temperature."""
    cos = (F.normalize(z.float(), dim=-1)[:, None, :] * F.normalize(nn_img.float(), dim=-1)).sum(-1)
    return torch.softmax(cos / temperature, dim=1)


def weighted_vote(weights: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """(B, C) = sum_j weights[:, j] * probs[:, j, :]: each neighbour's class distribution, weighted."""
    return torch.einsum("bk,bkc->bc", weights, probs.float())


def neighbour_vote(
    kind: str,
    z: torch.Tensor,
    nn_img: torch.Tensor | None,
    nn_txt: torch.Tensor | None,
    nn_label: torch.Tensor | None,
    num_classes: int,
    vote_temp: float,
    class_text: ClassText | torch.Tensor | None = None,
    caption_temp: float = CAPTION_TEMP,
    caption_null: float = CAPTION_NULL,
) -> torch.Tensor:
    """(B, C) the neighbours' vote: their KB labels ("label") or the classes their captions name
    ("caption", against `class_text`), weighted by softmax(cos(z, neighbour image) / vote_temp)
    (uniform without nn_img). knn_weighted, caption_vote and RetFormer's evidence term all read this."""
    neighbours = (z, nn_img, nn_txt, nn_label)
    cos, probs = vote_parts(kind, neighbours, num_classes, class_text, caption_temp, caption_null)
    return vote_from_parts(cos, probs, probs.shape[1], vote_temp)


# (z, nn_img, nn_txt, nn_label) of a batch of queries: what a vote reads (None: not in the tables)
Neighbours = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def vote_parts(
    kind: str,
    neighbours: Neighbours,
    num_classes: int,
    class_text: ClassText | torch.Tensor | None = None,
    caption_temp: float = CAPTION_TEMP,
    caption_null: float = CAPTION_NULL,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """What every vote of these queries reads, whatever its k and temperature: (cos (B, k) between each
    query and its neighbours' images, or None without nn_img; the neighbours' class distributions
    (B, k, C)). `vote_from_parts` then casts any (k', T) vote from them: `neighbour_vote`'s values."""
    z, nn_img, nn_txt, nn_label = neighbours
    if kind == "label":
        if nn_label is None:
            raise ValueError("label evidence needs the neighbours' KB labels (nn_label)")
        probs = label_probs(nn_label, num_classes)
    elif kind == "caption":
        if nn_txt is None or class_text is None:
            raise ValueError("caption evidence needs the neighbours' caption vectors and the class prompts")
        probs = caption_class_probs(nn_txt, class_text, caption_temp, caption_null)
    else:
        raise ValueError(f"no evidence kind set (evidence={kind!r})")
    if nn_img is None:
        return None, probs
    cos = (F.normalize(z.float(), dim=-1)[:, None, :] * F.normalize(nn_img.float(), dim=-1)).sum(-1)
    return cos, probs


def vote_from_parts(
    cos: torch.Tensor | None, probs: torch.Tensor, k: int, temperature: float
) -> torch.Tensor:
    """(B, C) the similarity-weighted vote of the first k neighbours from `vote_parts`' output."""
    probs = probs[:, :k]
    if cos is None:
        weights = torch.full(probs.shape[:2], 1.0 / probs.shape[1], device=probs.device)
    else:
        weights = torch.softmax(cos[:, :k] / temperature, dim=1)
    return weighted_vote(weights, probs)


def label_probs(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(..., C) one-hot of KB labels; a label outside [0, C) (-1: unlabelled) is all zeros."""
    valid = (labels >= 0) & (labels < num_classes)
    onehot = F.one_hot(torch.where(valid, labels, torch.zeros_like(labels)), num_classes).float()
    return onehot * valid[..., None]


def log_evidence(evidence: torch.Tensor) -> torch.Tensor:
    """log(max(evidence, EVIDENCE_FLOOR)): what a rule adds to logits, bounded below."""
    return torch.log(evidence.clamp_min(EVIDENCE_FLOOR))


def balanced_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean per-class accuracy over the classes present in `labels` (argmax ties to the lowest class),
    rounded to 6 decimals: the accuracy a class-balanced test set would show. On a long-tailed val split
    (a hold-out of long-tailed training data) top-1 rewards the head classes; this does not."""
    y = labels.to(logits.device).long()
    if len(y) == 0:
        return 0.0
    correct = (logits.argmax(dim=1) == y).float()
    c = int(max(int(y.max()) + 1, logits.shape[1]))
    hits = torch.zeros(c, device=y.device).index_add_(0, y, correct)
    totals = torch.bincount(y, minlength=c).float()
    present = totals > 0
    return round(float((hits[present] / totals[present]).mean()), 6)
