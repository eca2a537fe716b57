"""Fine-tune mode's images: random access into the dataset's shards, augmentation, data loading.

- Images come from the dataset's webdataset shards (`work/datasets/<d>/shards/<split>-*.tar`),
  read by random access: one pass over the tar headers records each member's byte offset, and a
  worker reads only the bytes of the images it decodes. `images: dataset` reads them through the
  dataset loader instead (the same uids).
- Augmentation: random resized crop (scale `crop_scale`, aspect 3/4..4/3) to the encoder's input
  size and a horizontal flip, then the encoder's own preprocessing (resize, centre crop, normalise).
  Every random draw comes from a generator seeded by (seed, epoch, sample), never from a worker's
  RNG: the images of epoch e are the same with any number of workers and after a resume.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from retformer.artifacts.decode import to_rgb, upright
from retformer.artifacts.errors import UserError
from retformer.artifacts.shards import image_members, list_shards


class ShardImages:
    """Random access to the images of webdataset shards by uid: (shard, byte offset, size) per image.

    Plain arrays and paths, so it pickles cheaply into DataLoader workers; a worker opens the shard
    and reads only the image's bytes."""

    def __init__(self, shards: Sequence[Path], uids: Sequence[str]) -> None:
        self.paths = [str(p) for p in shards]
        where: dict[str, tuple[int, int, int]] = {}
        for s, path in enumerate(self.paths):
            for uid, member in image_members(path).items():
                where[uid] = (s, member.offset, member.size)
        missing = [u for u in uids if u not in where]
        if missing:
            raise UserError(
                f"{len(missing)} of {len(uids)} images are not in the shards "
                f"{Path(self.paths[0]).parent if self.paths else '(none)'} (first: {missing[0]!r}); "
                "rerun `retformer shards --dataset ...` and the stages after it"
            )
        rows = np.array([where[u] for u in uids], dtype=np.int64).reshape(len(uids), 3)
        self.shard, self.offset, self.size = rows[:, 0].copy(), rows[:, 1].copy(), rows[:, 2].copy()

    def __len__(self) -> int:
        return len(self.shard)

    def load(self, i: int) -> Image.Image:
        """Image i (decoded, any mode)."""
        with open(self.paths[int(self.shard[i])], "rb") as fh:
            fh.seek(int(self.offset[i]))
            data = fh.read(int(self.size[i]))
        img = Image.open(io.BytesIO(data))
        img.load()
        return upright(img)  # as the embed stage saw it (artifacts/decode.py)


class SplitImages:
    """The images of a kb_builder.datasets split, in the order of `uids`."""

    def __init__(self, split: Any, uids: Sequence[str]) -> None:
        row = {u: i for i, u in enumerate(split.uids)}
        missing = [u for u in uids if u not in row]
        if missing:
            raise UserError(f"{len(missing)} images are not in the dataset split (first: {missing[0]!r})")
        self.split = split.subset([row[u] for u in uids])

    def __len__(self) -> int:
        return len(self.split)

    def load(self, i: int) -> Image.Image:
        return self.split.image(int(i))


def shard_images(shard_dir: Path, split: str, uids: Sequence[str]) -> ShardImages:
    """The images of one split of a dataset's shard folder (`<split>-NNNNN.tar`), in `uids` order."""
    shards = (
        [p for p in list_shards(shard_dir) if p.name.startswith(f"{split}-")] if shard_dir.is_dir() else []
    )
    if not shards:
        raise UserError(
            f"no `{split}` shards in {shard_dir}: fine-tune mode reads the images from the dataset's "
            "shards (run `retformer shards --dataset ...`), or set finetune.images=dataset"
        )
    return ShardImages(shards, uids)


def random_resized_crop(
    img: Image.Image, size: int, scale: tuple[float, float], rng: random.Random
) -> Image.Image:
    """torchvision's RandomResizedCrop (aspect 3/4..4/3, 10 tries, then a centre crop), drawing from
    `rng` instead of the global torch RNG."""
    w, h = img.size
    area = w * h
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
            break
    else:
        cw = ch = min(w, h)
        top, left = (h - ch) // 2, (w - cw) // 2
    return img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))


class ImageDataset(torch.utils.data.Dataset):
    """Item (i, aug_seed) -> (preprocessed CHW tensor, i); aug_seed None = no augmentation (eval)."""

    def __init__(
        self,
        images: ShardImages | SplitImages,
        preprocess: Callable[[Image.Image], torch.Tensor],
        image_size: int,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip: bool = True,
    ) -> None:
        self.images = images
        self.preprocess = preprocess
        self.image_size = image_size
        self.crop_scale = crop_scale
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int | None]) -> tuple[torch.Tensor, int]:
        i, aug_seed = item
        img = to_rgb(self.images.load(i))
        if aug_seed is not None:
            rng = random.Random(aug_seed)
            img = random_resized_crop(img, self.image_size, self.crop_scale, rng)
            if self.hflip and rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self.preprocess(img), i


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, augment: bool) -> list[list[tuple]]:
    """The micro-batches of one epoch: a permutation seeded by (seed, epoch), each item (i, aug_seed)."""
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)
    # One distinct augmentation seed per (seed, epoch, sample), independent of the worker that decodes it.
    aug = np.random.default_rng([seed, epoch, 0xA06]).integers(0, 2**62, n) if augment else None
    items = [(int(i), int(aug[i]) if aug is not None else None) for i in order]
    return [items[s : s + batch_size] for s in range(0, n, batch_size)]


class _EpochSampler:
    """Batch sampler whose batches are set per epoch (it runs in the main process, so persistent
    workers keep serving it)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple]] = []

    def __iter__(self) -> Iterator[list[tuple]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _loader(dataset: ImageDataset, sampler: Any, num_workers: int, device: torch.device, persistent: bool):
    # fork: workers inherit the dataset (and the encoder's transform) without pickling it.
    ctx = "fork" if num_workers and "fork" in multiprocessing.get_all_start_methods() else None
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=persistent and num_workers > 0,
        multiprocessing_context=ctx,
    )
