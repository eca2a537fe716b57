"""The benchmarked fast preprocessing path: torchvision's PIL steps without their wrappers, and
ToTensor + Normalize once per batch; bit-identical to the encoder's per-image transform."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def _resize_step(step: Any) -> Callable[[Any], Any]:
    """torchvision's Resize on a PIL image, minus ~40 us of per-call bookkeeping: the same output
    size rule (`_compute_resized_output_size`) and the same `Image.resize` call."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import pil_modes_mapping

    size = [step.size] if isinstance(step.size, int) else list(step.size)
    mode = step.interpolation
    resample = pil_modes_mapping[InterpolationMode(mode) if isinstance(mode, str) else mode]
    max_size = step.max_size

    def resize(img: Any) -> Any:
        w, h = img.size
        if len(size) == 2:
            new_h, new_w = size
        else:
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = size[0], int(size[0] * long / short)
            if max_size is not None and new_long > max_size:
                new_short, new_long = int(max_size * new_short / new_long), max_size
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_h, new_w) == (h, w):
            return img
        return img.resize((new_w, new_h), resample)

    return resize


def _center_crop_step(step: Any) -> Callable[[Any], Any]:
    """torchvision's CenterCrop on a PIL image (the same box); padding cases go to torchvision."""
    crop_h, crop_w = step.size

    def crop(img: Any) -> Any:
        w, h = img.size
        if (w, h) == (crop_w, crop_h):
            return img  # the same pixels torchvision's full-size crop would copy
        if crop_w > w or crop_h > h:
            return step(img)
        top = int(round((h - crop_h) / 2.0))
        left = int(round((w - crop_w) / 2.0))
        return img.crop((left, top, left + crop_w, top + crop_h))

    return crop


def _fast_steps(steps: list[Any]) -> Callable[[Any], Any]:
    from torchvision import transforms

    fns = []
    for step in steps:
        if type(step) is transforms.Resize and isinstance(step.size, int | list | tuple):
            fns.append(_resize_step(step))
        elif type(step) is transforms.CenterCrop:
            fns.append(_center_crop_step(step))
        else:
            fns.append(step)

    def apply(img: Any) -> Any:
        for fn in fns:
            img = fn(img)
        return img

    return apply


def split_transform(encoder: Any) -> tuple[Callable[[Any], Any], tuple, tuple] | None:
    """(PIL steps, mean, std) when the encoder's transform ends in ToTensor + Normalize, else None.

    The PIL steps (resize, crop) run per image in the loader; ToTensor + Normalize run per batch in
    `normalize_batch`. Encoders whose transform has another shape use `encoder.preprocess` per image.
    """
    from torchvision import transforms

    tf = getattr(encoder, "_tf", None)
    if tf is None:
        tf = getattr(getattr(encoder, "loaded", None), "preprocess", None)
    if not isinstance(tf, transforms.Compose) or len(tf.transforms) < 2:
        return None
    *pil_steps, to_tensor, normalize = tf.transforms
    if not isinstance(to_tensor, transforms.ToTensor) or not isinstance(normalize, transforms.Normalize):
        return None
    mean = tuple(float(m) for m in np.ravel(normalize.mean))
    std = tuple(float(s) for s in np.ravel(normalize.std))
    return _fast_steps(pil_steps), mean, std


def normalize_batch(pixels: torch.Tensor, mean: tuple, std: tuple, device: Any) -> torch.Tensor:
    """uint8 [B,H,W,3] pixels -> float32 [B,3,H,W] on `device`: ToTensor then Normalize, batched.

    The same arithmetic in the same order as the per-image transform, hence the same bits; the
    layout change happens on the uint8 pixels and the float steps run in place (3x faster).
    """
    x = pixels.to(device, non_blocking=True)
    out = torch.empty((x.shape[0], x.shape[3], x.shape[1], x.shape[2]), dtype=torch.float32, device=x.device)
    out.copy_(x.permute(0, 3, 1, 2))
    out.div_(255)
    out.sub_(torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1))
    out.div_(torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1))
    return out
