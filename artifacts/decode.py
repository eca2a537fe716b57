"""Decode untrusted image bytes: return an image or the reason it was skipped, never crash or hang."""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

# Captions longer than this are cut before tokenisation (the tokenizer truncates anyway; this bounds
# the work spent on pathological alt-text).
MAX_CAPTION_CHARS = 2000
_ORIENTATION = 0x0112  # the EXIF tag


def decode_image(data: bytes | None) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None) on success, or (None, reason) with reason in a small fixed vocabulary. The
    image is upright: turned as its EXIF orientation says (`upright`), for embed and predict alike."""
    if not data:
        return None, "empty_file"
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that: treat both as bombs.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "decompression_bomb"
    except UnidentifiedImageError:
        return None, "not_an_image"
    except (OSError, SyntaxError, ValueError):
        return None, "truncated_or_corrupt"
    if img.width < 1 or img.height < 1:
        return None, "empty_image"
    try:
        return to_rgb(upright(img)), None
    except (OSError, ValueError):
        return None, "unsupported_mode"


def upright(img: Image.Image) -> Image.Image:
    """`img` turned as its EXIF orientation says a viewer shows it (a phone's photo is stored sideways
    with orientation 6); `img` itself when it has no orientation or a broken EXIF block."""
    try:
        orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block: the pixels as stored
        return img
    if orientation not in range(2, 9):
        return img
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode (L, LA, P, CMYK, I;16, I, F, RGBA) to 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: scale to 8 bit instead of clipping to white.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        arr = (arr / (hi if hi > 255 else 255.0) * 255.0).clip(0, 255).astype("uint8")
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def clean_caption(caption: str | None) -> str | None:
    """None for a missing or blank caption, else the caption cut to MAX_CAPTION_CHARS."""
    if caption is None:
        return None
    caption = caption.strip()
    return caption[:MAX_CAPTION_CHARS] if caption else None
