"""One batched forward over retrieval features: `map_batches` runs a function on the model inputs of
consecutive query slices (`RetrievalFeatures.inputs`) and concatenates what it returns, in the features'
order. Prediction (`trainer.train.predict`), the selection's branches and relevance, the votes, the
diagnostics and the browser's image-only logits all read a split this way."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from retformer.trainer.features import RetrievalFeatures

Out = TypeVar("Out", torch.Tensor, tuple[torch.Tensor | None, ...])


def map_batches(
    features: RetrievalFeatures,
    fn: Callable[[dict[str, torch.Tensor]], Out],
    batch_size: int,
    empty: Callable[[], Out | None] = lambda: None,
    *,
    neighbors: bool = True,
    device: torch.device | str | None = None,
    non_blocking: bool = False,
) -> Out | None:
    """`fn` of the inputs of queries [start, start + batch_size), start = 0, batch_size, ... (`inputs`:
    z, and unless neighbors=False nn_img, nn_txt, nn_label), each input moved to `device` first when one
    is given; its outputs concatenated along dim 0. `fn` returns a tensor or a tuple of them (each
    position concatenated; a position that is None in the first batch stays None). `empty()` is the
    result of features without queries. `fn` keeps its own dtype and device conversions (e.g.
    `.float().cpu()`), so the values are those of a hand-written loop, bit for bit."""
    out = []
    for start in range(0, len(features), batch_size):
        b = features.inputs(start, min(start + batch_size, len(features)), neighbors)
        if device is not None:
            b = {k: v.to(device, non_blocking=non_blocking) for k, v in b.items()}
        out.append(fn(b))
    if not out:
        return empty()
    if isinstance(out[0], tuple):
        return tuple(None if p[0] is None else torch.cat(p) for p in zip(*out, strict=True))
    return torch.cat(out)
