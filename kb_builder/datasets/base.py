"""The in-memory form of a downstream dataset: named splits of (uid, label, image).

A split holds its images either as a uint8 pixel array (Fashion-MNIST: small, already in memory) or
as file paths (ImageFolder: opened lazily). Both forms are plain arrays and paths, so a split pickles
cheaply to a Dask worker.

Uids are stable and unique per source dataset + split + original index (e.g. `fmnist-train-000123`)
and use only `[A-Za-z0-9_-]`, the webdataset key alphabet. The same image keeps the same uid in every
dataset and KB built from it, which is what lets the neighbor stage exclude a query retrieving
itself by uid.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from retformer.artifacts.decode import upright
from retformer.artifacts.errors import UserError
from retformer.kb_builder.datasets.longtail import shot_split as _shot_split
from retformer.kb_builder.datasets.longtail import shot_thresholds as _shot_thresholds
from retformer.kb_builder.datasets.schema import DatasetManifest, ShotThresholds

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


def safe_token(text: str) -> str:
    """`text` with every character outside `[A-Za-z0-9_-]` replaced by `_` (for uids and file names)."""
    return _UNSAFE.sub("_", text) or "_"


def make_uid(prefix: str, split: str, index: int, width: int = 6) -> str:
    """The uid of original item `index` of `split`: `<prefix>-<split>-<index zero-padded>`."""
    return f"{safe_token(prefix)}-{safe_token(split)}-{index:0{width}d}"


class DatasetSplit:
    """One split: `uids[i]`, `labels[i]` and `image(i)` describe item i.

    Exactly one of `pixels` (uint8, (N, H, W) or (N, H, W, C)) or `paths` (N image files) backs the
    images. `source_index[i]` is item i's index in the original, unsubsampled split (kept so that
    subsets such as the long-tailed train split stay traceable to their source).
    """

    def __init__(
        self,
        uids: Sequence[str],
        labels: np.ndarray | Sequence[int],
        *,
        pixels: np.ndarray | None = None,
        paths: Sequence[Path | str] | None = None,
        source_index: np.ndarray | Sequence[int] | None = None,
    ) -> None:
        if (pixels is None) == (paths is None):
            raise ValueError("a DatasetSplit needs exactly one of pixels= or paths=")
        self.uids: list[str] = list(uids)
        self.labels: np.ndarray = np.asarray(labels, dtype=np.int64)
        self.pixels = pixels
        self.paths = [Path(p) for p in paths] if paths is not None else None
        n = len(self.uids)
        self.source_index: np.ndarray = (
            np.arange(n, dtype=np.int64) if source_index is None else np.asarray(source_index, dtype=np.int64)
        )
        backing = len(pixels) if pixels is not None else len(self.paths or [])
        if not (len(self.labels) == backing == len(self.source_index) == n):
            raise ValueError(
                f"split lengths differ: {n} uids, {len(self.labels)} labels, {backing} images, "
                f"{len(self.source_index)} source indices"
            )

    def __len__(self) -> int:
        return len(self.uids)

    def image(self, i: int) -> Image.Image:
        """Item i's image as a PIL image (grayscale stays mode "L"; encoders convert to RGB)."""
        if self.pixels is not None:
            return Image.fromarray(np.ascontiguousarray(self.pixels[i]))
        assert self.paths is not None
        with Image.open(self.paths[i]) as img:
            img.load()
            turned = upright(img)
            return turned.copy() if turned is img else turned

    def image_source(self, i: int) -> bytes | Image.Image:
        """What a shard writer should store for item i: the file's own bytes when it already is a PNG
        or JPEG (no lossy or bloating re-encode), otherwise the decoded image."""
        if self.paths is not None:
            data = self.paths[i].read_bytes()
            if data.startswith(_PNG_MAGIC) or data.startswith(_JPEG_MAGIC):
                return data
            try:
                with Image.open(io.BytesIO(data)) as img:
                    img.load()
                    # re-encoded without its EXIF block: turned upright first, as decode_image turns
                    # the PNG/JPEG files kept as they are (artifacts/decode.py)
                    turned = upright(img)
                    return turned.copy() if turned is img else turned
            except (OSError, SyntaxError, ValueError) as exc:
                # Pillow recognised the header at load time but the data is broken (a truncated BMP):
                # name the file instead of Pillow's "image file is truncated".
                raise UserError(
                    f"image {self.paths[i]} cannot be decoded ({exc}): repair or remove the file"
                ) from exc
        return self.image(i)

    def subset(self, rows: np.ndarray | Sequence[int]) -> DatasetSplit:
        """The split restricted to `rows` (positions in this split), in that order; uids are kept."""
        rows = np.asarray(rows, dtype=np.int64)
        return DatasetSplit(
            [self.uids[r] for r in rows],
            self.labels[rows],
            pixels=self.pixels[rows] if self.pixels is not None else None,
            paths=[self.paths[r] for r in rows] if self.paths is not None else None,
            source_index=self.source_index[rows],
        )

    def class_counts(self, num_classes: int) -> list[int]:
        """Number of items of each class 0..num_classes-1."""
        return np.bincount(self.labels, minlength=num_classes).astype(int).tolist()


