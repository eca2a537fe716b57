"""`FinetuneModel`: a trainable copy of a KB image encoder with a head on top, the model of fine-tune
mode (trained by `trainer/finetune.py`, saved and rebuilt by `trainer/checkpoint.py`).

Its own module, below both: the checkpoint loader rebuilds it without importing the training loop.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from retformer.trainer.image_models import OptTensor


class FinetuneModel(nn.Module):
    """A trainable copy of a KB image encoder followed by a head with the trainer's signature:
    forward(images, nn_img, nn_txt) = head(normalize(encoder(images)), nn_img, nn_txt)."""

    def __init__(self, image_encoder: Any, head: nn.Module) -> None:
        super().__init__()
        # Copy the tower: the loaded encoder may be shared (open_clip's cache) and must stay frozen.
        enc = copy.copy(image_encoder)
        enc.model = copy.deepcopy(image_encoder.model)
        enc.model.requires_grad_(True)
        self._enc = enc  # not a module attribute: its tower is registered below as `encoder`
        self.encoder = enc.model
        self.head = head
        self.preprocess = enc.preprocess
        self.image_size = int(enc.image_size)
        # what trainer.train.needs_neighbors reads: baselines' heads skip the neighbor gather
        self.needs_neighbors = bool(getattr(head, "needs_neighbors", True))
        self.config: dict[str, Any] = {
            "kind": "finetune",
            "encoder": dict(getattr(enc, "spec", {})),
            "head": dict(getattr(head, "config", {})),
        }

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """z: the encoder's features, L2-normalised in float32 (as the KB's were)."""
        return F.normalize(self._enc._features(images).float(), dim=-1)

    def forward(
        self,
        images: torch.Tensor,
        nn_img: torch.Tensor | None = None,
        nn_txt: torch.Tensor | None = None,
        *,
        nn_label: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.head(self.encode(images), nn_img, nn_txt, nn_label=nn_label)

    def training_logits(
        self, images: torch.Tensor, nn_img: OptTensor, nn_txt: OptTensor, *, nn_label: OptTensor = None
    ) -> torch.Tensor:
        """The head's training logits of the encoded images (`trainer.loop.Fitting`)."""
        return self.head.training_logits(self.encode(images), nn_img, nn_txt, nn_label=nn_label)

    def no_weight_decay(self) -> set[str]:
        """Class / position embeddings of the encoder and the head (ViT practice)."""
        out = set()
        for prefix, module in (("encoder.", self.encoder), ("head.", self.head)):
            if hasattr(module, "no_weight_decay"):
                out |= {prefix + n for n in module.no_weight_decay()}
        return out
