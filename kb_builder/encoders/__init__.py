"""Frozen encoders, built from a validated manifest entry (`encoders.image` / `encoders.text`,
kb_builder/kb_schema.py's `ImageEncoder` / `TextEncoder`):

    build_image_encoder(ImageEncoder(name="open_clip", model="ViT-B-16", pretrained="datacomp_xl_s13b_b90k"))
    build_image_encoder(ImageEncoder(name="efficientnet_lite0", image_size=64))
    build_text_encoder(TextEncoder(name="minilm"))

Backends are imported on first use, so listing names or validating a manifest stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from retformer.artifacts.errors import UserError
from retformer.kb_builder.encoders.base import ImageEncoder, TextEncoder

if TYPE_CHECKING:
    from retformer.kb_builder import kb_schema

__all__ = [
    "ImageEncoder",
    "TextEncoder",
    "build_image_encoder",
    "build_text_encoder",
    "encoder_modules",
    "encoder_names",
]

# name -> "module:Class", relative to this package.
_IMAGE = {
    "efficientnet_lite0": "efficientnet_lite:EfficientNetLite0Encoder",
    "open_clip": "open_clip_encoder:OpenClipImageEncoder",
}
_TEXT = {
    "minilm": "minilm:MiniLMEncoder",
    "open_clip": "open_clip_encoder:OpenClipTextEncoder",
}


def encoder_names() -> dict[str, list[str]]:
    """Known encoder names by kind: {"image": [...], "text": [...]}."""
    return {"image": sorted(_IMAGE), "text": sorted(_TEXT)}


def encoder_modules() -> dict[str, dict[str, str]]:
    """The module of each encoder by kind and name ({"image": {"open_clip": "kb_builder.encoders.
    open_clip_encoder", ...}, "text": {...}}), without importing any (`retformer list encoders`)."""
    return {
        kind: {name: f"{__name__}.{target.split(':')[0]}" for name, target in sorted(registry.items())}
        for kind, registry in (("image", _IMAGE), ("text", _TEXT))
    }


def _build(spec: kb_schema.ImageEncoder | kb_schema.TextEncoder, registry: dict[str, str], kind: str) -> Any:
    name = spec.name
    if name not in registry:
        raise UserError(f"unknown {kind} encoder '{name}' (known: {', '.join(sorted(registry))})")
    module, cls = registry[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)(spec)


def build_image_encoder(spec: kb_schema.ImageEncoder) -> ImageEncoder:
    """A frozen image encoder (CPU, eval mode) for this manifest entry; UserError if the name is unknown."""
    return _build(spec, _IMAGE, "image")


def build_text_encoder(spec: kb_schema.TextEncoder) -> TextEncoder:
    """A frozen text encoder (CPU, eval mode) for this manifest entry; UserError if the name is unknown."""
    return _build(spec, _TEXT, "text")
