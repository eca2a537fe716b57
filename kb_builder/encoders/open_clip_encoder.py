"""open_clip image and text towers (the paper's encoders: ViT-B-16, datacomp_xl_s13b_b90k).

`pretrained` is an open_clip hub tag (downloaded on first use, so it needs internet), a local
checkpoint file, or None for random weights (tests). When the image and the text spec name the same
model and weights, both encoders share one loaded model (a weak-value cache: it lives as long as an
encoder uses it).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from retformer.artifacts.errors import UserError
from retformer.kb_builder.encoders.base import ImageEncoder, TextEncoder, check_image_size

if TYPE_CHECKING:
    from retformer.kb_builder import kb_schema

TEXT_BATCH = 512
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@dataclass(eq=False)
class LoadedClip:
    """One loaded open_clip model with its eval transform and tokenizer."""

    clip: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    dim: int
    model_name: str
    pretrained: str | None
    image_size: int | None  # the force_image_size it was built with (None = the model's default)


_CACHE: weakref.WeakValueDictionary[tuple, LoadedClip] = weakref.WeakValueDictionary()


def _is_hub(model_name: str) -> bool:
    """Model names that open_clip resolves from a hub repo or folder rather than a bundled config."""
    return model_name.startswith(("hf-hub:", "local-dir:"))


def _resolve(spec: kb_schema.ImageEncoder | kb_schema.TextEncoder) -> tuple[str, str | None, int | None]:
    """Validate (model, pretrained, image_size) before any weights are touched."""
    import open_clip

    model_name = spec.model
    if not isinstance(model_name, str) or not model_name:
        raise UserError("open_clip encoder needs `model`, e.g. ViT-B-16 (see open_clip.list_models())")
    hub_model = _is_hub(model_name)
    if not hub_model and model_name not in open_clip.list_models():
        raise UserError(f"open_clip has no model '{model_name}' (see open_clip.list_models())")
    pretrained = spec.pretrained
    if pretrained is not None:
        if not isinstance(pretrained, str) or not pretrained:
            raise UserError(
                f"open_clip `pretrained` must be a tag, a checkpoint path or null, got {pretrained!r}"
            )
        path = Path(pretrained).expanduser()
        if pretrained.startswith("hf-hub:"):
            pass  # weights on the Hugging Face hub: only downloading can check them
        elif path.is_file():
            pretrained = str(path.resolve())
        elif "/" in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES):
            raise UserError(f"open_clip checkpoint file not found: {pretrained}")
        elif not hub_model:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if pretrained.lower() not in [t.lower() for t in tags]:
                known = ", ".join(tags) or "none"
                raise UserError(
                    f"open_clip model {model_name} has no pretrained tag '{pretrained}' (known: {known})"
                )
    image_size = check_image_size(spec.image_size, None)
    cfg = None if hub_model else open_clip.get_model_config(model_name)
    if cfg and image_size == cfg.get("vision_cfg", {}).get("image_size"):
        image_size = None  # the default size: same model as a spec that leaves it out
    return model_name, pretrained, image_size


def load_clip(model_name: str, pretrained: str | None, image_size: int | None) -> LoadedClip:
    """Load (or reuse) one frozen open_clip model."""
    import open_clip

    key = (model_name, pretrained, image_size)
    loaded = _CACHE.get(key)
    if loaded is not None:
        return loaded
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, force_image_size=image_size
        )
    except RuntimeError as err:
        if "Failed to download" not in str(err):
            raise
        # No internet (or no hub access): say how to proceed instead of a traceback.
        raise UserError(f"{err} -- offline, set `pretrained` to a local checkpoint file") from err
    clip.requires_grad_(False)
    clip.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    cfg = None if _is_hub(model_name) else open_clip.get_model_config(model_name)
    if cfg and "embed_dim" in cfg:
        dim = int(cfg["embed_dim"])
    else:  # hub-defined models: ask the text tower once
        with torch.inference_mode():
            dim = int(clip.encode_text(tokenizer([""])).shape[-1])
    loaded = LoadedClip(clip, preprocess, tokenizer, dim, model_name, pretrained, image_size)
    _CACHE[key] = loaded
    return loaded


def _shared_for_text(model_name: str, pretrained: str | None) -> LoadedClip | None:
    """A model already loaded for an image encoder: the text tower does not depend on image_size."""
    for (name, weights, _), loaded in list(_CACHE.items()):
        if name == model_name and weights == pretrained:
            return loaded
    return None


def _spec_record(loaded: LoadedClip) -> dict[str, Any]:
    return {"name": "open_clip", "model": loaded.model_name, "pretrained": loaded.pretrained}


class OpenClipImageEncoder(ImageEncoder):
    """open_clip's image tower (`clip.visual`), frozen; `dim` = the joint embedding width."""

    def __init__(self, spec: kb_schema.ImageEncoder) -> None:
        self.loaded = load_clip(*_resolve(spec))
        self.name = "open_clip"
        self.autocast = spec.autocast
        self.model = self.loaded.clip.visual
        size = self.model.image_size
        self.image_size = int(size[0] if isinstance(size, tuple | list) else size)
        self.dim = self.loaded.dim
        self.spec = {**_spec_record(self.loaded), "image_size": self.image_size}

    def _transform(self, img: Image.Image) -> torch.Tensor:
        return self.loaded.preprocess(img)

    def _features(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch)  # what CLIP.encode_image computes before its optional normalise


class OpenClipTextEncoder(TextEncoder):
    """open_clip's text tower (token embedding, transformer, projection), frozen; truncates at the
    model's context length (77 tokens for CLIP)."""

    def __init__(self, spec: kb_schema.TextEncoder) -> None:
        model_name, pretrained, image_size = _resolve(spec)
        self.loaded = _shared_for_text(model_name, pretrained) or load_clip(
            model_name, pretrained, image_size
        )
        self.name = "open_clip"
        self.autocast = spec.autocast
        self.batch_size = spec.batch_size or TEXT_BATCH
        self.dim = self.loaded.dim
        self.spec = _spec_record(self.loaded)

    @property
    def _modules(self) -> torch.nn.Module:
        return self.loaded.clip

    def _features(self, texts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.loaded.tokenizer(texts[start : start + self.batch_size]).to(self.device)
            out.append(self.loaded.clip.encode_text(tokens))
        return torch.cat(out)
