"""Zero-shot classification from class-name prompts ("CLIP zero-shot", paper Table 4).

Each class's weight vector is the normalised mean of the text embeddings of the class name put into
open_clip's ImageNet prompt templates (`open_clip.zero_shot_metadata`: OPENAI_IMAGENET_TEMPLATES,
80 prompts, or SIMPLE_IMAGENET_TEMPLATES, 7); an image's logits are 100 x cosine(z, w_c), z being the
dataset's precomputed image embedding. No training.

This needs an image and a text encoder trained together into one space, i.e. the image and text
towers of the same open_clip model and weights. The embedded default's pair (EfficientNet-Lite0 +
MiniLM) was trained separately: its image and text vectors are not comparable, so a prompt cannot
score an image, and asking for it is a UserError rather than a number near chance.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from retformer.artifacts.errors import UserError

LOGIT_SCALE = 100.0  # CLIP's learned temperature ends at (and is clamped to) 100
TEMPLATE_SETS = ("openai", "simple")
_PLACEHOLDER = re.compile(r"^class_\d+$")


def check_aligned(encoders: dict[str, Any], kb_name: str = "") -> None:
    """UserError unless the KB's image and text encoders are one open_clip model (same weights)."""
    image, text = encoders.get("image") or {}, encoders.get("text") or {}
    where = f"KB {kb_name}" if kb_name else "the KB"
    if image.get("name") != "open_clip" or text.get("name") != "open_clip":
        raise UserError(
            f"zero-shot classification needs an image and a text encoder trained together (the image and "
            f"text towers of one open_clip model); {where} pairs {image.get('name')!r} with "
            f"{text.get('name')!r}, trained separately, so a class-name prompt cannot score an image: "
            "use a KB whose encoders.image and encoders.text are the same open_clip model"
        )
    same = image.get("model") == text.get("model") and image.get("pretrained") == text.get("pretrained")
    if not same:
        raise UserError(
            f"zero-shot classification needs the image and text towers of the same open_clip model and "
            f"weights; {where} pairs {image.get('model')}/{image.get('pretrained')} with "
            f"{text.get('model')}/{text.get('pretrained')}"
        )


def templates(kind: str = "openai") -> list:
    """open_clip's prompt templates: callables class name -> prompt."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    if kind == "openai":
        return list(OPENAI_IMAGENET_TEMPLATES)
    if kind == "simple":
        return list(SIMPLE_IMAGENET_TEMPLATES)
    raise UserError(f"zero-shot templates must be one of {', '.join(TEMPLATE_SETS)}, got {kind!r}")


def prompt_class_names(names: Sequence[str], dataset_kind: str | None = None) -> list[str]:
    """Class names as prompts want them: underscores to spaces. A dataset without real names
    (`class_<i>` placeholders) of ImageNet's label order (imagenet_lt, mini_webvision) gets open_clip's
    IMAGENET_CLASSNAMES; any other is a UserError (a placeholder prompt measures nothing)."""
    names = list(names)
    if names and all(_PLACEHOLDER.match(n) for n in names):
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        if dataset_kind in ("imagenet_lt", "mini_webvision") and len(names) <= len(IMAGENET_CLASSNAMES):
            return list(IMAGENET_CLASSNAMES[: len(names)])
        raise UserError(
            "zero-shot needs class names, but the dataset only has placeholders (class_0, ...): "
            "give them in the experiment (zeroshot.class_names: [...]) or in the dataset"
        )
    return [n.replace("_", " ") for n in names]


@torch.inference_mode()
def zeroshot_weights(
    text_encoder: Any, class_names: Sequence[str], template_set: str = "openai", batch_classes: int = 64
) -> torch.Tensor:
    """(C, D) unit rows: per class, the renormalised mean of its prompts' unit text embeddings."""
    tpl = templates(template_set)
    rows = []
    for start in range(0, len(class_names), batch_classes):
        chunk = class_names[start : start + batch_classes]
        prompts = [t(name) for name in chunk for t in tpl]
        emb = text_encoder.encode(prompts).float().cpu().view(len(chunk), len(tpl), -1)
        rows.append(torch.nn.functional.normalize(emb.mean(dim=1), dim=-1))
    return torch.cat(rows)


def zeroshot_logits(
    image_emb: torch.Tensor, weights: torch.Tensor, scale: float = LOGIT_SCALE
) -> torch.Tensor:
    """(N, C) logits = scale * cosine(image, class weight); image rows are renormalised (fp16 storage)."""
    if image_emb.shape[1] != weights.shape[1]:
        raise UserError(
            f"image embeddings are {image_emb.shape[1]}-d but the text embeddings {weights.shape[1]}-d: "
            "the dataset was embedded with another encoder than the KB's text tower"
        )
    z = torch.nn.functional.normalize(image_emb.float(), dim=-1)
    return scale * z @ weights.T
