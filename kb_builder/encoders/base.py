"""Base classes of the frozen encoders: one image and one text interface for every backend.

Both return float32, L2-normalised rows, computed in eval mode under `torch.inference_mode`. On CUDA
the forward pass runs under autocast (bf16 where supported, else fp16): the KB stores fp16 vectors
anyway, and half precision roughly doubles encoder throughput.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from retformer.artifacts.decode import to_rgb
from retformer.artifacts.errors import UserError

__all__ = ["ImageEncoder", "TextEncoder", "check_image_size", "to_rgb"]


def check_image_size(value: Any, default: int | None) -> int | None:
    """A positive int image size, or the default when the spec leaves it out (None)."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 16:
        raise UserError(f"encoder image_size must be an integer >= 16, got {value!r}")
    return value


class _Frozen(ABC):
    """What both encoder kinds share: device placement, eval mode, autocast, normalised fp32 output."""

    name: str
    dim: int
    spec: dict[str, Any]
    autocast: bool = True
    device: torch.device = torch.device("cpu")

    @property
    @abstractmethod
    def _modules(self) -> torch.nn.Module:
        """The module(s) to move between devices and switch to eval mode."""

    def to(self, device: str | torch.device) -> _Frozen:
        """Move the weights to `device`; returns self so `build_...(spec).to(dev)` reads naturally."""
        self.device = torch.device(device)
        self._modules.to(self.device)
        return self

    @contextlib.contextmanager
    def _frozen_forward(self) -> Iterator[None]:
        """inference_mode + eval mode (restored after: a fine-tune loop may own the module) + autocast."""
        module = self._modules
        was_training = module.training
        module.eval()
        try:
            with torch.inference_mode(), self._autocast():
                yield
        finally:
            module.train(was_training)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not (self.autocast and self.device.type == "cuda"):
            return contextlib.nullcontext()
        from retformer.artifacts.devices import amp_dtype  # bf16 where native (sm_80+), else fp16

        return torch.autocast("cuda", dtype=amp_dtype(self.device))

    @staticmethod
    def _normalise(feats: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: an fp16 norm of a 1280-d vector can overflow.
        return F.normalize(feats.float(), dim=-1)


class ImageEncoder(_Frozen):
    """A frozen image tower: PIL image -> CHW tensor (`preprocess`) -> unit vector (`encode`).

    Attributes: `name`, `dim` (output width), `image_size` (square input side), `spec` (resolved
    manifest entry for stage records), `model` (the tower, an nn.Module, for a later fine-tune mode).
    """

    image_size: int
    model: torch.nn.Module

    @property
    def _modules(self) -> torch.nn.Module:
        return self.model

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """Any-mode PIL image -> float32 CHW tensor of side `image_size`, normalised for the tower."""
        return self._transform(to_rgb(img))

    @abstractmethod
    def _transform(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> float32 CHW tensor."""

    @abstractmethod
    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> [B,dim] unnormalised features (called inside the frozen context)."""

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] preprocessed images -> [B,dim] float32 L2-normalised features on `self.device`."""
        with self._frozen_forward():
            feats = self._features(batch.to(self.device, non_blocking=True))
        return self._normalise(feats)


class TextEncoder(_Frozen):
    """A frozen text tower: list of strings -> [B,dim] unit vectors. Long texts are truncated by the
    tokenizer; the empty string is a valid input."""

    @abstractmethod
    def _features(self, texts: list[str]) -> torch.Tensor:
        """Strings -> [B,dim] unnormalised features (called inside the frozen context)."""

    def encode(self, texts: list[str], dedupe: bool = True) -> torch.Tensor:
        """[B] strings -> [B,dim] float32 L2-normalised features on `self.device`.

        Captions in a KB repeat a lot (templates, stock alt-text), so with `dedupe` each distinct
        string is encoded once and the rows are scattered back to the input order.
        """
        texts = [str(t) for t in texts]
        if not texts:
            return torch.zeros((0, self.dim), dtype=torch.float32, device=self.device)
        unique = list(dict.fromkeys(texts)) if dedupe else texts
        with self._frozen_forward():
            feats = self._features(unique)
        feats = self._normalise(feats)
        if len(unique) == len(texts):
            return feats
        row = {t: i for i, t in enumerate(unique)}
        return feats[torch.tensor([row[t] for t in texts], device=feats.device)]