@dataclass
class DownstreamDataset:
    """A labelled dataset with named splits (`train` always; `val` and/or `test` where present).

    `shot` (the manifest's `shot_thresholds`) configures the many/medium/few split of classes by
    training-set size: `many`, `few`, `scale` and `reference_max` (schema.ShotThresholds), passed to
    `longtail.shot_split`.
    `spec` is the validated manifest the dataset was loaded from (kept for KB builders and records).
    `pool` holds labelled images in none of the splits (e.g. those a long-tailed subset left out): the
    "world" a KB can be built from (`kb_sources.py`). It is not a split: it is never sharded,
    embedded or evaluated as one. `notes` says how the splits were made (e.g. a seeded val hold-out).
    """

    name: str
    class_names: list[str]
    splits: dict[str, DatasetSplit]
    spec: DatasetManifest
    shot: ShotThresholds = field(default_factory=ShotThresholds)
    pool: DatasetSplit | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def train(self) -> DatasetSplit:
        return self.splits["train"]

    def train_class_counts(self) -> list[int]:
        """Training images per class, in label order."""
        return self.train.class_counts(self.num_classes)

    def shot_counts_used(self) -> list[int]:
        """The per-class counts the shot split is computed from: the training counts here; a subclass
        with fixed reference counts (cifar.ShotReferenceDataset) returns those."""
        return self.train_class_counts()

    def shot_thresholds(self) -> dict[str, float]:
        """The (possibly scaled) many/few thresholds this dataset's shot split uses."""
        return _shot_thresholds(self.shot_counts_used(), **self.shot.model_dump())

    def shot_split(self) -> dict[str, list[int]]:
        """Class ids grouped into `many` / `medium` / `few` by `shot_counts_used()` (training-set size)."""
        return _shot_split(self.shot_counts_used(), **self.shot.model_dump())

    def describe(self) -> dict[str, Any]:
        """The content of the workspace's `dataset.json` (see docs/architecture.md)."""
        return {
            "name": self.name,
            "class_names": list(self.class_names),
            "num_classes": self.num_classes,
            "split_sizes": {k: len(v) for k, v in self.splits.items()},
            "train_class_counts": self.train_class_counts(),
            "shot_split": self.shot_split(),
            "shot_thresholds": self.shot_thresholds(),
            "world_pool_size": len(self.pool) if self.pool is not None else 0,
            "split_notes": dict(self.notes),
            "spec": self.spec.given(),
        }


def holdout_rows(
    labels: np.ndarray, seed: int, per_class: int | None = None, fraction: float = 0.0
) -> np.ndarray:
    """Sorted indices of a seeded per-class hold-out: `per_class` items of every class, or else
    `fraction` of each class (rounded down); every class keeps at least one item."""
    rng = np.random.RandomState(seed)
    picked = [np.zeros(0, dtype=np.int64)]
    for c in np.unique(labels):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        n = per_class if per_class is not None else int(len(idx) * fraction)
        picked.append(idx[: max(0, min(n, len(idx) - 1))])
    return np.sort(np.concatenate(picked))


def hold_out_val(
    splits: dict[str, DatasetSplit],
    notes: dict[str, Any],
    name: str,
    seed: int,
    per_class: Any,
    fraction: Any,
) -> None:
    """Give splits without val one, held out of `train` (seeded with `seed`): `per_class` images of each
    class, or else `fraction` of each; every class keeps one training image; said in `notes["val"]`."""
    label = repr(name)
    if per_class is not None and (
        isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1
    ):
        raise UserError(f"dataset {label}: val_per_class must be a positive integer, got {per_class!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise UserError(f"dataset {label}: val_fraction must be in [0, 1), got {fraction!r}")
    train = splits["train"]
    rows = holdout_rows(train.labels, seed, per_class, float(fraction))
    if not len(rows):
        return
    splits["val"] = train.subset(rows)
    splits["train"] = train.subset(np.setdiff1d(np.arange(len(train)), rows))
    how = f"{per_class} training images per class" if per_class else f"{fraction:.0%} of each class"
    notes["val"] = f"seeded hold-out of {how} of the training split (seed {seed}), at least one kept"
