"""A run's KB image encoder applied as the embed stage applies it: decode, the encoder's preprocessing in
its batched form (`kb_builder/embed/fast_transform.py`), forward, z rounded to float16."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from retformer.artifacts.decode import decode_image, to_rgb

if TYPE_CHECKING:
    from retformer.kb_builder import kb_schema


class ImageEncoder:
    """The KB's frozen image encoder (the one that embedded the run's dataset), built on first use."""

    def __init__(self, spec: kb_schema.ImageEncoder, device: torch.device) -> None:
        self.spec, self.device = spec, device
        self._encoder: Any = None
        self._split: Any = None  # (PIL part, mean, std) of the preprocessing, or None: the whole of it

    def encoder(self) -> Any:
        """The torch encoder on the device (built once)."""
        if self._encoder is None:
            from retformer.kb_builder.embed.fast_transform import split_transform
            from retformer.kb_builder.encoders import build_image_encoder

            self._encoder = build_image_encoder(self.spec).to(self.device)
            self._split = split_transform(self._encoder)
        return self._encoder

    def pixels(self, data: bytes) -> tuple[Any, str | None]:
        """One image's preprocessed pixels (as the embed stage's loader makes them) or a skip reason."""
        enc = self.encoder()
        try:
            img, reason = decode_image(data)
        except Exception:  # noqa: BLE001 - Pillow plugins raise more than decode_image expects
            img, reason = None, "decode_failed"
        if img is None:
            return None, reason or "not_an_image"
        side = enc.image_size
        try:
            if self._split is None:
                px = enc.preprocess(img)
                ok = tuple(px.shape) == (3, side, side)
            else:
                px = np.asarray(to_rgb(self._split[0](img)), dtype=np.uint8)
                ok = px.shape == (side, side, 3)
        except Exception:  # noqa: BLE001 - an image the transform rejects is skipped, not fatal
            return None, "preprocess_failed"
        return (px, None) if ok else (None, "preprocess_failed")

    def encode(self, pixels: list[Any]) -> tuple[np.ndarray, torch.Tensor]:
        """(z as float16 (B, D), the normalised image batch) of preprocessed pixels."""
        from retformer.kb_builder.embed.fast_transform import normalize_batch

        enc = self.encoder()
        if self._split is None:
            x = torch.stack(pixels).to(self.device)
        else:
            x = normalize_batch(
                torch.from_numpy(np.stack(pixels)), self._split[1], self._split[2], self.device
            )
        return enc.encode(x).to(torch.float16).cpu().numpy(), x
